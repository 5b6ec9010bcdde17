//! The exporter's identifiers, each with exactly one text form: [`WebhookId`] (`msg_` + 32 hex digits, the
//! `webhook-id` header, the outbox key, and in its 16 bytes the export log leaf's export id) and [`Pair`] (an account,
//! an affiliate and a purpose: what one consent statement is about, and the key of every per-pair record in the
//! store, `account-hex/affiliate/purpose`).
//!
//! Contract: `Display` and `FromStr` are each other's inverse and are the only place these forms are written or
//! parsed; a malformed form is refused with a [`ParseIdError`], never repaired. The forms are those the exporter has
//! always stored, so existing data dirs keep their keys. Pure: no I/O, nothing here holds personal data.

use std::fmt;
use std::str::FromStr;

use relay_proto::AccountId;
use relay_proto::consent::{Purpose, valid_affiliate_id};
use sha2::{Digest, Sha256};

/// Why an identifier's text form was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {text:?}")]
pub struct ParseIdError {
    /// Which identifier.
    pub what: &'static str,
    /// The text refused.
    pub text: String,
}

/// The id of one webhook event: the same on every retry of it, and derived from what it carries, so re-reading the
/// feed gives the same id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WebhookId([u8; 16]);

impl WebhookId {
    /// The id of the event that follows from the statement with hash `statement_hash` for `affiliate`, carrying data
    /// with digest `digest`.
    pub fn derive(statement_hash: &[u8; 32], affiliate: &str, digest: &[u8; 32]) -> Self {
        let hash = Sha256::new()
            .chain_update(statement_hash)
            .chain_update(affiliate.as_bytes())
            .chain_update(digest)
            .finalize();
        let mut id = [0; 16];
        id.copy_from_slice(&hash[..16]);
        Self(id)
    }

    /// The id of the `consent.withdrawn` notice that follows from withdrawal statement `statement_hash`: it carries no
    /// data, so its digest is all zeros.
    pub fn notice(statement_hash: &[u8; 32], affiliate: &str) -> Self {
        Self::derive(statement_hash, affiliate, &[0; 32])
    }

    /// The id whose bytes are a log leaf's export id.
    pub fn from_export_id(export_id: [u8; 16]) -> Self {
        Self(export_id)
    }

    /// The 16 bytes: the export log leaf's export id.
    pub fn export_id(&self) -> [u8; 16] {
        self.0
    }
}

impl fmt::Display for WebhookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "msg_{}", hex::encode(self.0))
    }
}

impl fmt::Debug for WebhookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookId({self})")
    }
}

impl FromStr for WebhookId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let refused = || ParseIdError { what: "webhook id", text: s.to_owned() };
        let digits = s.strip_prefix("msg_").ok_or_else(refused)?;
        let mut id = [0; 16];
        // Lowercase only: one text per id, or an outbox key and a log index could disagree on the same id.
        if digits.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(refused());
        }
        hex::decode_to_slice(digits, &mut id).map_err(|_| refused())?;
        Ok(Self(id))
    }
}

/// What one consent statement is about: an account, an affiliate, a purpose.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    /// The user's account.
    pub account: AccountId,
    /// The affiliate's id (lowercase letters, digits, `_`, `-`: never a `/`).
    pub affiliate: String,
    /// The purpose.
    pub purpose: Purpose,
}

impl Pair {
    /// The pair of `account`, `affiliate` and `purpose`.
    pub fn new(account: AccountId, affiliate: impl Into<String>, purpose: Purpose) -> Self {
        Self { account, affiliate: affiliate.into(), purpose }
    }
}

impl fmt::Display for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.account, self.affiliate, self.purpose)
    }
}

impl fmt::Debug for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pair({self})")
    }
}

impl FromStr for Pair {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let refused = || ParseIdError { what: "pair", text: s.to_owned() };
        let mut parts = s.split('/');
        let (Some(account), Some(affiliate), Some(purpose), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refused());
        };
        let account = AccountId::from_hex(account).filter(|a| a.to_string() == account).ok_or_else(refused)?;
        let purpose = Purpose::parse(purpose).ok_or_else(refused)?;
        if !valid_affiliate_id(affiliate) {
            return Err(refused());
        }
        Ok(Self::new(account, affiliate, purpose))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_ids_have_one_text_form() {
        let id = WebhookId::derive(&[1; 32], "adsco", &[2; 32]);
        let text = id.to_string();
        assert!(text.starts_with("msg_") && text.len() == 36, "{text}");
        assert_eq!(text.parse::<WebhookId>(), Ok(id));
        assert_eq!(WebhookId::from_export_id(id.export_id()), id);
        assert_eq!(WebhookId::notice(&[1; 32], "adsco"), WebhookId::derive(&[1; 32], "adsco", &[0; 32]));
        assert_ne!(WebhookId::derive(&[1; 32], "shieldco", &[2; 32]), id, "per affiliate");
        for bad in ["", "msg_", "msg_00", "evt_00000000000000000000000000000000", &text.to_uppercase(), &text[4..]] {
            assert!(bad.parse::<WebhookId>().is_err(), "{bad:?}");
        }
        let upper = format!("msg_{}", text[4..].to_uppercase());
        assert!(upper.parse::<WebhookId>().is_err(), "uppercase digits would give a second form");
    }

    /// The ids the exporter stored before they were typed: same derivation, same text.
    #[test]
    fn webhook_ids_are_derived_as_before() {
        let old = |hash: &[u8; 32], affiliate: &str, digest: &[u8; 32]| {
            let id =
                Sha256::new().chain_update(hash).chain_update(affiliate.as_bytes()).chain_update(digest).finalize();
            format!("msg_{}", hex::encode(&id[..16]))
        };
        for (hash, affiliate, digest) in [([0; 32], "adsco", [0; 32]), ([7; 32], "shieldco", [9; 32])] {
            assert_eq!(WebhookId::derive(&hash, affiliate, &digest).to_string(), old(&hash, affiliate, &digest));
        }
    }

    #[test]
    fn pairs_have_one_text_form() {
        let account = AccountId::from_identity_key(&[5; 32]);
        let pair = Pair::new(account, "adsco", Purpose::BusinessMessaging);
        let text = pair.to_string();
        assert_eq!(text, format!("{account}/adsco/business_messaging"));
        assert_eq!(text.parse::<Pair>(), Ok(pair));
        let hex = account.to_string();
        for bad in [
            String::new(),
            format!("{hex}/adsco"),
            format!("{hex}/adsco/advertising/1"),
            format!("{hex}/adsco/marketing"),
            format!("{hex}/AdsCo/advertising"),
            format!("{}/adsco/advertising", hex.to_uppercase()),
            "00/adsco/advertising".to_owned(),
        ] {
            assert!(bad.parse::<Pair>().is_err(), "{bad:?}");
        }
    }
}
