//! Prekeys and access-key verifiers in JetStream: the [`PrekeyStore`] over one stream, so that a bundle fetched
//! through any relay node consumes each one-time prekey once, cluster-wide.
//!
//! Contract (on top of [`PrekeyStore`]'s):
//! - Stream [`STREAM`] (file storage, the layout's replicas, roll-up headers allowed), subjects per account
//!   (`pk.<account hex>.…`, an account id, never a phone number):
//!   - `.signed`, `.lr` (last-resort KEM prekey), `.access` (SHA-256 of the access key): one value each, written
//!     with a roll-up header so the stream keeps only the latest;
//!   - `.ot` and `.kem`: the one-time pools, one message per prekey (`id (4, BE) ‖ key`).
//! - Taking a one-time prekey reads the pool's first message and deletes it by sequence: the stream leader applies
//!   one delete per sequence, so of two fetches racing through any nodes exactly one gets it, and the other moves
//!   on to the next. A pool is counted by the leader (messages on its subject); uploads past [`MAX_POOL`] per
//!   kind are refused. Unlike the sled backend, a one-time id uploaded twice is kept twice (clients never do).
//! - Writes return after JetStream's acknowledgement (a quorum of the replicas); `forget` purges every subject of
//!   the account.
//! - A stored value of the wrong size is reported as damage.

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{self, RawMessageErrorKind, StorageType, Stream};
use async_nats::jetstream::{self};
use bytes::Bytes;
use futures_util::TryStreamExt;
use relay_proto::AccountId;
use relay_proto::wire::{KemPrekey, OneTimePrekey, SignedPrekey};
use relay_store_nats::Layout;

use crate::store::backend::{BackendError, BoxFuture, PrekeyStore};
use crate::store::prekeys::{
    Counts, KEM_PUBLIC_LEN, MAX_POOL, PrekeyError, SIGNATURE_LEN, Taken, X25519_LEN, access_key_matches, check_upload,
    decode_kem, encode_kem, encode_signed,
};

/// The stream's name.
pub const STREAM: &str = "PREKEYS";

fn engine(what: &str) -> impl FnOnce(&dyn std::fmt::Display) -> PrekeyError + '_ {
    move |e| PrekeyError::Store(BackendError(format!("jetstream: {what}: {e}")))
}

fn subject(account: &AccountId, part: &str) -> String {
    format!("pk.{}.{part}", hex::encode(account.as_bytes()))
}

/// The stream's configuration under `layout`.
pub fn stream_config(layout: &Layout) -> stream::Config {
    stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["pk.*.*".to_owned()],
        storage: StorageType::File,
        num_replicas: layout.replicas,
        allow_rollup: true,
        ..Default::default()
    }
}

/// Prekeys in JetStream.
pub struct NatsPrekeys {
    js: jetstream::Context,
    stream: Stream<()>,
}

impl NatsPrekeys {
    /// Creates the stream, or opens it as it is.
    pub async fn open(js: jetstream::Context, layout: &Layout) -> Result<Self, PrekeyError> {
        js.create_or_update_stream(stream_config(layout)).await.map_err(|e| engine("creating the stream")(&e))?;
        super::ready(&js, STREAM).await.map_err(|e| engine("waiting for the stream")(&e))?;
        let stream = js.get_stream_no_info(STREAM).await.map_err(|e| engine("opening the stream")(&e))?;
        Ok(Self { js, stream })
    }

    async fn publish(&self, subject: String, payload: Vec<u8>, rollup: bool) -> Result<(), PrekeyError> {
        let sent = if rollup {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Rollup", "sub");
            self.js.publish_with_headers(subject, headers, payload.into()).await
        } else {
            self.js.publish(subject, payload.into()).await
        };
        sent.map_err(|e| engine("publishing a prekey")(&e))?
            .await
            .map_err(|e| engine("awaiting a prekey's ack")(&e))?;
        Ok(())
    }

    async fn last(&self, subject: &str) -> Result<Option<Bytes>, PrekeyError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(m.payload)),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(engine("reading a prekey")(&e)),
        }
    }

    async fn pool_size(&self, subject: &str) -> Result<u32, PrekeyError> {
        let mut subjects = self.stream.info_with_subjects(subject).await.map_err(|e| engine("counting a pool")(&e))?;
        let mut n = 0;
        while let Some((name, count)) = subjects.try_next().await.map_err(|e| engine("counting a pool")(&e))? {
            if name == subject {
                n = u32::try_from(count).unwrap_or(u32::MAX);
            }
        }
        Ok(n)
    }

    /// Removes and returns the pool's oldest prekey, racing safely with takers on any node.
    async fn take_pooled(&self, subject: &str) -> Result<Option<(u32, Bytes)>, PrekeyError> {
        let mut from = 1;
        loop {
            let m = match self.stream.get_first_raw_message_by_subject(subject, from).await {
                Ok(m) => m,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
                Err(e) => return Err(engine("reading a pool")(&e)),
            };
            // Exactly one delete of a sequence succeeds: whoever deleted it took it.
            if matches!(self.stream.delete_message(m.sequence).await, Ok(true)) {
                let id = m.payload.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
                let id = id.ok_or(PrekeyError::Corrupt)?;
                return Ok(Some((id, m.payload.slice(4..))));
            }
            from = m.sequence.saturating_add(1);
        }
    }

    async fn counts_now(&self, account: &AccountId) -> Result<Counts, PrekeyError> {
        Ok(Counts {
            one_time: self.pool_size(&subject(account, "ot")).await?,
            kem: self.pool_size(&subject(account, "kem")).await?,
            signed: self.last(&subject(account, "signed")).await?.is_some(),
            last_resort: self.last(&subject(account, "lr")).await?.is_some(),
        })
    }

    async fn upload_now(
        &self,
        account: &AccountId,
        signed: Option<&SignedPrekey>,
        one_time: &[OneTimePrekey],
        kem: &[KemPrekey],
        last_resort: Option<&KemPrekey>,
    ) -> Result<Counts, PrekeyError> {
        check_upload(signed, one_time, kem, last_resort)?;
        let before = self.counts_now(account).await?;
        let after = |held: u32, added: usize| usize::try_from(held).unwrap_or(usize::MAX).saturating_add(added);
        if after(before.one_time, one_time.len()) > MAX_POOL || after(before.kem, kem.len()) > MAX_POOL {
            return Err(PrekeyError::Invalid(format!("at most {MAX_POOL} one-time prekeys of each kind")));
        }
        if let Some(s) = signed {
            self.publish(subject(account, "signed"), encode_signed(s), true).await?;
        }
        for k in one_time {
            self.publish(subject(account, "ot"), [&k.id.to_be_bytes()[..], &k.public_key].concat(), false).await?;
        }
        for k in kem {
            self.publish(subject(account, "kem"), [&k.id.to_be_bytes()[..], &encode_kem(k)].concat(), false).await?;
        }
        if let Some(k) = last_resort {
            self.publish(subject(account, "lr"), encode_kem(k), true).await?;
        }
        self.counts_now(account).await
    }

    async fn take_bundle_now(&self, account: &AccountId) -> Result<Option<Taken>, PrekeyError> {
        let Some(sv) = self.last(&subject(account, "signed")).await? else { return Ok(None) };
        if sv.len() != 4 + X25519_LEN + SIGNATURE_LEN {
            return Err(PrekeyError::Corrupt);
        }
        let signed = SignedPrekey {
            id: u32::from_be_bytes(sv[..4].try_into().map_err(|_| PrekeyError::Corrupt)?),
            public_key: sv.slice(4..4 + X25519_LEN),
            signature: sv.slice(4 + X25519_LEN..),
        };
        let (kem, kem_last_resort) = match self.take_pooled(&subject(account, "kem")).await? {
            // A pooled KEM message is `id ‖ encoded key` (the encoded key repeats the id).
            Some((_, v)) => (decode_kem(&v).ok_or(PrekeyError::Corrupt)?, false),
            None => match self.last(&subject(account, "lr")).await? {
                Some(v) => (decode_kem(&v).ok_or(PrekeyError::Corrupt)?, true),
                None => return Ok(None),
            },
        };
        let one_time = match self.take_pooled(&subject(account, "ot")).await? {
            Some((id, key)) if key.len() == X25519_LEN => Some(OneTimePrekey { id, public_key: key }),
            Some(_) => return Err(PrekeyError::Corrupt),
            None => None,
        };
        debug_assert!(kem.public_key.len() == KEM_PUBLIC_LEN);
        Ok(Some(Taken { signed, one_time, kem, kem_last_resort }))
    }

    async fn set_access_verifier_now(&self, account: &AccountId, verifier: &[u8]) -> Result<(), PrekeyError> {
        if verifier.len() != 32 {
            return Err(PrekeyError::Invalid(format!("access key verifier must be 32 bytes, got {}", verifier.len())));
        }
        self.publish(subject(account, "access"), verifier.to_vec(), true).await
    }

    async fn forget_now(&self, account: &AccountId) -> Result<(), PrekeyError> {
        self.stream
            .purge()
            .filter(subject(account, "*"))
            .await
            .map_err(|e| engine("forgetting an account's prekeys")(&e))?;
        Ok(())
    }

    async fn access_allowed_now(&self, account: &AccountId, access_key: &[u8]) -> Result<bool, PrekeyError> {
        Ok(self.last(&subject(account, "access")).await?.is_some_and(|v| access_key_matches(&v, access_key)))
    }
}

impl PrekeyStore for NatsPrekeys {
    fn upload<'a>(
        &'a self,
        account: &'a AccountId,
        signed: Option<&'a SignedPrekey>,
        one_time: &'a [OneTimePrekey],
        kem: &'a [KemPrekey],
        last_resort: Option<&'a KemPrekey>,
    ) -> BoxFuture<'a, Result<Counts, PrekeyError>> {
        Box::pin(self.upload_now(account, signed, one_time, kem, last_resort))
    }

    fn counts<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Counts, PrekeyError>> {
        Box::pin(self.counts_now(account))
    }

    fn take_bundle<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<Taken>, PrekeyError>> {
        Box::pin(self.take_bundle_now(account))
    }

    fn set_access_verifier<'a>(
        &'a self,
        account: &'a AccountId,
        verifier: &'a [u8],
    ) -> BoxFuture<'a, Result<(), PrekeyError>> {
        Box::pin(self.set_access_verifier_now(account, verifier))
    }

    fn forget<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<(), PrekeyError>> {
        Box::pin(self.forget_now(account))
    }

    fn access_allowed<'a>(
        &'a self,
        account: &'a AccountId,
        access_key: &'a [u8],
    ) -> BoxFuture<'a, Result<bool, PrekeyError>> {
        Box::pin(self.access_allowed_now(account, access_key))
    }
}
