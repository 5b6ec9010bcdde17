//! What an affiliate received about a user under one pair since the pair's last withdrawal: the identifiers a
//! withdrawal (or, later, erasure) notice must carry so that the affiliate can find what it holds.
//!
//! Contract: an export adds the phone number only if the phone was among the fields sent, the pseudonym only if the
//! pseudonym was, and always its webhook id. A notice carries the phone numbers and pseudonyms the affiliate
//! received, under the field names it received them by (`phone`, `phone_pseudonym`, each a list: a number change
//! can make more than one), and, only if it received neither, the webhook ids of the exports (`webhook_ids`). The
//! stored form is a JSON object; a record written before this one (the bare pseudonym) reads as that pseudonym. The
//! `Debug` form shows counts only: no phone number reaches a log through it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::affiliates::Field;
use crate::ids::WebhookId;

/// The identifiers an affiliate received for one pair.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// Raw phone numbers sent (the `phone` field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phone: Vec<String>,
    /// Pseudonyms sent (the `phone_pseudonym` field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phone_pseudonym: Vec<String>,
    /// Webhook ids of the exports delivered (or possibly delivered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhook_ids: Vec<String>,
    /// The notice hash (hex) the grant of the latest of those exports signed: what the notice's log leaf records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice_hash: Option<String>,
}

impl std::fmt::Debug for Delivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivered")
            .field("phones", &self.phone.len())
            .field("pseudonyms", &self.phone_pseudonym.len())
            .field("webhook_ids", &self.webhook_ids)
            .finish()
    }
}

fn add(list: &mut Vec<String>, value: String) {
    if !list.contains(&value) {
        list.push(value);
    }
}

impl Delivered {
    /// What export `id` gave its affiliate: its `fields` as sent in `body` (the event as stored), and `pseudonym`
    /// if the pseudonym was among them; `notice_hash` is what its grant signed.
    pub fn of_export(
        id: &WebhookId,
        fields: &[String],
        body: &str,
        pseudonym: &str,
        notice_hash: Option<[u8; 32]>,
    ) -> Self {
        let notice_hash = notice_hash.map(hex::encode);
        let mut d = Self { webhook_ids: vec![id.to_string()], notice_hash, ..Self::default() };
        if fields.iter().any(|f| f == Field::Phone.as_str()) {
            let event: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            if let Some(phone) = event["data"][Field::Phone.as_str()].as_str() {
                d.phone.push(phone.to_owned());
            }
        }
        if fields.iter().any(|f| f == Field::PhonePseudonym.as_str()) {
            d.phone_pseudonym.push(pseudonym.to_owned());
        }
        d
    }

    /// Adds what `other` holds (in order, without repeats; its notice hash, if any, is the latest).
    pub fn merge(&mut self, other: Delivered) {
        if other.notice_hash.is_some() {
            self.notice_hash = other.notice_hash;
        }
        other.phone.into_iter().for_each(|v| add(&mut self.phone, v));
        other.phone_pseudonym.into_iter().for_each(|v| add(&mut self.phone_pseudonym, v));
        other.webhook_ids.into_iter().for_each(|v| add(&mut self.webhook_ids, v));
    }

    /// The notice hash to log with a notice, if known.
    pub fn notice_hash(&self) -> Option<[u8; 32]> {
        let hex = self.notice_hash.as_ref()?;
        hex::decode(hex).ok()?.try_into().ok()
    }

    /// The identifying part of a notice's data (see the module header).
    pub fn notice_data(&self) -> Map<String, Value> {
        let list = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let mut data = Map::new();
        if !self.phone.is_empty() {
            data.insert(Field::Phone.as_str().into(), list(&self.phone));
        }
        if !self.phone_pseudonym.is_empty() {
            data.insert(Field::PhonePseudonym.as_str().into(), list(&self.phone_pseudonym));
        }
        if data.is_empty() {
            data.insert("webhook_ids".into(), list(&self.webhook_ids));
        }
        data
    }

    /// The stored form.
    pub fn to_stored(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the stored form, or the bare pseudonym of a record written before it.
    pub fn from_stored(bytes: &[u8]) -> Self {
        match serde_json::from_slice::<Delivered>(bytes) {
            Ok(d) if bytes.first() == Some(&b'{') => d,
            _ => Self { phone_pseudonym: vec![String::from_utf8_lossy(bytes).into_owned()], ..Self::default() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_forms_old_and_new_read_back() {
        let d =
            Delivered { phone: vec!["+33612345678".into()], webhook_ids: vec!["msg_1".into()], ..Delivered::default() };
        assert_eq!(Delivered::from_stored(&d.to_stored()), d);
        let old = Delivered::from_stored(b"abcdef");
        assert_eq!(old.phone_pseudonym, ["abcdef"]);
        assert!(!format!("{d:?}").contains("612345678"), "no phone number in the debug form");
    }
}
