//! A connection's byte budget for partially received frames.
//!
//! Contract: the bytes of frames being received on all streams of one connection, copied out of QUIC's flow
//! control into the reader's own buffers, never exceed the budget. A reader takes budget for a frame's whole
//! announced body (at most `MAX_FRAME_LEN`) *before* reading any of it out of quinn, and gives it back when the
//! frame is complete (decoded or refused). Taking it whole means a frame never waits for budget while holding part
//! of it, so the frames of many streams cannot deadlock on each other's partial holds. When the budget is spent,
//! readers wait and the bytes stay in quinn, where the connection's receive window bounds them. A frame's buffer is
//! never allocated to its announced length up front: it grows with the pieces read. The budget may be raised (after
//! authentication), never lowered.
//!
//! A reader that keeps the decoded request while it is served (the relay, until the request is answered) reads
//! with [`crate::read_frame_held`] and keeps the returned [`FrameHold`]: the frame's bytes then stay counted until
//! the hold is dropped, so requests waiting for the disk are bounded by the same budget as frames still arriving.

use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// The largest piece of a frame read out of quinn at once, in bytes.
pub const READ_STEP: usize = 64 * 1024;

/// A connection's byte budget for partially received frames; cheap to clone, shared by the connection's streams.
#[derive(Clone)]
pub struct FrameBudget {
    inner: Arc<Inner>,
}

struct Inner {
    free: Semaphore,
    total: Mutex<usize>,
}

impl FrameBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Self {
        Self { inner: Arc::new(Inner { free: Semaphore::new(bytes), total: Mutex::new(bytes) }) }
    }

    /// Raises the budget to `bytes` (no change if it is already at least that).
    pub fn raise_to(&self, bytes: usize) {
        let mut total = self.inner.total.lock().unwrap_or_else(|p| p.into_inner());
        if bytes > *total {
            self.inner.free.add_permits(bytes - *total);
            *total = bytes;
        }
    }

    /// The budget, in bytes.
    pub fn total(&self) -> usize {
        *self.inner.total.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes not taken by any frame right now.
    pub fn available(&self) -> usize {
        self.inner.free.available_permits()
    }

    /// An empty hold on this budget, for one frame.
    pub(crate) fn hold(&self) -> FrameHold {
        FrameHold { budget: self.clone(), bytes: 0 }
    }
}

/// Budget taken by one frame, being received or being served; given back on drop.
pub struct FrameHold {
    budget: FrameBudget,
    bytes: usize,
}

impl FrameHold {
    /// Takes `more` bytes of budget, waiting until they are free. `more` must not exceed the budget's total (a
    /// frame's pieces are at most [`READ_STEP`] and the budget is checked to be at least one frame).
    pub(crate) async fn take(&mut self, more: usize) {
        let Ok(n) = u32::try_from(more) else { return };
        // The semaphore is never closed, so acquiring fails never; if it did, the read would go on unbudgeted
        // rather than hang.
        if let Ok(permit) = self.budget.inner.free.acquire_many(n).await {
            permit.forget();
            self.bytes += more;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives back `fewer` bytes of what is held (tests of waiting readers).
    #[cfg(test)]
    pub(crate) fn give_back(&mut self, fewer: usize) {
        let fewer = fewer.min(self.bytes);
        self.budget.inner.free.add_permits(fewer);
        self.bytes -= fewer;
    }
}

impl Drop for FrameHold {
    fn drop(&mut self) {
        self.budget.inner.free.add_permits(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn held_bytes_are_given_back_and_waiters_wait_for_them() {
        let budget = FrameBudget::new(100);
        let mut a = budget.hold();
        a.take(80).await;
        assert_eq!(budget.available(), 20);
        let mut b = budget.hold();
        {
            // 30 bytes are not free: polled once, the second frame's take is still pending.
            let take = b.take(30);
            tokio::pin!(take);
            assert!(tokio::time::timeout(std::time::Duration::ZERO, &mut take).await.is_err(), "took too much");
            a.give_back(30);
            take.await;
        }
        assert_eq!(budget.available(), 20);
        drop(a);
        assert_eq!(budget.available(), 70);
        drop(b);
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn raising_adds_the_difference_once() {
        let budget = FrameBudget::new(10);
        budget.raise_to(40);
        budget.raise_to(25);
        assert_eq!((budget.total(), budget.available()), (40, 40));
    }
}
