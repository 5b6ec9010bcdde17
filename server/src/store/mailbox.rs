//! Per-recipient mailboxes of opaque envelopes in sled: the embedded [`MailboxStore`].
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

use super::backend::{BackendError, BoxFuture, MailboxStore};

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
    Store(#[from] BackendError),
}

impl From<sled::Error> for MailboxError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.into())
    }
}

/// Entries a sweep walks between two yields to the runtime.
const SWEEP_YIELD_EVERY: usize = 1024;

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    messages: u64,
    bytes: u64,
}

/// All mailboxes, in one sled tree.
pub struct SledMailboxes {
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

impl SledMailboxes {
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
    fn append_now(&self, recipient: &AccountId, envelope: &[u8], now_ms: u64) -> Result<Appended, MailboxError> {
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

    fn scan_now(
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

    fn remove_now(&self, recipient: &AccountId, ids: &[u64]) -> Result<u32, sled::Error> {
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

    fn purge_now(&self, recipient: &AccountId) -> Result<u64, sled::Error> {
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

    async fn sweep_now(&self, now_ms: u64) -> Result<u64, sled::Error> {
        let mut removed = 0;
        for (walked, item) in self.tree.iter().enumerate() {
            if walked % SWEEP_YIELD_EVERY == SWEEP_YIELD_EVERY - 1 {
                tokio::task::yield_now().await;
            }
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

    fn depth_now(&self, recipient: &AccountId) -> Result<u64, sled::Error> {
        if let Some(u) = self.shard(recipient).get(recipient) {
            return Ok(u.messages);
        }
        Ok(self.load_usage(recipient)?.messages)
    }
}

impl MailboxStore for SledMailboxes {
    /// The recipient's shard lock is held from the quota check through id generation to the insert, so entries of
    /// one mailbox become visible in id order. The entry is not yet durable: await the group commit.
    fn append<'a>(
        &'a self,
        recipient: &'a AccountId,
        envelope: &'a [u8],
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Appended, MailboxError>> {
        Box::pin(std::future::ready(self.append_now(recipient, envelope, now_ms)))
    }

    fn scan<'a>(
        &'a self,
        recipient: &'a AccountId,
        after: u64,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEnvelope>, MailboxError>> {
        Box::pin(std::future::ready(self.scan_now(recipient, after, limit, max_bytes, now_ms).map_err(Into::into)))
    }

    fn remove<'a>(&'a self, recipient: &'a AccountId, ids: &'a [u64]) -> BoxFuture<'a, Result<u32, MailboxError>> {
        Box::pin(std::future::ready(self.remove_now(recipient, ids).map_err(Into::into)))
    }

    fn purge<'a>(&'a self, recipient: &'a AccountId) -> BoxFuture<'a, Result<u64, MailboxError>> {
        Box::pin(std::future::ready(self.purge_now(recipient).map_err(Into::into)))
    }

    fn sweep_expired(&self, now_ms: u64) -> BoxFuture<'_, Result<u64, MailboxError>> {
        Box::pin(async move { self.sweep_now(now_ms).await.map_err(Into::into) })
    }

    fn depth<'a>(&'a self, recipient: &'a AccountId) -> BoxFuture<'a, Result<u64, MailboxError>> {
        Box::pin(std::future::ready(self.depth_now(recipient).map_err(Into::into)))
    }

    fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::mailboxes as suite;

    /// Hands out mailbox stores over one tree: each call is the store a restarted relay would open.
    struct Sled {
        _dir: tempfile::TempDir,
        db: sled::Db,
        tree: sled::Tree,
    }

    impl Sled {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = sled::Config::new().path(dir.path()).temporary(true).open().expect("open");
            let tree = db.open_tree("m").expect("tree");
            Self { _dir: dir, db, tree }
        }
    }

    impl suite::Fixture for Sled {
        fn open(&self, limits: MailboxLimits) -> std::sync::Arc<dyn MailboxStore> {
            std::sync::Arc::new(SledMailboxes::new(self.tree.clone(), self.db.clone(), limits))
        }
    }

    #[tokio::test]
    async fn conformance() {
        suite::run_all(&Sled::new).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance_cursor_readers_under_concurrent_appends() {
        suite::cursor_readers_miss_nothing_under_concurrent_appends(&Sled::new()).await;
    }
}
