//! What binds keys to identities, as both ends must compute it: the signature by which a device's Ed25519 identity
//! key vouches for its X25519 sealing key, and the relay's sender certificates.
//!
//! **Key binding.** A device signs, once, with its identity key:
//! `"ConsentRelay_IdentityDH_v1" ‖ identity key (32) ‖ sealing key (32)`. It publishes the signature at
//! registration; the relay checks it there, stores it, and hands it out with the keys in every lookup and bundle,
//! where the client checks it again (a client never relies on the relay's check). The same bytes are the PQXDH
//! identity binding of a session's first message. A sealing key without a valid binding is nobody's.
//!
//! **Sender certificates** (after Signal's sealed-sender model). The relay issues, to an authenticated account, a
//! short-lived statement that the account with this identity key and this sealing key is registered with this phone
//! number. The certificate is a fixed layout, signed as carried (nothing is re-encoded to verify it):
//!
//! ```text
//! certificate = version 0x01 (1) ‖ expires_ms (u64be) ‖ account id (16) ‖ identity key (32) ‖ sealing key (32)
//!             ‖ phone length (u8) ‖ phone (E.164, ASCII)
//! signature   = Ed25519 by the relay's sender-certificate key over "consent-relay sender certificate v1" ‖ certificate
//! ```
//!
//! A decoder refuses anything but that exact layout: another version, trailing bytes, a number that is not strict
//! E.164, or an account id that does not derive from the identity key. Senders put their certificate inside every
//! sealed envelope; the recipient checks the relay's signature (under the key it pinned at registration), the
//! expiry against the time the relay stored the envelope, and that the certificate names the key that signed the
//! message, and shows the certificate's number as the sender.
//!
//! Pure: keys and bytes in, bytes or typed errors out. The relay signs with this module, it never decrypts with it.

use ed25519_dalek::{Signature, Signer};
/// The key types this module signs and verifies with, so that callers need not name the Ed25519 crate.
pub use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::auth::{ACCOUNT_ID_LEN, AccountId, KEY_LEN, SIGNATURE_LEN};
use crate::phone::{MAX_DIGITS, PhoneNumber};

/// Starts the bytes a sealing-key binding signs (the PQXDH identity binding uses the same bytes).
pub const BINDING_LABEL: &[u8] = b"ConsentRelay_IdentityDH_v1";
/// Starts the bytes the relay signs for a sender certificate.
pub const CERTIFICATE_LABEL: &[u8] = b"consent-relay sender certificate v1";
/// The certificate layout this version writes and reads.
pub const CERTIFICATE_VERSION: u8 = 1;
/// How long a certificate the relay issues stays valid.
pub const CERTIFICATE_VALIDITY_MS: u64 = 24 * 3600 * 1000;
/// Bytes of a certificate before the phone number.
const FIXED_LEN: usize = 1 + 8 + ACCOUNT_ID_LEN + 2 * KEY_LEN + 1;

/// Why a binding or a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The signature does not verify (or the key is not a valid Ed25519 key, or the signature is not 64 bytes).
    #[error("signature does not verify")]
    BadSignature,
    /// The certificate is not the layout above.
    #[error("malformed sender certificate: {0}")]
    Malformed(&'static str),
    /// The certificate had expired when the envelope carrying it was stored.
    #[error("sender certificate expired at {expires_ms} (ms since the Unix epoch)")]
    Expired {
        /// When it expired.
        expires_ms: u64,
    },
}

/// The bytes an identity key signs to bind `sealing_key` to itself.
pub fn binding_bytes(identity_key: &[u8; KEY_LEN], sealing_key: &[u8; KEY_LEN]) -> Vec<u8> {
    [BINDING_LABEL, identity_key, sealing_key].concat()
}

/// Checks, strictly, that `signature` by `identity_key` binds `sealing_key` to it.
pub fn verify_binding(
    identity_key: &[u8; KEY_LEN],
    sealing_key: &[u8; KEY_LEN],
    signature: &[u8],
) -> Result<(), IdentityError> {
    let key = VerifyingKey::from_bytes(identity_key).map_err(|_| IdentityError::BadSignature)?;
    let signature = Signature::from_slice(signature).map_err(|_| IdentityError::BadSignature)?;
    key.verify_strict(&binding_bytes(identity_key, sealing_key), &signature).map_err(|_| IdentityError::BadSignature)
}

/// What a sender certificate states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderCertificate {
    /// When it stops being valid (ms since the Unix epoch).
    pub expires_ms: u64,
    /// The sender's account (derived from `identity_key`).
    pub account: AccountId,
    /// The sender's Ed25519 identity key: the key that must have signed the message.
    pub identity_key: [u8; KEY_LEN],
    /// The sender's X25519 sealing key.
    pub sealing_key: [u8; KEY_LEN],
    /// The number the relay verified for the account: what the recipient shows.
    pub phone: PhoneNumber,
}

/// The bytes the relay signs for `certificate` (the encoded certificate, as carried).
pub fn certificate_signed_bytes(certificate: &[u8]) -> Vec<u8> {
    [CERTIFICATE_LABEL, certificate].concat()
}

impl SenderCertificate {
    /// The certificate of the account of `identity_key`.
    pub fn new(identity_key: [u8; KEY_LEN], sealing_key: [u8; KEY_LEN], phone: PhoneNumber, expires_ms: u64) -> Self {
        Self { expires_ms, account: AccountId::from_identity_key(&identity_key), identity_key, sealing_key, phone }
    }

    /// The fixed layout of the module header.
    pub fn encode(&self) -> Vec<u8> {
        let phone = self.phone.as_str().as_bytes();
        let mut out = Vec::with_capacity(FIXED_LEN + phone.len());
        out.push(CERTIFICATE_VERSION);
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out.extend_from_slice(self.account.as_bytes());
        out.extend_from_slice(&self.identity_key);
        out.extend_from_slice(&self.sealing_key);
        // A strict E.164 number is at most 16 bytes.
        out.push(phone.len() as u8);
        out.extend_from_slice(phone);
        out
    }

    /// Decodes exactly the layout of the module header, refusing anything else.
    pub fn decode(bytes: &[u8]) -> Result<Self, IdentityError> {
        if bytes.len() < FIXED_LEN || bytes.len() > FIXED_LEN + 1 + MAX_DIGITS {
            return Err(IdentityError::Malformed("length"));
        }
        let (fixed, phone) = bytes.split_at(FIXED_LEN);
        if fixed[0] != CERTIFICATE_VERSION {
            return Err(IdentityError::Malformed("unknown version"));
        }
        let take = |at: usize, len: usize| &fixed[at..at + len];
        let expires_ms = u64::from_be_bytes(take(1, 8).try_into().map_err(|_| IdentityError::Malformed("expiry"))?);
        let account = AccountId::from_slice(take(9, ACCOUNT_ID_LEN)).ok_or(IdentityError::Malformed("account"))?;
        let key = |at| <[u8; KEY_LEN]>::try_from(take(at, KEY_LEN)).map_err(|_| IdentityError::Malformed("key"));
        let identity_key = key(9 + ACCOUNT_ID_LEN)?;
        let sealing_key = key(9 + ACCOUNT_ID_LEN + KEY_LEN)?;
        if usize::from(fixed[FIXED_LEN - 1]) != phone.len() {
            return Err(IdentityError::Malformed("phone length"));
        }
        let phone = std::str::from_utf8(phone).map_err(|_| IdentityError::Malformed("phone"))?;
        let phone = PhoneNumber::parse(phone).map_err(|_| IdentityError::Malformed("phone is not strict E.164"))?;
        if AccountId::from_identity_key(&identity_key) != account {
            return Err(IdentityError::Malformed("account id does not derive from the identity key"));
        }
        Ok(Self { expires_ms, account, identity_key, sealing_key, phone })
    }

    /// Encodes and signs the certificate with the relay's key.
    pub fn sign(&self, issuer: &SigningKey) -> SignedCertificate {
        let certificate = self.encode();
        let signature = issuer.sign(&certificate_signed_bytes(&certificate)).to_bytes();
        SignedCertificate { certificate, signature }
    }
}

/// A certificate as it travels: its bytes and the relay's signature over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCertificate {
    /// The encoded certificate, exactly as signed.
    pub certificate: Vec<u8>,
    /// The relay's Ed25519 signature over [`certificate_signed_bytes`].
    pub signature: [u8; SIGNATURE_LEN],
}

impl SignedCertificate {
    /// Checks the relay's signature over the bytes as carried, then decodes them, then checks that the certificate
    /// was still valid at `at_ms`.
    pub fn verify(&self, issuer: &VerifyingKey, at_ms: u64) -> Result<SenderCertificate, IdentityError> {
        let signature = Signature::from_bytes(&self.signature);
        issuer
            .verify_strict(&certificate_signed_bytes(&self.certificate), &signature)
            .map_err(|_| IdentityError::BadSignature)?;
        let cert = SenderCertificate::decode(&self.certificate)?;
        if at_ms >= cert.expires_ms {
            return Err(IdentityError::Expired { expires_ms: cert.expires_ms });
        }
        Ok(cert)
    }

    /// From wire fields: the certificate bytes and a signature that must be 64 bytes.
    pub fn from_parts(certificate: &[u8], signature: &[u8]) -> Result<Self, IdentityError> {
        let signature = signature.try_into().map_err(|_| IdentityError::Malformed("signature length"))?;
        Ok(Self { certificate: certificate.to_vec(), signature })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phone() -> PhoneNumber {
        PhoneNumber::parse("+33612345678").expect("valid")
    }

    fn user() -> SigningKey {
        SigningKey::from_bytes(&[1; 32])
    }

    #[test]
    fn a_binding_verifies_for_its_keys_only() {
        let (id, sealing) = (user().verifying_key().to_bytes(), [9; 32]);
        let sig = user().sign(&binding_bytes(&id, &sealing)).to_bytes();
        assert_eq!(verify_binding(&id, &sealing, &sig), Ok(()));
        assert_eq!(verify_binding(&id, &[8; 32], &sig), Err(IdentityError::BadSignature));
        let other = SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes();
        assert_eq!(verify_binding(&other, &sealing, &sig), Err(IdentityError::BadSignature));
        assert_eq!(verify_binding(&id, &sealing, &sig[..63]), Err(IdentityError::BadSignature));
        assert_eq!(verify_binding(&id, &sealing, &[]), Err(IdentityError::BadSignature));
    }

    #[test]
    fn a_certificate_round_trips_and_binds_every_field() {
        let relay = SigningKey::from_bytes(&[7; 32]);
        let cert = SenderCertificate::new(user().verifying_key().to_bytes(), [9; 32], phone(), 2_000);
        let signed = cert.sign(&relay);
        assert_eq!(signed.certificate.len(), FIXED_LEN + 12);
        assert_eq!(signed.verify(&relay.verifying_key(), 1_999), Ok(cert.clone()));
        assert_eq!(signed.verify(&relay.verifying_key(), 2_000), Err(IdentityError::Expired { expires_ms: 2_000 }));
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert_eq!(signed.verify(&other, 0), Err(IdentityError::BadSignature));
        // Every byte is covered by the signature.
        for i in 0..signed.certificate.len() {
            let mut bad = signed.clone();
            bad.certificate[i] ^= 1;
            assert_eq!(bad.verify(&relay.verifying_key(), 0), Err(IdentityError::BadSignature), "byte {i}");
        }
    }

    #[test]
    fn the_decoder_accepts_exactly_one_layout() {
        let cert = SenderCertificate::new(user().verifying_key().to_bytes(), [9; 32], phone(), 2_000);
        let good = cert.encode();
        assert_eq!(SenderCertificate::decode(&good), Ok(cert.clone()));
        let mut v = good.clone();
        v[0] = 2;
        assert_eq!(SenderCertificate::decode(&v), Err(IdentityError::Malformed("unknown version")));
        let mut v = good.clone();
        v.push(b'9');
        assert_eq!(SenderCertificate::decode(&v), Err(IdentityError::Malformed("phone length")));
        assert!(SenderCertificate::decode(&good[..good.len() - 1]).is_err());
        assert!(SenderCertificate::decode(&good[..FIXED_LEN - 1]).is_err());
        assert!(SenderCertificate::decode(&[good.clone(), vec![0; 40]].concat()).is_err());
        // The account id must derive from the identity key.
        let mut v = good.clone();
        v[9] ^= 1;
        assert!(matches!(SenderCertificate::decode(&v), Err(IdentityError::Malformed(_))));
        // The number must be strict E.164, not a free string.
        for bad in ["33612345678", "+3361234567\n", "+33 612345678", "\u{1b}[2J+336"] {
            let mut v = good[..FIXED_LEN].to_vec();
            v[FIXED_LEN - 1] = bad.len() as u8;
            v.extend_from_slice(bad.as_bytes());
            assert!(SenderCertificate::decode(&v).is_err(), "{bad:?}");
        }
    }
}
