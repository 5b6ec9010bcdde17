//! The relay's feeds as the exporter reads them: consent statements (`ConsentChanges`) and accounts whose
//! exportable data changed (`SubjectChanges`), each a list of [`ConsentChange`]s after a cursor, and erasures
//! (`ErasureChanges`, checked by `crate::core::erasure`). What a change may
//! lead to is decided by the core (`crate::core`); this module checks a change before anything acts on it, and
//! writes the events it leads to.
//!
//! Contract: a change is acted on only if the user's Ed25519 signature over the statement verifies with the
//! change's identity key and the account id derives from that key ([`verify`]); anything else is skipped. Every event
//! body carries a random nonce, so the log's payload hash cannot be reversed by guessing the data. Pure: no I/O.

use ed25519_dalek::VerifyingKey;
use relay_proto::AccountId;
use relay_proto::consent::{self, ConsentStatement};
use relay_proto::wire::{
    ConsentChange, ConsentChangeList, ConsentChanges, ErasureChanges, SubjectChanges, export_request,
};
use serde_json::{Value, json};

use crate::payload;

/// One of the relay's feeds, each with its own cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feed {
    /// Consent statements, in the order the relay recorded them.
    Consents,
    /// Accounts whose phone number or device info changed, with the pairs in force for them.
    Subjects,
    /// Accounts erased at their signed request (`ErasureChanges`), in the order the relay recorded them.
    Erasures,
}

impl Feed {
    /// The two feeds of statements (each a `ConsentChange` list), in the order a pass reads them, after
    /// [`Feed::Erasures`].
    pub const ALL: [Feed; 2] = [Feed::Consents, Feed::Subjects];

    /// The request for the changes after `after_cursor`.
    pub fn request(self, after_cursor: u64) -> export_request::Body {
        match self {
            Feed::Consents => export_request::Body::ConsentChanges(ConsentChanges { after_cursor }),
            Feed::Subjects => export_request::Body::SubjectChanges(SubjectChanges { after_cursor }),
            Feed::Erasures => export_request::Body::ErasureChanges(ErasureChanges { after_cursor }),
        }
    }
}

/// Whether `page`, asked for after `after_cursor`, says the feed has nothing more: no change and no progress.
pub fn caught_up(after_cursor: u64, page: &ConsentChangeList) -> bool {
    page.changes.is_empty() && page.next_cursor <= after_cursor
}

/// Checks the change's signature, over the statement bytes as received and before they are decoded, and its account
/// binding; the statement if both hold.
pub fn verify(change: &ConsentChange) -> Result<ConsentStatement, &'static str> {
    let key: [u8; 32] = change.identity_key.as_ref().try_into().map_err(|_| "identity key is not 32 bytes")?;
    let account = AccountId::from_slice(&change.account_id).ok_or("account id is not 16 bytes")?;
    if AccountId::from_identity_key(&key) != account {
        return Err("account id does not derive from the identity key");
    }
    let verifying = VerifyingKey::from_bytes(&key).map_err(|_| "identity key is not a valid Ed25519 key")?;
    consent::verify_signature(&change.statement, &change.signature, &verifying)
        .map_err(|_| "signature does not verify")?;
    let statement = ConsentStatement::decode_stored(&change.statement).map_err(|_| "statement does not decode")?;
    if statement.account != account {
        return Err("statement is for another account");
    }
    Ok(statement)
}

/// What the change says of the user, if it carries a subject (only grants in force do).
pub fn subject(change: &ConsentChange) -> Option<payload::Subject> {
    let subject = change.subject.as_ref()?;
    let device = subject.device.clone().unwrap_or_default();
    Some(payload::Subject {
        phone: subject.phone.clone(),
        device_model: device.model,
        os: device.os,
        app_version: device.app_version,
    })
}

/// The JSON body of an event of type `kind` written at `now_ms`, with `nonce` and `data`, and `log_head` (the export
/// log's latest signed head with its witnesses' cosignatures when the event was queued, [`log_head`]) if there is one.
pub fn event(
    kind: &str,
    now_ms: u64,
    nonce: [u8; 16],
    data: serde_json::Map<String, Value>,
    log_head: Option<&Value>,
) -> String {
    let mut body = json!({ "type": kind, "timestamp": relay_proto::time::rfc3339(now_ms), "nonce": hex::encode(nonce), "data": data });
    if let (Some(head), Some(object)) = (log_head, body.as_object_mut()) {
        object.insert("log_head".into(), head.clone());
    }
    body.to_string()
}

/// The `log_head` object of an event body: the log key, the signed head and the cosignatures, all hex.
pub fn log_head(
    log_key: &ed25519_dalek::VerifyingKey,
    head: &relay_proto::merkle::SignedTreeHead,
    cosignatures: &[relay_proto::witness::Cosignature],
) -> Value {
    json!({
        "log_key": hex::encode(log_key.as_bytes()),
        "size": head.head.size,
        "root": hex::encode(head.head.root),
        "timestamp_ms": head.head.timestamp_ms,
        "signature": hex::encode(head.signature),
        "cosignatures": cosignatures.iter().map(|c| json!({
            "witness_key": hex::encode(c.witness_key),
            "timestamp_ms": c.timestamp_ms,
            "signature": hex::encode(c.signature),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};
    use relay_proto::consent::{Decision, Purpose};
    use relay_proto::wire::{DeviceInfo, Subject};

    use super::*;

    fn change(key: &SigningKey, affiliate: &str, decision: Decision, sequence: u64) -> ConsentChange {
        let account = AccountId::from_identity_key(key.verifying_key().as_bytes());
        let statement = ConsentStatement {
            account,
            affiliate: affiliate.into(),
            purpose: Purpose::Advertising,
            decision,
            notice_hash: [9; 32],
            sequence,
            time_ms: 1_000,
            expires_ms: None,
        };
        let device = DeviceInfo { model: "Pixel 9".into(), os: "Android 16".into(), app_version: "1.2.3".into() };
        ConsentChange {
            cursor: sequence,
            account_id: account.as_bytes().to_vec().into(),
            identity_key: key.verifying_key().as_bytes().to_vec().into(),
            statement: statement.encode().into(),
            signature: key.sign(&statement.signed_bytes()).to_bytes().to_vec().into(),
            recorded_at_ms: 1_000,
            subject: (decision == Decision::Grant)
                .then(|| Subject { phone: "+33612345678".into(), device: Some(device) }),
        }
    }

    #[test]
    fn only_changes_signed_by_the_key_the_account_derives_from_are_accepted() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let good = change(&key, "adsco", Decision::Grant, 1);
        assert!(verify(&good).is_ok());
        let mut bad_sig = good.clone();
        let mut sig = bad_sig.signature.to_vec();
        sig[0] ^= 1;
        bad_sig.signature = sig.into();
        assert_eq!(verify(&bad_sig).err(), Some("signature does not verify"));
        let mut other_key = good.clone();
        other_key.identity_key = SigningKey::from_bytes(&[8; 32]).verifying_key().as_bytes().to_vec().into();
        assert_eq!(verify(&other_key).err(), Some("account id does not derive from the identity key"));
        let mut truncated = good;
        truncated.statement = truncated.statement.slice(..10);
        assert!(verify(&truncated).is_err());
    }

    #[test]
    fn events_carry_their_type_time_nonce_and_data_only() {
        let mut data = serde_json::Map::new();
        data.insert("purpose".into(), Value::String("advertising".into()));
        let body = event("consent.withdrawn", 1_700_000_000_123, [0xab; 16], data.clone(), None);
        let parsed: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(parsed["type"], "consent.withdrawn");
        assert_eq!(parsed["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(parsed["nonce"], "ab".repeat(16));
        assert_eq!(parsed["data"], json!({"purpose": "advertising"}));
        assert_eq!(parsed.as_object().map(|o| o.len()), Some(4));
        // With a head: the same, and the head with its cosignatures, each verifiable from the body alone.
        let (log_key, witness) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        let head = relay_proto::merkle::TreeHead { size: 3, root: [4; 32], timestamp_ms: 5 }.sign(&log_key);
        let cosignature = relay_proto::witness::Cosignature::sign(&witness, &log_key.verifying_key(), &head.head, 6);
        let value = log_head(&log_key.verifying_key(), &head, &[cosignature]);
        let body = event("consent.withdrawn", 1_700_000_000_123, [0xab; 16], data, Some(&value));
        let parsed: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(parsed.as_object().map(|o| o.len()), Some(5));
        assert_eq!(parsed["log_head"]["size"], 3);
        assert_eq!(parsed["log_head"]["signature"], hex::encode(head.signature));
        assert_eq!(
            parsed["log_head"]["cosignatures"][0]["witness_key"],
            hex::encode(witness.verifying_key().as_bytes())
        );
    }

    #[test]
    fn a_feed_is_caught_up_only_on_an_empty_page_that_does_not_move() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let page = |changes: Vec<ConsentChange>, next_cursor| ConsentChangeList { changes, next_cursor };
        assert!(caught_up(5, &page(vec![], 5)));
        assert!(!caught_up(5, &page(vec![], 9)), "the subject feed moves past changes with nothing in force");
        assert!(!caught_up(5, &page(vec![change(&key, "adsco", Decision::Grant, 6)], 6)));
        let grant = change(&key, "adsco", Decision::Grant, 1);
        assert_eq!(subject(&grant).map(|s| s.device_model), Some("Pixel 9".to_owned()));
        assert_eq!(subject(&change(&key, "adsco", Decision::Withdraw, 2)), None);
    }
}
