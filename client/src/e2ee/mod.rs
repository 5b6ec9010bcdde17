//! End-to-end encryption core: PQXDH session set-up, the Double Ratchet, the prekeys that make both possible, the
//! wire encoding of what travels inside a sealed envelope, and safety numbers.
//!
//! Contract:
//! - This module owns the device's prekey secrets ([`prekeys::PrekeyStore`]), the per-peer session state
//!   ([`ratchet::RatchetState`]) and the byte format of end-to-end messages ([`message::E2eeMessage`]). Callers
//!   persist those (they are `serde`-serializable) and decide when to rotate, replenish and prune.
//! - It never does I/O: no files, sockets, clock or logging. Bytes, keys and the current time (as `now_ms`) go in,
//!   bytes and state changes come out. Randomness comes from `rand::rng()`.
//! - It is client-side only and must never be linked by the relay: the relay routes opaque envelopes and never
//!   holds a key that could open them.
//! - Peer input never panics: every decoder and every key taken from a message is checked first, and failures
//!   are reported as an [`E2eeError`]. A failed decryption leaves the session state unchanged.
//!
//! Layers, bottom up: [`prekeys`] (keys a peer fetches to start a session), [`pqxdh`] (the initial key agreement),
//! [`ratchet`] (per-message keys), [`message`] (encoding), [`safety`] (what two people compare to detect a
//! substituted identity key).

pub mod message;
pub mod pqxdh;
pub mod prekeys;
pub mod ratchet;
pub mod safety;

#[cfg(test)]
mod tests;

pub use message::E2eeMessage;
pub use pqxdh::{InitialHeader, SharedSecret, initiate, respond};
pub use prekeys::{OneTimePrekey, PrekeyBundle, PrekeyStore, SignedKemPrekey, SignedPrekey, verify_bundle};
pub use ratchet::{Header, RatchetMessage, RatchetState};
pub use safety::SafetyNumber;

/// Which kind of prekey an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrekeyKind {
    /// The signed X25519 prekey.
    Signed,
    /// A one-time X25519 prekey.
    OneTime,
    /// An ML-KEM-768 prekey (one-time or last resort).
    Kem,
}

impl std::fmt::Display for PrekeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Signed => "signed prekey",
            Self::OneTime => "one-time prekey",
            Self::Kem => "ML-KEM prekey",
        })
    }
}

/// Why an end-to-end operation failed. None of these carry secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum E2eeError {
    /// A signature (prekey, or the binding of an identity DH key to its identity key) does not verify, or the
    /// signing key is not a valid Ed25519 key. Nothing signed by it was used.
    #[error("signature does not verify")]
    BadSignature,
    /// A Diffie-Hellman output is all zeros: the peer sent a low-order point.
    #[error("degenerate key exchange (non-contributory Diffie-Hellman output)")]
    Degenerate,
    /// The message refers to a prekey this device does not hold (never existed, already used, or expired).
    #[error("no {kind} with id {id}")]
    MissingPrekey {
        /// Which kind of prekey.
        kind: PrekeyKind,
        /// The id the message names.
        id: u32,
    },
    /// Authentication of a message failed: tampered with, not for this session, or a corrupted session set-up.
    #[error("message does not decrypt (tampered, or not for this session)")]
    Decrypt,
    /// The message was already decrypted: a duplicate delivery. Safe to drop silently.
    #[error("message already received (replay or duplicate delivery)")]
    Replay,
    /// The message's key was discarded from the bounded store of skipped keys before it arrived.
    #[error("message key discarded: too many messages were skipped before this one arrived")]
    KeyEvicted,
    /// The message asks to skip more keys in one chain than [`ratchet::MAX_SKIP`].
    #[error("message skips {skipped} messages, more than the {max} allowed")]
    TooManySkipped {
        /// How many keys the message would have skipped.
        skipped: u64,
        /// The limit.
        max: u32,
    },
    /// A chain reached 2^32 messages; the session must be set up again.
    #[error("message counter exhausted")]
    ChainExhausted,
    /// The responder cannot send before the initiator's first message has arrived.
    #[error("no sending chain yet: the first message must come from the initiator")]
    NotReady,
    /// Bytes or fields of the wrong size or shape.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// Secret bytes: wiped when dropped, never printed, hex-encoded by serde (for the 0600 state files).
///
/// Wiping is best effort: without a zeroize dependency the overwrite is kept alive with `black_box`, and copies
/// the compiler made earlier (moves) are not reached.
#[derive(Clone)]
pub(crate) struct Secret<const N: usize>([u8; N]);

impl<const N: usize> Secret<N> {
    pub(crate) fn new(bytes: [u8; N]) -> Self {
        Self(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; N] {
        &self.0
    }

    pub(crate) fn as_mut(&mut self) -> &mut [u8; N] {
        &mut self.0
    }
}

impl<const N: usize> Drop for Secret<N> {
    fn drop(&mut self) {
        self.0 = [0; N];
        std::hint::black_box(&mut self.0);
    }
}

impl<const N: usize> std::fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl<const N: usize> serde::Serialize for Secret<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        hex_bytes::serialize(&self.0, s)
    }
}

impl<'de, const N: usize> serde::Deserialize<'de> for Secret<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        hex_bytes::deserialize(d).map(Self)
    }
}

/// `#[serde(with = "hex_bytes")]` for byte arrays and vectors: a hex string, length checked on the way in.
pub(crate) mod hex_bytes {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer, T: AsRef<[u8]>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: TryFrom<Vec<u8>>>(d: D) -> Result<T, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = hex::decode(s.as_ref()).map_err(D::Error::custom)?;
        T::try_from(bytes).map_err(|_| D::Error::custom("byte string of the wrong length"))
    }
}

/// The 32-byte output of an X25519 exchange, refusing a non-contributory (all-zero) result.
pub(crate) fn x25519(secret: &x25519_dalek::StaticSecret, their_public: &[u8; 32]) -> Result<Secret<32>, E2eeError> {
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*their_public));
    if !shared.was_contributory() {
        return Err(E2eeError::Degenerate);
    }
    Ok(Secret::new(shared.to_bytes()))
}
