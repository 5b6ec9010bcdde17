//! The withdrawal fence's export leases in JetStream: the [`LeaseStore`] over [`relay_store_nats::fence::Fence`]
//! (stream `FENCE`, one message a lease on subject `fence.<SHA-256 hex of the pair>`), so that a lease taken
//! through one relay node holds up a withdrawal acknowledged through any other (issue #14 point 4).
//!
//! Contract (on top of [`LeaseStore`]'s):
//! - **Durable on return**: [`LeaseStore::acquire`] returns only after JetStream's publish acknowledgement (a
//!   quorum of the R3 stream), so nothing is left for the durability barrier to do.
//! - **Ids** are the stream sequences of the leases' messages: unique and never reused, through any node, across
//!   restarts of relay nodes and of NATS servers.
//! - **Several leases per pair** (one message each); a pair appears in the engine only as a hash, never an account
//!   id, purpose or affiliate in clear.
//! - **Expiry is the server's**: each lease carries its TTL, rounded up to whole seconds; the stream drops it when
//!   that has run out. The deadline returned is this node's monotonic clock just before the publish plus the TTL
//!   asked for: the server drops the lease no sooner.
//! - **`wait_clear`** asks the stream leader whether the pair still has a lease, every [`POLL_INTERVAL`], until it
//!   has none. It sleeps between looks (it never spins), and while the engine cannot answer it keeps waiting: an
//!   unreachable engine holds a withdrawal, it never lets it through.
//! - **`release`** deletes the lease's message; unknown, lapsed or other pairs' ids are ignored. If the engine
//!   fails, a warning is logged (the lease id, never the pair) and the lease lapses at its TTL: later, never sooner.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use relay_store_nats::cas::ClaimKey;
use relay_store_nats::fence::Fence;
use relay_store_nats::{Layout, StoreError};

use crate::fence::{FenceError, LeaseId, Pair, encode_pair};
use crate::store::backend::{BackendError, BoxFuture, LeaseStore};

/// How often [`LeaseStore::wait_clear`] looks again while a pair has a lease: a withdrawal is acknowledged at most
/// this long after its last lease went, for one small request per waiting withdrawal per interval.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The export leases in JetStream.
pub struct NatsLeases {
    fence: Fence,
}

fn backend(e: StoreError) -> BackendError {
    BackendError(format!("jetstream: {e}"))
}

/// The key naming `pair` in the engine: a hash, so no account id or affiliate appears in a subject.
fn pair_key(pair: &Pair) -> ClaimKey {
    ClaimKey::hashed("fence pair", &encode_pair(pair))
}

impl NatsLeases {
    /// Creates the fence stream (or brings it to `layout`'s replicas) through `js`.
    pub async fn open(js: jetstream::Context, layout: &Layout) -> Result<Self, BackendError> {
        Ok(Self { fence: Fence::open(js, layout).await.map_err(backend)? })
    }

    /// Takes a lease on `pair` for `ttl`: its id and this node's deadline for it.
    pub async fn try_acquire(&self, pair: &Pair, ttl: Duration) -> Result<(LeaseId, Instant), FenceError> {
        let started = Instant::now();
        let id = self.fence.take(&pair_key(pair), ttl).await.map_err(|e| FenceError::Backend(backend(e)))?;
        Ok((LeaseId(id), started + ttl))
    }

    /// Releases lease `id` of `pair`; whether it was still held (false for an unknown, lapsed or other pair's id).
    pub async fn try_release(&self, pair: &Pair, id: LeaseId) -> Result<bool, BackendError> {
        match self.fence.release(&pair_key(pair), id.0).await {
            Err(StoreError::Invalid(_)) => Ok(false),
            other => other.map_err(backend),
        }
    }

    /// Whether `pair` has a lease neither released nor lapsed, taken through any node.
    pub async fn held(&self, pair: &Pair) -> Result<bool, BackendError> {
        self.fence.held(&pair_key(pair)).await.map_err(backend)
    }

    async fn wait(&self, pair: &Pair) {
        let mut logged = false;
        loop {
            match self.held(pair).await {
                Ok(false) => return,
                Ok(true) => {
                    if !std::mem::replace(&mut logged, true) {
                        // The account id only at debug level, like every line naming one.
                        tracing::debug!(account = %pair.0, "withdrawal waits for the export leases of its pair");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot look for export leases; the withdrawal keeps waiting"),
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl LeaseStore for NatsLeases {
    fn acquire(&self, pair: Pair, ttl: Duration) -> BoxFuture<'_, Result<(LeaseId, Instant), FenceError>> {
        Box::pin(async move { self.try_acquire(&pair, ttl).await })
    }

    fn release<'a>(&'a self, pair: &'a Pair, id: LeaseId) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = self.try_release(pair, id).await {
                tracing::warn!(error = %e, lease = id.0, "could not release an export lease; it lapses at its TTL");
            }
        })
    }

    fn wait_clear<'a>(&'a self, pair: &'a Pair) -> BoxFuture<'a, ()> {
        Box::pin(self.wait(pair))
    }
}

#[cfg(test)]
mod tests {
    use relay_proto::AccountId;
    use relay_proto::consent::Purpose;

    use super::*;

    #[test]
    fn pairs_are_hashed_apart_and_never_in_clear() {
        let account = AccountId([0xab; 16]);
        let pair: Pair = (account, Purpose::Advertising, "adsco".into());
        let key = pair_key(&pair);
        assert_eq!(key.as_str().len(), 64);
        assert!(!key.as_str().contains(&account.to_string()) && !key.as_str().contains("adsco"));
        assert_eq!(key, pair_key(&pair.clone()));
        assert_ne!(key, pair_key(&(account, Purpose::Analytics, "adsco".into())));
        assert_ne!(key, pair_key(&(account, Purpose::Advertising, "adsc".into())));
        assert_ne!(key, pair_key(&(AccountId([0xac; 16]), Purpose::Advertising, "adsco".into())));
    }
}
