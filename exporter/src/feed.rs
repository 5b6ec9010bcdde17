//! Turning the relay's consent feed into outbox entries.
//!
//! Contract: a change is acted on only if the user's Ed25519 signature over the statement verifies with the
//! change's identity key and the account id derives from that key; anything else is skipped and logged without
//! personal data. Every verified statement is kept as audit evidence. A grant with a subject, for a pair the
//! catalogue allows, queues one export whose webhook id is derived from the statement hash, the affiliate and a
//! digest of the exported data; reading the same change again, or a subject change that leaves the affiliate's
//! fields as they were, queues nothing, while new data (a new device, say) replaces what is still queued for the pair.
//! Each export body carries a random nonce, so the log's payload hash cannot be reversed by guessing the data.
//! A withdrawal removes the pair's queued exports and, if the pair had been delivered, queues a `consent.withdrawn`
//! notice carrying only the user's pseudonym for that affiliate.

use ed25519_dalek::{Signature, VerifyingKey};
use relay_proto::AccountId;
use relay_proto::consent::{ConsentStatement, Decision};
use relay_proto::wire::ConsentChange;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::affiliates::Catalogue;
use crate::ids::{Pair, WebhookId};
use crate::outbox::{Entry, Evidence, ExporterStore, Kind, StoreError};
use crate::payload::{self, phone_pseudonym};

/// What became of one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Failed verification: ignored.
    Rejected(&'static str),
    /// A grant with nothing to export (not in force any more, or not allowed by the catalogue).
    Nothing,
    /// An export was queued.
    Queued,
    /// The same data was already queued or delivered for this statement.
    Unchanged,
    /// A withdrawal: this many queued exports dropped, and whether a withdrawal notice was queued.
    Withdrawn {
        /// Exports removed from the outbox.
        dropped: usize,
        /// Whether a `consent.withdrawn` notice was queued.
        notified: bool,
    },
}

/// Checks the change's signature and account binding; the statement if both hold.
pub fn verify(change: &ConsentChange) -> Result<ConsentStatement, &'static str> {
    let key: [u8; 32] = change.identity_key.as_ref().try_into().map_err(|_| "identity key is not 32 bytes")?;
    let account = AccountId::from_slice(&change.account_id).ok_or("account id is not 16 bytes")?;
    if AccountId::from_identity_key(&key) != account {
        return Err("account id does not derive from the identity key");
    }
    let statement = ConsentStatement::decode_stored(&change.statement).map_err(|_| "statement does not decode")?;
    if statement.account != account {
        return Err("statement is for another account");
    }
    let verifying = VerifyingKey::from_bytes(&key).map_err(|_| "identity key is not a valid Ed25519 key")?;
    let signature = Signature::from_slice(&change.signature).map_err(|_| "signature is not 64 bytes")?;
    verifying.verify_strict(&statement.signed_bytes(), &signature).map_err(|_| "signature does not verify")?;
    Ok(statement)
}

fn event(kind: &str, now_ms: u64, data: serde_json::Map<String, Value>) -> String {
    let nonce: [u8; 16] = rand::random();
    json!({ "type": kind, "timestamp": relay_proto::time::rfc3339(now_ms), "nonce": hex::encode(nonce), "data": data })
        .to_string()
}

/// Applies one change to the outbox (the caller flushes, then advances the cursor).
pub fn apply(
    store: &ExporterStore,
    catalogue: &Catalogue,
    master_key: &[u8; 32],
    change: &ConsentChange,
    now_ms: u64,
) -> Result<Applied, StoreError> {
    let statement = match verify(change) {
        Ok(s) => s,
        Err(reason) => {
            tracing::warn!(cursor = change.cursor, reason, "consent change skipped");
            return Ok(Applied::Rejected(reason));
        }
    };
    let hash = statement.hash();
    let purpose = statement.purpose.as_str();
    let pair = Pair::new(statement.account, statement.affiliate.clone(), statement.purpose);
    let evidence = Evidence {
        statement: hex::encode(&change.statement),
        signature: hex::encode(&change.signature),
        identity_key: hex::encode(&change.identity_key),
        recorded_at_ms: change.recorded_at_ms,
    };
    store.record_statement(&pair, statement.sequence, &evidence)?;
    let Some(affiliate) = catalogue.get(&statement.affiliate) else {
        return Ok(Applied::Nothing);
    };
    match statement.decision {
        Decision::Grant => {
            let Some(subject) = &change.subject else { return Ok(Applied::Nothing) };
            let device = subject.device.clone().unwrap_or_default();
            let subject = payload::Subject {
                phone: subject.phone.clone(),
                device_model: device.model,
                os: device.os,
                app_version: device.app_version,
            };
            let Some((mut data, fields)) = payload::build(affiliate, statement.purpose, &subject, master_key) else {
                return Ok(Applied::Nothing);
            };
            // serde_json's map is ordered by key, so equal data gives equal digests.
            let digest: [u8; 32] = Sha256::digest(Value::Object(data.clone()).to_string().as_bytes()).into();
            let marker = format!("{}:{}", hex::encode(hash), hex::encode(digest));
            if store.exported(&pair)?.as_deref() == Some(marker.as_str()) {
                return Ok(Applied::Unchanged);
            }
            data.insert("purpose".into(), Value::String(purpose.into()));
            data.insert("consent".into(), Value::String(hex::encode(hash)));
            let entry = Entry {
                kind: Kind::Export,
                pair: pair.clone(),
                statement_hash: hash,
                pseudonym: phone_pseudonym(master_key, &affiliate.id, &subject.phone),
                body: event("user.metadata.exported", now_ms, data),
                attempts: 0,
                next_attempt_ms: now_ms,
                fields: fields.iter().map(|f| f.as_str().to_owned()).collect(),
                evidence: Some(evidence),
                in_flight_ms: None,
            };
            // Older data still queued for the pair is superseded by this one.
            store.remove_exports_of(&pair)?;
            store.insert_new(&WebhookId::derive(&hash, &affiliate.id, &digest), &entry)?;
            store.set_exported(&pair, &marker)?;
            Ok(Applied::Queued)
        }
        Decision::Withdraw => {
            let dropped = store.remove_exports_of(&pair)?;
            store.forget_exported(&pair)?;
            let mut notified = false;
            if let Some(pseudonym) = store.delivered(&pair)? {
                let mut data = serde_json::Map::new();
                data.insert("purpose".into(), Value::String(purpose.into()));
                data.insert("subject".into(), Value::String(pseudonym.clone()));
                let entry = Entry {
                    kind: Kind::Withdrawn,
                    pair: pair.clone(),
                    statement_hash: hash,
                    pseudonym,
                    body: event("consent.withdrawn", now_ms, data),
                    attempts: 0,
                    next_attempt_ms: now_ms,
                    fields: Vec::new(),
                    evidence: None,
                    in_flight_ms: None,
                };
                // Queued before the delivered mark is forgotten, so a crash between the two loses neither.
                store.insert_new(&WebhookId::notice(&hash, &affiliate.id), &entry)?;
                store.forget_delivered(&pair)?;
                notified = true;
            }
            Ok(Applied::Withdrawn { dropped, notified })
        }
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};
    use relay_proto::consent::Purpose;
    use relay_proto::wire::{DeviceInfo, Subject};

    use super::*;
    use crate::outbox::Kind;

    const CATALOGUE: &str = include_str!("../affiliates.example.toml");

    fn change(key: &SigningKey, affiliate: &str, decision: Decision, sequence: u64) -> ConsentChange {
        let account = AccountId::from_identity_key(key.verifying_key().as_bytes());
        let statement = ConsentStatement {
            account,
            affiliate: affiliate.into(),
            purpose: Purpose::Advertising,
            decision,
            notice_hash: Purpose::Advertising.notice().hash(),
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

    /// A fresh store (its directory kept alive by the guard), the example catalogue, a user key, a pseudonym key.
    fn fixture() -> (tempfile::TempDir, ExporterStore, Catalogue, SigningKey, [u8; 32]) {
        let dir = tempfile::tempdir().expect("dir");
        let store = ExporterStore::open(dir.path()).expect("store");
        (dir, store, Catalogue::parse(CATALOGUE).expect("catalogue"), SigningKey::from_bytes(&[7; 32]), [3; 32])
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
    fn grants_queue_once_and_withdrawals_clear_and_notify() {
        let (_dir, store, catalogue, key, master) = fixture();
        let grant = change(&key, "adsco", Decision::Grant, 1);
        assert_eq!(apply(&store, &catalogue, &master, &grant, 5).expect("apply"), Applied::Queued);
        assert_eq!(apply(&store, &catalogue, &master, &grant, 6).expect("apply"), Applied::Unchanged);
        assert_eq!(store.len(), 1, "re-reading the feed queues nothing new");
        // A subject change the affiliate does not receive (the OS, for adsco's advertising) exports nothing.
        let mut new_os = grant.clone();
        new_os.subject.as_mut().and_then(|s| s.device.as_mut()).expect("device").os = "Android 17".into();
        assert_eq!(apply(&store, &catalogue, &master, &new_os, 6).expect("apply"), Applied::Unchanged);
        // A new device model replaces the queued export.
        let mut new_model = grant.clone();
        new_model.subject.as_mut().and_then(|s| s.device.as_mut()).expect("device").model = "Pixel 10".into();
        assert_eq!(apply(&store, &catalogue, &master, &new_model, 6).expect("apply"), Applied::Queued);
        assert_eq!(store.len(), 1, "the older data is superseded");
        let (_, queued) = store.due(10, 10).expect("due").remove(0);
        assert!(queued.body.contains("Pixel 10"), "{}", queued.body);
        assert_eq!(queued.fields, ["phone_pseudonym", "device_model"]);
        assert_eq!(store.statements_of(&queued.pair).expect("evidence").len(), 1);
        let shield = change(&key, "shieldco", Decision::Grant, 2);
        assert_eq!(apply(&store, &catalogue, &master, &shield, 7).expect("apply"), Applied::Nothing, "not allowed");
        let mut rejected = change(&key, "adsco", Decision::Grant, 3);
        rejected.signature = vec![0; 64].into();
        assert!(matches!(apply(&store, &catalogue, &master, &rejected, 8).expect("apply"), Applied::Rejected(_)));
        assert_eq!(store.len(), 1);

        let (id, entry) = store.due(10, 10).expect("due").remove(0);
        assert!(!entry.body.contains("612345678"), "{}", entry.body);
        let withdraw = change(&key, "adsco", Decision::Withdraw, 4);
        assert_eq!(
            apply(&store, &catalogue, &master, &withdraw, 9).expect("apply"),
            Applied::Withdrawn { dropped: 1, notified: false }
        );
        assert!(store.get(&id).expect("get").is_none());

        // Delivered, then withdrawn: a notice with the pseudonym only.
        store.mark_delivered(&entry.pair, &entry.pseudonym).expect("mark");
        assert_eq!(
            apply(&store, &catalogue, &master, &withdraw, 10).expect("apply"),
            Applied::Withdrawn { dropped: 0, notified: true }
        );
        let (_, notice) = store.due(20, 10).expect("due").remove(0);
        assert_eq!(notice.kind, Kind::Withdrawn);
        let body: Value = serde_json::from_str(&notice.body).expect("json");
        assert_eq!(body["data"]["subject"], Value::String(phone_pseudonym(&master, "adsco", "+33612345678")));
        assert_eq!(store.delivered(&entry.pair).expect("delivered"), None);
    }

    /// Found by the exporter crash campaign: an exporter killed after the affiliate took an export but before it
    /// recorded the answer, then a withdrawal read on restart, dropped the export unlogged and without a notice.
    #[test]
    fn a_withdrawal_logs_and_notifies_an_export_whose_attempt_got_no_answer() {
        let (_dir, store, catalogue, key, master) = fixture();
        let grant = change(&key, "adsco", Decision::Grant, 1);
        assert_eq!(apply(&store, &catalogue, &master, &grant, 5).expect("apply"), Applied::Queued);
        let (id, mut entry) = store.due(10, 10).expect("due").remove(0);
        // What the exporter writes, durably, before the request leaves; then it dies.
        entry.in_flight_ms = Some(6);
        store.put(&id, &entry).expect("put");

        let withdraw = change(&key, "adsco", Decision::Withdraw, 2);
        assert_eq!(
            apply(&store, &catalogue, &master, &withdraw, 9).expect("apply"),
            Applied::Withdrawn { dropped: 1, notified: true },
            "the affiliate may hold the data: it is told of the withdrawal"
        );
        assert_eq!(store.log_len().expect("log"), 1, "and the export is in the log");
        let (_, record) = store.log_records(0, 1).expect("records").remove(0);
        let leaf = relay_proto::merkle::ExportLeaf::decode(&record.leaf).expect("leaf");
        assert_eq!((leaf.export_id, leaf.time_ms), (id.export_id(), 6), "at the attempt's time");
        let (_, notice) = store.due(20, 10).expect("due").remove(0);
        assert_eq!(notice.kind, Kind::Withdrawn);

        // Without an attempt in flight, a dropped export is neither logged nor notified.
        let regrant = change(&key, "adsco", Decision::Grant, 3);
        assert_eq!(apply(&store, &catalogue, &master, &regrant, 10).expect("apply"), Applied::Queued);
        let rewithdraw = change(&key, "adsco", Decision::Withdraw, 4);
        assert_eq!(
            apply(&store, &catalogue, &master, &rewithdraw, 11).expect("apply"),
            Applied::Withdrawn { dropped: 1, notified: false }
        );
        assert_eq!(store.log_len().expect("log"), 1);
    }
}
