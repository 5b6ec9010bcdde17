//! The exporter's durable state, in its own sled database: the outbox (webhook id → entry to deliver), the pairs
//! delivered so far (pair → the user's pseudonym for that affiliate, for a later `consent.withdrawn` event), what
//! was last queued per pair (so unchanged data is not exported twice), the feed cursors, the export log (index →
//! [`LogRecord`]: the leaf and the user-signed statement that allowed it), its signed tree heads, every verified
//! statement per pair (the auditor's evidence that no later statement had withdrawn a grant), and how much of the
//! log the relay holds.
//!
//! Contract: an entry stays in the outbox until the affiliate answered 2xx, or the relay denied the export, or a
//! withdrawal of its pair removed it. A 2xx answer to an export appends the log record (durably, once per webhook
//! id), then removes the entry and marks the pair delivered, so a crash never leaves a delivered export out of the
//! log nor logs one twice; an export whose attempt got no answer (the exporter died, the connection failed) is
//! logged if it leaves the outbox undelivered ([`ExporterStore::drop_export`]), since the affiliate may hold it. The cursors
//! are written only by the feed, after [`ExporterStore::flush`] made the writes of the changes before
//! them durable. Entries hold no raw phone number unless the catalogue allows the affiliate to receive it (it is then
//! part of the body); log records never hold one.

use std::path::Path;

use relay_proto::merkle::{ExportLeaf, SignedTreeHead, TreeHead};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

/// What an outbox entry delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// `user.metadata.exported`: needs an export lease before every attempt.
    Export,
    /// `consent.withdrawn`: carries only the pseudonym, delivered without a lease.
    Withdrawn,
}

/// One webhook to deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Export or withdrawal notice.
    pub kind: Kind,
    /// Affiliate id.
    pub affiliate: String,
    /// Purpose name.
    pub purpose: String,
    /// Account id (hex).
    pub account: String,
    /// Hex SHA-256 of the consent statement this entry follows from.
    pub statement_hash: String,
    /// The user's pseudonym for this affiliate (recorded as delivered with the pair on success).
    pub pseudonym: String,
    /// The JSON body, exactly as it is sent and signed.
    pub body: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Earliest time of the next attempt (ms since the Unix epoch).
    pub next_attempt_ms: u64,
    /// Names of the exported fields (exports only).
    #[serde(default)]
    pub fields: Vec<String>,
    /// The signed statement that allows the export (exports only).
    #[serde(default)]
    pub evidence: Option<Evidence>,
    /// Set, durably, before an export request leaves, to when the first attempt whose outcome is unknown began
    /// (ms since the Unix epoch): the exporter died or the connection failed before an answer, so the affiliate
    /// may hold the data. Cleared by a definite refusal. An export dropped while set is logged as delivered.
    #[serde(default)]
    pub in_flight_ms: Option<u64>,
}

/// A user-signed consent statement as the relay recorded it, kept as evidence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The canonical statement, hex.
    pub statement: String,
    /// The user's Ed25519 signature over it, hex.
    pub signature: String,
    /// The user's Ed25519 identity key, hex (the account id derives from it).
    pub identity_key: String,
    /// When the relay recorded it (ms since the Unix epoch).
    pub recorded_at_ms: u64,
}

/// One entry of the export log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The canonical leaf (`relay_proto::merkle::ExportLeaf::encode`), hex.
    pub leaf: String,
    /// The account it concerns, hex (published to the relay, which shows the entry to that account only).
    pub account: String,
    /// The statement that allowed the export.
    pub evidence: Evidence,
}

impl Entry {
    /// The key of this entry's pair in the delivered tree.
    pub fn pair_key(&self) -> String {
        pair_key(&self.account, &self.affiliate, &self.purpose)
    }
}

/// The delivered-tree key of (account, affiliate, purpose).
pub fn pair_key(account: &str, affiliate: &str, purpose: &str) -> String {
    format!("{account}/{affiliate}/{purpose}")
}

/// Why the exporter's store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed.
    #[error("exporter store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value does not decode.
    #[error("exporter store holds a corrupt value: {0}")]
    Corrupt(String),
}

/// The exporter's sled database.
#[derive(Clone)]
pub struct ExporterStore {
    db: sled::Db,
    outbox: sled::Tree,
    delivered: sled::Tree,
    exported: sled::Tree,
    meta: sled::Tree,
    log: sled::Tree,
    heads: sled::Tree,
    statements: sled::Tree,
}

/// The consent feed's cursor.
pub const CONSENT_CURSOR: &[u8] = b"feed_cursor";
/// The subject-change feed's cursor.
pub const SUBJECT_CURSOR: &[u8] = b"subject_cursor";
/// In the `log` tree: the number of records.
const LOG_LEN: &[u8] = b"n";

/// In the `log` tree: `r ‖ index (BE)` → record.
fn log_record_key(index: u64) -> [u8; 9] {
    let mut k = [b'r'; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// In the `log` tree: `i ‖ webhook id` → index of its record.
fn log_id_key(id: &str) -> Vec<u8> {
    [&b"i"[..], id.as_bytes()].concat()
}
const PUBLISHED: &[u8] = b"log_published";

fn be_u64(v: &[u8], what: &str) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = v.try_into().map_err(|_| StoreError::Corrupt(what.into()))?;
    Ok(u64::from_be_bytes(bytes))
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising structs of strings and integers cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode(bytes: &[u8]) -> Result<Entry, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode(entry: &Entry) -> Vec<u8> {
    json(entry)
}

/// The log record of a delivered export begun at `started_ms`: no personal data, the payload by its (nonce-salted)
/// hash.
pub fn log_record(id: &str, entry: &Entry, started_ms: u64) -> Result<LogRecord, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("outbox entry {id}"));
    let leaf = ExportLeaf {
        export_id: crate::feed::export_id(id).ok_or_else(corrupt)?,
        affiliate: entry.affiliate.clone(),
        purpose: entry.purpose.clone(),
        fields: entry.fields.clone(),
        payload_hash: Sha256::digest(entry.body.as_bytes()).into(),
        consent_hash: hex::decode(&entry.statement_hash).ok().and_then(|h| h.try_into().ok()).ok_or_else(corrupt)?,
        time_ms: started_ms,
    };
    Ok(LogRecord {
        leaf: hex::encode(leaf.encode().map_err(|_| corrupt())?),
        account: entry.account.clone(),
        evidence: entry.evidence.clone().ok_or_else(corrupt)?,
    })
}

impl ExporterStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::open(path)?;
        Ok(Self {
            outbox: db.open_tree("outbox")?,
            delivered: db.open_tree("delivered")?,
            exported: db.open_tree("exported")?,
            meta: db.open_tree("meta")?,
            log: db.open_tree("log")?,
            heads: db.open_tree("heads")?,
            statements: db.open_tree("statements")?,
            db,
        })
    }

    fn counter(&self, key: &[u8]) -> Result<u64, StoreError> {
        self.meta.get(key)?.map_or(Ok(0), |v| be_u64(&v, "counter"))
    }

    /// The consent feed's cursor (0 before the first change).
    pub fn cursor(&self) -> Result<u64, StoreError> {
        self.counter(CONSENT_CURSOR)
    }

    /// Records the consent feed's cursor (the caller flushes).
    pub fn set_cursor(&self, cursor: u64) -> Result<(), StoreError> {
        self.set_feed_cursor(CONSENT_CURSOR, cursor)
    }

    /// A feed's cursor ([`CONSENT_CURSOR`] or [`SUBJECT_CURSOR`]).
    pub fn feed_cursor(&self, feed: &[u8]) -> Result<u64, StoreError> {
        self.counter(feed)
    }

    /// Records a feed's cursor (the caller flushes).
    pub fn set_feed_cursor(&self, feed: &[u8], cursor: u64) -> Result<(), StoreError> {
        self.meta.insert(feed, &cursor.to_be_bytes())?;
        Ok(())
    }

    /// What was last queued for the pair (statement hash and data digest), if anything since its last withdrawal.
    pub fn exported(&self, pair: &str) -> Result<Option<String>, StoreError> {
        Ok(self.exported.get(pair)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records what was queued for the pair.
    pub fn set_exported(&self, pair: &str, what: &str) -> Result<(), StoreError> {
        self.exported.insert(pair, what.as_bytes())?;
        Ok(())
    }

    /// Forgets what was queued for the pair (at its withdrawal).
    pub fn forget_exported(&self, pair: &str) -> Result<(), StoreError> {
        self.exported.remove(pair)?;
        Ok(())
    }

    /// Keeps a verified statement of the pair as audit evidence (idempotent).
    pub fn record_statement(&self, pair: &str, sequence: u64, evidence: &Evidence) -> Result<(), StoreError> {
        self.statements.insert(format!("{pair}/{sequence:020}"), json(evidence))?;
        Ok(())
    }

    /// Every statement kept for the pair, by sequence.
    pub fn statements_of(&self, pair: &str) -> Result<Vec<(u64, Evidence)>, StoreError> {
        let mut out = Vec::new();
        for item in self.statements.scan_prefix(format!("{pair}/")) {
            let (k, v) = item?;
            let seq = k
                .get(pair.len() + 1..)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt("statement key".into()))?;
            out.push((seq, serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?));
        }
        Ok(out)
    }

    /// Settles a delivered export: appends `record` to the log (unless this export id is already logged), makes that
    /// durable, then removes the entry from the outbox and marks its pair delivered. Returns the record's index.
    ///
    /// The log append is one atomic batch on one tree (record, length, id index) and is flushed before the entry
    /// leaves the outbox: whatever a crash keeps, an export that leaves the outbox is in the log, and an entry that
    /// comes back after a crash is settled again without a second record. This does not rely on a transaction
    /// across trees surviving a crash whole.
    pub fn complete_export(&self, id: &str, entry: &Entry, record: &LogRecord) -> Result<u64, StoreError> {
        let index = match self.log.get(log_id_key(id))? {
            Some(v) => be_u64(&v, "logged export index")?,
            None => {
                let index = self.log_len()?;
                let mut batch = sled::Batch::default();
                batch.insert(&log_record_key(index)[..], json(record));
                batch.insert(LOG_LEN, &(index + 1).to_be_bytes()[..]);
                batch.insert(log_id_key(id), &index.to_be_bytes()[..]);
                self.log.apply_batch(batch)?;
                self.db.flush()?;
                index
            }
        };
        let trees = (&self.outbox, &self.delivered);
        let result = trees.transaction(|(outbox, delivered)| {
            delivered.insert(entry.pair_key().as_bytes(), entry.pseudonym.as_bytes())?;
            outbox.remove(id.as_bytes())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        });
        match result {
            Ok(()) => Ok(index),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Number of entries in the export log.
    pub fn log_len(&self) -> Result<u64, StoreError> {
        self.log.get(LOG_LEN)?.map_or(Ok(0), |v| be_u64(&v, "log length"))
    }

    /// The log records from `start`, at most `limit`, in order.
    pub fn log_records(&self, start: u64, limit: usize) -> Result<Vec<(u64, LogRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.log.range(log_record_key(start)..log_record_key(u64::MAX)).take(limit) {
            let (k, v) = item?;
            let k = k.get(1..).ok_or_else(|| StoreError::Corrupt("log key".into()))?;
            let record = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push((be_u64(k, "log index")?, record));
        }
        Ok(out)
    }

    /// Calls `f` with every log record in order, reading the log a page at a time.
    pub fn visit_log<E: From<StoreError>>(&self, mut f: impl FnMut(u64, LogRecord) -> Result<(), E>) -> Result<(), E> {
        let mut start = 0;
        loop {
            let page = self.log_records(start, 1024)?;
            let Some(last) = page.last().map(|(index, _)| *index) else { return Ok(()) };
            start = last + 1;
            for (index, record) in page {
                f(index, record)?;
            }
        }
    }

    /// Overwrites log record `index` (for tests that tamper with the log).
    #[doc(hidden)]
    pub fn replace_log_record(&self, index: u64, record: &LogRecord) -> Result<(), StoreError> {
        self.log.insert(&log_record_key(index)[..], json(record))?;
        Ok(())
    }

    /// Stores a signed tree head (the caller flushes).
    pub fn put_head(&self, head: &SignedTreeHead) -> Result<(), StoreError> {
        let mut v = Vec::with_capacity(8 + 32 + 64);
        v.extend_from_slice(&head.head.timestamp_ms.to_be_bytes());
        v.extend_from_slice(&head.head.root);
        v.extend_from_slice(&head.signature);
        self.heads.insert(head.head.size.to_be_bytes(), v)?;
        Ok(())
    }

    /// Every signed tree head, by size.
    pub fn heads(&self) -> Result<Vec<SignedTreeHead>, StoreError> {
        let corrupt = || StoreError::Corrupt("tree head".into());
        let mut out = Vec::new();
        for item in self.heads.iter() {
            let (k, v) = item?;
            let size = be_u64(&k, "tree head size")?;
            if v.len() != 8 + 32 + 64 {
                return Err(corrupt());
            }
            out.push(SignedTreeHead {
                head: TreeHead {
                    size,
                    timestamp_ms: be_u64(&v[..8], "tree head time")?,
                    root: v[8..40].try_into().map_err(|_| corrupt())?,
                },
                signature: v[40..].try_into().map_err(|_| corrupt())?,
            });
        }
        Ok(out)
    }

    /// How many log entries the relay is known to hold.
    pub fn published(&self) -> Result<u64, StoreError> {
        self.counter(PUBLISHED)
    }

    /// Records how many log entries the relay holds.
    pub fn set_published(&self, size: u64) -> Result<(), StoreError> {
        self.meta.insert(PUBLISHED, &size.to_be_bytes())?;
        Ok(())
    }

    /// Inserts `entry` under `id` unless an entry with that id is already queued; whether it was inserted.
    pub fn insert_new(&self, id: &str, entry: &Entry) -> Result<bool, StoreError> {
        Ok(self.outbox.compare_and_swap(id, None as Option<&[u8]>, Some(encode(entry)))?.is_ok())
    }

    /// Replaces the entry under `id` (a rescheduled attempt).
    pub fn put(&self, id: &str, entry: &Entry) -> Result<(), StoreError> {
        self.outbox.insert(id, encode(entry))?;
        Ok(())
    }

    /// Removes the entry under `id`.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.outbox.remove(id)?;
        Ok(())
    }

    /// The entry under `id`.
    pub fn get(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        self.outbox.get(id)?.map(|v| decode(&v)).transpose()
    }

    /// At most `limit` entries due at `now_ms`, soonest first.
    pub fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<(String, Entry)>, StoreError> {
        let mut due = Vec::new();
        for item in self.outbox.iter() {
            let (k, v) = item?;
            let entry = decode(&v)?;
            if entry.next_attempt_ms <= now_ms {
                due.push((String::from_utf8_lossy(&k).into_owned(), entry));
            }
        }
        due.sort_by_key(|(_, e)| e.next_attempt_ms);
        due.truncate(limit);
        Ok(due)
    }

    /// Number of queued entries.
    pub fn len(&self) -> usize {
        self.outbox.len()
    }

    /// Whether the outbox is empty.
    pub fn is_empty(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Removes every queued export (not withdrawal notice) of the pair, each with [`ExporterStore::drop_export`]; how many
    /// were removed.
    pub fn remove_exports_of(&self, pair: &str) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        for item in self.outbox.iter() {
            let (k, v) = item?;
            let entry = decode(&v)?;
            if entry.kind == Kind::Export && entry.pair_key() == pair {
                doomed.push((String::from_utf8_lossy(&k).into_owned(), entry));
            }
        }
        for (id, entry) in &doomed {
            self.drop_export(id, entry)?;
        }
        Ok(doomed.len())
    }

    /// Takes an export out of the outbox without delivering it. If an attempt of it may have reached the affiliate
    /// ([`Entry::in_flight_ms`]), it is settled as delivered instead: logged with that attempt's time and its pair
    /// marked delivered (so a withdrawal notifies the affiliate), because the log must never miss data an affiliate
    /// may hold. Whether it was logged.
    pub fn drop_export(&self, id: &str, entry: &Entry) -> Result<bool, StoreError> {
        match entry.in_flight_ms {
            Some(started_ms) if entry.kind == Kind::Export => {
                let record = log_record(id, entry, started_ms)?;
                self.complete_export(id, entry, &record)?;
                tracing::info!(webhook = id, "export dropped after an attempt with no answer; logged as delivered");
                Ok(true)
            }
            _ => {
                tracing::info!(webhook = id, "queued export dropped before any attempt could reach the affiliate");
                self.remove(id)?;
                Ok(false)
            }
        }
    }

    /// Records that the pair's data reached the affiliate, with the user's pseudonym for it.
    pub fn mark_delivered(&self, pair: &str, pseudonym: &str) -> Result<(), StoreError> {
        self.delivered.insert(pair, pseudonym.as_bytes())?;
        Ok(())
    }

    /// The pseudonym recorded when the pair was delivered, if it was.
    pub fn delivered(&self, pair: &str) -> Result<Option<String>, StoreError> {
        Ok(self.delivered.get(pair)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Forgets that the pair was delivered (after its withdrawal notice is queued).
    pub fn forget_delivered(&self, pair: &str) -> Result<(), StoreError> {
        self.delivered.remove(pair)?;
        Ok(())
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: Kind, purpose: &str, next: u64) -> Entry {
        Entry {
            kind,
            affiliate: "adsco".into(),
            purpose: purpose.into(),
            account: "aa".into(),
            statement_hash: "00".into(),
            pseudonym: "p".into(),
            body: "{}".into(),
            attempts: 0,
            next_attempt_ms: next,
            fields: Vec::new(),
            evidence: None,
            in_flight_ms: None,
        }
    }

    #[test]
    fn an_export_settled_again_after_a_crash_is_logged_once() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ExporterStore::open(dir.path()).expect("open");
        let mut e = entry(Kind::Export, "advertising", 0);
        e.evidence = Some(Evidence::default());
        e.fields = vec!["device_model".into()];
        let record = |n: u8| LogRecord { leaf: hex::encode([n]), account: "aa".into(), evidence: Evidence::default() };
        store.put("msg_a", &e).expect("put");
        assert_eq!(store.complete_export("msg_a", &e, &record(1)).expect("settle"), 0);
        assert!(store.get("msg_a").expect("get").is_none(), "out of the outbox");
        // As if a crash lost the removal but kept the log: the entry is back and settles again.
        store.put("msg_a", &e).expect("put again");
        assert_eq!(store.complete_export("msg_a", &e, &record(1)).expect("settle again"), 0);
        store.put("msg_b", &e).expect("put");
        assert_eq!(store.complete_export("msg_b", &e, &record(2)).expect("settle"), 1);
        assert_eq!(store.log_len().expect("len"), 2);
        let leaves: Vec<_> = store.log_records(0, 10).expect("records").into_iter().map(|(i, r)| (i, r.leaf)).collect();
        assert_eq!(leaves, [(0, "01".to_owned()), (1, "02".to_owned())]);
        assert_eq!(store.delivered(&e.pair_key()).expect("delivered").as_deref(), Some("p"));
        drop(store);
        let reopened = ExporterStore::open(dir.path()).expect("reopen");
        assert_eq!(reopened.log_len().expect("len"), 2);
    }

    #[test]
    fn entries_are_kept_once_due_in_order_and_removed_by_pair() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ExporterStore::open(dir.path()).expect("open");
        assert!(store.insert_new("msg_a", &entry(Kind::Export, "advertising", 20)).expect("insert"));
        assert!(!store.insert_new("msg_a", &entry(Kind::Export, "advertising", 99)).expect("insert"), "no duplicate");
        assert_eq!(store.get("msg_a").expect("get").map(|e| e.next_attempt_ms), Some(20));
        store.put("msg_b", &entry(Kind::Export, "analytics", 10)).expect("put");
        store.put("msg_c", &entry(Kind::Withdrawn, "advertising", 30)).expect("put");
        let due: Vec<_> = store.due(25, 10).expect("due").into_iter().map(|(k, _)| k).collect();
        assert_eq!(due, ["msg_b", "msg_a"]);
        assert_eq!(store.remove_exports_of(&pair_key("aa", "adsco", "advertising")).expect("remove"), 1);
        assert_eq!(store.len(), 2, "the withdrawal notice and the other pair stay");
        store.set_cursor(7).expect("cursor");
        assert_eq!(store.cursor().expect("cursor"), 7);
    }
}
