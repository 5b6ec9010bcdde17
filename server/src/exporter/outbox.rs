//! The exporter's durable state, in its own sled database: the outbox (webhook id → entry to deliver), the pairs
//! delivered so far (pair → the user's pseudonym for that affiliate, for a later `consent.withdrawn` event) and the
//! feed cursor.
//!
//! Contract: an entry stays in the outbox until the affiliate answered 2xx, or the relay denied the export, or a
//! withdrawal of its pair removed it. The cursor is written only by the feed, after [`Store::flush`] made the writes
//! of the changes before it durable. Entries hold no raw phone number unless the catalogue allows the affiliate to
//! receive it (it is then part of the body).

use std::path::Path;

use serde::{Deserialize, Serialize};

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
pub struct Store {
    db: sled::Db,
    outbox: sled::Tree,
    delivered: sled::Tree,
    meta: sled::Tree,
}

const CURSOR: &[u8] = b"feed_cursor";

fn decode(bytes: &[u8]) -> Result<Entry, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode(entry: &Entry) -> Vec<u8> {
    // Serialising a struct of strings and integers cannot fail.
    serde_json::to_vec(entry).unwrap_or_default()
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::open(path)?;
        Ok(Self {
            outbox: db.open_tree("outbox")?,
            delivered: db.open_tree("delivered")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// The feed cursor (0 before the first change).
    pub fn cursor(&self) -> Result<u64, StoreError> {
        match self.meta.get(CURSOR)? {
            None => Ok(0),
            Some(v) => {
                let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt("cursor".into()))?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Records the feed cursor (the caller flushes).
    pub fn set_cursor(&self, cursor: u64) -> Result<(), StoreError> {
        self.meta.insert(CURSOR, &cursor.to_be_bytes())?;
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

    /// Removes every queued export (not withdrawal notice) of the pair; how many were removed.
    pub fn remove_exports_of(&self, pair: &str) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        for item in self.outbox.iter() {
            let (k, v) = item?;
            let entry = decode(&v)?;
            if entry.kind == Kind::Export && entry.pair_key() == pair {
                doomed.push(k);
            }
        }
        for k in &doomed {
            self.outbox.remove(k)?;
        }
        Ok(doomed.len())
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
        }
    }

    #[test]
    fn entries_are_kept_once_due_in_order_and_removed_by_pair() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path()).expect("open");
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
