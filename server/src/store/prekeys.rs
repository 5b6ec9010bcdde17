//! Published prekeys and sealed-sender access keys.
//!
//! The relay stores public prekeys as opaque, size-checked bytes and hands them out; it verifies no prekey signature
//! (clients do, before use) and holds no secret. One-time prekeys are removed as they are handed out with a
//! compare-and-swap, so two fetches never get the same one even when they race. Layout of the `prekeys` tree:
//! `account ‖ kind (1 byte)` for the single signed prekey and last-resort KEM prekey, `account ‖ kind ‖ id (4, BE)`
//! for pooled one-time prekeys. The `access_keys` tree maps an account to the SHA-256 of its access key.

use relay_proto::wire::{KemPrekey, OneTimePrekey, SignedPrekey};
use relay_proto::{ACCOUNT_ID_LEN, AccountId};
use sha2::{Digest, Sha256};

use super::backend::{BackendError, BoxFuture, PrekeyStore};

/// Length of an X25519 public key.
pub const X25519_LEN: usize = 32;
/// Length of an ML-KEM-768 encapsulation key.
pub const KEM_PUBLIC_LEN: usize = 1184;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Most one-time prekeys of each kind kept per account.
pub const MAX_POOL: usize = 1000;

const SIGNED: u8 = 0;
const ONE_TIME: u8 = 1;
const KEM_ONE_TIME: u8 = 2;
const KEM_LAST_RESORT: u8 = 3;

/// Why a prekey operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrekeyError {
    /// A key or signature has the wrong size, or too many keys were sent.
    #[error("{0}")]
    Invalid(String),
    /// A stored record does not decode.
    #[error("corrupt prekey record")]
    Corrupt,
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] BackendError),
}

impl From<sled::Error> for PrekeyError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.into())
    }
}

/// How many prekeys an account has published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// One-time X25519 prekeys left.
    pub one_time: u32,
    /// One-time ML-KEM prekeys left.
    pub kem: u32,
    /// A signed prekey is published.
    pub signed: bool,
    /// A last-resort KEM prekey is published.
    pub last_resort: bool,
}

/// What a bundle fetch takes from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Taken {
    /// The signed prekey.
    pub signed: SignedPrekey,
    /// A one-time X25519 prekey, unless the pool was empty.
    pub one_time: Option<OneTimePrekey>,
    /// A one-time KEM prekey, or the last-resort one when the pool was empty.
    pub kem: KemPrekey,
    /// Whether `kem` is the last-resort key.
    pub kem_last_resort: bool,
}

/// The prekey and access-key trees in sled (a cheap handle: clones share the trees).
#[derive(Clone)]
pub struct SledPrekeys {
    prekeys: sled::Tree,
    access: sled::Tree,
}

fn prefix(account: &AccountId, kind: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(ACCOUNT_ID_LEN + 5);
    k.extend_from_slice(account.as_bytes());
    k.push(kind);
    k
}

fn pooled_key(account: &AccountId, kind: u8, id: u32) -> Vec<u8> {
    let mut k = prefix(account, kind);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn check_len(what: &str, got: usize, want: usize) -> Result<(), PrekeyError> {
    if got != want {
        return Err(PrekeyError::Invalid(format!("{what} must be {want} bytes, got {got}")));
    }
    Ok(())
}

fn check_kem(k: &KemPrekey) -> Result<(), PrekeyError> {
    check_len("KEM prekey", k.public_key.len(), KEM_PUBLIC_LEN)?;
    check_len("KEM prekey signature", k.signature.len(), SIGNATURE_LEN)
}

pub(crate) fn encode_kem(k: &KemPrekey) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + KEM_PUBLIC_LEN + SIGNATURE_LEN);
    v.extend_from_slice(&k.id.to_be_bytes());
    v.extend_from_slice(&k.public_key);
    v.extend_from_slice(&k.signature);
    v
}

pub(crate) fn decode_kem(v: &[u8]) -> Option<KemPrekey> {
    if v.len() != 4 + KEM_PUBLIC_LEN + SIGNATURE_LEN {
        return None;
    }
    let id = u32::from_be_bytes(v[..4].try_into().ok()?);
    let public_key = v[4..4 + KEM_PUBLIC_LEN].to_vec().into();
    let signature = v[4 + KEM_PUBLIC_LEN..].to_vec().into();
    Some(KemPrekey { id, public_key, signature })
}

/// Checks the sizes of an upload, as every backend must.
pub(crate) fn check_upload(
    signed: Option<&SignedPrekey>,
    one_time: &[OneTimePrekey],
    kem: &[KemPrekey],
    last_resort: Option<&KemPrekey>,
) -> Result<(), PrekeyError> {
    if let Some(s) = signed {
        check_len("signed prekey", s.public_key.len(), X25519_LEN)?;
        check_len("signed prekey signature", s.signature.len(), SIGNATURE_LEN)?;
    }
    for k in one_time {
        check_len("one-time prekey", k.public_key.len(), X25519_LEN)?;
    }
    for k in kem.iter().chain(last_resort) {
        check_kem(k)?;
    }
    Ok(())
}

/// Whether `access_key` hashes to the stored `verifier`, compared in constant time (the verifier is secret-derived).
pub(crate) fn access_key_matches(verifier: &[u8], access_key: &[u8]) -> bool {
    let presented = Sha256::digest(access_key);
    let diff = presented.iter().zip(verifier.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    verifier.len() == presented.len() && diff == 0
}

/// A signed prekey as stored: `id (4, BE) ‖ public key ‖ signature`.
pub(crate) fn encode_signed(s: &SignedPrekey) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + X25519_LEN + SIGNATURE_LEN);
    v.extend_from_slice(&s.id.to_be_bytes());
    v.extend_from_slice(&s.public_key);
    v.extend_from_slice(&s.signature);
    v
}

impl SledPrekeys {
    pub(crate) fn new(prekeys: sled::Tree, access: sled::Tree) -> Self {
        Self { prekeys, access }
    }

    fn upload_now(
        &self,
        account: &AccountId,
        signed: Option<&SignedPrekey>,
        one_time: &[OneTimePrekey],
        kem: &[KemPrekey],
        last_resort: Option<&KemPrekey>,
    ) -> Result<Counts, PrekeyError> {
        check_upload(signed, one_time, kem, last_resort)?;
        let before = self.counts_now(account)?;
        let after = |held: u32, added: usize| usize::try_from(held).unwrap_or(usize::MAX).saturating_add(added);
        if after(before.one_time, one_time.len()) > MAX_POOL || after(before.kem, kem.len()) > MAX_POOL {
            return Err(PrekeyError::Invalid(format!("at most {MAX_POOL} one-time prekeys of each kind")));
        }
        let mut batch = sled::Batch::default();
        if let Some(s) = signed {
            batch.insert(prefix(account, SIGNED), encode_signed(s));
        }
        for k in one_time {
            batch.insert(pooled_key(account, ONE_TIME, k.id), k.public_key.to_vec());
        }
        for k in kem {
            batch.insert(pooled_key(account, KEM_ONE_TIME, k.id), encode_kem(k));
        }
        if let Some(k) = last_resort {
            batch.insert(prefix(account, KEM_LAST_RESORT), encode_kem(k));
        }
        self.prekeys.apply_batch(batch)?;
        self.counts_now(account)
    }

    fn counts_now(&self, account: &AccountId) -> Result<Counts, PrekeyError> {
        let count = |kind| -> Result<u32, sled::Error> {
            let mut n = 0u32;
            for item in self.prekeys.scan_prefix(prefix(account, kind)) {
                item?;
                n += 1;
            }
            Ok(n)
        };
        Ok(Counts {
            one_time: count(ONE_TIME)?,
            kem: count(KEM_ONE_TIME)?,
            signed: self.prekeys.contains_key(prefix(account, SIGNED))?,
            last_resort: self.prekeys.contains_key(prefix(account, KEM_LAST_RESORT))?,
        })
    }

    /// Removes and returns the lowest-id pooled prekey of `kind`, racing safely with other takers.
    fn take_pooled(&self, account: &AccountId, kind: u8) -> Result<Option<(u32, sled::IVec)>, PrekeyError> {
        loop {
            let Some(item) = self.prekeys.scan_prefix(prefix(account, kind)).next() else { return Ok(None) };
            let (k, v) = item?;
            if self.prekeys.compare_and_swap(&k, Some(&v), None::<&[u8]>)?.is_err() {
                continue; // another fetch took it first
            }
            let id = k.get(ACCOUNT_ID_LEN + 1..).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
            return id.map(|id| Some((id, v))).ok_or(PrekeyError::Corrupt);
        }
    }

    fn take_bundle_now(&self, account: &AccountId) -> Result<Option<Taken>, PrekeyError> {
        let Some(sv) = self.prekeys.get(prefix(account, SIGNED))? else { return Ok(None) };
        if sv.len() != 4 + X25519_LEN + SIGNATURE_LEN {
            return Err(PrekeyError::Corrupt);
        }
        let signed = SignedPrekey {
            id: u32::from_be_bytes(sv[..4].try_into().map_err(|_| PrekeyError::Corrupt)?),
            public_key: sv[4..4 + X25519_LEN].to_vec().into(),
            signature: sv[4 + X25519_LEN..].to_vec().into(),
        };
        let (kem, kem_last_resort) = match self.take_pooled(account, KEM_ONE_TIME)? {
            Some((_, v)) => (decode_kem(&v).ok_or(PrekeyError::Corrupt)?, false),
            None => match self.prekeys.get(prefix(account, KEM_LAST_RESORT))? {
                Some(v) => (decode_kem(&v).ok_or(PrekeyError::Corrupt)?, true),
                None => return Ok(None),
            },
        };
        let one_time =
            self.take_pooled(account, ONE_TIME)?.map(|(id, v)| OneTimePrekey { id, public_key: v.to_vec().into() });
        Ok(Some(Taken { signed, one_time, kem, kem_last_resort }))
    }

    fn set_access_verifier_now(&self, account: &AccountId, verifier: &[u8]) -> Result<(), PrekeyError> {
        check_len("access key verifier", verifier.len(), 32)?;
        self.access.insert(account.as_bytes(), verifier)?;
        Ok(())
    }

    fn forget_now(&self, account: &AccountId) -> Result<(), PrekeyError> {
        let mut batch = sled::Batch::default();
        for item in self.prekeys.scan_prefix(account.as_bytes()) {
            batch.remove(item?.0);
        }
        self.prekeys.apply_batch(batch)?;
        self.access.remove(account.as_bytes())?;
        Ok(())
    }

    fn access_allowed_now(&self, account: &AccountId, access_key: &[u8]) -> Result<bool, PrekeyError> {
        Ok(self.access.get(account.as_bytes())?.is_some_and(|verifier| access_key_matches(&verifier, access_key)))
    }
}

impl PrekeyStore for SledPrekeys {
    fn upload<'a>(
        &'a self,
        account: &'a AccountId,
        signed: Option<&'a SignedPrekey>,
        one_time: &'a [OneTimePrekey],
        kem: &'a [KemPrekey],
        last_resort: Option<&'a KemPrekey>,
    ) -> BoxFuture<'a, Result<Counts, PrekeyError>> {
        Box::pin(std::future::ready(self.upload_now(account, signed, one_time, kem, last_resort)))
    }

    fn counts<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Counts, PrekeyError>> {
        Box::pin(std::future::ready(self.counts_now(account)))
    }

    fn take_bundle<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<Taken>, PrekeyError>> {
        Box::pin(std::future::ready(self.take_bundle_now(account)))
    }

    fn set_access_verifier<'a>(
        &'a self,
        account: &'a AccountId,
        verifier: &'a [u8],
    ) -> BoxFuture<'a, Result<(), PrekeyError>> {
        Box::pin(std::future::ready(self.set_access_verifier_now(account, verifier)))
    }

    fn forget<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<(), PrekeyError>> {
        Box::pin(std::future::ready(self.forget_now(account)))
    }

    fn access_allowed<'a>(
        &'a self,
        account: &'a AccountId,
        access_key: &'a [u8],
    ) -> BoxFuture<'a, Result<bool, PrekeyError>> {
        Box::pin(std::future::ready(self.access_allowed_now(account, access_key)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::conformance::prekeys as suite;

    fn fresh() -> crate::store::Prekeys {
        let db = sled::Config::new().temporary(true).open().expect("open");
        Arc::new(SledPrekeys::new(db.open_tree("p").expect("tree"), db.open_tree("a").expect("tree")))
    }

    #[tokio::test]
    async fn conformance() {
        suite::run_all(&fresh).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance_racing_fetches() {
        suite::racing_fetches_never_share_a_one_time_key(&fresh()).await;
    }
}
