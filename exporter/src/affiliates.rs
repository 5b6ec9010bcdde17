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
//! analytics = ["device_model", "os", "app_version"]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use base64::Engine;
use relay_proto::consent::{Purpose, valid_affiliate_id};
use serde::Deserialize;

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

/// Every field, in payload order.
pub const FIELDS: [Field; 5] = [Field::Phone, Field::PhonePseudonym, Field::DeviceModel, Field::Os, Field::AppVersion];

impl Field {
    /// The name used in the catalogue and in payloads.
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
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
}

/// The whole catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Catalogue {
    affiliates: BTreeMap<String, Affiliate>,
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
    affiliate: Vec<RawAffiliate>,
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
    purposes: BTreeMap<String, Vec<String>>,
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
        Ok(Self { affiliates })
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
    if raw.name.trim().is_empty() || raw.name.len() > 200 {
        return Err(invalid("name must be 1-200 characters".into()));
    }
    if raw.country.len() != 2 || !raw.country.bytes().all(|b| b.is_ascii_uppercase()) {
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
    for (name, fields) in raw.purposes {
        let purpose = Purpose::parse(&name).ok_or_else(|| invalid(format!("unknown purpose {name:?}")))?;
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
    Ok(Affiliate { id: raw.id, name: raw.name, country: raw.country, endpoint: raw.endpoint, secret, purposes })
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
            (with("country = \"FR\"", "country = \"France\""), "country"),
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
}
