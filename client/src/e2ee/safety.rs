//! Safety numbers, after Signal's published description: what two people compare (read aloud or as a QR code)
//! to know that the identity keys their devices use are each other's, not a substitute planted by the relay.
//!
//! For each party: h₀ = empty, hᵢ₊₁ = SHA-512(version ‖ Ed25519 identity key ‖ E.164 phone (UTF-8) ‖ hᵢ), 5200
//! times; the first 30 bytes of the last hash, as six 5-byte big-endian numbers each taken modulo 100000 and
//! written as 5 digits, give 30 digits. The safety number is both parties' 30 digits, the lower first: 60 digits,
//! identical on both sides, shown as 12 groups of 5. The iterations make a search for a key whose number
//! collides with someone else's costly.

use relay_proto::PhoneNumber;
use sha2::{Digest, Sha512};

/// Iterations of SHA-512 per party.
pub const ITERATIONS: usize = 5200;
/// Format version, hashed into every iteration.
const VERSION: [u8; 2] = [0, 0];

/// A 60-digit safety number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SafetyNumber(String);

/// The 30 digits of one party.
fn fingerprint(identity_key: &[u8; 32], phone: &PhoneNumber) -> String {
    let mut hash = Vec::new();
    for _ in 0..ITERATIONS {
        let mut h = Sha512::new();
        h.update(VERSION);
        h.update(identity_key);
        h.update(phone.as_str().as_bytes());
        h.update(&hash);
        hash = h.finalize().to_vec();
    }
    hash[..30]
        .chunks_exact(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

impl SafetyNumber {
    /// The safety number of a conversation between two parties; the order of the two does not matter.
    pub fn new(
        my_identity_key: &[u8; 32],
        my_phone: &PhoneNumber,
        their_identity_key: &[u8; 32],
        their_phone: &PhoneNumber,
    ) -> Self {
        let mine = fingerprint(my_identity_key, my_phone);
        let theirs = fingerprint(their_identity_key, their_phone);
        // Same length, digits only: string order is numeric order.
        Self(if mine <= theirs { mine + &theirs } else { theirs + &mine })
    }

    /// The 60 digits.
    pub fn digits(&self) -> &str {
        &self.0
    }

    /// The 12 groups of 5 digits, as shown.
    pub fn groups(&self) -> Vec<&str> {
        // The string holds ASCII digits only, so every 5-byte boundary is a char boundary.
        (0..self.0.len()).step_by(5).map(|i| &self.0[i..i + 5]).collect()
    }
}

impl std::fmt::Display for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.groups().join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn phone(s: &str) -> PhoneNumber {
        PhoneNumber::parse(s).expect("valid test number")
    }

    #[test]
    fn sixty_digits_in_twelve_groups_identical_from_both_sides() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let (pa, pb) = (phone("+33612345678"), phone("+14155550100"));
        let from_alice = SafetyNumber::new(&alice.identity_key(), &pa, &bob.identity_key(), &pb);
        let from_bob = SafetyNumber::new(&bob.identity_key(), &pb, &alice.identity_key(), &pa);
        assert_eq!(from_alice, from_bob);
        assert_eq!(from_alice.digits().len(), 60);
        assert!(from_alice.digits().bytes().all(|b| b.is_ascii_digit()));
        let groups = from_alice.groups();
        assert_eq!(groups.len(), 12);
        assert!(groups.iter().all(|g| g.len() == 5));
        assert_eq!(from_alice.to_string().len(), 60 + 11);
        let (first, second) = from_alice.digits().split_at(30);
        assert!(first <= second, "lower half first");
    }

    #[test]
    fn changes_when_either_identity_key_or_phone_changes() {
        let (alice, bob, eve) = (Identity::generate(), Identity::generate(), Identity::generate());
        let (pa, pb) = (phone("+33612345678"), phone("+14155550100"));
        let genuine = SafetyNumber::new(&alice.identity_key(), &pa, &bob.identity_key(), &pb);
        let bob_replaced = SafetyNumber::new(&alice.identity_key(), &pa, &eve.identity_key(), &pb);
        let alice_replaced = SafetyNumber::new(&eve.identity_key(), &pa, &bob.identity_key(), &pb);
        let other_phone = SafetyNumber::new(&alice.identity_key(), &pa, &bob.identity_key(), &phone("+14155550101"));
        assert_ne!(genuine, bob_replaced);
        assert_ne!(genuine, alice_replaced);
        assert_ne!(genuine, other_phone);
        // Only the half of the replaced party changes.
        let alice_half = fingerprint(&alice.identity_key(), &pa);
        assert!(genuine.digits().contains(&alice_half) && bob_replaced.digits().contains(&alice_half));
    }

    #[test]
    fn fixed_input_gives_a_fixed_number() {
        // Pins the format: a change to the hashing or the rendering would make every user's number change.
        let n = SafetyNumber::new(&[1; 32], &phone("+33612345678"), &[2; 32], &phone("+14155550100"));
        assert_eq!(n.digits(), "175254460385413640642716514900624395147463910006977269838414");
        assert_eq!(n.digits(), spelled_out([1; 32], "+33612345678", [2; 32], "+14155550100"));
    }

    /// The procedure of the module header, written out independently of `fingerprint`.
    fn spelled_out(key_a: [u8; 32], phone_a: &str, key_b: [u8; 32], phone_b: &str) -> String {
        let one = |key: [u8; 32], phone: &str| {
            let mut h: Vec<u8> = Vec::new();
            for _ in 0..5200 {
                let mut input = vec![0u8, 0u8];
                input.extend_from_slice(&key);
                input.extend_from_slice(phone.as_bytes());
                input.extend_from_slice(&h);
                h = Sha512::digest(&input).to_vec();
            }
            let mut s = String::new();
            for i in 0..6 {
                let mut n = 0u64;
                for b in &h[i * 5..i * 5 + 5] {
                    n = n * 256 + u64::from(*b);
                }
                s.push_str(&format!("{:05}", n % 100000));
            }
            s
        };
        let (a, b) = (one(key_a, phone_a), one(key_b, phone_b));
        if a < b { a + &b } else { b + &a }
    }
}
