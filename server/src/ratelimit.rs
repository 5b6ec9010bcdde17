//! Token-bucket rate limiting keyed by account: `per_minute` tokens refilled continuously, burst of the same size.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// A rate limiter over keys of type `K`.
pub struct RateLimiter<K> {
    per_minute: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Eq + Hash> RateLimiter<K> {
    /// Allows `per_minute` operations per key per minute, with a burst of `per_minute`.
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute: f64::from(per_minute), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token for `key` at time `now`; false if none is left.
    pub fn allow(&self, key: K, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(key).or_insert((self.per_minute, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.per_minute / 60.0;
        *tokens = (*tokens + refill).min(self.per_minute);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_per_key() {
        let rl = RateLimiter::new(3);
        let t = Instant::now();
        assert!((0..3).all(|_| rl.allow("a", t)));
        assert!(!rl.allow("a", t));
        assert!(rl.allow("b", t), "keys are independent");
        assert!(rl.allow("a", t + Duration::from_secs(20)), "one token back after 20 s at 3/min");
        assert!(!rl.allow("a", t + Duration::from_secs(20)));
    }
}
