//! Notices: what a user is shown before granting consent, and what a grant signs.
//!
//! A notice is a small text document generated from the exporter's affiliates catalogue. It names the recipient
//! (the affiliate's id, legal name and country), the purpose, the exact fields that leave and how long the affiliate
//! may keep them, and carries a version that grows with every change of those terms for the pair. Notices are
//! content-addressed: a notice's hash is the SHA-256 of its bytes ([`notice_hash`]), and a consent statement signs
//! that hash. So any change to what leaves, to whom or to which country makes a new document with a new hash, and
//! grants made under the earlier one stop being in force.
//!
//! The encoding is canonical and checked to be: [`Notice::decode`] refuses any bytes that do not re-encode to
//! themselves, so one set of terms has exactly one document and one hash. The prose under the header is generated
//! from the header, so it cannot say something the header does not.
//!
//! ```text
//! consent-relay notice v2
//! version: 1
//! affiliate: adsco
//! recipient: AdsCo SAS
//! country: FR
//! purpose: advertising
//! fields: phone_pseudonym, device_model
//! retention: until withdrawn
//!
//! AdsCo SAS (country: FR) will receive a pseudonym of your phone number (…) and your device model, to choose and
//! measure advertising shown to you on its own services. It may keep them until you withdraw your consent.
//! …
//! ```

use std::fmt;

use sha2::{Digest, Sha256};

use crate::consent::{Purpose, valid_affiliate_id};

/// First line of every notice of this format.
pub const NOTICE_MAGIC: &str = "consent-relay notice v2";
/// Longest legal name a notice carries, in bytes.
pub const MAX_LEGAL_NAME_LEN: usize = 200;
/// Longest notice document accepted, in bytes (a generated one is far shorter).
pub const MAX_NOTICE_LEN: usize = 4096;

/// A field an affiliate may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// The E.164 phone number itself.
    Phone,
    /// HMAC-SHA256 of the phone number under a key specific to the affiliate (unlinkable across affiliates).
    PhonePseudonym,
    /// Device model.
    DeviceModel,
    /// Operating system.
    Os,
    /// Client version.
    AppVersion,
}

/// Every field, in payload (and notice) order.
pub const FIELDS: [Field; 5] = [Field::Phone, Field::PhonePseudonym, Field::DeviceModel, Field::Os, Field::AppVersion];

impl Field {
    /// The name used in the catalogue, in payloads and in a notice's header.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Phone => "phone",
            Field::PhonePseudonym => "phone_pseudonym",
            Field::DeviceModel => "device_model",
            Field::Os => "os",
            Field::AppVersion => "app_version",
        }
    }

    /// Parses a field name.
    pub fn parse(s: &str) -> Option<Self> {
        FIELDS.into_iter().find(|f| f.as_str() == s)
    }

    /// What the field is, in words, for a notice's prose.
    pub fn describe(self) -> &'static str {
        match self {
            Field::Phone => "your phone number",
            Field::PhonePseudonym => {
                "a pseudonym of your phone number (the same for this affiliate every time, different for every other \
                 affiliate)"
            }
            Field::DeviceModel => "your device model",
            Field::Os => "your operating system",
            Field::AppVersion => "the version of your messaging app",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long the affiliate may keep what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Retention {
    /// This many days from receipt (at least 1).
    Days(u32),
    /// Until the user withdraws consent.
    UntilWithdrawn,
}

impl Retention {
    /// The purpose's default when the catalogue names none.
    pub fn default_for(purpose: Purpose) -> Self {
        match purpose {
            Purpose::Security => Retention::Days(90),
            Purpose::Analytics => Retention::Days(365),
            Purpose::Advertising | Purpose::BusinessMessaging => Retention::UntilWithdrawn,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        if s == "until withdrawn" {
            return Some(Retention::UntilWithdrawn);
        }
        let n: u32 = s.strip_suffix(" days")?.parse().ok()?;
        (n >= 1).then_some(Retention::Days(n))
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retention::Days(n) => write!(f, "{n} days"),
            Retention::UntilWithdrawn => f.write_str("until withdrawn"),
        }
    }
}

/// What the purpose is for, in words, for a notice's prose.
fn purpose_prose(purpose: Purpose) -> &'static str {
    match purpose {
        Purpose::Security => "to detect and stop spam, fraud and account takeover",
        Purpose::Analytics => "to count how the service is used, in aggregate",
        Purpose::Advertising => "to choose and measure advertising shown to you on its own services",
        Purpose::BusinessMessaging => "so that businesses you write to on its platform can reach you",
    }
}

/// Why notice bytes or terms are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoticeError {
    /// The bytes are not a notice of this format.
    #[error("malformed notice: {0}")]
    Malformed(&'static str),
    /// A term is out of its limits.
    #[error("invalid notice: {0}")]
    Invalid(&'static str),
}

/// The terms of one notice for one (affiliate, purpose) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Grows by one with every change of the terms below for this pair (first: 1).
    pub version: u32,
    /// The affiliate id that consent statements name.
    pub affiliate: String,
    /// The affiliate's legal name.
    pub legal_name: String,
    /// ISO 3166-1 alpha-2 country the data goes to.
    pub country: String,
    /// The purpose.
    pub purpose: Purpose,
    /// The exact fields that leave, in [`FIELDS`] order, without repeats.
    pub fields: Vec<Field>,
    /// How long the affiliate may keep them.
    pub retention: Retention,
}

/// SHA-256 of a notice's bytes: what a consent statement signs and what the relay serves a notice by.
pub fn notice_hash(document: &[u8]) -> [u8; 32] {
    Sha256::digest(document).into()
}

/// Whether `name` can stand in a notice: 1 to [`MAX_LEGAL_NAME_LEN`] bytes, not blank, no control characters, no
/// leading or trailing space.
pub fn valid_legal_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= MAX_LEGAL_NAME_LEN
        && name.trim() == name
        && !name.chars().any(char::is_control)
}

/// Whether `country` is two uppercase ASCII letters.
pub fn valid_country(country: &str) -> bool {
    country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase())
}

impl Notice {
    /// Checks every term's limits.
    pub fn check(&self) -> Result<(), NoticeError> {
        if self.version == 0 {
            return Err(NoticeError::Invalid("version must be at least 1"));
        }
        if !valid_affiliate_id(&self.affiliate) {
            return Err(NoticeError::Invalid("affiliate id"));
        }
        if !valid_legal_name(&self.legal_name) {
            return Err(NoticeError::Invalid("legal name"));
        }
        if !valid_country(&self.country) {
            return Err(NoticeError::Invalid("country"));
        }
        if self.fields.is_empty() {
            return Err(NoticeError::Invalid("a notice lists at least one field"));
        }
        if !self.fields.windows(2).all(|w| w[0] < w[1]) {
            return Err(NoticeError::Invalid("fields must be in catalogue order, without repeats"));
        }
        if self.retention == Retention::Days(0) {
            return Err(NoticeError::Invalid("retention must be at least one day"));
        }
        Ok(())
    }

    /// Whether `other` has the same terms, whatever its version: a notice whose terms did not change keeps its
    /// version.
    pub fn same_terms(&self, other: &Notice) -> bool {
        Notice { version: other.version, ..self.clone() } == *other
    }

    /// The prose under the header, generated from it.
    pub fn prose(&self) -> String {
        let described: Vec<_> = self.fields.iter().map(|f| f.describe()).collect();
        let list = match described.as_slice() {
            [] => String::new(),
            [one] => (*one).to_owned(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        };
        let keep = match self.retention {
            Retention::Days(1) => "for 1 day".to_owned(),
            Retention::Days(n) => format!("for {n} days"),
            Retention::UntilWithdrawn => "until you withdraw your consent".to_owned(),
        };
        format!(
            "{name} (country: {country}) will receive {list}, {why}. It may keep them {keep}.\n\
             Nothing else about you is sent to it for this purpose. If these terms change, you will be asked again; \
             until then nothing is sent under them.\n\
             Refusing, or withdrawing later, does not change how messaging works for you.\n",
            name = self.legal_name,
            country = self.country,
            why = purpose_prose(self.purpose),
        )
    }

    /// The canonical document: the header lines, a blank line, then [`Notice::prose`].
    pub fn encode(&self) -> Result<Vec<u8>, NoticeError> {
        self.check()?;
        let fields: Vec<_> = self.fields.iter().map(|f| f.as_str()).collect();
        let text = format!(
            "{NOTICE_MAGIC}\nversion: {}\naffiliate: {}\nrecipient: {}\ncountry: {}\npurpose: {}\nfields: {}\n\
             retention: {}\n\n{}",
            self.version,
            self.affiliate,
            self.legal_name,
            self.country,
            self.purpose.as_str(),
            fields.join(", "),
            self.retention,
            self.prose(),
        );
        Ok(text.into_bytes())
    }

    /// The notice's hash ([`notice_hash`] of [`Notice::encode`]).
    pub fn hash(&self) -> Result<[u8; 32], NoticeError> {
        Ok(notice_hash(&self.encode()?))
    }

    /// Parses a document; refuses anything that is not exactly the canonical encoding of valid terms.
    pub fn decode(document: &[u8]) -> Result<Self, NoticeError> {
        if document.len() > MAX_NOTICE_LEN {
            return Err(NoticeError::Malformed("too long"));
        }
        let text = std::str::from_utf8(document).map_err(|_| NoticeError::Malformed("not UTF-8"))?;
        let mut lines = text.split('\n');
        if lines.next() != Some(NOTICE_MAGIC) {
            return Err(NoticeError::Malformed("not a notice of this format"));
        }
        let mut field = |name: &'static str| -> Result<&str, NoticeError> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(": "))
                .ok_or(NoticeError::Malformed(name))
        };
        let version = field("version")?.parse().map_err(|_| NoticeError::Malformed("version"))?;
        let affiliate = field("affiliate")?.to_owned();
        let legal_name = field("recipient")?.to_owned();
        let country = field("country")?.to_owned();
        let purpose = Purpose::parse(field("purpose")?).ok_or(NoticeError::Malformed("purpose"))?;
        let fields = field("fields")?
            .split(", ")
            .map(|f| Field::parse(f).ok_or(NoticeError::Malformed("fields")))
            .collect::<Result<Vec<_>, _>>()?;
        let retention = Retention::parse(field("retention")?).ok_or(NoticeError::Malformed("retention"))?;
        let notice = Notice { version, affiliate, legal_name, country, purpose, fields, retention };
        if notice.encode()? != document {
            return Err(NoticeError::Malformed("not the canonical encoding"));
        }
        Ok(notice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adsco() -> Notice {
        Notice {
            version: 1,
            affiliate: "adsco".into(),
            legal_name: "AdsCo SAS".into(),
            country: "FR".into(),
            purpose: Purpose::Advertising,
            fields: vec![Field::PhonePseudonym, Field::DeviceModel],
            retention: Retention::UntilWithdrawn,
        }
    }

    #[test]
    fn a_document_round_trips_and_names_every_term() {
        let n = adsco();
        let doc = n.encode().expect("encode");
        assert_eq!(Notice::decode(&doc).expect("decode"), n);
        let text = String::from_utf8(doc.clone()).expect("utf-8");
        for term in ["adsco", "AdsCo SAS", "FR", "advertising", "phone_pseudonym, device_model", "until withdrawn"] {
            assert!(text.contains(term), "{term} in {text}");
        }
        assert!(text.contains("a pseudonym of your phone number") && text.contains("your device model"), "{text}");
        assert_eq!(n.hash().expect("hash"), notice_hash(&doc));
    }

    #[test]
    fn every_change_of_terms_changes_the_hash() {
        let base = adsco();
        let changed = [
            Notice { fields: vec![Field::Phone, Field::PhonePseudonym, Field::DeviceModel], ..base.clone() },
            Notice { legal_name: "AdsCo Holding Ltd".into(), ..base.clone() },
            Notice { country: "US".into(), ..base.clone() },
            Notice { affiliate: "adsco2".into(), ..base.clone() },
            Notice { purpose: Purpose::Analytics, ..base.clone() },
            Notice { retention: Retention::Days(30), ..base.clone() },
            Notice { version: 2, ..base.clone() },
        ];
        let mut hashes = std::collections::HashSet::from([base.hash().expect("hash")]);
        for n in &changed {
            assert!(hashes.insert(n.hash().expect("hash")), "{n:?} must hash differently");
        }
        assert!(base.same_terms(&Notice { version: 9, ..base.clone() }));
        assert!(!changed[..6].iter().any(|n| base.same_terms(n)));
    }

    #[test]
    fn only_the_canonical_document_decodes() {
        let doc = String::from_utf8(adsco().encode().expect("encode")).expect("utf-8");
        let variants = [
            doc.replace("version: 1", "version: 01"),
            doc.replace("fields: phone_pseudonym, device_model", "fields: device_model, phone_pseudonym"),
            doc.replace("fields: phone_pseudonym, device_model", "fields: phone_pseudonym,device_model"),
            doc.replace("advertising shown", "advertising not shown"),
            doc.replace("AdsCo SAS (", "AdsCo (").to_string(),
            format!("{doc}\n"),
            doc.replace("\n", "\r\n"),
            doc.replace(NOTICE_MAGIC, "consent-relay notice v1"),
            doc.replace("retention: until withdrawn", "retention: 0 days"),
            doc.replace("fields: phone_pseudonym, device_model", "fields: imei"),
            doc.replace("country: FR", "country: fr"),
        ];
        for v in variants {
            assert!(Notice::decode(v.as_bytes()).is_err(), "accepted: {v}");
        }
        assert!(Notice::decode(&[0xff; 10]).is_err());
        assert!(Notice::decode(&vec![b'a'; MAX_NOTICE_LEN + 1]).is_err());
    }

    #[test]
    fn terms_out_of_limits_make_no_document() {
        let bad = [
            Notice { version: 0, ..adsco() },
            Notice { fields: vec![], ..adsco() },
            Notice { fields: vec![Field::DeviceModel, Field::PhonePseudonym], ..adsco() },
            Notice { fields: vec![Field::Os, Field::Os], ..adsco() },
            Notice { legal_name: "Ads\nCo".into(), ..adsco() },
            Notice { legal_name: " AdsCo".into(), ..adsco() },
            Notice { legal_name: "x".repeat(MAX_LEGAL_NAME_LEN + 1), ..adsco() },
            Notice { country: "FRA".into(), ..adsco() },
            Notice { affiliate: "Ads Co".into(), ..adsco() },
            Notice { retention: Retention::Days(0), ..adsco() },
        ];
        for n in bad {
            assert!(n.encode().is_err(), "{n:?}");
        }
    }

    #[test]
    fn retention_reads_as_it_is_written() {
        for (r, s) in [(Retention::Days(1), "1 days"), (Retention::Days(90), "90 days")] {
            assert_eq!(r.to_string(), s);
            assert_eq!(Retention::parse(s), Some(r));
        }
        let one_day = Notice { retention: Retention::Days(1), ..adsco() };
        assert!(one_day.prose().contains("for 1 day."), "{}", one_day.prose());
        assert_eq!(Retention::parse("until withdrawn"), Some(Retention::UntilWithdrawn));
        assert_eq!(Retention::parse("-1 days"), None);
        assert_eq!(Retention::default_for(Purpose::Security), Retention::Days(90));
    }
}
