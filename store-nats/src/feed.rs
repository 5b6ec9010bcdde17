//! The consent statement stream, [`layout::FEED_STREAM`]: every account's statements in one stream, so that its
//! sequence orders them all and is the exporter's feed cursor.
//!
//! Contract:
//! - One subject per account (`consent.<account hex>`), file storage, [`Layout::replicas`] replicas, no age or
//!   count limit, and deletes and purges denied by the stream itself: the feed only grows, and a statement once
//!   acknowledged keeps its sequence.
//! - [`Feed::append`] returns the statement's sequence only after JetStream's acknowledgement.
//! - [`Feed::read`] returns statements above a cursor in sequence order, read from the stream leader; an entry whose
//!   subject is not an account's is reported as [`StoreError::Corrupt`], not skipped.
//!
//! [`layout::FEED_STREAM`]: crate::layout::FEED_STREAM

use async_nats::jetstream;
use async_nats::jetstream::stream::{self, RawMessageErrorKind, StorageType, Stream};
use bytes::Bytes;
use relay_proto::AccountId;

use crate::StoreError;
use crate::layout::{self, Layout, feed_subject};

/// One statement in the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEntry {
    /// Its sequence: the cursor after reading it.
    pub seq: u64,
    /// Whose statement it is.
    pub account: AccountId,
    /// The statement, as appended.
    pub statement: Bytes,
}

/// The configuration of the feed stream under `layout`.
pub fn stream_config(layout: &Layout) -> stream::Config {
    stream::Config {
        name: layout::FEED_STREAM.into(),
        subjects: vec![layout::FEED_SUBJECTS.into()],
        storage: StorageType::File,
        num_replicas: layout.replicas,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    }
}

/// The consent feed.
#[derive(Clone)]
pub struct Feed {
    js: jetstream::Context,
    stream: Stream<()>,
}

impl Feed {
    /// Creates the stream, or brings an existing one to `layout`'s replicas.
    pub async fn open(js: jetstream::Context, layout: &Layout) -> Result<Self, StoreError> {
        layout.check()?;
        js.create_or_update_stream(stream_config(layout)).await.map_err(StoreError::engine("creating the feed"))?;
        let stream =
            js.get_stream_no_info(layout::FEED_STREAM).await.map_err(StoreError::engine("opening the feed"))?;
        Ok(Self { js, stream })
    }

    /// Appends `account`'s `statement`; its sequence, once acknowledged.
    pub async fn append(&self, account: &AccountId, statement: Bytes) -> Result<u64, StoreError> {
        let ack = self.js.publish(feed_subject(account), statement).await.map_err(StoreError::engine("appending"))?;
        Ok(ack.await.map_err(StoreError::engine("awaiting a feed acknowledgement"))?.sequence)
    }

    /// Up to `max` statements with a sequence above `cursor`, in sequence order.
    pub async fn read(&self, cursor: u64, max: usize) -> Result<Vec<FeedEntry>, StoreError> {
        let mut found = Vec::new();
        let mut next = cursor.saturating_add(1);
        while found.len() < max {
            match self.stream.get_first_raw_message_by_subject(layout::FEED_SUBJECTS, next).await {
                Ok(m) => {
                    next = m.sequence.saturating_add(1);
                    let account = m
                        .subject
                        .as_str()
                        .strip_prefix("consent.")
                        .and_then(AccountId::from_hex)
                        .ok_or_else(|| StoreError::Corrupt(format!("feed entry {} has no account", m.sequence)))?;
                    found.push(FeedEntry { seq: m.sequence, account, statement: m.payload });
                }
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(StoreError::engine("reading the feed")(e)),
            }
        }
        Ok(found)
    }
}
