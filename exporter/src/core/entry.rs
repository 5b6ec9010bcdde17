//! An outbox entry, where it stands in its delivery, and the export log record it becomes.
//!
//! The delivery of an export goes through one state type per step, each transition a method that consumes the state
//! it leaves and returns the one it enters (the transitions that an attempt can take are the only methods there
//! are): [`EntryState::Queued`] or [`EntryState::InFlight`] at rest → [`Leased`] once the relay granted the attempt's
//! lease → [`InFlight`] with its [`Attempt`] once the request is about to leave → back at rest, or settled, once the
//! affiliate answered. A withdrawal notice needs no lease and stays [`EntryState::Queued`].
//!
//! Contract: what the store holds of a state is exactly what a crash must leave. `in_flight_ms` is the start of
//! the first attempt whose answer never came, and it is set before that attempt's request leaves, so a stored entry
//! without it can never have reached its affiliate; a [`Leased`] entry is stored as the state it was leased from.
//! The stored JSON is field for field what the exporter always wrote (ids in hex, purposes by name), so existing
//! data dirs open unchanged. Pure: no I/O.

use relay_proto::AccountId;
use relay_proto::consent::ConsentStatement;
use relay_proto::merkle::{ExportLeaf, LeafKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{Pair, WebhookId};

/// What an outbox entry delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// `user.metadata.exported`: needs an export lease before every attempt.
    Export,
    /// `consent.withdrawn`: names the user as the affiliate received them, delivered without a lease, logged as a
    /// withdrawal notice once the affiliate took it.
    Withdrawn,
    /// `account.erased`: like a withdrawal notice, logged as an erasure notice; its evidence is the signed erasure
    /// request.
    Erased,
}

/// An export lease the relay granted for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The relay's id of the lease (what `EndExport` releases).
    pub id: u64,
    /// How long the lease had left when the relay answered (ms). The core counts it on the exporter's monotonic
    /// clock from when the lease was asked for, so the deadline it keeps falls before the relay's.
    pub valid_for_ms: u64,
}

/// Where an outbox entry stands in its delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryState {
    /// Waiting for its next attempt; nothing of it can have reached the affiliate.
    Queued,
    /// The relay granted the lease of the attempt under way; nothing of this attempt has been sent.
    Leased(Leased),
    /// A request left, or may have, and no answer to it was recorded: the affiliate may hold the data.
    InFlight(InFlight),
}

/// An attempt holds its lease and has sent nothing yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    /// The lease.
    pub lease: Lease,
    /// When the attempt began, before the lease was asked for (its log time if it is acknowledged).
    pub started_ms: u64,
    /// When the first earlier attempt that got no answer began, if one did.
    pub unanswered_since: Option<u64>,
}

/// An entry whose affiliate may hold the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// When the first attempt whose answer never came began (ms since the Unix epoch).
    pub since: u64,
    /// The attempt whose request is out now, in this process; `None` once its answer is known to be lost, and for
    /// an entry read back from the store (the request that was out died with the process).
    pub attempt: Option<Attempt>,
}

/// An attempt whose request is out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Its lease, released once the answer is in.
    pub lease: Lease,
    /// When it began.
    pub started_ms: u64,
    /// What the entry was before it: an answer (of any kind) or a request that never left restores this.
    pub unanswered_since: Option<u64>,
}

/// How an attempt's request ended, as far as the affiliate holding the data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// The affiliate answered (the status tells whether it took the data), or nothing of the request left.
    Known,
    /// The request may have arrived, but no answer came.
    Unknown,
}

/// Why a transition was refused: the entry is not in a state it can leave that way (a driver calling the core out
/// of order; never caused by what a peer sends).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an entry {state:?} cannot {transition}")]
pub struct TransitionError {
    /// The state the entry was in, left unchanged.
    pub state: EntryState,
    /// The transition asked for.
    pub transition: &'static str,
}

impl EntryState {
    /// The state at rest that `in_flight_ms` (as stored) stands for.
    pub fn at_rest(unanswered_since: Option<u64>) -> Self {
        match unanswered_since {
            None => Self::Queued,
            Some(since) => Self::InFlight(InFlight { since, attempt: None }),
        }
    }

    /// What the store holds of this state (`in_flight_ms`): when the first attempt that got no answer began.
    pub fn unanswered_since(&self) -> Option<u64> {
        match self {
            Self::Queued => None,
            Self::Leased(l) => l.unanswered_since,
            Self::InFlight(f) => Some(f.since),
        }
    }

    /// The relay granted `lease` to the attempt begun at `started_ms`. Only an entry at rest takes a lease.
    pub fn lease(self, lease: Lease, started_ms: u64) -> Result<Leased, TransitionError> {
        match self {
            Self::Queued => Ok(Leased { lease, started_ms, unanswered_since: None }),
            Self::InFlight(InFlight { since, attempt: None }) => {
                Ok(Leased { lease, started_ms, unanswered_since: Some(since) })
            }
            state => Err(TransitionError { state, transition: "take a lease" }),
        }
    }
}

impl Leased {
    /// The request is about to leave: from now on the affiliate may hold the data. The entry must be stored in
    /// this state before the request leaves.
    pub fn send(self) -> InFlight {
        InFlight {
            since: self.unanswered_since.unwrap_or(self.started_ms),
            attempt: Some(Attempt {
                lease: self.lease,
                started_ms: self.started_ms,
                unanswered_since: self.unanswered_since,
            }),
        }
    }

    /// The attempt ends without sending anything (too little of the lease was left): the lease to release, and the
    /// entry as it was before.
    pub fn unused(self) -> (Lease, EntryState) {
        (self.lease, EntryState::at_rest(self.unanswered_since))
    }
}

impl InFlight {
    /// The attempt under way ended: the attempt (its lease to release, its start for the log) and the state the
    /// entry is in if it stays in the outbox. Only an entry with a request out has an attempt to end.
    pub fn answered(self, reached: Reached) -> Result<(Attempt, EntryState), TransitionError> {
        let Some(attempt) = self.attempt else {
            return Err(TransitionError {
                state: EntryState::InFlight(InFlight { since: self.since, attempt: None }),
                transition: "end an attempt it has not started",
            });
        };
        let state = match reached {
            Reached::Known => EntryState::at_rest(attempt.unanswered_since),
            Reached::Unknown => EntryState::InFlight(InFlight { since: self.since, attempt: None }),
        };
        Ok((attempt, state))
    }
}

/// One webhook to deliver. Stored as the JSON object of `StoredEntry`, field for field as it always was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoredEntry", into = "StoredEntry")]
pub struct Entry {
    /// Export or withdrawal notice.
    pub kind: Kind,
    /// The account, affiliate and purpose it concerns.
    pub pair: Pair,
    /// SHA-256 of the consent statement this entry follows from.
    pub statement_hash: [u8; 32],
    /// The user's pseudonym for this affiliate (recorded as delivered with the pair on success).
    pub pseudonym: String,
    /// The JSON body, exactly as it is sent and signed.
    pub body: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Earliest time of the next attempt (ms since the Unix epoch).
    pub next_attempt_ms: u64,
    /// For a withdrawal notice: the notice hash the withdrawn grant signed, as the affiliate last received data under
    /// it, if the exporter knows it (its log leaf records it, or zeros).
    pub notice_hash: Option<[u8; 32]>,
    /// When a notice was queued (ms since the Unix epoch), from which its retries are bounded; `None` for exports,
    /// and for a notice stored before this was kept until its next failure sets it.
    pub queued_ms: Option<u64>,
    /// Names of the exported fields (exports only).
    pub fields: Vec<String>,
    /// The signed statement that allows the export (exports only).
    pub evidence: Option<Evidence>,
    /// Where its delivery stands.
    pub state: EntryState,
}

/// Why an export cannot be logged: its entry lacks what a log record needs (a damaged store, or an entry written
/// before exports were logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("outbox entry {0} cannot be logged: {1}")]
pub struct UnloggableError(pub WebhookId, pub &'static str);

impl Entry {
    /// How this export, delivered under webhook id `id`, identifies the user to its affiliate.
    pub fn delivered_as(&self, id: &WebhookId) -> super::Delivered {
        let notice_hash = self
            .evidence
            .as_ref()
            .and_then(|e| hex::decode(&e.statement).ok())
            .and_then(|b| ConsentStatement::decode_stored(&b).ok())
            .map(|s| s.notice_hash);
        super::Delivered::of_export(id, &self.fields, &self.body, &self.pseudonym, notice_hash)
    }

    /// The log record of this export (or notice), delivered (or possibly delivered) by the attempt begun at
    /// `started_ms`: no personal data, the payload by its (nonce-salted) hash. An export's leaf records the notice
    /// hash its grant signed; a withdrawal notice's, the withdrawn grant's as far as the exporter knows it, or zeros.
    pub fn log_record(&self, id: &WebhookId, started_ms: u64) -> Result<LogRecord, UnloggableError> {
        let evidence = self.evidence.clone().ok_or(UnloggableError(*id, "it holds no consent evidence"))?;
        let (kind, notice_hash) = match self.kind {
            Kind::Export => {
                let statement = hex::decode(&evidence.statement)
                    .ok()
                    .and_then(|b| ConsentStatement::decode_stored(&b).ok())
                    .ok_or(UnloggableError(*id, "its consent evidence does not decode"))?;
                (LeafKind::Export, statement.notice_hash)
            }
            Kind::Withdrawn => (LeafKind::WithdrawalNotice, self.notice_hash.unwrap_or([0; 32])),
            Kind::Erased => (LeafKind::ErasureNotice, self.notice_hash.unwrap_or([0; 32])),
        };
        let leaf = ExportLeaf {
            kind,
            export_id: id.export_id(),
            affiliate: self.pair.affiliate.clone(),
            purpose: self.pair.purpose.as_str().to_owned(),
            fields: self.fields.clone(),
            payload_hash: Sha256::digest(self.body.as_bytes()).into(),
            consent_hash: self.statement_hash,
            notice_hash: Some(notice_hash),
            time_ms: started_ms,
        };
        Ok(LogRecord {
            leaf: leaf.encode().map_err(|_| UnloggableError(*id, "its leaf does not encode"))?,
            account: self.pair.account,
            evidence,
        })
    }
}

/// The stored form of an [`Entry`]: ids as the hex and names they were always written as.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    kind: Kind,
    affiliate: String,
    purpose: String,
    account: String,
    statement_hash: String,
    pseudonym: String,
    body: String,
    attempts: u32,
    next_attempt_ms: u64,
    // Absent from entries written before notices' retries were bounded (and from exports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queued_ms: Option<u64>,
    // Hex; absent from exports and from entries written before notices were logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notice_hash: Option<String>,
    // Absent from entries written before exports were logged.
    #[serde(default)]
    fields: Vec<String>,
    #[serde(default)]
    evidence: Option<Evidence>,
    #[serde(default)]
    in_flight_ms: Option<u64>,
}

impl TryFrom<StoredEntry> for Entry {
    type Error = String;

    fn try_from(e: StoredEntry) -> Result<Self, String> {
        let pair = format!("{}/{}/{}", e.account, e.affiliate, e.purpose).parse::<Pair>().map_err(|e| e.to_string())?;
        let statement_hash = hex::decode(&e.statement_hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| format!("statement hash {:?}", e.statement_hash))?;
        Ok(Self {
            kind: e.kind,
            pair,
            statement_hash,
            pseudonym: e.pseudonym,
            body: e.body,
            attempts: e.attempts,
            next_attempt_ms: e.next_attempt_ms,
            notice_hash: match e.notice_hash {
                Some(h) => Some(
                    hex::decode(&h).ok().and_then(|h| h.try_into().ok()).ok_or_else(|| format!("notice hash {h:?}"))?,
                ),
                None => None,
            },
            queued_ms: e.queued_ms,
            fields: e.fields,
            evidence: e.evidence,
            state: EntryState::at_rest(e.in_flight_ms),
        })
    }
}

impl From<Entry> for StoredEntry {
    fn from(e: Entry) -> Self {
        Self {
            kind: e.kind,
            affiliate: e.pair.affiliate,
            purpose: e.pair.purpose.as_str().to_owned(),
            account: e.pair.account.to_string(),
            statement_hash: hex::encode(e.statement_hash),
            pseudonym: e.pseudonym,
            body: e.body,
            attempts: e.attempts,
            next_attempt_ms: e.next_attempt_ms,
            queued_ms: e.queued_ms,
            notice_hash: e.notice_hash.map(hex::encode),
            fields: e.fields,
            evidence: e.evidence,
            in_flight_ms: e.state.unanswered_since(),
        }
    }
}

/// A user-signed consent statement as the relay recorded it, kept as evidence (stored as these hex strings).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The canonical statement, hex.
    pub statement: String,
    /// The user's Ed25519 signature over it, hex.
    pub signature: String,
    /// The user's Ed25519 identity key, hex (the account id derives from it).
    pub identity_key: String,
    /// When the relay recorded it (ms since the Unix epoch).
    pub recorded_at_ms: u64,
}

/// One entry of the export log. Stored as JSON with the leaf and the account in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The canonical leaf (`relay_proto::merkle::ExportLeaf::encode`).
    #[serde(with = "hex_bytes")]
    pub leaf: Vec<u8>,
    /// The account it concerns (published to the relay, which shows the entry to that account only).
    #[serde(with = "hex_account")]
    pub account: AccountId,
    /// The statement that allowed the export.
    pub evidence: Evidence,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(D::Error::custom)
    }
}

mod hex_account {
    use relay_proto::AccountId;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(account: &AccountId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(account)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<AccountId, D::Error> {
        let text = String::deserialize(d)?;
        AccountId::from_hex(&text).ok_or_else(|| D::Error::custom(format!("account id {text:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Lease = Lease { id: 9, valid_for_ms: 20_000 };

    #[test]
    fn an_attempt_goes_from_rest_to_leased_to_in_flight_and_back() {
        // A first attempt that is answered: back to queued.
        let leased = EntryState::Queued.lease(LEASE, 100).expect("a queued entry takes a lease");
        assert_eq!(EntryState::Leased(leased.clone()).unanswered_since(), None, "stored as it was");
        let in_flight = leased.send();
        assert_eq!(in_flight.since, 100, "in flight since this attempt began");
        let (attempt, state) = in_flight.clone().answered(Reached::Known).expect("answered");
        assert_eq!((attempt.lease, attempt.started_ms, state), (LEASE, 100, EntryState::Queued));

        // Its answer lost: in flight at rest, and a later attempt keeps the first one's time whatever its answer.
        let (_, lost) = in_flight.answered(Reached::Unknown).expect("lost");
        assert_eq!(lost, EntryState::at_rest(Some(100)));
        let retry = lost.clone().lease(LEASE, 200).expect("an entry at rest in flight takes a lease");
        assert_eq!(retry.unanswered_since, Some(100));
        let (_, refused) = retry.clone().send().answered(Reached::Known).expect("answered");
        assert_eq!(refused, lost, "an answer to the retry says nothing of the first attempt");
        assert_eq!(retry.unused(), (LEASE, lost));
    }

    #[test]
    fn transitions_out_of_order_are_refused_and_keep_the_state() {
        let leased = EntryState::Leased(EntryState::Queued.lease(LEASE, 1).expect("lease"));
        let refused = leased.clone().lease(LEASE, 2).expect_err("a second lease for one attempt");
        assert_eq!(refused.state, leased);
        let out = EntryState::InFlight(EntryState::Queued.lease(LEASE, 1).expect("lease").send());
        assert!(out.lease(LEASE, 2).is_err(), "a lease while a request is out");
        let at_rest = InFlight { since: 5, attempt: None };
        let refused = at_rest.answered(Reached::Known).expect_err("no attempt under way");
        assert_eq!(refused.state, EntryState::at_rest(Some(5)));
    }
}
