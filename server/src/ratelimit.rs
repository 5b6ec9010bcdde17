//! Token-bucket rate limiting keyed by account or client address: tokens refilled continuously up to a burst size.
//!
//! Memory stays bounded whatever the number of keys a client can make up (addresses, say): once the table holds
//! [`PRUNE_AT`] keys, every bucket that has refilled completely (an idle key, indistinguishable from a new one) is
//! dropped before a new key is added.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Number of keys at which full buckets are pruned.
pub const PRUNE_AT: usize = 100_000;

/// A rate limiter over keys of type `K`.
pub struct RateLimiter<K> {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

/// The key a client address is limited under: the address itself for IPv4, its /64 prefix for IPv6 (one host
/// usually holds a whole /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl<K: Eq + Hash> RateLimiter<K> {
    /// Allows `per_minute` operations per key per minute, with a burst of `per_minute`.
    pub fn new(per_minute: u32) -> Self {
        Self::with_rate(f64::from(per_minute) / 60.0, f64::from(per_minute))
    }

    /// Allows `per_hour` operations per key per hour, with a burst of `per_hour`.
    pub fn per_hour(per_hour: u32) -> Self {
        Self::with_rate(f64::from(per_hour) / 3600.0, f64::from(per_hour))
    }

    /// Allows `per_second` operations per key per second, with a burst of `burst`.
    pub fn per_second(per_second: u32, burst: u32) -> Self {
        Self::with_rate(f64::from(per_second), f64::from(burst))
    }

    fn with_rate(per_second: f64, burst: f64) -> Self {
        Self { per_second, burst: burst.max(1.0), buckets: Mutex::new(HashMap::new()) }
    }

    /// Number of keys tracked.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes one token for `key` at time `now`; false if none is left.
    pub fn allow(&self, key: K, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= PRUNE_AT && !buckets.contains_key(&key) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, (tokens, last)| {
                *tokens + now.saturating_duration_since(*last).as_secs_f64() * rate < burst
            });
        }
        let (tokens, last) = buckets.entry(key).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts concurrent connections per client address (see [`address_key`]) against a maximum.
pub struct ConnectionLimiter {
    max: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One counted connection; released when dropped.
pub struct ConnectionSlot {
    limiter: std::sync::Arc<ConnectionLimiter>,
    key: IpAddr,
}

impl ConnectionLimiter {
    /// At most `max` concurrent connections per address.
    pub fn new(max: u32) -> Self {
        Self { max, open: Mutex::new(HashMap::new()) }
    }

    /// A slot for a connection from `ip`, or `None` if that address already holds the maximum.
    pub fn try_acquire(self: &std::sync::Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let key = address_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot { limiter: self.clone(), key })
    }

    /// Connections open from the address `ip` counts under.
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&address_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
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

    #[test]
    fn per_hour_refills_one_token_per_share_of_the_hour() {
        let rl = RateLimiter::per_hour(4);
        let t = Instant::now();
        assert_eq!((0..6).filter(|_| rl.allow(1u8, t)).count(), 4);
        assert!(!rl.allow(1u8, t + Duration::from_secs(899)));
        assert!(rl.allow(1u8, t + Duration::from_secs(901)), "one token back after a quarter of an hour at 4/h");
    }

    #[test]
    fn per_second_with_a_larger_burst() {
        let rl = RateLimiter::per_second(10, 20);
        let t = Instant::now();
        assert_eq!((0..25).filter(|_| rl.allow(1u32, t)).count(), 20);
        let later = t + Duration::from_millis(500);
        assert_eq!((0..25).filter(|_| rl.allow(1u32, later)).count(), 5);
    }

    #[test]
    fn idle_keys_are_pruned_so_made_up_keys_cannot_grow_the_table() {
        let rl = RateLimiter::per_second(1, 1);
        let t = Instant::now();
        for k in 0..PRUNE_AT as u32 {
            assert!(rl.allow(k, t));
        }
        assert_eq!(rl.len(), PRUNE_AT);
        // Two seconds later every bucket has refilled: adding a key drops them all.
        assert!(rl.allow(u32::MAX, t + Duration::from_secs(2)));
        assert_eq!(rl.len(), 1);
    }

    #[test]
    fn connection_slots_are_counted_per_address_and_released_on_drop() {
        let limiter = std::sync::Arc::new(ConnectionLimiter::new(2));
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().expect("ip"), "192.0.2.2".parse().expect("ip"));
        let first = limiter.try_acquire(a).expect("first");
        let _second = limiter.try_acquire(a).expect("second");
        assert!(limiter.try_acquire(a).is_none(), "third from the same address");
        assert!(limiter.try_acquire(b).is_some(), "another address is not affected");
        drop(first);
        assert_eq!(limiter.open_from(a), 1);
        assert!(limiter.try_acquire(a).is_some(), "a released slot is reusable");
    }

    #[test]
    fn ipv6_addresses_share_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let v4: IpAddr = "192.0.2.7".parse().expect("ip");
        assert_eq!(address_key(v4), v4);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(address_key(mapped), v4);
    }
}
