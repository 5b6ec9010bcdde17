//! `Register`, `Auth`, `RequestCode`, `SetRegistrationLock` and `GetSenderCertificate`: binding a connection to an
//! account, proving the phone number it registers, and vouching for it.
//!
//! Registration creates the account of an identity key, or updates its sealing key, phone number and device info;
//! it is acknowledged only once durable. The number of a `Register` or a `RequestCode` must be a valid number of its
//! country's numbering plan, already in canonical E.164 form (`PhoneNumber::parse_valid`): refused with
//! `INVALID_PHONE`, never repaired. Both `Register` and `Auth` carry a signature over a transcript bound to
//! this connection's EKM (see [`super::state`]). A sealing key is accepted only with its binding signature by the
//! identity key (`relay_proto::identity`); clients check that signature again on every lookup and bundle. Whether a
//! registration may claim its number (a code, a registration lock) is decided by [`Registration`] before the
//! directory is written; a verified registration of a number another identity holds takes it over, and the old
//! account's published keys go with it. Sender certificates state what the directory holds for the authenticated
//! account, never what a request says. This handler holds the directory (it writes phone numbers and device info),
//! the prekeys (to report pool counts and forget a displaced account's), the registration rules, the certificate
//! issuer and the group commit; nothing of the mailboxes. It logs account and request ids (at debug level), never a
//! phone number, a code or a PIN. An identity key whose account was erased (`DeleteAccount`) cannot register again.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use relay_proto::auth::{auth_transcript, register_transcript};
use relay_proto::identity::verify_binding;
use relay_proto::wire::{
    Auth as AuthRequest, AuthOk, CodeSent, Register, Registered, RegistrationLockSet, RequestCode, SenderCertificate,
    SetRegistrationLock, server_frame::Body as Resp,
};
use relay_proto::{AccountId, ErrorCode, PhoneNumber};

use super::checks::{self, Reply, reply};
use super::keys::prekey_counts;
use super::state::Session;
use crate::certificates::CertificateIssuer;
use crate::ratelimit::RateLimiter;
use crate::reject::Reject;
use crate::store::directory::AccountKeys;
use crate::store::{Directory, DirectoryError, Durability, Prekeys};
use crate::verify::Registration;

/// Longest accepted device-info field, in bytes.
pub const MAX_DEVICE_FIELD: usize = 64;

/// The authentication and registration handler.
pub struct Auth {
    /// Accounts, keys, phone numbers and device info.
    pub directory: Directory,
    /// Prekey pools, for the counts `AuthOk` reports.
    pub prekeys: Prekeys,
    /// Durability barrier.
    pub commit: Arc<dyn Durability>,
    /// Verification codes and registration locks.
    pub registration: Arc<Registration>,
    /// The sender-certificate key.
    pub certificates: Arc<CertificateIssuer>,
    /// `Register` requests per client address.
    pub registrations: RateLimiter<IpAddr>,
    /// The configured rate, for the refusal message.
    pub registrations_per_minute: u32,
    /// Erased accounts, whose identity keys may not register again.
    pub erasures: crate::store::Erasures,
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
        let phone =
            PhoneNumber::parse_valid(&r.phone).map_err(|e| Reject::new(ErrorCode::InvalidPhone, e.to_string()))?;
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
        verify_binding(&identity_key, &sealing_key, &r.sealing_key_signature).map_err(|_| {
            Reject::new(
                ErrorCode::BadSignature,
                "sealing_key_signature does not bind the sealing key to the identity key",
            )
        })?;
        let sealing_key_signature = r.sealing_key_signature.as_ref().try_into().ok();
        let account = AccountId::from_identity_key(&identity_key);
        session.check_same(account)?;
        if self.erasures.erased(&account).await? {
            // Its old statements are still in the registry: the same key coming back must not revive them.
            return Err(Reject::new(
                ErrorCode::ConsentRejected,
                "this identity key's account was erased; register with a new identity",
            ));
        }
        let holder = self.directory.lookup(&phone).await?.map(|(holder, _)| holder);
        let admission = self.registration.admit(account, &phone, holder, &r.code, &r.registration_lock_pin).await?;
        let keys = AccountKeys { identity_key, sealing_key, sealing_key_signature };
        let registered = self.directory.register(keys, &phone, device, relay_proto::now_ms(), admission.claim).await?;
        if let Some(old) = registered.displaced {
            self.prekeys.forget(&old).await?;
        }
        let used = self.registration.registered(&admission, &account, registered.displaced).await?;
        self.commit.durable().await?;
        if let Some(request) = used {
            self.registration.withdraw(&request);
        }
        session.authenticate(account)?;
        // Debug, like every line naming an account: an operator's info log says nothing of who uses the relay.
        let created = registered.created;
        match registered.displaced {
            Some(old) => tracing::debug!(%account, created, displaced = %old, "registered: number taken over"),
            None => tracing::debug!(%account, created, "registered"),
        }
        reply(Resp::Registered(Registered {
            account_id: account.as_bytes().to_vec().into(),
            created,
            sender_certificate_key: self.certificates.public_key().to_vec().into(),
        }))
    }

    /// Asks the verifier to send a code to the requested number.
    pub async fn request_code(&self, session: &Session, c: RequestCode) -> Reply {
        let phone =
            PhoneNumber::parse_valid(&c.phone).map_err(|e| Reject::new(ErrorCode::InvalidPhone, e.to_string()))?;
        let (request_id, expires_at_ms) = self.registration.request_code(&phone, session.peer()).await?;
        reply(Resp::CodeSent(CodeSent {
            request_id: request_id.to_string(),
            expires_at_ms,
            attempts: self.registration.attempts(),
        }))
    }

    /// Sets or removes the authenticated account's registration lock.
    pub async fn set_registration_lock(&self, session: &Session, l: SetRegistrationLock) -> Reply {
        let account = session.account()?;
        let enabled = self.registration.set_lock(&account, &l.pin).await?;
        reply(Resp::RegistrationLockSet(RegistrationLockSet { enabled }))
    }

    /// Authenticates the connection as an existing account.
    pub async fn auth(&self, session: &Session, a: AuthRequest) -> Reply {
        checks::version(a.protocol_version)?;
        let account =
            AccountId::from_slice(&a.account_id).ok_or_else(|| Reject::invalid("account_id must be 16 bytes"))?;
        let keys = self
            .directory
            .keys(&account)
            .await?
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "no such account: register first"))?;
        checks::signature(&keys.identity_key, &auth_transcript(session.ekm(), &account), &a.signature)?;
        session.authenticate(account)?;
        self.registration.touch(&account).await?;
        tracing::debug!(%account, "authenticated");
        let prekeys = Some(prekey_counts(&self.prekeys, &account).await?);
        reply(Resp::AuthOk(AuthOk {
            account_id: a.account_id,
            server_time_ms: relay_proto::now_ms(),
            prekeys,
            sender_certificate_key: self.certificates.public_key().to_vec().into(),
        }))
    }

    /// A sender certificate for the authenticated account, from the directory's record of it.
    pub async fn sender_certificate(&self, session: &Session) -> Reply {
        let account = session.account()?;
        let gone = || Reject::new(ErrorCode::NotFound, "no such account: register first");
        let keys = self.directory.keys(&account).await?.ok_or_else(gone)?;
        let profile = self.directory.profile(&account).await?.ok_or_else(gone)?;
        // The directory only ever holds numbers that parsed as strict E.164 at registration: anything else is a
        // damaged record.
        let phone = PhoneNumber::parse(&profile.phone).map_err(|_| Reject::from(DirectoryError::Corrupt))?;
        let signed = self.certificates.issue(&keys, phone, relay_proto::now_ms());
        reply(Resp::SenderCertificate(SenderCertificate {
            certificate: signed.certificate.into(),
            signature: signed.signature.to_vec().into(),
        }))
    }
}
