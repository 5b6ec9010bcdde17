//! The affiliates catalogue: a TOML file read by the exporter at start and validated as a whole, with errors that
//! name the affiliate and the key at fault.
//!
//! ```toml
//! [[affiliate]]
//! id = "adsco"
//! name = "AdsCo SAS"
//! country = "FR"
//! endpoint = "http://127.0.0.1:9000/hooks"
//! secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"   # Standard Webhooks secret: "whsec_" + base64 key
//! [affiliate.purposes]
//! advertising = ["phone_pseudonym", "device_model"]
//! analytics = { fields = ["device_model", "os", "app_version"], retention_days = 30 }
//! ```
//!
//! A purpose lists its fields, either alone (the purpose's default retention, [`Retention::default_for`]) or with
//! `retention_days`. From each (affiliate, purpose) the catalogue makes the terms of its notice
//! ([`Catalogue::notices`]): legal name, country, purpose, exact fields, retention. The notice's version comes from
//! the exporter's store (`crate::outbox::ExporterStore::version_notices`), which bumps it whenever the terms change;
//! [`Catalogue::set_notices`] then fixes the versioned notices, and their hashes are what a grant must name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use base64::Engine;
use relay_proto::consent::{Purpose, valid_affiliate_id};
pub use relay_proto::notice::{FIELDS, Field};
use relay_proto::notice::{Notice, Retention, valid_country, valid_legal_name};
use serde::Deserialize;

/// One affiliate, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affiliate {
    /// Id (what consent statements name).
    pub id: String,
    /// Legal name.
    pub name: String,
    /// ISO 3166-1 alpha-2 country.
    pub country: String,
    /// Webhook URL (`http://` or `https://`).
    pub endpoint: String,
    /// The webhook signing key (decoded from `whsec_…`).
    pub secret: Vec<u8>,
    /// Allowed fields per purpose; a purpose not listed is never exported to this affiliate.
    pub purposes: BTreeMap<Purpose, BTreeSet<Field>>,
    /// How long the affiliate may keep what it receives, per purpose listed.
    pub retention: BTreeMap<Purpose, Retention>,
}

/// A pair's current notice, with its document and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentNotice {
    /// The terms.
    pub notice: Notice,
    /// Its canonical document.
    pub document: Vec<u8>,
    /// SHA-256 of the document: what a grant must name.
    pub hash: [u8; 32],
}

/// The whole catalogue, with the current notice of each (affiliate, purpose) it allows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Catalogue {
    controller: Option<Controller>,
    affiliates: BTreeMap<String, Affiliate>,
    /// The current notice per pair: version 1 until [`Catalogue::set_notices`].
    notices: BTreeMap<(String, Purpose), CurrentNotice>,
}

/// Why a catalogue is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogueError {
    /// The file could not be read.
    #[error("cannot read affiliates file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML, or not the expected shape.
    #[error("affiliates file is not valid: {0}")]
    Parse(String),
    /// A value is wrong; the message names the affiliate and key.
    #[error("affiliate {affiliate:?}: {message}")]
    Invalid {
        /// The affiliate id (or its position when the id itself is bad).
        affiliate: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    controller: Option<Controller>,
    #[serde(default)]
    affiliate: Vec<RawAffiliate>,
}

/// Who decides what is exported: the operator, as named in the records of processing (GDPR Article 30).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Controller {
    /// Legal name.
    pub name: String,
    /// How to reach it (and its data protection officer, if any).
    pub contact: String,
    /// ISO 3166-1 alpha-2 country of establishment.
    pub country: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAffiliate {
    id: String,
    name: String,
    country: String,
    endpoint: String,
    secret: String,
    #[serde(default)]
    purposes: BTreeMap<String, RawPurpose>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPurpose {
    Fields(Vec<String>),
    Terms(RawTerms),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTerms {
    fields: Vec<String>,
    retention_days: Option<u32>,
}

impl Catalogue {
    /// Reads and validates a catalogue file.
    pub fn from_file(path: &Path) -> Result<Self, CatalogueError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CatalogueError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// Parses and validates catalogue text.
    pub fn parse(text: &str) -> Result<Self, CatalogueError> {
        let file: File = toml::from_str(text).map_err(|e| CatalogueError::Parse(e.to_string()))?;
        let mut affiliates = BTreeMap::new();
        for (i, raw) in file.affiliate.into_iter().enumerate() {
            let a = validate(raw, i)?;
            if affiliates.contains_key(&a.id) {
                return Err(CatalogueError::Invalid { affiliate: a.id, message: "duplicate id".into() });
            }
            affiliates.insert(a.id.clone(), a);
        }
        if let Some(c) = &file.controller {
            let invalid =
                |message: &str| CatalogueError::Invalid { affiliate: "[controller]".into(), message: message.into() };
            if !valid_legal_name(&c.name) || !valid_legal_name(&c.contact) {
                return Err(invalid("name and contact must be 1-200 bytes without control characters"));
            }
            if !valid_country(&c.country) {
                return Err(invalid("country must be an ISO 3166-1 alpha-2 code such as \"FR\""));
            }
        }
        let mut catalogue = Self { controller: file.controller, affiliates, notices: BTreeMap::new() };
        let terms = catalogue.notice_terms();
        catalogue.set_notices(terms).map_err(|e| CatalogueError::Parse(e.to_string()))?;
        Ok(catalogue)
    }

    /// The terms of every pair's notice, from the catalogue alone (version 1).
    pub fn notice_terms(&self) -> Vec<Notice> {
        let mut out = Vec::new();
        for a in self.affiliates.values() {
            for (purpose, fields) in &a.purposes {
                out.push(Notice {
                    version: 1,
                    affiliate: a.id.clone(),
                    legal_name: a.name.clone(),
                    country: a.country.clone(),
                    purpose: *purpose,
                    fields: fields.iter().copied().collect(),
                    retention: a.retention.get(purpose).copied().unwrap_or(Retention::default_for(*purpose)),
                });
            }
        }
        out
    }

    /// Fixes the current notices to `notices` (the catalogue's terms, each with its version from the store). Refuses
    /// a notice whose terms are not the catalogue's, so a version can change but nothing else.
    pub fn set_notices(&mut self, notices: Vec<Notice>) -> Result<(), relay_proto::notice::NoticeError> {
        let terms = self.notice_terms();
        let mut map = BTreeMap::new();
        for notice in notices {
            if !terms.iter().any(|t| t.same_terms(&notice)) {
                return Err(relay_proto::notice::NoticeError::Invalid("not the catalogue's terms"));
            }
            let document = notice.encode()?;
            let hash = relay_proto::notice::notice_hash(&document);
            map.insert((notice.affiliate.clone(), notice.purpose), CurrentNotice { notice, document, hash });
        }
        if map.len() != terms.len() {
            return Err(relay_proto::notice::NoticeError::Invalid("a notice for every pair of the catalogue"));
        }
        self.notices = map;
        Ok(())
    }

    /// The current notice of `affiliate` for `purpose`; `None` if the pair is not allowed.
    pub fn notice(&self, affiliate: &str, purpose: Purpose) -> Option<&CurrentNotice> {
        self.notices.get(&(affiliate.to_owned(), purpose))
    }

    /// Every current notice, by pair.
    pub fn notices(&self) -> impl Iterator<Item = &CurrentNotice> {
        self.notices.values()
    }

    /// The controller, if the catalogue names one (`[controller]`).
    pub fn controller(&self) -> Option<&Controller> {
        self.controller.as_ref()
    }

    /// The affiliate with this id.
    pub fn get(&self, id: &str) -> Option<&Affiliate> {
        self.affiliates.get(id)
    }

    /// Every affiliate, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Affiliate> {
        self.affiliates.values()
    }

    /// The fields `affiliate` may receive for `purpose`; `None` if it may receive nothing for it.
    pub fn allowed(&self, affiliate: &str, purpose: Purpose) -> Option<&BTreeSet<Field>> {
        self.affiliates.get(affiliate)?.purposes.get(&purpose)
    }
}

fn validate(raw: RawAffiliate, index: usize) -> Result<Affiliate, CatalogueError> {
    let who = if valid_affiliate_id(&raw.id) { raw.id.clone() } else { format!("#{}", index + 1) };
    let invalid = |message: String| CatalogueError::Invalid { affiliate: who.clone(), message };
    if !valid_affiliate_id(&raw.id) {
        return Err(invalid(format!("id {:?} must be 1-32 of a-z, 0-9, _ and -", raw.id)));
    }
    if !valid_legal_name(&raw.name) {
        return Err(invalid(
            "name must be 1-200 bytes, without control characters or leading and trailing spaces".into(),
        ));
    }
    if !valid_country(&raw.country) {
        return Err(invalid(format!("country {:?} must be an ISO 3166-1 alpha-2 code such as \"FR\"", raw.country)));
    }
    let rest = raw
        .endpoint
        .strip_prefix("http://")
        .or_else(|| raw.endpoint.strip_prefix("https://"))
        .ok_or_else(|| invalid(format!("endpoint {:?} must be an http:// or https:// URL", raw.endpoint)))?;
    if rest.is_empty() || rest.starts_with('/') || rest.chars().any(char::is_whitespace) {
        return Err(invalid(format!("endpoint {:?} has no host", raw.endpoint)));
    }
    // Plain http carries personal data in clear: only to an affiliate on this host.
    if raw.endpoint.starts_with("http://") && !is_loopback_host(endpoint_host(rest)) {
        return Err(invalid(format!(
            "endpoint {:?}: http:// is accepted only for a loopback host (127.0.0.1, [::1], localhost); use https://",
            raw.endpoint
        )));
    }
    let key = raw
        .secret
        .strip_prefix("whsec_")
        .ok_or_else(|| invalid("secret must be \"whsec_\" followed by a base64 key".into()))?;
    let secret = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| invalid("secret after \"whsec_\" is not valid base64".into()))?;
    if !(16..=64).contains(&secret.len()) {
        return Err(invalid(format!("secret key must be 16 to 64 bytes, got {}", secret.len())));
    }
    let mut purposes = BTreeMap::new();
    let mut retention = BTreeMap::new();
    for (name, terms) in raw.purposes {
        let purpose = Purpose::parse(&name).ok_or_else(|| invalid(format!("unknown purpose {name:?}")))?;
        let fields = match terms {
            RawPurpose::Fields(fields) => fields,
            RawPurpose::Terms(RawTerms { fields, retention_days }) => {
                match retention_days {
                    Some(0) => return Err(invalid(format!("purpose {name}: retention_days must be at least 1"))),
                    Some(days) => {
                        retention.insert(purpose, Retention::Days(days));
                    }
                    None => {}
                }
                fields
            }
        };
        if fields.is_empty() {
            return Err(invalid(format!("purpose {name}: list at least one field, or leave the purpose out")));
        }
        let mut set = BTreeSet::new();
        for f in fields {
            let field = Field::parse(&f).ok_or_else(|| {
                let known: Vec<_> = FIELDS.iter().map(|f| f.as_str()).collect();
                invalid(format!("purpose {name}: unknown field {f:?} (known: {})", known.join(", ")))
            })?;
            if !set.insert(field) {
                return Err(invalid(format!("purpose {name}: field {f} listed twice")));
            }
        }
        purposes.insert(purpose, set);
    }
    Ok(Affiliate {
        id: raw.id,
        name: raw.name,
        country: raw.country,
        endpoint: raw.endpoint,
        secret,
        purposes,
        retention,
    })
}

/// The host of a URL's `host[:port][/path]` part (an IPv6 literal without its brackets). Kept here, not taken from
/// the webhook client, so that the catalogue stays free of network code.
fn endpoint_host(rest: &str) -> &str {
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    }
}

/// Whether `host` (as in a URL, IPv6 without brackets) names this machine over loopback.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../affiliates.example.toml");

    #[test]
    fn the_example_file_is_valid() {
        let c = Catalogue::parse(EXAMPLE).expect("example parses");
        let adsco = c.get("adsco").expect("adsco");
        assert_eq!(adsco.country, "FR");
        assert_eq!(
            c.allowed("adsco", Purpose::Advertising).expect("allowed"),
            &BTreeSet::from([Field::PhonePseudonym, Field::DeviceModel])
        );
        assert_eq!(c.allowed("adsco", Purpose::Security), None);
    }

    fn with(replace: &str, by: &str) -> String {
        assert!(EXAMPLE.contains(replace), "{replace}");
        EXAMPLE.replacen(replace, by, 1)
    }

    #[test]
    fn errors_name_the_affiliate_and_the_problem() {
        let cases = [
            (with("advertising = [", "business_intelligence = ["), "unknown purpose"),
            (with("\"device_model\"]", "\"imei\"]"), "unknown field"),
            (with("whsec_", "wh_"), "secret must be"),
            (with("country = \"FR\"\nendpoint", "country = \"France\"\nendpoint"), "country"),
            (with("country = \"FR\"", "country = \"fr\""), "[controller]"),
            (with("endpoint = \"http://", "endpoint = \"ftp://"), "endpoint"),
            (with("http://127.0.0.1:9000", "http://hooks.example.com"), "only for a loopback host"),
            (with("http://127.0.0.1:9000", "http://10.0.0.7:9000"), "only for a loopback host"),
            (with("id = \"adsco\"", "id = \"Ads Co\""), "id"),
        ];
        for (text, want) in cases {
            let err = Catalogue::parse(&text).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        let dup = format!(
            "{EXAMPLE}\n{}",
            EXAMPLE.split("[[affiliate]]").nth(1).map(|a| format!("[[affiliate]]{a}")).unwrap_or_default()
        );
        assert!(Catalogue::parse(&dup).expect_err("duplicate").to_string().contains("duplicate"));
        assert!(Catalogue::parse("[[affiliate]]\nid = 3\n").is_err());
        assert!(Catalogue::parse("[[affiliate]]\nid = \"a\"\nunknown_key = 1\n").is_err());
    }

    #[test]
    fn plain_http_only_to_loopback_hosts() {
        for ok in
            ["http://localhost:9000/h", "http://[::1]:9000/h", "http://127.0.0.2/h", "https://hooks.example.com/in"]
        {
            let text = with("http://127.0.0.1:9000/hooks", ok);
            assert!(Catalogue::parse(&text).is_ok(), "{ok} should be accepted");
        }
    }

    #[test]
    fn each_allowed_pair_has_a_notice_naming_its_exact_terms() {
        let c = Catalogue::parse(EXAMPLE).expect("example parses");
        assert_eq!(c.notices().count(), 3, "adsco advertising and analytics, shieldco security");
        let n = &c.notice("adsco", Purpose::Advertising).expect("a notice").notice;
        assert_eq!((n.legal_name.as_str(), n.country.as_str(), n.version), ("AdsCo SAS", "FR", 1));
        assert_eq!(n.fields, [Field::PhonePseudonym, Field::DeviceModel]);
        assert_eq!(n.retention, Retention::UntilWithdrawn);
        assert!(c.notice("adsco", Purpose::Security).is_none(), "a pair not allowed has no notice");

        let with_days = with(
            r#"analytics = ["device_model", "os", "app_version"]"#,
            r#"analytics = { fields = ["os", "device_model"], retention_days = 30 }"#,
        );
        let c2 = Catalogue::parse(&with_days).expect("the table form");
        let n2 = &c2.notice("adsco", Purpose::Analytics).expect("a notice").notice;
        assert_eq!((n2.fields.as_slice(), n2.retention), (&[Field::DeviceModel, Field::Os][..], Retention::Days(30)));
        assert_ne!(
            c.notice("adsco", Purpose::Analytics).map(|n| n.hash),
            c2.notice("adsco", Purpose::Analytics).map(|n| n.hash)
        );
        for (text, want) in [
            (
                with(
                    r#"analytics = ["device_model""#,
                    r#"analytics = { fields = ["device_model"], retention_days = 0 }
x = ["device_model""#,
                ),
                "retention_days must be at least 1",
            ),
            (with("name = \"AdsCo SAS\"", "name = \"AdsCo\\nSAS\""), "control characters"),
        ] {
            let err = Catalogue::parse(&text).map(|_| ()).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        // Renaming the affiliate, moving it to another country: new notices.
        for changed in
            [with("AdsCo SAS", "AdsCo Holding Ltd"), with("country = \"FR\"\nendpoint", "country = \"US\"\nendpoint")]
        {
            let c3 = Catalogue::parse(&changed).expect("catalogue");
            assert_ne!(
                c3.notice("adsco", Purpose::Advertising).map(|n| n.hash),
                c.notice("adsco", Purpose::Advertising).map(|n| n.hash)
            );
        }
    }
}
