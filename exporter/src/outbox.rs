//! The exporter's durable state, in its own sled database, one tree per concern: `outbox` (webhook id → entry to
//! deliver), `delivered` (pair → how its affiliate received the user: phone numbers, pseudonyms, webhook ids; for a
//! later `consent.withdrawn` event),
//! `exported` (pair → what was last queued for it, so unchanged data is not exported twice), `meta` (the feed
//! cursors, how much of the log the relay holds), `log` (index → [`LogRecord`]: the leaf and the user-signed
//! statement that allowed it), `heads` (its signed tree heads), `cosignatures` (head size ‖ witness key → the
//! witness's cosignature of that head), `statements` (every verified statement per pair: the auditor's evidence
//! that no later statement had withdrawn a grant) and `notices` (every notice document the exporter made, by hash,
//! and the latest per pair: [`ExporterStore::version_notices`]) and `erased` (account → the signed erasure request
//! it was erased at: no personal data). Keys are the text forms of [`crate::ids`]. An erasure
//! (`crate::core::erasure`) removes the account's `exported` and `delivered` records; its outbox entries go as its
//! notices are delivered or abandoned; its statements and log records stay (account ids, signed statements and
//! hashes: no phone number, no device info).
//!
//! Contract: the store decides nothing; it performs the core's writes ([`ExporterStore::apply`]) in the order given
//! and makes them durable at [`ExporterStore::flush`]. [`Write::Settle`] appends the log record (durably, once per
//! webhook id), then removes the entry and marks the pair delivered, so a crash never leaves a settled export out of
//! the log nor logs one twice. Entries hold no raw phone number unless the catalogue allows the affiliate to receive
//! it (it is then part of the body); log records never hold one.

use std::path::Path;

use relay_proto::consent::Purpose;
use relay_proto::merkle::{SignedTreeHead, TreeHead};
use relay_proto::notice::{Notice, notice_hash};
use relay_proto::witness::Cosignature;
use serde::Serialize;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::core::{AccountRecords, Delivered, Entry, Evidence, ExportMarker, Known, LogRecord, Write};
use crate::feed::Feed;
use crate::ids::{Pair, WebhookId};

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
    /// Settling or swapping a compaction's files failed.
    #[error("exporter store compaction: {0}")]
    Compaction(#[from] std::io::Error),
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
    cosignatures: sled::Tree,
    statements: sled::Tree,
    notices: sled::Tree,
    erased: sled::Tree,
}

/// In the `notices` tree: `p ‖ affiliate ‖ / ‖ purpose` → the pair's latest notice document.
fn latest_notice_key(affiliate: &str, purpose: Purpose) -> Vec<u8> {
    format!("p{affiliate}/{purpose}").into_bytes()
}

/// In the `notices` tree: `h ‖ SHA-256` → a notice document.
fn notice_key(hash: &[u8; 32]) -> Vec<u8> {
    [&b"h"[..], hash].concat()
}

/// In the `notices` tree: `t ‖ SHA-256` → when the exporter made that notice (ms since the Unix epoch, BE).
fn notice_made_key(hash: &[u8; 32]) -> Vec<u8> {
    [&b"t"[..], hash].concat()
}

/// A notice the exporter made, with when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeNotice {
    /// The document.
    pub document: Vec<u8>,
    /// Its terms.
    pub notice: Notice,
    /// When the exporter first made it current (ms since the Unix epoch; 0 if made before this was recorded).
    pub made_ms: u64,
}

/// A log record as read: decoded, or why it does not decode.
pub type RecordRead = Result<LogRecord, String>;

/// In the `meta` tree: a feed's cursor.
fn cursor_key(feed: Feed) -> &'static [u8] {
    match feed {
        Feed::Consents => b"feed_cursor",
        Feed::Subjects => b"subject_cursor",
        Feed::Erasures => b"erasure_cursor",
    }
}
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

impl ExporterStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        crate::compact::settle(path)?;
        Self::with_db(sled::open(path)?)
    }

    /// Gives each notice of `terms` (version 1, from the catalogue) its version: the stored one if the pair's latest
    /// notice has the same terms, one more if they changed (a new pair starts at 1). New documents are stored, by
    /// hash and as the pair's latest, and flushed before this returns, so a version is never given twice.
    pub fn version_notices(&self, terms: Vec<Notice>) -> Result<Vec<Notice>, StoreError> {
        let mut out = Vec::with_capacity(terms.len());
        for notice in terms {
            let key = latest_notice_key(&notice.affiliate, notice.purpose);
            let latest = match self.notices.get(&key)? {
                Some(doc) => Some(Notice::decode(&doc).map_err(|e| StoreError::Corrupt(format!("notice: {e}")))?),
                None => None,
            };
            let notice = match latest {
                Some(l) if l.same_terms(&notice) => l,
                Some(l) => Notice { version: l.version.saturating_add(1), ..notice },
                None => notice,
            };
            let document = notice.encode().map_err(|e| StoreError::Corrupt(format!("notice: {e}")))?;
            let hash = notice_hash(&document);
            if self.notices.get(notice_key(&hash))?.is_none() {
                self.notices.insert(notice_key(&hash), document.as_slice())?;
                self.notices.insert(notice_made_key(&hash), &relay_proto::now_ms().to_be_bytes()[..])?;
                self.notices.insert(key, document)?;
            }
            out.push(notice);
        }
        self.notices.flush()?;
        Ok(out)
    }

    /// Every notice this exporter made, each with when it became current, oldest first.
    pub fn made_notices(&self) -> Result<Vec<MadeNotice>, StoreError> {
        let mut out = Vec::new();
        for item in self.notices.scan_prefix(b"h") {
            let (k, document) = item?;
            let hash: [u8; 32] =
                k.get(1..).and_then(|h| h.try_into().ok()).ok_or_else(|| StoreError::Corrupt("notice key".into()))?;
            let notice = Notice::decode(&document).map_err(|e| StoreError::Corrupt(format!("notice: {e}")))?;
            let made_ms = self.notices.get(notice_made_key(&hash))?.map_or(Ok(0), |v| be_u64(&v, "notice time"))?;
            out.push(MadeNotice { document: document.to_vec(), notice, made_ms });
        }
        out.sort_by_key(|n| (n.made_ms, n.notice.version));
        Ok(out)
    }

    /// The notice document whose SHA-256 is `hash`, if this exporter ever made it.
    pub fn notice_document(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.notices.get(notice_key(hash))?.map(|v| v.to_vec()))
    }

    fn counter(&self, key: &[u8]) -> Result<u64, StoreError> {
        self.meta.get(key)?.map_or(Ok(0), |v| be_u64(&v, "counter"))
    }

    /// `feed`'s cursor (0 before the first change).
    pub fn cursor(&self, feed: Feed) -> Result<u64, StoreError> {
        self.counter(cursor_key(feed))
    }

    /// Performs one of the core's writes; durable after the next [`ExporterStore::flush`] ([`Write::Settle`]
    /// makes its log append durable before it returns).
    pub fn apply(&self, write: &Write) -> Result<(), StoreError> {
        match write {
            Write::Statement { pair, sequence, evidence } => {
                self.statements.insert(format!("{pair}/{sequence:020}"), json(evidence))?;
            }
            Write::Put { id, entry } => {
                self.outbox.insert(id.to_string(), json(entry))?;
            }
            Write::Remove { id } => {
                self.outbox.remove(id.to_string())?;
            }
            Write::Settle { id, pair, delivered, record } => {
                self.settle(id, pair, delivered.as_ref(), record)?;
            }
            Write::SetExported { pair, marker } => {
                self.exported.insert(pair.to_string(), marker.to_string().as_bytes())?;
            }
            Write::ForgetExported { pair } => {
                self.exported.remove(pair.to_string())?;
            }
            Write::ForgetDelivered { pair } => {
                self.delivered.remove(pair.to_string())?;
            }
            // Performed on the body vault by the driver (`crate::process`, `Vault::erase_account`), before this.
            Write::EraseBodies { .. } => {}
            Write::Erased { account, evidence } => {
                self.erased.insert(account.to_string(), json(evidence))?;
                self.meta.insert(crate::compact::COMPACTION_DUE, &[1][..])?;
            }
            Write::Cursor { feed, cursor } => {
                self.meta.insert(cursor_key(*feed), &cursor.to_be_bytes())?;
            }
        }
        Ok(())
    }

    /// What the rules need to know of `pair`: what was last queued for it, and whether (under which pseudonym) its
    /// data reached the affiliate, each since its last withdrawal.
    pub fn known(&self, pair: &Pair) -> Result<Known, StoreError> {
        let key = pair.to_string();
        let exported = match self.exported.get(&key)? {
            Some(v) => Some(
                std::str::from_utf8(&v)
                    .ok()
                    .and_then(|m| m.parse::<ExportMarker>().ok())
                    .ok_or_else(|| StoreError::Corrupt(format!("export marker of {pair}")))?,
            ),
            None => None,
        };
        let delivered = self.delivered.get(&key)?.map(|v| Delivered::from_stored(&v));
        // Purpose-level statements are kept under the pair with no affiliate.
        let purpose_level = self.statements_of(&Pair::new(pair.account, "", pair.purpose))?;
        let objection = Known::latest_objection(purpose_level.iter().map(|(_, e)| e));
        let erased = self.erased.contains_key(pair.account.to_string())?;
        Ok(Known { exported, delivered, latest: self.latest_statement(pair)?, objection, erased })
    }

    /// What an erasure of `account` needs to know: its pairs with a `delivered` record (and the record), and its
    /// pairs with an `exported` marker.
    pub fn account_records(&self, account: &relay_proto::AccountId) -> Result<AccountRecords, StoreError> {
        let prefix = format!("{account}/");
        let pair_of = |k: &[u8]| {
            std::str::from_utf8(k)
                .ok()
                .and_then(|k| k.parse::<Pair>().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("pair key {:?}", String::from_utf8_lossy(k))))
        };
        let mut records = AccountRecords::default();
        for item in self.delivered.scan_prefix(&prefix) {
            let (k, v) = item?;
            records.delivered.push((pair_of(&k)?, Delivered::from_stored(&v)));
        }
        for item in self.exported.scan_prefix(&prefix) {
            records.exported.push(pair_of(&item?.0)?);
        }
        Ok(records)
    }

    /// Whether an erasure left removed personal data in the database files (see `crate::compact`).
    pub fn compaction_due(&self) -> Result<bool, StoreError> {
        Ok(self.meta.contains_key(crate::compact::COMPACTION_DUE)?)
    }

    /// Rewrites the database at `path` (this store's) into fresh files and reopens it (see `crate::compact`). On an
    /// error the store is gone: reopen it from `path`.
    pub async fn compacted(self, path: &Path) -> Result<Self, StoreError> {
        self.db.flush_async().await?;
        crate::compact::copy(&self.db, path)?;
        drop(self);
        crate::compact::swap(path)?;
        crate::compact::reopen(|| Self::open(path)).await
    }

    /// A throwaway store in a temporary directory (what stands in while the real one is compacted).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::with_db(sled::Config::new().temporary(true).open()?)
    }

    /// The store's trees in `db`.
    fn with_db(db: sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            outbox: db.open_tree("outbox")?,
            delivered: db.open_tree("delivered")?,
            exported: db.open_tree("exported")?,
            meta: db.open_tree("meta")?,
            log: db.open_tree("log")?,
            heads: db.open_tree("heads")?,
            cosignatures: db.open_tree("cosignatures")?,
            statements: db.open_tree("statements")?,
            notices: db.open_tree("notices")?,
            erased: db.open_tree("erased")?,
            db,
        })
    }

    /// Whether `account` was erased.
    pub fn is_erased(&self, account: &relay_proto::AccountId) -> Result<bool, StoreError> {
        Ok(self.erased.contains_key(account.to_string())?)
    }

    /// The latest statement kept for `pair` (keys sort by sequence): its sequence and SHA-256.
    fn latest_statement(&self, pair: &Pair) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        let prefix = format!("{pair}/");
        let Some(item) = self.statements.scan_prefix(&prefix).next_back() else { return Ok(None) };
        let (k, v) = item?;
        let corrupt = || StoreError::Corrupt(format!("latest statement of {pair}"));
        let seq = k
            .get(prefix.len()..)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(corrupt)?;
        let evidence: Evidence = serde_json::from_slice(&v).map_err(|_| corrupt())?;
        let bytes = hex::decode(&evidence.statement).map_err(|_| corrupt())?;
        Ok(Some((seq, relay_proto::consent::statement_hash(&bytes))))
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

    /// Settles an export: appends `record` to the log (unless export `id` is logged already), makes that durable,
    /// then removes the entry from the outbox and adds `add` (an export's; none for a notice) to what `pair`'s
    /// affiliate received. Returns the record's index.
    ///
    /// The log append is one atomic batch on one tree (record, length, id index) and is flushed before the entry
    /// leaves the outbox: whatever a crash keeps, an export that leaves the outbox is in the log, and an entry that
    /// comes back after a crash is settled again without a second record. This does not rely on a transaction
    /// across trees surviving a crash whole.
    fn settle(
        &self,
        id: &WebhookId,
        pair: &Pair,
        add: Option<&Delivered>,
        record: &LogRecord,
    ) -> Result<u64, StoreError> {
        let index = match self.log.get(log_id_key(id))? {
            Some(v) => be_u64(&v, "logged export index")?,
            None => {
                let index = self.log_len()?;
                self.append_record(index, id, record)?;
                self.db.flush()?;
                index
            }
        };
        let trees = (&self.outbox, &self.delivered);
        let result = trees.transaction(|(outbox, delivered)| {
            if let Some(add) = add {
                let key = pair.to_string();
                let mut received =
                    delivered.get(key.as_bytes())?.map(|v| Delivered::from_stored(&v)).unwrap_or_default();
                received.merge(add.clone());
                delivered.insert(key.as_bytes(), received.to_stored())?;
            }
            outbox.remove(id.to_string().as_bytes())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        });
        match result {
            Ok(()) => Ok(index),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Appends `record` at `index` (the log's length) as one atomic batch: the record, the new length, the webhook
    /// id's index.
    fn append_record(&self, index: u64, id: &WebhookId, record: &LogRecord) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(&log_record_key(index)[..], json(record));
        batch.insert(LOG_LEN, &(index + 1).to_be_bytes()[..]);
        batch.insert(log_id_key(id), &index.to_be_bytes()[..]);
        self.log.apply_batch(batch)?;
        Ok(())
    }

    /// Appends a record recovered from the relay's copy of the log at `index`, which must be the log's length (the
    /// caller flushes).
    pub fn append_recovered(&self, index: u64, id: &WebhookId, record: &LogRecord) -> Result<(), StoreError> {
        let len = self.log_len()?;
        if index != len {
            return Err(StoreError::Corrupt(format!("recovered entry {index} appended to a log of {len}")));
        }
        self.append_record(index, id, record)
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

    /// Drops every log record from `len` on, their webhook id index, the heads over them and the count of entries
    /// the relay holds beyond them: what sled leaves when it discards every write after a damaged point of its
    /// files (for tests that damage the store).
    #[doc(hidden)]
    pub fn drop_log_tail(&self, len: u64) -> Result<(), StoreError> {
        for (index, record) in self.log_records(len, usize::MAX)? {
            let export_id = relay_proto::merkle::ExportLeaf::decode(&record.leaf)
                .map_err(|e| StoreError::Corrupt(format!("log record {index}: {e}")))?
                .export_id;
            self.log.remove(log_id_key(&WebhookId::from_export_id(export_id)))?;
            self.log.remove(&log_record_key(index)[..])?;
        }
        self.log.insert(LOG_LEN, &len.to_be_bytes()[..])?;
        for head in self.heads()? {
            if head.head.size > len {
                self.heads.remove(head.head.size.to_be_bytes())?;
            }
        }
        for item in self.cosignatures.range(len.saturating_add(1).to_be_bytes()..) {
            self.cosignatures.remove(item?.0)?;
        }
        if self.published()? > len {
            self.set_published(len)?;
        }
        self.db.flush()?;
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

    /// Stores a witness's cosignature of the head of size `size` (the caller flushes); replaces an earlier one by
    /// the same witness.
    pub fn put_cosignature(&self, size: u64, cosignature: &Cosignature) -> Result<(), StoreError> {
        let mut key = size.to_be_bytes().to_vec();
        key.extend_from_slice(&cosignature.witness_key);
        let mut v = Vec::with_capacity(8 + 64);
        v.extend_from_slice(&cosignature.timestamp_ms.to_be_bytes());
        v.extend_from_slice(&cosignature.signature);
        self.cosignatures.insert(key, v)?;
        Ok(())
    }

    /// The witnesses' cosignatures of the head of size `size`.
    pub fn cosignatures(&self, size: u64) -> Result<Vec<Cosignature>, StoreError> {
        let corrupt = || StoreError::Corrupt("cosignature".into());
        let mut out = Vec::new();
        for item in self.cosignatures.scan_prefix(size.to_be_bytes()) {
            let (k, v) = item?;
            if k.len() != 8 + 32 || v.len() != 8 + 64 {
                return Err(corrupt());
            }
            out.push(Cosignature {
                witness_key: k[8..].try_into().map_err(|_| corrupt())?,
                timestamp_ms: be_u64(&v[..8], "cosignature time")?,
                signature: v[8..].try_into().map_err(|_| corrupt())?,
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

    /// The entry under `id`, if queued.
    pub fn entry(&self, id: &WebhookId) -> Result<Option<Entry>, StoreError> {
        self.outbox.get(id.to_string())?.map(|v| decode(&v)).transpose()
    }

    /// The tree the body vault keeps its sealed records in (`crate::vault`).
    pub fn bodies_tree(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree("bodies")?)
    }

    /// The notice whose SHA-256 is `hash`, decoded, if this exporter made it.
    pub fn notice(&self, hash: &[u8; 32]) -> Result<Option<Notice>, StoreError> {
        match self.notice_document(hash)? {
            Some(d) => Ok(Some(Notice::decode(&d).map_err(|e| StoreError::Corrupt(format!("notice: {e}")))?)),
            None => Ok(None),
        }
    }

    /// Every outbox entry, by webhook id (each at rest: what a restart resumes from).
    pub fn entries(&self) -> Result<Vec<(WebhookId, Entry)>, StoreError> {
        let mut entries = Vec::new();
        for item in self.outbox.iter() {
            let (k, v) = item?;
            entries.push((outbox_key(&k)?, decode(&v)?));
        }
        Ok(entries)
    }

    /// Number of queued entries.
    pub fn len(&self) -> usize {
        self.outbox.len()
    }

    /// Whether the outbox is empty.
    pub fn is_empty(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

/// A store as the exporter of commit c167199 (before the I/O-free core and typed ids) left it, record for record.
#[cfg(test)]
pub(crate) const STORE_C167199: &str = include_str!("../testdata/store-c167199.txt");

/// Writes the records of `fixture` (`tree key-hex value-hex` lines) into a fresh sled database at `path`; returns
/// them.
#[cfg(test)]
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

#[cfg(test)]
mod tests {
    use relay_proto::AccountId;
    use relay_proto::consent::Purpose;
    use relay_proto::merkle::ExportLeaf;

    use super::*;
    use crate::core::{EntryState, Kind};

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
            notice_hash: None,
            queued_ms: None,
            fields: Vec::new(),
            evidence: None,
            state: EntryState::Queued,
        }
    }

    fn settle(store: &ExporterStore, n: u8, e: &Entry, leaf: u8) {
        let record = LogRecord { leaf: vec![leaf], account: e.pair.account, evidence: Evidence::default() };
        let record = Box::new(record);
        let delivered = Delivered { phone_pseudonym: vec![e.pseudonym.clone()], ..Delivered::default() };
        let settle = Write::Settle { id: id(n), pair: e.pair.clone(), delivered: Some(delivered), record };
        store.apply(&settle).expect("settle");
    }

    #[test]
    fn an_export_settled_again_after_a_crash_is_logged_once() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ExporterStore::open(dir.path()).expect("open");
        let e = entry(Kind::Export, Purpose::Advertising, 0);
        store.apply(&Write::Put { id: id(1), entry: Box::new(e.clone()) }).expect("put");
        settle(&store, 1, &e, 1);
        assert!(store.entries().expect("entries").is_empty(), "out of the outbox");
        // As if a crash lost the removal but kept the log: the entry is back and settles again.
        store.apply(&Write::Put { id: id(1), entry: Box::new(e.clone()) }).expect("put again");
        settle(&store, 1, &e, 1);
        store.apply(&Write::Put { id: id(2), entry: Box::new(e.clone()) }).expect("put");
        settle(&store, 2, &e, 2);
        assert_eq!(store.log_len().expect("len"), 2);
        let leaves: Vec<_> = store.log_records(0, 10).expect("records").into_iter().map(|(i, r)| (i, r.leaf)).collect();
        assert_eq!(leaves, [(0, vec![1]), (1, vec![2])]);
        let delivered = store.known(&e.pair).expect("known").delivered.expect("delivered");
        assert_eq!(delivered.phone_pseudonym, ["p"]);
        assert!(store.is_empty());
        drop(store);
        let reopened = ExporterStore::open(dir.path()).expect("reopen");
        assert_eq!(reopened.log_len().expect("len"), 2);
    }

    #[test]
    fn every_write_of_the_core_lands_in_its_tree() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ExporterStore::open(dir.path()).expect("open");
        let (ads, analytics) = (pair(Purpose::Advertising), pair(Purpose::Analytics));
        let mut in_flight = entry(Kind::Export, Purpose::Advertising, 20);
        in_flight.state = EntryState::at_rest(Some(15));
        store.apply(&Write::Put { id: id(1), entry: Box::new(in_flight.clone()) }).expect("put");
        store
            .apply(&Write::Put { id: id(2), entry: Box::new(entry(Kind::Withdrawn, Purpose::Analytics, 10)) })
            .expect("put");
        store.apply(&Write::Remove { id: id(2) }).expect("remove");
        assert_eq!(store.entries().expect("entries"), [(id(1), in_flight)], "the state read back as written");
        assert_eq!(store.len(), 1);

        let marker = ExportMarker { statement_hash: [1; 32], digest: [2; 32] };
        store.apply(&Write::SetExported { pair: ads.clone(), marker }).expect("exported");
        store.apply(&Write::SetExported { pair: analytics.clone(), marker }).expect("exported");
        store.apply(&Write::ForgetExported { pair: analytics.clone() }).expect("forget");
        settle(&store, 1, &entry(Kind::Export, Purpose::Advertising, 0), 1);
        assert_eq!(
            store.known(&ads).expect("known"),
            Known {
                exported: Some(marker),
                delivered: Some(Delivered { phone_pseudonym: vec!["p".into()], ..Delivered::default() }),
                latest: None,
                objection: None,
                erased: false,
            }
        );
        let records = store.account_records(&ads.account).expect("records");
        assert_eq!(records.exported, std::slice::from_ref(&ads));
        assert_eq!(records.delivered.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), std::slice::from_ref(&ads));
        store.apply(&Write::ForgetDelivered { pair: ads.clone() }).expect("forget");
        assert_eq!(store.known(&ads).expect("known").delivered, None);
        assert_eq!(store.known(&analytics).expect("known"), Known::default());
        let evidence = Evidence { statement: "00".into(), ..Evidence::default() };
        store.apply(&Write::Erased { account: ads.account, evidence }).expect("erased");
        assert!(store.known(&analytics).expect("known").erased, "an erasure covers every pair of the account");
        assert!(store.is_erased(&ads.account).expect("erased"));

        for sequence in [2u64, 1, 10] {
            let statement = hex::encode(sequence.to_be_bytes());
            let evidence = Evidence { recorded_at_ms: sequence, statement, ..Evidence::default() };
            store.apply(&Write::Statement { pair: ads.clone(), sequence, evidence }).expect("statement");
        }
        let sequences: Vec<u64> = store.statements_of(&ads).expect("statements").iter().map(|s| s.0).collect();
        assert_eq!(sequences, [1, 2, 10], "in sequence order");
        let latest = Some((10, relay_proto::consent::statement_hash(&10u64.to_be_bytes())));
        assert_eq!(store.known(&ads).expect("known").latest, latest, "the pair's latest statement, by sequence");
        assert!(store.statements_of(&analytics).expect("statements").is_empty());

        store.apply(&Write::Cursor { feed: Feed::Subjects, cursor: 7 }).expect("cursor");
        assert_eq!((store.cursor(Feed::Consents).expect("c"), store.cursor(Feed::Subjects).expect("c")), (0, 7));
    }

    #[test]
    fn a_log_record_that_does_not_decode_is_reported_with_its_index_and_the_rest_still_read() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ExporterStore::open(dir.path()).expect("open");
        let e = entry(Kind::Export, Purpose::Advertising, 0);
        for n in 0..3 {
            settle(&store, n, &e, n);
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

    #[test]
    fn a_store_written_before_the_core_opens_and_reads_back_unchanged() {
        let dir = tempfile::tempdir().expect("dir");
        let records = write_fixture(dir.path(), STORE_C167199);
        let store = ExporterStore::open(dir.path()).expect("open the old store");
        let account = AccountId::from_hex("3c145a56884dacbde39964c4942f4905").expect("account");

        // Every outbox entry decodes to typed ids and encodes back to exactly the bytes stored.
        let due = store.entries().expect("entries");
        assert_eq!(due.len(), 3);
        for (id, entry) in &due {
            let stored = records.iter().find(|(t, k, _)| t == "outbox" && *k == id.to_string().as_bytes());
            assert_eq!(stored.map(|(_, _, v)| v.as_slice()), Some(json(entry).as_slice()), "{id}");
            assert_eq!(entry.pair.account, account);
        }
        let by_purpose = |p: Purpose, kind: Kind| {
            due.iter().find(|(_, e)| e.pair.purpose == p && e.kind == kind).cloned().expect("entry")
        };
        let (notice_id, notice) = by_purpose(Purpose::Advertising, Kind::Withdrawn);
        assert_eq!(notice_id, WebhookId::notice(&notice.statement_hash, "adsco"));
        let (_, in_flight) = by_purpose(Purpose::Analytics, Kind::Export);
        assert_eq!(in_flight.state, EntryState::at_rest(Some(45)), "an attempt got no answer");
        assert_eq!((in_flight.attempts, in_flight.next_attempt_ms), (2, 5_000));
        assert_eq!(in_flight.fields, ["device_model", "os", "app_version"]);
        let (_, queued) = by_purpose(Purpose::Security, Kind::Export);
        assert_eq!((queued.pair.affiliate.as_str(), &queued.state), ("shieldco", &EntryState::Queued));

        // Per-pair records under the same keys.
        let analytics = Pair::new(account, "adsco", Purpose::Analytics);
        let marker = store.known(&analytics).expect("known").exported.expect("a marker");
        assert_eq!(marker.statement_hash, in_flight.statement_hash);
        let stored = records.iter().find(|(t, k, _)| t == "exported" && *k == analytics.to_string().as_bytes());
        assert_eq!(stored.map(|(_, _, v)| v.clone()), Some(marker.to_string().into_bytes()));
        let advertising = Pair::new(account, "adsco", Purpose::Advertising);
        let known = store.known(&advertising).expect("known");
        assert_eq!((known.exported, known.delivered), (None, None), "withdrawn: forgotten, the notice queued");
        let statements = store.statements_of(&advertising).expect("statements");
        let sequences: Vec<u64> = statements.iter().map(|s| s.0).collect();
        assert_eq!(sequences, [1, 2]);
        let withdrawal = hex::decode(&statements[1].1.statement).expect("hex");
        assert_eq!(
            known.latest,
            Some((2, relay_proto::consent::statement_hash(&withdrawal))),
            "the latest, from old stores too"
        );

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
        assert_eq!(
            (store.cursor(Feed::Consents).expect("cursor"), store.cursor(Feed::Subjects).expect("cursor")),
            (4, 2)
        );
        assert_eq!(store.published().expect("published"), 1);
    }

    /// The store of the previous format, resumed by the core: each entry goes on where it stood.
    #[test]
    fn the_core_resumes_a_store_written_before_it_where_each_entry_stood() {
        use crate::affiliates::Catalogue;
        use crate::core::{Answer, Core, Effect, SystemEntropy};

        let dir = tempfile::tempdir().expect("dir");
        write_fixture(dir.path(), STORE_C167199);
        let store = ExporterStore::open(dir.path()).expect("open the old store");
        let catalogue = Catalogue::parse(include_str!("../affiliates.example.toml")).expect("catalogue");
        let cursors = [(Feed::Consents, store.cursor(Feed::Consents).expect("c"))];
        let mut core =
            Core::new(catalogue, [3; 32], store.entries().expect("entries"), cursors, Box::new(SystemEntropy));
        assert_eq!((core.outbox_len(), core.cursor(Feed::Consents)), (3, 4));
        let now = 100_000;
        // The writes of each batch, as the driver performs them.
        let write = |effects: &[Effect]| {
            for effect in effects {
                if let Effect::Write(w) = effect {
                    store.apply(w).expect("the old store takes the new writes");
                }
            }
        };
        core.plan_deliveries(now);

        // Due first (queued at 30): the withdrawal notice, posted without a lease.
        let notice = core.poll_attempt(now).expect("an attempt");
        assert!(matches!(&notice[..], [Effect::Post { affiliate, .. }] if affiliate == "adsco"), "{notice:?}");
        let effects = core.handle_answer(Answer::Status(204), now).expect("answered");
        assert!(matches!(effects[..], [Effect::Write(Write::Remove { .. })]));
        write(&effects);
        // The exports were granted under the notices of that format (constants without the affiliate's terms), which
        // no notice of the catalogue is any more: their grants do not cover what would leave. Shieldco's export
        // (queued at 50, never attempted) is dropped; the analytics export whose attempt at 45 got no answer may be
        // held by the affiliate, so it is logged at 45, as the exporter that wrote the store would have done.
        let effects = core.poll_attempt(now).expect("an attempt");
        assert!(matches!(effects[..], [Effect::Write(Write::Remove { .. })]), "{effects:?}");
        write(&effects);
        let effects = core.poll_attempt(now).expect("an attempt");
        let [Effect::Write(Write::Settle { record, pair, .. })] = &effects[..] else { panic!("{effects:?}") };
        assert_eq!(ExportLeaf::decode(&record.leaf).expect("leaf").time_ms, 45);
        write(&effects);
        assert_eq!(core.poll_attempt(now), Some(vec![Effect::Flush]));

        assert_eq!(store.log_len().expect("len"), 2);
        assert!(store.known(pair).expect("known").delivered.is_some(), "a withdrawal will notify adsco");
        assert!(store.entries().expect("entries").is_empty(), "nothing left to send under the old notices");
    }

    /// A notice keeps its version while its terms stay, gets the next one when they change (also when they change
    /// back: the earlier document is not current again), and every version stays readable by hash.
    #[test]
    fn notices_are_versioned_by_their_terms_and_kept_by_hash() {
        use crate::affiliates::Catalogue;
        let dir = tempfile::tempdir().expect("dir");
        let store = ExporterStore::open(dir.path()).expect("store");
        let example = include_str!("../affiliates.example.toml");
        let versions = |text: &str| {
            let c = Catalogue::parse(text).expect("catalogue");
            let notices = store.version_notices(c.notice_terms()).expect("versioned");
            let n = notices.iter().find(|n| n.affiliate == "adsco" && n.purpose == Purpose::Advertising).cloned();
            n.expect("adsco advertising")
        };
        let v1 = versions(example);
        assert_eq!(v1.version, 1);
        assert_eq!(versions(example), v1, "same terms, same version");
        let widened = example
            .replace(r#"["phone_pseudonym", "device_model"]"#, r#"["phone", "phone_pseudonym", "device_model"]"#);
        let v2 = versions(&widened);
        assert_eq!(v2.version, 2);
        let v3 = versions(example);
        assert_eq!((v3.version, v3.same_terms(&v1)), (3, true), "back to the first terms: a third version");
        for n in [&v1, &v2, &v3] {
            let doc = n.encode().expect("doc");
            assert_eq!(store.notice_document(&relay_proto::notice::notice_hash(&doc)).expect("read"), Some(doc));
        }
        let shieldco = Catalogue::parse(example).expect("c").notice_terms();
        let versioned = store.version_notices(shieldco).expect("versioned");
        assert!(
            versioned.iter().filter(|n| n.affiliate == "shieldco").all(|n| n.version == 1),
            "untouched pairs stay at 1"
        );
    }
}
