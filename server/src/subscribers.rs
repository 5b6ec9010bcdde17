//! Wake-ups for online recipients: the message path notifies an account after its envelope is durable, and the
//! account's delivery streams (if any) wake up and scan their mailbox. Holds account ids only, never an envelope.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use relay_proto::AccountId;
use tokio::sync::watch;

/// Wake-ups for online recipients, one watch channel per account with at least one delivery stream.
#[derive(Default)]
pub struct Subscribers {
    map: Mutex<HashMap<AccountId, watch::Sender<u64>>>,
}

/// A registration in [`Subscribers`]; unregisters on drop.
pub struct Subscription {
    registry: Arc<Subscribers>,
    account: AccountId,
    /// Changes each time the account is notified.
    pub rx: watch::Receiver<u64>,
}

impl Subscribers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AccountId, watch::Sender<u64>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a delivery stream of `account`.
    pub fn subscribe(self: &Arc<Self>, account: AccountId) -> Subscription {
        let rx = self.lock().entry(account).or_insert_with(|| watch::Sender::new(0)).subscribe();
        Subscription { registry: self.clone(), account, rx }
    }

    /// Tells `account`'s delivery streams, if any, that its mailbox changed.
    pub fn notify(&self, account: &AccountId) {
        if let Some(tx) = self.lock().get(account) {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Number of accounts with a delivery stream open.
    pub fn online(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.registry.lock();
        if map.get(&self.account).is_some_and(|tx| tx.receiver_count() <= 1) {
            map.remove(&self.account);
        }
    }
}
