//! Phone-number verification state: pending codes and registration locks, in two trees.
//!
//! - `verification_codes`: phone tag (32: HMAC of the number, `verify::code`) → pending code (request id, code tag,
//!   expiry, attempts left). At most one pending code per number: a new request replaces the old one.
//! - `registration_locks`: account id → lock (PBKDF2 verifier of the PIN, last activity).
//!
//! Neither tree holds a phone number, a code or a PIN. A use of a pending code is one sled transaction (read,
//! count the attempt, write back or drop), so concurrent `Register` requests cannot try more codes than allowed.

use relay_proto::AccountId;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::verify::code::{Attempt, PendingCode, PhoneTag, RequestId};
use crate::verify::lock::Lock;

/// Why the verification store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerificationStoreError {
    /// A stored record does not decode.
    #[error("corrupt verification record")]
    Corrupt,
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] sled::Error),
}

type Result<T> = std::result::Result<T, VerificationStoreError>;

/// Pending codes and registration locks (a cheap handle: clones share the trees).
#[derive(Clone)]
pub struct Verifications {
    codes: sled::Tree,
    locks: sled::Tree,
}

impl Verifications {
    pub(crate) fn new(codes: sled::Tree, locks: sled::Tree) -> Self {
        Self { codes, locks }
    }

    /// Stores `pending` as `phone`'s code; returns the request it replaced, if any. Not yet durable.
    pub fn replace_pending(&self, phone: &PhoneTag, pending: &PendingCode) -> Result<Option<PendingCode>> {
        match self.codes.insert(phone.0, &pending.encode()[..])? {
            Some(old) => PendingCode::decode(&old).map(Some).ok_or(VerificationStoreError::Corrupt),
            None => Ok(None),
        }
    }

    /// One use of `phone`'s pending code at `now_ms`; `matches` says whether the code given is the pending one.
    /// `None` when no code is pending. The request id is returned with the answer so that its file can go when
    /// the request is dropped.
    pub fn attempt(
        &self,
        phone: &PhoneTag,
        now_ms: u64,
        matches: impl Fn(&PendingCode) -> bool,
    ) -> Result<Option<(Attempt, RequestId)>> {
        let result = self.codes.transaction(|codes| {
            let Some(stored) = codes.get(phone.0)? else { return Ok(None) };
            let pending = PendingCode::decode(&stored)
                .ok_or(ConflictableTransactionError::Abort(VerificationStoreError::Corrupt))?;
            let (answer, next) = pending.attempt(now_ms, matches(&pending));
            match next {
                Some(next) => codes.insert(&phone.0[..], &next.encode()[..])?,
                None => codes.remove(&phone.0[..])?,
            };
            Ok(Some((answer, pending.request_id)))
        });
        match result {
            Ok(r) => Ok(r),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Drops `phone`'s pending code if it is still request `id` (a newer request is left alone); whether it was.
    pub fn remove_pending(&self, phone: &PhoneTag, id: &RequestId) -> Result<bool> {
        let Some(stored) = self.codes.get(phone.0)? else { return Ok(false) };
        let pending = PendingCode::decode(&stored).ok_or(VerificationStoreError::Corrupt)?;
        if pending.request_id != *id {
            return Ok(false);
        }
        Ok(self.codes.compare_and_swap(phone.0, Some(stored), None::<&[u8]>)?.is_ok())
    }

    /// The request whose code is pending for `phone`, if any.
    pub fn pending_request(&self, phone: &PhoneTag) -> Result<Option<RequestId>> {
        match self.codes.get(phone.0)? {
            Some(v) => PendingCode::decode(&v).map(|p| Some(p.request_id)).ok_or(VerificationStoreError::Corrupt),
            None => Ok(None),
        }
    }

    /// Removes whatever code is pending for `phone`; the request it belonged to, if any. Not yet durable.
    pub fn drop_pending(&self, phone: &PhoneTag) -> Result<Option<RequestId>> {
        match self.codes.remove(phone.0)? {
            Some(old) => PendingCode::decode(&old).map(|p| Some(p.request_id)).ok_or(VerificationStoreError::Corrupt),
            None => Ok(None),
        }
    }

    /// Removes every pending code expired at `now_ms`; their request ids.
    pub fn sweep_expired(&self, now_ms: u64) -> Result<Vec<RequestId>> {
        let mut removed = Vec::new();
        for item in self.codes.iter() {
            let (k, v) = item?;
            let pending = PendingCode::decode(&v).ok_or(VerificationStoreError::Corrupt)?;
            if pending.expired(now_ms) && self.codes.compare_and_swap(&k, Some(v), None::<&[u8]>)?.is_ok() {
                removed.push(pending.request_id);
            }
        }
        Ok(removed)
    }

    /// Number of pending codes.
    pub fn pending(&self) -> usize {
        self.codes.len()
    }

    /// `account`'s registration lock, if it set one.
    pub fn lock(&self, account: &AccountId) -> Result<Option<Lock>> {
        match self.locks.get(account.as_bytes())? {
            Some(v) => Lock::decode(&v).map(Some).ok_or(VerificationStoreError::Corrupt),
            None => Ok(None),
        }
    }

    /// Sets (`Some`) or removes (`None`) `account`'s lock. Not yet durable.
    pub fn set_lock(&self, account: &AccountId, lock: Option<&Lock>) -> Result<()> {
        match lock {
            Some(l) => self.locks.insert(account.as_bytes(), &l.encode()[..])?,
            None => self.locks.remove(account.as_bytes())?,
        };
        Ok(())
    }

    /// Records activity of `account` at `now_ms` if it has a lock (what keeps the lock holding). Not awaited
    /// durable: losing the latest activity in a crash leaves the one before, which only shortens the lock.
    pub fn touch(&self, account: &AccountId, now_ms: u64) -> Result<()> {
        let mut corrupt = false;
        self.locks.fetch_and_update(account.as_bytes(), |old| {
            let old = old?;
            match Lock::decode(old) {
                Some(lock) => Some(lock.touched(now_ms).encode().to_vec()),
                None => {
                    corrupt = true;
                    Some(old.to_vec())
                }
            }
        })?;
        if corrupt {
            return Err(VerificationStoreError::Corrupt);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::code::CodeKey;
    use relay_proto::verification::{CODE_ATTEMPTS, CODE_TTL_MS, VerificationCode};

    fn store() -> Verifications {
        let db = sled::Config::new().temporary(true).open().expect("open");
        Verifications::new(db.open_tree("c").expect("tree"), db.open_tree("l").expect("tree"))
    }

    #[test]
    fn a_new_request_replaces_the_pending_one_and_attempts_are_counted_in_the_store() {
        let (s, key) = (store(), CodeKey::from_bytes(&[1; 32]));
        let phone = PhoneTag([5; 32]);
        let code = VerificationCode::parse("111111").expect("code");
        let first = PendingCode::new(&key, RequestId([1; 16]), &code, 0);
        assert_eq!(s.replace_pending(&phone, &first).expect("put"), None);
        let second = PendingCode::new(&key, RequestId([2; 16]), &code, 0);
        assert_eq!(s.replace_pending(&phone, &second).expect("put"), Some(first));
        assert_eq!(s.pending_request(&phone).expect("read"), Some(RequestId([2; 16])));
        assert!(!s.remove_pending(&phone, &RequestId([1; 16])).expect("remove"), "an older id leaves it alone");

        for left in (0..CODE_ATTEMPTS).rev() {
            let got = s.attempt(&phone, 1, |_| false).expect("attempt");
            assert_eq!(got, Some((Attempt::Wrong { left }, RequestId([2; 16]))));
        }
        assert_eq!(s.attempt(&phone, 1, |_| true).expect("attempt"), None, "used up: dropped");
        assert_eq!(s.pending(), 0);

        s.replace_pending(&phone, &second).expect("put");
        assert_eq!(s.sweep_expired(CODE_TTL_MS - 1).expect("sweep"), []);
        assert_eq!(s.sweep_expired(CODE_TTL_MS).expect("sweep"), [RequestId([2; 16])]);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn locks_are_set_touched_and_removed() {
        let s = store();
        let account = AccountId([3; 16]);
        s.touch(&account, 5).expect("touching an account without a lock does nothing");
        assert_eq!(s.lock(&account).expect("read"), None);
        let pin = relay_proto::verification::RegistrationPin::parse("0000").expect("pin");
        let lock = Lock::new(&pin, 10);
        s.set_lock(&account, Some(&lock)).expect("set");
        s.touch(&account, 20).expect("touch");
        assert_eq!(s.lock(&account).expect("read").map(|l| l.last_active_ms), Some(20));
        s.set_lock(&account, None).expect("remove");
        assert_eq!(s.lock(&account).expect("read"), None);
    }
}
