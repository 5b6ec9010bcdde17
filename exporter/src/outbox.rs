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

use relay_proto::AccountId;
use relay_proto::merkle::{ExportLeaf, SignedTreeHead, TreeHead};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::ids::{Pair, WebhookId};

/// What an outbox entry delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// `user.metadata.exported`: needs an export lease before every attempt.
    Export,
    /// `consent.withdrawn`: carries only the pseudonym, delivered without a lease.
    Withdrawn,
}

/// One webhook to deliver. Stored as the JSON object of [`StoredEntry`], field for field as it always was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoredEntry", into = "StoredEntry")]
pub struct Entry {
    /// Export or withdrawal notice.
    pub kind: Kind,
    /// The account, affiliate and purpose it concerns.
    pub pair: Pair,
    /// SHA-256 of the consent statement this entry follows from.
    pub statement_hash: [u8; 32],
    /// The user's pseudonym for this affiliate (recorded as delivered with the pair on success).
    pub pseudonym: String,
    /// The JSON body, exactly as it is sent and signed.
    pub body: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Earliest time of the next attempt (ms since the Unix epoch).
    pub next_attempt_ms: u64,
    /// Names of the exported fields (exports only).
    pub fields: Vec<String>,
    /// The signed statement that allows the export (exports only).
    pub evidence: Option<Evidence>,
    /// Set, durably, before an export request leaves, to when the first attempt whose outcome is unknown began
    /// (ms since the Unix epoch): the exporter died or the connection failed before an answer, so the affiliate
    /// may hold the data. An answer restores what it was before that attempt. An export dropped while set is logged
    /// as delivered.
    pub in_flight_ms: Option<u64>,
}

/// The stored form of an [`Entry`]: ids as the hex and names they were always written as.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    kind: Kind,
    affiliate: String,
    purpose: String,
    account: String,
    statement_hash: String,
    pseudonym: String,
    body: String,
    attempts: u32,
    next_attempt_ms: u64,
    // Absent from entries written before exports were logged.
    #[serde(default)]
    fields: Vec<String>,
    #[serde(default)]
    evidence: Option<Evidence>,
    #[serde(default)]
    in_flight_ms: Option<u64>,
}

impl TryFrom<StoredEntry> for Entry {
    type Error = String;

    fn try_from(e: StoredEntry) -> Result<Self, String> {
        let pair = format!("{}/{}/{}", e.account, e.affiliate, e.purpose).parse::<Pair>().map_err(|e| e.to_string())?;
        let statement_hash = hex::decode(&e.statement_hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| format!("statement hash {:?}", e.statement_hash))?;
        Ok(Self {
            kind: e.kind,
            pair,
            statement_hash,
            pseudonym: e.pseudonym,
            body: e.body,
            attempts: e.attempts,
            next_attempt_ms: e.next_attempt_ms,
            fields: e.fields,
            evidence: e.evidence,
            in_flight_ms: e.in_flight_ms,
        })
    }
}

impl From<Entry> for StoredEntry {
    fn from(e: Entry) -> Self {
        Self {
            kind: e.kind,
            affiliate: e.pair.affiliate,
            purpose: e.pair.purpose.as_str().to_owned(),
            account: e.pair.account.to_string(),
            statement_hash: hex::encode(e.statement_hash),
            pseudonym: e.pseudonym,
            body: e.body,
            attempts: e.attempts,
            next_attempt_ms: e.next_attempt_ms,
            fields: e.fields,
            evidence: e.evidence,
            in_flight_ms: e.in_flight_ms,
        }
    }
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

/// One entry of the export log. Stored as JSON with the leaf and the account in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The canonical leaf (`relay_proto::merkle::ExportLeaf::encode`).
    #[serde(with = "hex_bytes")]
    pub leaf: Vec<u8>,
    /// The account it concerns (published to the relay, which shows the entry to that account only).
    #[serde(with = "hex_account")]
    pub account: AccountId,
    /// The statement that allowed the export.
    pub evidence: Evidence,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(D::Error::custom)
    }
}

mod hex_account {
    use relay_proto::AccountId;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(account: &AccountId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(account)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<AccountId, D::Error> {
        let text = String::deserialize(d)?;
        AccountId::from_hex(&text).ok_or_else(|| D::Error::custom(format!("account id {text:?}")))
    }
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

/// A log record as read: decoded, or why it does not decode.
pub type RecordRead = Result<LogRecord, String>;

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
fn log_id_key(id: &WebhookId) -> Vec<u8> {
    [&b"i"[..], id.to_string().as_bytes()].concat()
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

/// The webhook id an outbox key names.
fn outbox_key(key: &[u8]) -> Result<WebhookId, StoreError> {
    std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("outbox key {:?}", String::from_utf8_lossy(key))))
}

fn decode(bytes: &[u8]) -> Result<Entry, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode(entry: &Entry) -> Vec<u8> {
    json(entry)
}

/// The log record of a delivered export begun at `started_ms`: no personal data, the payload by its (nonce-salted)
/// hash.
pub fn log_record(id: &WebhookId, entry: &Entry, started_ms: u64) -> Result<LogRecord, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("outbox entry {id}"));
    let leaf = ExportLeaf {
        export_id: id.export_id(),
        affiliate: entry.pair.affiliate.clone(),
        purpose: entry.pair.purpose.as_str().to_owned(),
        fields: entry.fields.clone(),
        payload_hash: Sha256::digest(entry.body.as_bytes()).into(),
        consent_hash: entry.statement_hash,
        time_ms: started_ms,
    };
    Ok(LogRecord {
        leaf: leaf.encode().map_err(|_| corrupt())?,
        account: entry.pair.account,
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
    pub fn exported(&self, pair: &Pair) -> Result<Option<String>, StoreError> {
        Ok(self.exported.get(pair.to_string())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records what was queued for the pair.
    pub fn set_exported(&self, pair: &Pair, what: &str) -> Result<(), StoreError> {
        self.exported.insert(pair.to_string(), what.as_bytes())?;
        Ok(())
    }

    /// Forgets what was queued for the pair (at its withdrawal).
    pub fn forget_exported(&self, pair: &Pair) -> Result<(), StoreError> {
        self.exported.remove(pair.to_string())?;
        Ok(())
    }

    /// Keeps a verified statement of the pair as audit evidence (idempotent).
    pub fn record_statement(&self, pair: &Pair, sequence: u64, evidence: &Evidence) -> Result<(), StoreError> {
        self.statements.insert(format!("{pair}/{sequence:020}"), json(evidence))?;
        Ok(())
    }

    /// Every statement kept for the pair, by sequence.
    pub fn statements_of(&self, pair: &Pair) -> Result<Vec<(u64, Evidence)>, StoreError> {
        let mut out = Vec::new();
        let prefix = format!("{pair}/");
        for item in self.statements.scan_prefix(&prefix) {
            let (k, v) = item?;
            let seq = k
                .get(prefix.len()..)
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
    pub fn complete_export(&self, id: &WebhookId, entry: &Entry, record: &LogRecord) -> Result<u64, StoreError> {
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
            delivered.insert(entry.pair.to_string().as_bytes(), entry.pseudonym.as_bytes())?;
            outbox.remove(id.to_string().as_bytes())?;
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
        self.log_page(start, limit)?
            .into_iter()
            .map(|(index, record)| record.map(|r| (index, r)).map_err(StoreError::Corrupt))
            .collect()
    }

    /// The log records from `start`, at most `limit`, each decoded or, if it does not decode, why.
    fn log_page(&self, start: u64, limit: usize) -> Result<Vec<(u64, RecordRead)>, StoreError> {
        let mut out = Vec::new();
        for item in self.log.range(log_record_key(start)..log_record_key(u64::MAX)).take(limit) {
            let (k, v) = item?;
            let k = k.get(1..).ok_or_else(|| StoreError::Corrupt("log key".into()))?;
            let record = serde_json::from_slice(&v).map_err(|e| format!("log record: {e}"));
            out.push((be_u64(k, "log index")?, record));
        }
        Ok(out)
    }

    /// Calls `f` with every log record in order, reading the log a page at a time; a record that does not decode
    /// is an error.
    pub fn visit_log<E: From<StoreError>>(&self, mut f: impl FnMut(u64, LogRecord) -> Result<(), E>) -> Result<(), E> {
        self.visit_log_records(|index, record| f(index, record.map_err(StoreError::Corrupt)?))
    }

    /// Calls `f` with every log record in order, or why it does not decode (the auditor reports it and goes on).
    pub fn visit_log_records<E: From<StoreError>>(
        &self,
        mut f: impl FnMut(u64, RecordRead) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut start = 0;
        loop {
            let page = self.log_page(start, 1024)?;
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
    pub fn insert_new(&self, id: &WebhookId, entry: &Entry) -> Result<bool, StoreError> {
        Ok(self.outbox.compare_and_swap(id.to_string(), None as Option<&[u8]>, Some(encode(entry)))?.is_ok())
    }

    /// Replaces the entry under `id` (a rescheduled attempt).
    pub fn put(&self, id: &WebhookId, entry: &Entry) -> Result<(), StoreError> {
        self.outbox.insert(id.to_string(), encode(entry))?;
        Ok(())
    }

    /// Removes the entry under `id`.
    pub fn remove(&self, id: &WebhookId) -> Result<(), StoreError> {
        self.outbox.remove(id.to_string())?;
        Ok(())
    }

    /// The entry under `id`.
    pub fn get(&self, id: &WebhookId) -> Result<Option<Entry>, StoreError> {
        self.outbox.get(id.to_string())?.map(|v| decode(&v)).transpose()
    }

    /// At most `limit` entries due at `now_ms`, soonest first.
    pub fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<(WebhookId, Entry)>, StoreError> {
        let mut due = Vec::new();
        for item in self.outbox.iter() {
            let (k, v) = item?;
            let entry = decode(&v)?;
            if entry.next_attempt_ms <= now_ms {
                due.push((outbox_key(&k)?, entry));
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
    pub fn remove_exports_of(&self, pair: &Pair) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        for item in self.outbox.iter() {
            let (k, v) = item?;
            let entry = decode(&v)?;
            if entry.kind == Kind::Export && entry.pair == *pair {
                doomed.push((outbox_key(&k)?, entry));
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
    pub fn drop_export(&self, id: &WebhookId, entry: &Entry) -> Result<bool, StoreError> {
        match entry.in_flight_ms {
            Some(started_ms) if entry.kind == Kind::Export => {
                let record = log_record(id, entry, started_ms)?;
                self.complete_export(id, entry, &record)?;
                tracing::info!(webhook = %id, "export dropped after an attempt with no answer; logged as delivered");
                Ok(true)
            }
            _ => {
                tracing::info!(webhook = %id, "queued export dropped before any attempt could reach the affiliate");
                self.remove(id)?;
                Ok(false)
            }
        }
    }

    /// Records that the pair's data reached the affiliate, with the user's pseudonym for it.
    pub fn mark_delivered(&self, pair: &Pair, pseudonym: &str) -> Result<(), StoreError> {
        self.delivered.insert(pair.to_string(), pseudonym.as_bytes())?;
        Ok(())
    }

    /// The pseudonym recorded when the pair was delivered, if it was.
    pub fn delivered(&self, pair: &Pair) -> Result<Option<String>, StoreError> {
        Ok(self.delivered.get(pair.to_string())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Forgets that the pair was delivered (after its withdrawal notice is queued).
    pub fn forget_delivered(&self, pair: &Pair) -> Result<(), StoreError> {
        self.delivered.remove(pair.to_string())?;
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
    use relay_proto::consent::Purpose;

    use super::*;

    fn pair(purpose: Purpose) -> Pair {
        Pair::new(AccountId([0xaa; 16]), "adsco", purpose)
    }

    fn id(n: u8) -> WebhookId {
        WebhookId::from_export_id([n; 16])
    }

    fn entry(kind: Kind, purpose: Purpose, next: u64) -> Entry {
        Entry {
            kind,
            pair: pair(purpose),
            statement_hash: [0; 32],
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
        let mut e = entry(Kind::Export, Purpose::Advertising, 0);
        e.evidence = Some(Evidence::default());
        e.fields = vec!["device_model".into()];
        let record = |n: u8| LogRecord { leaf: vec![n], account: e.pair.account, evidence: Evidence::default() };
        store.put(&id(1), &e).expect("put");
        assert_eq!(store.complete_export(&id(1), &e, &record(1)).expect("settle"), 0);
        assert!(store.get(&id(1)).expect("get").is_none(), "out of the outbox");
        // As if a crash lost the removal but kept the log: the entry is back and settles again.
        store.put(&id(1), &e).expect("put again");
        assert_eq!(store.complete_export(&id(1), &e, &record(1)).expect("settle again"), 0);
        store.put(&id(2), &e).expect("put");
        assert_eq!(store.complete_export(&id(2), &e, &record(2)).expect("settle"), 1);
        assert_eq!(store.log_len().expect("len"), 2);
        let leaves: Vec<_> = store.log_records(0, 10).expect("records").into_iter().map(|(i, r)| (i, r.leaf)).collect();
        assert_eq!(leaves, [(0, vec![1]), (1, vec![2])]);
        assert_eq!(store.delivered(&e.pair).expect("delivered").as_deref(), Some("p"));
        drop(store);
        let reopened = ExporterStore::open(dir.path()).expect("reopen");
        assert_eq!(reopened.log_len().expect("len"), 2);
    }

    #[test]
    fn entries_are_kept_once_due_in_order_and_removed_by_pair() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ExporterStore::open(dir.path()).expect("open");
        assert!(store.insert_new(&id(1), &entry(Kind::Export, Purpose::Advertising, 20)).expect("insert"));
        assert!(!store.insert_new(&id(1), &entry(Kind::Export, Purpose::Advertising, 99)).expect("insert"));
        assert_eq!(store.get(&id(1)).expect("get").map(|e| e.next_attempt_ms), Some(20));
        store.put(&id(2), &entry(Kind::Export, Purpose::Analytics, 10)).expect("put");
        store.put(&id(3), &entry(Kind::Withdrawn, Purpose::Advertising, 30)).expect("put");
        let due: Vec<_> = store.due(25, 10).expect("due").into_iter().map(|(k, _)| k).collect();
        assert_eq!(due, [id(2), id(1)]);
        assert_eq!(store.remove_exports_of(&pair(Purpose::Advertising)).expect("remove"), 1);
        assert_eq!(store.len(), 2, "the withdrawal notice and the other pair stay");
        store.set_cursor(7).expect("cursor");
        assert_eq!(store.cursor().expect("cursor"), 7);
    }

    #[test]
    fn a_log_record_that_does_not_decode_is_reported_with_its_index_and_the_rest_still_read() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ExporterStore::open(dir.path()).expect("open");
        let mut e = entry(Kind::Export, Purpose::Advertising, 0);
        e.evidence = Some(Evidence::default());
        for n in 0..3 {
            let record = LogRecord { leaf: vec![n], account: e.pair.account, evidence: Evidence::default() };
            store.complete_export(&id(n), &e, &record).expect("log");
        }
        // Well-formed JSON, but the leaf is not hex.
        let good = String::from_utf8(json(&store.log_records(1, 1).expect("record")[0].1)).expect("utf8");
        let bad = good.replacen(r#""leaf":"01""#, r#""leaf":"zz""#, 1);
        assert_ne!(bad, good);
        store.log.insert(&log_record_key(1)[..], bad.as_bytes()).expect("tamper");
        let mut seen = Vec::new();
        store
            .visit_log_records(|index, record| {
                seen.push((index, record.map(|r| r.leaf).map_err(|e| e.contains("log record"))));
                Ok::<_, StoreError>(())
            })
            .expect("visit");
        assert_eq!(seen, [(0, Ok(vec![0])), (1, Err(true)), (2, Ok(vec![2]))]);
        assert!(matches!(store.visit_log(|_, _| Ok::<_, StoreError>(())), Err(StoreError::Corrupt(_))));
    }

    /// A store written by the exporter before ids and pairs were typed (commit c167199), record for record.
    const STORE_C167199: &str = include_str!("../testdata/store-c167199.txt");

    /// Writes the records of `fixture` into a fresh sled database at `path`, as that exporter left them.
    pub(crate) fn write_fixture(path: &Path, fixture: &str) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        let db = sled::open(path).expect("sled");
        let mut records = Vec::new();
        for line in fixture.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let mut parts = line.split(' ');
            let (Some(tree), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
                panic!("fixture line {line:?}");
            };
            let (key, value) = (hex::decode(key).expect("key hex"), hex::decode(value).expect("value hex"));
            db.open_tree(tree).expect("tree").insert(&key, value.clone()).expect("insert");
            records.push((tree.to_owned(), key, value));
        }
        db.flush().expect("flush");
        records
    }

    #[test]
    fn a_store_written_before_ids_were_typed_opens_and_reads_back_unchanged() {
        let dir = tempfile::tempdir().expect("dir");
        let records = write_fixture(dir.path(), STORE_C167199);
        let store = ExporterStore::open(dir.path()).expect("open the old store");
        let account = AccountId::from_hex("3c145a56884dacbde39964c4942f4905").expect("account");

        // Every outbox entry decodes to typed ids and encodes back to exactly the bytes stored.
        let due = store.due(u64::MAX, 10).expect("due");
        assert_eq!(due.len(), 3);
        for (id, entry) in &due {
            let stored = records.iter().find(|(t, k, _)| t == "outbox" && *k == id.to_string().as_bytes());
            assert_eq!(stored.map(|(_, _, v)| v.as_slice()), Some(encode(entry).as_slice()), "{id}");
            assert_eq!(entry.pair.account, account);
        }
        let by_purpose = |p: Purpose, kind: Kind| {
            due.iter().find(|(_, e)| e.pair.purpose == p && e.kind == kind).cloned().expect("entry")
        };
        let (notice_id, notice) = by_purpose(Purpose::Advertising, Kind::Withdrawn);
        assert_eq!(notice_id, WebhookId::notice(&notice.statement_hash, "adsco"));
        let (_, in_flight) = by_purpose(Purpose::Analytics, Kind::Export);
        assert_eq!((in_flight.in_flight_ms, in_flight.attempts, in_flight.next_attempt_ms), (Some(45), 2, 5_000));
        assert_eq!(in_flight.fields, ["device_model", "os", "app_version"]);
        let (_, queued) = by_purpose(Purpose::Security, Kind::Export);
        assert_eq!((queued.pair.affiliate.as_str(), queued.in_flight_ms), ("shieldco", None));

        // Per-pair records under the same keys.
        let analytics = Pair::new(account, "adsco", Purpose::Analytics);
        let marker = store.exported(&analytics).expect("exported").expect("a marker");
        assert!(marker.starts_with(&hex::encode(in_flight.statement_hash)), "{marker}");
        let advertising = Pair::new(account, "adsco", Purpose::Advertising);
        assert_eq!(store.delivered(&advertising).expect("delivered"), None, "forgotten when the notice was queued");
        let sequences: Vec<u64> = store.statements_of(&advertising).expect("statements").iter().map(|s| s.0).collect();
        assert_eq!(sequences, [1, 2]);

        // The log, its head, the cursors.
        let logged = store.log_records(0, 10).expect("log");
        assert_eq!(logged.len(), 1);
        let (_, record) = &logged[0];
        assert_eq!(record.account, account);
        let leaf = ExportLeaf::decode(&record.leaf).expect("leaf");
        assert_eq!((leaf.purpose.as_str(), leaf.time_ms), ("advertising", 20));
        let stored = records.iter().find(|(t, k, _)| t == "log" && k.first() == Some(&b'r')).expect("record");
        assert_eq!(json(record), stored.2, "the record encodes back to the bytes stored");
        assert_eq!(store.log_len().expect("len"), 1);
        assert_eq!(store.heads().expect("heads").len(), 1);
        assert_eq!((store.cursor().expect("cursor"), store.feed_cursor(SUBJECT_CURSOR).expect("cursor")), (4, 2));
        assert_eq!(store.published().expect("published"), 1);
    }
}
