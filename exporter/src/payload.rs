//! Export payloads: exactly the fields the affiliate's catalogue entry allows for the purpose, nothing else.
//!
//! `phone_pseudonym` is HMAC-SHA256 of the E.164 number under a key derived for that affiliate from the exporter's
//! own secret (kept in its data dir, never shared). The affiliate does not know its key, so it cannot recover the
//! number by trying all numbers, and two affiliates get unrelated pseudonyms for the same person.

use std::collections::BTreeSet;

use hmac::{Hmac, KeyInit, Mac};
use relay_proto::consent::Purpose;
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::affiliates::{Affiliate, Field};

/// What the export interface hands over about one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// E.164 phone number.
    pub phone: String,
    /// Device model.
    pub device_model: String,
    /// Operating system.
    pub os: String,
    /// Client version.
    pub app_version: String,
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The affiliate-specific pseudonym of `phone` (hex).
pub fn phone_pseudonym(master_key: &[u8; 32], affiliate: &str, phone: &str) -> String {
    let key = hmac(master_key, &[b"consent-relay phone pseudonym key v1\0", affiliate.as_bytes()]);
    hex::encode(hmac(&key, &[phone.as_bytes()]))
}

/// The `data` object of an export: the allowed fields of `subject` for `purpose`, and their names. `None` if the
/// affiliate may receive nothing for this purpose.
pub fn build(
    affiliate: &Affiliate,
    purpose: Purpose,
    subject: &Subject,
    master_key: &[u8; 32],
) -> Option<(Map<String, Value>, Vec<Field>)> {
    let allowed: &BTreeSet<Field> = affiliate.purposes.get(&purpose)?;
    let mut data = Map::new();
    for &field in allowed {
        let value = match field {
            Field::Phone => subject.phone.clone(),
            Field::PhonePseudonym => phone_pseudonym(master_key, &affiliate.id, &subject.phone),
            Field::DeviceModel => subject.device_model.clone(),
            Field::Os => subject.os.clone(),
            Field::AppVersion => subject.app_version.clone(),
        };
        data.insert(field.as_str().to_owned(), Value::String(value));
    }
    Some((data, allowed.iter().copied().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affiliates::Catalogue;

    fn subject() -> Subject {
        Subject {
            phone: "+33612345678".into(),
            device_model: "Pixel 9".into(),
            os: "Android 16".into(),
            app_version: "1.2.3".into(),
        }
    }

    #[test]
    fn exactly_the_allowed_fields() {
        let c = Catalogue::parse(include_str!("../affiliates.example.toml")).expect("catalogue");
        let adsco = c.get("adsco").expect("adsco");
        let (data, fields) = build(adsco, Purpose::Advertising, &subject(), &[1; 32]).expect("allowed");
        let keys: Vec<_> = data.keys().cloned().collect();
        assert_eq!(keys, ["device_model", "phone_pseudonym"]);
        assert_eq!(fields, [Field::PhonePseudonym, Field::DeviceModel]);
        let text = serde_json::to_string(&data).expect("json");
        assert!(!text.contains("612345678") && !text.contains("Android"), "{text}");
        assert!(build(adsco, Purpose::Security, &subject(), &[1; 32]).is_none(), "purpose not in the catalogue");
        let shield = c.get("shieldco").expect("shieldco");
        let (data, _) = build(shield, Purpose::Security, &subject(), &[1; 32]).expect("allowed");
        assert_eq!(data.get("phone"), Some(&Value::String("+33612345678".into())));
    }

    #[test]
    fn pseudonyms_differ_per_affiliate_and_exporter_key() {
        let a = phone_pseudonym(&[1; 32], "adsco", "+33612345678");
        assert_eq!(a, phone_pseudonym(&[1; 32], "adsco", "+33612345678"), "stable");
        assert_ne!(a, phone_pseudonym(&[1; 32], "shieldco", "+33612345678"), "unlinkable across affiliates");
        assert_ne!(a, phone_pseudonym(&[2; 32], "adsco", "+33612345678"), "depends on the exporter's secret");
        assert_ne!(a, phone_pseudonym(&[1; 32], "adsco", "+33612345679"));
    }
}
