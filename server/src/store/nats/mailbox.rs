//! Mailboxes in JetStream: the [`MailboxStore`] over [`relay_store_nats::mailbox::Mailboxes`] (stream `MBOX-<k>`
//! per shard, subject `mbox.<k>.<account>` per recipient), so that several relay nodes share the mailboxes.
//!
//! Contract (on top of [`MailboxStore`]'s):
//! - **Durable on return**: an append returns only after JetStream's publish acknowledgement (quorum of the R3
//!   stream), a removal or purge after the leader applied it; the backend's barrier is
//!   [`super::JetStreamDurability`].
//! - **Ids**: `sequence × K + k` (see `ids`): unique across shards, increasing within a mailbox, never reused
//!   (JetStream does not reuse a stream's sequences, after deletions, purges or a change of leader).
//! - **Times**: each message is the envelope behind a 16-byte stamp (`stored_at_ms ‖ expires_at_ms`, the relay's
//!   `now_ms` and `now_ms + ttl`; see `stamp`), so expiry follows the relay's clock exactly as in the sled backend:
//!   a scan skips entries expired at its `now_ms`, [`MailboxStore::sweep_expired`] removes them. The stream's own
//!   `max_age` (the layout's `mailbox_ttl`, which must be at least the relay's TTL) is a server-side backstop on
//!   the server's clock: it removes what no sweep did, never anything before the relay's TTL.
//! - **Quota**: the message quota is exact and cluster-wide (the stream's `max_msgs_per_subject` with
//!   discard-new-per-subject, decided by the stream leader whatever node appends). The byte quota is **not**
//!   enforced: JetStream has no per-subject byte limit; a mailbox's bytes are bounded by the message quota times
//!   the envelope limit (the stream's `max_msg_size`). A refusal reports `messages = max_messages, bytes = 0`
//!   (bytes are not counted).
//! - **`depth`** is the stream leader's count of the mailbox's subject (expired entries not yet swept included, as
//!   in sled). **`queued`** is a cached figure: the streams' message counts read at open and after each sweep,
//!   adjusted by this node's own appends and removals in between (others' are seen at the next sweep).
//! - **`purge`** is one JetStream purge of the account's subject. Unlike a removal, which erases the message's
//!   bytes, a purge drops the messages from the stream; the file store reclaims their space as it compacts.
//! - **`sweep_expired`** walks each shard from its first message in sequence order and stops at the first entry
//!   that expires more than [`SWEEP_CLOCK_SKEW_MS`] after `now_ms`: entries are appended in sequence order with
//!   the same TTL, so later ones expire later, up to the skew between relay nodes' clocks. What a clock stepping
//!   backwards hides from the sweep, scans still hide and the stream's `max_age` removes.
//! - A stored message without a stamp is reported as damage ([`MailboxError::Store`]), never skipped.

use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream;
use relay_proto::AccountId;
use relay_store_nats::mailbox::Mailboxes;
use relay_store_nats::{Layout, Shard, StoreError};

use super::ids::ServerIds;
use super::stamp::{STAMP_LEN, Stamp};
use crate::store::backend::{BackendError, BoxFuture, MailboxStore};
use crate::store::mailbox::{Appended, MailboxError, MailboxLimits, StoredEnvelope};

/// How much later than `now_ms` an entry may expire and the sweep still walk past it: the clock skew between relay
/// nodes the sweep tolerates.
pub const SWEEP_CLOCK_SKEW_MS: u64 = 60_000;
/// Messages read per request batch of the sweep's walk.
const SWEEP_BATCH: usize = 32;

/// The mailboxes in JetStream.
pub struct NatsMailboxes {
    boxes: Mailboxes,
    limits: MailboxLimits,
    ids: ServerIds,
    queued: AtomicU64,
}

fn backend(e: StoreError) -> MailboxError {
    MailboxError::Store(BackendError(format!("jetstream: {e}")))
}

fn damaged(shard: Shard, seq: u64) -> MailboxError {
    MailboxError::Store(BackendError(format!("mailbox message {seq} of {} has no stamp", shard.mailbox_stream())))
}

/// The layout the streams are made with: `layout` with the quota of `limits` as `max_msgs_per_subject` and room
/// for the stamp in `max_msg_size`; refused if the stream's `max_age` would remove entries before the relay's TTL.
pub fn stream_layout(layout: &Layout, limits: &MailboxLimits) -> Result<Layout, StoreError> {
    let bad = |m: &str| Err(StoreError::Layout(m.into()));
    if layout.mailbox_ttl.as_millis() < u128::from(limits.ttl_ms) {
        return bad("mailbox_ttl (the stream's max_age) must be at least the relay's message TTL");
    }
    let Ok(quota) = u32::try_from(limits.max_messages) else {
        return bad("the mailbox message quota must fit JetStream's per-subject limit (at most 2^32 - 1)");
    };
    let Some(max_envelope_bytes) = u32::try_from(STAMP_LEN).ok().and_then(|s| layout.max_envelope_bytes.checked_add(s))
    else {
        return bad("max_envelope_bytes too large");
    };
    let streams = Layout { mailbox_quota: quota, max_envelope_bytes, ..layout.clone() };
    streams.check()?;
    Ok(streams)
}

impl NatsMailboxes {
    /// Creates the mailbox streams of `layout` (or brings existing ones to it) with `limits`' quota and TTL; see
    /// [`stream_layout`] for the limits each stream gets.
    pub async fn open(js: jetstream::Context, layout: &Layout, limits: MailboxLimits) -> Result<Self, StoreError> {
        let streams = stream_layout(layout, &limits)?;
        let ids = ServerIds::new(streams.shards);
        let boxes = Mailboxes::open(js, streams).await?;
        let queued = AtomicU64::new(boxes.queued().await?);
        Ok(Self { boxes, limits, ids, queued })
    }

    fn less_queued(&self, n: u64) {
        // Saturating: the cached figure may already have been refreshed below what this node removed.
        let _ = self.queued.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| Some(q.saturating_sub(n)));
    }

    async fn append_now(&self, recipient: &AccountId, envelope: &[u8], now_ms: u64) -> Result<Appended, MailboxError> {
        let stamp = Stamp { stored_at_ms: now_ms, expires_at_ms: now_ms.saturating_add(self.limits.ttl_ms) };
        let shard = self.boxes.layout().shard_of(recipient);
        let seq = match self.boxes.append(recipient, stamp.frame(envelope)).await {
            Ok(seq) => seq,
            Err(StoreError::MailboxFull) => {
                return Err(MailboxError::QuotaExceeded {
                    messages: self.limits.max_messages,
                    bytes: 0,
                    max_messages: self.limits.max_messages,
                    max_bytes: self.limits.max_bytes,
                });
            }
            Err(e) => return Err(backend(e)),
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        let id = self
            .ids
            .id(shard, seq)
            .ok_or_else(|| MailboxError::Store(BackendError(format!("sequence {seq} is past the id space"))))?;
        Ok(Appended { id, stored_at_ms: now_ms })
    }

    async fn scan_now(
        &self,
        recipient: &AccountId,
        after: u64,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredEnvelope>, MailboxError> {
        let shard = self.boxes.layout().shard_of(recipient);
        let mut cursor = self.ids.cursor(shard, after);
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        // One message per request (the store's scan reads one per request anyway): nothing is read past the
        // count or byte bound.
        while out.len() < limit && bytes < max_bytes {
            let Some(m) = self.boxes.scan(recipient, cursor, 1).await.map_err(backend)?.pop() else { break };
            cursor = m.seq;
            let (stamp, envelope) = Stamp::split(&m.envelope).ok_or_else(|| damaged(shard, m.seq))?;
            if stamp.expires_at_ms <= now_ms {
                continue;
            }
            let id = self.ids.id(shard, m.seq).ok_or_else(|| damaged(shard, m.seq))?;
            bytes = bytes.saturating_add(envelope.len());
            out.push(StoredEnvelope {
                id,
                stored_at_ms: stamp.stored_at_ms,
                expires_at_ms: stamp.expires_at_ms,
                envelope,
            });
        }
        Ok(out)
    }

    async fn remove_now(&self, recipient: &AccountId, ids: &[u64]) -> Result<u32, MailboxError> {
        let shard = self.boxes.layout().shard_of(recipient);
        let mut removed = 0u32;
        for id in ids {
            let (of, seq) = self.ids.split(*id);
            if of != shard || seq == 0 {
                continue; // not an id of this mailbox's shard: not there
            }
            match self.boxes.remove(recipient, seq).await {
                Ok(true) => removed += 1,
                // Gone already, or another mailbox's: ignored, as the trait says.
                Ok(false) | Err(StoreError::NotInMailbox { .. }) => {}
                Err(e) => {
                    self.less_queued(u64::from(removed));
                    return Err(backend(e));
                }
            }
        }
        self.less_queued(u64::from(removed));
        Ok(removed)
    }

    async fn sweep_now(&self, now_ms: u64) -> Result<u64, MailboxError> {
        let horizon = now_ms.saturating_add(SWEEP_CLOCK_SKEW_MS);
        let mut removed = 0u64;
        for shard in self.boxes.layout().shards() {
            let mut cursor = 0;
            'walk: loop {
                let batch = self.boxes.scan_shard(shard, cursor, SWEEP_BATCH).await.map_err(backend)?;
                if batch.is_empty() {
                    break;
                }
                for (_, m) in batch {
                    cursor = m.seq;
                    let (stamp, _) = Stamp::split(&m.envelope).ok_or_else(|| damaged(shard, m.seq))?;
                    if stamp.expires_at_ms > horizon {
                        break 'walk; // every later entry expires later still (see the module's contract)
                    }
                    if stamp.expires_at_ms <= now_ms && self.boxes.expire(shard, m.seq).await.map_err(backend)? {
                        removed += 1;
                    }
                }
            }
        }
        self.queued.store(self.boxes.queued().await.map_err(backend)?, Ordering::Relaxed);
        Ok(removed)
    }
}

impl MailboxStore for NatsMailboxes {
    fn append<'a>(
        &'a self,
        recipient: &'a AccountId,
        envelope: &'a [u8],
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Appended, MailboxError>> {
        Box::pin(self.append_now(recipient, envelope, now_ms))
    }

    fn scan<'a>(
        &'a self,
        recipient: &'a AccountId,
        after: u64,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEnvelope>, MailboxError>> {
        Box::pin(self.scan_now(recipient, after, limit, max_bytes, now_ms))
    }

    fn remove<'a>(&'a self, recipient: &'a AccountId, ids: &'a [u64]) -> BoxFuture<'a, Result<u32, MailboxError>> {
        Box::pin(self.remove_now(recipient, ids))
    }

    fn purge<'a>(&'a self, recipient: &'a AccountId) -> BoxFuture<'a, Result<u64, MailboxError>> {
        Box::pin(async move {
            let n = self.boxes.purge(recipient).await.map_err(backend)?;
            self.less_queued(n);
            Ok(n)
        })
    }

    fn sweep_expired(&self, now_ms: u64) -> BoxFuture<'_, Result<u64, MailboxError>> {
        Box::pin(self.sweep_now(now_ms))
    }

    fn depth<'a>(&'a self, recipient: &'a AccountId) -> BoxFuture<'a, Result<u64, MailboxError>> {
        Box::pin(async move { self.boxes.depth(recipient).await.map_err(backend) })
    }

    fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(ttl_ms: u64, max_messages: u64) -> MailboxLimits {
        MailboxLimits { max_messages, max_bytes: 1 << 20, ttl_ms }
    }

    #[test]
    fn the_streams_get_the_quota_room_for_the_stamp_and_a_backstop_no_shorter_than_the_ttl() {
        let layout = Layout { mailbox_ttl: Duration::from_secs(60), max_envelope_bytes: 1000, ..Layout::default() };
        let streams = stream_layout(&layout, &limits(60_000, 7)).expect("usable");
        assert_eq!((streams.mailbox_quota, streams.max_envelope_bytes), (7, 1016));
        assert_eq!((streams.shards, streams.replicas, streams.mailbox_ttl), (8, 3, Duration::from_secs(60)));
        for (ttl_ms, quota) in [(60_001, 7), (1000, u64::from(u32::MAX) + 1), (1000, 0)] {
            let refused = stream_layout(&layout, &limits(ttl_ms, quota));
            assert!(matches!(refused, Err(StoreError::Layout(_))), "ttl {ttl_ms}, quota {quota}: {refused:?}");
        }
    }
}
