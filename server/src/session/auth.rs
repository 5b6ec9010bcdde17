//! `Register` and `Auth`: binding a connection to an account.
//!
//! Registration creates the account of an identity key, or updates its sealing key, phone number and device info;
//! it is acknowledged only once durable. Both requests carry a signature over a transcript bound to this
//! connection's EKM (see [`super::state`]). This handler holds the directory (it writes phone numbers and device
//! info), the prekeys (to report pool counts) and the group commit; nothing of the mailboxes.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use relay_proto::auth::{auth_transcript, register_transcript};
use relay_proto::wire::{Auth as AuthRequest, AuthOk, Register, Registered, server_frame::Body as Resp};
use relay_proto::{AccountId, ErrorCode, PhoneNumber};

use super::checks::{self, Reply, reply};
use super::keys::prekey_counts;
use super::state::Session;
use crate::ratelimit::RateLimiter;
use crate::reject::Reject;
use crate::store::directory::AccountKeys;
use crate::store::{Directory, GroupCommit, Prekeys};

/// Longest accepted device-info field, in bytes.
pub const MAX_DEVICE_FIELD: usize = 64;

/// The authentication and registration handler.
pub struct Auth {
    /// Accounts, keys, phone numbers and device info.
    pub directory: Directory,
    /// Prekey pools, for the counts `AuthOk` reports.
    pub prekeys: Prekeys,
    /// Durability barrier.
    pub commit: Arc<GroupCommit>,
    /// `Register` requests per client address.
    pub registrations: RateLimiter<IpAddr>,
    /// The configured rate, for the refusal message.
    pub registrations_per_minute: u32,
}

impl Auth {
    /// Registers (or updates) the account of the signing identity key and authenticates the connection as it.
    pub async fn register(&self, session: &Session, r: Register) -> Reply {
        checks::version(r.protocol_version)?;
        if !self.registrations.allow(crate::ratelimit::address_key(session.peer()), Instant::now()) {
            return Err(Reject::new(
                ErrorCode::RateLimited,
                format!("at most {} registrations per minute from one address", self.registrations_per_minute),
            ));
        }
        let identity_key = checks::key32(&r.identity_key, "identity_key")?;
        let sealing_key = checks::key32(&r.sealing_key, "sealing_key")?;
        let phone = PhoneNumber::parse(&r.phone).map_err(|e| Reject::new(ErrorCode::InvalidPhone, e.to_string()))?;
        let device = r.device.unwrap_or_default();
        for (name, value) in [("model", &device.model), ("os", &device.os), ("app_version", &device.app_version)] {
            if value.len() > MAX_DEVICE_FIELD || value.chars().any(char::is_control) {
                return Err(Reject::invalid(format!(
                    "device {name} must be at most {MAX_DEVICE_FIELD} bytes of printable text"
                )));
            }
        }
        let transcript = register_transcript(session.ekm(), &identity_key, &sealing_key, phone.as_str(), &device);
        checks::signature(&identity_key, &transcript, &r.signature)?;
        session.check_same(AccountId::from_identity_key(&identity_key))?;
        let keys = AccountKeys { identity_key, sealing_key };
        let (account, created) = self.directory.register(keys, &phone, device, relay_proto::now_ms())?;
        self.commit.durable().await?;
        session.authenticate(account)?;
        // Debug, like every line naming an account: an operator's info log says nothing of who uses the relay.
        tracing::debug!(%account, created, "registered");
        reply(Resp::Registered(Registered { account_id: account.as_bytes().to_vec().into(), created }))
    }

    /// Authenticates the connection as an existing account.
    pub fn auth(&self, session: &Session, a: AuthRequest) -> Reply {
        checks::version(a.protocol_version)?;
        let account =
            AccountId::from_slice(&a.account_id).ok_or_else(|| Reject::invalid("account_id must be 16 bytes"))?;
        let keys = self
            .directory
            .keys(&account)?
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "no such account: register first"))?;
        checks::signature(&keys.identity_key, &auth_transcript(session.ekm(), &account), &a.signature)?;
        session.authenticate(account)?;
        tracing::debug!(%account, "authenticated");
        let prekeys = Some(prekey_counts(&self.prekeys, &account)?);
        reply(Resp::AuthOk(AuthOk { account_id: a.account_id, server_time_ms: relay_proto::now_ms(), prekeys }))
    }
}
