//! Session set-up after Signal's PQXDH specification (revision 3), with X25519, ML-KEM-768 and SHA-256.
//!
//! The initiator (Alice) fetches the responder's (Bob's) [`PrekeyBundle`], verifies it, and computes
//! - DH1 = DH(IK_A, SPK_B), DH2 = DH(EK_A, IK_B), DH3 = DH(EK_A, SPK_B), and DH4 = DH(EK_A, OPK_B) when the bundle
//!   holds a one-time prekey (it does not when Bob's pool is empty);
//! - (CT, SS) = ML-KEM-768 encapsulation to Bob's (one-time or last-resort) KEM prekey;
//! - SK = HKDF-SHA256(salt = 32 zero bytes, ikm = 32 × 0xFF ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4] ‖ SS,
//!   info = `"ConsentRelay_X25519_SHA-256_ML-KEM-768"`), 32 bytes;
//! - AD = IK_A (Ed25519) ‖ IK_A (X25519) ‖ IK_B (Ed25519) ‖ IK_B (X25519), 128 bytes.
//!
//! IK is the device's X25519 identity key ([`Identity::sealing_key`]). Where Signal has one identity key for both
//! signing and DH, a device here has two, so the [`InitialHeader`] also carries Alice's Ed25519 signature binding
//! her X25519 identity key to her Ed25519 identity key: without it anyone could claim Alice's Ed25519 key (the one
//! the safety number vouches for) next to an X25519 key of their own, and Bob would believe he talks to Alice.
//!
//! Order of checks: signatures before any key is used; every DH output must be contributory (not all zeros);
//! Bob consumes his one-time prekeys only after the whole computation succeeded, so a refused header costs him
//! nothing. A header that passes but was corrupted (e.g. its KEM ciphertext) yields a different SK, and the
//! first ratchet message then fails to decrypt: callers should respond on a clone of the store and keep the
//! clone only once that first message decrypted. With no one-time prekeys (last-resort KEM key, no OPK) a
//! replayed initial message is answered again, as PQXDH allows; the ratchet layer does not see it as new.

use hkdf::Hkdf;
use ml_kem::{Decapsulate, Encapsulate};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use super::prekeys::{KEM_CIPHERTEXT_LEN, PrekeyBundle, PrekeyStore, kem_public, verify_bundle};
use super::{E2eeError, Secret, hex_bytes, x25519};
use crate::identity::Identity;

const INFO: &[u8] = b"ConsentRelay_X25519_SHA-256_ML-KEM-768";
/// Length of the associated data both sides derive.
pub const AD_LEN: usize = 128;
/// F ‖ four DH outputs ‖ SS.
const MAX_KM_LEN: usize = 32 + 4 * 32 + 32;

/// What Alice sends ahead of her first ratchet message so that Bob can derive the same secret. Public values only;
/// serde (hex) lets the messenger keep it until Bob has answered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InitialHeader {
    /// Alice's Ed25519 identity key.
    #[serde(with = "hex_bytes")]
    pub identity_key: [u8; 32],
    /// Alice's X25519 identity key (IK_A).
    #[serde(with = "hex_bytes")]
    pub identity_dh_key: [u8; 32],
    /// Alice's Ed25519 signature binding `identity_dh_key` to `identity_key`.
    #[serde(with = "hex_bytes")]
    pub identity_dh_signature: [u8; 64],
    /// Alice's ephemeral X25519 key (EK_A).
    #[serde(with = "hex_bytes")]
    pub ephemeral: [u8; 32],
    /// ML-KEM-768 ciphertext (CT), [`KEM_CIPHERTEXT_LEN`] bytes.
    #[serde(with = "hex_bytes")]
    pub kem_ciphertext: Vec<u8>,
    /// Which of Bob's signed prekeys Alice used.
    pub signed_prekey_id: u32,
    /// Which of Bob's one-time prekeys Alice used, if the bundle had one.
    pub one_time_prekey_id: Option<u32>,
    /// Which of Bob's ML-KEM prekeys Alice encapsulated to.
    pub kem_prekey_id: u32,
}

/// The 32-byte secret both sides derive (SK); wiped when dropped, never printed.
#[derive(Clone)]
pub struct SharedSecret(Secret<32>);

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(..)")
    }
}

impl SharedSecret {
    pub(crate) fn secret(&self) -> &Secret<32> {
        &self.0
    }
}

/// The bytes Alice's Ed25519 identity key signs to bind her X25519 identity key to it:
/// `"ConsentRelay_IdentityDH_v1" ‖ identity_key ‖ identity_dh_key`, the sealing-key binding every device publishes
/// (`relay_proto::identity`). Public for test vectors.
pub fn identity_binding(identity_key: &[u8; 32], identity_dh_key: &[u8; 32]) -> Vec<u8> {
    relay_proto::identity::binding_bytes(identity_key, identity_dh_key)
}

fn verify_identity_binding(header: &InitialHeader) -> Result<(), E2eeError> {
    relay_proto::identity::verify_binding(&header.identity_key, &header.identity_dh_key, &header.identity_dh_signature)
        .map_err(|_| E2eeError::BadSignature)
}

/// Accumulates the KDF input in one buffer that is wiped on drop.
struct KeyMaterial {
    buf: Secret<MAX_KM_LEN>,
    len: usize,
}

impl KeyMaterial {
    fn new() -> Self {
        let mut km = Self { buf: Secret::new([0; MAX_KM_LEN]), len: 0 };
        km.push(&[0xFF; 32]);
        km
    }

    /// Callers push F, at most four DH outputs and SS: exactly `MAX_KM_LEN` bytes at most.
    fn push(&mut self, bytes: &[u8; 32]) {
        self.buf.as_mut()[self.len..self.len + 32].copy_from_slice(bytes);
        self.len += 32;
    }

    fn derive(&self) -> SharedSecret {
        let mut sk = Secret::new([0; 32]);
        Hkdf::<Sha256>::new(Some(&[0; 32]), &self.buf.as_bytes()[..self.len])
            .expand(INFO, sk.as_mut())
            // 32 bytes is far below HKDF-SHA256's output limit of 255 * 32.
            .expect("32-byte HKDF output is valid");
        SharedSecret(sk)
    }
}

fn associated_data(a_ed: &[u8; 32], a_x: &[u8; 32], b_ed: &[u8; 32], b_x: &[u8; 32]) -> Vec<u8> {
    [a_ed.as_slice(), a_x, b_ed, b_x].concat()
}

/// Alice's side: verifies `bundle` (signatures and sizes, before using any key in it), then derives the shared
/// secret. Returns the header to send with the first message, the secret and the associated data.
pub fn initiate(
    identity: &Identity,
    bundle: &PrekeyBundle,
) -> Result<(InitialHeader, SharedSecret, Vec<u8>), E2eeError> {
    verify_bundle(bundle)?;
    let kem_key = kem_public(&bundle.kem_prekey.public)?;
    let mut rng = rand::rng();
    let ephemeral = StaticSecret::random_from_rng(&mut rng);
    let spk = &bundle.signed_prekey.public;

    let mut km = KeyMaterial::new();
    km.push(x25519(identity.sealing_secret(), spk)?.as_bytes());
    km.push(x25519(&ephemeral, &bundle.identity_dh_key)?.as_bytes());
    km.push(x25519(&ephemeral, spk)?.as_bytes());
    if let Some(opk) = &bundle.one_time_prekey {
        km.push(x25519(&ephemeral, &opk.public)?.as_bytes());
    }
    let (ciphertext, ss) = kem_key.encapsulate_with_rng(&mut rng);
    let ss = Secret::new(ss.into());
    km.push(ss.as_bytes());
    let sk = km.derive();

    let (identity_key, identity_dh_key) = (identity.identity_key(), identity.sealing_key());
    let header = InitialHeader {
        identity_key,
        identity_dh_key,
        identity_dh_signature: identity.sealing_key_signature(),
        ephemeral: PublicKey::from(&ephemeral).to_bytes(),
        kem_ciphertext: ciphertext.to_vec(),
        signed_prekey_id: bundle.signed_prekey.id,
        one_time_prekey_id: bundle.one_time_prekey.as_ref().map(|k| k.id),
        kem_prekey_id: bundle.kem_prekey.id,
    };
    let ad = associated_data(&identity_key, &identity_dh_key, &bundle.identity_key, &bundle.identity_dh_key);
    Ok((header, sk, ad))
}

/// Bob's side: checks Alice's identity binding, finds the prekeys the header names, derives the shared secret and
/// the associated data, and only then removes the one-time X25519 and one-time ML-KEM prekeys it used from `store`
/// (the last-resort KEM key stays). On error `store` is unchanged.
pub fn respond(
    identity: &Identity,
    store: &mut PrekeyStore,
    header: &InitialHeader,
) -> Result<(SharedSecret, Vec<u8>), E2eeError> {
    verify_identity_binding(header)?;
    if header.kem_ciphertext.len() != KEM_CIPHERTEXT_LEN {
        return Err(E2eeError::Malformed("ML-KEM ciphertext"));
    }
    let spk = store.signed_prekey_secret(header.signed_prekey_id)?;
    let opk = header.one_time_prekey_id.map(|id| store.one_time_secret(id)).transpose()?;
    let kem_key = store.kem_secret(header.kem_prekey_id)?;

    let mut km = KeyMaterial::new();
    km.push(x25519(&spk, &header.identity_dh_key)?.as_bytes());
    km.push(x25519(identity.sealing_secret(), &header.ephemeral)?.as_bytes());
    km.push(x25519(&spk, &header.ephemeral)?.as_bytes());
    if let Some(opk) = &opk {
        km.push(x25519(opk, &header.ephemeral)?.as_bytes());
    }
    let ss =
        kem_key.decapsulate_slice(&header.kem_ciphertext).map_err(|_| E2eeError::Malformed("ML-KEM ciphertext"))?;
    let ss = Secret::new(ss.into());
    km.push(ss.as_bytes());
    let sk = km.derive();

    // Both lookups succeeded above, so these removals cannot fail.
    if let Some(id) = header.one_time_prekey_id {
        store.take_one_time(id)?;
    }
    store.take_kem(header.kem_prekey_id)?;
    let ad = associated_data(
        &header.identity_key,
        &header.identity_dh_key,
        &identity.identity_key(),
        &identity.sealing_key(),
    );
    Ok((sk, ad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2ee::PrekeyKind;

    fn bob_with_pools() -> (Identity, PrekeyStore) {
        let bob = Identity::generate();
        let mut store = PrekeyStore::generate(&bob);
        store.generate_one_time(2);
        store.generate_kem(&bob, 2);
        (bob, store)
    }

    #[test]
    fn both_sides_agree_with_full_and_with_empty_pools() {
        let alice = Identity::generate();
        let (bob, mut store) = bob_with_pools();
        let bundle = store.bundle(&bob);
        let (header, sk_a, ad_a) = initiate(&alice, &bundle).expect("initiate");
        assert!(header.one_time_prekey_id.is_some());
        let (sk_b, ad_b) = respond(&bob, &mut store, &header).expect("respond");
        assert_eq!(sk_a.secret().as_bytes(), sk_b.secret().as_bytes());
        assert_eq!((ad_a.len(), &ad_a), (AD_LEN, &ad_b));
        assert_eq!((store.one_time_count(), store.kem_count()), (1, 1));

        let bob = Identity::generate();
        let mut store = PrekeyStore::generate(&bob);
        let bundle = store.bundle(&bob);
        assert!(bundle.one_time_prekey.is_none() && bundle.kem_prekey.last_resort);
        let (header, sk_a, _) = initiate(&alice, &bundle).expect("initiate without one-time keys");
        assert_eq!(header.one_time_prekey_id, None);
        let (sk_b, _) = respond(&bob, &mut store, &header).expect("respond");
        assert_eq!(sk_a.secret().as_bytes(), sk_b.secret().as_bytes());
        assert!(format!("{sk_a:?}") == "SharedSecret(..)");
    }

    #[test]
    fn bad_signature_is_refused_before_any_key_is_used() {
        let alice = Identity::generate();
        let (bob, store) = bob_with_pools();
        // A low-order signed prekey would give `Degenerate` if it were used before the signature check.
        let mut bundle = store.bundle(&bob);
        bundle.signed_prekey.public = [0; 32];
        assert_eq!(initiate(&alice, &bundle).err(), Some(E2eeError::BadSignature));
        let mut bundle = store.bundle(&bob);
        bundle.kem_prekey.public = vec![0xFF; bundle.kem_prekey.public.len()];
        assert_eq!(initiate(&alice, &bundle).err(), Some(E2eeError::BadSignature));
    }

    #[test]
    fn low_order_keys_are_refused() {
        let alice = Identity::generate();
        let (bob, mut store) = bob_with_pools();
        // A peer may bind a low-order key to its identity key itself: the binding holds, the exchange is refused.
        let mut bundle = store.bundle(&bob);
        bundle.identity_dh_key = [0; 32];
        bundle.identity_dh_signature = bob.sign(&identity_binding(&bob.identity_key(), &[0; 32]));
        assert_eq!(initiate(&alice, &bundle).err(), Some(E2eeError::Degenerate));
        // Without that binding, the key is refused before it is used.
        bundle.identity_dh_signature = store.bundle(&bob).identity_dh_signature;
        assert_eq!(initiate(&alice, &bundle).err(), Some(E2eeError::BadSignature));
        let mut bundle = store.bundle(&bob);
        bundle.one_time_prekey.as_mut().expect("pool is full").public = [0; 32];
        assert_eq!(initiate(&alice, &bundle).err(), Some(E2eeError::Degenerate));

        let (mut header, _, _) = initiate(&alice, &store.bundle(&bob)).expect("initiate");
        header.ephemeral = [0; 32];
        assert_eq!(respond(&bob, &mut store, &header).err(), Some(E2eeError::Degenerate));
        assert_eq!((store.one_time_count(), store.kem_count()), (2, 2), "nothing consumed");
    }

    #[test]
    fn a_foreign_identity_dh_key_cannot_claim_an_identity() {
        let (alice, mallory) = (Identity::generate(), Identity::generate());
        let (bob, mut store) = bob_with_pools();
        let (mut header, _, _) = initiate(&mallory, &store.bundle(&bob)).expect("initiate");
        header.identity_key = alice.identity_key();
        assert_eq!(respond(&bob, &mut store, &header).err(), Some(E2eeError::BadSignature));
        assert_eq!(store.one_time_count(), 2);
    }

    #[test]
    fn missing_prekeys_are_errors_and_consume_nothing() {
        let alice = Identity::generate();
        let (bob, mut store) = bob_with_pools();
        let (header, _, _) = initiate(&alice, &store.bundle(&bob)).expect("initiate");
        let cases = [
            (InitialHeader { signed_prekey_id: 77, ..header.clone() }, PrekeyKind::Signed, 77),
            (InitialHeader { one_time_prekey_id: Some(77), ..header.clone() }, PrekeyKind::OneTime, 77),
            (InitialHeader { kem_prekey_id: 77, ..header.clone() }, PrekeyKind::Kem, 77),
        ];
        for (bad, kind, id) in cases {
            assert_eq!(respond(&bob, &mut store, &bad).err(), Some(E2eeError::MissingPrekey { kind, id }));
        }
        let short = InitialHeader { kem_ciphertext: header.kem_ciphertext[1..].to_vec(), ..header.clone() };
        assert_eq!(respond(&bob, &mut store, &short).err(), Some(E2eeError::Malformed("ML-KEM ciphertext")));
        assert_eq!((store.one_time_count(), store.kem_count()), (2, 2));
        respond(&bob, &mut store, &header).expect("the genuine header still works");
    }

    #[test]
    fn a_one_time_prekey_serves_one_session_only() {
        let alice = Identity::generate();
        let (bob, mut store) = bob_with_pools();
        let (header, _, _) = initiate(&alice, &store.bundle(&bob)).expect("initiate");
        respond(&bob, &mut store, &header).expect("first respond");
        let id = header.one_time_prekey_id.expect("bundle had a one-time key");
        assert_eq!(
            respond(&bob, &mut store, &header).err(),
            Some(E2eeError::MissingPrekey { kind: PrekeyKind::OneTime, id })
        );
        // The next bundle names other keys.
        let next = store.bundle(&bob);
        assert_ne!(next.one_time_prekey.map(|k| k.id), Some(id));
        assert_ne!(next.kem_prekey.id, header.kem_prekey_id);
    }

    #[test]
    fn the_secret_depends_on_the_kem_ciphertext() {
        let alice = Identity::generate();
        let (bob, store) = bob_with_pools();
        let (header, sk_a, _) = initiate(&alice, &store.bundle(&bob)).expect("initiate");
        let mut corrupted = header.clone();
        corrupted.kem_ciphertext[500] ^= 0x01;
        // ML-KEM rejects implicitly: decapsulation "succeeds" with an unrelated key.
        let (sk_b, _) = respond(&bob, &mut store.clone(), &corrupted).expect("respond");
        assert_ne!(sk_a.secret().as_bytes(), sk_b.secret().as_bytes());
        let (sk_b, _) = respond(&bob, &mut store.clone(), &header).expect("respond");
        assert_eq!(sk_a.secret().as_bytes(), sk_b.secret().as_bytes());
    }
}
