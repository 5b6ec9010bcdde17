//! Consent: the closed catalogue of purposes, and consent statements signed by a user's identity key. Pure logic:
//! bytes and the current time go in, decisions come out.
//!
//! A statement says: account A, for affiliate F and purpose P, grants (or withdraws) consent, having been shown the
//! notice with hash H, as its statement number S, at time T, optionally until time E. The user's Ed25519 identity key
//! signs its canonical encoding, so the relay (which stores it) cannot forge or alter one; anyone holding the
//! account's identity key can check it. For each (affiliate, purpose) the statement with the highest sequence number
//! wins. Everything is denied by default. A grant is *in force* at time t when it is the latest statement for its
//! pair, t is within [T, E), and H is the hash of the pair's *current* notice (see [`crate::notice`]: a document
//! generated from the exporter's catalogue naming the recipient, the exact fields and the retention). Any change of
//! those terms makes a new notice with a new hash, which voids earlier grants to the pair until the user grants
//! again. Which notice is current is not known here: whoever decides passes it to [`ConsentStatement::in_force`]. A
//! withdrawal names no notice (its hash is all zeros).
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
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Grant or withdraw (for one affiliate), object or lift an objection (to a purpose, for every affiliate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Consent given.
    Grant,
    /// Consent withdrawn.
    Withdraw,
    /// An objection to the purpose: no affiliate may receive anything for it, under any grant made before the
    /// objection or while it stands. A purpose-level statement: its affiliate id is empty.
    Object,
    /// The objection to the purpose is lifted: grants made after this statement can be in force again (earlier ones
    /// stay void). A purpose-level statement: its affiliate id is empty.
    Lift,
}

impl Decision {
    /// Whether the statement is about a whole purpose (object, lift) rather than one affiliate.
    pub fn is_purpose_level(self) -> bool {
        matches!(self, Decision::Object | Decision::Lift)
    }

    /// `grant`, `withdraw`, `object` or `lift`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Grant => "grant",
            Decision::Withdraw => "withdraw",
            Decision::Object => "object",
            Decision::Lift => "lift",
        }
    }
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
    /// A grant names a notice that is not the pair's current one.
    #[error("the notice for {affiliate}/{purpose} has changed or was never published: review it and grant again")]
    StaleNotice {
        /// The affiliate.
        affiliate: String,
        /// The purpose.
        purpose: Purpose,
    },
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
            Decision::Object => 3,
            Decision::Lift => 4,
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

    /// Decodes a statement recorded earlier: the encoding and the affiliate id are checked, but not the expiry rule
    /// of new statements; the record stays readable for history and audit.
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
            3 => Decision::Object,
            4 => Decision::Lift,
            _ => return Err(ConsentError::Malformed("decision")),
        };
        let notice_hash = r.array()?;
        let sequence = u64::from_be_bytes(r.array()?);
        let time_ms = u64::from_be_bytes(r.array()?);
        let expires = u64::from_be_bytes(r.array()?);
        if !r.0.is_empty() {
            return Err(ConsentError::Malformed("trailing bytes"));
        }
        // One affiliate, or (objections) none.
        if decision.is_purpose_level() != affiliate.is_empty()
            || (!decision.is_purpose_level() && !valid_affiliate_id(&affiliate))
        {
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

    /// Checks what the encoding cannot: the affiliate id's form and the expiry. Whether a grant names the pair's
    /// current notice is the caller's check ([`ConsentStatement::names_notice`]), since only it knows the notice.
    pub fn validate(&self) -> Result<(), ConsentError> {
        let purpose_level = self.decision.is_purpose_level();
        if purpose_level != self.affiliate.is_empty() || (!purpose_level && !valid_affiliate_id(&self.affiliate)) {
            return Err(ConsentError::InvalidAffiliate(self.affiliate.clone()));
        }
        if self.expires_ms.is_some_and(|e| e <= self.time_ms) {
            return Err(ConsentError::BadExpiry);
        }
        if purpose_level && (self.expires_ms.is_some() || self.notice_hash != [0; 32]) {
            return Err(ConsentError::Malformed("an objection names no notice and does not expire"));
        }
        Ok(())
    }

    /// For a grant: whether the account's latest purpose-level statement for its purpose (`objection`, if any)
    /// leaves it in force: none, or a lift made before this grant. An objection voids every grant made before it and
    /// blocks new ones while it stands; grants made after a lift count again.
    pub fn not_objected(&self, objection: Option<&ConsentStatement>) -> bool {
        match objection {
            None => true,
            Some(o) => o.decision == Decision::Lift && self.sequence > o.sequence,
        }
    }

    /// For a grant: that it names `current`, the pair's current notice hash (`None`: no notice is published for the
    /// pair, so nothing can be granted). A withdrawal names no notice and always passes.
    pub fn names_notice(&self, current: Option<&[u8; 32]>) -> Result<(), ConsentError> {
        if self.decision == Decision::Grant && current != Some(&self.notice_hash) {
            return Err(ConsentError::StaleNotice { affiliate: self.affiliate.clone(), purpose: self.purpose });
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

    /// Whether this statement is a grant and `now_ms` is within its lifetime [time, expiry).
    pub fn granted_at(&self, now_ms: u64) -> bool {
        self.decision == Decision::Grant && now_ms >= self.time_ms && self.expires_ms.is_none_or(|e| now_ms < e)
    }

    /// Whether this statement, as the latest for its pair, lets data flow at `now_ms` when the pair's current notice
    /// hash is `current_notice` (`None`: the pair has no notice, so nothing flows).
    pub fn in_force(&self, now_ms: u64, current_notice: Option<&[u8; 32]>) -> bool {
        self.granted_at(now_ms) && current_notice == Some(&self.notice_hash)
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

    const NOTICE: [u8; 32] = [9; 32];

    fn grant() -> ConsentStatement {
        ConsentStatement {
            account: AccountId([3; 16]),
            affiliate: "adsco".into(),
            purpose: Purpose::Advertising,
            decision: Decision::Grant,
            notice_hash: NOTICE,
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
        let current = Some(&NOTICE);
        assert!(!s.in_force(999, current), "not before it was made");
        assert!(s.in_force(1000, current) && s.in_force(4999, current));
        assert!(!s.in_force(5000, current), "expired");
        let withdrawn = ConsentStatement { decision: Decision::Withdraw, ..s.clone() };
        assert!(!withdrawn.in_force(2000, current));
        assert_eq!(withdrawn.names_notice(None), Ok(()), "a withdrawal needs no notice");
        assert!(!s.in_force(2000, Some(&[0; 32])), "a changed notice voids the grant");
        assert!(!s.in_force(2000, None), "no notice published: nothing flows");
        let stale = Err(ConsentError::StaleNotice { affiliate: "adsco".into(), purpose: Purpose::Advertising });
        assert_eq!(s.names_notice(Some(&[0; 32])), stale);
        assert_eq!(s.names_notice(None), stale);
        assert_eq!(s.names_notice(current), Ok(()));
    }

    #[test]
    fn objections_are_purpose_level_and_void_earlier_grants_until_lifted() {
        let object = ConsentStatement {
            affiliate: String::new(),
            decision: Decision::Object,
            notice_hash: [0; 32],
            expires_ms: None,
            sequence: 5,
            ..grant()
        };
        assert_eq!(ConsentStatement::decode(&object.encode()), Ok(object.clone()));
        let lift = ConsentStatement { decision: Decision::Lift, sequence: 7, ..object.clone() };
        assert_eq!(ConsentStatement::decode(&lift.encode()), Ok(lift.clone()));
        // A purpose-level statement names no affiliate, no notice, no expiry; an affiliate-level one names one.
        for bad in [
            ConsentStatement { affiliate: "adsco".into(), ..object.clone() },
            ConsentStatement { notice_hash: [1; 32], ..object.clone() },
            ConsentStatement { expires_ms: Some(9_999), ..object.clone() },
            ConsentStatement { affiliate: String::new(), ..grant() },
            ConsentStatement { affiliate: String::new(), decision: Decision::Withdraw, ..grant() },
        ] {
            assert!(ConsentStatement::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        let grant_at = |sequence| ConsentStatement { sequence, ..grant() };
        assert!(grant_at(3).not_objected(None));
        assert!(!grant_at(3).not_objected(Some(&object)), "objected after the grant");
        assert!(!grant_at(6).not_objected(Some(&object)), "granted while objecting");
        assert!(!grant_at(3).not_objected(Some(&lift)), "a lift does not revive a grant made before it");
        assert!(grant_at(8).not_objected(Some(&lift)), "granted after the lift");
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
            ConsentStatement { purpose: Purpose::Analytics, ..base.clone() },
            ConsentStatement { notice_hash: [8; 32], ..base.clone() },
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
