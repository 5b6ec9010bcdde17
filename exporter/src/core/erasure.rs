//! What an erasure read from the relay's erasure feed (`ErasureChanges`) does to the outbox and the store.
//!
//! Contract: an erasure is acted on only if the user's Ed25519 signature over the signed bytes verifies with the
//! change's identity key, the account id derives from that key, and the signed bytes are exactly a delete transcript
//! (`relay_proto::auth::delete_transcript`) naming that account ([`verify_evidence`]); the exporter checks this
//! itself and does not take the relay's word. A verified erasure, in this order of writes:
//! 1. drops every queued export of the account (one that an attempt may have reached the affiliate with is logged as
//!    delivered, as at a withdrawal, and adds to what its pair's affiliate received);
//! 2. queues, for every pair whose affiliate received data, an `account.erased` notice that names the user exactly
//!    as that affiliate received them ([`Delivered::notice_data`]), with the pair's purpose and nothing else; it is
//!    retried like a withdrawal notice (bounded, then abandoned with an alert) and logged, once delivered, as a leaf
//!    of kind `ErasureNotice` whose evidence is the signed erasure request;
//! 3. forgets the account's `exported` markers and `delivered` records, and its delivered bodies
//!    ([`Write::EraseBodies`]);
//! 4. marks the account erased ([`Write::Erased`], no personal data): from then on a grant of that account, even
//!    one the relay replays with a subject, exports nothing.
//!
//! Applying an erasure again (a crash before the feed's cursor moved) is harmless: notices are queued under ids
//! derived from the request, the affiliate and the purpose, and what was forgotten stays forgotten. The outbox keeps
//! the notices (which may carry the phone number the affiliate received) only until they are delivered or abandoned.

use ed25519_dalek::{Signature, VerifyingKey};
use relay_proto::AccountId;
use relay_proto::auth::parse_delete_transcript;
use relay_proto::wire::ErasureChange;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::delivered::Delivered;
use super::entry::{Entry, EntryState, Evidence, Kind};
use super::{Core, CoreError, Effect, Write};
use crate::feed;
use crate::ids::{Pair, WebhookId};

/// What became of one erasure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Erased {
    /// Failed verification: ignored.
    Rejected(&'static str),
    /// Applied: this many queued exports dropped, this many erasure notices queued.
    Applied {
        /// Exports removed from the outbox.
        dropped: usize,
        /// `account.erased` notices queued.
        notices: usize,
    },
}

/// What the store holds of an erased account, which the rules read: the driver looks it up for
/// [`CheckedErasure::account`] before handing the erasure to the core.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountRecords {
    /// Every pair of the account whose affiliate received data, and how.
    pub delivered: Vec<(Pair, Delivered)>,
    /// Every pair of the account with an `exported` marker.
    pub exported: Vec<Pair>,
}

/// An erasure whose signature was checked.
#[derive(Debug, Clone)]
pub struct CheckedErasure {
    cursor: u64,
    verified: Result<(AccountId, [u8; 32], Evidence), &'static str>,
}

/// The evidence an erasure is kept and logged with: the signed bytes, the signature and the identity key, hex.
fn evidence_of(change: &ErasureChange) -> Evidence {
    Evidence {
        statement: hex::encode(&change.signed),
        signature: hex::encode(&change.signature),
        identity_key: hex::encode(&change.identity_key),
        recorded_at_ms: change.recorded_at_ms,
    }
}

/// Checks erasure `evidence` (as kept, and as an erasure notice's log record carries it): the account it erases and
/// the SHA-256 of the signed bytes (what the notice's leaf records as its consent hash).
pub fn verify_evidence(evidence: &Evidence) -> Result<(AccountId, [u8; 32]), &'static str> {
    let signed = hex::decode(&evidence.statement).map_err(|_| "signed request is not hex")?;
    let key: [u8; 32] = hex::decode(&evidence.identity_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or("identity key is not 32 bytes of hex")?;
    let signature = hex::decode(&evidence.signature).map_err(|_| "signature is not hex")?;
    let verifying = VerifyingKey::from_bytes(&key).map_err(|_| "identity key is not a valid Ed25519 key")?;
    let signature = Signature::from_slice(&signature).map_err(|_| "signature is not 64 bytes")?;
    verifying.verify_strict(&signed, &signature).map_err(|_| "signature does not verify")?;
    let account = parse_delete_transcript(&signed).ok_or("the signed bytes are not a delete request")?;
    if AccountId::from_identity_key(&key) != account {
        return Err("the erased account does not derive from the identity key");
    }
    Ok((account, Sha256::digest(&signed).into()))
}

impl CheckedErasure {
    /// Checks `change` ([`verify_evidence`], and that it names the account it says).
    pub fn new(change: &ErasureChange) -> Self {
        let evidence = evidence_of(change);
        let verified = verify_evidence(&evidence).and_then(|(account, hash)| {
            if AccountId::from_slice(&change.account_id) != Some(account) {
                return Err("the request erases another account than the change names");
            }
            Ok((account, hash, evidence))
        });
        Self { cursor: change.cursor, verified }
    }

    /// The account a verified erasure erases: the one whose [`AccountRecords`] the core needs with it.
    pub fn account(&self) -> Option<AccountId> {
        self.verified.as_ref().ok().map(|(account, _, _)| *account)
    }
}

impl Core {
    /// Applies one checked erasure, given what the store holds of its account (see the module header). The effects
    /// are writes only.
    pub fn handle_erasure(
        &mut self,
        erasure: CheckedErasure,
        records: AccountRecords,
        now_ms: u64,
    ) -> Result<(Erased, Vec<Effect>), CoreError> {
        if let Some(attempt) = &self.current {
            return Err(CoreError::Busy(attempt.id()));
        }
        let (account, hash, evidence) = match erasure.verified {
            Ok(v) => v,
            Err(reason) => {
                tracing::warn!(cursor = erasure.cursor, reason, "erasure skipped");
                return Ok((Erased::Rejected(reason), Vec::new()));
            }
        };
        let mut effects = Vec::new();
        let mut delivered: Vec<(Pair, Delivered)> = records.delivered;
        let doomed: Vec<Pair> = self
            .outbox
            .values()
            .filter(|e| e.kind == Kind::Export && e.pair.account == account)
            .map(|e| e.pair.clone())
            .collect();
        let mut dropped = 0;
        for pair in doomed {
            let (n, logged) = self.drop_exports_of(&pair, &mut effects)?;
            dropped += n;
            if let Some(logged) = logged {
                match delivered.iter_mut().find(|(p, _)| *p == pair) {
                    Some((_, known)) => known.merge(logged),
                    None => delivered.push((pair, logged)),
                }
            }
        }
        let mut notices = 0;
        for (pair, received) in &delivered {
            if self.catalogue.get(&pair.affiliate).is_none() {
                continue;
            }
            let mut data = received.notice_data();
            data.insert("purpose".into(), Value::String(pair.purpose.as_str().into()));
            let entry = Entry {
                kind: Kind::Erased,
                pair: pair.clone(),
                statement_hash: hash,
                pseudonym: received.phone_pseudonym.first().cloned().unwrap_or_default(),
                body: feed::event("account.erased", now_ms, self.entropy.nonce(), data, self.log_head.as_ref()),
                attempts: 0,
                next_attempt_ms: now_ms,
                notice_hash: Some(received.notice_hash().unwrap_or([0; 32])),
                queued_ms: Some(now_ms),
                fields: Vec::new(),
                evidence: Some(evidence.clone()),
                state: EntryState::Queued,
            };
            let purpose_digest: [u8; 32] = Sha256::digest(pair.purpose.as_str().as_bytes()).into();
            self.queue(WebhookId::derive(&hash, &pair.affiliate, &purpose_digest), entry, &mut effects);
            notices += 1;
        }
        // Forgotten only once the notices that carry what they held are queued, so a crash loses neither.
        for pair in records.exported {
            effects.push(Effect::Write(Write::ForgetExported { pair }));
        }
        for (pair, _) in delivered {
            effects.push(Effect::Write(Write::ForgetDelivered { pair }));
        }
        effects.push(Effect::Write(Write::EraseBodies { account }));
        effects.push(Effect::Write(Write::Erased { account, evidence }));
        tracing::info!(cursor = erasure.cursor, dropped, notices, "erasure applied");
        Ok((Erased::Applied { dropped, notices }, effects))
    }
}
