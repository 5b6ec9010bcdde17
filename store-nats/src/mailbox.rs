//! Mailboxes in K streams sharded by account: stream `MBOX-<k>` holds subjects `mbox.<k>.<account hex>`, one
//! subject per recipient.
//!
//! Contract:
//! - Streams use file storage, [`Layout::replicas`] replicas, `max_msgs_per_subject` = the mailbox quota,
//!   `max_age` = the TTL, `max_msg_size` = the envelope limit, and discard-new-per-subject: an append to a full
//!   mailbox is refused ([`StoreError::MailboxFull`]) and nothing already stored is dropped to make room.
//! - [`Mailboxes::append`] returns only after JetStream's publish acknowledgement; the stream sequence it returns
//!   is the message's server id: unique in its shard, increasing, never reused.
//! - [`Mailboxes::scan`] reads one account's messages above a cursor, in sequence order, from the stream leader
//!   (a message get by subject, "the first message on this subject at or after sequence n": no consumer or other
//!   server-side state is created for a scan, and the leader has every acknowledged message, which a follower
//!   answering a direct get might not yet have).
//! - [`Mailboxes::remove`] deletes a message only if it is in the caller's mailbox: a sequence from another
//!   mailbox is refused ([`StoreError::NotInMailbox`]) and left in place. Deletion erases the message's bytes.
//! - The account is always the caller's argument (the authenticated account): no function here takes a mailbox
//!   from message contents. The exceptions are shard-wide and say so: [`Mailboxes::scan_shard`] and
//!   [`Mailboxes::expire`] (the expiry sweep, which has no recipient) and [`Mailboxes::queued`] (a count).
//! - [`Mailboxes::purge`] removes a whole mailbox with one purge by subject (the account is erased);
//!   [`Mailboxes::depth`] is the per-subject message count the stream leader reports.

use bytes::Bytes;
use futures_util::TryStreamExt;
use relay_proto::AccountId;

use async_nats::jetstream::stream::{self, DiscardPolicy, RawMessageErrorKind, StorageType, Stream};
use async_nats::jetstream::{self, ErrorCode};

use crate::StoreError;
use crate::error::jetstream_error;
use crate::layout::{Layout, Shard, mailbox_account, mailbox_subject};

/// The server's error code when a subject holds `max_msgs_per_subject` messages and the stream discards new ones.
const MAX_MSGS_PER_SUBJECT: ErrorCode = ErrorCode(10077);

/// One stored mailbox message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its stream sequence: the server id, the cursor to scan above, the id to remove.
    pub seq: u64,
    /// When the stream stored it, in milliseconds since the Unix epoch (the server's clock).
    pub stored_at_ms: u64,
    /// The envelope, as appended.
    pub envelope: Bytes,
}

/// The K mailbox streams.
#[derive(Clone)]
pub struct Mailboxes {
    js: jetstream::Context,
    layout: Layout,
    streams: Vec<Stream<()>>,
}

/// The configuration of shard `shard`'s stream under `layout`.
pub fn stream_config(layout: &Layout, shard: Shard) -> stream::Config {
    stream::Config {
        name: shard.mailbox_stream(),
        subjects: vec![shard.mailbox_subjects()],
        storage: StorageType::File,
        num_replicas: layout.replicas,
        max_messages_per_subject: i64::from(layout.mailbox_quota),
        discard: DiscardPolicy::New,
        discard_new_per_subject: true,
        max_age: layout.mailbox_ttl,
        max_message_size: i32::try_from(layout.max_envelope_bytes).unwrap_or(i32::MAX),
        ..Default::default()
    }
}

impl Mailboxes {
    /// Creates the K streams, or brings existing ones to `layout`'s limits.
    pub async fn open(js: jetstream::Context, layout: Layout) -> Result<Self, StoreError> {
        layout.check()?;
        let mut streams = Vec::with_capacity(layout.shards as usize);
        for shard in layout.shards() {
            js.create_or_update_stream(stream_config(&layout, shard))
                .await
                .map_err(StoreError::engine("creating a mailbox stream"))?;
            let stream = js
                .get_stream_no_info(shard.mailbox_stream())
                .await
                .map_err(StoreError::engine("opening a mailbox stream"))?;
            streams.push(stream);
        }
        Ok(Self { js, layout, streams })
    }

    /// The layout the streams were made with.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn locate(&self, account: &AccountId) -> (&Stream<()>, String) {
        let shard = self.layout.shard_of(account);
        (&self.streams[shard.0 as usize], mailbox_subject(shard, account))
    }

    /// Appends `envelope` to `to`'s mailbox and waits for JetStream's acknowledgement; its sequence.
    pub async fn append(&self, to: &AccountId, envelope: Bytes) -> Result<u64, StoreError> {
        let (_, subject) = self.locate(to);
        let ack = self.js.publish(subject, envelope).await.map_err(StoreError::engine("publishing to a mailbox"))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if jetstream_error(&e).is_some_and(|j| j.error_code() == MAX_MSGS_PER_SUBJECT) => {
                Err(StoreError::MailboxFull)
            }
            Err(e) => Err(StoreError::engine("awaiting a mailbox acknowledgement")(e)),
        }
    }

    /// Up to `max` of `account`'s messages with a sequence above `after`, in sequence order.
    pub async fn scan(&self, account: &AccountId, after: u64, max: usize) -> Result<Vec<Stored>, StoreError> {
        let (stream, subject) = self.locate(account);
        let mut found = Vec::new();
        let mut next = after.saturating_add(1);
        while found.len() < max {
            match stream.get_first_raw_message_by_subject(&subject, next).await {
                Ok(m) => {
                    next = m.sequence.saturating_add(1);
                    let stored_at_ms = u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                    found.push(Stored { seq: m.sequence, stored_at_ms, envelope: m.payload });
                }
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(StoreError::engine("scanning a mailbox")(e)),
            }
        }
        Ok(found)
    }

    /// Removes message `seq` from `account`'s mailbox: `true` if it was there, `false` if it is gone already
    /// (removed, or expired); [`StoreError::NotInMailbox`] if it is another mailbox's.
    pub async fn remove(&self, account: &AccountId, seq: u64) -> Result<bool, StoreError> {
        let (stream, subject) = self.locate(account);
        // Sequences are never reused, so what this get sees at `seq` is what the delete below removes.
        match stream.get_raw_message(seq).await {
            Ok(m) if m.subject.as_str() == subject => {}
            Ok(_) => return Err(StoreError::NotInMailbox { seq }),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(false),
            Err(e) => return Err(StoreError::engine("reading a mailbox message")(e)),
        }
        match stream.delete_message(seq).await {
            Ok(_) => Ok(true),
            Err(e) if jetstream_error(&e).is_some_and(|j| j.error_code() == ErrorCode::NO_MESSAGE_FOUND) => Ok(false),
            Err(e) => Err(StoreError::engine("removing a mailbox message")(e)),
        }
    }

    /// Removes every message of `account`'s mailbox with one purge by subject; how many.
    pub async fn purge(&self, account: &AccountId) -> Result<u64, StoreError> {
        let (stream, subject) = self.locate(account);
        let purged = stream.purge().filter(subject).await.map_err(StoreError::engine("purging a mailbox"))?;
        Ok(purged.purged)
    }

    /// How many messages `account`'s mailbox holds, as the stream leader counts them.
    pub async fn depth(&self, account: &AccountId) -> Result<u64, StoreError> {
        let (stream, subject) = self.locate(account);
        let mut subjects =
            stream.info_with_subjects(&subject).await.map_err(StoreError::engine("counting a mailbox"))?;
        let mut depth = 0;
        while let Some((name, count)) = subjects.try_next().await.map_err(StoreError::engine("counting a mailbox"))? {
            if name == subject {
                depth = count as u64;
            }
        }
        Ok(depth)
    }

    /// How many messages all the mailbox streams hold.
    pub async fn queued(&self) -> Result<u64, StoreError> {
        let mut total = 0u64;
        for stream in &self.streams {
            let info = stream.get_info().await.map_err(StoreError::engine("reading a mailbox stream's state"))?;
            total = total.saturating_add(info.state.messages);
        }
        Ok(total)
    }

    /// Up to `max` messages of any mailbox of `shard` with a sequence above `after`, in sequence order, each with
    /// its mailbox's account: what an expiry sweep walks. A subject that is not a mailbox's is reported
    /// ([`StoreError::Corrupt`]), not skipped.
    pub async fn scan_shard(
        &self,
        shard: Shard,
        after: u64,
        max: usize,
    ) -> Result<Vec<(AccountId, Stored)>, StoreError> {
        let stream = self.streams.get(shard.0 as usize).ok_or_else(|| StoreError::Invalid("no such shard".into()))?;
        let subjects = shard.mailbox_subjects();
        let mut found = Vec::new();
        let mut next = after.saturating_add(1);
        while found.len() < max {
            match stream.get_first_raw_message_by_subject(&subjects, next).await {
                Ok(m) => {
                    next = m.sequence.saturating_add(1);
                    let account = mailbox_account(shard, m.subject.as_str()).ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "message {} of {} is on a foreign subject",
                            m.sequence,
                            shard.mailbox_stream()
                        ))
                    })?;
                    let stored_at_ms = u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                    found.push((account, Stored { seq: m.sequence, stored_at_ms, envelope: m.payload }));
                }
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(StoreError::engine("walking a mailbox shard")(e)),
            }
        }
        Ok(found)
    }

    /// Removes message `seq` of `shard` whatever its mailbox (the expiry sweep's removal; everything else removes
    /// through [`Mailboxes::remove`]): `true` if it was there. Deletion erases the message's bytes.
    pub async fn expire(&self, shard: Shard, seq: u64) -> Result<bool, StoreError> {
        let stream = self.streams.get(shard.0 as usize).ok_or_else(|| StoreError::Invalid("no such shard".into()))?;
        match stream.delete_message(seq).await {
            Ok(_) => Ok(true),
            Err(e) if jetstream_error(&e).is_some_and(|j| j.error_code() == ErrorCode::NO_MESSAGE_FOUND) => Ok(false),
            Err(e) => Err(StoreError::engine("removing an expired mailbox message")(e)),
        }
    }
}
