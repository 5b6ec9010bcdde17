//! The device's prekeys: what a peer fetches (as a [`PrekeyBundle`]) to start a session with this device while it
//! is offline, and the secrets this device needs to answer.
//!
//! Kinds, each with its own `u32` id space (ids start at 1 and are never reused while a key of that kind is held):
//! - one signed X25519 prekey. [`PrekeyStore::rotate_signed_prekey`] replaces it and keeps the previous one for
//!   [`SIGNED_PREKEY_GRACE_MS`] (the relay's default message lifetime), so initial messages already in flight still
//!   decrypt; [`PrekeyStore::expire_signed_prekeys`] drops it afterwards;
//! - a pool of one-time X25519 prekeys (unsigned, as in PQXDH): each is removed when used;
//! - a pool of signed one-time ML-KEM-768 prekeys, removed when used, and one signed last-resort ML-KEM-768 prekey,
//!   used when the pool is empty and never removed. One-time and last-resort KEM keys share one id space because an
//!   initial message names the KEM key by id alone.
//!
//! Signatures are Ed25519 by the identity key over `"ConsentRelay_Prekey_v1" ‖ kind (1 byte: 1 signed X25519,
//! 2 one-time ML-KEM, 3 last-resort ML-KEM) ‖ id (u32, big-endian) ‖ public key`. The kind separates the three
//! uses, so a signature cannot be moved from one kind of key to another, nor turn a one-time key into a
//! last-resort one.
//!
//! Secrets are `serde`-serializable (hex) so the caller can persist the store in a 0600 file; `Debug` shows ids and
//! counts only. ML-KEM secrets are kept as their 64-byte seeds, the public key is derived again when needed.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, VerifyingKey};
use ml_kem::{DecapsulationKey768, EncapsulationKey768, Generate, KeyExport};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};

use super::{E2eeError, PrekeyKind, Secret, hex_bytes};
use crate::identity::Identity;

/// How long a replaced signed prekey still answers initial messages: the relay's default message lifetime.
pub const SIGNED_PREKEY_GRACE_MS: u64 = 30 * 24 * 3600 * 1000;
/// Size of an ML-KEM-768 public (encapsulation) key.
pub const KEM_PUBLIC_LEN: usize = 1184;
/// Size of an ML-KEM-768 ciphertext.
pub const KEM_CIPHERTEXT_LEN: usize = 1088;

const SIGNATURE_LABEL: &[u8] = b"ConsentRelay_Prekey_v1";
/// Kind byte of a signed X25519 prekey in [`signed_bytes`].
pub const KIND_SIGNED: u8 = 1;
/// Kind byte of a one-time ML-KEM-768 prekey in [`signed_bytes`].
pub const KIND_KEM_ONE_TIME: u8 = 2;
/// Kind byte of the last-resort ML-KEM-768 prekey in [`signed_bytes`].
pub const KIND_KEM_LAST_RESORT: u8 = 3;

/// A signed X25519 prekey, as uploaded and as found in a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPrekey {
    /// Id, unique among this device's signed prekeys.
    pub id: u32,
    /// X25519 public key.
    #[serde(with = "hex_bytes")]
    pub public: [u8; 32],
    /// Ed25519 signature by the identity key (see the module header).
    #[serde(with = "hex_bytes")]
    pub signature: [u8; 64],
}

/// A one-time X25519 prekey (unsigned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimePrekey {
    /// Id, unique among this device's one-time prekeys.
    pub id: u32,
    /// X25519 public key.
    #[serde(with = "hex_bytes")]
    pub public: [u8; 32],
}

/// A signed ML-KEM-768 prekey, one-time or last resort.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKemPrekey {
    /// Id, unique among this device's ML-KEM prekeys (one-time and last resort together).
    pub id: u32,
    /// ML-KEM-768 encapsulation key, [`KEM_PUBLIC_LEN`] bytes.
    #[serde(with = "hex_bytes")]
    pub public: Vec<u8>,
    /// Ed25519 signature by the identity key; covers `last_resort` through the signed kind.
    #[serde(with = "hex_bytes")]
    pub signature: [u8; 64],
    /// True for the last-resort key, handed out when the one-time pool is empty and never consumed.
    pub last_resort: bool,
}

/// What a peer fetches to start a session with a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrekeyBundle {
    /// The device's Ed25519 identity key; signs the prekeys.
    #[serde(with = "hex_bytes")]
    pub identity_key: [u8; 32],
    /// The device's X25519 identity key (IK in PQXDH).
    #[serde(with = "hex_bytes")]
    pub identity_dh_key: [u8; 32],
    /// The identity key's signature binding `identity_dh_key` to it (`relay_proto::identity`).
    #[serde(with = "hex_bytes")]
    pub identity_dh_signature: [u8; 64],
    /// The current signed prekey.
    pub signed_prekey: SignedPrekey,
    /// A one-time prekey, absent when the device's pool is empty.
    pub one_time_prekey: Option<OneTimePrekey>,
    /// A one-time ML-KEM prekey, or the last-resort one when the pool is empty.
    pub kem_prekey: SignedKemPrekey,
}

/// The bytes the identity key signs for a prekey (see the module header). Public for test vectors.
pub fn signed_bytes(kind: u8, id: u32, public: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNATURE_LABEL.len() + 5 + public.len());
    out.extend_from_slice(SIGNATURE_LABEL);
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(public);
    out
}

fn verify(key: &VerifyingKey, kind: u8, id: u32, public: &[u8], signature: &[u8; 64]) -> Result<(), E2eeError> {
    key.verify_strict(&signed_bytes(kind, id, public), &Signature::from_bytes(signature))
        .map_err(|_| E2eeError::BadSignature)
}

/// Checks a fetched bundle before any of its keys is used: sizes, the binding of the X25519 identity key and both
/// prekey signatures, all against the bundle's Ed25519 identity key. Whether that identity key is the right
/// person's is for the safety number to tell.
pub fn verify_bundle(bundle: &PrekeyBundle) -> Result<(), E2eeError> {
    if bundle.kem_prekey.public.len() != KEM_PUBLIC_LEN {
        return Err(E2eeError::Malformed("ML-KEM prekey"));
    }
    relay_proto::identity::verify_binding(&bundle.identity_key, &bundle.identity_dh_key, &bundle.identity_dh_signature)
        .map_err(|_| E2eeError::BadSignature)?;
    let key = VerifyingKey::from_bytes(&bundle.identity_key).map_err(|_| E2eeError::BadSignature)?;
    let spk = &bundle.signed_prekey;
    verify(&key, KIND_SIGNED, spk.id, &spk.public, &spk.signature)?;
    let kem = &bundle.kem_prekey;
    let kind = if kem.last_resort { KIND_KEM_LAST_RESORT } else { KIND_KEM_ONE_TIME };
    verify(&key, kind, kem.id, &kem.public, &kem.signature)
}

/// Parses a verified ML-KEM public key.
pub(crate) fn kem_public(bytes: &[u8]) -> Result<EncapsulationKey768, E2eeError> {
    let key = bytes.try_into().map_err(|_| E2eeError::Malformed("ML-KEM prekey"))?;
    EncapsulationKey768::new(key).map_err(|_| E2eeError::Malformed("ML-KEM prekey"))
}

#[derive(Clone, Serialize, Deserialize)]
struct SignedEntry {
    id: u32,
    secret: Secret<32>,
    #[serde(with = "hex_bytes")]
    public: [u8; 32],
    #[serde(with = "hex_bytes")]
    signature: [u8; 64],
    /// When it stopped being the current one; `None` while current.
    retired_at_ms: Option<u64>,
}

impl SignedEntry {
    fn generate(identity: &Identity, id: u32) -> Self {
        let secret = StaticSecret::random_from_rng(&mut rand::rng());
        let public = PublicKey::from(&secret).to_bytes();
        let signature = identity.sign(&signed_bytes(KIND_SIGNED, id, &public));
        Self { id, secret: Secret::new(secret.to_bytes()), public, signature, retired_at_ms: None }
    }

    fn upload(&self) -> SignedPrekey {
        SignedPrekey { id: self.id, public: self.public, signature: self.signature }
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct KemEntry {
    id: u32,
    seed: Secret<64>,
    #[serde(with = "hex_bytes")]
    signature: [u8; 64],
}

impl KemEntry {
    fn generate(identity: &Identity, id: u32, last_resort: bool) -> (Self, SignedKemPrekey) {
        let dk = DecapsulationKey768::generate_from_rng(&mut rand::rng());
        let public = dk.encapsulation_key().to_bytes().to_vec();
        let kind = if last_resort { KIND_KEM_LAST_RESORT } else { KIND_KEM_ONE_TIME };
        let signature = identity.sign(&signed_bytes(kind, id, &public));
        // A freshly generated key always has its seed; only keys loaded from the expanded form lack one.
        let seed = Secret::new(dk.to_seed().expect("generated ML-KEM key has a seed").into());
        (Self { id, seed, signature }, SignedKemPrekey { id, public, signature, last_resort })
    }

    fn decapsulation_key(&self) -> DecapsulationKey768 {
        DecapsulationKey768::from_seed((*self.seed.as_bytes()).into())
    }

    fn upload(&self, last_resort: bool) -> SignedKemPrekey {
        let public = self.decapsulation_key().encapsulation_key().to_bytes().to_vec();
        SignedKemPrekey { id: self.id, public, signature: self.signature, last_resort }
    }
}

/// The device's prekey secrets. Persist it (serde) whenever it changes: after generation, rotation, and after
/// [`respond`](super::pqxdh::respond) consumed a one-time key.
#[derive(Clone, Serialize, Deserialize)]
pub struct PrekeyStore {
    signed: SignedEntry,
    previous_signed: Option<SignedEntry>,
    one_time: BTreeMap<u32, Secret<32>>,
    kem: BTreeMap<u32, KemEntry>,
    last_resort: KemEntry,
    next_signed_id: u32,
    next_one_time_id: u32,
    next_kem_id: u32,
}

impl std::fmt::Debug for PrekeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrekeyStore")
            .field("signed_prekey_id", &self.signed.id)
            .field("previous_signed_prekey_id", &self.previous_signed.as_ref().map(|e| e.id))
            .field("one_time_prekeys", &self.one_time.len())
            .field("kem_prekeys", &self.kem.len())
            .field("last_resort_kem_prekey_id", &self.last_resort.id)
            .finish()
    }
}

/// The next free id after `*next`, skipping 0 and ids still in use. Terminates: far fewer than 2^32 keys are held.
fn allocate(next: &mut u32, in_use: impl Fn(u32) -> bool) -> u32 {
    loop {
        let id = *next;
        *next = next.wrapping_add(1).max(1);
        if id != 0 && !in_use(id) {
            return id;
        }
    }
}

impl PrekeyStore {
    /// A new store with a signed prekey and a last-resort ML-KEM prekey, and empty one-time pools.
    pub fn generate(identity: &Identity) -> Self {
        let (last_resort, _) = KemEntry::generate(identity, 1, true);
        Self {
            signed: SignedEntry::generate(identity, 1),
            previous_signed: None,
            one_time: BTreeMap::new(),
            kem: BTreeMap::new(),
            last_resort,
            next_signed_id: 2,
            next_one_time_id: 1,
            next_kem_id: 2,
        }
    }

    /// The current signed prekey, for upload.
    pub fn signed_prekey(&self) -> SignedPrekey {
        self.signed.upload()
    }

    /// The last-resort ML-KEM prekey, for upload.
    pub fn last_resort_kem_prekey(&self) -> SignedKemPrekey {
        self.last_resort.upload(true)
    }

    /// Replaces the signed prekey with a new one (returned, for upload). The replaced one keeps answering initial
    /// messages until [`expire_signed_prekeys`](Self::expire_signed_prekeys) is called [`SIGNED_PREKEY_GRACE_MS`]
    /// after `now_ms`; a key replaced earlier than that is dropped now (only one previous key is kept).
    pub fn rotate_signed_prekey(&mut self, identity: &Identity, now_ms: u64) -> SignedPrekey {
        let (current, previous) = (self.signed.id, self.previous_signed.as_ref().map(|e| e.id));
        let id = allocate(&mut self.next_signed_id, |id| id == current || Some(id) == previous);
        let mut old = std::mem::replace(&mut self.signed, SignedEntry::generate(identity, id));
        old.retired_at_ms = Some(now_ms);
        self.previous_signed = Some(old);
        self.signed.upload()
    }

    /// Drops the previous signed prekey once its grace period is over. Returns whether one was dropped.
    pub fn expire_signed_prekeys(&mut self, now_ms: u64) -> bool {
        let expired = self
            .previous_signed
            .as_ref()
            .and_then(|e| e.retired_at_ms)
            .is_some_and(|at| now_ms.saturating_sub(at) >= SIGNED_PREKEY_GRACE_MS);
        if expired {
            self.previous_signed = None;
        }
        expired
    }

    /// Adds `n` one-time X25519 prekeys to the pool and returns their public halves for upload.
    pub fn generate_one_time(&mut self, n: usize) -> Vec<OneTimePrekey> {
        let mut rng = rand::rng();
        (0..n)
            .map(|_| {
                let pool = &self.one_time;
                let id = allocate(&mut self.next_one_time_id, |id| pool.contains_key(&id));
                let secret = StaticSecret::random_from_rng(&mut rng);
                let public = PublicKey::from(&secret).to_bytes();
                self.one_time.insert(id, Secret::new(secret.to_bytes()));
                OneTimePrekey { id, public }
            })
            .collect()
    }

    /// Adds `n` signed one-time ML-KEM-768 prekeys to the pool and returns them for upload.
    pub fn generate_kem(&mut self, identity: &Identity, n: usize) -> Vec<SignedKemPrekey> {
        (0..n)
            .map(|_| {
                let (pool, last_resort) = (&self.kem, self.last_resort.id);
                let id = allocate(&mut self.next_kem_id, |id| id == last_resort || pool.contains_key(&id));
                let (entry, upload) = KemEntry::generate(identity, id, false);
                self.kem.insert(id, entry);
                upload
            })
            .collect()
    }

    /// One-time X25519 prekeys left in the pool.
    pub fn one_time_count(&self) -> usize {
        self.one_time.len()
    }

    /// One-time ML-KEM prekeys left in the pool (the last-resort key not counted).
    pub fn kem_count(&self) -> usize {
        self.kem.len()
    }

    /// The secret of signed prekey `id`: the current one, or the previous one during its grace period. The
    /// responder's first ratchet key pair.
    pub fn signed_prekey_secret(&self, id: u32) -> Result<StaticSecret, E2eeError> {
        [Some(&self.signed), self.previous_signed.as_ref()]
            .into_iter()
            .flatten()
            .find(|e| e.id == id)
            .map(|e| StaticSecret::from(*e.secret.as_bytes()))
            .ok_or(E2eeError::MissingPrekey { kind: PrekeyKind::Signed, id })
    }

    /// The secret of one-time prekey `id`, left in the pool.
    pub(crate) fn one_time_secret(&self, id: u32) -> Result<StaticSecret, E2eeError> {
        self.one_time
            .get(&id)
            .map(|s| StaticSecret::from(*s.as_bytes()))
            .ok_or(E2eeError::MissingPrekey { kind: PrekeyKind::OneTime, id })
    }

    /// The secret of ML-KEM prekey `id` (one-time or last resort), left in the store.
    pub(crate) fn kem_secret(&self, id: u32) -> Result<DecapsulationKey768, E2eeError> {
        if id == self.last_resort.id {
            return Ok(self.last_resort.decapsulation_key());
        }
        self.kem.get(&id).map(KemEntry::decapsulation_key).ok_or(E2eeError::MissingPrekey { kind: PrekeyKind::Kem, id })
    }

    /// Removes one-time prekey `id` from the pool and returns its secret.
    pub fn take_one_time(&mut self, id: u32) -> Result<StaticSecret, E2eeError> {
        self.one_time
            .remove(&id)
            .map(|s| StaticSecret::from(*s.as_bytes()))
            .ok_or(E2eeError::MissingPrekey { kind: PrekeyKind::OneTime, id })
    }

    /// Removes one-time ML-KEM prekey `id` from the pool and returns its secret; the last-resort key is returned
    /// and kept.
    pub fn take_kem(&mut self, id: u32) -> Result<DecapsulationKey768, E2eeError> {
        if id == self.last_resort.id {
            return Ok(self.last_resort.decapsulation_key());
        }
        self.kem
            .remove(&id)
            .map(|e| e.decapsulation_key())
            .ok_or(E2eeError::MissingPrekey { kind: PrekeyKind::Kem, id })
    }

    /// A bundle as the relay would hand it out: the current signed prekey, the lowest-numbered one-time keys (if
    /// any), else the last-resort KEM key. The keys stay in the store; for tests, benchmarks and tools, since a
    /// real peer gets bundles from the relay.
    pub fn bundle(&self, identity: &Identity) -> PrekeyBundle {
        let one_time_prekey = self.one_time.iter().next().map(|(&id, secret)| OneTimePrekey {
            id,
            public: PublicKey::from(&StaticSecret::from(*secret.as_bytes())).to_bytes(),
        });
        let kem_prekey = match self.kem.values().next() {
            Some(entry) => entry.upload(false),
            None => self.last_resort.upload(true),
        };
        PrekeyBundle {
            identity_key: identity.identity_key(),
            identity_dh_key: identity.sealing_key(),
            identity_dh_signature: identity.sealing_key_signature(),
            signed_prekey: self.signed.upload(),
            one_time_prekey,
            kem_prekey,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_verifies_and_any_flipped_bit_is_refused() {
        let id = Identity::generate();
        let mut store = PrekeyStore::generate(&id);
        store.generate_kem(&id, 1);
        let bundle = store.bundle(&id);
        verify_bundle(&bundle).expect("fresh bundle verifies");

        let mut b = bundle.clone();
        b.signed_prekey.public[0] ^= 1;
        assert_eq!(verify_bundle(&b), Err(E2eeError::BadSignature));
        let mut b = bundle.clone();
        b.signed_prekey.id += 1;
        assert_eq!(verify_bundle(&b), Err(E2eeError::BadSignature));
        let mut b = bundle.clone();
        b.kem_prekey.public[100] ^= 1;
        assert_eq!(verify_bundle(&b), Err(E2eeError::BadSignature));
        // A one-time KEM key cannot be passed off as the last-resort one.
        let mut b = bundle.clone();
        b.kem_prekey.last_resort = true;
        assert_eq!(verify_bundle(&b), Err(E2eeError::BadSignature));
        // The X25519 identity key is bound to the identity key: another one (a relay's own) is refused.
        let mut b = bundle.clone();
        b.identity_dh_key = Identity::generate().sealing_key();
        assert_eq!(verify_bundle(&b), Err(E2eeError::BadSignature));
        let mut b = bundle.clone();
        b.identity_dh_signature = [0; 64];
        assert_eq!(verify_bundle(&b), Err(E2eeError::BadSignature));
        let mut b = bundle.clone();
        b.kem_prekey.public.pop();
        assert_eq!(verify_bundle(&b), Err(E2eeError::Malformed("ML-KEM prekey")));
        let mut b = bundle;
        b.identity_key = Identity::generate().identity_key();
        assert_eq!(verify_bundle(&b), Err(E2eeError::BadSignature));
    }

    #[test]
    fn ids_are_unique_per_kind_and_one_time_keys_are_taken_once() {
        let id = Identity::generate();
        let mut store = PrekeyStore::generate(&id);
        let otks = store.generate_one_time(5);
        let kems = store.generate_kem(&id, 3);
        let mut ids: Vec<u32> = otks.iter().map(|k| k.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 5);
        let last_resort = store.last_resort_kem_prekey();
        assert!(last_resort.last_resort && kems.iter().all(|k| k.id != last_resort.id && !k.last_resort));
        assert_eq!(last_resort.public.len(), KEM_PUBLIC_LEN);

        let secret = store.take_one_time(otks[2].id).expect("present");
        assert_eq!(PublicKey::from(&secret).to_bytes(), otks[2].public);
        assert_eq!(
            store.take_one_time(otks[2].id).err(),
            Some(E2eeError::MissingPrekey { kind: PrekeyKind::OneTime, id: otks[2].id })
        );
        assert_eq!(store.one_time_count(), 4);

        let dk = store.take_kem(kems[0].id).expect("present");
        assert_eq!(dk.encapsulation_key().to_bytes().as_slice(), kems[0].public.as_slice());
        assert!(store.take_kem(kems[0].id).is_err());
        for _ in 0..3 {
            store.take_kem(last_resort.id).expect("the last-resort key is never consumed");
        }
        assert_eq!(store.kem_count(), 2);
        assert!(store.take_kem(9999).is_err() && store.take_one_time(0).is_err());
    }

    #[test]
    fn rotation_keeps_the_previous_signed_prekey_for_the_grace_period() {
        let id = Identity::generate();
        let mut store = PrekeyStore::generate(&id);
        let first = store.signed_prekey();
        let second = store.rotate_signed_prekey(&id, 1_000);
        assert_ne!(first.id, second.id);
        assert_eq!(store.signed_prekey(), second);
        assert!(store.signed_prekey_secret(first.id).is_ok() && store.signed_prekey_secret(second.id).is_ok());
        assert!(!store.expire_signed_prekeys(1_000 + SIGNED_PREKEY_GRACE_MS - 1));
        assert!(store.signed_prekey_secret(first.id).is_ok());
        assert!(store.expire_signed_prekeys(1_000 + SIGNED_PREKEY_GRACE_MS));
        assert_eq!(
            store.signed_prekey_secret(first.id).err(),
            Some(E2eeError::MissingPrekey { kind: PrekeyKind::Signed, id: first.id })
        );
        assert!(store.signed_prekey_secret(second.id).is_ok());
    }

    #[test]
    fn debug_shows_no_secret_and_serde_round_trips() {
        let id = Identity::generate();
        let mut store = PrekeyStore::generate(&id);
        store.generate_one_time(2);
        store.generate_kem(&id, 1);
        let secret_hex = hex::encode(store.signed_prekey_secret(store.signed_prekey().id).expect("current").to_bytes());
        let debug = format!("{store:?}");
        assert!(!debug.contains(&secret_hex[..16]), "{debug}");
        assert!(debug.contains("one_time_prekeys: 2"));

        let json = serde_json::to_string(&store).expect("serialize");
        assert!(json.contains(&secret_hex), "the secret must be persisted");
        let back: PrekeyStore = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back.bundle(&id), store.bundle(&id));
        assert_eq!(back.last_resort_kem_prekey(), store.last_resort_kem_prekey());
        assert!(serde_json::from_str::<PrekeyStore>(&json.replacen("\"secret\":\"", "\"secret\":\"00", 1)).is_err());
    }
}
