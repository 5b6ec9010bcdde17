//! Safety numbers: what two people compare (read aloud, or side by side) to know that the keys their devices use are
//! each other's, not substitutes planted by the relay.
//!
//! The construction is Signal's `NumericFingerprintGenerator` (the displayable fingerprint of libsignal, as checked
//! against its published test vector in the tests below), with this protocol's encodings of its two inputs:
//!
//! - **identifier**: the party's E.164 number as UTF-8, `+` included (Signal's "stable identifier" of that era);
//! - **key**: the party's Ed25519 identity key (32) ‖ X25519 sealing key (32), 64 bytes. A device here has two
//!   long-term keys where Signal has one, and both are covered: substituting either changes the number.
//!
//! For each party: `h = SHA-512(0x00 0x00 ‖ key ‖ identifier ‖ key)`, then 5199 times `h = SHA-512(h ‖ key)` (5200
//! hashes in all). The first 30 bytes of `h`, as six 5-byte big-endian numbers each taken modulo 100000 and written
//! as 5 digits, are the party's 30 digits. The safety number is both parties' digits, the smaller string first: 60
//! digits, identical on both sides, shown as 12 groups of 5. The iterations make a search for keys whose number
//! collides with someone else's costly.

use relay_proto::PhoneNumber;
use sha2::{Digest, Sha512};

/// Hashes per party, as Signal uses for its displayed safety numbers.
pub const ITERATIONS: u32 = 5200;
/// Signal's fingerprint format version, the first bytes hashed.
const VERSION: [u8; 2] = [0, 0];

/// One side of a conversation, as its safety-number half covers it.
#[derive(Debug, Clone, Copy)]
pub struct Party<'a> {
    /// The party's number (the identifier).
    pub phone: &'a PhoneNumber,
    /// Ed25519 identity key.
    pub identity_key: &'a [u8; 32],
    /// X25519 sealing key.
    pub sealing_key: &'a [u8; 32],
}

impl Party<'_> {
    /// The key input of the construction: identity key ‖ sealing key.
    pub fn key_bytes(&self) -> [u8; 64] {
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(self.identity_key);
        k[32..].copy_from_slice(self.sealing_key);
        k
    }
}

/// A 60-digit safety number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SafetyNumber(String);

/// One party's 30 digits from its `identifier` and `key` bytes, by Signal's construction with `iterations` hashes
/// (at least 1).
pub fn fingerprint(iterations: u32, identifier: &[u8], key: &[u8]) -> String {
    let mut hash =
        Sha512::new().chain_update(VERSION).chain_update(key).chain_update(identifier).chain_update(key).finalize();
    for _ in 1..iterations {
        hash = Sha512::new().chain_update(hash).chain_update(key).finalize();
    }
    hash[..30]
        .chunks_exact(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

/// The displayed 60 digits from two parties' halves: the smaller first (same length, digits only, so string order
/// is numeric order and both sides agree).
fn displayable(local: String, remote: String) -> String {
    if local <= remote { local + &remote } else { remote + &local }
}

impl SafetyNumber {
    /// The safety number of a conversation between two parties; the order of the two does not matter.
    pub fn new(me: &Party<'_>, them: &Party<'_>) -> Self {
        let half = |p: &Party<'_>| fingerprint(ITERATIONS, p.phone.as_str().as_bytes(), &p.key_bytes());
        Self(displayable(half(me), half(them)))
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

    fn number(a: &Identity, pa: &PhoneNumber, b: &Identity, pb: &PhoneNumber) -> SafetyNumber {
        let (ai, asl, bi, bsl) = (a.identity_key(), a.sealing_key(), b.identity_key(), b.sealing_key());
        SafetyNumber::new(
            &Party { phone: pa, identity_key: &ai, sealing_key: &asl },
            &Party { phone: pb, identity_key: &bi, sealing_key: &bsl },
        )
    }

    /// Signal's published test vector for its displayable fingerprint (libsignal's `fingerprint_test_v1`, the
    /// same in its Java and C implementations): two 33-byte serialized Curve25519 identity keys, the numbers
    /// `+14152222222` and `+14153333333` as stable identifiers, 5200 iterations.
    #[test]
    fn the_construction_reproduces_signals_published_vector() {
        let alice = hex::decode("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868").expect("hex");
        let bob = hex::decode("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b").expect("hex");
        let a = fingerprint(5200, b"+14152222222", &alice);
        let b = fingerprint(5200, b"+14153333333", &bob);
        assert_eq!(displayable(a.clone(), b.clone()), "300354477692869396892869876765458257569162576843440918079131");
        assert_eq!(displayable(b, a), "300354477692869396892869876765458257569162576843440918079131");
    }

    #[test]
    fn sixty_digits_in_twelve_groups_identical_from_both_sides() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let (pa, pb) = (phone("+33612345678"), phone("+14155550100"));
        let from_alice = number(&alice, &pa, &bob, &pb);
        let from_bob = number(&bob, &pb, &alice, &pa);
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
    fn changes_when_either_key_or_the_number_changes() {
        let (alice, bob, eve) = (Identity::generate(), Identity::generate(), Identity::generate());
        let (pa, pb) = (phone("+33612345678"), phone("+14155550100"));
        let genuine = number(&alice, &pa, &bob, &pb);
        assert_ne!(genuine, number(&alice, &pa, &eve, &pb), "bob's identity replaced");
        assert_ne!(genuine, number(&eve, &pa, &bob, &pb), "alice's identity replaced");
        assert_ne!(genuine, number(&alice, &pa, &bob, &phone("+14155550101")), "another number");
        // Only the sealing key replaced (a relay's own X25519 key next to Bob's identity key).
        let (ai, asl, bi) = (alice.identity_key(), alice.sealing_key(), bob.identity_key());
        let relay_key = eve.sealing_key();
        let swapped = SafetyNumber::new(
            &Party { phone: &pa, identity_key: &ai, sealing_key: &asl },
            &Party { phone: &pb, identity_key: &bi, sealing_key: &relay_key },
        );
        assert_ne!(genuine, swapped, "bob's sealing key replaced");
        // Only the half of the replaced party changes.
        let alice_half = fingerprint(
            ITERATIONS,
            pa.as_str().as_bytes(),
            &Party { phone: &pa, identity_key: &ai, sealing_key: &asl }.key_bytes(),
        );
        assert!(genuine.digits().contains(&alice_half) && swapped.digits().contains(&alice_half));
    }

    /// The procedure of the module header, written out independently of `fingerprint`.
    #[test]
    fn fixed_input_gives_the_number_the_header_describes() {
        let one = |key: &[u8], id: &str| {
            let mut input = vec![0u8, 0u8];
            input.extend_from_slice(key);
            input.extend_from_slice(id.as_bytes());
            input.extend_from_slice(key);
            let mut h = Sha512::digest(&input).to_vec();
            for _ in 1..5200 {
                h = Sha512::digest([h.as_slice(), key].concat()).to_vec();
            }
            let mut s = String::new();
            for i in 0..6 {
                let n = h[i * 5..i * 5 + 5].iter().fold(0u64, |n, b| n * 256 + u64::from(*b));
                s.push_str(&format!("{:05}", n % 100000));
            }
            s
        };
        let (a, b) =
            (one(&[[1; 32], [3; 32]].concat(), "+33612345678"), one(&[[2; 32], [4; 32]].concat(), "+14155550100"));
        let n = SafetyNumber::new(
            &Party { phone: &phone("+33612345678"), identity_key: &[1; 32], sealing_key: &[3; 32] },
            &Party { phone: &phone("+14155550100"), identity_key: &[2; 32], sealing_key: &[4; 32] },
        );
        assert_eq!(n.digits(), if a <= b { a + &b } else { b + &a });
    }
}
