//! Retry timing and the randomness the exporter's rules use, injected so that the rules can be replayed exactly.
//!
//! Contract: the delay after `n` failed attempts is 1 s doubled `n - 1` times, at most 10 min, then scaled by a
//! factor drawn uniformly from 0.8 to 1.2 (jitter, so that retries of many entries do not fall due together); the
//! only sources of chance in the core are [`Entropy::jitter`] and [`Entropy::nonce`].

use std::time::Duration;

/// First retry delay.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay (before jitter).
pub const RETRY_MAX: Duration = Duration::from_secs(600);

/// Where the core's chance comes from.
pub trait Entropy: Send + Sync {
    /// A uniformly random number, for retry jitter.
    fn jitter(&mut self) -> u64;
    /// 16 uniformly random bytes: an event body's nonce, which makes its hash in the log unguessable.
    fn nonce(&mut self) -> [u8; 16];
}

/// The operating system's randomness (through `rand`), for the running exporter.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemEntropy;

impl Entropy for SystemEntropy {
    fn jitter(&mut self) -> u64 {
        rand::random()
    }

    fn nonce(&mut self) -> [u8; 16] {
        rand::random()
    }
}

/// The delay before the next attempt after `attempts` failures, with `random` (from [`Entropy::jitter`]) choosing
/// the jitter: 1 s doubling to 10 min, within ±20 %.
pub fn backoff(attempts: u32, random: u64) -> Duration {
    let base = RETRY_BASE.saturating_mul(1u32 << attempts.saturating_sub(1).min(20)).min(RETRY_MAX);
    let ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
    let jitter = random % (ms * 2 / 5 + 1);
    Duration::from_millis(ms * 4 / 5 + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_ten_minutes_within_a_fifth_either_way() {
        let ms = |d: Duration| d.as_millis();
        // The smallest and largest jitter, exactly.
        assert_eq!([ms(backoff(1, 0)), ms(backoff(1, 400))], [800, 1_200]);
        assert_eq!(ms(backoff(1, 401)), 800, "the draw wraps within the range");
        assert_eq!([ms(backoff(2, 0)), ms(backoff(3, 0)), ms(backoff(4, 1_600))], [1_600, 3_200, 8_000]);
        assert_eq!([ms(backoff(10, 0)), ms(backoff(11, 0))], [409_600, 480_000], "capped at 10 min before jitter");
        assert_eq!([ms(backoff(40, 0)), ms(backoff(u32::MAX, 240_000))], [480_000, 720_000]);
        assert_eq!(ms(backoff(0, 0)), 800, "no failure yet counts as the first");
        let mut system = SystemEntropy;
        for _ in 0..32 {
            let d = backoff(3, system.jitter());
            assert!(d >= Duration::from_millis(3_200) && d <= Duration::from_millis(4_800), "{d:?}");
        }
    }
}
