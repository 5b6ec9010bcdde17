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

use prost::Message;
use relay_proto::auth::{KEY_LEN, SIGNATURE_LEN};
use relay_proto::wire::DeviceInfo;
use relay_proto::{AccountId, PhoneNumber};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

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
    Store(#[from] sled::Error),
}

/// The identity-keys tree alone: what authentication and routing need, and all the message path may hold. It has
/// no way to reach a phone number or device info (invariant 2: a type fact).
#[derive(Clone)]
pub struct Identities {
    tree: sled::Tree,
}

impl Identities {
    /// Public keys of `account`, if it exists.
    pub fn keys(&self, account: &AccountId) -> Result<Option<AccountKeys>, DirectoryError> {
        match self.tree.get(account.as_bytes())? {
            Some(v) => AccountKeys::from_bytes(&v).map(Some).ok_or(DirectoryError::Corrupt),
            None => Ok(None),
        }
    }

    /// Whether `account` exists.
    pub fn exists(&self, account: &AccountId) -> Result<bool, DirectoryError> {
        Ok(self.tree.contains_key(account.as_bytes())?)
    }
}

/// The directory trees (a cheap handle: clones share the trees).
#[derive(Clone)]
pub struct Directory {
    identities: Identities,
    profiles: sled::Tree,
    phones: sled::Tree,
    subjects: sled::Tree,
}

impl Directory {
    pub(crate) fn new(identities: sled::Tree, profiles: sled::Tree, phones: sled::Tree, subjects: sled::Tree) -> Self {
        Self { identities: Identities { tree: identities }, profiles, phones, subjects }
    }

    /// A handle on the identity keys alone, for code that must not read personal data.
    pub fn identities(&self) -> Identities {
        self.identities.clone()
    }

    /// Creates the account of `keys.identity_key`, or updates its sealing key, phone and device info, on the
    /// grounds of `claim` (see [`Claim`]). Not yet durable: await the group commit before acknowledging.
    pub fn register(
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

    /// Public keys of `account`, if it exists.
    pub fn keys(&self, account: &AccountId) -> Result<Option<AccountKeys>, DirectoryError> {
        self.identities.keys(account)
    }

    /// The profile (phone number and device info) of `account`, if it exists. Personal data: only the export
    /// interface reads it, never the message path.
    pub fn profile(&self, account: &AccountId) -> Result<Option<AccountProfile>, DirectoryError> {
        let Some(v) = self.profiles.get(account.as_bytes())? else { return Ok(None) };
        let p = Profile::decode(v.as_ref()).map_err(|_| DirectoryError::Corrupt)?;
        Ok(Some(AccountProfile { phone: p.phone, device: p.device.unwrap_or_default() }))
    }

    /// Up to `limit` accounts whose phone number or device info changed after cursor `after` (0: from the start),
    /// oldest first, each with its cursor.
    pub fn subject_changes(&self, after: u64, limit: usize) -> Result<Vec<(u64, AccountId)>, DirectoryError> {
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

    /// Removes `account` from the directory: its keys, its profile and its number's mapping (the number can then be
    /// registered again). Returns the number it held, if any. Not yet durable: await the group commit.
    pub fn remove(&self, account: &AccountId) -> Result<Option<PhoneNumber>, DirectoryError> {
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

    /// The account registered with `phone` and its keys.
    pub fn lookup(&self, phone: &PhoneNumber) -> Result<Option<(AccountId, AccountKeys)>, DirectoryError> {
        let Some(id) = self.phones.get(phone.as_str())? else { return Ok(None) };
        let account = AccountId::from_slice(&id).ok_or(DirectoryError::Corrupt)?;
        Ok(self.keys(&account)?.map(|k| (account, k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory() -> Directory {
        let db = sled::Config::new().temporary(true).open().expect("open");
        Directory::new(
            db.open_tree("i").expect("tree"),
            db.open_tree("p").expect("tree"),
            db.open_tree("n").expect("tree"),
            db.open_tree("s").expect("tree"),
        )
    }

    fn keys(n: u8) -> AccountKeys {
        AccountKeys { identity_key: [n; 32], sealing_key: [n + 100; 32], sealing_key_signature: Some([n; 64]) }
    }

    #[test]
    fn key_records_with_and_without_a_binding_decode_and_others_do_not() {
        let k = keys(1);
        assert_eq!(AccountKeys::from_bytes(&k.to_bytes()), Some(k));
        let old = AccountKeys { sealing_key_signature: None, ..k };
        assert_eq!(old.to_bytes().len(), 64, "the layout written before bindings existed");
        assert_eq!(AccountKeys::from_bytes(&old.to_bytes()), Some(old));
        assert_eq!(AccountKeys::from_bytes(&k.to_bytes()[..100]), None);
        assert_eq!(AccountKeys::from_bytes(&[0; 63]), None);
    }

    /// A first-come registration: (account, created).
    fn first_come(
        d: &Directory,
        keys: AccountKeys,
        phone: &PhoneNumber,
        device: DeviceInfo,
        now: u64,
    ) -> Result<(AccountId, bool), DirectoryError> {
        d.register(keys, phone, device, now, Claim::FirstCome).map(|r| (r.account, r.created))
    }

    #[test]
    fn register_lookup_update_and_phone_ownership() {
        let d = directory();
        let p1 = PhoneNumber::parse("+33612345678").expect("valid");
        let p2 = PhoneNumber::parse("+33698765432").expect("valid");
        let (a, created) = first_come(&d, keys(1), &p1, DeviceInfo::default(), 1).expect("register");
        assert!(created);
        assert_eq!(d.lookup(&p1).expect("lookup"), Some((a, keys(1))));
        assert!(matches!(first_come(&d, keys(2), &p1, DeviceInfo::default(), 2), Err(DirectoryError::PhoneTaken)));
        // The same identity moves to a new number: the old one is released.
        let (a2, created) = first_come(&d, keys(1), &p2, DeviceInfo::default(), 3).expect("update");
        assert_eq!((a2, created), (a, false));
        assert_eq!(d.lookup(&p1).expect("lookup"), None);
        let (b, _) = first_come(&d, keys(2), &p1, DeviceInfo::default(), 4).expect("number is free again");
        assert!(d.identities().exists(&b).expect("exists"));
        assert!(!d.identities().exists(&AccountId([9; 16])).expect("exists"));
        assert_eq!(d.profile(&a).expect("profile").map(|p| p.phone), Some(p2.as_str().to_owned()));
        assert_eq!(d.profile(&AccountId([9; 16])).expect("profile"), None);
    }

    #[test]
    fn changed_phone_or_device_is_recorded_in_order_and_a_plain_reregistration_is_not() {
        let d = directory();
        let p1 = PhoneNumber::parse("+33612345678").expect("valid");
        let p2 = PhoneNumber::parse("+33698765432").expect("valid");
        let pixel = DeviceInfo { model: "Pixel 8".into(), os: "Android 15".into(), app_version: "1.0".into() };
        let (a, _) = first_come(&d, keys(1), &p1, pixel.clone(), 1).expect("register");
        let (b, _) = first_come(&d, keys(2), &p2, pixel.clone(), 1).expect("register");
        assert!(d.subject_changes(0, 10).expect("changes").is_empty(), "a first registration is not a change");
        first_come(&d, keys(1), &p1, pixel.clone(), 2).expect("same again");
        assert!(d.subject_changes(0, 10).expect("changes").is_empty(), "nothing changed");
        let newer = DeviceInfo { app_version: "1.1".into(), ..pixel.clone() };
        first_come(&d, keys(1), &p1, newer, 3).expect("new version");
        first_come(&d, keys(2), &PhoneNumber::parse("+33600000000").expect("valid"), pixel, 3).expect("new number");
        assert_eq!(d.subject_changes(0, 10).expect("changes"), [(1, a), (2, b)]);
        assert_eq!(d.subject_changes(1, 10).expect("changes"), [(2, b)]);
        assert_eq!(d.subject_changes(0, 1).expect("changes"), [(1, a)]);
        assert!(d.subject_changes(2, 10).expect("changes").is_empty());
    }

    #[test]
    fn a_verified_claim_takes_the_number_over_and_removes_the_old_account() {
        let d = directory();
        let phone = PhoneNumber::parse("+33612345678").expect("valid");
        let (squatter, _) = first_come(&d, keys(1), &phone, DeviceInfo::default(), 1).expect("first come");
        let owner = AccountId::from_identity_key(&keys(2).identity_key);
        let stale = Claim::Verified { holder: None };
        let refused = d.register(keys(2), &phone, DeviceInfo::default(), 2, stale);
        assert!(matches!(refused, Err(DirectoryError::HolderChanged)), "{refused:?}");
        let claim = Claim::Verified { holder: Some(squatter) };
        let r = d.register(keys(2), &phone, DeviceInfo::default(), 2, claim).expect("takeover");
        assert_eq!(r, Registered { account: owner, created: true, displaced: Some(squatter) });
        assert_eq!(d.lookup(&phone).expect("lookup").map(|(a, _)| a), Some(owner));
        assert_eq!(d.keys(&squatter).expect("keys"), None, "the old key no longer authenticates");
        assert_eq!(d.profile(&squatter).expect("profile"), None, "nothing of the old account can be exported");
        assert!(!d.identities().exists(&squatter).expect("exists"), "and it receives nothing");
        // A claim on one's own number displaces nobody.
        let r = d.register(keys(2), &phone, DeviceInfo::default(), 3, Claim::Verified { holder: Some(owner) });
        assert_eq!(r.expect("own number").displaced, None);
    }
}
