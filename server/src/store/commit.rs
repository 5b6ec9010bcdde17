//! Group commit: every acknowledged write waits for a flush of the database, but concurrent writers share one flush.
//!
//! A writer first applies its change to sled (in memory), then takes a ticket and waits until a flush that started
//! after the ticket was issued has completed. One flusher task runs flushes back to back while tickets are
//! outstanding, so under load each `fsync` covers every write that arrived during the previous one. Nothing is ever
//! acknowledged before the flush that covers it has succeeded; a failed flush fails every ticket it covered.
//!
//! Flushes start at most every [`MIN_FLUSH_INTERVAL`]. Where `fsync` is fast, back-to-back flushes would each cover
//! a handful of writes and spend a flush's CPU (sealing sled's log buffer, a write, an `fsync`, thread hand-offs) on
//! each; spacing them makes every flush under load cover the whole interval's writes, for at most that much added
//! latency. A write after a quiet interval is flushed at once.
//!
//! A store that keeps writes in memory until the flush (the round-log mailboxes) registers a [`BeforeFlush`] hook:
//! the flusher runs it after reading which tickets the flush will serve and before flushing, so what the hook writes
//! is covered by that flush; if the hook fails, the flush fails. [`GroupCommit::request_flush`] asks for a flush
//! that no writer waits for (removals that should reach the disk soon).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::histogram::Histogram;

/// Bucket bounds for flush batch sizes (writes made durable by one flush).
pub const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192];
/// Bucket bounds for flush latency, in nanoseconds (50 µs to 2.5 s).
pub const LATENCY_BOUNDS_NS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];

/// Shortest time between the starts of two flushes.
pub const MIN_FLUSH_INTERVAL: Duration = Duration::from_millis(1);

/// Faults to inject into the store's durability path, for tests of what the relay does when the disk fails. The
/// relay never sets them itself; an injected failure takes exactly the path a real flush error (a full or failing
/// disk) takes.
#[derive(Debug, Default)]
pub struct StorageFaults {
    fail_flushes: std::sync::atomic::AtomicBool,
    hold_flushes: std::sync::atomic::AtomicBool,
}

impl StorageFaults {
    /// Makes flushes wait (`true`), as a stalled disk would, or go on again (`false`): nothing is acknowledged
    /// meanwhile.
    pub fn hold_flushes(&self, hold: bool) {
        self.hold_flushes.store(hold, Ordering::SeqCst);
    }

    /// Makes every flush from now on fail (`true`) or behave normally again (`false`).
    pub fn fail_flushes(&self, fail: bool) {
        self.fail_flushes.store(fail, Ordering::SeqCst);
    }
}

/// Written into the database by the flusher before each flush (see the module's contract).
pub type BeforeFlush = Box<dyn Fn() -> Result<(), sled::Error> + Send + Sync>;

/// A flush failed: the writes it covered may not be durable and must not be acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage flush failed: {0}")]
pub struct CommitError(pub String);

#[derive(Debug, Clone, Default)]
struct Flushed {
    /// Every ticket up to this one is durable.
    durable: u64,
    /// Every ticket above `durable` and up to this one was covered by a failed flush.
    failed: u64,
    error: Option<String>,
}

/// Counters describing the flushes done so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitStats {
    /// Flushes completed.
    pub flushes: u64,
    /// Tickets (acknowledged writes) covered by those flushes.
    pub tickets: u64,
}

/// The group-commit barrier.
pub struct GroupCommit {
    issued: AtomicU64,
    /// A flush was asked for without a ticket.
    requested: std::sync::atomic::AtomicBool,
    wake: Arc<Notify>,
    flushed: watch::Sender<Flushed>,
    flushes: AtomicU64,
    batch_sizes: Histogram,
    latencies: Histogram,
    faults: Arc<StorageFaults>,
}

impl GroupCommit {
    /// Starts the flusher task for `db`. The task ends when the last `Arc` is dropped.
    pub fn start(db: sled::Db) -> Arc<Self> {
        Self::start_with(db, None)
    }

    /// Like [`GroupCommit::start`], running `before_flush` before every flush.
    pub fn start_with(db: sled::Db, before_flush: Option<BeforeFlush>) -> Arc<Self> {
        let gc = Arc::new(Self {
            issued: AtomicU64::new(0),
            requested: std::sync::atomic::AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
            flushed: watch::Sender::new(Flushed::default()),
            flushes: AtomicU64::new(0),
            batch_sizes: Histogram::new(BATCH_BOUNDS, 1.0),
            latencies: Histogram::new(LATENCY_BOUNDS_NS, 1e9),
            faults: Arc::new(StorageFaults::default()),
        });
        let weak = Arc::downgrade(&gc);
        let wake = gc.wake.clone();
        tokio::spawn(async move {
            let mut last_start: Option<Instant> = None;
            loop {
                let Some(gc) = weak.upgrade() else { return };
                let target = gc.issued.load(Ordering::SeqCst);
                let done = {
                    let f = gc.flushed.borrow();
                    f.durable.max(f.failed)
                };
                let requested = gc.requested.swap(false, Ordering::SeqCst);
                if target <= done && !requested {
                    // A permit stored by `notify_one` before this point makes the wait return at once.
                    drop(gc);
                    wake.notified().await;
                    continue;
                }
                let now = Instant::now();
                let next = last_start.map(|t| t + MIN_FLUSH_INTERVAL).filter(|next| *next > now);
                if let Some(next) = next {
                    // Writes arriving meanwhile join this flush.
                    drop(gc);
                    tokio::time::sleep_until(next.into()).await;
                    continue;
                }
                if gc.faults.hold_flushes.load(Ordering::SeqCst) {
                    drop(gc);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let started = Instant::now();
                last_start = Some(started);
                let written = before_flush.as_ref().map_or(Ok(()), |hook| hook());
                let result = if let Err(e) = written {
                    Err(e)
                } else if gc.faults.fail_flushes.load(Ordering::SeqCst) {
                    Err(sled::Error::Io(std::io::Error::other("injected flush failure")))
                } else {
                    db.flush_async().await.map(drop)
                };
                gc.flushes.fetch_add(1, Ordering::Relaxed);
                if target > done {
                    gc.batch_sizes.record(target - done);
                }
                gc.latencies.record(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
                gc.flushed.send_modify(|f| match result {
                    Ok(()) => f.durable = f.durable.max(target),
                    Err(ref e) => {
                        f.failed = f.failed.max(target);
                        f.error = Some(e.to_string());
                    }
                });
                tracing::trace!(target, elapsed_us = started.elapsed().as_micros() as u64, "group flush");
            }
        });
        gc
    }

    /// Waits until every write applied before this call is durable.
    ///
    /// Callers apply their write first, then await this: the ticket is taken after the write, so the flush that
    /// serves it started after the write and covers it.
    pub async fn durable(&self) -> Result<(), CommitError> {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.flushed.subscribe();
        self.wake.notify_one();
        let state = rx
            .wait_for(|f| f.durable >= ticket || f.failed >= ticket)
            .await
            .map_err(|_| CommitError("store closed".into()))?;
        if state.durable >= ticket { Ok(()) } else { Err(CommitError(state.error.clone().unwrap_or_default())) }
    }

    /// Asks for a flush soon without waiting for it (at most one flush interval later).
    pub fn request_flush(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// The fault injector of this store (tests only).
    #[doc(hidden)]
    pub fn faults(&self) -> Arc<StorageFaults> {
        self.faults.clone()
    }

    /// Writes covered per flush.
    pub fn batch_sizes(&self) -> &Histogram {
        &self.batch_sizes
    }

    /// Duration of each flush.
    pub fn latencies(&self) -> &Histogram {
        &self.latencies
    }

    /// Flushes done and tickets served so far.
    pub fn stats(&self) -> CommitStats {
        CommitStats { flushes: self.flushes.load(Ordering::Relaxed), tickets: self.flushed.borrow().durable }
    }
}

impl super::backend::Durability for GroupCommit {
    fn durable(&self) -> super::backend::BoxFuture<'_, Result<(), CommitError>> {
        Box::pin(GroupCommit::durable(self))
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        // Wakes the flusher so that it sees the last reference is gone and exits.
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        let tree = db.open_tree("t").expect("tree");
        let gc = GroupCommit::start(db.clone());
        let mut tasks = Vec::new();
        for i in 0u32..500 {
            let (gc, tree) = (gc.clone(), tree.clone());
            tasks.push(tokio::spawn(async move {
                tree.insert(i.to_be_bytes(), &[1u8; 64][..]).expect("insert");
                gc.durable().await
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("durable");
        }
        let stats = gc.stats();
        assert_eq!(stats.tickets, 500);
        assert!(stats.flushes < 500, "{} flushes for 500 writes: no grouping", stats.flushes);
        assert_eq!(tree.len(), 500);
    }
}
