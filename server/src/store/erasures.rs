//! The erasure feed: every `DeleteAccount` the relay accepted, in order, for the exporter to act on.
//!
//! One tree, append-only: `0` → the last cursor given out (8 bytes, BE); `1 ‖ cursor (BE)` → record; `2 ‖ account` →
//! the cursor of the account's erasure. A record is `account (16) ‖ identity key (32) ‖ recorded_at_ms (8, BE) ‖
//! signature (64) ‖ signed transcript`: the request as the user signed it, which the exporter verifies itself. An
//! erasure is recorded (and made durable by the caller) *before* anything of the account is deleted, so a crash
//! between the two cannot lose it; the cursor is read and bumped inside the recording transaction, so cursors become
//! visible in order. No phone number, no device info: the account is named by its id and public key only.

use relay_proto::auth::{KEY_LEN, SIGNATURE_LEN};
use relay_proto::{ACCOUNT_ID_LEN, AccountId};
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::backend::{BackendError, BoxFuture, ErasureStore};

const LAST_CURSOR: u8 = 0;
const RECORD: u8 = 1;
const BY_ACCOUNT: u8 = 2;
const HEADER_LEN: usize = ACCOUNT_ID_LEN + KEY_LEN + 8 + SIGNATURE_LEN;

/// Why the erasure feed failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErasureStoreError {
    /// A stored record does not decode.
    #[error("corrupt erasure record")]
    Corrupt,
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] BackendError),
}

impl From<sled::Error> for ErasureStoreError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.into())
    }
}

/// One recorded erasure request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    /// The erased account.
    pub account: AccountId,
    /// Its identity key, which signed the request.
    pub identity_key: [u8; KEY_LEN],
    /// When the relay recorded it.
    pub recorded_at_ms: u64,
    /// The identity key's signature over `signed`.
    pub signature: [u8; SIGNATURE_LEN],
    /// The delete transcript as signed (`relay_proto::auth::delete_transcript`).
    pub signed: Vec<u8>,
}

impl Erasure {
    /// The stored form (both backends): account, identity key, time, signature, then the signed transcript.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.signed.len());
        out.extend_from_slice(self.account.as_bytes());
        out.extend_from_slice(&self.identity_key);
        out.extend_from_slice(&self.recorded_at_ms.to_be_bytes());
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&self.signed);
        out
    }

    /// Reads the stored form back; `None` if it does not decode.
    pub(crate) fn decode(v: &[u8]) -> Option<Self> {
        let account = AccountId::from_slice(v.get(..ACCOUNT_ID_LEN)?)?;
        let identity_key = v.get(ACCOUNT_ID_LEN..ACCOUNT_ID_LEN + KEY_LEN)?.try_into().ok()?;
        let at = ACCOUNT_ID_LEN + KEY_LEN;
        let recorded_at_ms = u64::from_be_bytes(v.get(at..at + 8)?.try_into().ok()?);
        let signature = v.get(at + 8..HEADER_LEN)?.try_into().ok()?;
        Some(Self { account, identity_key, recorded_at_ms, signature, signed: v.get(HEADER_LEN..)?.to_vec() })
    }
}

fn record_key(cursor: u64) -> [u8; 9] {
    let mut k = [RECORD; 9];
    k[1..].copy_from_slice(&cursor.to_be_bytes());
    k
}

fn account_key(account: &AccountId) -> Vec<u8> {
    let mut k = vec![BY_ACCOUNT];
    k.extend_from_slice(account.as_bytes());
    k
}

fn be_u64(v: &[u8]) -> Result<u64, ErasureStoreError> {
    v.try_into().map(u64::from_be_bytes).map_err(|_| ErasureStoreError::Corrupt)
}

/// The erasure feed (a cheap handle: clones share the tree).
#[derive(Clone)]
pub struct SledErasures {
    tree: sled::Tree,
}

impl SledErasures {
    pub(crate) fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    fn record_now(&self, erasure: &Erasure) -> Result<u64, ErasureStoreError> {
        let record = erasure.encode();
        let result = self.tree.transaction(|t| {
            let last = match t.get([LAST_CURSOR])? {
                Some(v) => be_u64(&v).map_err(ConflictableTransactionError::Abort)?,
                None => 0,
            };
            let cursor = last.checked_add(1).ok_or(ConflictableTransactionError::Abort(ErasureStoreError::Corrupt))?;
            t.insert(&[LAST_CURSOR][..], &cursor.to_be_bytes()[..])?;
            t.insert(&record_key(cursor)[..], record.clone())?;
            t.insert(account_key(&erasure.account), &cursor.to_be_bytes()[..])?;
            Ok(cursor)
        });
        match result {
            Ok(cursor) => Ok(cursor),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn erased_now(&self, account: &AccountId) -> Result<bool, ErasureStoreError> {
        Ok(self.tree.contains_key(account_key(account))?)
    }

    fn changes_now(&self, after: u64, limit: usize) -> Result<Vec<(u64, Erasure)>, ErasureStoreError> {
        let Some(start) = after.checked_add(1) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in self.tree.range(record_key(start)..=record_key(u64::MAX)).take(limit) {
            let (k, v) = item?;
            let cursor = be_u64(k.get(1..).ok_or(ErasureStoreError::Corrupt)?)?;
            out.push((cursor, Erasure::decode(&v).ok_or(ErasureStoreError::Corrupt)?));
        }
        Ok(out)
    }
}

impl ErasureStore for SledErasures {
    fn record<'a>(&'a self, erasure: &'a Erasure) -> BoxFuture<'a, Result<u64, ErasureStoreError>> {
        Box::pin(std::future::ready(self.record_now(erasure)))
    }

    fn erased<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<bool, ErasureStoreError>> {
        Box::pin(std::future::ready(self.erased_now(account)))
    }

    fn changes(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<(u64, Erasure)>, ErasureStoreError>> {
        Box::pin(std::future::ready(self.changes_now(after, limit)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::conformance::erasures as suite;

    fn fresh() -> crate::store::Erasures {
        let db = sled::Config::new().temporary(true).open().expect("db");
        Arc::new(SledErasures::new(db.open_tree("e").expect("tree")))
    }

    #[tokio::test]
    async fn conformance() {
        suite::run_all(&fresh).await;
    }
}
