//! The data subject's own records, from the relay and the home: the full history of consent decisions, every
//! signature checked on the device, and one portable JSON document of everything this account's data is (GDPR
//! Article 15 access, Article 20 portability).
//!
//! Contract: every statement the history shows verified under this device's identity key over the bytes as the
//! relay returned them, is this account's, and comes in strictly increasing sequence order; a relay that adds,
//! alters, reorders or repeats one makes the whole history an error, never a shorter or edited list. It cannot drop
//! one this device made either: every receipt the home keeps must be in it. Paging is bounded
//! ([`MAX_HISTORY_PAGES`]). The data export carries the profile (phone, device), the consent history, the
//! receipts the device kept, and the export-log entries with their inclusion proofs and the verification result.

use relay_proto::consent::{ConsentStatement, statement_hash, verify_signature};
use serde::Serialize;

use crate::consent::Receipt;
use crate::exports::ExportsReport;
use crate::messenger::{Messenger, MessengerError};

/// Most pages of history read (256 statements each).
pub const MAX_HISTORY_PAGES: usize = 4096;

/// Format name of [`DataExport`].
pub const DATA_EXPORT_FORMAT: &str = "consent-relay data export v1";

/// One consent statement of the history, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// Statement number.
    pub sequence: u64,
    /// `grant` or `withdraw`.
    pub decision: String,
    /// Affiliate id.
    pub affiliate: String,
    /// Purpose.
    pub purpose: String,
    /// Hex SHA-256 of the notice a grant signed (zeros for a withdrawal).
    pub notice_hash: String,
    /// When the user decided (ms since the Unix epoch).
    pub decided_at: u64,
    /// When a grant lapses, if ever.
    pub expires_at: Option<u64>,
    /// When the relay recorded it.
    pub recorded_at: u64,
    /// Hex SHA-256 of the statement (the receipt id, and what export-log leaves name).
    pub statement_hash: String,
    /// The canonical statement, hex, as the relay returned it.
    pub statement: String,
    /// The user's Ed25519 signature over it, hex: verified on this device.
    pub signature: String,
}

/// Everything about this account, as one document.
#[derive(Debug, Clone, Serialize)]
pub struct DataExport {
    /// [`DATA_EXPORT_FORMAT`].
    pub format: String,
    /// When it was made (ms since the Unix epoch).
    pub exported_at: u64,
    /// The account id, hex.
    pub account_id: String,
    /// The phone number.
    pub phone: String,
    /// The device information the relay holds for the affiliates the user consented to.
    pub device: crate::home::Device,
    /// The relay's address.
    pub relay: String,
    /// Every consent decision, checked.
    pub consent_history: Vec<HistoryEntry>,
    /// The receipts this device kept (with the notices shown).
    pub receipts: Vec<Receipt>,
    /// What was shared, with the log's proofs and the verification's outcome.
    pub exports: ExportsReport,
}

fn refused(why: String) -> MessengerError {
    MessengerError::Input(format!("the relay's consent history does not check: {why}"))
}

impl Messenger {
    /// Every consent statement this account made, in order, each signature checked (see the module contract).
    pub async fn consent_history(&self) -> Result<Vec<HistoryEntry>, MessengerError> {
        let key = self.identity().verifying_key();
        let mut out: Vec<HistoryEntry> = Vec::new();
        let mut after = 0;
        for _ in 0..MAX_HISTORY_PAGES {
            let page = self.connection().consent_history(after).await?;
            for s in &page.statements {
                verify_signature(&s.statement, &s.signature, &key).map_err(|e| refused(e.to_string()))?;
                let statement = ConsentStatement::decode_stored(&s.statement).map_err(|e| refused(e.to_string()))?;
                if statement.account != self.account_id() {
                    return Err(refused("a statement of another account".into()));
                }
                if statement.sequence <= after {
                    return Err(refused(format!("statement {} out of order", statement.sequence)));
                }
                after = statement.sequence;
                out.push(HistoryEntry {
                    sequence: statement.sequence,
                    decision: statement.decision.as_str().into(),
                    affiliate: statement.affiliate.clone(),
                    purpose: statement.purpose.as_str().to_owned(),
                    notice_hash: hex::encode(statement.notice_hash),
                    decided_at: statement.time_ms,
                    expires_at: statement.expires_ms,
                    recorded_at: s.recorded_at_ms,
                    statement_hash: hex::encode(statement_hash(&s.statement)),
                    statement: hex::encode(&s.statement),
                    signature: hex::encode(&s.signature),
                });
            }
            if !page.more {
                let receipts: Vec<Receipt> = self.home().load_private("receipts.json")?;
                if let Some(r) = receipts.iter().find(|r| !out.iter().any(|h| h.statement_hash == r.receipt_id)) {
                    return Err(refused(format!("decision {} that this device made is missing", r.sequence)));
                }
                return Ok(out);
            }
            if page.statements.is_empty() {
                return Err(refused("an empty page that says more follow".into()));
            }
        }
        Err(refused(format!("more than {MAX_HISTORY_PAGES} pages")))
    }

    /// One portable document of everything about this account (see [`DataExport`]); the exports are verified.
    pub async fn data_export(&self) -> Result<DataExport, MessengerError> {
        let profile = self.home().profile()?;
        let consent_history = self.consent_history().await?;
        let receipts: Vec<Receipt> = self.home().load_private("receipts.json")?;
        let exports = self.exports(true).await?;
        Ok(DataExport {
            format: DATA_EXPORT_FORMAT.into(),
            exported_at: relay_proto::now_ms(),
            account_id: self.account_id().to_string(),
            phone: profile.phone,
            device: profile.device,
            relay: self.relay_address(),
            consent_history,
            receipts,
            exports,
        })
    }
}
