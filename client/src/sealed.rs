//! Sealed sender: the outer layer of every envelope. It hides the sender from the relay and binds the inner,
//! end-to-end encrypted payload to the sender's identity.
//!
//! Envelope: `0x01 ‖ ephemeral public key (32) ‖ ChaCha20-Poly1305 ciphertext and tag`, encrypted to the
//! recipient's X25519 identity key with a fresh ephemeral key. Key: HKDF-SHA256 with salt `ephemeral ‖ recipient`,
//! the X25519 shared secret as input key material and info `consent-relay sealed box v1`. The nonce is zero: the key
//! is used for this one message only. The associated data is `0x01 ‖ ephemeral ‖ recipient`. A non-contributory
//! shared secret (low-order key) is refused.
//!
//! Plaintext: a [`SealedMessage`]: the sender's Ed25519 identity key and phone number, the recipient's account, and
//! the payload (a Double Ratchet message, see `e2ee`), all signed by the sender's identity key. The signature is what
//! ties the payload (and, in a session's first message, the sender's X25519 identity key inside it) to the Ed25519
//! identity the recipient knows; the relay sees none of it, so its mailbox entries name no sender.
//!
//! # How a sealed send is authorised without naming the sender
//! - Every account has a random 32-byte *access key* (made at `init`, kept in `identity.json`). At registration the
//!   client gives the relay only its SHA-256 (`SetAccessKey`); setting a new one revokes the old.
//! - Every message carries the sender's own access key inside the Double Ratchet plaintext, so only contacts the
//!   account has written to learn it.
//! - A sender that holds the recipient's access key sends with `SealedSend` on a second QUIC connection that never
//!   authenticates. The relay checks SHA-256(key) against the stored verifier (in constant time) and stores the
//!   envelope; it has no account for that connection, so it can neither store nor log a sender.
//! - Before a contact has shared its key (first contact), the envelope goes over the authenticated connection with
//!   `Send`: the relay then sees which connection submitted it, but stores and logs no sender either way.
//! - Abuse: without the key, sealed sends are refused (`BAD_ACCESS_KEY`); with it, they are rate-limited per
//!   recipient (`sealed_sends_per_minute`) and bounded by the mailbox quota; a recipient that is spammed by a contact
//!   rotates its key (the other contacts learn the new one from its next messages). What the relay still sees is the
//!   connecting IP address and the timing.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use ed25519_dalek::{Signature, VerifyingKey};
use hkdf::Hkdf;
use prost::Message;
use relay_proto::AccountId;
use sha2::Sha256;
use x25519_dalek::{EphemeralSecret, PublicKey};

use crate::identity::Identity;

const VERSION: u8 = 1;
const INFO: &[u8] = b"consent-relay sealed box v1";
const HEADER_LEN: usize = 1 + 32;
const TAG_LEN: usize = 16;

/// Why an envelope could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Unknown version byte or too short to be an envelope.
    #[error("not a sealed envelope of a known version")]
    Format,
    /// The recipient key is of low order.
    #[error("degenerate key exchange")]
    Degenerate,
    /// Authentication failed: tampered, or not for us.
    #[error("envelope does not decrypt (tampered or not addressed to this device)")]
    Decrypt,
    /// The plaintext is not a sealed message.
    #[error("sealed content does not decode")]
    Content,
    /// The sender's signature does not verify.
    #[error("sender signature does not verify")]
    Signature,
    /// The message was signed for another recipient.
    #[error("message was addressed to another account")]
    WrongRecipient,
}

/// The signed content inside an envelope.
#[derive(Clone, PartialEq, Message)]
pub struct SealedMessage {
    /// Sender's Ed25519 identity key.
    #[prost(bytes = "vec", tag = "1")]
    pub sender_identity_key: Vec<u8>,
    /// Sender's phone number as the sender states it.
    #[prost(string, tag = "2")]
    pub sender_phone: String,
    /// Account the sender addressed it to.
    #[prost(bytes = "vec", tag = "3")]
    pub recipient_account: Vec<u8>,
    /// The end-to-end encrypted payload.
    #[prost(bytes = "vec", tag = "4")]
    pub payload: Vec<u8>,
    /// Ed25519 signature over the fields above.
    #[prost(bytes = "vec", tag = "5")]
    pub signature: Vec<u8>,
}

impl SealedMessage {
    fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = Self { signature: Vec::new(), ..self.clone() };
        let mut out = b"consent-relay sealed message v2".to_vec();
        out.extend_from_slice(&unsigned.encode_to_vec());
        out
    }

    /// A signed message from `sender` to `recipient` carrying `payload`.
    pub fn new(sender: &Identity, sender_phone: &str, recipient: &AccountId, payload: Vec<u8>) -> Self {
        let mut m = Self {
            sender_identity_key: sender.identity_key().to_vec(),
            sender_phone: sender_phone.to_owned(),
            recipient_account: recipient.as_bytes().to_vec(),
            payload,
            signature: Vec::new(),
        };
        m.signature = sender.sign(&m.signed_bytes()).to_vec();
        m
    }

    /// The sender's Ed25519 identity key.
    pub fn sender_key(&self) -> Option<[u8; 32]> {
        self.sender_identity_key.as_slice().try_into().ok()
    }

    /// The sender's account id (derived from the signed identity key).
    pub fn sender_account(&self) -> Option<AccountId> {
        self.sender_key().map(|k| AccountId::from_identity_key(&k))
    }
}

fn cipher(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> ChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's output limit of 255 * 32.
    Hkdf::<Sha256>::new(Some(&salt), shared).expand(INFO, &mut key).expect("32-byte HKDF output is valid");
    ChaCha20Poly1305::new(&key.into())
}

fn aad(ephemeral: &[u8; 32], recipient: &[u8; 32]) -> [u8; 65] {
    let mut a = [0u8; 65];
    a[0] = VERSION;
    a[1..33].copy_from_slice(ephemeral);
    a[33..].copy_from_slice(recipient);
    a
}

/// Encrypts `plaintext` to `recipient_key`.
pub fn seal(recipient_key: &[u8; 32], plaintext: &[u8]) -> Result<Vec<u8>, OpenError> {
    let eph = EphemeralSecret::random_from_rng(&mut rand::rng());
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&PublicKey::from(*recipient_key));
    if !shared.was_contributory() {
        return Err(OpenError::Degenerate);
    }
    let ct = cipher(shared.as_bytes(), &eph_pub, recipient_key)
        .encrypt(&Nonce::default(), Payload { msg: plaintext, aad: &aad(&eph_pub, recipient_key) })
        .map_err(|_| OpenError::Format)?;
    let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
    out.push(VERSION);
    out.extend_from_slice(&eph_pub);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Decrypts an envelope sealed to `me`.
pub fn open(me: &Identity, envelope: &[u8]) -> Result<Vec<u8>, OpenError> {
    if envelope.len() < HEADER_LEN + TAG_LEN || envelope[0] != VERSION {
        return Err(OpenError::Format);
    }
    let mut eph_pub = [0u8; 32];
    eph_pub.copy_from_slice(&envelope[1..HEADER_LEN]);
    let shared = me.sealing_secret().diffie_hellman(&PublicKey::from(eph_pub));
    if !shared.was_contributory() {
        return Err(OpenError::Degenerate);
    }
    let my_key = me.sealing_key();
    cipher(shared.as_bytes(), &eph_pub, &my_key)
        .decrypt(&Nonce::default(), Payload { msg: &envelope[HEADER_LEN..], aad: &aad(&eph_pub, &my_key) })
        .map_err(|_| OpenError::Decrypt)
}

/// Signs `payload` as `sender` and seals it to `recipient`.
pub fn seal_message(
    sender: &Identity,
    sender_phone: &str,
    recipient: &AccountId,
    recipient_sealing_key: &[u8; 32],
    payload: Vec<u8>,
) -> Result<Vec<u8>, OpenError> {
    let m = SealedMessage::new(sender, sender_phone, recipient, payload);
    seal(recipient_sealing_key, &m.encode_to_vec())
}

/// Opens an envelope and checks the sender's signature and that it was addressed to `me`.
pub fn open_message(me: &Identity, envelope: &[u8]) -> Result<SealedMessage, OpenError> {
    let plain = open(me, envelope)?;
    let m = SealedMessage::decode(plain.as_slice()).map_err(|_| OpenError::Content)?;
    let key = m.sender_key().ok_or(OpenError::Content)?;
    let vk = VerifyingKey::from_bytes(&key).map_err(|_| OpenError::Signature)?;
    let sig = Signature::from_slice(&m.signature).map_err(|_| OpenError::Signature)?;
    vk.verify_strict(&m.signed_bytes(), &sig).map_err(|_| OpenError::Signature)?;
    if m.recipient_account != me.account_id().as_bytes() {
        return Err(OpenError::WrongRecipient);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_sender_identity_hidden() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let env = seal_message(&alice, "+33612345678", &bob.account_id(), &bob.sealing_key(), b"MARKER-hello".to_vec())
            .expect("seal");
        let hay = String::from_utf8_lossy(&env);
        assert!(!hay.contains("MARKER") && !hay.contains("33612345678"));
        assert!(!env.windows(32).any(|w| w == alice.identity_key()), "sender key must not be visible");
        let m = open_message(&bob, &env).expect("open");
        assert_eq!((m.payload.as_slice(), m.sender_phone.as_str()), (&b"MARKER-hello"[..], "+33612345678"));
        assert_eq!(m.sender_account(), Some(alice.account_id()));
    }

    #[test]
    fn tampering_wrong_key_and_forgery_are_refused() {
        let (alice, bob, eve) = (Identity::generate(), Identity::generate(), Identity::generate());
        let env =
            seal_message(&alice, "+33612345678", &bob.account_id(), &bob.sealing_key(), b"hi".to_vec()).expect("seal");
        for i in [0, 5, env.len() - 1] {
            let mut bad = env.clone();
            bad[i] ^= 1;
            assert!(open_message(&bob, &bad).is_err(), "flip at {i}");
        }
        assert_eq!(open_message(&eve, &env), Err(OpenError::Decrypt));
        assert_eq!(open_message(&bob, &env[..20]), Err(OpenError::Format));
        // Eve re-seals Alice's signed content with a changed text: the signature breaks.
        let mut m = SealedMessage::new(&alice, "+33612345678", &bob.account_id(), b"hi".to_vec());
        m.payload = b"pay eve".to_vec();
        let forged = seal(&bob.sealing_key(), &m.encode_to_vec()).expect("seal");
        assert_eq!(open_message(&bob, &forged), Err(OpenError::Signature));
        // Content signed for Bob and re-sealed to Eve is refused by Eve.
        let m = SealedMessage::new(&alice, "+33612345678", &bob.account_id(), b"for bob".to_vec());
        let resealed = seal(&eve.sealing_key(), &m.encode_to_vec()).expect("seal");
        assert_eq!(open_message(&eve, &resealed), Err(OpenError::WrongRecipient));
    }

    #[test]
    fn low_order_key_refused() {
        assert_eq!(seal(&[0u8; 32], b"x"), Err(OpenError::Degenerate));
    }
}
