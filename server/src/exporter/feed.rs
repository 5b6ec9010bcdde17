//! Turning the relay's consent feed into outbox entries.
//!
//! Contract: a change is acted on only if the user's Ed25519 signature over the statement verifies with the
//! change's identity key and the account id derives from that key; anything else is skipped and logged without
//! personal data. A grant with a subject, for a pair the catalogue allows, queues one export whose webhook id is
//! derived from the statement hash and the affiliate, so reading the same change again never queues a second one.
//! A withdrawal removes the pair's queued exports and, if the pair had been delivered, queues a `consent.withdrawn`
//! notice carrying only the user's pseudonym for that affiliate.

use ed25519_dalek::{Signature, VerifyingKey};
use relay_proto::AccountId;
use relay_proto::consent::{ConsentStatement, Decision};
use relay_proto::wire::ConsentChange;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::affiliates::Catalogue;
use super::outbox::{Entry, Kind, Store, StoreError, pair_key};
use super::payload::{self, phone_pseudonym};

/// What became of one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Failed verification: ignored.
    Rejected(&'static str),
    /// A grant with nothing to export (not in force any more, or not allowed by the catalogue).
    Nothing,
    /// An export was queued (or already was).
    Queued,
    /// A withdrawal: this many queued exports dropped, and whether a withdrawal notice was queued.
    Withdrawn {
        /// Exports removed from the outbox.
        dropped: usize,
        /// Whether a `consent.withdrawn` notice was queued.
        notified: bool,
    },
}

/// The webhook id of the event that follows from statement `hash` for `affiliate`.
pub fn webhook_id(hash: &[u8; 32], affiliate: &str) -> String {
    let digest = Sha256::new().chain_update(hash).chain_update(affiliate.as_bytes()).finalize();
    format!("msg_{}", hex::encode(&digest[..16]))
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
    json!({ "type": kind, "timestamp": relay_proto::time::rfc3339(now_ms), "data": data }).to_string()
}

/// Applies one change to the outbox (the caller flushes, then advances the cursor).
pub fn apply(
    store: &Store,
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
    let account = statement.account.to_string();
    let purpose = statement.purpose.as_str();
    let pair = pair_key(&account, &statement.affiliate, purpose);
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
            let Some((mut data, _fields)) = payload::build(affiliate, statement.purpose, &subject, master_key) else {
                return Ok(Applied::Nothing);
            };
            data.insert("purpose".into(), Value::String(purpose.into()));
            data.insert("consent".into(), Value::String(hex::encode(hash)));
            let entry = Entry {
                kind: Kind::Export,
                affiliate: affiliate.id.clone(),
                purpose: purpose.into(),
                account,
                statement_hash: hex::encode(hash),
                pseudonym: phone_pseudonym(master_key, &affiliate.id, &subject.phone),
                body: event("user.metadata.exported", now_ms, data),
                attempts: 0,
                next_attempt_ms: now_ms,
            };
            store.insert_new(&webhook_id(&hash, &affiliate.id), &entry)?;
            Ok(Applied::Queued)
        }
        Decision::Withdraw => {
            let dropped = store.remove_exports_of(&pair)?;
            let mut notified = false;
            if let Some(pseudonym) = store.delivered(&pair)? {
                let mut data = serde_json::Map::new();
                data.insert("purpose".into(), Value::String(purpose.into()));
                data.insert("subject".into(), Value::String(pseudonym.clone()));
                let entry = Entry {
                    kind: Kind::Withdrawn,
                    affiliate: affiliate.id.clone(),
                    purpose: purpose.into(),
                    account,
                    statement_hash: hex::encode(hash),
                    pseudonym,
                    body: event("consent.withdrawn", now_ms, data),
                    attempts: 0,
                    next_attempt_ms: now_ms,
                };
                // Queued before the delivered mark is forgotten, so a crash between the two loses neither.
                store.insert_new(&webhook_id(&hash, &affiliate.id), &entry)?;
                store.forget_delivered(&pair)?;
                notified = true;
            }
            Ok(Applied::Withdrawn { dropped, notified })
        }
    }
}
