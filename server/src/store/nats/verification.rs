//! Pending verification codes and registration locks in JetStream: the [`VerificationStore`] over one
//! compare-and-set bucket, so that a code's attempts are counted once across relay nodes.
//!
//! Contract (on top of [`VerificationStore`]'s):
//! - Bucket [`BUCKET`] (file storage, the layout's replicas, one revision per key): `code.<phone tag hex>` → the
//!   pending code as the sled backend encodes it (a tag of the number, never the number; the code only as a tag);
//!   `lock.<account id hex>` → the registration lock (a verifier of the PIN, never the PIN).
//! - Every change is one write conditioned on the revision just read ([`CasBucket`]): an attempt reads the code,
//!   decides, and writes the decremented code (or deletes it) only if nobody wrote in between; otherwise it reads
//!   again. So concurrent guesses through any nodes never get more attempts than the code allows.
//! - Writes return after JetStream's acknowledgement (a quorum of the replicas); reads ask the bucket's leader.
//! - `sweep_expired` and `pending` list the live codes (the leader's subjects), so they cost a read per code.

use bytes::Bytes;
use relay_proto::AccountId;
use relay_store_nats::cas::{CasBucket, Entry};
use relay_store_nats::{Layout, StoreError};

use crate::store::backend::{BackendError, BoxFuture, VerificationStore};
use crate::store::verification::VerificationStoreError;
use crate::verify::code::{Attempt, PendingCode, PhoneTag, RequestId};
use crate::verify::lock::Lock;

/// The bucket's name.
pub const BUCKET: &str = "VERIFY";

type Result<T> = std::result::Result<T, VerificationStoreError>;

fn engine(e: StoreError) -> VerificationStoreError {
    VerificationStoreError::Store(BackendError(format!("jetstream: {e}")))
}

fn code_key(phone: &PhoneTag) -> String {
    format!("code.{}", hex::encode(phone.0))
}

fn lock_key(account: &AccountId) -> String {
    format!("lock.{}", hex::encode(account.as_bytes()))
}

fn decode_code(e: &Entry) -> Result<PendingCode> {
    PendingCode::decode(&e.value).ok_or(VerificationStoreError::Corrupt)
}

/// Verification state in JetStream.
pub struct NatsVerifications {
    bucket: CasBucket,
}

impl NatsVerifications {
    /// Creates the bucket, or opens it as it is.
    pub async fn open(js: async_nats::jetstream::Context, layout: &Layout) -> Result<Self> {
        let bucket = CasBucket::named(js.clone(), BUCKET, layout).await.map_err(engine)?;
        super::ready(&js, &format!("KV_{BUCKET}"))
            .await
            .map_err(|e| VerificationStoreError::Store(BackendError(format!("jetstream: {e}"))))?;
        Ok(Self { bucket })
    }

    async fn entry(&self, key: &str) -> Result<Option<Entry>> {
        self.bucket.entry(key).await.map_err(engine)
    }

    /// Writes `value` to `key` if it still is `read` (absent when `None`); `false` if someone wrote in between.
    async fn put_if(&self, key: &str, read: Option<&Entry>, value: Bytes) -> Result<bool> {
        let written = match read {
            Some(e) => self.bucket.update(key, value, e.revision).await,
            None => self.bucket.create(key, value).await,
        };
        match written {
            Ok(_) => Ok(true),
            Err(StoreError::RevisionChanged { .. } | StoreError::Exists) => Ok(false),
            Err(e) => Err(engine(e)),
        }
    }

    /// Deletes `key` if it still is `read`; `false` if someone wrote in between.
    async fn delete_if(&self, key: &str, read: &Entry) -> Result<bool> {
        match self.bucket.delete(key, read.revision).await {
            Ok(()) => Ok(true),
            Err(StoreError::RevisionChanged { .. }) => Ok(false),
            Err(e) => Err(engine(e)),
        }
    }

    async fn replace_pending_now(&self, phone: &PhoneTag, pending: &PendingCode) -> Result<Option<PendingCode>> {
        let key = code_key(phone);
        loop {
            let read = self.entry(&key).await?;
            let old = read.as_ref().map(decode_code).transpose()?;
            if self.put_if(&key, read.as_ref(), Bytes::copy_from_slice(&pending.encode())).await? {
                return Ok(old);
            }
        }
    }

    async fn attempt_now(
        &self,
        phone: &PhoneTag,
        now_ms: u64,
        matches: &(dyn Fn(&PendingCode) -> bool + Send + Sync),
    ) -> Result<Option<(Attempt, RequestId)>> {
        let key = code_key(phone);
        loop {
            let Some(read) = self.entry(&key).await? else { return Ok(None) };
            let pending = decode_code(&read)?;
            let (answer, next) = pending.attempt(now_ms, matches(&pending));
            let done = match next {
                Some(next) => self.put_if(&key, Some(&read), Bytes::copy_from_slice(&next.encode())).await?,
                None => self.delete_if(&key, &read).await?,
            };
            if done {
                return Ok(Some((answer, pending.request_id)));
            }
        }
    }

    async fn remove_pending_now(&self, phone: &PhoneTag, id: &RequestId) -> Result<bool> {
        let key = code_key(phone);
        loop {
            let Some(read) = self.entry(&key).await? else { return Ok(false) };
            if decode_code(&read)?.request_id != *id {
                return Ok(false);
            }
            if self.delete_if(&key, &read).await? {
                return Ok(true);
            }
        }
    }

    async fn pending_request_now(&self, phone: &PhoneTag) -> Result<Option<RequestId>> {
        Ok(self.entry(&code_key(phone)).await?.map(|e| decode_code(&e)).transpose()?.map(|p| p.request_id))
    }

    async fn drop_pending_now(&self, phone: &PhoneTag) -> Result<Option<RequestId>> {
        let key = code_key(phone);
        loop {
            let Some(read) = self.entry(&key).await? else { return Ok(None) };
            let id = decode_code(&read)?.request_id;
            if self.delete_if(&key, &read).await? {
                return Ok(Some(id));
            }
        }
    }

    async fn sweep_expired_now(&self, now_ms: u64) -> Result<Vec<RequestId>> {
        let mut removed = Vec::new();
        for key in self.bucket.live_keys("code.").await.map_err(engine)? {
            let Some(read) = self.entry(&key).await? else { continue };
            let pending = decode_code(&read)?;
            // A code replaced or attempted meanwhile is left for the next sweep.
            if pending.expired(now_ms) && self.delete_if(&key, &read).await? {
                removed.push(pending.request_id);
            }
        }
        Ok(removed)
    }

    async fn pending_now(&self) -> usize {
        match self.bucket.live_keys("code.").await {
            Ok(keys) => keys.len(),
            Err(e) => {
                tracing::warn!(error = %e, "could not count pending verification codes");
                0
            }
        }
    }

    async fn lock_now(&self, account: &AccountId) -> Result<Option<Lock>> {
        self.entry(&lock_key(account))
            .await?
            .map(|e| Lock::decode(&e.value).ok_or(VerificationStoreError::Corrupt))
            .transpose()
    }

    async fn set_lock_now(&self, account: &AccountId, lock: Option<&Lock>) -> Result<()> {
        let key = lock_key(account);
        loop {
            let read = self.entry(&key).await?;
            let done = match (lock, &read) {
                (Some(l), _) => self.put_if(&key, read.as_ref(), Bytes::copy_from_slice(&l.encode())).await?,
                (None, Some(r)) => self.delete_if(&key, r).await?,
                (None, None) => true,
            };
            if done {
                return Ok(());
            }
        }
    }

    async fn touch_now(&self, account: &AccountId, now_ms: u64) -> Result<()> {
        let key = lock_key(account);
        loop {
            let Some(read) = self.entry(&key).await? else { return Ok(()) };
            let lock = Lock::decode(&read.value).ok_or(VerificationStoreError::Corrupt)?;
            let touched = lock.touched(now_ms);
            if touched == lock || self.put_if(&key, Some(&read), Bytes::copy_from_slice(&touched.encode())).await? {
                return Ok(());
            }
        }
    }
}

impl VerificationStore for NatsVerifications {
    fn replace_pending<'a>(
        &'a self,
        phone: &'a PhoneTag,
        pending: &'a PendingCode,
    ) -> BoxFuture<'a, Result<Option<PendingCode>>> {
        Box::pin(self.replace_pending_now(phone, pending))
    }

    fn attempt<'a>(
        &'a self,
        phone: &'a PhoneTag,
        now_ms: u64,
        matches: &'a (dyn Fn(&PendingCode) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<Option<(Attempt, RequestId)>>> {
        Box::pin(self.attempt_now(phone, now_ms, matches))
    }

    fn remove_pending<'a>(&'a self, phone: &'a PhoneTag, id: &'a RequestId) -> BoxFuture<'a, Result<bool>> {
        Box::pin(self.remove_pending_now(phone, id))
    }

    fn pending_request<'a>(&'a self, phone: &'a PhoneTag) -> BoxFuture<'a, Result<Option<RequestId>>> {
        Box::pin(self.pending_request_now(phone))
    }

    fn drop_pending<'a>(&'a self, phone: &'a PhoneTag) -> BoxFuture<'a, Result<Option<RequestId>>> {
        Box::pin(self.drop_pending_now(phone))
    }

    fn sweep_expired(&self, now_ms: u64) -> BoxFuture<'_, Result<Vec<RequestId>>> {
        Box::pin(self.sweep_expired_now(now_ms))
    }

    fn pending(&self) -> BoxFuture<'_, usize> {
        Box::pin(self.pending_now())
    }

    fn lock<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<Lock>>> {
        Box::pin(self.lock_now(account))
    }

    fn set_lock<'a>(&'a self, account: &'a AccountId, lock: Option<&'a Lock>) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.set_lock_now(account, lock))
    }

    fn touch<'a>(&'a self, account: &'a AccountId, now_ms: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.touch_now(account, now_ms))
    }
}
