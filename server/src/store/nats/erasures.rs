//! The erasure feed in JetStream: the [`ErasureStore`] over one stream, so that an erasure accepted through any
//! relay node is in the one feed the exporter reads.
//!
//! Contract (on top of [`ErasureStore`]'s):
//! - Stream [`STREAM`] (file storage, the layout's replicas, deletes and purges refused by the server, no age or
//!   count limit): one message per accepted `DeleteAccount`, on subject `erasure.<account hex>`, holding the
//!   erasure as the sled backend encodes it. Its stream sequence is its cursor: one global order across nodes,
//!   increasing, never reused, with no gaps (nothing is ever deleted).
//! - **Durable on return**: [`ErasureStore::record`] returns only after JetStream's publish acknowledgement (a
//!   quorum of the replicas); the backend's barrier is [`super::JetStreamDurability`].
//! - [`ErasureStore::erased`] asks the stream leader for the last message on the account's subject.
//! - A stored message that does not decode is reported as damage, never skipped.

use async_nats::jetstream::stream::{self, RawMessageErrorKind, StorageType, Stream};
use async_nats::jetstream::{self};
use relay_proto::AccountId;
use relay_store_nats::Layout;

use crate::store::backend::{BackendError, BoxFuture, ErasureStore};
use crate::store::erasures::{Erasure, ErasureStoreError};

/// The stream's name.
pub const STREAM: &str = "ERASURES";

fn subject(account: &AccountId) -> String {
    format!("erasure.{}", hex::encode(account.as_bytes()))
}

fn engine(what: &str) -> impl FnOnce(&dyn std::fmt::Display) -> ErasureStoreError + '_ {
    move |e| ErasureStoreError::Store(BackendError(format!("jetstream: {what}: {e}")))
}

/// The stream's configuration under `layout`.
pub fn stream_config(layout: &Layout) -> stream::Config {
    stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["erasure.*".to_owned()],
        storage: StorageType::File,
        num_replicas: layout.replicas,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    }
}

/// The erasure feed in JetStream.
pub struct NatsErasures {
    js: jetstream::Context,
    stream: Stream<()>,
}

impl NatsErasures {
    /// Creates the stream, or opens it as it is.
    pub async fn open(js: jetstream::Context, layout: &Layout) -> Result<Self, ErasureStoreError> {
        js.create_or_update_stream(stream_config(layout)).await.map_err(|e| engine("creating the stream")(&e))?;
        super::ready(&js, STREAM).await.map_err(|e| engine("waiting for the stream")(&e))?;
        let stream = js.get_stream_no_info(STREAM).await.map_err(|e| engine("opening the stream")(&e))?;
        Ok(Self { js, stream })
    }

    async fn record_now(&self, erasure: &Erasure) -> Result<u64, ErasureStoreError> {
        let ack = self
            .js
            .publish(subject(&erasure.account), erasure.encode().into())
            .await
            .map_err(|e| engine("publishing an erasure")(&e))?;
        let ack = ack.await.map_err(|e| engine("awaiting an erasure's acknowledgement")(&e))?;
        Ok(ack.sequence)
    }

    async fn erased_now(&self, account: &AccountId) -> Result<bool, ErasureStoreError> {
        match self.stream.get_last_raw_message_by_subject(&subject(account)).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(engine("reading an account's erasure")(&e)),
        }
    }

    async fn changes_now(&self, after: u64, limit: usize) -> Result<Vec<(u64, Erasure)>, ErasureStoreError> {
        let mut out = Vec::new();
        let Some(mut next) = after.checked_add(1) else { return Ok(out) };
        while out.len() < limit {
            match self.stream.get_raw_message(next).await {
                Ok(m) => {
                    let erasure = Erasure::decode(&m.payload).ok_or(ErasureStoreError::Corrupt)?;
                    out.push((m.sequence, erasure));
                    let Some(n) = m.sequence.checked_add(1) else { break };
                    next = n;
                }
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(engine("reading the erasure feed")(&e)),
            }
        }
        Ok(out)
    }
}

impl ErasureStore for NatsErasures {
    fn record<'a>(&'a self, erasure: &'a Erasure) -> BoxFuture<'a, Result<u64, ErasureStoreError>> {
        Box::pin(self.record_now(erasure))
    }

    fn erased<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<bool, ErasureStoreError>> {
        Box::pin(self.erased_now(account))
    }

    fn changes(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<(u64, Erasure)>, ErasureStoreError>> {
        Box::pin(self.changes_now(after, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feed_cannot_lose_an_erasure_by_server_side_deletion_or_limits() {
        let c = stream_config(&Layout::default());
        assert!(c.deny_delete && c.deny_purge, "deletes and purges refused by the server");
        assert_eq!((c.max_messages, c.max_bytes, c.max_age), (0, 0, std::time::Duration::ZERO), "no limit drops one");
        assert_eq!(c.storage, StorageType::File);
    }
}
