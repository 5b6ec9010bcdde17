//! Consent from the user's side: statements made and signed on the device, sent to the relay, and a receipt kept in
//! the home (`receipts.json`) for every decision. Every pair (affiliate, purpose) is denied until the user grants it;
//! a grant is specific to one affiliate and one purpose and is withdrawn with one statement.
//!
//! A grant signs the hash of the notice the user was shown: the document the exporter published for the pair, as
//! the relay serves it ([`Messenger::notice`] fetches it and checks it is a canonical notice for the pair asked
//! about, and [`Messenger::grant_consent`] signs exactly that one). A relay that shows another document than the
//! exporter's current one gets a grant that covers nothing: the exporter acts only on grants naming its own current
//! notice. A withdrawal names no notice.
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
use relay_proto::notice::{Notice, notice_hash};
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
    /// Notice version shown (0 for a withdrawal, which names no notice).
    pub notice_version: u32,
    /// Hex SHA-256 of the notice shown (zeros for a withdrawal).
    pub notice_hash: String,
    /// The notice document shown, as published (empty for a withdrawal).
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

/// The affiliate column of an objection in [`PairState`]: every affiliate.
pub const OBJECTION: &str = "*";

fn consent_error(e: ConsentError) -> MessengerError {
    MessengerError::Input(e.to_string())
}

/// A notice as the relay served it, checked: a canonical notice document for the pair asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShownNotice {
    /// Its terms.
    pub notice: Notice,
    /// The document, byte for byte (UTF-8 text: what is shown).
    pub document: String,
    /// SHA-256 of the document: what a grant signs.
    pub hash: [u8; 32],
}

impl ShownNotice {
    /// Checks `document` served for (`affiliate`, `purpose`).
    pub fn check(document: Vec<u8>, affiliate: &str, purpose: Purpose) -> Result<Self, MessengerError> {
        let hash = notice_hash(&document);
        let notice = Notice::decode(&document)
            .map_err(|e| MessengerError::Input(format!("the relay served a notice that does not check: {e}")))?;
        if notice.affiliate != affiliate || notice.purpose != purpose {
            return Err(MessengerError::Input(format!(
                "the relay served the notice of {}/{} when asked for {affiliate}/{purpose}",
                notice.affiliate, notice.purpose
            )));
        }
        // Decoding proved it canonical UTF-8 text.
        let document = String::from_utf8(document).map_err(|_| MessengerError::Input("notice is not UTF-8".into()))?;
        Ok(Self { notice, document, hash })
    }
}

impl Messenger {
    /// The current notice of (`affiliate`, `purpose`), as the exporter published it and the relay serves it,
    /// checked ([`ShownNotice::check`]). What to show before [`Messenger::grant_consent`].
    pub async fn notice(&self, affiliate: &str, purpose_name: &str) -> Result<ShownNotice, MessengerError> {
        let purpose = purpose(purpose_name)?;
        let document = self.connection().get_notice(affiliate, purpose.as_str(), None).await?;
        ShownNotice::check(document, affiliate, purpose)
    }

    /// Grants consent under `shown` (the notice the user saw), for an optional lifetime in days.
    pub async fn grant_consent(
        &self,
        shown: &ShownNotice,
        expires_in_days: Option<u64>,
    ) -> Result<Receipt, MessengerError> {
        let (affiliate, purpose) = (shown.notice.affiliate.clone(), shown.notice.purpose);
        self.decide(&affiliate, purpose, Decision::Grant, Some(shown), expires_in_days).await
    }

    /// Grants (under the pair's current notice, fetched now: see [`Messenger::grant_consent`] to sign one shown
    /// first) or withdraws consent for one (affiliate, purpose) pair; returns the receipt, which is also appended to
    /// the home's `receipts.json`.
    pub async fn decide_consent(
        &self,
        affiliate: &str,
        purpose_name: &str,
        decision: Decision,
        expires_in_days: Option<u64>,
    ) -> Result<Receipt, MessengerError> {
        let purpose = purpose(purpose_name)?;
        match decision {
            Decision::Grant => {
                let shown = self.notice(affiliate, purpose_name).await?;
                self.decide(affiliate, purpose, decision, Some(&shown), expires_in_days).await
            }
            Decision::Withdraw => self.decide(affiliate, purpose, decision, None, None).await,
            Decision::Object | Decision::Lift => Err(MessengerError::Input(
                "an objection is about a purpose, not an affiliate: use object_to_purpose".into(),
            )),
        }
    }

    /// Objects to a purpose (no affiliate may receive anything for it, now or under a later grant, until lifted), or
    /// lifts the objection. Objecting first withdraws every pair of the purpose still granted, so each affiliate that
    /// received data hears of it; the receipts are returned in order, the objection's last.
    pub async fn object_to_purpose(&self, purpose_name: &str, lift: bool) -> Result<Vec<Receipt>, MessengerError> {
        let purpose = purpose(purpose_name)?;
        let mut out = Vec::new();
        if !lift {
            for pair in self.consent_state().await? {
                if pair.purpose == purpose.as_str() && pair.affiliate != OBJECTION && pair.status != "withdrawn" {
                    out.push(self.decide(&pair.affiliate, purpose, Decision::Withdraw, None, None).await?);
                }
            }
        }
        let decision = if lift { Decision::Lift } else { Decision::Object };
        out.push(self.decide("", purpose, decision, None, None).await?);
        Ok(out)
    }

    async fn decide(
        &self,
        affiliate: &str,
        purpose: Purpose,
        decision: Decision,
        notice: Option<&ShownNotice>,
        expires_in_days: Option<u64>,
    ) -> Result<Receipt, MessengerError> {
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
            notice_hash: notice.map_or([0; 32], |n| n.hash),
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
            decision: decision.as_str().into(),
            consent_timestamp: now,
            recorded_at: recorded.recorded_at_ms,
            collection_method: "relay CLI, explicit per-purpose command".into(),
            pii_principal_id: self.account_id().to_string(),
            recorded_by: self.relay_address(),
            affiliate: affiliate.to_owned(),
            purpose: purpose.as_str().to_owned(),
            notice_version: notice.map_or(0, |n| n.notice.version),
            notice_hash: hex::encode(notice.map_or([0; 32], |n| n.hash)),
            notice: notice.map(|n| n.document.clone()).unwrap_or_default(),
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
            if pair.status != "withdrawn" && pair.affiliate != OBJECTION {
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
        let mut statements = Vec::new();
        for s in list.latest {
            // The bytes as the relay returned them are what the signature must cover; decode only after.
            verify_signature(&s.statement, &s.signature, &key).map_err(consent_error)?;
            let statement = ConsentStatement::decode_stored(&s.statement).map_err(consent_error)?;
            if statement.account != self.account_id() {
                return Err(consent_error(ConsentError::WrongAccount));
            }
            statements.push(statement);
        }
        let objection = |purpose: Purpose| {
            statements
                .iter()
                .filter(|s| s.purpose == purpose && s.decision.is_purpose_level())
                .max_by_key(|s| s.sequence)
        };
        let mut out = Vec::new();
        for statement in &statements {
            if statement.decision.is_purpose_level() {
                out.push(PairState {
                    affiliate: OBJECTION.into(),
                    purpose: statement.purpose.as_str().to_owned(),
                    status: if statement.decision == Decision::Object { "objected" } else { "objection lifted" }.into(),
                    in_force: false,
                    sequence: statement.sequence,
                    decided_at: statement.time_ms,
                    expires_at: None,
                });
                continue;
            }
            // Whether the grant's notice is still the pair's current one: asked of the relay (none: no longer offered).
            let current = match statement.decision {
                Decision::Grant => match self.notice(&statement.affiliate, statement.purpose.as_str()).await {
                    Ok(shown) => Some(shown.hash),
                    Err(MessengerError::Client(e)) if e.code() == Some(relay_proto::ErrorCode::NotFound) => None,
                    Err(e) => return Err(e),
                },
                Decision::Withdraw | Decision::Object | Decision::Lift => None,
            };
            let not_objected = statement.not_objected(objection(statement.purpose));
            let in_force = statement.in_force(now, current.as_ref()) && not_objected;
            let status = match statement.decision {
                Decision::Grant if in_force => "granted",
                Decision::Grant if !not_objected => "objected",
                Decision::Grant if current != Some(statement.notice_hash) => "notice changed",
                Decision::Grant => "expired",
                Decision::Withdraw | Decision::Object | Decision::Lift => "withdrawn",
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
