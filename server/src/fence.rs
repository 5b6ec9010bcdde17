//! The withdrawal fence between the consent registry and the exporter (see `docs/exporter.md`).
//!
//! The exporter takes a short lease on a (account, purpose, affiliate) pair before each delivery attempt and
//! releases it after. A withdrawal, once durable, waits until the pair has no unexpired lease before it is
//! acknowledged to the user. Taking a lease and checking for leases happen under one lock, and a lease is taken
//! before the registry is read, so an export is either finished before the acknowledgement or refused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use relay_proto::AccountId;
use relay_proto::consent::Purpose;
use tokio::sync::Notify;

/// How long a lease lasts if the exporter never releases it.
pub const LEASE_TTL: Duration = Duration::from_secs(15);

/// A consent pair.
pub type Pair = (AccountId, Purpose, String);

/// A lease handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub u64);

#[derive(Default)]
struct State {
    next: u64,
    leases: HashMap<Pair, Vec<(LeaseId, Instant)>>,
}

/// Leases of exports in progress.
#[derive(Default)]
pub struct Fence {
    state: Mutex<State>,
    released: Notify,
}

impl Fence {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a lease on `pair` until `now + ttl`. Take it *before* reading the registry.
    pub fn acquire(&self, pair: Pair, now: Instant, ttl: Duration) -> (LeaseId, Instant) {
        let mut s = self.lock();
        s.next += 1;
        let id = LeaseId(s.next);
        let deadline = now + ttl;
        s.leases.entry(pair).or_default().push((id, deadline));
        (id, deadline)
    }

    /// Releases a lease (unknown or expired ids are ignored).
    pub fn release(&self, pair: &Pair, id: LeaseId) {
        let mut s = self.lock();
        if let Some(v) = s.leases.get_mut(pair) {
            v.retain(|(l, _)| *l != id);
            if v.is_empty() {
                s.leases.remove(pair);
            }
        }
        drop(s);
        self.released.notify_waiters();
    }

    /// The latest deadline among `pair`'s unexpired leases at `now` (expired ones are dropped), if any.
    fn outstanding(&self, pair: &Pair, now: Instant) -> Option<Instant> {
        let mut s = self.lock();
        let v = s.leases.get_mut(pair)?;
        v.retain(|(_, deadline)| *deadline > now);
        let latest = v.iter().map(|(_, d)| *d).max();
        if v.is_empty() {
            s.leases.remove(pair);
        }
        latest
    }

    /// Waits until `pair` has no unexpired lease. Call after the withdrawal is durable, before acknowledging it.
    pub async fn wait_clear(&self, pair: &Pair) {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register for wake-ups before looking, so a release between the look and the wait is not missed.
            notified.as_mut().enable();
            let Some(deadline) = self.outstanding(pair, Instant::now()) else { return };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> Pair {
        (AccountId([1; 16]), Purpose::Advertising, "adsco".into())
    }

    #[tokio::test]
    async fn a_withdrawal_waits_for_the_export_in_flight() {
        let fence = std::sync::Arc::new(Fence::default());
        let (id, _) = fence.acquire(pair(), Instant::now(), LEASE_TTL);
        let waiter = {
            let fence = fence.clone();
            tokio::spawn(async move { fence.wait_clear(&pair()).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "must wait while the lease is held");
        // Another pair's lease does not hold it up.
        fence.acquire((AccountId([2; 16]), Purpose::Advertising, "adsco".into()), Instant::now(), LEASE_TTL);
        fence.release(&pair(), id);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("released").expect("join");
    }

    #[tokio::test]
    async fn an_abandoned_lease_expires() {
        let fence = Fence::default();
        let ttl = Duration::from_millis(200);
        let start = Instant::now();
        fence.acquire(pair(), start, ttl);
        // Only a lower bound: it cannot return before the lease deadline (no upper bound on a shared machine).
        tokio::time::timeout(Duration::from_secs(10), fence.wait_clear(&pair())).await.expect("expires");
        assert!(start.elapsed() >= ttl, "held until the lease deadline");
    }

    #[tokio::test]
    async fn no_lease_no_wait() {
        let fence = Fence::default();
        tokio::time::timeout(Duration::from_secs(1), fence.wait_clear(&pair())).await.expect("immediate");
    }
}
