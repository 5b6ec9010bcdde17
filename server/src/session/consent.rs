//! `PutConsent`, `ListConsent`, `ConsentHistory`, `ListExports` and `GetNotice`: the caller's own consent statements
//! and export-log entries, and the notices the exporter published.
//!
//! A statement must be the caller's own, signed by the caller's identity key over exactly the bytes sent, for a
//! purpose in the catalogue, with a sequence number above the last; a grant must name the current notice the
//! exporter published for its pair (none published: nothing can be granted), and is refused while the account
//! objects to its purpose. An objection is acknowledged, like a withdrawal, only once no export of the purpose to any
//! affiliate the account ever decided about is in flight. It is
//! acknowledged only once durable; a withdrawal is acknowledged only after every export lease of its pair has ended
//! (the withdrawal fence), so that from then on nothing of the pair leaves. No request names another account.
//! Holds the registry, the identity keys (to verify signatures), the export-log copy, the notices, the fence and the
//! group commit; no mailbox and no profile.

use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use relay_proto::ErrorCode;
use relay_proto::consent::{self, ConsentError, ConsentStatement, Decision};
use relay_proto::merkle;
use relay_proto::wire::{
    ConsentHistory, ConsentHistoryPage, ConsentList, ConsentRecorded, ExportList, GetNotice, ListExports, LogLeaf,
    NoticeDocument, PutConsent, SignedStatement, server_frame::Body as Resp,
};

use super::checks::{Reply, reply};
use super::state::Session;
use crate::reject::Reject;
use crate::store::{ConsentRegistry, Durability, ExportLog, Identities, Notices};
use crate::tamper::Tamper;

/// The consent and export-history handler.
pub struct Consent {
    /// Signed consent statements.
    pub registry: ConsentRegistry,
    /// Identity keys, to verify statements.
    pub identities: Identities,
    /// The relay's copy of the export log.
    pub export_log: ExportLog,
    /// The exporter's notices.
    pub notices: Notices,
    /// Export leases that withdrawals wait for.
    pub fence: crate::store::Leases,
    /// Durability barrier.
    pub commit: Arc<dyn Durability>,
    /// Lies to tell, for tests only (see [`crate::tamper`]).
    pub tamper: Arc<Tamper>,
}

impl Consent {
    /// Records one of the caller's consent statements.
    pub async fn put(&self, session: &Session, c: PutConsent) -> Reply {
        let account = session.account()?;
        let rejected = |e: ConsentError| Reject::new(ErrorCode::ConsentRejected, e.to_string());
        // The signature is checked over the bytes as received, before they are decoded; those bytes are stored.
        let keys = self.identities.keys(&account).await?.ok_or_else(Reject::unauthenticated)?;
        let identity_key =
            VerifyingKey::from_bytes(&keys.identity_key).map_err(|_| rejected(ConsentError::BadSignature))?;
        consent::verify_signature(&c.statement, &c.signature, &identity_key).map_err(rejected)?;
        let signature: [u8; 64] = c.signature.as_ref().try_into().map_err(|_| rejected(ConsentError::BadSignature))?;
        let statement = ConsentStatement::decode(&c.statement).map_err(rejected)?;
        if statement.account != account {
            return Err(rejected(ConsentError::WrongAccount));
        }
        let current = self.notices.current_hash(&statement.affiliate, statement.purpose).await?;
        statement.names_notice(current.as_ref()).map_err(rejected)?;
        if statement.decision == Decision::Grant {
            let objection = self.registry.latest_for(&account, statement.purpose, "").await?;
            if !statement.not_objected(objection.as_ref().map(|o| &o.statement)) {
                return Err(Reject::new(
                    ErrorCode::ConsentRejected,
                    format!(
                        "you object to {p}: no affiliate may receive anything for it; lift the objection first \
                         (relay consent object --purpose {p} --lift)",
                        p = statement.purpose
                    ),
                ));
            }
        }
        let now = relay_proto::now_ms();
        self.registry.record(&c.statement, &signature, now).await?;
        self.commit.durable().await?;
        match statement.decision {
            Decision::Withdraw => {
                // The withdrawal fence: an export of this pair in flight finishes (or its lease lapses) before the
                // user hears that the withdrawal took effect; any later export attempt reads the withdrawal and is
                // refused.
                self.fence.wait_clear(&(account, statement.purpose, statement.affiliate.clone())).await;
            }
            Decision::Object => {
                // The same for every affiliate of the purpose: a lease needs a grant, so the pairs the account has
                // statements for are all the pairs that can hold one.
                for r in self.registry.latest(&account).await? {
                    let s = r.statement;
                    if s.purpose == statement.purpose && !s.decision.is_purpose_level() {
                        self.fence.wait_clear(&(account, s.purpose, s.affiliate)).await;
                    }
                }
            }
            Decision::Grant | Decision::Lift => {}
        }
        reply(Resp::ConsentRecorded(ConsentRecorded {
            sequence: statement.sequence,
            recorded_at_ms: now,
            statement_hash: consent::statement_hash(&c.statement).to_vec().into(),
        }))
    }

    /// The caller's latest statement per (affiliate, purpose), as signed.
    pub async fn list(&self, session: &Session) -> Reply {
        let account = session.account()?;
        let latest = self
            .registry
            .latest(&account)
            .await?
            .into_iter()
            .map(|r| SignedStatement {
                statement: r.encoded.into(),
                signature: r.signature.to_vec().into(),
                recorded_at_ms: r.recorded_at_ms,
            })
            .collect();
        let last_sequence = self.registry.last_sequence(&account).await?;
        reply(Resp::ConsentList(ConsentList { latest, last_sequence }))
    }

    /// A page of the caller's statements, as signed, oldest first.
    pub async fn history(&self, session: &Session, h: ConsentHistory) -> Reply {
        let account = session.account()?;
        let (page, more) =
            self.registry.history_page(&account, h.after_sequence, relay_proto::MAX_HISTORY_PAGE).await?;
        let page = page.into_iter().map(|r| (r.encoded, r.signature.to_vec(), r.recorded_at_ms)).collect();
        let statements = self
            .tamper
            .history(page)
            .into_iter()
            .map(|(statement, signature, recorded_at_ms)| SignedStatement {
                statement: statement.into(),
                signature: signature.into(),
                recorded_at_ms,
            })
            .collect();
        reply(Resp::ConsentHistoryPage(ConsentHistoryPage { statements, more }))
    }

    /// A notice document: the pair's current one, or the one with the hash asked for.
    pub async fn notice(&self, session: &Session, n: GetNotice) -> Reply {
        session.account()?;
        let document = if n.hash.is_empty() {
            let purpose = consent::Purpose::parse(&n.purpose)
                .ok_or_else(|| Reject::new(ErrorCode::NotFound, format!("unknown purpose {:?}", n.purpose)))?;
            self.notices.current(&n.affiliate, purpose).await?.ok_or_else(|| {
                Reject::new(
                    ErrorCode::NotFound,
                    format!("no notice is published for {}/{purpose}: nothing can be granted for it", n.affiliate),
                )
            })?
        } else {
            let hash: [u8; 32] =
                n.hash.as_ref().try_into().map_err(|_| Reject::invalid("a notice hash is 32 bytes"))?;
            self.notices
                .by_hash(&hash)
                .await?
                .ok_or_else(|| Reject::new(ErrorCode::NotFound, "no notice with this hash was ever published"))?
        };
        reply(Resp::NoticeDocument(NoticeDocument { document: document.into() }))
    }

    /// The caller's entries of the export log, with proofs.
    pub async fn list_exports(&self, session: &Session, l: ListExports) -> Reply {
        let account = session.account()?;
        let honest = self.export_list(&account, &l).await;
        match self.tamper.export_list(&l, honest.as_ref().ok()) {
            Some(lie) => reply(Resp::ExportList(lie)),
            None => reply(Resp::ExportList(honest?)),
        }
    }

    /// The honest answer to `l`.
    async fn export_list(&self, account: &relay_proto::AccountId, l: &ListExports) -> Result<ExportList, Reject> {
        let listing = self
            .export_log
            .list(account, l.tree_size, l.start_index, l.since_size, relay_proto::MAX_LISTED_EXPORTS)
            .await?;
        let entries = listing
            .entries
            .into_iter()
            .map(|(index, leaf, proof)| LogLeaf { index, leaf: leaf.into(), proof: merkle::proof_to_wire(&proof) })
            .collect();
        let head = match &listing.head {
            Some(h) => Some(self.export_log.wire_head(h).await?),
            None => None,
        };
        Ok(ExportList {
            log_key: listing.log_key.map(|k| k.to_bytes().to_vec().into()).unwrap_or_default(),
            head,
            entries,
            next_index: listing.next_index,
            more: listing.more,
            consistency: merkle::proof_to_wire(&listing.consistency),
        })
    }
}
