//! Wake-ups for online recipients: the message path notifies an account after its envelope is durable, and the
//! account's delivery stream (if any) wakes up and scans its mailbox. Holds account ids only, never an envelope.
//!
//! Contract: an account has at most one delivery stream, on all its connections together. A new `Subscribe` for
//! the account replaces the current one: the registration of the older stream is told it was replaced (and the
//! stream ends with `SUBSCRIPTION_REPLACED`), and only the newest is woken from then on. A replaced registration
//! dropping late never removes its successor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use relay_proto::AccountId;
use tokio::sync::{oneshot, watch};

struct Slot {
    generation: u64,
    wake: watch::Sender<u64>,
    /// Dropped (or sent) when a newer registration replaces this one.
    replaced: oneshot::Sender<()>,
}

#[derive(Default)]
struct Registry {
    slots: HashMap<AccountId, Slot>,
    next_generation: u64,
}

/// Wake-ups for online recipients: one registration, the newest, per account with a delivery stream.
#[derive(Default)]
pub struct Subscribers {
    map: Mutex<Registry>,
}

/// A registration in [`Subscribers`]; unregisters on drop (unless it was replaced already).
pub struct Subscription {
    registry: Arc<Subscribers>,
    account: AccountId,
    generation: u64,
    /// Changes each time the account is notified.
    pub rx: watch::Receiver<u64>,
    /// Resolves when a newer registration of the same account replaced this one.
    pub replaced: oneshot::Receiver<()>,
}

impl Subscribers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the delivery stream of `account`, replacing the one it had, if any.
    pub fn subscribe(self: &Arc<Self>, account: AccountId) -> Subscription {
        let (wake, rx) = watch::channel(0);
        let (replaced_tx, replaced) = oneshot::channel();
        let mut registry = self.lock();
        registry.next_generation += 1;
        let generation = registry.next_generation;
        let old = registry.slots.insert(account, Slot { generation, wake, replaced: replaced_tx });
        drop(registry);
        if let Some(old) = old {
            old.replaced.send(()).ok();
        }
        Subscription { registry: self.clone(), account, generation, rx, replaced }
    }

    /// Tells `account`'s delivery stream, if any, that its mailbox changed.
    pub fn notify(&self, account: &AccountId) {
        if let Some(slot) = self.lock().slots.get(account) {
            slot.wake.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Number of accounts with a delivery stream open.
    pub fn online(&self) -> usize {
        self.lock().slots.len()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut registry = self.registry.lock();
        if registry.slots.get(&self.account).is_some_and(|slot| slot.generation == self.generation) {
            registry.slots.remove(&self.account);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_subscription_replaces_the_first_and_only_the_newest_is_woken() {
        let subscribers = Arc::new(Subscribers::default());
        let account = AccountId([7; 16]);
        let mut first = subscribers.subscribe(account);
        let mut second = subscribers.subscribe(account);
        assert_eq!(first.replaced.try_recv(), Ok(()), "the first registration is told it was replaced");
        assert!(second.replaced.try_recv().is_err(), "the newest is not");
        subscribers.notify(&account);
        assert!(second.rx.has_changed().unwrap_or(false), "the newest is woken");
        assert!(first.rx.has_changed().is_err(), "the replaced one's wake-ups are gone");
        assert_eq!(subscribers.online(), 1);
        // The replaced registration dropping late does not unregister its successor.
        drop(first);
        assert_eq!(subscribers.online(), 1);
        drop(second);
        assert_eq!(subscribers.online(), 0);
    }
}
