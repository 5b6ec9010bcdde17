//! The withdrawal fence's export leases in one stream, [`layout::FENCE_STREAM`]: one message per lease on the
//! subject of its consent pair, `fence.<pair key>`, so that a lease taken through one relay node holds up a
//! withdrawal acknowledged through any other.
//!
//! Contract:
//! - A pair is named only by a [`ClaimKey`] (a SHA-256 of the pair the caller encodes): no account id, purpose or
//!   affiliate appears in a subject, and so none in the server's logs or listings.
//! - [`Fence::take`] publishes one message, with a per-message TTL (`Nats-TTL`, whole seconds), on the pair's
//!   subject and returns its stream sequence once a quorum acknowledged it: the lease's id. Several leases of one
//!   pair are several messages of one subject. Ids are unique and never reused, through any node, across restarts
//!   and leader changes, because JetStream never reuses a stream's sequences (the stream is never deleted by the
//!   relay).
//! - Expiry is the server's: the stream removes a lease's message when its TTL has run out (no marker is left; the
//!   stream keeps none), so no relay node's clock is compared with another machine's (the NATS servers' clocks
//!   must agree: after a change of leader, the new leader counts the TTL from the old one's time stamp). A holder
//!   computes its deadline from just before it published, and the server counts the TTL from when it stored the
//!   message, which is later: the server never drops a lease before the holder's deadline.
//! - [`Fence::release`] deletes the lease's message, only if it is on the pair's subject (an id of another pair is
//!   left in place); an id already gone (released or lapsed) is not an error.
//! - [`Fence::held`] asks the stream leader whether the pair's subject holds any message, that is any lease not
//!   released and not lapsed, taken through any node.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind, RawMessageErrorKind, StorageType, Stream};
use async_nats::jetstream::{self, ErrorCode};
use bytes::Bytes;

use crate::StoreError;
use crate::cas::ClaimKey;
use crate::error::jetstream_error;
use crate::layout::{self, Layout};

/// The fence's lease stream.
#[derive(Clone)]
pub struct Fence {
    js: jetstream::Context,
    stream: Stream<()>,
}

/// The TTL as the server's `Nats-TTL` header: whole seconds, rounded up, at least one (a longer lease is safe: it
/// only holds a withdrawal longer, never shorter).
pub fn ttl_header(ttl: Duration) -> String {
    let secs = ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0)).max(1);
    format!("{secs}s")
}

/// The configuration of the fence stream under `layout`: file storage, the layout's replicas, per-message TTLs and
/// no other limit (a lease leaves when released or lapsed, never to make room).
pub fn stream_config(layout: &Layout) -> stream::Config {
    stream::Config {
        name: layout::FENCE_STREAM.into(),
        subjects: vec![layout::FENCE_SUBJECTS.into()],
        storage: StorageType::File,
        num_replicas: layout.replicas,
        allow_message_ttl: true,
        ..Default::default()
    }
}

impl Fence {
    /// Creates the fence stream, or brings an existing one to `layout`'s replicas.
    pub async fn open(js: jetstream::Context, layout: &Layout) -> Result<Self, StoreError> {
        layout.check()?;
        js.create_or_update_stream(stream_config(layout))
            .await
            .map_err(StoreError::engine("creating the fence stream"))?;
        let stream = js
            .get_stream_no_info(layout::FENCE_STREAM)
            .await
            .map_err(StoreError::engine("opening the fence stream"))?;
        Ok(Self { js, stream })
    }

    /// Takes a lease on `pair` for `ttl` (rounded up to whole seconds); its id.
    pub async fn take(&self, pair: &ClaimKey, ttl: Duration) -> Result<u64, StoreError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_TTL, ttl_header(ttl).as_str());
        let ack = self
            .js
            .publish_with_headers(layout::fence_subject(pair), headers, Bytes::new())
            .await
            .map_err(StoreError::engine("taking a lease"))?
            .await
            .map_err(StoreError::engine("awaiting a lease acknowledgement"))?;
        Ok(ack.sequence)
    }

    /// Releases lease `id` of `pair`; whether it was still there.
    pub async fn release(&self, pair: &ClaimKey, id: u64) -> Result<bool, StoreError> {
        match self.stream.get_raw_message(id).await {
            Ok(m) if m.subject.as_str() == layout::fence_subject(pair) => {}
            Ok(_) => return Err(StoreError::Invalid(format!("lease {id} is not a lease of this pair"))),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(false),
            Err(e) => return Err(StoreError::engine("reading a lease")(e)),
        }
        match self.stream.delete_message(id).await {
            Ok(_) => Ok(true),
            Err(e) if jetstream_error(&e).is_some_and(|j| j.error_code() == ErrorCode::NO_MESSAGE_FOUND) => Ok(false),
            Err(e) => Err(StoreError::engine("releasing a lease")(e)),
        }
    }

    /// Whether `pair` has a lease neither released nor lapsed, as the stream leader has it.
    pub async fn held(&self, pair: &ClaimKey) -> Result<bool, StoreError> {
        match self.stream.get_last_raw_message_by_subject(&layout::fence_subject(pair)).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(StoreError::engine("looking for leases")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_rounded_up_to_whole_seconds() {
        assert_eq!(ttl_header(Duration::from_secs(30)), "30s");
        assert_eq!(ttl_header(Duration::from_millis(1500)), "2s");
        assert_eq!(ttl_header(Duration::from_millis(200)), "1s");
        assert_eq!(ttl_header(Duration::ZERO), "1s");
    }

    #[test]
    fn the_stream_keeps_leases_until_released_or_lapsed() {
        let config = stream_config(&Layout::default());
        assert!(config.allow_message_ttl);
        assert_eq!(config.subject_delete_marker_ttl, None, "no marker may look like a lease");
        assert_eq!(config.num_replicas, 3);
        assert_eq!(config.storage, StorageType::File);
    }
}
