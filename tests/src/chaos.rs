//! Randomness for crash campaigns: a small xorshift generator whose seed is printed, so a failing campaign can be
//! replayed with the same kill schedule (`CRASH_SEED=<seed>`). Not for anything cryptographic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The environment variable that fixes a campaign's seed.
pub const SEED_VAR: &str = "CRASH_SEED";

/// A xorshift64* generator.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed` (zero is replaced, xorshift has no zero state).
    pub fn new(seed: u64) -> Self {
        Self { state: if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed } }
    }

    /// The seed from `$CRASH_SEED`, or else from the clock; printed with `campaign`'s name for replay.
    pub fn for_campaign(campaign: &str) -> (Self, u64) {
        let seed = match std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()) {
            Some(seed) => seed,
            None => SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
        };
        println!("{campaign}: seed {seed} (replay with {SEED_VAR}={seed})");
        (Self::new(seed), seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `low..high` (`low` if the range is empty).
    pub fn below(&mut self, low: u64, high: u64) -> u64 {
        if high <= low { low } else { low + self.next_u64() % (high - low) }
    }

    /// A duration between `low` and `high` milliseconds.
    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(self.below(low, high))
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(0, 100) < percent
    }
}
