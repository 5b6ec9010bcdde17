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

use super::backend::{BackendError, BoxFuture, VerificationStore};

/// Why the verification store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerificationStoreError {
    /// A stored record does not decode.
    #[error("corrupt verification record")]
    Corrupt,
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] BackendError),
}

impl From<sled::Error> for VerificationStoreError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.into())
    }
}

type Result<T> = std::result::Result<T, VerificationStoreError>;

/// Pending codes and registration locks (a cheap handle: clones share the trees).
#[derive(Clone)]
pub struct SledVerifications {
    codes: sled::Tree,
    locks: sled::Tree,
}

impl SledVerifications {
    pub(crate) fn new(codes: sled::Tree, locks: sled::Tree) -> Self {
        Self { codes, locks }
    }

    fn replace_pending_now(&self, phone: &PhoneTag, pending: &PendingCode) -> Result<Option<PendingCode>> {
        match self.codes.insert(phone.0, &pending.encode()[..])? {
            Some(old) => PendingCode::decode(&old).map(Some).ok_or(VerificationStoreError::Corrupt),
            None => Ok(None),
        }
    }

    fn attempt_now(
        &self,
        phone: &PhoneTag,
        now_ms: u64,
        matches: &(dyn Fn(&PendingCode) -> bool + Send + Sync),
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

    fn remove_pending_now(&self, phone: &PhoneTag, id: &RequestId) -> Result<bool> {
        let Some(stored) = self.codes.get(phone.0)? else { return Ok(false) };
        let pending = PendingCode::decode(&stored).ok_or(VerificationStoreError::Corrupt)?;
        if pending.request_id != *id {
            return Ok(false);
        }
        Ok(self.codes.compare_and_swap(phone.0, Some(stored), None::<&[u8]>)?.is_ok())
    }

    fn pending_request_now(&self, phone: &PhoneTag) -> Result<Option<RequestId>> {
        match self.codes.get(phone.0)? {
            Some(v) => PendingCode::decode(&v).map(|p| Some(p.request_id)).ok_or(VerificationStoreError::Corrupt),
            None => Ok(None),
        }
    }

    fn drop_pending_now(&self, phone: &PhoneTag) -> Result<Option<RequestId>> {
        match self.codes.remove(phone.0)? {
            Some(old) => PendingCode::decode(&old).map(|p| Some(p.request_id)).ok_or(VerificationStoreError::Corrupt),
            None => Ok(None),
        }
    }

    fn sweep_expired_now(&self, now_ms: u64) -> Result<Vec<RequestId>> {
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

    fn pending_now(&self) -> usize {
        self.codes.len()
    }

    fn lock_now(&self, account: &AccountId) -> Result<Option<Lock>> {
        match self.locks.get(account.as_bytes())? {
            Some(v) => Lock::decode(&v).map(Some).ok_or(VerificationStoreError::Corrupt),
            None => Ok(None),
        }
    }

    fn set_lock_now(&self, account: &AccountId, lock: Option<&Lock>) -> Result<()> {
        match lock {
            Some(l) => self.locks.insert(account.as_bytes(), &l.encode()[..])?,
            None => self.locks.remove(account.as_bytes())?,
        };
        Ok(())
    }

    fn touch_now(&self, account: &AccountId, now_ms: u64) -> Result<()> {
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

impl VerificationStore for SledVerifications {
    fn replace_pending<'a>(
        &'a self,
        phone: &'a PhoneTag,
        pending: &'a PendingCode,
    ) -> BoxFuture<'a, Result<Option<PendingCode>>> {
        Box::pin(std::future::ready(self.replace_pending_now(phone, pending)))
    }

    fn attempt<'a>(
        &'a self,
        phone: &'a PhoneTag,
        now_ms: u64,
        matches: &'a (dyn Fn(&PendingCode) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<Option<(Attempt, RequestId)>>> {
        Box::pin(std::future::ready(self.attempt_now(phone, now_ms, matches)))
    }

    fn remove_pending<'a>(&'a self, phone: &'a PhoneTag, id: &'a RequestId) -> BoxFuture<'a, Result<bool>> {
        Box::pin(std::future::ready(self.remove_pending_now(phone, id)))
    }

    fn pending_request<'a>(&'a self, phone: &'a PhoneTag) -> BoxFuture<'a, Result<Option<RequestId>>> {
        Box::pin(std::future::ready(self.pending_request_now(phone)))
    }

    fn drop_pending<'a>(&'a self, phone: &'a PhoneTag) -> BoxFuture<'a, Result<Option<RequestId>>> {
        Box::pin(std::future::ready(self.drop_pending_now(phone)))
    }

    fn sweep_expired(&self, now_ms: u64) -> BoxFuture<'_, Result<Vec<RequestId>>> {
        Box::pin(std::future::ready(self.sweep_expired_now(now_ms)))
    }

    fn pending(&self) -> BoxFuture<'_, usize> {
        Box::pin(std::future::ready(self.pending_now()))
    }

    fn lock<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<Lock>>> {
        Box::pin(std::future::ready(self.lock_now(account)))
    }

    fn set_lock<'a>(&'a self, account: &'a AccountId, lock: Option<&'a Lock>) -> BoxFuture<'a, Result<()>> {
        Box::pin(std::future::ready(self.set_lock_now(account, lock)))
    }

    fn touch<'a>(&'a self, account: &'a AccountId, now_ms: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(std::future::ready(self.touch_now(account, now_ms)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::conformance::verification as suite;

    fn store() -> crate::store::Verifications {
        let db = sled::Config::new().temporary(true).open().expect("open");
        Arc::new(SledVerifications::new(db.open_tree("c").expect("tree"), db.open_tree("l").expect("tree")))
    }

    #[tokio::test]
    async fn conformance() {
        suite::run_all(&store).await;
    }
}
