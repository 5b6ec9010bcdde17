//! Registration locks (Signal's model): an account may set a PIN; while the account has been active within
//! [`LOCK_INACTIVITY_MS`] (7 days), another identity that proves the number with a code still needs the PIN to take
//! the number over. After 7 days without the old identity authenticating, the lock lapses and the code alone is
//! enough, so a lost phone *and* a forgotten PIN cost a week, not the number.
//!
//! Contract: the PIN is never stored; the record holds a PBKDF2-HMAC-SHA256 verifier (random 16-byte salt,
//! [`PBKDF2_ITERATIONS`] iterations, *ring*'s implementation, compared in constant time by `pbkdf2::verify`), so a
//! copy of the store does not give the PIN back without a slow search per account. Deriving takes a noticeable
//! fraction of a second on purpose: callers run it off the async threads.

use std::num::NonZeroU32;

use relay_proto::verification::{LOCK_INACTIVITY_MS, RegistrationPin};
use ring::pbkdf2;

/// PBKDF2 iterations for a new lock (OWASP's figure for PBKDF2-HMAC-SHA256). Stored per record, so it can rise.
pub const PBKDF2_ITERATIONS: NonZeroU32 = NonZeroU32::new(600_000).expect("a positive constant");
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;
const VERSION: u8 = 1;
const ENCODED_LEN: usize = 1 + 4 + SALT_LEN + HASH_LEN + 8;

/// A registration lock as stored under its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lock {
    iterations: NonZeroU32,
    salt: [u8; SALT_LEN],
    verifier: [u8; HASH_LEN],
    /// Last time the account authenticated or registered (ms since the Unix epoch, relay clock).
    pub last_active_ms: u64,
}

impl Lock {
    /// A lock for `pin`, set at `now_ms` (setting it is activity). Slow: see the module header.
    pub fn new(pin: &RegistrationPin, now_ms: u64) -> Self {
        Self::with_iterations(pin, now_ms, PBKDF2_ITERATIONS)
    }

    fn with_iterations(pin: &RegistrationPin, now_ms: u64, iterations: NonZeroU32) -> Self {
        let salt: [u8; SALT_LEN] = rand::random();
        let mut verifier = [0u8; HASH_LEN];
        pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, iterations, &salt, pin.as_bytes(), &mut verifier);
        Self { iterations, salt, verifier, last_active_ms: now_ms }
    }

    /// Whether `pin` is this lock's. Slow: see the module header.
    pub fn verify(&self, pin: &RegistrationPin) -> bool {
        pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA256, self.iterations, &self.salt, pin.as_bytes(), &self.verifier).is_ok()
    }

    /// Whether the lock still protects the number at `now_ms`: its account was active within the period.
    pub fn holds(&self, now_ms: u64) -> bool {
        now_ms < self.last_active_ms.saturating_add(LOCK_INACTIVITY_MS)
    }

    /// The same lock with activity at `now_ms` (never moved back).
    pub fn touched(self, now_ms: u64) -> Self {
        Self { last_active_ms: self.last_active_ms.max(now_ms), ..self }
    }

    /// Milliseconds the lock still holds at `now_ms` (0 once it lapsed).
    pub fn remaining_ms(&self, now_ms: u64) -> u64 {
        self.last_active_ms.saturating_add(LOCK_INACTIVITY_MS).saturating_sub(now_ms)
    }

    /// The stored bytes.
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut b = [0u8; ENCODED_LEN];
        b[0] = VERSION;
        b[1..5].copy_from_slice(&self.iterations.get().to_be_bytes());
        b[5..21].copy_from_slice(&self.salt);
        b[21..53].copy_from_slice(&self.verifier);
        b[53..61].copy_from_slice(&self.last_active_ms.to_be_bytes());
        b
    }

    /// Parses stored bytes; `None` if they are not a version-1 record.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != ENCODED_LEN || b[0] != VERSION {
            return None;
        }
        Some(Self {
            iterations: NonZeroU32::new(u32::from_be_bytes(b[1..5].try_into().ok()?))?,
            salt: b[5..21].try_into().ok()?,
            verifier: b[21..53].try_into().ok()?,
            last_active_ms: u64::from_be_bytes(b[53..61].try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(s: &str) -> RegistrationPin {
        RegistrationPin::parse(s).expect("valid pin")
    }

    /// Few iterations: the rules, not the cost, are under test here.
    fn quick(p: &str, now: u64) -> Lock {
        Lock::with_iterations(&pin(p), now, NonZeroU32::new(10).expect("nonzero"))
    }

    #[test]
    fn the_pin_verifies_and_is_not_stored() {
        let lock = quick("271828", 0);
        assert!(lock.verify(&pin("271828")));
        assert!(!lock.verify(&pin("271829")));
        let bytes = lock.encode();
        assert!(!bytes.windows(6).any(|w| w == b"271828"), "the PIN is not in the record");
        assert_ne!(quick("271828", 0).verifier, lock.verifier, "salted: the same PIN gives another verifier");
        assert_eq!(Lock::decode(&bytes), Some(lock));
        assert_eq!(Lock::decode(&bytes[1..]), None);
    }

    #[test]
    fn the_lock_holds_for_seven_days_after_the_last_activity() {
        let lock = quick("1234", 1_000);
        assert!(lock.holds(1_000 + LOCK_INACTIVITY_MS - 1));
        assert!(!lock.holds(1_000 + LOCK_INACTIVITY_MS));
        let later = lock.touched(5_000);
        assert!(later.holds(1_000 + LOCK_INACTIVITY_MS), "activity extends it");
        assert_eq!(later.touched(10).last_active_ms, 5_000, "never moved back");
        assert_eq!(later.remaining_ms(5_000 + LOCK_INACTIVITY_MS + 1), 0);
        assert!(later.verify(&pin("1234")), "touching keeps the PIN");
    }

    #[test]
    fn new_locks_use_the_full_iteration_count() {
        let lock = Lock::new(&pin("0000"), 0);
        assert_eq!(lock.iterations, PBKDF2_ITERATIONS);
        assert!(lock.verify(&pin("0000")));
    }
}
