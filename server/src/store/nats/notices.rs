//! Published notices in JetStream: the [`NoticeStore`] over one key-value bucket, so that every relay node serves
//! the same current notices and every document ever published.
//!
//! Contract (on top of [`NoticeStore`]'s):
//! - Bucket [`BUCKET`] (file storage, the layout's replicas, one revision per key): `doc.<SHA-256 hex>` → the
//!   document, byte for byte, never removed; `current` → the whole current map (every (affiliate, purpose) with the
//!   hash of its document), as one value.
//! - A publication is checked like the sled backend's (canonical documents, one per pair, at most
//!   `MAX_PUBLISHED_NOTICES`), then its new documents are written, then `current` in one write: a reader on any
//!   node sees the previous map or the new one, never half of one, and never a current hash whose document is
//!   missing. Each write returns after JetStream's publish acknowledgement (a quorum of the replicas).
//! - Reads ask the bucket stream's leader (not a follower that may lag), so a node reads what any node published.
//! - A stored value that does not decode is reported as damage.

use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{RawMessageErrorKind, StorageType, Stream};
use async_nats::jetstream::{self};
use bytes::Bytes;
use relay_proto::consent::{PURPOSES, Purpose};
use relay_store_nats::Layout;

use crate::store::backend::{BackendError, BoxFuture, NoticeStore};
use crate::store::notices::{NoticeStoreError, Published, checked_publication};

/// The bucket's name.
pub const BUCKET: &str = "NOTICES";
const CURRENT: &str = "current";

fn engine(what: &str) -> impl FnOnce(&dyn std::fmt::Display) -> NoticeStoreError + '_ {
    move |e| NoticeStoreError::Store(BackendError(format!("jetstream: {what}: {e}")))
}

fn document_key(hash: &[u8; 32]) -> String {
    format!("doc.{}", hex::encode(hash))
}

/// The current map as stored: per pair, purpose index (1) ‖ affiliate length (2, BE) ‖ affiliate ‖ hash (32).
fn encode_current(current: &[(String, Purpose, [u8; 32])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (affiliate, purpose, hash) in current {
        let index = PURPOSES.iter().position(|p| p == purpose).unwrap_or(0) as u8;
        out.push(index);
        out.extend_from_slice(&(affiliate.len() as u16).to_be_bytes());
        out.extend_from_slice(affiliate.as_bytes());
        out.extend_from_slice(hash);
    }
    out
}

fn decode_current(v: &[u8]) -> Option<Vec<(String, Purpose, [u8; 32])>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < v.len() {
        let purpose = *PURPOSES.get(usize::from(*v.get(at)?))?;
        let len = usize::from(u16::from_be_bytes(v.get(at + 1..at + 3)?.try_into().ok()?));
        let affiliate = std::str::from_utf8(v.get(at + 3..at + 3 + len)?).ok()?.to_owned();
        let hash = v.get(at + 3 + len..at + 35 + len)?.try_into().ok()?;
        out.push((affiliate, purpose, hash));
        at += 35 + len;
    }
    Some(out)
}

/// The notices in JetStream.
pub struct NatsNotices {
    bucket: kv::Store,
    stream: Stream<()>,
}

impl NatsNotices {
    /// Creates the bucket, or opens it as it is.
    pub async fn open(js: jetstream::Context, layout: &Layout) -> Result<Self, NoticeStoreError> {
        let config = kv::Config {
            bucket: BUCKET.to_owned(),
            history: 1,
            storage: StorageType::File,
            num_replicas: layout.replicas,
            ..Default::default()
        };
        let bucket =
            js.create_or_update_key_value(config).await.map_err(|e| engine("creating the notice bucket")(&e))?;
        super::ready(&js, &format!("KV_{BUCKET}")).await.map_err(|e| engine("waiting for the bucket")(&e))?;
        let stream =
            js.get_stream_no_info(format!("KV_{BUCKET}")).await.map_err(|e| engine("opening the notice bucket")(&e))?;
        Ok(Self { bucket, stream })
    }

    /// The last value of `key`, from the leader.
    async fn read(&self, key: &str) -> Result<Option<Bytes>, NoticeStoreError> {
        match self.stream.get_last_raw_message_by_subject(&format!("$KV.{BUCKET}.{key}")).await {
            Ok(m) => Ok(Some(m.payload)),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(engine("reading a notice")(&e)),
        }
    }

    async fn current_map(&self) -> Result<Vec<(String, Purpose, [u8; 32])>, NoticeStoreError> {
        match self.read(CURRENT).await? {
            Some(v) => decode_current(&v).ok_or(NoticeStoreError::Corrupt),
            None => Ok(Vec::new()),
        }
    }

    async fn publish_now(&self, documents: &[Vec<u8>]) -> Result<Published, NoticeStoreError> {
        let checked = checked_publication(documents)?;
        let mut new_documents = 0;
        for (hash, document) in checked.values() {
            let key = document_key(hash);
            if self.read(&key).await?.is_none() {
                self.bucket
                    .put(key, Bytes::copy_from_slice(document))
                    .await
                    .map_err(|e| engine("storing a notice")(&e))?;
                new_documents += 1;
            }
        }
        let current: Vec<_> = checked.iter().map(|((a, p), (hash, _))| (a.clone(), *p, *hash)).collect();
        self.bucket
            .put(CURRENT, encode_current(&current).into())
            .await
            .map_err(|e| engine("storing the current notices")(&e))?;
        Ok(Published { new_documents, current: current.len() })
    }

    async fn current_hash_now(&self, affiliate: &str, purpose: Purpose) -> Result<Option<[u8; 32]>, NoticeStoreError> {
        Ok(self.current_map().await?.into_iter().find(|(a, p, _)| a == affiliate && *p == purpose).map(|(.., h)| h))
    }

    async fn by_hash_now(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, NoticeStoreError> {
        Ok(self.read(&document_key(hash)).await?.map(|b| b.to_vec()))
    }

    async fn current_now(&self, affiliate: &str, purpose: Purpose) -> Result<Option<Vec<u8>>, NoticeStoreError> {
        match self.current_hash_now(affiliate, purpose).await? {
            Some(hash) => Ok(Some(self.by_hash_now(&hash).await?.ok_or(NoticeStoreError::Corrupt)?)),
            None => Ok(None),
        }
    }
}

impl NoticeStore for NatsNotices {
    fn publish<'a>(&'a self, documents: &'a [Vec<u8>]) -> BoxFuture<'a, Result<Published, NoticeStoreError>> {
        Box::pin(self.publish_now(documents))
    }

    fn current_count(&self) -> BoxFuture<'_, Result<usize, NoticeStoreError>> {
        Box::pin(async move { Ok(self.current_map().await?.len()) })
    }

    fn current_hash<'a>(
        &'a self,
        affiliate: &'a str,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Option<[u8; 32]>, NoticeStoreError>> {
        Box::pin(self.current_hash_now(affiliate, purpose))
    }

    fn current<'a>(
        &'a self,
        affiliate: &'a str,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, NoticeStoreError>> {
        Box::pin(self.current_now(affiliate, purpose))
    }

    fn by_hash<'a>(&'a self, hash: &'a [u8; 32]) -> BoxFuture<'a, Result<Option<Vec<u8>>, NoticeStoreError>> {
        Box::pin(self.by_hash_now(hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_map_round_trips_and_damage_is_refused() {
        let map =
            vec![("adsco".to_owned(), Purpose::Advertising, [1; 32]), ("x".repeat(300), Purpose::Security, [2; 32])];
        let encoded = encode_current(&map);
        assert_eq!(decode_current(&encoded), Some(map));
        assert_eq!(decode_current(&encoded[..encoded.len() - 1]), None, "a truncated map");
        assert_eq!(decode_current(&[9, 0, 0]), None, "an unknown purpose");
    }
}
