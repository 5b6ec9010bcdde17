//! Exclusive named leases with a time to live, in the KV bucket [`layout::LEASES_BUCKET`]: one holder at a time, seen
//! through every relay node. (The withdrawal fence's export leases, several per pair, are [`crate::fence`]'s.)
//!
//! Contract:
//! - [`Leases::take`] succeeds only if the lease is absent, released or expired, with one conditional write (of
//!   concurrent takers exactly one wins); otherwise [`StoreError::LeaseHeld`] names the holder.
//! - Expiry is the server's: each write carries a per-message TTL and the stream removes the lease when it runs
//!   out, leaving a marker. No wall clock of a relay node is compared with another machine's, so clock offsets
//!   between nodes do not matter; only elapsed time does.
//! - A holder may act as holder until [`Lease::valid_until`], which is measured from just before its take or renew
//!   was sent: the server removes the lease no earlier than a TTL after it stored the write, which comes later, so
//!   a holder that stops at `valid_until` has stopped before anyone else can take the lease.
//! - [`Leases::renew`] and [`Leases::release`] write only if the lease is still the caller's revision; if it expired
//!   or was taken over, [`StoreError::LeaseLost`] and nothing is written.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;

use crate::StoreError;
use crate::cas::{CasBucket, Last, check_key};
use crate::layout::{self, Layout};

/// How long the server keeps the marker a TTL leaves (the shortest it takes).
const MARKER_TTL: Duration = Duration::from_secs(1);
/// The longest holder name.
const MAX_HOLDER_LEN: usize = 256;
/// Conditional writes tried when other takers keep changing the lease under this one.
const TAKE_ATTEMPTS: usize = 3;

/// A lease held by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease's name (its key).
    pub name: String,
    /// Who holds it.
    pub holder: String,
    /// The revision of the write that took or renewed it.
    pub revision: u64,
    /// Its time to live.
    pub ttl: Duration,
    /// Until when the holder may act as holder (see the module's contract).
    pub valid_until: Instant,
}

/// The lease bucket.
#[derive(Clone)]
pub struct Leases {
    bucket: CasBucket,
}

/// The TTL as the server's `Nats-TTL` header: whole seconds, at least one.
fn ttl_header(ttl: Duration) -> Result<String, StoreError> {
    if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
        return Err(StoreError::Invalid(format!("a lease TTL is a whole number of seconds, at least 1: {ttl:?}")));
    }
    Ok(format!("{}s", ttl.as_secs()))
}

impl Leases {
    /// Creates the bucket (per-key TTLs enabled), or brings it to `layout`'s replicas.
    pub async fn open(js: jetstream::Context, layout: &Layout) -> Result<Self, StoreError> {
        Ok(Self { bucket: CasBucket::open(js, layout::LEASES_BUCKET, layout, Some(MARKER_TTL)).await? })
    }

    async fn write(&self, name: &str, holder: &str, ttl: Duration, expected: u64) -> Result<Lease, StoreError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_TTL, ttl_header(ttl)?.as_str());
        let started = Instant::now();
        let revision = self.bucket.write_if(name, headers, Bytes::copy_from_slice(holder.as_bytes()), expected).await?;
        Ok(Lease { name: name.into(), holder: holder.into(), revision, ttl, valid_until: started + ttl })
    }

    /// Takes lease `name` for `holder` for `ttl` (whole seconds), if nobody holds it.
    pub async fn take(&self, name: &str, holder: &str, ttl: Duration) -> Result<Lease, StoreError> {
        check_key(name)?;
        if holder.is_empty() || holder.len() > MAX_HOLDER_LEN {
            return Err(StoreError::Invalid(format!("a holder name has 1 to {MAX_HOLDER_LEN} bytes")));
        }
        ttl_header(ttl)?;
        for _ in 0..TAKE_ATTEMPTS {
            let expected = match self.bucket.last(name).await? {
                Last::Live(entry) => {
                    return Err(StoreError::LeaseHeld { holder: String::from_utf8_lossy(&entry.value).into_owned() });
                }
                Last::Absent => 0,
                Last::Gone(revision) => revision,
            };
            match self.write(name, holder, ttl, expected).await {
                // Someone wrote between the read and the write (a taker, or the server's expiry marker): look again.
                Err(StoreError::RevisionChanged { .. }) => continue,
                other => return other,
            }
        }
        match self.holder(name).await? {
            Some(holder) => Err(StoreError::LeaseHeld { holder }),
            None => Err(StoreError::LeaseHeld { holder: String::new() }),
        }
    }

    /// Extends `lease` by its TTL from now, if it is still the caller's; the renewed lease.
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, StoreError> {
        match self.write(&lease.name, &lease.holder, lease.ttl, lease.revision).await {
            Err(StoreError::RevisionChanged { .. }) => Err(StoreError::LeaseLost),
            other => other,
        }
    }

    /// Releases `lease` so that another may take it at once, if it is still the caller's.
    pub async fn release(&self, lease: Lease) -> Result<(), StoreError> {
        match self.bucket.delete(&lease.name, lease.revision).await {
            Err(StoreError::RevisionChanged { .. }) => Err(StoreError::LeaseLost),
            other => other,
        }
    }

    /// Who holds lease `name` now, if anyone.
    pub async fn holder(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self.bucket.entry(name).await?.map(|e| String::from_utf8_lossy(&e.value).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_whole_seconds() {
        assert_eq!(ttl_header(Duration::from_secs(30)).ok().as_deref(), Some("30s"));
        for bad in [Duration::ZERO, Duration::from_millis(500), Duration::from_millis(1500)] {
            assert!(matches!(ttl_header(bad), Err(StoreError::Invalid(_))), "{bad:?}");
        }
    }
}
