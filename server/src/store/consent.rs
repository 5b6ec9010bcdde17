//! The consent registry: every consent statement an account signed, and the latest one per (affiliate, purpose).
//!
//! One tree, four key families and a counter (so that one transaction covers a statement's checks and writes):
//! - `0 ‖ account` → the highest sequence number recorded (8 bytes, BE);
//! - `1 ‖ account ‖ purpose ‖ affiliate` → the latest record for that pair;
//! - `2 ‖ account ‖ sequence (BE)` → every record, in order (the history an auditor checks exports against);
//! - `3 ‖ cursor (BE)` → `account ‖ sequence (BE)`: the history across accounts in recording order, which the export
//!   interface pages through;
//! - `4` → the last cursor given out (8 bytes, BE). It is read and written inside the recording transaction, so
//!   cursors become visible in order: a reader that has seen cursor n never later finds a new entry below n.
//!
//! A record is `recorded_at_ms (8) ‖ signature (64) ‖ canonical statement`. The registry stores statements that the
//! session layer has already verified; it enforces that sequence numbers strictly increase per account, so a
//! replayed or reordered statement can never override a later one.

use relay_proto::consent::{ConsentError, ConsentStatement, PURPOSES, Purpose};
use relay_proto::{ACCOUNT_ID_LEN, AccountId};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::backend::{BackendError, BoxFuture, ConsentStore};

const SEQ: u8 = 0;
const LATEST: u8 = 1;
const HISTORY: u8 = 2;
const CHANGES: u8 = 3;
const LAST_CURSOR: u8 = 4;
const SIGNATURE_LEN: usize = 64;

/// A statement as stored, with its signature and when the relay recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The statement.
    pub statement: ConsentStatement,
    /// The statement as the user sent it (what was signed, after the label).
    pub encoded: Vec<u8>,
    /// The user's signature.
    pub signature: [u8; SIGNATURE_LEN],
    /// When the relay recorded it.
    pub recorded_at_ms: u64,
}

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The statement is not acceptable.
    #[error(transparent)]
    Rejected(#[from] ConsentError),
    /// A stored record does not decode.
    #[error("corrupt consent record")]
    Corrupt,
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] BackendError),
}

impl From<sled::Error> for RegistryError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.into())
    }
}

fn seq_key(account: &AccountId) -> Vec<u8> {
    let mut k = vec![SEQ];
    k.extend_from_slice(account.as_bytes());
    k
}

fn latest_prefix(account: &AccountId) -> Vec<u8> {
    let mut k = vec![LATEST];
    k.extend_from_slice(account.as_bytes());
    k
}

fn latest_key(account: &AccountId, purpose: Purpose, affiliate: &str) -> Vec<u8> {
    let mut k = latest_prefix(account);
    k.push(PURPOSES.iter().position(|p| *p == purpose).unwrap_or(0) as u8);
    k.extend_from_slice(affiliate.as_bytes());
    k
}

fn history_key(account: &AccountId, sequence: u64) -> Vec<u8> {
    let mut k = vec![HISTORY];
    k.extend_from_slice(account.as_bytes());
    k.extend_from_slice(&sequence.to_be_bytes());
    k
}

fn change_key(cursor: u64) -> Vec<u8> {
    let mut k = vec![CHANGES];
    k.extend_from_slice(&cursor.to_be_bytes());
    k
}

fn be_u64(v: &[u8]) -> Result<u64, RegistryError> {
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| RegistryError::Corrupt)?))
}

fn encode_record(encoded: &[u8], signature: &[u8; SIGNATURE_LEN], recorded_at_ms: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + SIGNATURE_LEN + encoded.len());
    v.extend_from_slice(&recorded_at_ms.to_be_bytes());
    v.extend_from_slice(signature);
    v.extend_from_slice(encoded);
    v
}

fn decode_record(v: &[u8]) -> Result<Recorded, RegistryError> {
    if v.len() < 8 + SIGNATURE_LEN {
        return Err(RegistryError::Corrupt);
    }
    let recorded_at_ms = u64::from_be_bytes(v[..8].try_into().map_err(|_| RegistryError::Corrupt)?);
    let signature: [u8; SIGNATURE_LEN] = v[8..8 + SIGNATURE_LEN].try_into().map_err(|_| RegistryError::Corrupt)?;
    let encoded = v[8 + SIGNATURE_LEN..].to_vec();
    // Stored statements were valid when recorded; a later notice change must not make them unreadable.
    let statement = decode_unvalidated(&encoded)?;
    Ok(Recorded { statement, encoded, signature, recorded_at_ms })
}

fn decode_unvalidated(encoded: &[u8]) -> Result<ConsentStatement, RegistryError> {
    ConsentStatement::decode_stored(encoded).map_err(|_| RegistryError::Corrupt)
}

/// The consent tree (a cheap handle: clones share the tree).
#[derive(Clone)]
pub struct SledConsentRegistry {
    tree: sled::Tree,
}

impl SledConsentRegistry {
    pub(crate) fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    fn record_now(
        &self,
        encoded: &[u8],
        signature: &[u8; SIGNATURE_LEN],
        now_ms: u64,
    ) -> Result<ConsentStatement, RegistryError> {
        let statement = ConsentStatement::decode_stored(encoded).map_err(RegistryError::Rejected)?;
        let account = statement.account;
        let record = encode_record(encoded, signature, now_ms);
        let result = (&self.tree,).transaction(|(t,)| {
            let last = match t.get(seq_key(&account))? {
                Some(v) => u64::from_be_bytes(
                    v.as_ref().try_into().map_err(|_| ConflictableTransactionError::Abort(RegistryError::Corrupt))?,
                ),
                None => 0,
            };
            if statement.sequence <= last {
                return Err(ConflictableTransactionError::Abort(RegistryError::Rejected(
                    ConsentError::StaleSequence { got: statement.sequence, last },
                )));
            }
            // Stored values are checked like input: a damaged counter is reported, never wrapped.
            let cursor = match t.get([LAST_CURSOR])? {
                Some(v) => be_u64(&v).map_err(ConflictableTransactionError::Abort)?,
                None => 0,
            }
            .checked_add(1)
            .ok_or(ConflictableTransactionError::Abort(RegistryError::Corrupt))?;
            t.insert(seq_key(&account), &statement.sequence.to_be_bytes()[..])?;
            t.insert(latest_key(&account, statement.purpose, &statement.affiliate), record.clone())?;
            t.insert(history_key(&account, statement.sequence), record.clone())?;
            t.insert(&[LAST_CURSOR][..], &cursor.to_be_bytes()[..])?;
            let mut change = account.as_bytes().to_vec();
            change.extend_from_slice(&statement.sequence.to_be_bytes());
            t.insert(change_key(cursor), change)?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(statement),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn last_sequence_now(&self, account: &AccountId) -> Result<u64, RegistryError> {
        match self.tree.get(seq_key(account))? {
            Some(v) => Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| RegistryError::Corrupt)?)),
            None => Ok(0),
        }
    }

    fn latest_now(&self, account: &AccountId) -> Result<Vec<Recorded>, RegistryError> {
        self.tree.scan_prefix(latest_prefix(account)).map(|item| decode_record(&item?.1)).collect()
    }

    fn latest_for_now(
        &self,
        account: &AccountId,
        purpose: Purpose,
        affiliate: &str,
    ) -> Result<Option<Recorded>, RegistryError> {
        self.tree.get(latest_key(account, purpose, affiliate))?.map(|v| decode_record(&v)).transpose()
    }

    fn changes_now(&self, after: u64, limit: usize) -> Result<Vec<(u64, Recorded)>, RegistryError> {
        let Some(start) = after.checked_add(1) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in self.tree.range(change_key(start)..change_key(u64::MAX)).take(limit) {
            let (k, v) = item?;
            let cursor = be_u64(k.get(1..).ok_or(RegistryError::Corrupt)?)?;
            let account = AccountId::from_slice(v.get(..ACCOUNT_ID_LEN).ok_or(RegistryError::Corrupt)?)
                .ok_or(RegistryError::Corrupt)?;
            let sequence = be_u64(v.get(ACCOUNT_ID_LEN..).ok_or(RegistryError::Corrupt)?)?;
            let record = self.tree.get(history_key(&account, sequence))?.ok_or(RegistryError::Corrupt)?;
            out.push((cursor, decode_record(&record)?));
        }
        Ok(out)
    }

    fn history_page_now(
        &self,
        account: &AccountId,
        after_sequence: u64,
        limit: usize,
    ) -> Result<(Vec<Recorded>, bool), RegistryError> {
        let Some(start) = after_sequence.checked_add(1) else { return Ok((Vec::new(), false)) };
        let mut page = Vec::new();
        let mut more = false;
        for item in self.tree.range(history_key(account, start)..=history_key(account, u64::MAX)) {
            if page.len() == limit {
                more = true;
                break;
            }
            page.push(decode_record(&item?.1)?);
        }
        Ok((page, more))
    }

    fn history_now(&self, account: &AccountId) -> Result<Vec<Recorded>, RegistryError> {
        let mut prefix = vec![HISTORY];
        prefix.extend_from_slice(account.as_bytes());
        debug_assert_eq!(prefix.len(), 1 + ACCOUNT_ID_LEN);
        self.tree.scan_prefix(prefix).map(|item| decode_record(&item?.1)).collect()
    }
}

impl ConsentStore for SledConsentRegistry {
    fn record<'a>(
        &'a self,
        encoded: &'a [u8],
        signature: &'a [u8; SIGNATURE_LEN],
        now_ms: u64,
    ) -> BoxFuture<'a, Result<ConsentStatement, RegistryError>> {
        Box::pin(std::future::ready(self.record_now(encoded, signature, now_ms)))
    }

    fn last_sequence<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<u64, RegistryError>> {
        Box::pin(std::future::ready(self.last_sequence_now(account)))
    }

    fn latest<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Vec<Recorded>, RegistryError>> {
        Box::pin(std::future::ready(self.latest_now(account)))
    }

    fn latest_for<'a>(
        &'a self,
        account: &'a AccountId,
        purpose: Purpose,
        affiliate: &'a str,
    ) -> BoxFuture<'a, Result<Option<Recorded>, RegistryError>> {
        Box::pin(std::future::ready(self.latest_for_now(account, purpose, affiliate)))
    }

    fn changes(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<(u64, Recorded)>, RegistryError>> {
        Box::pin(std::future::ready(self.changes_now(after, limit)))
    }

    fn history_page<'a>(
        &'a self,
        account: &'a AccountId,
        after_sequence: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<(Vec<Recorded>, bool), RegistryError>> {
        Box::pin(std::future::ready(self.history_page_now(account, after_sequence, limit)))
    }

    fn history<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Vec<Recorded>, RegistryError>> {
        Box::pin(std::future::ready(self.history_now(account)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::conformance::consent as suite;

    fn registry() -> crate::store::ConsentRegistry {
        let db = sled::Config::new().temporary(true).open().expect("open");
        Arc::new(SledConsentRegistry::new(db.open_tree("c").expect("tree")))
    }

    #[tokio::test]
    async fn conformance() {
        suite::run_all(&registry).await;
    }
}
