//! `DeleteAccount`: the account's erasure (right to erasure), at its own signed request.
//!
//! The request is a signature by the account's identity key over the delete transcript, bound to this connection's
//! EKM (see [`super::state`]), so a signature seen on one connection erases nothing on another. Order, each step
//! only once the one before it is durable where it says so:
//! 1. the erasure (account id, identity key, the signed transcript and signature, time) is appended to the erasure
//!    feed and made durable, *before* anything is deleted: a crash after it cannot lose the erasure, which the
//!    exporter reads (`store::erasures`);
//! 2. the directory entry (keys, phone number, device info; the number becomes free), prekeys, access key,
//!    registration lock, the number's pending code and every queued envelope of the account are removed, durably;
//! 3. the request waits on the withdrawal fence for every pair the account ever decided about, like a withdrawal:
//!    an export in flight ends before the user hears the account is gone, and a later one finds no profile;
//! 4. `AccountDeleted` is answered and the connection is closed.
//!
//! The account's consent statements stay in the registry (signed evidence for audits); none is ever in force again,
//! since the export interface hands out a subject only from the directory's profile, which is gone. The identity key
//! cannot register again (the auth handler refuses an erased account). This handler holds the directory, the
//! prekeys, the mailboxes (to empty them, never to read them), the registration rules, the erasure feed, the
//! registry (to find the account's pairs), the fence and the group commit. It logs account ids at debug level only,
//! never a phone number.

use std::sync::Arc;

use relay_proto::auth::delete_transcript;
use relay_proto::wire::{AccountDeleted, DeleteAccount as DeleteRequest, server_frame::Body as Resp};

use super::checks::{self, Reply, reply};
use super::state::Session;
use crate::fence::Fence;
use crate::reject::Reject;
use crate::store::{ConsentRegistry, Directory, Erasure, Erasures, GroupCommit, Mailboxes, Prekeys};
use crate::verify::Registration;

/// The account-erasure handler.
pub struct Account {
    /// Accounts, keys, phone numbers and device info.
    pub directory: Directory,
    /// Prekey pools and access keys.
    pub prekeys: Prekeys,
    /// Mailboxes, emptied at erasure.
    pub mailboxes: Arc<Mailboxes>,
    /// Registration locks and pending codes.
    pub registration: Arc<Registration>,
    /// The erasure feed.
    pub erasures: Erasures,
    /// Consent statements, for the account's pairs.
    pub registry: ConsentRegistry,
    /// Export leases the erasure waits for.
    pub fence: Arc<Fence>,
    /// Durability barrier.
    pub commit: Arc<GroupCommit>,
}

impl Account {
    /// Erases the authenticated account (see the module header); the caller closes the connection after the answer.
    pub async fn delete(&self, session: &Session, d: DeleteRequest) -> Reply {
        let account = session.account()?;
        let keys = self.directory.keys(&account)?.ok_or_else(Reject::unauthenticated)?;
        let signed = delete_transcript(session.ekm(), &account);
        checks::signature(&keys.identity_key, &signed, &d.signature)?;
        let signature = d.signature.as_ref().try_into().map_err(|_| Reject::invalid("signature must be 64 bytes"))?;
        let erasure = Erasure {
            account,
            identity_key: keys.identity_key,
            recorded_at_ms: relay_proto::now_ms(),
            signature,
            signed,
        };
        let cursor = self.erasures.record(&erasure)?;
        self.commit.durable().await?;
        let phone = self.directory.remove(&account)?;
        self.prekeys.forget(&account)?;
        self.registration.forget(&account, phone.as_ref())?;
        let purged = self.mailboxes.purge(&account)?;
        self.commit.durable().await?;
        for r in self.registry.latest(&account)? {
            let s = r.statement;
            if !s.decision.is_purpose_level() {
                self.fence.wait_clear(&(account, s.purpose, s.affiliate)).await;
            }
        }
        session.end();
        tracing::debug!(%account, cursor, purged, "account erased");
        reply(Resp::AccountDeleted(AccountDeleted {}))
    }
}
