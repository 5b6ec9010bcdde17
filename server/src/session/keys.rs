//! `Lookup`, `FetchBundle`, `UploadPrekeys`, `SetAccessKey`: the directory's public keys and the prekey pools.
//!
//! A lookup maps a phone number to an account and its public keys (with the identity key's binding of the sealing
//! key, which clients verify), so this handler holds the directory; it answers with keys only, never a profile. Lookups and bundle fetches share one per-account rate limit. A bundle's one-time
//! keys are consumed durably before the bundle is handed out.

use std::sync::Arc;
use std::time::Instant;

use relay_proto::wire::{
    AccessKeySet, Bundle, FetchBundle, Lookup, LookupResult, PrekeyCounts, SetAccessKey, UploadPrekeys,
    server_frame::Body as Resp,
};
use relay_proto::{AccountId, ErrorCode, PhoneNumber};

use super::checks::{Reply, reply};
use super::state::Session;
use crate::ratelimit::RateLimiter;
use crate::reject::Reject;
use crate::store::directory::AccountKeys;
use crate::store::{Directory, Durability, Prekeys};
use crate::tamper::Tamper;

/// Clients are told to replenish a one-time prekey pool below this many keys.
pub const PREKEY_LOW_WATERMARK: u32 = 20;

/// The key-directory and prekey handler.
pub struct Keys {
    /// Phone numbers to accounts and their public keys.
    pub directory: Directory,
    /// Prekey pools and access-key verifiers.
    pub prekeys: Prekeys,
    /// Durability barrier.
    pub commit: Arc<dyn Durability>,
    /// Lookups and bundle fetches per account.
    pub lookups: RateLimiter<AccountId>,
    /// The configured rate, for the refusal message.
    pub lookups_per_minute: u32,
    /// Lies to tell, for tests only (see [`crate::tamper`]).
    pub tamper: Arc<Tamper>,
}

/// The pool counts of `account`, as `AuthOk` and `PrekeyCounts` report them.
pub async fn prekey_counts(prekeys: &Prekeys, account: &AccountId) -> Result<PrekeyCounts, Reject> {
    let c = prekeys.counts(account).await?;
    Ok(PrekeyCounts {
        one_time_prekeys: c.one_time,
        kem_prekeys: c.kem,
        low_watermark: PREKEY_LOW_WATERMARK,
        has_signed_prekey: c.signed,
        has_last_resort_kem_prekey: c.last_resort,
    })
}

impl Keys {
    fn rate_limit(&self, account: AccountId, what: &str) -> Result<(), Reject> {
        if !self.lookups.allow(account, Instant::now()) {
            return Err(Reject::new(
                ErrorCode::RateLimited,
                format!("at most {} {what} per minute", self.lookups_per_minute),
            ));
        }
        Ok(())
    }

    /// The sealing key and its binding signature as a lookup (or a bundle) hands them out: the directory's, unless a
    /// test told the relay to lie. An account registered before bindings existed has no signature to give.
    fn keys_handed_out(&self, account: &AccountId, keys: &AccountKeys, bundle: bool) -> ([u8; 32], Vec<u8>) {
        let real = keys.sealing_key_signature.map(|s| s.to_vec()).unwrap_or_default();
        match self.tamper.sealing_key(account, bundle) {
            Some(lie) => (lie.sealing_key, lie.signature.unwrap_or(real)),
            None => (keys.sealing_key, real),
        }
    }

    /// The account registered with a phone number, and its public keys.
    pub async fn lookup(&self, session: &Session, l: Lookup) -> Reply {
        let account = session.account()?;
        self.rate_limit(account, "lookups")?;
        let phone = PhoneNumber::parse(&l.phone).map_err(|e| Reject::new(ErrorCode::InvalidPhone, e.to_string()))?;
        let (found, keys) = self
            .directory
            .lookup(&phone)
            .await?
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "no account with this phone number"))?;
        let (sealing_key, signature) = self.keys_handed_out(&found, &keys, false);
        reply(Resp::LookupResult(LookupResult {
            account_id: found.as_bytes().to_vec().into(),
            identity_key: keys.identity_key.to_vec().into(),
            sealing_key: sealing_key.to_vec().into(),
            sealing_key_signature: signature.into(),
        }))
    }

    /// Publishes the caller's prekeys.
    pub async fn upload_prekeys(&self, session: &Session, u: UploadPrekeys) -> Reply {
        let account = session.account()?;
        self.prekeys
            .upload(
                &account,
                u.signed_prekey.as_ref(),
                &u.one_time_prekeys,
                &u.kem_prekeys,
                u.last_resort_kem_prekey.as_ref(),
            )
            .await?;
        self.commit.durable().await?;
        reply(Resp::PrekeyCounts(prekey_counts(&self.prekeys, &account).await?))
    }

    /// A prekey bundle of another account, consuming one one-time key of each kind.
    pub async fn fetch_bundle(&self, session: &Session, f: FetchBundle) -> Reply {
        let me = session.account()?;
        self.rate_limit(me, "lookups and bundle fetches")?;
        let account =
            AccountId::from_slice(&f.account_id).ok_or_else(|| Reject::invalid("account_id must be 16 bytes"))?;
        let keys =
            self.directory.keys(&account).await?.ok_or_else(|| Reject::new(ErrorCode::NotFound, "no such account"))?;
        let taken = self
            .prekeys
            .take_bundle(&account)
            .await?
            .ok_or_else(|| Reject::new(ErrorCode::NoPrekeys, "this account has not published prekeys"))?;
        // The consumed one-time keys must stay consumed across a crash before the bundle is handed out.
        self.commit.durable().await?;
        let (identity_dh_key, identity_dh_signature) = self.keys_handed_out(&account, &keys, true);
        reply(Resp::Bundle(Bundle {
            account_id: f.account_id,
            identity_key: keys.identity_key.to_vec().into(),
            identity_dh_key: identity_dh_key.to_vec().into(),
            identity_dh_signature: identity_dh_signature.into(),
            signed_prekey: Some(taken.signed),
            one_time_prekey: taken.one_time,
            kem_prekey: Some(taken.kem),
            kem_last_resort: taken.kem_last_resort,
        }))
    }

    /// Replaces the caller's sealed-sender access-key verifier.
    pub async fn set_access_key(&self, session: &Session, k: SetAccessKey) -> Reply {
        let account = session.account()?;
        self.prekeys.set_access_verifier(&account, &k.verifier).await?;
        self.commit.durable().await?;
        reply(Resp::AccessKeySet(AccessKeySet {}))
    }
}
