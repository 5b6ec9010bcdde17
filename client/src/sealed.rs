//! Sealed sender: the outer layer of every envelope. It hides the sender from the relay, says who the sender is to
//! the recipient only through a certificate the relay signed, and binds the inner, end-to-end encrypted payload to
//! that sender's identity and to the recipient's keys.
//!
//! Envelope (version 3): `0x03 ‖ ephemeral public key (32) ‖ ChaCha20-Poly1305 ciphertext and tag`, encrypted to
//! the recipient's X25519 sealing key with a fresh ephemeral key. Key: HKDF-SHA256 with salt `ephemeral ‖
//! recipient`, the X25519 shared secret as input key material and info `consent-relay sealed box v1`. The nonce is
//! zero: the key is used for this one message only. The associated data is `0x03 ‖ ephemeral ‖ recipient`. A
//! non-contributory shared secret (low-order key) is refused. Envelopes of versions 1 and 2 (whose sender stated
//! its own phone number) are refused as of an unknown version.
//!
//! Plaintext: a [`SealedContent`], protobuf `{ bytes sender_certificate = 1; bytes certificate_signature = 2; bytes
//! message = 3; bytes signature = 4 }`. The first two are the sender's certificate as the relay issued it
//! (`relay_proto::identity`: account, Ed25519 identity key, X25519 sealing key, phone number, expiry, signed by the
//! relay's sender-certificate key). `message` is the encoding of the signed fields, protobuf `{ bytes
//! recipient_account = 1; bytes recipient_sealing_key = 2; bytes payload = 3 }`, carried as bytes exactly as the
//! sender encoded it; `signature` is the sender's Ed25519 signature over `"consent-relay sealed message v4" ‖
//! identity key named by the certificate ‖ message`.
//!
//! The recipient, before believing anything in it: checks the relay's signature over the certificate bytes as
//! carried (with the key it pinned at registration), that the certificate had not expired when the relay stored the
//! envelope, that the message signature verifies under the identity key the certificate names, and only then
//! decodes `message` and checks that it names the recipient's own account and own sealing key. The sender shown is
//! the certificate's number, never a string the sender chose. Because the sender signs the key it sealed to, a
//! relay that handed out its own sealing key for the recipient and opened the envelope cannot re-seal it to the
//! real key unnoticed. The relay sees none of this, so its mailbox entries name no sender.
//!
//! Cost per envelope: the sender makes one ephemeral X25519 key (a fixed-base multiplication) and one key agreement
//! and one Ed25519 signature; the recipient one key agreement and one signature verification, plus the relay's
//! signature over the sender's certificate the first time it sees that certificate ([`open_message_with`] and
//! [`crate::verified_certificates`]; [`open_message`] verifies it every time). There is no static–static agreement
//! to cache: the only agreement is with a key made for that one envelope, and reusing it would reuse the key and
//! zero nonce. Both keys of the device are kept derived ([`Identity::sealing_key`]).
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
use relay_proto::identity::{IdentityError, SenderCertificate, SignedCertificate};
use sha2::Sha256;
use x25519_dalek::{EphemeralSecret, PublicKey, StaticSecret};

use crate::identity::Identity;
use crate::verified_certificates::VerifiedCertificates;

/// Version byte of the envelope format. Versions 1 and 2 let the sender state its own number; they are refused.
pub const VERSION: u8 = 3;
const INFO: &[u8] = b"consent-relay sealed box v1";
/// Starts the bytes the sender signs (labels v1 to v3 were used by earlier formats and must not be reused).
pub const SIGNATURE_LABEL: &[u8] = b"consent-relay sealed message v4";
const HEADER_LEN: usize = 1 + 32;
const TAG_LEN: usize = 16;

/// Why an envelope could not be opened or was not believed. The text of each is what a quarantined envelope's
/// record gives as its reason.
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
    /// The sender certificate is not the relay's, is malformed, or had expired.
    #[error("sender certificate refused: {0}")]
    Certificate(IdentityError),
    /// The sender's signature does not verify under the identity key its certificate names.
    #[error("the message is not signed by the key its sender certificate names")]
    Signature,
    /// The message was signed for another recipient.
    #[error("message was addressed to another account")]
    WrongRecipient,
    /// The sender sealed it to another X25519 key than this device's: a relay handed out a substitute key, opened
    /// the envelope and sealed it again.
    #[error("message was sealed to another key than this device's (a substituted key: the relay may have read it)")]
    WrongSealingKey,
}

/// The plaintext of an envelope: the sender's certificate, and the signed message as bytes, exactly as the sender
/// encoded it, with the signature over them.
#[derive(Clone, PartialEq, Message)]
pub struct SealedContent {
    /// The sender certificate's bytes, as the relay signed them.
    #[prost(bytes = "vec", tag = "1")]
    pub sender_certificate: Vec<u8>,
    /// The relay's signature over the certificate.
    #[prost(bytes = "vec", tag = "2")]
    pub certificate_signature: Vec<u8>,
    /// Encoding of a [`WireMessage`], as signed. Never re-encoded: verification uses these very bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub message: Vec<u8>,
    /// Ed25519 signature over [`signature_input`]`(certificate's identity key, message)`.
    #[prost(bytes = "vec", tag = "4")]
    pub signature: Vec<u8>,
}

/// The signed fields, as encoded into [`SealedContent::message`].
#[derive(Clone, PartialEq, Message)]
pub struct WireMessage {
    /// Account the sender addressed it to (16 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub recipient_account: Vec<u8>,
    /// The X25519 key the sender sealed it to (32 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub recipient_sealing_key: Vec<u8>,
    /// The end-to-end encrypted payload.
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
}

/// A sealed message whose certificate and signature verified, decoded from the bytes the signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedMessage {
    /// Who sent it, as the relay certified: account, keys and phone number.
    pub sender: SenderCertificate,
    /// Account the sender addressed it to.
    pub recipient_account: AccountId,
    /// The X25519 key the sender sealed it to.
    pub recipient_sealing_key: [u8; 32],
    /// The end-to-end encrypted payload.
    pub payload: Vec<u8>,
}

impl SealedMessage {
    /// The sender's account id (the certificate's, which derives from the signing identity key).
    pub fn sender_account(&self) -> AccountId {
        self.sender.account
    }

    /// The sender's Ed25519 identity key, which signed the message.
    pub fn sender_identity_key(&self) -> [u8; 32] {
        self.sender.identity_key
    }
}

/// The bytes a sender signs: [`SIGNATURE_LABEL`] ‖ its identity key ‖ the encoded message, as carried.
pub fn signature_input(sender_identity_key: &[u8], message: &[u8]) -> Vec<u8> {
    [SIGNATURE_LABEL, sender_identity_key, message].concat()
}

impl SealedContent {
    /// Encodes the message from `sender` (certified by `certificate`) to `recipient`'s account and sealing key,
    /// carrying `payload`, and signs that encoding.
    pub fn sign(
        sender: &Identity,
        certificate: &SignedCertificate,
        recipient: &AccountId,
        recipient_sealing_key: &[u8; 32],
        payload: Vec<u8>,
    ) -> Self {
        let message = WireMessage {
            recipient_account: recipient.as_bytes().to_vec(),
            recipient_sealing_key: recipient_sealing_key.to_vec(),
            payload,
        }
        .encode_to_vec();
        Self::sign_encoded(sender, certificate, message)
    }

    /// Signs `message`, an encoding of a [`WireMessage`] made by any encoder, exactly as given.
    pub fn sign_encoded(sender: &Identity, certificate: &SignedCertificate, message: Vec<u8>) -> Self {
        let signature = sender.sign(&signature_input(&sender.identity_key(), &message)).to_vec();
        Self {
            sender_certificate: certificate.certificate.clone(),
            certificate_signature: certificate.signature.to_vec(),
            message,
            signature,
        }
    }

    /// Checks the certificate (the relay's signature under `issuer`, valid at `at_ms`), then the sender's signature
    /// over the message bytes as carried under the identity key the certificate names, then decodes them. The
    /// recipient is not checked here.
    pub fn verify(&self, issuer: &VerifyingKey, at_ms: u64) -> Result<SealedMessage, OpenError> {
        let certificate = SignedCertificate::from_parts(&self.sender_certificate, &self.certificate_signature)
            .map_err(OpenError::Certificate)?;
        let sender = certificate.verify(issuer, at_ms).map_err(OpenError::Certificate)?;
        let vk = VerifyingKey::from_bytes(&sender.identity_key).map_err(|_| OpenError::Signature)?;
        self.verify_message(sender, &vk)
    }

    /// As [`SealedContent::verify`], with the certificate checked through `certificates` (its issuer's signature
    /// verified once per certificate, its expiry at every use: [`crate::verified_certificates`]). The sender's
    /// signature over the message is verified every time.
    pub fn verify_with(&self, certificates: &VerifiedCertificates, at_ms: u64) -> Result<SealedMessage, OpenError> {
        let verified = certificates
            .verify(&self.sender_certificate, &self.certificate_signature, at_ms)
            .map_err(OpenError::Certificate)?;
        self.verify_message(verified.certificate.clone(), &verified.identity_key)
    }

    /// The sender's signature under `identity_key` (the one `sender` names), then the message's decoding.
    fn verify_message(
        &self,
        sender: SenderCertificate,
        identity_key: &VerifyingKey,
    ) -> Result<SealedMessage, OpenError> {
        let sig = Signature::from_slice(&self.signature).map_err(|_| OpenError::Signature)?;
        identity_key
            .verify_strict(&signature_input(&sender.identity_key, &self.message), &sig)
            .map_err(|_| OpenError::Signature)?;
        let m = WireMessage::decode(self.message.as_slice()).map_err(|_| OpenError::Content)?;
        let recipient_account = AccountId::from_slice(&m.recipient_account).ok_or(OpenError::Content)?;
        let recipient_sealing_key = m.recipient_sealing_key.as_slice().try_into().map_err(|_| OpenError::Content)?;
        Ok(SealedMessage { sender, recipient_account, recipient_sealing_key, payload: m.payload })
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

/// Signs `payload` as `sender` (certified by `certificate`) and seals it to `recipient`'s sealing key, which the
/// signed content names.
pub fn seal_message(
    sender: &Identity,
    certificate: &SignedCertificate,
    recipient: &AccountId,
    recipient_sealing_key: &[u8; 32],
    payload: Vec<u8>,
) -> Result<Vec<u8>, OpenError> {
    let content = SealedContent::sign(sender, certificate, recipient, recipient_sealing_key, payload);
    seal(recipient_sealing_key, &content.encode_to_vec())
}

/// Opens an envelope stored at `stored_at_ms`, checks the sender's certificate under `issuer` (the relay's pinned
/// sender-certificate key) and signature as [`SealedContent::verify`] does, and that it was addressed to `me`: my
/// account and my sealing key.
pub fn open_message(
    me: &Identity,
    envelope: &[u8],
    issuer: &VerifyingKey,
    stored_at_ms: u64,
) -> Result<SealedMessage, OpenError> {
    let content = open_content(me, envelope)?;
    addressed_to(me, content.verify(issuer, stored_at_ms)?)
}

/// As [`open_message`], with the certificate checked through `certificates` (bound to the relay's pinned key):
/// every check is made, the relay's signature over a certificate only the first time it is seen.
pub fn open_message_with(
    me: &Identity,
    envelope: &[u8],
    certificates: &VerifiedCertificates,
    stored_at_ms: u64,
) -> Result<SealedMessage, OpenError> {
    let content = open_content(me, envelope)?;
    addressed_to(me, content.verify_with(certificates, stored_at_ms)?)
}

fn open_content(me: &Identity, envelope: &[u8]) -> Result<SealedContent, OpenError> {
    let plain = open(me, envelope)?;
    SealedContent::decode(plain.as_slice()).map_err(|_| OpenError::Content)
}

fn addressed_to(me: &Identity, m: SealedMessage) -> Result<SealedMessage, OpenError> {
    if m.recipient_account != me.account_id() {
        return Err(OpenError::WrongRecipient);
    }
    if m.recipient_sealing_key != me.sealing_key() {
        return Err(OpenError::WrongSealingKey);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use relay_proto::PhoneNumber;

    use super::*;

    const STORED_AT: u64 = 1_000;

    fn relay() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn issuer() -> VerifyingKey {
        relay().verifying_key()
    }

    /// A certificate the relay would issue to `who` for `phone`, valid until `expires_ms`.
    fn certificate(who: &Identity, phone: &str, expires_ms: u64) -> SignedCertificate {
        let phone = PhoneNumber::parse(phone).expect("valid test number");
        SenderCertificate::new(who.identity_key(), who.sealing_key(), phone, expires_ms).sign(&relay())
    }

    fn alice_cert(alice: &Identity) -> SignedCertificate {
        certificate(alice, "+33612345678", STORED_AT + 1)
    }

    fn seal_to(alice: &Identity, bob: &Identity, payload: &[u8]) -> Vec<u8> {
        seal_message(alice, &alice_cert(alice), &bob.account_id(), &bob.sealing_key(), payload.to_vec()).expect("seal")
    }

    #[test]
    fn round_trip_and_sender_identity_hidden() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let env = seal_to(&alice, &bob, b"MARKER-hello");
        assert_eq!(env[0], VERSION);
        let hay = String::from_utf8_lossy(&env);
        assert!(!hay.contains("MARKER") && !hay.contains("33612345678"));
        assert!(!env.windows(32).any(|w| w == alice.identity_key()), "sender key must not be visible");
        let m = open_message(&bob, &env, &issuer(), STORED_AT).expect("open");
        assert_eq!((m.payload.as_slice(), m.sender.phone.as_str()), (&b"MARKER-hello"[..], "+33612345678"));
        assert_eq!(m.sender_account(), alice.account_id());
        assert_eq!(m.sender_identity_key(), alice.identity_key());
        assert_eq!(m.sender.sealing_key, alice.sealing_key());
        assert_eq!(m.recipient_sealing_key, bob.sealing_key());
    }

    #[test]
    fn tampering_wrong_key_and_forgery_are_refused() {
        let (alice, bob, eve) = (Identity::generate(), Identity::generate(), Identity::generate());
        let env = seal_to(&alice, &bob, b"hi");
        for i in [0, 5, env.len() - 1] {
            let mut bad = env.clone();
            bad[i] ^= 1;
            assert!(open_message(&bob, &bad, &issuer(), STORED_AT).is_err(), "flip at {i}");
        }
        assert_eq!(open_message(&eve, &env, &issuer(), STORED_AT), Err(OpenError::Decrypt));
        assert_eq!(open_message(&bob, &env[..20], &issuer(), STORED_AT), Err(OpenError::Format));
        // Eve re-seals Alice's signed content with a changed text: the signature breaks.
        let mut c =
            SealedContent::sign(&alice, &alice_cert(&alice), &bob.account_id(), &bob.sealing_key(), b"hi".to_vec());
        let mut m = WireMessage::decode(c.message.as_slice()).expect("decodes");
        m.payload = b"pay eve".to_vec();
        c.message = m.encode_to_vec();
        let forged = seal(&bob.sealing_key(), &c.encode_to_vec()).expect("seal");
        assert_eq!(open_message(&bob, &forged, &issuer(), STORED_AT), Err(OpenError::Signature));
        // Content signed for Bob and re-sealed to Eve is refused by Eve.
        let c = SealedContent::sign(&alice, &alice_cert(&alice), &bob.account_id(), &eve.sealing_key(), b"x".to_vec());
        let resealed = seal(&eve.sealing_key(), &c.encode_to_vec()).expect("seal");
        assert_eq!(open_message(&eve, &resealed, &issuer(), STORED_AT), Err(OpenError::WrongRecipient));
    }

    /// What a sender can do to appear as someone else, and why each fails: a certificate it made itself, a genuine
    /// certificate of someone else (it received one in a message), one that expired, one that is not well formed.
    #[test]
    fn a_sender_cannot_borrow_or_make_a_certificate() {
        let (alice, bob, mallory) = (Identity::generate(), Identity::generate(), Identity::generate());
        let send = |cert: &SignedCertificate| {
            let c = SealedContent::sign(&mallory, cert, &bob.account_id(), &bob.sealing_key(), b"hi".to_vec());
            let env = seal(&bob.sealing_key(), &c.encode_to_vec()).expect("seal");
            open_message(&bob, &env, &issuer(), STORED_AT)
        };
        // Mallory's own genuine certificate works, and says Mallory's number.
        let own = certificate(&mallory, "+33633333333", STORED_AT + 1);
        assert_eq!(send(&own).expect("genuine").sender.phone.as_str(), "+33633333333");
        // A certificate for Alice's number signed by anyone but the relay.
        let made_up = SenderCertificate::new(
            mallory.identity_key(),
            mallory.sealing_key(),
            PhoneNumber::parse("+33612345678").expect("valid"),
            STORED_AT + 1,
        )
        .sign(&SigningKey::from_bytes(&[9; 32]));
        assert_eq!(send(&made_up), Err(OpenError::Certificate(IdentityError::BadSignature)));
        // Alice's genuine certificate: it names Alice's key, which did not sign.
        assert_eq!(send(&alice_cert(&alice)), Err(OpenError::Signature));
        // Expired when the relay stored the envelope.
        let expired = certificate(&mallory, "+33633333333", STORED_AT);
        assert_eq!(send(&expired), Err(OpenError::Certificate(IdentityError::Expired { expires_ms: STORED_AT })));
        // Bytes that are not a certificate, or a signature of the wrong length.
        let mut garbage = own.clone();
        garbage.certificate.push(0);
        assert!(matches!(send(&garbage), Err(OpenError::Certificate(_))));
        let c = SealedContent {
            certificate_signature: vec![0; 63],
            ..SealedContent::sign(&mallory, &own, &bob.account_id(), &bob.sealing_key(), b"hi".to_vec())
        };
        let env = seal(&bob.sealing_key(), &c.encode_to_vec()).expect("seal");
        assert!(matches!(open_message(&bob, &env, &issuer(), STORED_AT), Err(OpenError::Certificate(_))));
    }

    /// A relay that handed Alice its own key for Bob opens the envelope and seals the content again to Bob's real
    /// key: what Alice signed names the relay's key, so Bob refuses it.
    #[test]
    fn content_sealed_to_a_substituted_key_is_refused() {
        let (alice, bob, relay_key) = (Identity::generate(), Identity::generate(), Identity::generate());
        let env = seal_message(&alice, &alice_cert(&alice), &bob.account_id(), &relay_key.sealing_key(), b"x".to_vec())
            .expect("seal");
        let plain = open(&relay_key, &env).expect("the relay opens what was sealed to its key");
        let resealed = seal(&bob.sealing_key(), &plain).expect("seal");
        assert_eq!(open_message(&bob, &resealed, &issuer(), STORED_AT), Err(OpenError::WrongSealingKey));
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
        field(&mut message, 2, &bob.sealing_key());
        field(&mut message, 15, b"a field this version does not know");
        field(&mut message, 1, bob.account_id().as_bytes());
        field(&mut message, 3, b"the payload");
        let canonical = WireMessage::decode(message.as_slice()).expect("valid protobuf").encode_to_vec();
        assert_ne!(canonical, message, "the test needs an encoding that re-encoding would change");

        let content = SealedContent::sign_encoded(&alice, &alice_cert(&alice), message.clone());
        let env = seal(&bob.sealing_key(), &content.encode_to_vec()).expect("seal");
        let m = open_message(&bob, &env, &issuer(), STORED_AT).expect("verified against the bytes as sent");
        assert_eq!(m.payload.as_slice(), &b"the payload"[..]);
        assert_eq!(m.sender_identity_key(), alice.identity_key());

        // A signature over the canonical re-encoding does not cover the bytes carried.
        let resigned = SealedContent { message, ..SealedContent::sign_encoded(&alice, &alice_cert(&alice), canonical) };
        let env = seal(&bob.sealing_key(), &resigned.encode_to_vec()).expect("seal");
        assert_eq!(open_message(&bob, &env, &issuer(), STORED_AT), Err(OpenError::Signature));
    }

    /// With the sender's certificate already verified and held, every check still runs: a signature that does not
    /// verify, content altered under it, a genuine certificate borrowed by another signer, a certificate signature
    /// altered, and a held certificate that expired are all refused as without the cache.
    #[test]
    fn a_warm_certificate_cache_refuses_what_a_full_check_refuses() {
        let (alice, bob, mallory) = (Identity::generate(), Identity::generate(), Identity::generate());
        let cache = VerifiedCertificates::new(issuer());
        let open = |env: &[u8], at: u64| open_message_with(&bob, env, &cache, at);
        let cert = alice_cert(&alice);
        let sign = |who: &Identity, payload: &[u8]| {
            SealedContent::sign(who, &cert, &bob.account_id(), &bob.sealing_key(), payload.to_vec())
        };
        let seal_content = |c: &SealedContent| seal(&bob.sealing_key(), &c.encode_to_vec()).expect("seal");
        // Warm: a genuine envelope opens and its certificate is held.
        assert_eq!(open(&seal_content(&sign(&alice, b"one")), STORED_AT).expect("genuine").payload, b"one");
        assert_eq!(cache.len(), 1);
        // A flipped signature byte.
        let mut c = sign(&alice, b"two");
        c.signature[7] ^= 1;
        assert_eq!(open(&seal_content(&c), STORED_AT), Err(OpenError::Signature));
        // The message changed under Alice's signature.
        let mut c = sign(&alice, b"two");
        let mut m = WireMessage::decode(c.message.as_slice()).expect("decodes");
        m.payload = b"pay mallory".to_vec();
        c.message = m.encode_to_vec();
        assert_eq!(open(&seal_content(&c), STORED_AT), Err(OpenError::Signature));
        // Mallory carries Alice's held certificate and signs with its own key.
        assert_eq!(open(&seal_content(&sign(&mallory, b"hi")), STORED_AT), Err(OpenError::Signature));
        // Alice's certificate with its relay signature altered is a miss, verified in full.
        let mut c = sign(&alice, b"three");
        c.certificate_signature[0] ^= 1;
        assert_eq!(open(&seal_content(&c), STORED_AT), Err(OpenError::Certificate(IdentityError::BadSignature)));
        // Stored when the held certificate had expired.
        assert_eq!(
            open(&seal_content(&sign(&alice, b"late")), STORED_AT + 1),
            Err(OpenError::Certificate(IdentityError::Expired { expires_ms: STORED_AT + 1 }))
        );
        // Not for Bob, and for Bob but sealed to a substituted key, as in the tests without the cache.
        let c = SealedContent::sign(&alice, &cert, &mallory.account_id(), &bob.sealing_key(), b"x".to_vec());
        assert_eq!(open(&seal_content(&c), STORED_AT), Err(OpenError::WrongRecipient));
        let c = SealedContent::sign(&alice, &cert, &bob.account_id(), &mallory.sealing_key(), b"x".to_vec());
        assert_eq!(open(&seal_content(&c), STORED_AT), Err(OpenError::WrongSealingKey));
        // And the genuine sender still gets through, with the certificate held once.
        assert_eq!(open(&seal_content(&sign(&alice, b"four")), STORED_AT).expect("genuine").payload, b"four");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn envelopes_of_earlier_versions_are_refused() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        for version in [1, 2] {
            let mut env = seal_to(&alice, &bob, b"x");
            env[0] = version;
            assert_eq!(open_message(&bob, &env, &issuer(), STORED_AT), Err(OpenError::Format));
        }
    }

    #[test]
    fn test_vector_sealing_is_deterministic_and_opens() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let content =
            SealedContent::sign(&alice, &alice_cert(&alice), &bob.account_id(), &bob.sealing_key(), b"p".to_vec())
                .encode_to_vec();
        let a = seal_for_test_vector([9; 32], &bob.sealing_key(), &content).expect("seal");
        assert_eq!(a, seal_for_test_vector([9; 32], &bob.sealing_key(), &content).expect("seal"));
        assert_eq!(open_message(&bob, &a, &issuer(), STORED_AT).expect("open").payload, b"p");
    }

    #[test]
    fn low_order_key_refused() {
        assert_eq!(seal(&[0u8; 32], b"x"), Err(OpenError::Degenerate));
    }
}
