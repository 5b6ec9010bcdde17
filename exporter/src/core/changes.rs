//! What a change read from the relay's feeds does to the outbox.
//!
//! Contract: only a change whose signature [`feed::verify`] accepts is acted on, and only if it is not older than a
//! statement of its pair already seen ([`Known::latest`]: a lower sequence number, or the same one with other bytes);
//! the exporter keeps its own record of each pair's statements and does not trust the relay's ordering. Every
//! change acted on is kept as audit evidence. A grant with a subject, for a pair the catalogue allows, naming the pair's current
//! notice (the catalogue's, not the relay's word for it), queues one export whose webhook id is
//! derived from the statement hash, the affiliate and a digest of the exported data; the same data again (the change
//! read twice, or a subject change that leaves the affiliate's fields as they were) queues nothing, while new data
//! supersedes what is still queued for the pair. A withdrawal removes the pair's queued exports and, if the pair had
//! been delivered, queues a `consent.withdrawn` notice that names the user as that affiliate received them
//! ([`Delivered::notice_data`]) and carries no other data. An
//! export that leaves the outbox this way after an attempt that got no answer is logged as delivered (see
//! [`super::Core`]). A feed's cursor moves only once the writes of the changes before it are durable.

use std::collections::btree_map::Entry as Slot;
use std::fmt;
use std::str::FromStr;

use relay_proto::consent::{ConsentStatement, Decision};
use relay_proto::wire::ConsentChange;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::delivered::Delivered;
use super::entry::{Entry, EntryState, Evidence, Kind};
use super::{Core, CoreError, Effect, Write};
use crate::feed::{self, Feed};
use crate::ids::{Pair, ParseIdError, WebhookId};
use crate::payload::{self, phone_pseudonym};

/// What became of one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Failed verification: ignored.
    Rejected(&'static str),
    /// A grant with nothing to export (not in force any more, or not allowed by the catalogue).
    Nothing,
    /// Older than a statement of its pair already seen (a lower sequence number, or the same one with other bytes):
    /// ignored, whatever the relay says of it.
    Stale,
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

/// What was last queued for a pair: the statement and a digest of the data. Stored as `statement-hex:digest-hex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportMarker {
    /// SHA-256 of the statement the export followed from.
    pub statement_hash: [u8; 32],
    /// SHA-256 of the exported data (without the purpose and consent fields every export carries).
    pub digest: [u8; 32],
}

impl fmt::Display for ExportMarker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", hex::encode(self.statement_hash), hex::encode(self.digest))
    }
}

impl FromStr for ExportMarker {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let refused = || ParseIdError { what: "export marker", text: s.to_owned() };
        let (hash, digest) = s.split_once(':').ok_or_else(refused)?;
        let mut marker = ExportMarker { statement_hash: [0; 32], digest: [0; 32] };
        hex::decode_to_slice(hash, &mut marker.statement_hash).map_err(|_| refused())?;
        hex::decode_to_slice(digest, &mut marker.digest).map_err(|_| refused())?;
        if marker.to_string() != s {
            return Err(refused());
        }
        Ok(marker)
    }
}

/// What the store holds for a change's pair, which the rules read: the driver looks it up for
/// [`CheckedChange::pair`] before handing the change to the core.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    /// What was last queued for the pair since its last withdrawal.
    pub exported: Option<ExportMarker>,
    /// How the affiliate received the user, if the pair's data reached it since its last withdrawal.
    pub delivered: Option<Delivered>,
    /// The latest statement of the pair seen so far: its sequence number and SHA-256.
    pub latest: Option<(u64, [u8; 32])>,
    /// The account's latest verified purpose-level statement (objection or lift) for the pair's purpose.
    pub objection: Option<ConsentStatement>,
    /// Whether the account was erased (a verified erasure was applied): nothing of it is exported any more.
    pub erased: bool,
}

impl Known {
    /// The latest purpose-level statement among verified `evidence` (as the store keeps it for the pair of the
    /// account, no affiliate and the purpose), if any.
    pub fn latest_objection<'a>(evidence: impl IntoIterator<Item = &'a Evidence>) -> Option<ConsentStatement> {
        evidence
            .into_iter()
            .filter_map(|e| hex::decode(&e.statement).ok())
            .filter_map(|b| ConsentStatement::decode_stored(&b).ok())
            .filter(|s| s.decision.is_purpose_level())
            .max_by_key(|s| s.sequence)
    }
}

/// A change whose signature was checked.
#[derive(Debug, Clone)]
pub struct CheckedChange {
    cursor: u64,
    verified: Result<Verified, &'static str>,
}

#[derive(Debug, Clone)]
struct Verified {
    statement: ConsentStatement,
    /// SHA-256 of the statement bytes as received (what the relay and the export log refer to it by).
    hash: [u8; 32],
    pair: Pair,
    evidence: Evidence,
    subject: Option<payload::Subject>,
}

impl CheckedChange {
    /// Checks `change` ([`feed::verify`]).
    pub fn new(change: &ConsentChange) -> Self {
        let verified = feed::verify(change).map(|statement| Verified {
            pair: Pair::new(statement.account, statement.affiliate.clone(), statement.purpose),
            evidence: Evidence {
                statement: hex::encode(&change.statement),
                signature: hex::encode(&change.signature),
                identity_key: hex::encode(&change.identity_key),
                recorded_at_ms: change.recorded_at_ms,
            },
            subject: feed::subject(change),
            hash: relay_proto::consent::statement_hash(&change.statement),
            statement,
        });
        Self { cursor: change.cursor, verified }
    }

    /// The pair a verified change is about: the one whose [`Known`] the core needs with it.
    pub fn pair(&self) -> Option<&Pair> {
        self.verified.as_ref().ok().map(|v| &v.pair)
    }
}

impl Core {
    /// Applies one checked change, given what the store holds for its pair. The effects are writes only; the driver
    /// performs them before it looks up the next change's pair (two changes of one page may concern one pair).
    pub fn handle_change(
        &mut self,
        change: CheckedChange,
        known: Known,
        now_ms: u64,
    ) -> Result<(Applied, Vec<Effect>), CoreError> {
        if let Some(attempt) = &self.current {
            // A change could drop the entry of the attempt under way: feed and delivery take turns.
            return Err(CoreError::Busy(attempt.id()));
        }
        let v = match change.verified {
            Ok(v) => v,
            Err(reason) => {
                tracing::warn!(cursor = change.cursor, reason, "consent change skipped");
                return Ok((Applied::Rejected(reason), Vec::new()));
            }
        };
        if let Some((sequence, hash)) = known.latest {
            let seq = v.statement.sequence;
            if seq < sequence || (seq == sequence && hash != v.hash) {
                // A compromised relay replaying a superseded grant (validly signed, but old): the user said more
                // recently what holds for this pair. The same statement read again goes on (it is idempotent).
                tracing::warn!(
                    cursor = change.cursor,
                    sequence = seq,
                    latest = sequence,
                    "stale consent change ignored"
                );
                return Ok((Applied::Stale, Vec::new()));
            }
        }
        let mut effects = vec![Effect::Write(Write::Statement {
            pair: v.pair.clone(),
            sequence: v.statement.sequence,
            evidence: v.evidence.clone(),
        })];
        if v.statement.decision == Decision::Object {
            // Every affiliate of the purpose: what is still queued for it under earlier grants is dropped (the relay
            // denies their leases too). The client withdraws each granted pair before it objects, so affiliates that
            // received data hear of it through those withdrawals.
            let doomed: Vec<Pair> = self
                .outbox
                .values()
                .filter(|e| {
                    e.kind == Kind::Export && e.pair.account == v.pair.account && e.pair.purpose == v.pair.purpose
                })
                .map(|e| e.pair.clone())
                .collect();
            let mut dropped = 0;
            for pair in doomed {
                dropped += self.drop_exports_of(&pair, &mut effects)?.0;
            }
            tracing::info!(dropped, "objection to a purpose applied to the outbox");
            return Ok((Applied::Withdrawn { dropped, notified: false }, effects));
        }
        if known.erased && v.statement.decision == Decision::Grant {
            // The account asked for its erasure: a grant of it (a relay replaying an old one, with a subject it
            // should no longer hold) exports nothing.
            tracing::warn!(cursor = change.cursor, "grant of an erased account; nothing exported");
            return Ok((Applied::Nothing, effects));
        }
        let Some(affiliate) = self.catalogue.get(&v.pair.affiliate).cloned() else {
            return Ok((Applied::Nothing, effects));
        };
        let hash = v.hash;
        let purpose = v.pair.purpose.as_str();
        let applied = match v.statement.decision {
            Decision::Grant => {
                // Consent covers the notice the user signed, and only while it is the pair's current one: a grant
                // under any other (older terms, or a document the relay made up) exports nothing.
                let current = self.catalogue.notice(&affiliate.id, v.pair.purpose).map(|n| n.hash);
                if current != Some(v.statement.notice_hash) {
                    tracing::info!(
                        cursor = change.cursor,
                        "grant under a notice that is not current; nothing exported"
                    );
                    return Ok((Applied::Nothing, effects));
                }
                if !v.statement.not_objected(known.objection.as_ref()) {
                    tracing::info!(cursor = change.cursor, "grant for a purpose the user objects to; nothing exported");
                    return Ok((Applied::Nothing, effects));
                }
                let Some(subject) = &v.subject else { return Ok((Applied::Nothing, effects)) };
                let Some((mut data, fields)) = payload::build(&affiliate, v.pair.purpose, subject, &self.master_key)
                else {
                    return Ok((Applied::Nothing, effects));
                };
                // serde_json's map is ordered by key, so equal data gives equal digests.
                let digest: [u8; 32] = Sha256::digest(Value::Object(data.clone()).to_string().as_bytes()).into();
                let marker = ExportMarker { statement_hash: hash, digest };
                if known.exported == Some(marker) {
                    return Ok((Applied::Unchanged, effects));
                }
                data.insert("purpose".into(), Value::String(purpose.into()));
                data.insert("consent".into(), Value::String(hex::encode(hash)));
                let entry = Entry {
                    kind: Kind::Export,
                    pair: v.pair.clone(),
                    statement_hash: hash,
                    pseudonym: phone_pseudonym(&self.master_key, &affiliate.id, &subject.phone),
                    body: feed::event(
                        "user.metadata.exported",
                        now_ms,
                        self.entropy.nonce(),
                        data,
                        self.log_head.as_ref(),
                    ),
                    attempts: 0,
                    next_attempt_ms: now_ms,
                    notice_hash: None,
                    queued_ms: None,
                    fields: fields.iter().map(|f| f.as_str().to_owned()).collect(),
                    evidence: Some(v.evidence),
                    state: EntryState::Queued,
                };
                // Older data still queued for the pair is superseded by this one.
                self.drop_exports_of(&v.pair, &mut effects)?;
                self.queue(WebhookId::derive(&hash, &affiliate.id, &digest), entry, &mut effects);
                effects.push(Effect::Write(Write::SetExported { pair: v.pair, marker }));
                Applied::Queued
            }
            // An objection was handled above; a lift changes nothing queued (grants after it count again).
            Decision::Object | Decision::Lift => Applied::Nothing,
            Decision::Withdraw => {
                let (dropped, logged) = self.drop_exports_of(&v.pair, &mut effects)?;
                effects.push(Effect::Write(Write::ForgetExported { pair: v.pair.clone() }));
                // An export just logged as delivered added to what the pair's affiliate received.
                let delivered = match (known.delivered, logged) {
                    (Some(mut known), Some(logged)) => {
                        known.merge(logged);
                        Some(known)
                    }
                    (known, logged) => known.or(logged),
                };
                let notified = delivered.is_some();
                if let Some(delivered) = delivered {
                    let mut data = delivered.notice_data();
                    data.insert("purpose".into(), Value::String(purpose.into()));
                    let entry = Entry {
                        kind: Kind::Withdrawn,
                        pair: v.pair.clone(),
                        statement_hash: hash,
                        pseudonym: delivered.phone_pseudonym.first().cloned().unwrap_or_default(),
                        body: feed::event(
                            "consent.withdrawn",
                            now_ms,
                            self.entropy.nonce(),
                            data,
                            self.log_head.as_ref(),
                        ),
                        attempts: 0,
                        next_attempt_ms: now_ms,
                        notice_hash: Some(delivered.notice_hash().unwrap_or([0; 32])),
                        queued_ms: Some(now_ms),
                        fields: Vec::new(),
                        // The withdrawal: what the notice's log record shows it follows from.
                        evidence: Some(v.evidence.clone()),
                        state: EntryState::Queued,
                    };
                    // Queued before the delivered mark is forgotten, so a crash between the two loses neither.
                    self.queue(WebhookId::notice(&hash, &affiliate.id), entry, &mut effects);
                    effects.push(Effect::Write(Write::ForgetDelivered { pair: v.pair }));
                }
                if dropped > 0 || notified {
                    tracing::info!(dropped, notified, "withdrawal applied to the outbox");
                }
                Applied::Withdrawn { dropped, notified }
            }
        };
        Ok((applied, effects))
    }

    /// A page of `feed` was applied and its effects performed: the feed's cursor moves to `next_cursor` (never back),
    /// durably, but only once everything written for the page is.
    pub fn page_done(&mut self, feed: Feed, next_cursor: u64) -> Vec<Effect> {
        let cursor = self.cursors.entry(feed).or_default();
        *cursor = (*cursor).max(next_cursor);
        vec![Effect::Flush, Effect::Write(Write::Cursor { feed, cursor: *cursor }), Effect::Flush]
    }

    /// Queues `entry` under `id` unless an entry with that id is queued already (that one keeps its body, so a
    /// retry repeats the body the affiliate may have seen).
    pub(super) fn queue(&mut self, id: WebhookId, entry: Entry, effects: &mut Vec<Effect>) {
        if let Slot::Vacant(slot) = self.outbox.entry(id) {
            effects.push(Effect::Write(Write::Put { id, entry: Box::new(entry.clone()) }));
            slot.insert(entry);
        }
    }

    /// Drops every queued export (not notice) of `pair`, in id order: how many, and how those logged as delivered
    /// (because an attempt of theirs got no answer) identified the user.
    pub(super) fn drop_exports_of(
        &mut self,
        pair: &Pair,
        effects: &mut Vec<Effect>,
    ) -> Result<(usize, Option<Delivered>), CoreError> {
        let doomed: Vec<WebhookId> =
            self.outbox.iter().filter(|(_, e)| e.kind == Kind::Export && e.pair == *pair).map(|(id, _)| *id).collect();
        let mut logged: Option<Delivered> = None;
        for id in &doomed {
            if let Some(delivered) = self.drop_export(id, effects)? {
                logged.get_or_insert_with(Delivered::default).merge(delivered);
            }
        }
        Ok((doomed.len(), logged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_markers_have_one_text_form() {
        let marker = ExportMarker { statement_hash: [1; 32], digest: [0xab; 32] };
        let text = marker.to_string();
        assert_eq!(text, format!("{}:{}", "01".repeat(32), "ab".repeat(32)));
        assert_eq!(text.parse(), Ok(marker));
        for bad in [String::new(), "01".repeat(32), text.to_uppercase(), format!("{text}:00"), text.replace(':', "")] {
            assert!(bad.parse::<ExportMarker>().is_err(), "{bad:?}");
        }
    }
}
