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
    Store(#[from] sled::Error),
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
pub struct ConsentRegistry {
    tree: sled::Tree,
}

impl ConsentRegistry {
    pub(crate) fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// Records a statement whose signature was verified over `encoded`, the bytes as received, which are what is
    /// stored (never a re-encoding); refuses one that does not decode or whose sequence number is not above the
    /// account's last. Not yet durable: await the group commit before acknowledging.
    pub fn record(
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

    /// The highest sequence number recorded for `account` (0 if none).
    pub fn last_sequence(&self, account: &AccountId) -> Result<u64, RegistryError> {
        match self.tree.get(seq_key(account))? {
            Some(v) => Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| RegistryError::Corrupt)?)),
            None => Ok(0),
        }
    }

    /// The latest statement of `account` for every pair it ever decided on.
    pub fn latest(&self, account: &AccountId) -> Result<Vec<Recorded>, RegistryError> {
        self.tree.scan_prefix(latest_prefix(account)).map(|item| decode_record(&item?.1)).collect()
    }

    /// The latest statement of `account` for one pair, if any.
    pub fn latest_for(
        &self,
        account: &AccountId,
        purpose: Purpose,
        affiliate: &str,
    ) -> Result<Option<Recorded>, RegistryError> {
        self.tree.get(latest_key(account, purpose, affiliate))?.map(|v| decode_record(&v)).transpose()
    }

    /// Up to `limit` statements of any account recorded after `after` (a cursor; 0 for the start), in recording
    /// order, each with its cursor.
    pub fn changes(&self, after: u64, limit: usize) -> Result<Vec<(u64, Recorded)>, RegistryError> {
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

    /// Up to `limit` statements of `account` with a sequence number above `after_sequence`, oldest first, and whether
    /// others follow.
    pub fn history_page(
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

    /// Every statement of `account`, in sequence order.
    pub fn history(&self, account: &AccountId) -> Result<Vec<Recorded>, RegistryError> {
        let mut prefix = vec![HISTORY];
        prefix.extend_from_slice(account.as_bytes());
        debug_assert_eq!(prefix.len(), 1 + ACCOUNT_ID_LEN);
        self.tree.scan_prefix(prefix).map(|item| decode_record(&item?.1)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::consent::Decision;

    fn statement(sequence: u64, affiliate: &str, purpose: Purpose, decision: Decision) -> ConsentStatement {
        ConsentStatement {
            account: AccountId([1; 16]),
            affiliate: affiliate.into(),
            purpose,
            decision,
            notice_hash: [9; 32],
            sequence,
            time_ms: 1000 + sequence,
            expires_ms: None,
        }
    }

    fn registry() -> ConsentRegistry {
        let db = sled::Config::new().temporary(true).open().expect("open");
        ConsentRegistry::new(db.open_tree("c").expect("tree"))
    }

    #[test]
    fn latest_per_pair_wins_and_history_keeps_everything() {
        let r = registry();
        let a = AccountId([1; 16]);
        r.record(&statement(1, "adsco", Purpose::Advertising, Decision::Grant).encode(), &[0; 64], 10).expect("record");
        r.record(&statement(2, "adsco", Purpose::Analytics, Decision::Grant).encode(), &[0; 64], 11).expect("record");
        r.record(&statement(3, "adsco", Purpose::Advertising, Decision::Withdraw).encode(), &[0; 64], 12)
            .expect("record");
        let ads = r.latest_for(&a, Purpose::Advertising, "adsco").expect("get").expect("present");
        assert_eq!((ads.statement.decision, ads.recorded_at_ms), (Decision::Withdraw, 12));
        assert_eq!(r.latest(&a).expect("latest").len(), 2);
        assert_eq!(r.history(&a).expect("history").iter().map(|h| h.statement.sequence).collect::<Vec<_>>(), [1, 2, 3]);
        let seqs =
            |(page, more): (Vec<Recorded>, bool)| (page.iter().map(|h| h.statement.sequence).collect::<Vec<_>>(), more);
        assert_eq!(seqs(r.history_page(&a, 0, 2).expect("page")), (vec![1, 2], true));
        assert_eq!(seqs(r.history_page(&a, 2, 2).expect("page")), (vec![3], false));
        assert_eq!(seqs(r.history_page(&a, 3, 2).expect("page")), (vec![], false));
        assert_eq!(seqs(r.history_page(&a, u64::MAX, 2).expect("page")), (vec![], false));
        assert_eq!(r.last_sequence(&a).expect("seq"), 3);
        assert_eq!(r.latest_for(&a, Purpose::Advertising, "otherco").expect("get"), None, "default: nothing");
    }

    #[test]
    fn changes_page_through_every_account_in_recording_order() {
        let r = registry();
        let other = |seq| ConsentStatement {
            account: AccountId([2; 16]),
            ..statement(seq, "adsco", Purpose::Security, Decision::Grant)
        };
        r.record(&statement(1, "adsco", Purpose::Advertising, Decision::Grant).encode(), &[0; 64], 10).expect("record");
        r.record(&other(1).encode(), &[0; 64], 11).expect("record");
        r.record(&statement(2, "adsco", Purpose::Advertising, Decision::Withdraw).encode(), &[0; 64], 12)
            .expect("record");
        assert!(r.record(&other(1).encode(), &[0; 64], 13).is_err(), "a refused statement gets no cursor");
        let all = r.changes(0, 10).expect("changes");
        let seen: Vec<_> =
            all.iter().map(|(c, rec)| (*c, rec.statement.account.0[0], rec.statement.sequence)).collect();
        assert_eq!(seen, [(1, 1, 1), (2, 2, 1), (3, 1, 2)]);
        let page: Vec<_> = r.changes(1, 1).expect("changes").into_iter().map(|(c, _)| c).collect();
        assert_eq!(page, [2]);
        assert!(r.changes(3, 10).expect("changes").is_empty());
        assert!(r.changes(u64::MAX, 10).expect("changes").is_empty());
    }

    #[test]
    fn replayed_or_reordered_statements_are_refused() {
        let r = registry();
        r.record(&statement(5, "adsco", Purpose::Advertising, Decision::Withdraw).encode(), &[0; 64], 10)
            .expect("record");
        for seq in [5, 4, 1] {
            let err = r.record(&statement(seq, "adsco", Purpose::Advertising, Decision::Grant).encode(), &[0; 64], 11);
            assert!(matches!(err, Err(RegistryError::Rejected(ConsentError::StaleSequence { .. }))), "{seq}");
        }
        let a = AccountId([1; 16]);
        let latest = r.latest_for(&a, Purpose::Advertising, "adsco").expect("get").expect("present");
        assert_eq!(latest.statement.decision, Decision::Withdraw, "the replayed grant did not override");
    }
}
