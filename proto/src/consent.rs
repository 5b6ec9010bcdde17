//! Consent: the closed catalogue of purposes with their notices, and consent statements signed by a user's identity
//! key. Pure logic: bytes and the current time go in, decisions come out.
//!
//! A statement says: account A, for affiliate F and purpose P, grants (or withdraws) consent, having been shown the
//! notice with hash H, as its statement number S, at time T, optionally until time E. The user's Ed25519 identity key
//! signs its canonical encoding, so the relay (which stores it) cannot forge or alter one; anyone holding the
//! account's identity key can check it. For each (affiliate, purpose) the statement with the highest sequence number
//! wins. Everything is denied by default. A grant is *in force* at time t when it is the latest statement for its
//! pair, t is within [T, E), and H is the hash of the purpose's *current* notice: a material change of a notice (a
//! new version) voids earlier grants to it until the user grants again.
//!
//! The encoding is canonical and checked to be: a statement has exactly one encoding, and [`ConsentStatement::decode`]
//! refuses any bytes that do not re-encode to themselves. Signatures are over the bytes as received
//! ([`verify_signature`], [`signed_bytes_of`]); hashes too ([`statement_hash`]). A verifier that re-encodes a decoded
//! statement instead gets the same bytes, by that check.

use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::AccountId;

/// A purpose a user can consent to. The catalogue is closed: anything else is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Purpose {
    /// Protecting accounts and the service against abuse and fraud.
    Security,
    /// Aggregate measurement of how the service is used.
    Analytics,
    /// Advertising by the affiliate.
    Advertising,
    /// Conversations with businesses on the affiliate's platform.
    BusinessMessaging,
}

/// Every purpose, in catalogue order.
pub const PURPOSES: [Purpose; 4] =
    [Purpose::Security, Purpose::Analytics, Purpose::Advertising, Purpose::BusinessMessaging];

/// A notice shown to the user before consenting to a purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    /// The purpose.
    pub purpose: Purpose,
    /// Version; a new version is a material change.
    pub version: u32,
    /// The text shown.
    pub text: &'static str,
}

impl Notice {
    /// SHA-256 of version and text: what a statement commits to.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::new()
            .chain_update(b"consent-relay notice v1")
            .chain_update(self.purpose.as_str().as_bytes())
            .chain_update(self.version.to_be_bytes())
            .chain_update(self.text.as_bytes())
            .finalize()
            .into()
    }
}

impl Purpose {
    /// The catalogue name (`security`, `analytics`, `advertising`, `business_messaging`).
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Security => "security",
            Purpose::Analytics => "analytics",
            Purpose::Advertising => "advertising",
            Purpose::BusinessMessaging => "business_messaging",
        }
    }

    /// Parses a catalogue name; anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        PURPOSES.into_iter().find(|p| p.as_str() == s)
    }

    /// The current notice of this purpose.
    pub fn notice(self) -> Notice {
        let text = match self {
            Purpose::Security => {
                "The affiliate may receive the fields listed for it to detect and stop spam, fraud and account \
                 takeover. It may keep them for 90 days. Refusing does not change how messaging works for you."
            }
            Purpose::Analytics => {
                "The affiliate may receive the fields listed for it to count how the service is used, in aggregate. \
                 It may keep them for 12 months. Refusing does not change how messaging works for you."
            }
            Purpose::Advertising => {
                "The affiliate may receive the fields listed for it to choose and measure advertising shown to you \
                 on its own services. It may keep them until you withdraw. Refusing does not change how messaging \
                 works for you."
            }
            Purpose::BusinessMessaging => {
                "The affiliate may receive the fields listed for it so that businesses you write to on its \
                 platform can reach you. It may keep them until you withdraw. Refusing does not change how \
                 messaging works for you."
            }
        };
        Notice { purpose: self, version: 1, text }
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Grant or withdraw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Consent given.
    Grant,
    /// Consent withdrawn.
    Withdraw,
}

/// Longest affiliate id.
pub const MAX_AFFILIATE_LEN: usize = 32;

/// Whether `id` is a well-formed affiliate id: 1 to 32 of `a-z`, `0-9`, `_`, `-`.
pub fn valid_affiliate_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_AFFILIATE_LEN
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Why a consent statement is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsentError {
    /// The bytes are not a statement of this version.
    #[error("malformed consent statement: {0}")]
    Malformed(&'static str),
    /// The purpose is not in the catalogue.
    #[error("unknown purpose {0:?}")]
    UnknownPurpose(String),
    /// The affiliate id is not well formed.
    #[error("invalid affiliate id {0:?} (1-32 of a-z, 0-9, _ and -)")]
    InvalidAffiliate(String),
    /// A grant names a notice that is not the purpose's current one.
    #[error("the notice of purpose {0} has changed: review it and grant again")]
    StaleNotice(Purpose),
    /// The signature does not verify with the account's identity key.
    #[error("consent statement signature does not verify")]
    BadSignature,
    /// The statement is for another account.
    #[error("consent statement is for another account")]
    WrongAccount,
    /// The sequence number does not increase (a replayed or reordered statement).
    #[error("sequence number {got} is not above the last accepted {last}")]
    StaleSequence {
        /// Received.
        got: u64,
        /// Last accepted.
        last: u64,
    },
    /// Expiry is not after the statement time.
    #[error("expiry must be after the statement time")]
    BadExpiry,
}

/// A consent statement (unsigned part).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentStatement {
    /// Whose consent.
    pub account: AccountId,
    /// To which affiliate.
    pub affiliate: String,
    /// For which purpose.
    pub purpose: Purpose,
    /// Grant or withdraw.
    pub decision: Decision,
    /// Hash of the notice the user was shown.
    pub notice_hash: [u8; 32],
    /// Per-account sequence number; each statement's is above every earlier one.
    pub sequence: u64,
    /// When the user made it (ms since the Unix epoch).
    pub time_ms: u64,
    /// When a grant lapses (ms since the Unix epoch), if ever.
    pub expires_ms: Option<u64>,
}

const VERSION: u8 = 1;
const LABEL: &[u8] = b"consent-relay consent statement v1";

/// The bytes an identity key signs for the statement encoded as `encoded`: a label, then those very bytes.
pub fn signed_bytes_of(encoded: &[u8]) -> Vec<u8> {
    [LABEL, encoded].concat()
}

/// SHA-256 of a statement's encoding as received: how the relay's acknowledgement, export leases and the export log
/// refer to it.
pub fn statement_hash(encoded: &[u8]) -> [u8; 32] {
    Sha256::digest(encoded).into()
}

/// Checks `signature` (Ed25519, strict) by `identity_key` over the statement bytes as received, before anything
/// decodes them.
pub fn verify_signature(encoded: &[u8], signature: &[u8], identity_key: &VerifyingKey) -> Result<(), ConsentError> {
    let signature = Signature::from_slice(signature).map_err(|_| ConsentError::BadSignature)?;
    identity_key.verify_strict(&signed_bytes_of(encoded), &signature).map_err(|_| ConsentError::BadSignature)
}

impl ConsentStatement {
    /// Canonical encoding: version, then fixed-size fields and one length-prefixed affiliate id. This is what is
    /// signed, stored, and hashed into the export log.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.push(VERSION);
        out.extend_from_slice(self.account.as_bytes());
        out.push(self.affiliate.len() as u8); // at most MAX_AFFILIATE_LEN: checked by `validate`
        out.extend_from_slice(self.affiliate.as_bytes());
        out.push(PURPOSES.iter().position(|p| *p == self.purpose).unwrap_or(0) as u8);
        out.push(match self.decision {
            Decision::Grant => 1,
            Decision::Withdraw => 2,
        });
        out.extend_from_slice(&self.notice_hash);
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.unwrap_or(0).to_be_bytes());
        out
    }

    /// Decodes and validates the canonical encoding (no trailing bytes): what a new statement must pass.
    pub fn decode(b: &[u8]) -> Result<Self, ConsentError> {
        let s = Self::decode_stored(b)?;
        s.validate()?;
        Ok(s)
    }

    /// Decodes a statement recorded earlier: the encoding and the affiliate id are checked, but not that a grant's
    /// notice is still current (a later notice change voids the grant, see [`ConsentStatement::in_force`], but the
    /// record stays readable for history and audit).
    pub fn decode_stored(b: &[u8]) -> Result<Self, ConsentError> {
        let s = Self::parse(b)?;
        // Every field above is read back exactly, so this cannot fail today; it keeps "one statement, one encoding"
        // true if the format ever gains a field with more than one spelling, since verifiers may re-encode.
        if s.encode() != b {
            return Err(ConsentError::Malformed("not the canonical encoding"));
        }
        Ok(s)
    }

    fn parse(b: &[u8]) -> Result<Self, ConsentError> {
        let mut r = Reader(b);
        if r.take(1)?[0] != VERSION {
            return Err(ConsentError::Malformed("unknown version"));
        }
        let account = AccountId::from_slice(r.take(16)?).ok_or(ConsentError::Malformed("account"))?;
        let len = usize::from(r.take(1)?[0]);
        let affiliate = std::str::from_utf8(r.take(len)?).map_err(|_| ConsentError::Malformed("affiliate"))?.to_owned();
        let purpose = *PURPOSES.get(usize::from(r.take(1)?[0])).ok_or(ConsentError::Malformed("purpose"))?;
        let decision = match r.take(1)?[0] {
            1 => Decision::Grant,
            2 => Decision::Withdraw,
            _ => return Err(ConsentError::Malformed("decision")),
        };
        let notice_hash = r.array()?;
        let sequence = u64::from_be_bytes(r.array()?);
        let time_ms = u64::from_be_bytes(r.array()?);
        let expires = u64::from_be_bytes(r.array()?);
        if !r.0.is_empty() {
            return Err(ConsentError::Malformed("trailing bytes"));
        }
        if !valid_affiliate_id(&affiliate) {
            return Err(ConsentError::InvalidAffiliate(affiliate));
        }
        Ok(Self {
            account,
            affiliate,
            purpose,
            decision,
            notice_hash,
            sequence,
            time_ms,
            expires_ms: (expires != 0).then_some(expires),
        })
    }

    /// Checks what the encoding cannot: the affiliate id's form, the expiry, and for a grant that it names the
    /// purpose's current notice.
    pub fn validate(&self) -> Result<(), ConsentError> {
        if !valid_affiliate_id(&self.affiliate) {
            return Err(ConsentError::InvalidAffiliate(self.affiliate.clone()));
        }
        if self.expires_ms.is_some_and(|e| e <= self.time_ms) {
            return Err(ConsentError::BadExpiry);
        }
        if self.decision == Decision::Grant && self.notice_hash != self.purpose.notice().hash() {
            return Err(ConsentError::StaleNotice(self.purpose));
        }
        Ok(())
    }

    /// The bytes the identity key signs: [`signed_bytes_of`] the canonical encoding.
    pub fn signed_bytes(&self) -> Vec<u8> {
        signed_bytes_of(&self.encode())
    }

    /// SHA-256 of the canonical encoding: how the export log refers to this statement.
    pub fn hash(&self) -> [u8; 32] {
        statement_hash(&self.encode())
    }

    /// Whether this statement, as the latest for its pair, lets data flow at `now_ms`.
    pub fn in_force(&self, now_ms: u64) -> bool {
        self.decision == Decision::Grant
            && now_ms >= self.time_ms
            && self.expires_ms.is_none_or(|e| now_ms < e)
            && self.notice_hash == self.purpose.notice().hash()
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ConsentError> {
        if self.0.len() < n {
            return Err(ConsentError::Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ConsentError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> ConsentStatement {
        ConsentStatement {
            account: AccountId([3; 16]),
            affiliate: "adsco".into(),
            purpose: Purpose::Advertising,
            decision: Decision::Grant,
            notice_hash: Purpose::Advertising.notice().hash(),
            sequence: 1,
            time_ms: 1000,
            expires_ms: Some(5000),
        }
    }

    #[test]
    fn catalogue_is_closed() {
        assert_eq!(Purpose::parse("business_messaging"), Some(Purpose::BusinessMessaging));
        assert_eq!(Purpose::parse("business intelligence"), None);
        assert_eq!(Purpose::parse("Advertising"), None);
        let hashes: std::collections::HashSet<_> = PURPOSES.iter().map(|p| p.notice().hash()).collect();
        assert_eq!(hashes.len(), PURPOSES.len(), "each notice has its own hash");
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let s = grant();
        assert_eq!(ConsentStatement::decode(&s.encode()), Ok(s.clone()));
        let mut trailing = s.encode();
        trailing.push(0);
        assert!(ConsentStatement::decode(&trailing).is_err());
        for n in 0..s.encode().len() {
            assert!(ConsentStatement::decode(&s.encode()[..n]).is_err(), "truncated at {n}");
        }
        let mut seed = 7u64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 33) as u8
                })
                .collect();
            let _ = ConsentStatement::decode(&bytes); // must not panic
        }
    }

    /// Verifiers that re-encode a decoded statement (rather than use the bytes received) rely on this: whatever
    /// decodes is the one canonical encoding of its statement.
    #[test]
    fn only_canonical_encodings_decode() {
        let valid = grant().encode();
        let mut seed = 11u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        let mut decoded = 0;
        for _ in 0..50_000 {
            let mut bytes = valid.clone();
            for _ in 0..1 + next() % 3 {
                let at = next() % bytes.len();
                bytes[at] = next() as u8;
            }
            match next() % 4 {
                0 => bytes.truncate(next() % (bytes.len() + 1)),
                1 => bytes.push(next() as u8),
                _ => {}
            }
            if let Ok(s) = ConsentStatement::decode_stored(&bytes) {
                assert_eq!(s.encode(), bytes);
                decoded += 1;
            }
        }
        assert!(decoded > 1000, "mutations of hashes, times and sequence numbers still decode: {decoded}");
    }

    #[test]
    fn signatures_are_checked_over_the_bytes_received() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let encoded = grant().encode();
        let signature = ed25519_dalek::Signer::sign(&key, &signed_bytes_of(&encoded)).to_bytes();
        assert_eq!(verify_signature(&encoded, &signature, &key.verifying_key()), Ok(()));
        assert_eq!(grant().signed_bytes(), signed_bytes_of(&encoded));
        assert_eq!(statement_hash(&encoded), grant().hash());
        let mut other = encoded.clone();
        other[20] ^= 1;
        assert_eq!(verify_signature(&other, &signature, &key.verifying_key()), Err(ConsentError::BadSignature));
        let other_key = ed25519_dalek::SigningKey::from_bytes(&[6; 32]).verifying_key();
        assert_eq!(verify_signature(&encoded, &signature, &other_key), Err(ConsentError::BadSignature));
        assert_eq!(verify_signature(&encoded, &signature[..63], &key.verifying_key()), Err(ConsentError::BadSignature));
    }

    #[test]
    fn in_force_only_within_time_for_the_current_notice() {
        let s = grant();
        assert!(!s.in_force(999), "not before it was made");
        assert!(s.in_force(1000) && s.in_force(4999));
        assert!(!s.in_force(5000), "expired");
        let withdrawn = ConsentStatement { decision: Decision::Withdraw, ..s.clone() };
        assert!(!withdrawn.in_force(2000));
        let old_notice = ConsentStatement { notice_hash: [0; 32], ..s };
        assert!(!old_notice.in_force(2000), "a changed notice voids the grant");
        assert_eq!(old_notice.validate(), Err(ConsentError::StaleNotice(Purpose::Advertising)));
    }

    #[test]
    fn affiliate_ids_and_expiry_are_checked() {
        for bad in ["", "AdsCo", "ads co", "ads/co", &"a".repeat(33)] {
            let s = ConsentStatement { affiliate: bad.to_owned(), ..grant() };
            assert!(matches!(s.validate(), Err(ConsentError::InvalidAffiliate(_))), "{bad:?}");
        }
        let s = ConsentStatement { expires_ms: Some(1000), ..grant() };
        assert_eq!(s.validate(), Err(ConsentError::BadExpiry));
    }

    #[test]
    fn every_field_is_bound_by_the_encoding() {
        let base = grant();
        let variants = [
            ConsentStatement { account: AccountId([4; 16]), ..base.clone() },
            ConsentStatement { affiliate: "adsco2".into(), ..base.clone() },
            ConsentStatement {
                purpose: Purpose::Analytics,
                notice_hash: Purpose::Analytics.notice().hash(),
                ..base.clone()
            },
            ConsentStatement { decision: Decision::Withdraw, ..base.clone() },
            ConsentStatement { sequence: 2, ..base.clone() },
            ConsentStatement { time_ms: 1001, ..base.clone() },
            ConsentStatement { expires_ms: None, ..base.clone() },
        ];
        for v in variants {
            assert_ne!(v.hash(), base.hash(), "{v:?}");
        }
    }
}
