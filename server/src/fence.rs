//! The withdrawal fence between the consent registry and the exporter (see `docs/exporter.md`).
//!
//! The exporter takes a short lease on a (account, purpose, affiliate) pair before each delivery attempt and
//! releases it after. A withdrawal, once durable, waits until the pair has no unexpired lease before it is
//! acknowledged to the user. Taking a lease and checking for leases happen under one lock, and a lease is taken
//! before the registry is read, so an export is either finished before the acknowledgement or refused.
//!
//! Contract: leases are durable. Each lease is written to the store's `export_leases` tree when it is taken (the
//! export handler makes that write durable before it answers the grant) and removed when it is released or lapses.
//! A fence opened on a store ([`Fence::open`]) counts every lease it finds there, unreleased from before a restart,
//! as live for a whole [`LEASE_TTL`] measured on this process's monotonic clock from the moment it opened (wall
//! clocks can jump, and the exporter may still be posting under it), unless released meanwhile. Lease ids are never
//! reused, across restarts too (the counter is stored with the leases). A record that does not decode stops the
//! relay at start ([`FenceError::Corrupt`]): a damaged fence is reported, never read as "no lease".

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use relay_proto::AccountId;
use relay_proto::consent::Purpose;
use tokio::sync::Notify;

use crate::store::{BoxFuture, LeaseStore};

/// How long a lease lasts if the exporter never releases it. It must exceed what the exporter needs of a lease
/// before it may start a request (`relay_exporter::core::LEASE_NEEDED`: the HTTP timeout, a bound on the flush
/// before the request, and slack for clock rates and for tearing the socket down), plus the round trip of the lease
/// request itself: 30 s against the exporter's 10 s + 5 s + 2 s = 17 s.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// A consent pair.
pub type Pair = (AccountId, Purpose, String);

/// A lease handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub u64);

/// Why the fence's store could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    /// A stored lease or the lease counter does not decode.
    #[error("corrupt export lease record")]
    Corrupt,
    /// The store failed.
    #[error("export leases store: {0}")]
    Store(#[from] sled::Error),
    /// A distributed engine failed (its text, never a pair).
    #[error("export leases store: {0}")]
    Backend(crate::store::BackendError),
}

/// Key of the lease counter in the tree; leases are under `b'l' ‖ id (8, big-endian)`.
const NEXT_KEY: &[u8] = b"next";

fn lease_key(id: LeaseId) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.push(b'l');
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

/// `account (16) ‖ purpose length (1) ‖ purpose ‖ affiliate`.
pub(crate) fn encode_pair((account, purpose, affiliate): &Pair) -> Vec<u8> {
    let purpose = purpose.as_str().as_bytes();
    let mut v = Vec::with_capacity(17 + purpose.len() + affiliate.len());
    v.extend_from_slice(account.as_bytes());
    v.push(u8::try_from(purpose.len()).unwrap_or(u8::MAX));
    v.extend_from_slice(purpose);
    v.extend_from_slice(affiliate.as_bytes());
    v
}

fn decode_pair(v: &[u8]) -> Result<Pair, FenceError> {
    let account = AccountId::from_slice(v.get(..16).ok_or(FenceError::Corrupt)?).ok_or(FenceError::Corrupt)?;
    let len = usize::from(*v.get(16).ok_or(FenceError::Corrupt)?);
    let purpose = v.get(17..17 + len).ok_or(FenceError::Corrupt)?;
    let purpose = std::str::from_utf8(purpose).ok().and_then(Purpose::parse).ok_or(FenceError::Corrupt)?;
    let affiliate = std::str::from_utf8(&v[17 + len..]).map_err(|_| FenceError::Corrupt)?;
    Ok((account, purpose, affiliate.to_owned()))
}

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
    /// Where leases are kept; `None` for a fence in memory only (unit tests).
    tree: Option<sled::Tree>,
}

impl Fence {
    /// The fence over the leases kept in `tree`: every lease found there is live until `now + ttl` unless released
    /// (the relay passes [`LEASE_TTL`]; see the module header).
    pub fn open(tree: sled::Tree, now: Instant, ttl: Duration) -> Result<Self, FenceError> {
        let mut state = State::default();
        if let Some(next) = tree.get(NEXT_KEY)? {
            state.next = u64::from_be_bytes(next.as_ref().try_into().map_err(|_| FenceError::Corrupt)?);
        }
        let mut found = 0usize;
        for item in tree.scan_prefix(b"l") {
            let (key, value) = item?;
            let id = key.get(1..).and_then(|k| k.try_into().ok()).map(u64::from_be_bytes).ok_or(FenceError::Corrupt)?;
            state.next = state.next.max(id);
            state.leases.entry(decode_pair(&value)?).or_default().push((LeaseId(id), now + ttl));
            found += 1;
        }
        if found > 0 {
            tracing::info!(leases = found, "export leases from before the restart count as live until they lapse");
        }
        Ok(Self { state: Mutex::new(state), released: Notify::new(), tree: Some(tree) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a lease on `pair` until `now + ttl`. Take it *before* reading the registry, and make the store durable
    /// before telling the exporter it holds it.
    pub fn acquire(&self, pair: Pair, now: Instant, ttl: Duration) -> Result<(LeaseId, Instant), FenceError> {
        let mut s = self.lock();
        let id = LeaseId(s.next + 1);
        if let Some(tree) = &self.tree {
            let mut batch = sled::Batch::default();
            batch.insert(NEXT_KEY, &id.0.to_be_bytes());
            batch.insert(lease_key(id), encode_pair(&pair));
            tree.apply_batch(batch)?;
        }
        s.next = id.0;
        let deadline = now + ttl;
        s.leases.entry(pair).or_default().push((id, deadline));
        Ok((id, deadline))
    }

    /// Forgets `ids` in the store (released or lapsed). A removal that fails leaves the lease to count again, whole,
    /// after a restart: later, never sooner.
    fn forget(&self, ids: impl IntoIterator<Item = LeaseId>) {
        if let Some(tree) = &self.tree {
            for id in ids {
                if let Err(e) = tree.remove(lease_key(id)) {
                    tracing::warn!(error = %e, lease = id.0, "could not remove a released export lease");
                }
            }
        }
    }

    /// Releases a lease (unknown or expired ids, and ids of another pair, are ignored).
    pub fn release(&self, pair: &Pair, id: LeaseId) {
        let mut s = self.lock();
        let mut found = false;
        if let Some(v) = s.leases.get_mut(pair) {
            let before = v.len();
            v.retain(|(l, _)| *l != id);
            found = v.len() < before;
            if v.is_empty() {
                s.leases.remove(pair);
            }
        }
        // Only a lease of this pair leaves the store: another pair's lease must still count after a restart.
        if found {
            self.forget([id]);
        }
        drop(s);
        self.released.notify_waiters();
    }

    /// The latest deadline among `pair`'s unexpired leases at `now` (expired ones are dropped), if any.
    fn outstanding(&self, pair: &Pair, now: Instant) -> Option<Instant> {
        let mut s = self.lock();
        let v = s.leases.get_mut(pair)?;
        let lapsed: Vec<LeaseId> = v.iter().filter(|(_, d)| *d <= now).map(|(id, _)| *id).collect();
        v.retain(|(_, deadline)| *deadline > now);
        let latest = v.iter().map(|(_, d)| *d).max();
        if v.is_empty() {
            s.leases.remove(pair);
        }
        self.forget(lapsed);
        latest
    }

    /// Waits until `pair` has no unexpired lease. Call after the withdrawal is durable, before acknowledging it.
    pub async fn wait_clear(&self, pair: &Pair) {
        let mut logged = false;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register for wake-ups before looking, so a release between the look and the wait is not missed.
            notified.as_mut().enable();
            let Some(deadline) = self.outstanding(pair, Instant::now()) else { return };
            if !std::mem::replace(&mut logged, true) {
                // The account id only at debug level, like every line naming one.
                tracing::debug!(account = %pair.0, "withdrawal waits for the export leases of its pair");
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }
}
impl LeaseStore for Fence {
    fn acquire(&self, pair: Pair, ttl: Duration) -> BoxFuture<'_, Result<(LeaseId, Instant), FenceError>> {
        Box::pin(std::future::ready(Fence::acquire(self, pair, Instant::now(), ttl)))
    }

    fn release<'a>(&'a self, pair: &'a Pair, id: LeaseId) -> BoxFuture<'a, ()> {
        Fence::release(self, pair, id);
        Box::pin(std::future::ready(()))
    }

    fn wait_clear<'a>(&'a self, pair: &'a Pair) -> BoxFuture<'a, ()> {
        Box::pin(Fence::wait_clear(self, pair))
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
        let (id, _) = fence.acquire(pair(), Instant::now(), LEASE_TTL).expect("lease");
        let waiter = {
            let fence = fence.clone();
            tokio::spawn(async move { fence.wait_clear(&pair()).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "must wait while the lease is held");
        // Another pair's lease does not hold it up.
        fence
            .acquire((AccountId([2; 16]), Purpose::Advertising, "adsco".into()), Instant::now(), LEASE_TTL)
            .expect("lease");
        fence.release(&pair(), id);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("released").expect("join");
    }

    #[tokio::test]
    async fn an_abandoned_lease_expires() {
        let fence = Fence::default();
        let ttl = Duration::from_millis(200);
        let start = Instant::now();
        fence.acquire(pair(), start, ttl).expect("lease");
        // Only a lower bound: it cannot return before the lease deadline (no upper bound on a shared machine).
        tokio::time::timeout(Duration::from_secs(10), fence.wait_clear(&pair())).await.expect("expires");
        assert!(start.elapsed() >= ttl, "held until the lease deadline");
    }

    #[tokio::test]
    async fn no_lease_no_wait() {
        let fence = Fence::default();
        tokio::time::timeout(Duration::from_secs(1), fence.wait_clear(&pair())).await.expect("immediate");
    }

    /// A relay restarted while an export was in flight: the lease it granted before is still counted, so a
    /// withdrawal recorded after the restart waits for it, until it is released (by the id granted before) or has
    /// lapsed a whole TTL after the restart. Lease ids are not reused after a restart, and a released lease is not
    /// brought back.
    #[tokio::test]
    async fn leases_survive_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let other = (AccountId([2; 16]), Purpose::Analytics, "shieldco".to_owned());
        let (held, released) = {
            let db = sled::Config::new().path(dir.path()).open().expect("db");
            let fence =
                Fence::open(db.open_tree("export_leases").expect("tree"), Instant::now(), LEASE_TTL).expect("open");
            let (held, _) = fence.acquire(pair(), Instant::now(), LEASE_TTL).expect("lease");
            let (released, _) = fence.acquire(other.clone(), Instant::now(), LEASE_TTL).expect("lease");
            fence.release(&other, released);
            db.flush().expect("flush");
            (held, released)
        };
        let db = sled::Config::new().path(dir.path()).open().expect("db");
        let fence = std::sync::Arc::new(
            Fence::open(db.open_tree("export_leases").expect("tree"), Instant::now(), LEASE_TTL).expect("reopen"),
        );
        tokio::time::timeout(Duration::from_secs(5), fence.wait_clear(&other)).await.expect("released before");
        let waiter = {
            let fence = fence.clone();
            tokio::spawn(async move { fence.wait_clear(&pair()).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the lease from before the restart holds the withdrawal");
        let (fresh, _) = fence.acquire(other.clone(), Instant::now(), LEASE_TTL).expect("lease");
        assert!(fresh.0 > held.0.max(released.0), "ids are not reused: {fresh:?}");
        fence.release(&pair(), held);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("released").expect("join");
    }

    /// After a restart, an unreleased lease lapses a whole TTL after the fence opened, on this process's clock
    /// (only a lower bound is checked: no upper bound on a shared machine).
    #[tokio::test]
    async fn a_lease_from_before_a_restart_lapses_a_whole_ttl_after_it() {
        let db = sled::Config::new().temporary(true).open().expect("db");
        let tree = db.open_tree("export_leases").expect("tree");
        let before = Fence::open(tree.clone(), Instant::now(), LEASE_TTL).expect("open");
        before.acquire(pair(), Instant::now(), LEASE_TTL).expect("lease");
        let ttl = Duration::from_millis(200);
        let opened = Instant::now();
        let fence = Fence::open(tree.clone(), opened, ttl).expect("reopen");
        tokio::time::timeout(Duration::from_secs(10), fence.wait_clear(&pair())).await.expect("lapses");
        assert!(opened.elapsed() >= ttl, "held a whole TTL after the restart");
        assert!(tree.scan_prefix(b"l").next().is_none(), "a lapsed lease leaves the store");
    }

    /// The sled fence passes the lease conformance suite: each `open` is a relay restarted over the same tree
    /// (leases from before count for a whole [`LEASE_TTL`]).
    struct Sled {
        db: sled::Db,
    }

    impl crate::store::conformance::leases::Fixture for Sled {
        async fn open(&self) -> std::sync::Arc<dyn LeaseStore> {
            let tree = self.db.open_tree("export_leases").expect("tree");
            std::sync::Arc::new(Fence::open(tree, Instant::now(), LEASE_TTL).expect("open"))
        }

        async fn durable(&self) {
            self.db.flush_async().await.expect("flush");
        }

        fn short_ttl(&self) -> Duration {
            Duration::from_millis(200)
        }
    }

    #[tokio::test]
    async fn the_sled_fence_passes_the_lease_conformance_suite() {
        crate::store::conformance::leases::run_all(&|| Sled {
            db: sled::Config::new().temporary(true).open().expect("db"),
        })
        .await;
    }

    #[test]
    fn a_damaged_lease_record_stops_the_fence_from_opening() {
        let db = sled::Config::new().temporary(true).open().expect("db");
        let tree = db.open_tree("export_leases").expect("tree");
        tree.insert(lease_key(LeaseId(1)), &[1, 2, 3][..]).expect("insert");
        assert!(matches!(Fence::open(tree, Instant::now(), LEASE_TTL), Err(FenceError::Corrupt)));
    }
}
