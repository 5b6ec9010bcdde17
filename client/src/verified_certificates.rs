//! Sender certificates whose relay signature already verified, so that a recipient checks the relay's signature
//! over a sender's certificate once, not once per envelope: a sender carries the same certificate in every envelope
//! until it expires (a day).
//!
//! Contract:
//! - Bound to one issuer (the relay's sender-certificate key pinned at registration). An entry is keyed by the
//!   certificate's bytes *and* the signature's bytes exactly as carried: a certificate with any other signature,
//!   altered certificate bytes, or another issuer's certificate is a miss, verified in full (and refused if it does
//!   not verify).
//! - Only certificates that verified are kept; a refusal is never remembered, so nothing a sender sends can make a
//!   later genuine certificate fail.
//! - Expiry is checked on every use against the envelope's time, with the same rule as a full verification
//!   ([`SignedCertificate::verify`]): a certificate that has expired is refused even when it is held.
//! - What it saves is the relay-signature verification and the decoding of the certificate, including the
//!   decompression of the sender's identity key. The sender's signature over each message is never cached: the
//!   sealed-sender layer verifies it for every envelope ([`crate::sealed::SealedContent::verify_with`]).
//! - Bounded: at most [`CAPACITY`] certificates; the one inserted first is dropped first. Public data only (no
//!   secrets).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use ed25519_dalek::VerifyingKey;
use relay_proto::identity::{IdentityError, SenderCertificate, SignedCertificate};

/// Most certificates held (one per recent sender: a device has fewer contacts than this).
pub const CAPACITY: usize = 4096;

/// A certificate that verified, with its sender's identity key ready to verify signatures.
#[derive(Debug, Clone)]
pub struct Verified {
    /// What the certificate states.
    pub certificate: SenderCertificate,
    /// The sender's identity key, decompressed.
    pub identity_key: VerifyingKey,
}

/// Certificate bytes ‖ signature bytes, as carried.
type Key = Vec<u8>;

#[derive(Default)]
struct Held {
    by_bytes: HashMap<Key, Arc<Verified>>,
    order: VecDeque<Key>,
}

/// The certificates one issuer signed that verified here (see the module header). Shared by reference.
pub struct VerifiedCertificates {
    issuer: VerifyingKey,
    capacity: usize,
    held: Mutex<Held>,
}

impl VerifiedCertificates {
    /// An empty cache for certificates signed by `issuer`.
    pub fn new(issuer: VerifyingKey) -> Self {
        Self::with_capacity(issuer, CAPACITY)
    }

    /// An empty cache holding at most `capacity` certificates (at least one).
    pub fn with_capacity(issuer: VerifyingKey, capacity: usize) -> Self {
        Self { issuer, capacity: capacity.max(1), held: Mutex::new(Held::default()) }
    }

    /// The issuer's key.
    pub fn issuer(&self) -> &VerifyingKey {
        &self.issuer
    }

    /// Certificates held.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding the lock leaves at worst an entry without its place in `order`: still a verified
        // certificate, so the state is usable.
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The certificate carried as `certificate` with `signature`, if the issuer signed it and it was still valid
    /// at `at_ms`: from the cache when these exact bytes verified before, else verified in full and remembered.
    pub fn verify(&self, certificate: &[u8], signature: &[u8], at_ms: u64) -> Result<Arc<Verified>, IdentityError> {
        let key = [certificate, signature].concat();
        let held = self.lock().by_bytes.get(&key).cloned();
        let verified = match held {
            Some(v) => v,
            None => {
                let signed = SignedCertificate::from_parts(certificate, signature)?;
                let certificate = signed.verify(&self.issuer, at_ms)?;
                let identity_key = VerifyingKey::from_bytes(&certificate.identity_key)
                    .map_err(|_| IdentityError::Malformed("identity key is not an Ed25519 key"))?;
                let v = Arc::new(Verified { certificate, identity_key });
                self.insert(key, v.clone());
                v
            }
        };
        // The rule of `SignedCertificate::verify`, applied to every use, cached or not.
        if at_ms >= verified.certificate.expires_ms {
            return Err(IdentityError::Expired { expires_ms: verified.certificate.expires_ms });
        }
        Ok(verified)
    }

    fn insert(&self, key: Key, v: Arc<Verified>) {
        let mut held = self.lock();
        if held.by_bytes.insert(key.clone(), v).is_none() {
            held.order.push_back(key);
        }
        while held.order.len() > self.capacity {
            if let Some(oldest) = held.order.pop_front() {
                held.by_bytes.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use relay_proto::PhoneNumber;

    use super::*;
    use crate::identity::Identity;

    fn relay() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn certificate(who: &Identity, expires_ms: u64) -> SignedCertificate {
        let phone = PhoneNumber::parse("+33612345678").expect("valid test number");
        SenderCertificate::new(who.identity_key(), who.sealing_key(), phone, expires_ms).sign(&relay())
    }

    #[test]
    fn a_held_certificate_is_refused_once_expired() {
        let cache = VerifiedCertificates::new(relay().verifying_key());
        let c = certificate(&Identity::generate(), 2_000);
        let v = cache.verify(&c.certificate, &c.signature, 1_000).expect("valid");
        assert_eq!(v.certificate.expires_ms, 2_000);
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.verify(&c.certificate, &c.signature, 2_000).err(),
            Some(IdentityError::Expired { expires_ms: 2_000 })
        );
        assert_eq!(cache.len(), 1, "the refusal came from the held entry");
    }

    #[test]
    fn other_bytes_or_another_issuer_are_verified_in_full_and_refusals_not_kept() {
        let cache = VerifiedCertificates::new(relay().verifying_key());
        let c = certificate(&Identity::generate(), 2_000);
        cache.verify(&c.certificate, &c.signature, 1_000).expect("valid");
        let mut bad_signature = c.signature;
        bad_signature[10] ^= 1;
        assert_eq!(cache.verify(&c.certificate, &bad_signature, 1_000).err(), Some(IdentityError::BadSignature));
        let mut bad_bytes = c.certificate.clone();
        bad_bytes[3] ^= 1;
        assert_eq!(cache.verify(&bad_bytes, &c.signature, 1_000).err(), Some(IdentityError::BadSignature));
        assert!(cache.verify(&c.certificate, &c.signature[..63], 1_000).is_err());
        // A certificate another key signed, offered to a cache of the relay's key.
        let other = SigningKey::from_bytes(&[9; 32]);
        let id = Identity::generate();
        let forged = SenderCertificate::new(
            id.identity_key(),
            id.sealing_key(),
            PhoneNumber::parse("+33612345678").expect("valid"),
            2_000,
        )
        .sign(&other);
        assert_eq!(
            cache.verify(&forged.certificate, &forged.signature, 1_000).err(),
            Some(IdentityError::BadSignature)
        );
        assert_eq!(cache.len(), 1, "only the genuine certificate is held");
    }

    #[test]
    fn the_cache_is_bounded_oldest_first() {
        let cache = VerifiedCertificates::with_capacity(relay().verifying_key(), 2);
        let certs: Vec<_> = (0..3).map(|_| certificate(&Identity::generate(), 2_000)).collect();
        for c in &certs {
            cache.verify(&c.certificate, &c.signature, 1_000).expect("valid");
        }
        assert_eq!(cache.len(), 2);
        let held = cache.lock();
        assert!(!held.by_bytes.contains_key(&[&certs[0].certificate[..], &certs[0].signature[..]].concat()));
        assert!(held.by_bytes.contains_key(&[&certs[2].certificate[..], &certs[2].signature[..]].concat()));
    }
}
