//! Key-value buckets with compare-and-set, for state that must have one writer at a time: a phone number claimed by
//! one account ([`layout::CLAIMS_BUCKET`]), later the directory, prekeys and consent state.
//!
//! Contract:
//! - A bucket keeps the latest value of each key (history 1), in file storage with [`Layout::replicas`] replicas.
//! - [`CasBucket::create`] writes only if the key is absent (never written, or deleted): of concurrent creates of
//!   one key, through any nodes, exactly one succeeds and the others get [`StoreError::Exists`]. It is one JetStream
//!   publish conditioned on the subject's last sequence, so the stream leader decides, not a read before the write.
//! - [`CasBucket::update`] and [`CasBucket::delete`] write only if the key's revision is still the one the caller
//!   read; otherwise [`StoreError::RevisionChanged`] and nothing is written.
//! - [`CasBucket::entry`] reads from the bucket stream's leader, so it sees every acknowledged write.
//! - Keys are [`ClaimKey`]s or other strings of the engine's key alphabet; a claimed name (a phone number) is hashed
//!   into its key, so it never appears in a subject, a key listing or the server's logs.
//!
//! [`layout::CLAIMS_BUCKET`]: crate::layout::CLAIMS_BUCKET

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, StorageType, Stream};
use async_nats::jetstream::{self, ErrorCode, context::PublishError};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::StoreError;
use crate::error::jetstream_error;
use crate::layout::{self, Layout};

/// The header a KV delete or purge carries.
const KV_OPERATION: &str = "KV-Operation";
/// The header the server puts on the marker it leaves when a message's TTL removed it.
const MARKER_REASON: &str = "Nats-Marker-Reason";

/// The key of a claimed name: lowercase hex of SHA-256 over a label, the namespace and the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimKey(String);

impl ClaimKey {
    /// The key for `name` in `namespace` (e.g. `"phone"` and an E.164 number).
    pub fn hashed(namespace: &str, name: &[u8]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"consent-relay claim v1\0")
            .chain_update(namespace.as_bytes())
            .chain_update([0])
            .chain_update(name)
            .finalize();
        Self(hex::encode(digest))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key's current value and its revision (the bucket stream's sequence of the write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Bytes,
    /// The revision, for [`CasBucket::update`] and [`CasBucket::delete`].
    pub revision: u64,
}

/// The last write of a key, as the stream leader has it.
pub(crate) enum Last {
    /// Never written (or its last trace has expired).
    Absent,
    /// Deleted, purged or expired: the marker's revision.
    Gone(u64),
    /// A live value.
    Live(Entry),
}

/// Whether `key` is a valid bucket key: `[-/_=.a-zA-Z0-9]+`, not starting or ending with a dot.
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b));
    if ok { Ok(()) } else { Err(StoreError::Invalid(format!("not a bucket key: {key:?}"))) }
}

/// A key-value bucket written by compare-and-set.
#[derive(Clone)]
pub struct CasBucket {
    pub(crate) js: jetstream::Context,
    pub(crate) name: String,
    stream: Stream<()>,
}

impl CasBucket {
    /// The claims bucket ([`layout::CLAIMS_BUCKET`]).
    pub async fn claims(js: jetstream::Context, layout: &Layout) -> Result<Self, StoreError> {
        Self::open(js, layout::CLAIMS_BUCKET, layout, None).await
    }

    /// Bucket `name` (created if absent), for state other than claims (a relay node's verification codes, say).
    pub async fn named(js: jetstream::Context, name: &str, layout: &Layout) -> Result<Self, StoreError> {
        Self::open(js, name, layout, None).await
    }

    /// The keys under `prefix` (which ends with a dot) that hold a live value, as the bucket stream's leader has
    /// them: what a sweep walks.
    pub async fn live_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        use futures_util::TryStreamExt;

        let filter = format!("{}>", self.subject(prefix));
        let mut subjects =
            self.stream.info_with_subjects(&filter).await.map_err(StoreError::engine("listing bucket keys"))?;
        let strip = self.subject("");
        let mut keys = Vec::new();
        while let Some((subject, _)) = subjects.try_next().await.map_err(StoreError::engine("listing bucket keys"))? {
            if let Some(key) = subject.strip_prefix(&strip)
                && matches!(self.last(key).await?, Last::Live(_))
            {
                keys.push(key.to_owned());
            }
        }
        Ok(keys)
    }

    /// Creates bucket `name`, or brings an existing one to `layout`'s replicas; `ttl_markers` enables per-key TTLs
    /// (the server leaves a marker, kept that long, where a TTL removed a key).
    pub(crate) async fn open(
        js: jetstream::Context,
        name: &str,
        layout: &Layout,
        ttl_markers: Option<std::time::Duration>,
    ) -> Result<Self, StoreError> {
        layout.check()?;
        let config = kv::Config {
            bucket: name.into(),
            history: 1,
            storage: StorageType::File,
            num_replicas: layout.replicas,
            limit_markers: ttl_markers,
            ..Default::default()
        };
        js.create_or_update_key_value(config).await.map_err(StoreError::engine("creating a bucket"))?;
        let stream =
            js.get_stream_no_info(format!("KV_{name}")).await.map_err(StoreError::engine("opening a bucket"))?;
        Ok(Self { js, name: name.into(), stream })
    }

    pub(crate) fn subject(&self, key: &str) -> String {
        format!("$KV.{}.{key}", self.name)
    }

    /// The last write of `key`, read from the stream leader.
    pub(crate) async fn last(&self, key: &str) -> Result<Last, StoreError> {
        check_key(key)?;
        match self.stream.get_last_raw_message_by_subject(&self.subject(key)).await {
            Ok(m) => {
                let gone = m.headers.get(KV_OPERATION).is_some() || m.headers.get(MARKER_REASON).is_some();
                Ok(if gone {
                    Last::Gone(m.sequence)
                } else {
                    Last::Live(Entry { value: m.payload, revision: m.sequence })
                })
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(Last::Absent),
            Err(e) => Err(StoreError::engine("reading a bucket key")(e)),
        }
    }

    /// Publishes `value` (with `headers`) to `key` if its last revision is `expected` (0: never written); the new
    /// revision, or [`StoreError::RevisionChanged`].
    pub(crate) async fn write_if(
        &self,
        key: &str,
        mut headers: HeaderMap,
        value: Bytes,
        expected: u64,
    ) -> Result<u64, StoreError> {
        check_key(key)?;
        headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string().as_str());
        let ack = self
            .js
            .publish_with_headers(self.subject(key), headers, value)
            .await
            .map_err(StoreError::engine("writing a bucket key"))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if wrong_last_sequence(&e) => Err(StoreError::RevisionChanged { expected }),
            Err(e) => Err(StoreError::engine("awaiting a bucket acknowledgement")(e)),
        }
    }

    /// Writes `value` under `key` if the key is absent (never written, or deleted); its revision, or
    /// [`StoreError::Exists`].
    pub async fn create(&self, key: &str, value: Bytes) -> Result<u64, StoreError> {
        let expected = match self.last(key).await? {
            Last::Live(_) => return Err(StoreError::Exists),
            Last::Absent => 0,
            Last::Gone(revision) => revision,
        };
        match self.write_if(key, HeaderMap::new(), value, expected).await {
            // Another create (or any write) came first: the key is present now, or was just deleted again; either
            // way this create did not happen, and the caller may look and try again.
            Err(StoreError::RevisionChanged { .. }) => Err(StoreError::Exists),
            other => other,
        }
    }

    /// Replaces `key`'s value if its revision is still `revision`; the new revision.
    pub async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, StoreError> {
        self.write_if(key, HeaderMap::new(), value, revision).await
    }

    /// Deletes `key` if its revision is still `revision`.
    pub async fn delete(&self, key: &str, revision: u64) -> Result<(), StoreError> {
        let mut headers = HeaderMap::new();
        headers.insert(KV_OPERATION, "DEL");
        self.write_if(key, headers, Bytes::new(), revision).await.map(|_| ())
    }

    /// `key`'s current value and revision; `None` if absent or deleted.
    pub async fn entry(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(match self.last(key).await? {
            Last::Live(entry) => Some(entry),
            Last::Absent | Last::Gone(_) => None,
        })
    }
}

/// The server's code for "wrong last sequence" when the expected sequence is 0 or a constant (nats-server 2.12 and
/// later), beside the older 10071 that async-nats recognises itself.
const WRONG_LAST_SEQUENCE_CONSTANT: ErrorCode = ErrorCode(10164);

/// Whether a publish failed because the subject's last sequence was not the expected one.
fn wrong_last_sequence(e: &PublishError) -> bool {
    e.kind() == PublishErrorKind::WrongLastSequence
        || jetstream_error(e).is_some_and(|j| {
            [ErrorCode::STREAM_WRONG_LAST_SEQUENCE, WRONG_LAST_SEQUENCE_CONSTANT].contains(&j.error_code())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_keys_hash_the_name_and_are_valid_keys() {
        let key = ClaimKey::hashed("phone", b"+33612345678");
        assert_eq!(key.as_str().len(), 64);
        assert!(!key.as_str().contains("33612345678"));
        assert!(check_key(key.as_str()).is_ok());
        assert_eq!(key, ClaimKey::hashed("phone", b"+33612345678"));
        assert_ne!(key, ClaimKey::hashed("phone", b"+33612345679"));
        assert_ne!(key, ClaimKey::hashed("other", b"+33612345678"));
    }

    #[test]
    fn keys_outside_the_alphabet_are_refused() {
        for bad in ["", ".a", "a.", "a b", "+336", "a*", "a>"] {
            assert!(matches!(check_key(bad), Err(StoreError::Invalid(_))), "{bad:?}");
        }
        assert!(check_key("fence.0a-b_c/d=e").is_ok());
    }
}
