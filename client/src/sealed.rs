//! Sealed sender: the outer layer of every envelope. It hides the sender from the relay and binds the inner,
//! end-to-end encrypted payload to the sender's identity.
//!
//! Envelope: `0x02 ‖ ephemeral public key (32) ‖ ChaCha20-Poly1305 ciphertext and tag`, encrypted to the
//! recipient's X25519 identity key with a fresh ephemeral key. Key: HKDF-SHA256 with salt `ephemeral ‖ recipient`,
//! the X25519 shared secret as input key material and info `consent-relay sealed box v1`. The nonce is zero: the key
//! is used for this one message only. The associated data is `0x02 ‖ ephemeral ‖ recipient`. A non-contributory
//! shared secret (low-order key) is refused. Version 1 envelopes (whose signature covered a re-encoding of the
//! content) are refused as of an unknown version.
//!
//! Plaintext: a [`SignedContent`], protobuf `{ bytes sender_identity_key = 1; bytes message = 2; bytes signature =
//! 3 }`. `message` is the encoding of the signed fields, protobuf `{ string sender_phone = 1; bytes
//! recipient_account = 2; bytes payload = 3 }`, carried as bytes exactly as the sender encoded it; `signature` is the
//! sender's Ed25519 signature over `"consent-relay sealed message v3" ‖ sender_identity_key ‖ message`. The recipient verifies the
//! signature over those bytes as carried and decodes `message` only afterwards, so a sender in another language need
//! not reproduce any particular protobuf encoder. The signature is what ties the payload (a Double Ratchet message,
//! see `e2ee`; in a session's first message, also the sender's X25519 identity key inside it) to the Ed25519
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
use x25519_dalek::{EphemeralSecret, PublicKey, StaticSecret};

use crate::identity::Identity;

/// Version byte of the envelope format. Version 1 signed a re-encoding of the content; its envelopes are refused.
pub const VERSION: u8 = 2;
const INFO: &[u8] = b"consent-relay sealed box v1";
/// Starts the bytes the sender signs (v1 and v2 labels were used by earlier formats and must not be reused).
pub const SIGNATURE_LABEL: &[u8] = b"consent-relay sealed message v3";
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

/// The plaintext of an envelope: the signed message as bytes, exactly as the sender encoded it, with the signature
/// over them and the key that made it.
#[derive(Clone, PartialEq, Message)]
pub struct SignedContent {
    /// Sender's Ed25519 identity key: the signature verifies under it.
    #[prost(bytes = "vec", tag = "1")]
    pub sender_identity_key: Vec<u8>,
    /// Encoding of a [`WireMessage`], as signed. Never re-encoded: verification uses these very bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub message: Vec<u8>,
    /// Ed25519 signature over [`signature_input`]`(sender_identity_key, message)`.
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
}

/// The signed fields, as encoded into [`SignedContent::message`].
#[derive(Clone, PartialEq, Message)]
pub struct WireMessage {
    /// Sender's phone number as the sender states it.
    #[prost(string, tag = "1")]
    pub sender_phone: String,
    /// Account the sender addressed it to (16 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub recipient_account: Vec<u8>,
    /// The end-to-end encrypted payload.
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
}

/// A sealed message whose signature verified, decoded from the bytes the signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedMessage {
    /// Sender's Ed25519 identity key.
    pub sender_identity_key: [u8; 32],
    /// Sender's phone number as the sender states it (the directory, not this field, says whose number it is).
    pub sender_phone: String,
    /// Account the sender addressed it to.
    pub recipient_account: AccountId,
    /// The end-to-end encrypted payload.
    pub payload: Vec<u8>,
}

impl SealedMessage {
    /// The sender's account id (derived from the signing identity key).
    pub fn sender_account(&self) -> AccountId {
        AccountId::from_identity_key(&self.sender_identity_key)
    }
}

/// The bytes a sender signs: [`SIGNATURE_LABEL`] ‖ its identity key ‖ the encoded message, as carried.
pub fn signature_input(sender_identity_key: &[u8], message: &[u8]) -> Vec<u8> {
    [SIGNATURE_LABEL, sender_identity_key, message].concat()
}

impl SignedContent {
    /// Encodes the message from `sender` to `recipient` carrying `payload`, and signs that encoding.
    pub fn sign(sender: &Identity, sender_phone: &str, recipient: &AccountId, payload: Vec<u8>) -> Self {
        let message = WireMessage {
            sender_phone: sender_phone.to_owned(),
            recipient_account: recipient.as_bytes().to_vec(),
            payload,
        }
        .encode_to_vec();
        Self::sign_encoded(sender, message)
    }

    /// Signs `message`, an encoding of a [`WireMessage`] made by any encoder, exactly as given.
    pub fn sign_encoded(sender: &Identity, message: Vec<u8>) -> Self {
        let key = sender.identity_key().to_vec();
        let signature = sender.sign(&signature_input(&key, &message)).to_vec();
        Self { sender_identity_key: key, message, signature }
    }

    /// Checks the signature over the message bytes as carried, then decodes them. The recipient is not checked here.
    pub fn verify(&self) -> Result<SealedMessage, OpenError> {
        let key: [u8; 32] = self.sender_identity_key.as_slice().try_into().map_err(|_| OpenError::Content)?;
        let vk = VerifyingKey::from_bytes(&key).map_err(|_| OpenError::Signature)?;
        let sig = Signature::from_slice(&self.signature).map_err(|_| OpenError::Signature)?;
        vk.verify_strict(&signature_input(&key, &self.message), &sig).map_err(|_| OpenError::Signature)?;
        let m = WireMessage::decode(self.message.as_slice()).map_err(|_| OpenError::Content)?;
        let recipient_account = AccountId::from_slice(&m.recipient_account).ok_or(OpenError::Content)?;
        Ok(SealedMessage {
            sender_identity_key: key,
            sender_phone: m.sender_phone,
            recipient_account,
            payload: m.payload,
        })
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
    seal_with(shared, eph_pub, recipient_key, plaintext)
}

/// Encrypts `plaintext` to `recipient_key` with a given ephemeral secret, so that published test vectors can be
/// reproduced. Never use it for real messages: the key and the zero nonce depend only on the two keys, so a second
/// message under the same ephemeral secret would reuse both.
#[doc(hidden)]
pub fn seal_for_test_vector(
    ephemeral_secret: [u8; 32],
    recipient_key: &[u8; 32],
    plaintext: &[u8],
) -> Result<Vec<u8>, OpenError> {
    let eph = StaticSecret::from(ephemeral_secret);
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&PublicKey::from(*recipient_key));
    seal_with(shared, eph_pub, recipient_key, plaintext)
}

fn seal_with(
    shared: x25519_dalek::SharedSecret,
    eph_pub: [u8; 32],
    recipient_key: &[u8; 32],
    plaintext: &[u8],
) -> Result<Vec<u8>, OpenError> {
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
    let content = SignedContent::sign(sender, sender_phone, recipient, payload);
    seal(recipient_sealing_key, &content.encode_to_vec())
}

/// Opens an envelope, checks the sender's signature over the message bytes as carried, and that it was addressed to
/// `me`.
pub fn open_message(me: &Identity, envelope: &[u8]) -> Result<SealedMessage, OpenError> {
    let plain = open(me, envelope)?;
    let content = SignedContent::decode(plain.as_slice()).map_err(|_| OpenError::Content)?;
    let m = content.verify()?;
    if m.recipient_account != me.account_id() {
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
        assert_eq!(env[0], VERSION);
        let hay = String::from_utf8_lossy(&env);
        assert!(!hay.contains("MARKER") && !hay.contains("33612345678"));
        assert!(!env.windows(32).any(|w| w == alice.identity_key()), "sender key must not be visible");
        let m = open_message(&bob, &env).expect("open");
        assert_eq!((m.payload.as_slice(), m.sender_phone.as_str()), (&b"MARKER-hello"[..], "+33612345678"));
        assert_eq!(m.sender_account(), alice.account_id());
        assert_eq!(m.sender_identity_key, alice.identity_key());
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
        let mut c = SignedContent::sign(&alice, "+33612345678", &bob.account_id(), b"hi".to_vec());
        let mut m = WireMessage::decode(c.message.as_slice()).expect("decodes");
        m.payload = b"pay eve".to_vec();
        c.message = m.encode_to_vec();
        let forged = seal(&bob.sealing_key(), &c.encode_to_vec()).expect("seal");
        assert_eq!(open_message(&bob, &forged), Err(OpenError::Signature));
        // Eve claims Alice's message as her own: the signature does not verify under Eve's key.
        let mut c = SignedContent::sign(&alice, "+33612345678", &bob.account_id(), b"hi".to_vec());
        c.sender_identity_key = eve.identity_key().to_vec();
        let claimed = seal(&bob.sealing_key(), &c.encode_to_vec()).expect("seal");
        assert_eq!(open_message(&bob, &claimed), Err(OpenError::Signature));
        // Content signed for Bob and re-sealed to Eve is refused by Eve.
        let c = SignedContent::sign(&alice, "+33612345678", &bob.account_id(), b"for bob".to_vec());
        let resealed = seal(&eve.sealing_key(), &c.encode_to_vec()).expect("seal");
        assert_eq!(open_message(&eve, &resealed), Err(OpenError::WrongRecipient));
    }

    /// What another implementation may legitimately send: fields in another order, an unknown field, a field
    /// repeated (protobuf keeps the last). The signature covers those bytes, and they are what is verified.
    #[test]
    fn a_non_canonical_encoding_verifies_as_sent() {
        fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
            out.push(tag << 3 | 2);
            out.push(u8::try_from(bytes.len()).expect("short field"));
            out.extend_from_slice(bytes);
        }
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let mut message = Vec::new();
        field(&mut message, 3, b"an early payload, replaced below");
        field(&mut message, 2, bob.account_id().as_bytes());
        field(&mut message, 15, b"a field this version does not know");
        field(&mut message, 1, b"+33612345678");
        field(&mut message, 3, b"the payload");
        let canonical = WireMessage::decode(message.as_slice()).expect("valid protobuf").encode_to_vec();
        assert_ne!(canonical, message, "the test needs an encoding that re-encoding would change");

        let content = SignedContent::sign_encoded(&alice, message.clone());
        let env = seal(&bob.sealing_key(), &content.encode_to_vec()).expect("seal");
        let m = open_message(&bob, &env).expect("verified against the bytes as sent");
        assert_eq!((m.sender_phone.as_str(), m.payload.as_slice()), ("+33612345678", &b"the payload"[..]));
        assert_eq!(m.sender_identity_key, alice.identity_key());

        // A signature over the canonical re-encoding does not cover the bytes carried.
        let resigned = SignedContent { message, ..SignedContent::sign_encoded(&alice, canonical) };
        let env = seal(&bob.sealing_key(), &resigned.encode_to_vec()).expect("seal");
        assert_eq!(open_message(&bob, &env), Err(OpenError::Signature));
    }

    #[test]
    fn version_1_envelopes_are_refused() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let mut env =
            seal_message(&alice, "+33612345678", &bob.account_id(), &bob.sealing_key(), b"x".to_vec()).expect("seal");
        env[0] = 1;
        assert_eq!(open_message(&bob, &env), Err(OpenError::Format));
    }

    #[test]
    fn test_vector_sealing_is_deterministic_and_opens() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let content = SignedContent::sign(&alice, "+33612345678", &bob.account_id(), b"p".to_vec()).encode_to_vec();
        let a = seal_for_test_vector([9; 32], &bob.sealing_key(), &content).expect("seal");
        assert_eq!(a, seal_for_test_vector([9; 32], &bob.sealing_key(), &content).expect("seal"));
        assert_eq!(open_message(&bob, &a).expect("open").payload, b"p");
    }

    #[test]
    fn low_order_key_refused() {
        assert_eq!(seal(&[0u8; 32], b"x"), Err(OpenError::Degenerate));
    }
}
