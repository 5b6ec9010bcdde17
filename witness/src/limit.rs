//! A token bucket: how many requests one connection may make, refilled at a fixed rate.
//!
//! Contract: pure logic; the current time comes in as an argument (milliseconds from any fixed origin), so the
//! bucket is tested without sleeping.

/// Requests a connection may make at once before it is slowed down.
pub const BURST: u32 = 32;

/// Requests refilled per second.
pub const PER_SECOND: u32 = 16;

/// A token bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: u32,
    last_ms: u64,
    carry_ms: u64,
}

impl Bucket {
    /// A full bucket at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self { tokens: BURST, last_ms: now_ms, carry_ms: 0 }
    }

    /// Takes one token if there is one at `now_ms`.
    pub fn take(&mut self, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms).saturating_add(self.carry_ms);
        self.last_ms = now_ms.max(self.last_ms);
        let per_token = 1000 / u64::from(PER_SECOND);
        let refill = elapsed / per_token;
        self.carry_ms = elapsed % per_token;
        self.tokens = u32::try_from(u64::from(self.tokens).saturating_add(refill)).unwrap_or(BURST).min(BURST);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_refill_rate() {
        let mut b = Bucket::new(1_000);
        assert!((0..BURST).all(|_| b.take(1_000)), "a full burst");
        assert!(!b.take(1_000), "then empty");
        let per_token = 1000 / u64::from(PER_SECOND);
        assert!(!b.take(1_000 + per_token - 1), "not yet refilled");
        assert!(b.take(1_000 + per_token), "one token later");
        assert!(!b.take(1_000 + per_token));
        // A clock that goes back refills nothing and never panics.
        assert!(!b.take(0));
        assert!(b.take(u64::MAX), "a long pause refills, capped at the burst");
    }
}
