//! Per-recipient mailboxes of opaque envelopes.
//!
//! An entry is keyed by `recipient ‖ server id` (big-endian, so a prefix scan yields a mailbox in arrival order) and
//! holds the arrival time, the expiry time and the envelope bytes: nothing about the sender, nothing decrypted.
//! Every operation takes the recipient from its caller (the authenticated account), so one account can neither read
//! nor remove another's entries. Appends are checked against a per-mailbox quota of messages and bytes; usage is
//! counted in memory, loaded from the tree the first time a mailbox is touched after start, under one of a fixed set
//! of shard locks (so appends to different mailboxes rarely wait for each other).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use relay_proto::{ACCOUNT_ID_LEN, AccountId};

const HEADER_LEN: usize = 16;
const KEY_LEN: usize = ACCOUNT_ID_LEN + 8;
/// Lock shards for mailbox appends and usage counters.
const SHARDS: usize = 64;

/// Quota and lifetime of mailbox entries.
#[derive(Debug, Clone, Copy)]
pub struct MailboxLimits {
    /// Most entries per mailbox.
    pub max_messages: u64,
    /// Most envelope bytes per mailbox.
    pub max_bytes: u64,
    /// Lifetime of an entry, in milliseconds.
    pub ttl_ms: u64,
}

/// One stored envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// Server-assigned id, at least 1, unique and increasing across restarts.
    pub id: u64,
    /// When the relay stored it.
    pub stored_at_ms: u64,
    /// When it expires if not delivered and acknowledged.
    pub expires_at_ms: u64,
    /// The opaque envelope.
    pub envelope: Bytes,
}

/// Where an appended envelope was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Server-assigned id.
    pub id: u64,
    /// When the relay stored it.
    pub stored_at_ms: u64,
}

/// Why a mailbox operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// The recipient's mailbox is full.
    #[error("mailbox full: {messages} messages / {bytes} bytes queued (limits {max_messages} / {max_bytes})")]
    QuotaExceeded {
        /// Messages queued.
        messages: u64,
        /// Bytes queued.
        bytes: u64,
        /// Message limit.
        max_messages: u64,
        /// Byte limit.
        max_bytes: u64,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] sled::Error),
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    messages: u64,
    bytes: u64,
}

/// All mailboxes.
pub struct Mailboxes {
    tree: sled::Tree,
    ids: sled::Db,
    limits: MailboxLimits,
    shards: Box<[Mutex<HashMap<AccountId, Usage>>]>,
    /// Entries in all mailboxes (for metrics).
    queued: AtomicU64,
}

fn key(recipient: &AccountId, id: u64) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..ACCOUNT_ID_LEN].copy_from_slice(recipient.as_bytes());
    k[ACCOUNT_ID_LEN..].copy_from_slice(&id.to_be_bytes());
    k
}

fn decode(k: &[u8], v: &sled::IVec) -> Option<StoredEnvelope> {
    let id = u64::from_be_bytes(k.get(ACCOUNT_ID_LEN..KEY_LEN)?.try_into().ok()?);
    let stored_at_ms = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let expires_at_ms = u64::from_be_bytes(v.get(8..HEADER_LEN)?.try_into().ok()?);
    // Shares the sled buffer instead of copying the envelope.
    let envelope = Bytes::from_owner(v.clone()).slice(HEADER_LEN..);
    Some(StoredEnvelope { id, stored_at_ms, expires_at_ms, envelope })
}

fn envelope_len(v: &[u8]) -> u64 {
    v.len().saturating_sub(HEADER_LEN) as u64
}

impl Mailboxes {
    pub(crate) fn new(tree: sled::Tree, ids: sled::Db, limits: MailboxLimits) -> Self {
        // Counting the entries walks the tree once, at start.
        let queued = AtomicU64::new(tree.len() as u64);
        Self { tree, ids, limits, shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(), queued }
    }

    fn shard(&self, recipient: &AccountId) -> MutexGuard<'_, HashMap<AccountId, Usage>> {
        // Account ids are hash outputs, so their first byte spreads mailboxes evenly over the shards. A poisoned
        // lock only means another thread panicked mid-update of counters; they stay usable.
        let i = usize::from(recipient.0[0]) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load_usage(&self, recipient: &AccountId) -> Result<Usage, sled::Error> {
        let mut u = Usage::default();
        for item in self.tree.scan_prefix(recipient.as_bytes()) {
            let (_, v) = item?;
            u.messages = u.messages.saturating_add(1);
            u.bytes = u.bytes.saturating_add(envelope_len(&v));
        }
        Ok(u)
    }

    /// Stores `envelope` for `recipient`. The entry is not yet durable: the caller must await the group commit
    /// before acknowledging it.
    ///
    /// The recipient's shard lock is held from the quota check through id generation to the insert, so entries of
    /// one mailbox become visible in id order: a delivery stream that follows the mailbox with a cursor can never
    /// pass over an entry that is inserted later with a lower id.
    pub fn append(&self, recipient: &AccountId, envelope: &[u8], now_ms: u64) -> Result<Appended, MailboxError> {
        let len = envelope.len() as u64;
        let mut shard = self.shard(recipient);
        let usage = match shard.get_mut(recipient) {
            Some(u) => u,
            None => {
                let loaded = self.load_usage(recipient)?;
                shard.entry(*recipient).or_insert(loaded)
            }
        };
        if usage.messages.saturating_add(1) > self.limits.max_messages
            || usage.bytes.saturating_add(len) > self.limits.max_bytes
        {
            return Err(MailboxError::QuotaExceeded {
                messages: usage.messages,
                bytes: usage.bytes,
                max_messages: self.limits.max_messages,
                max_bytes: self.limits.max_bytes,
            });
        }
        // sled's ids start at 0; ours start at 1 so that 0 can mean "before the first entry" in `scan`.
        let id = self.ids.generate_id()?.saturating_add(1);
        let expires_at_ms = now_ms.saturating_add(self.limits.ttl_ms);
        let mut v = Vec::with_capacity(HEADER_LEN + envelope.len());
        v.extend_from_slice(&now_ms.to_be_bytes());
        v.extend_from_slice(&expires_at_ms.to_be_bytes());
        v.extend_from_slice(envelope);
        self.tree.insert(key(recipient, id), v)?;
        usage.messages = usage.messages.saturating_add(1);
        usage.bytes = usage.bytes.saturating_add(len);
        self.queued.fetch_add(1, Ordering::Relaxed);
        Ok(Appended { id, stored_at_ms: now_ms })
    }

    fn release(&self, recipient: &AccountId, messages: u64, bytes: u64) {
        self.queued.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| Some(q.saturating_sub(messages))).ok();
        if let Some(u) = self.shard(recipient).get_mut(recipient) {
            u.messages = u.messages.saturating_sub(messages);
            u.bytes = u.bytes.saturating_sub(bytes);
        }
    }

    /// Up to `limit` unexpired entries of `recipient` with ids above `after`, oldest first.
    pub fn scan(
        &self,
        recipient: &AccountId,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredEnvelope>, sled::Error> {
        self.scan_bytes(recipient, after, limit, usize::MAX, now_ms)
    }

    /// Like [`Mailboxes::scan`], and it stops once the envelopes read add up to `max_bytes` or more (it returns at
    /// least one entry if there is one), so one scan holds a bounded number of bytes in memory.
    pub fn scan_bytes(
        &self,
        recipient: &AccountId,
        after: u64,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredEnvelope>, sled::Error> {
        let start = key(recipient, after.saturating_add(1));
        let end = key(recipient, u64::MAX);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in self.tree.range(start..=end) {
            if out.len() >= limit || bytes >= max_bytes {
                break;
            }
            let (k, v) = item?;
            match decode(&k, &v) {
                Some(e) if e.expires_at_ms > now_ms => {
                    bytes = bytes.saturating_add(e.envelope.len());
                    out.push(e);
                }
                Some(_) => {}
                None => tracing::warn!("skipping undecodable mailbox entry"),
            }
        }
        Ok(out)
    }

    /// Removes the listed entries from `recipient`'s own mailbox; ids that are not there are ignored. Returns how
    /// many were removed. Removal is not awaited durable: a removal lost in a crash means a redelivery, which
    /// clients de-duplicate.
    pub fn remove(&self, recipient: &AccountId, ids: &[u64]) -> Result<u32, sled::Error> {
        let (mut n, mut bytes) = (0u32, 0u64);
        for &id in ids {
            if let Some(v) = self.tree.remove(key(recipient, id))? {
                n += 1;
                bytes += envelope_len(&v);
            }
        }
        self.release(recipient, u64::from(n), bytes);
        Ok(n)
    }

    /// Removes every entry of `recipient`'s mailbox (the account is erased); returns how many. Not yet durable.
    pub fn purge(&self, recipient: &AccountId) -> Result<u64, sled::Error> {
        let (mut n, mut bytes) = (0u64, 0u64);
        for item in self.tree.scan_prefix(recipient.as_bytes()) {
            let (k, v) = item?;
            if self.tree.remove(&k)?.is_some() {
                n += 1;
                bytes += envelope_len(&v);
            }
        }
        self.release(recipient, n, bytes);
        Ok(n)
    }

    /// Removes every expired entry; returns how many.
    pub fn sweep_expired(&self, now_ms: u64) -> Result<u64, sled::Error> {
        let mut removed = 0;
        for item in self.tree.iter() {
            let (k, v) = item?;
            let expired = decode(&k, &v).is_none_or(|e| e.expires_at_ms <= now_ms);
            if expired && self.tree.compare_and_swap(&k, Some(&v), None::<&[u8]>)?.is_ok() {
                removed += 1;
                if let Some(acct) = k.get(..ACCOUNT_ID_LEN).and_then(AccountId::from_slice) {
                    self.release(&acct, 1, envelope_len(&v));
                }
            }
        }
        Ok(removed)
    }

    /// Entries queued in all mailboxes.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Entries queued for `recipient` (from the usage counters).
    pub fn depth(&self, recipient: &AccountId) -> Result<u64, sled::Error> {
        if let Some(u) = self.shard(recipient).get(recipient) {
            return Ok(u.messages);
        }
        Ok(self.load_usage(recipient)?.messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailboxes(max_messages: u64, max_bytes: u64) -> (tempfile::TempDir, Mailboxes) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).temporary(true).open().expect("open");
        let limits = MailboxLimits { max_messages, max_bytes, ttl_ms: 1000 };
        (dir, Mailboxes::new(db.open_tree("m").expect("tree"), db, limits))
    }

    #[test]
    fn a_scan_bounded_by_bytes_stops_after_the_entry_that_reaches_the_bound() {
        let (_d, m) = mailboxes(100, 10_000);
        let a = AccountId([1; 16]);
        for _ in 0..5 {
            m.append(&a, &[0u8; 100], 0).expect("append");
        }
        assert_eq!(m.scan_bytes(&a, 0, 10, 250, 1).expect("scan").len(), 3);
        assert_eq!(m.scan_bytes(&a, 0, 10, 1, 1).expect("scan").len(), 1, "at least one entry");
        assert_eq!(m.scan_bytes(&a, 0, 2, 10_000, 1).expect("scan").len(), 2, "the count still applies");
    }

    #[test]
    fn scan_is_ordered_and_isolated_per_recipient() {
        let (_d, m) = mailboxes(100, 10_000);
        let (a, b) = (AccountId([1; 16]), AccountId([2; 16]));
        let e1 = m.append(&a, b"one", 0).expect("append");
        m.append(&b, b"other", 0).expect("append");
        let e2 = m.append(&a, b"two", 0).expect("append");
        let got = m.scan(&a, 0, 10, 1).expect("scan");
        assert_eq!(got.iter().map(|e| &e.envelope[..]).collect::<Vec<_>>(), vec![&b"one"[..], b"two"]);
        assert_eq!(m.scan(&a, e1.id, 10, 1).expect("scan").len(), 1);
        // b cannot remove a's entries by id.
        assert_eq!(m.remove(&b, &[e1.id, e2.id]).expect("remove"), 0);
        assert_eq!(m.remove(&a, &[e1.id, e2.id, 999]).expect("remove"), 2);
        assert_eq!(m.depth(&a).expect("depth"), 0);
        assert_eq!(m.depth(&b).expect("depth"), 1);
    }

    #[test]
    fn quota_by_messages_and_bytes_and_release_on_remove() {
        let (_d, m) = mailboxes(2, 10);
        let a = AccountId([1; 16]);
        let e = m.append(&a, b"12345", 0).expect("append");
        assert!(matches!(m.append(&a, b"123456", 0), Err(MailboxError::QuotaExceeded { bytes: 5, .. })));
        m.append(&a, b"1", 0).expect("append");
        assert!(matches!(m.append(&a, b"1", 0), Err(MailboxError::QuotaExceeded { messages: 2, .. })));
        m.remove(&a, &[e.id]).expect("remove");
        m.append(&a, b"1", 0).expect("room again after removal");
    }

    #[test]
    fn expired_entries_are_hidden_then_swept() {
        let (_d, m) = mailboxes(10, 1000);
        let a = AccountId([1; 16]);
        m.append(&a, b"old", 0).expect("append");
        m.append(&a, b"new", 5000).expect("append");
        assert_eq!(m.scan(&a, 0, 10, 2000).expect("scan").len(), 1);
        assert_eq!(m.sweep_expired(2000).expect("sweep"), 1);
        assert_eq!(m.depth(&a).expect("depth"), 1);
    }

    /// A reader that follows a mailbox with a cursor (as a delivery stream does) must see every entry: an entry
    /// must never become visible after an entry with a higher id for the same recipient.
    #[test]
    fn cursor_readers_miss_nothing_under_concurrent_appends() {
        let (_d, m) = mailboxes(1_000_000, 1 << 40);
        let m = std::sync::Arc::new(m);
        let a = AccountId([1; 16]);
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..3000 {
                        m.append(&a, b"x", 0).expect("append");
                    }
                })
            })
            .collect();
        let (mut cursor, mut seen) = (0, 0usize);
        while seen < 12_000 {
            for e in m.scan(&a, cursor, 1000, 0).expect("scan") {
                cursor = e.id;
                seen += 1;
            }
            if writers.iter().all(|w| w.is_finished()) && m.scan(&a, cursor, 1, 0).expect("scan").is_empty() {
                break;
            }
        }
        for w in writers {
            w.join().expect("writer");
        }
        assert_eq!(seen, 12_000, "a cursor reader skipped entries that were inserted out of id order");
    }

    #[test]
    fn usage_is_reloaded_from_the_tree() {
        let (_d, m) = mailboxes(2, 1000);
        let a = AccountId([1; 16]);
        m.append(&a, b"x", 0).expect("append");
        m.append(&a, b"y", 0).expect("append");
        let fresh = Mailboxes::new(m.tree.clone(), m.ids.clone(), m.limits);
        assert!(matches!(fresh.append(&a, b"z", 0), Err(MailboxError::QuotaExceeded { .. })));
    }
}
