//! The directory: accounts, their public keys, phone numbers and device info.
//!
//! Keys (what authentication and routing need) live in their own tree, apart from the profile (phone number and
//! device info), so that the message path can check that a recipient exists without reading personal data.
//! A phone number maps to at most one account. Registering a number held by another identity key is refused
//! ([`Claim::FirstCome`]) unless the number was verified ([`Claim::Verified`], see `verify`): then the new identity
//! takes it over and the account that held it is removed (keys and profile), in the same transaction, so that no
//! grant of the old account can export the number any more and its key no longer authenticates.
//!
//! A re-registration that changes the phone number or the device info of an existing account is also recorded in
//! the subject-changes tree (`0` → last cursor; `1 ‖ cursor (BE)` → account id), inside the same transaction that
//! reads and bumps the last cursor, so cursors become visible in order and the export interface can page through
//! them without missing one.

use std::sync::Arc;

use prost::Message;
use relay_proto::auth::{KEY_LEN, SIGNATURE_LEN};
use relay_proto::wire::DeviceInfo;
use relay_proto::{AccountId, PhoneNumber};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::backend::{BackendError, BoxFuture, DirectoryStore, Identities, IdentityStore};

/// Public keys of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountKeys {
    /// Ed25519 identity key.
    pub identity_key: [u8; KEY_LEN],
    /// X25519 key that envelopes are sealed to.
    pub sealing_key: [u8; KEY_LEN],
    /// The identity key's signature binding the sealing key to it (`relay_proto::identity`), checked at
    /// registration. `None` only for accounts registered before bindings existed: clients refuse their keys until
    /// they register again.
    pub sealing_key_signature: Option<[u8; SIGNATURE_LEN]>,
}

impl AccountKeys {
    /// `identity key ‖ sealing key [‖ binding signature]`: records written before bindings existed stop after the
    /// two keys.
    fn to_bytes(self) -> Vec<u8> {
        let signature = self.sealing_key_signature.as_ref().map_or(&[][..], |s| &s[..]);
        [&self.identity_key[..], &self.sealing_key, signature].concat()
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        let identity_key = b.get(..KEY_LEN)?.try_into().ok()?;
        let sealing_key = b.get(KEY_LEN..2 * KEY_LEN)?.try_into().ok()?;
        let sealing_key_signature = match b.len() {
            n if n == 2 * KEY_LEN => None,
            n if n == 2 * KEY_LEN + SIGNATURE_LEN => Some(b.get(2 * KEY_LEN..)?.try_into().ok()?),
            _ => return None,
        };
        Some(Self { identity_key, sealing_key, sealing_key_signature })
    }
}

const LAST_SUBJECT_CURSOR: u8 = 0;
const SUBJECT_CHANGE: u8 = 1;

fn subject_key(cursor: u64) -> [u8; 9] {
    let mut k = [SUBJECT_CHANGE; 9];
    k[1..].copy_from_slice(&cursor.to_be_bytes());
    k
}

/// Stored profile of an account (personal data).
#[derive(Clone, PartialEq, Message)]
struct Profile {
    #[prost(string, tag = "1")]
    phone: String,
    #[prost(message, optional, tag = "2")]
    device: Option<DeviceInfo>,
    #[prost(uint64, tag = "3")]
    registered_at_ms: u64,
}

/// The personal data of an account, as the export interface hands it out where consent is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountProfile {
    /// E.164 phone number.
    pub phone: String,
    /// Device info given at the last registration.
    pub device: DeviceInfo,
}

/// On what grounds an identity registers a phone number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// No proof of the number (the `open` verifier, or the number this identity already holds): refused if
    /// another identity holds it.
    FirstCome,
    /// The number was proven with a code (and any registration lock passed) while `holder` held it: takes it over
    /// from `holder`. If another account holds it by the time of the write, the claim is refused (the lock check
    /// was about `holder`).
    Verified {
        /// The account that held the number when the claim was checked.
        holder: Option<AccountId>,
    },
}

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The registering identity's account.
    pub account: AccountId,
    /// Whether the account was created (false: it existed and was updated).
    pub created: bool,
    /// The account that held the number before and was removed by this takeover.
    pub displaced: Option<AccountId>,
}

/// Why a directory operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// The phone number belongs to another account.
    #[error("phone number already registered to another account")]
    PhoneTaken,
    /// The number changed hands between the verification of a claim and its write.
    #[error("the phone number changed hands during this registration; try again")]
    HolderChanged,
    /// A stored record does not decode.
    #[error("corrupt directory record")]
    Corrupt,
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] BackendError),
}

impl From<sled::Error> for DirectoryError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.into())
    }
}

/// The identity-keys tree alone: what authentication and routing need, and all the message path may hold. It has
/// no way to reach a phone number or device info (invariant 2: a type fact).
#[derive(Clone)]
pub struct SledIdentities {
    tree: sled::Tree,
}

impl SledIdentities {
    fn keys_now(&self, account: &AccountId) -> Result<Option<AccountKeys>, DirectoryError> {
        match self.tree.get(account.as_bytes())? {
            Some(v) => AccountKeys::from_bytes(&v).map(Some).ok_or(DirectoryError::Corrupt),
            None => Ok(None),
        }
    }
}

impl IdentityStore for SledIdentities {
    fn keys<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<AccountKeys>, DirectoryError>> {
        Box::pin(std::future::ready(self.keys_now(account)))
    }

    fn exists<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<bool, DirectoryError>> {
        Box::pin(std::future::ready(self.tree.contains_key(account.as_bytes()).map_err(Into::into)))
    }
}

/// The directory in sled trees (a cheap handle: clones share the trees).
#[derive(Clone)]
pub struct SledDirectory {
    identities: SledIdentities,
    profiles: sled::Tree,
    phones: sled::Tree,
    subjects: sled::Tree,
}

impl SledDirectory {
    pub(crate) fn new(identities: sled::Tree, profiles: sled::Tree, phones: sled::Tree, subjects: sled::Tree) -> Self {
        Self { identities: SledIdentities { tree: identities }, profiles, phones, subjects }
    }

    fn register_now(
        &self,
        keys: AccountKeys,
        phone: &PhoneNumber,
        device: DeviceInfo,
        now_ms: u64,
        claim: Claim,
    ) -> Result<Registered, DirectoryError> {
        let account = AccountId::from_identity_key(&keys.identity_key);
        let abort = ConflictableTransactionError::Abort;
        let trees = (&self.identities.tree, &self.profiles, &self.phones, &self.subjects);
        let result = trees.transaction(|(ids, profiles, phones, subjects)| {
            let mut displaced = None;
            if let Some(owner) = phones.get(phone.as_str())?
                && owner.as_ref() != account.as_bytes()
            {
                let owner = AccountId::from_slice(&owner).ok_or(abort(DirectoryError::Corrupt))?;
                match claim {
                    Claim::FirstCome => return Err(abort(DirectoryError::PhoneTaken)),
                    Claim::Verified { holder } if holder != Some(owner) => {
                        return Err(abort(DirectoryError::HolderChanged));
                    }
                    Claim::Verified { .. } => {
                        // The old account goes: its profile (so no grant of it can export the number), its keys
                        // (so it can no longer authenticate or receive).
                        ids.remove(owner.as_bytes())?;
                        profiles.remove(owner.as_bytes())?;
                        displaced = Some(owner);
                    }
                }
            }
            let previous = profiles.get(account.as_bytes())?;
            let mut registered_at_ms = now_ms;
            if let Some(prev) = &previous {
                let prev = Profile::decode(prev.as_ref()).map_err(|_| abort(DirectoryError::Corrupt))?;
                if prev.phone != phone.as_str() {
                    phones.remove(prev.phone.as_bytes())?;
                }
                registered_at_ms = prev.registered_at_ms;
                if prev.phone != phone.as_str() || prev.device.as_ref() != Some(&device) {
                    let last = match subjects.get([LAST_SUBJECT_CURSOR])? {
                        Some(v) => {
                            u64::from_be_bytes(v.as_ref().try_into().map_err(|_| abort(DirectoryError::Corrupt))?)
                        }
                        None => 0,
                    };
                    // Stored values are checked like input: a damaged counter is reported, never wrapped.
                    let cursor =
                        last.checked_add(1).ok_or(ConflictableTransactionError::Abort(DirectoryError::Corrupt))?;
                    subjects.insert(&[LAST_SUBJECT_CURSOR][..], &cursor.to_be_bytes()[..])?;
                    subjects.insert(&subject_key(cursor)[..], &account.as_bytes()[..])?;
                }
            }
            let profile = Profile { phone: phone.as_str().to_owned(), device: Some(device.clone()), registered_at_ms };
            ids.insert(&account.as_bytes()[..], &keys.to_bytes()[..])?;
            profiles.insert(&account.as_bytes()[..], profile.encode_to_vec())?;
            phones.insert(phone.as_str(), &account.as_bytes()[..])?;
            Ok(Registered { account, created: previous.is_none(), displaced })
        });
        match result {
            Ok(r) => Ok(r),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn profile_now(&self, account: &AccountId) -> Result<Option<AccountProfile>, DirectoryError> {
        let Some(v) = self.profiles.get(account.as_bytes())? else { return Ok(None) };
        let p = Profile::decode(v.as_ref()).map_err(|_| DirectoryError::Corrupt)?;
        Ok(Some(AccountProfile { phone: p.phone, device: p.device.unwrap_or_default() }))
    }

    fn subject_changes_now(&self, after: u64, limit: usize) -> Result<Vec<(u64, AccountId)>, DirectoryError> {
        let start = subject_key(after.saturating_add(1));
        let mut out = Vec::new();
        for item in self.subjects.range(start..).take(limit) {
            let (k, v) = item?;
            let cursor = k.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
            match (cursor, AccountId::from_slice(&v)) {
                (Some(cursor), Some(account)) => out.push((cursor, account)),
                _ => return Err(DirectoryError::Corrupt),
            }
        }
        Ok(out)
    }

    fn remove_now(&self, account: &AccountId) -> Result<Option<PhoneNumber>, DirectoryError> {
        let abort = ConflictableTransactionError::Abort;
        let trees = (&self.identities.tree, &self.profiles, &self.phones);
        let result = trees.transaction(|(ids, profiles, phones)| {
            ids.remove(account.as_bytes())?;
            let Some(prev) = profiles.remove(account.as_bytes())? else { return Ok(None) };
            let prev = Profile::decode(prev.as_ref()).map_err(|_| abort(DirectoryError::Corrupt))?;
            if phones.get(prev.phone.as_bytes())?.is_some_and(|owner| owner.as_ref() == account.as_bytes()) {
                phones.remove(prev.phone.as_bytes())?;
            }
            Ok(PhoneNumber::parse(&prev.phone).ok())
        });
        match result {
            Ok(r) => Ok(r),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn lookup_now(&self, phone: &PhoneNumber) -> Result<Option<(AccountId, AccountKeys)>, DirectoryError> {
        let Some(id) = self.phones.get(phone.as_str())? else { return Ok(None) };
        let account = AccountId::from_slice(&id).ok_or(DirectoryError::Corrupt)?;
        Ok(self.identities.keys_now(&account)?.map(|k| (account, k)))
    }
}

impl DirectoryStore for SledDirectory {
    fn identities(&self) -> Identities {
        Arc::new(self.identities.clone())
    }

    fn register<'a>(
        &'a self,
        keys: AccountKeys,
        phone: &'a PhoneNumber,
        device: DeviceInfo,
        now_ms: u64,
        claim: Claim,
    ) -> BoxFuture<'a, Result<Registered, DirectoryError>> {
        Box::pin(std::future::ready(self.register_now(keys, phone, device, now_ms, claim)))
    }

    fn keys<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<AccountKeys>, DirectoryError>> {
        Box::pin(std::future::ready(self.identities.keys_now(account)))
    }

    fn profile<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<AccountProfile>, DirectoryError>> {
        Box::pin(std::future::ready(self.profile_now(account)))
    }

    fn subject_changes(
        &self,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(u64, AccountId)>, DirectoryError>> {
        Box::pin(std::future::ready(self.subject_changes_now(after, limit)))
    }

    fn remove<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<PhoneNumber>, DirectoryError>> {
        Box::pin(std::future::ready(self.remove_now(account)))
    }

    fn lookup<'a>(
        &'a self,
        phone: &'a PhoneNumber,
    ) -> BoxFuture<'a, Result<Option<(AccountId, AccountKeys)>, DirectoryError>> {
        Box::pin(std::future::ready(self.lookup_now(phone)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::directory as suite;

    #[test]
    fn key_records_with_and_without_a_binding_decode_and_others_do_not() {
        let k = suite::keys(1);
        assert_eq!(AccountKeys::from_bytes(&k.to_bytes()), Some(k));
        let old = AccountKeys { sealing_key_signature: None, ..k };
        assert_eq!(old.to_bytes().len(), 64, "the layout written before bindings existed");
        assert_eq!(AccountKeys::from_bytes(&old.to_bytes()), Some(old));
        assert_eq!(AccountKeys::from_bytes(&k.to_bytes()[..100]), None);
        assert_eq!(AccountKeys::from_bytes(&[0; 63]), None);
    }

    fn fresh() -> crate::store::Directory {
        let db = sled::Config::new().temporary(true).open().expect("open");
        Arc::new(SledDirectory::new(
            db.open_tree("i").expect("tree"),
            db.open_tree("p").expect("tree"),
            db.open_tree("n").expect("tree"),
            db.open_tree("s").expect("tree"),
        ))
    }

    #[tokio::test]
    async fn conformance() {
        suite::run_all(&fresh).await;
    }
}
