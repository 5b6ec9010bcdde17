//! The connections authenticated as each account, so that erasing an account closes every one of them.
//!
//! Contract: a session registers when it authenticates and unregisters when it is dropped, so the map holds live
//! connections only (bounded by the connections the relay accepts). [`AccountConnections::close_all`] closes every
//! registered connection of an account but the one named, which the caller ends itself once its answer is written;
//! a connection that authenticates as the account afterwards cannot exist, since the account's keys are removed
//! before the call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use relay_proto::AccountId;

use super::state::Closer;

/// Live authenticated connections, by account.
#[derive(Default)]
pub struct AccountConnections {
    by_account: Mutex<HashMap<AccountId, Vec<Weak<Closer>>>>,
}

impl AccountConnections {
    fn map(&self) -> MutexGuard<'_, HashMap<AccountId, Vec<Weak<Closer>>>> {
        // A poisoned lock only means a panic elsewhere mid-update of this map; it stays usable.
        self.by_account.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection authenticated as `account`.
    pub fn add(&self, account: AccountId, closer: &Arc<Closer>) {
        let mut map = self.map();
        let list = map.entry(account).or_default();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(closer));
    }

    /// Unregisters a connection (it is going away).
    pub fn remove(&self, account: &AccountId, closer: &Arc<Closer>) {
        let mut map = self.map();
        if let Some(list) = map.get_mut(account) {
            list.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(closer)));
            if list.is_empty() {
                map.remove(account);
            }
        }
    }

    /// Closes every connection of `account` except `keep`; how many it closed.
    pub fn close_all(&self, account: &AccountId, keep: &Arc<Closer>) -> usize {
        let list = self.map().remove(account).unwrap_or_default();
        let mut closed = 0;
        for closer in list.iter().filter_map(Weak::upgrade) {
            if Arc::ptr_eq(&closer, keep) {
                continue;
            }
            closer.close();
            closed += 1;
        }
        // The kept one stays registered until it goes away.
        self.map().entry(*account).or_default().push(Arc::downgrade(keep));
        closed
    }

    /// Accounts with at least one registered connection (tests and metrics).
    pub fn accounts(&self) -> usize {
        self.map().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_an_account_closes_its_other_connections_only_and_dropped_ones_leave_no_entry() {
        let registry = AccountConnections::default();
        let (a, b) = (AccountId([1; 16]), AccountId([2; 16]));
        let (a1, a2, b1) = (Arc::new(Closer::default()), Arc::new(Closer::default()), Arc::new(Closer::default()));
        registry.add(a, &a1);
        registry.add(a, &a2);
        registry.add(b, &b1);
        assert_eq!(registry.close_all(&a, &a1), 1);
        assert!(a2.ended() && !a1.ended() && !b1.ended());
        registry.remove(&a, &a1);
        registry.remove(&b, &b1);
        drop((a2, b1));
        assert_eq!(registry.accounts(), 0, "nothing is kept for connections that went away");
    }
}
