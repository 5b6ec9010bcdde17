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
//!    then every other connection authenticated as the account is closed (`super::connections`);
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
use crate::reject::Reject;
use crate::store::{ConsentRegistry, Directory, Durability, Erasure, Erasures, MailboxStore, Prekeys};
use crate::verify::Registration;

/// The account-erasure handler.
pub struct Account {
    /// Accounts, keys, phone numbers and device info.
    pub directory: Directory,
    /// Prekey pools and access keys.
    pub prekeys: Prekeys,
    /// Mailboxes, emptied at erasure.
    pub mailboxes: Arc<dyn MailboxStore>,
    /// The account's other live connections, closed at erasure.
    pub connections: Arc<super::connections::AccountConnections>,
    /// Registration locks and pending codes.
    pub registration: Arc<Registration>,
    /// The erasure feed.
    pub erasures: Erasures,
    /// Consent statements, for the account's pairs.
    pub registry: ConsentRegistry,
    /// Export leases the erasure waits for.
    pub fence: crate::store::Leases,
    /// Durability barrier.
    pub commit: Arc<dyn Durability>,
}

impl Account {
    /// Erases the authenticated account (see the module header); the caller closes the connection after the answer.
    pub async fn delete(&self, session: &Session, d: DeleteRequest) -> Reply {
        let account = session.account()?;
        let keys = self.directory.keys(&account).await?.ok_or_else(Reject::unauthenticated)?;
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
        let cursor = self.erasures.record(&erasure).await?;
        self.commit.durable().await?;
        let phone = self.directory.remove(&account).await?;
        self.prekeys.forget(&account).await?;
        self.registration.forget(&account, phone.as_ref()).await?;
        let purged = self.mailboxes.purge(&account).await?;
        self.commit.durable().await?;
        // Nothing of the account is left to serve: its other connections go now, this one after its answer.
        let closed = self.connections.close_all(&account, session.closer());
        for r in self.registry.latest(&account).await? {
            let s = r.statement;
            if !s.decision.is_purpose_level() {
                self.fence.wait_clear(&(account, s.purpose, s.affiliate)).await;
            }
        }
        session.end();
        tracing::debug!(%account, cursor, purged, closed, "account erased");
        reply(Resp::AccountDeleted(AccountDeleted {}))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use ed25519_dalek::{Signer, SigningKey};
    use relay_proto::PhoneNumber;
    use relay_proto::consent::{ConsentStatement, Decision, Purpose};

    use super::*;
    use crate::fence::LEASE_TTL;
    use crate::store::directory::{AccountKeys, Claim};
    use crate::store::{MailboxLimits, Store};
    use crate::verify::{CodeLimits, VerifierSpec};

    /// The erasure is recorded before anything is deleted, the account's records go, and the answer waits, like a
    /// withdrawal, until the export lease held on one of the account's pairs is released.
    #[tokio::test]
    async fn a_deletion_is_recorded_first_removes_the_account_and_waits_for_exports_in_flight() {
        let dir = tempfile::tempdir().expect("dir");
        let limits = MailboxLimits { max_messages: 10, max_bytes: 10_000, ttl_ms: 60_000 };
        let store = Store::open(&dir.path().join("store"), limits).expect("store");
        let limits = CodeLimits { per_number_per_hour: 1, per_address_per_hour: 1 };
        let registration = Registration::open(
            &VerifierSpec::Open,
            dir.path(),
            store.verifications.clone(),
            store.commit.clone(),
            limits,
        )
        .expect("registration");
        let handler = Arc::new(Account {
            directory: store.directory.clone(),
            prekeys: store.prekeys.clone(),
            mailboxes: store.mailboxes.clone(),
            connections: Arc::default(),
            registration: Arc::new(registration),
            erasures: store.erasures.clone(),
            registry: store.consent.clone(),
            fence: store.fence.clone(),
            commit: store.commit.clone(),
        });
        let key = SigningKey::from_bytes(&[4; 32]);
        let keys = AccountKeys {
            identity_key: key.verifying_key().to_bytes(),
            sealing_key: [5; 32],
            sealing_key_signature: None,
        };
        let phone = PhoneNumber::parse("+33612345678").expect("phone");
        let account = store
            .directory
            .register(keys, &phone, Default::default(), 1, Claim::FirstCome)
            .await
            .expect("register")
            .account;
        let grant = ConsentStatement {
            account,
            affiliate: "adsco".into(),
            purpose: Purpose::Advertising,
            decision: Decision::Grant,
            notice_hash: [1; 32],
            sequence: 1,
            time_ms: 1,
            expires_ms: None,
        };
        store.consent.record(&grant.encode(), &[0; 64], 1).await.expect("grant");
        store.mailboxes.append(&account, b"queued", relay_proto::now_ms()).await.expect("envelope");
        let (lease, _) = store
            .fence
            .acquire((account, Purpose::Advertising, "adsco".into()), LEASE_TTL)
            .await
            .expect("an export in flight");

        let session =
            Arc::new(Session::new([9; 32], IpAddr::V4(Ipv4Addr::LOCALHOST), crate::session::Budgets::fixed(1 << 20)));
        session.authenticate(account).expect("auth");
        let signature = key.sign(&delete_transcript(&[9; 32], &account)).to_bytes();
        let request = DeleteRequest { signature: signature.to_vec().into() };
        let task = {
            let (handler, session) = (handler.clone(), session.clone());
            tokio::spawn(async move { handler.delete(&session, request).await })
        };
        // Bounded wait for the removal, which comes after the erasure is durably recorded.
        for _ in 0..1_000 {
            if store.directory.lookup(&phone).await.expect("lookup").is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(store.directory.lookup(&phone).await.expect("lookup"), None, "the number is free");
        let recorded = store.erasures.changes(0, 10).await.expect("feed");
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].1.account, account);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!task.is_finished(), "acknowledged while an export of the account was in flight");
        store.fence.release(&(account, Purpose::Advertising, "adsco".into()), lease).await;
        let answer = tokio::time::timeout(Duration::from_secs(10), task).await.expect("answered").expect("join");
        assert!(matches!(answer.expect("deleted").body, Some(Resp::AccountDeleted(_))));
        assert!(session.ended(), "the connection is to be closed");
        assert_eq!(store.directory.keys(&account).await.expect("keys"), None);
        assert_eq!(store.directory.profile(&account).await.expect("profile"), None);
        assert_eq!(store.mailboxes.depth(&account).await.expect("depth"), 0, "the mailbox is empty");
        assert!(store.erasures.erased(&account).await.expect("erased"));
        assert_eq!(store.consent.history(&account).await.expect("history").len(), 1, "statements stay as evidence");
    }
}
