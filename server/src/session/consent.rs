//! `PutConsent`, `ListConsent` and `ListExports`: the caller's own consent statements and export-log entries.
//!
//! A statement must be the caller's own, signed by the caller's identity key over exactly the bytes sent, for a
//! purpose in the catalogue (a grant: under its current notice), with a sequence number above the last. It is
//! acknowledged only once durable; a withdrawal is acknowledged only after every export lease of its pair has ended
//! (the withdrawal fence), so that from then on nothing of the pair leaves. No request names another account.
//! Holds the registry, the identity keys (to verify signatures), the export-log copy, the fence and the group
//! commit; no mailbox and no profile.

use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use relay_proto::ErrorCode;
use relay_proto::consent::{self, ConsentError, ConsentStatement, Decision};
use relay_proto::merkle;
use relay_proto::wire::{
    ConsentList, ConsentRecorded, ExportList, ListExports, LogLeaf, PutConsent, SignedStatement,
    server_frame::Body as Resp,
};

use super::checks::{Reply, reply};
use super::state::Session;
use crate::fence::Fence;
use crate::reject::Reject;
use crate::store::{ConsentRegistry, ExportLog, GroupCommit, Identities};

/// The consent and export-history handler.
pub struct Consent {
    /// Signed consent statements.
    pub registry: ConsentRegistry,
    /// Identity keys, to verify statements.
    pub identities: Identities,
    /// The relay's copy of the export log.
    pub export_log: ExportLog,
    /// Export leases that withdrawals wait for.
    pub fence: Arc<Fence>,
    /// Durability barrier.
    pub commit: Arc<GroupCommit>,
}

impl Consent {
    /// Records one of the caller's consent statements.
    pub async fn put(&self, session: &Session, c: PutConsent) -> Reply {
        let account = session.account()?;
        let rejected = |e: ConsentError| Reject::new(ErrorCode::ConsentRejected, e.to_string());
        // The signature is checked over the bytes as received, before they are decoded; those bytes are stored.
        let keys = self.identities.keys(&account)?.ok_or_else(Reject::unauthenticated)?;
        let identity_key =
            VerifyingKey::from_bytes(&keys.identity_key).map_err(|_| rejected(ConsentError::BadSignature))?;
        consent::verify_signature(&c.statement, &c.signature, &identity_key).map_err(rejected)?;
        let signature: [u8; 64] = c.signature.as_ref().try_into().map_err(|_| rejected(ConsentError::BadSignature))?;
        let statement = ConsentStatement::decode(&c.statement).map_err(rejected)?;
        if statement.account != account {
            return Err(rejected(ConsentError::WrongAccount));
        }
        let now = relay_proto::now_ms();
        self.registry.record(&c.statement, &signature, now)?;
        self.commit.durable().await?;
        if statement.decision == Decision::Withdraw {
            // The withdrawal fence: an export of this pair in flight finishes (or its lease lapses) before the user
            // hears that the withdrawal took effect; any later export attempt reads the withdrawal and is refused.
            self.fence.wait_clear(&(account, statement.purpose, statement.affiliate.clone())).await;
        }
        reply(Resp::ConsentRecorded(ConsentRecorded {
            sequence: statement.sequence,
            recorded_at_ms: now,
            statement_hash: consent::statement_hash(&c.statement).to_vec().into(),
        }))
    }

    /// The caller's latest statement per (affiliate, purpose), as signed.
    pub fn list(&self, session: &Session) -> Reply {
        let account = session.account()?;
        let latest = self
            .registry
            .latest(&account)?
            .into_iter()
            .map(|r| SignedStatement {
                statement: r.encoded.into(),
                signature: r.signature.to_vec().into(),
                recorded_at_ms: r.recorded_at_ms,
            })
            .collect();
        let last_sequence = self.registry.last_sequence(&account)?;
        reply(Resp::ConsentList(ConsentList { latest, last_sequence }))
    }

    /// The caller's entries of the export log, with proofs.
    pub fn list_exports(&self, session: &Session, l: ListExports) -> Reply {
        let account = session.account()?;
        let listing = self.export_log.list(
            &account,
            l.tree_size,
            l.start_index,
            l.since_size,
            relay_proto::MAX_LISTED_EXPORTS,
        )?;
        let entries = listing
            .entries
            .into_iter()
            .map(|(index, leaf, proof)| LogLeaf { index, leaf: leaf.into(), proof: merkle::proof_to_wire(&proof) })
            .collect();
        reply(Resp::ExportList(ExportList {
            log_key: listing.log_key.map(|k| k.to_bytes().to_vec().into()).unwrap_or_default(),
            head: listing.head.as_ref().map(|h| self.export_log.wire_head(h)).transpose()?,
            entries,
            next_index: listing.next_index,
            more: listing.more,
            consistency: merkle::proof_to_wire(&listing.consistency),
        }))
    }
}
