//! Consent from the user's side: statements made and signed on the device, sent to the relay, and a receipt kept in
//! the home (`receipts.json`) for every decision. Every pair (affiliate, purpose) is denied until the user grants it;
//! a grant is specific to one affiliate and one purpose and is withdrawn with one statement.
//!
//! The receipt follows the spirit of the Kantara Initiative's Consent Receipt specification (v1.1): who consented
//! (the account), to whom data may go (the affiliate), for what (the purpose, its notice version and hash), how
//! (explicitly, from the CLI), when, until when, and the signed statement itself, so the user can later prove what
//! they agreed to and when they withdrew.
//!
//! A decision is made under the home's lock, from reading the relay's last sequence number to saving the receipt,
//! so two clients of one home cannot number two statements alike nor lose each other's receipts. The next number
//! is computed from what the relay reports, checked: past `u64::MAX` there is none, and the client says so.

use relay_proto::consent::{
    ConsentError, ConsentStatement, Decision, PURPOSES, Purpose, signed_bytes_of, statement_hash, verify_signature,
};
use serde::{Deserialize, Serialize};

use crate::messenger::{Messenger, MessengerError};

/// A consent receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Format of this receipt.
    pub version: String,
    /// Receipt id: hex SHA-256 of the signed statement.
    pub receipt_id: String,
    /// `grant` or `withdraw`.
    pub decision: String,
    /// When the user decided (ms since the Unix epoch).
    pub consent_timestamp: u64,
    /// When the relay durably recorded it.
    pub recorded_at: u64,
    /// How consent was collected.
    pub collection_method: String,
    /// The data subject: the account id.
    pub pii_principal_id: String,
    /// The relay the statement was recorded by.
    pub recorded_by: String,
    /// The third party data may be disclosed to.
    pub affiliate: String,
    /// The purpose.
    pub purpose: String,
    /// Notice version shown.
    pub notice_version: u32,
    /// Hex SHA-256 of the notice shown.
    pub notice_hash: String,
    /// The notice text shown.
    pub notice: String,
    /// `EXPLICIT`: an affirmative, per-purpose action.
    pub consent_type: String,
    /// When a grant lapses (ms since the Unix epoch), if ever.
    pub expires_at: Option<u64>,
    /// Per-account statement number.
    pub sequence: u64,
    /// The canonical statement, hex.
    pub statement: String,
    /// The user's Ed25519 signature over it, hex.
    pub signature: String,
}

/// The state of one pair as the relay holds it, checked on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairState {
    /// Affiliate id.
    pub affiliate: String,
    /// Purpose.
    pub purpose: String,
    /// `granted`, `withdrawn`, `expired` or `notice changed` (a grant under an old notice: void).
    pub status: String,
    /// Whether data may flow for this pair now.
    pub in_force: bool,
    /// Statement number.
    pub sequence: u64,
    /// When the user decided.
    pub decided_at: u64,
    /// When a grant lapses, if ever.
    pub expires_at: Option<u64>,
}

fn purpose(name: &str) -> Result<Purpose, MessengerError> {
    Purpose::parse(name).ok_or_else(|| {
        let known: Vec<_> = PURPOSES.iter().map(|p| p.as_str()).collect();
        MessengerError::Input(format!("unknown purpose {name:?}; the purposes are: {}", known.join(", ")))
    })
}

fn consent_error(e: ConsentError) -> MessengerError {
    MessengerError::Input(e.to_string())
}

impl Messenger {
    /// Grants (with an optional lifetime in days) or withdraws consent for one (affiliate, purpose) pair; returns
    /// the receipt, which is also appended to the home's `receipts.json`.
    pub async fn decide_consent(
        &self,
        affiliate: &str,
        purpose_name: &str,
        decision: Decision,
        expires_in_days: Option<u64>,
    ) -> Result<Receipt, MessengerError> {
        let purpose = purpose(purpose_name)?;
        let notice = purpose.notice();
        let op = self.begin(false).await?;
        let now = relay_proto::now_ms();
        let last = self.connection().list_consent().await?.last_sequence;
        let sequence = last.checked_add(1).ok_or_else(|| {
            MessengerError::Input(format!(
                "the relay reports consent statement number {last} as your last: no sequence number is left \
                 for another statement"
            ))
        })?;
        let statement = ConsentStatement {
            account: self.account_id(),
            affiliate: affiliate.to_owned(),
            purpose,
            decision,
            notice_hash: notice.hash(),
            sequence,
            time_ms: now,
            expires_ms: expires_in_days.map(|d| now.saturating_add(d.saturating_mul(24 * 3600 * 1000))),
        };
        statement.validate().map_err(consent_error)?;
        let encoded = statement.encode();
        let hash = statement_hash(&encoded);
        let signature = self.identity().sign(&signed_bytes_of(&encoded));
        let recorded = self.connection().put_consent(encoded.clone(), signature).await?;
        if recorded.statement_hash.as_ref() != hash {
            return Err(MessengerError::Input("the relay acknowledged another statement than the one sent".into()));
        }
        let receipt = Receipt {
            version: "consent-relay receipt 1 (after Kantara Consent Receipt 1.1)".into(),
            receipt_id: hex::encode(hash),
            decision: match decision {
                Decision::Grant => "grant".into(),
                Decision::Withdraw => "withdraw".into(),
            },
            consent_timestamp: now,
            recorded_at: recorded.recorded_at_ms,
            collection_method: "relay CLI, explicit per-purpose command".into(),
            pii_principal_id: self.account_id().to_string(),
            recorded_by: self.relay_address(),
            affiliate: affiliate.to_owned(),
            purpose: purpose.as_str().to_owned(),
            notice_version: notice.version,
            notice_hash: hex::encode(notice.hash()),
            notice: notice.text.to_owned(),
            consent_type: "EXPLICIT".into(),
            expires_at: statement.expires_ms,
            sequence: statement.sequence,
            statement: hex::encode(&encoded),
            signature: hex::encode(signature),
        };
        let mut receipts: Vec<Receipt> = self.home().load_private("receipts.json")?;
        receipts.push(receipt.clone());
        self.home().save_private("receipts.json", &receipts)?;
        op.end(self.home())?;
        Ok(receipt)
    }

    /// Withdraws every pair whose latest statement is a grant (in force or not): refusing is one command, like
    /// granting.
    pub async fn reject_all_consent(&self) -> Result<Vec<Receipt>, MessengerError> {
        let mut out = Vec::new();
        for pair in self.consent_state().await? {
            if pair.status != "withdrawn" {
                out.push(self.decide_consent(&pair.affiliate, &pair.purpose, Decision::Withdraw, None).await?);
            }
        }
        Ok(out)
    }

    /// The latest statement per pair as the relay holds it, each signature checked against this device's identity
    /// key (a statement the relay altered or made up is reported as an error). Pairs not listed are denied.
    pub async fn consent_state(&self) -> Result<Vec<PairState>, MessengerError> {
        let list = self.connection().list_consent().await?;
        let key = self.identity().verifying_key();
        let now = relay_proto::now_ms();
        let mut out = Vec::new();
        for s in list.latest {
            // The bytes as the relay returned them are what the signature must cover; decode only after.
            verify_signature(&s.statement, &s.signature, &key).map_err(consent_error)?;
            let statement = ConsentStatement::decode_stored(&s.statement).map_err(consent_error)?;
            if statement.account != self.account_id() {
                return Err(consent_error(ConsentError::WrongAccount));
            }
            let in_force = statement.in_force(now);
            let status = match statement.decision {
                Decision::Withdraw => "withdrawn",
                Decision::Grant if in_force => "granted",
                Decision::Grant if statement.notice_hash != statement.purpose.notice().hash() => "notice changed",
                Decision::Grant => "expired",
            };
            out.push(PairState {
                affiliate: statement.affiliate.clone(),
                purpose: statement.purpose.as_str().to_owned(),
                status: status.to_owned(),
                in_force,
                sequence: statement.sequence,
                decided_at: statement.time_ms,
                expires_at: statement.expires_ms,
            });
        }
        Ok(out)
    }
}
