//! The Double Ratchet, after Signal's published specification, with X25519, HKDF-SHA256, HMAC-SHA256 and
//! ChaCha20-Poly1305.
//!
//! - KDF_RK(rk, dh) = HKDF-SHA256(salt = rk, ikm = dh, info = `"ConsentRelay_Ratchet"`) → 64 bytes: new root key,
//!   chain key.
//! - KDF_CK(ck) = HMAC-SHA256(ck, 0x01) → message key; HMAC-SHA256(ck, 0x02) → next chain key.
//! - Message encryption: HKDF-SHA256(salt = 32 zero bytes, ikm = message key, info = `"ConsentRelay_Message"`) →
//!   44 bytes: ChaCha20-Poly1305 key (32) and nonce (12); associated data = AD ‖ [`Header::encode`]. Each message
//!   key encrypts one message, so the derived nonce is never reused with its key.
//! - Header = (sender's current ratchet public key, PN = length of the sender's previous sending chain, N = number
//!   of this message in the current chain).
//! - Initialisation: the initiator starts with the responder's signed prekey as the remote ratchet key and can send
//!   at once; the responder starts with the signed prekey pair as its ratchet key and can send once the initiator's
//!   first message has arrived ([`E2eeError::NotReady`] before).
//!
//! Bounds on out-of-order delivery (they bound memory and the work one message can cause):
//! - [`MAX_SKIP`] = 1000: one message may make the receiver skip at most 1000 keys in a chain (the rest of the
//!   previous chain, up to PN, and again in the new chain, up to N, each count separately). More is
//!   [`E2eeError::TooManySkipped`].
//! - [`MAX_SKIPPED_KEYS`] = 2000: at most 2000 skipped message keys are kept in all; beyond that the oldest is
//!   evicted first, and its message, if it ever arrives, fails with [`E2eeError::KeyEvicted`] (the ids of the last
//!   [`MAX_EVICTED_IDS`] evicted keys are remembered to tell that apart from a replay).
//!
//! A message already decrypted fails with [`E2eeError::Replay`] (recognised for the current receiving chain and
//! the last [`MAX_PAST_CHAINS`] ones; an older duplicate fails as [`E2eeError::Decrypt`]). Any failed decryption
//! leaves the state unchanged: [`RatchetState::decrypt`] computes on copies of the keys it needs and commits only
//! after the message authenticated. The state is `serde`-serializable; persist it after every successful
//! encryption or decryption.

use std::collections::VecDeque;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use super::pqxdh::SharedSecret;
use super::{E2eeError, Secret, hex_bytes, x25519};

/// Most keys one message may make the receiver skip in one chain.
pub const MAX_SKIP: u32 = 1000;
/// Most skipped message keys kept in all; the oldest is evicted first.
pub const MAX_SKIPPED_KEYS: usize = 2000;
/// How many ids of evicted keys are remembered, to report [`E2eeError::KeyEvicted`] rather than a replay.
pub const MAX_EVICTED_IDS: usize = 2000;
/// How many finished receiving chains are remembered, to recognise replays of their messages.
pub const MAX_PAST_CHAINS: usize = 256;

const RATCHET_INFO: &[u8] = b"ConsentRelay_Ratchet";
const MESSAGE_INFO: &[u8] = b"ConsentRelay_Message";
const TAG_LEN: usize = 16;

/// The clear header of a ratchet message (authenticated as associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sender's current ratchet public key (X25519).
    pub dh: [u8; 32],
    /// Number of messages in the sender's previous sending chain.
    pub pn: u32,
    /// Number of this message in the current sending chain.
    pub n: u32,
}

impl Header {
    /// Length of [`Header::encode`].
    pub const ENCODED_LEN: usize = 40;

    /// The fixed encoding authenticated with each message: `dh ‖ pn (u32 BE) ‖ n (u32 BE)`. Independent of the wire
    /// encoding, so that re-encoding the same header can never change what was authenticated.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0; Self::ENCODED_LEN];
        out[..32].copy_from_slice(&self.dh);
        out[32..36].copy_from_slice(&self.pn.to_be_bytes());
        out[36..].copy_from_slice(&self.n.to_be_bytes());
        out
    }
}

/// A header and its ciphertext (ChaCha20-Poly1305 output, tag included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatchetMessage {
    /// The clear header.
    pub header: Header,
    /// The encrypted content.
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct RatchetKey(#[serde(with = "hex_bytes")] [u8; 32]);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Chain {
    key: Secret<32>,
    /// Number of the next message in this chain.
    n: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct MessageId {
    dh: RatchetKey,
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SkippedKey {
    id: MessageId,
    key: Secret<32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct PastChain {
    dh: RatchetKey,
    /// Every message below this number was decrypted, skipped or evicted.
    end: u32,
}

/// One side of a Double Ratchet session.
#[derive(Clone, Serialize, Deserialize)]
pub struct RatchetState {
    root: Secret<32>,
    dh_self: Secret<32>,
    dh_self_public: RatchetKey,
    dh_remote: Option<RatchetKey>,
    sending: Option<Chain>,
    receiving: Option<Chain>,
    previous_sending_len: u32,
    /// Oldest first.
    skipped: VecDeque<SkippedKey>,
    /// Oldest first.
    evicted: VecDeque<MessageId>,
    /// Oldest first.
    past_chains: VecDeque<PastChain>,
}

impl std::fmt::Debug for RatchetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RatchetState")
            .field("sent_in_chain", &self.sending.as_ref().map(|c| c.n))
            .field("received_in_chain", &self.receiving.as_ref().map(|c| c.n))
            .field("previous_sending_len", &self.previous_sending_len)
            .field("skipped_keys", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

fn kdf_rk(root: &Secret<32>, dh: &Secret<32>) -> (Secret<32>, Secret<32>) {
    let mut okm = Secret::new([0; 64]);
    Hkdf::<Sha256>::new(Some(root.as_bytes()), dh.as_bytes())
        .expand(RATCHET_INFO, okm.as_mut())
        // 64 bytes is far below HKDF-SHA256's output limit of 255 * 32.
        .expect("64-byte HKDF output is valid");
    let (mut rk, mut ck) = ([0; 32], [0; 32]);
    rk.copy_from_slice(&okm.as_bytes()[..32]);
    ck.copy_from_slice(&okm.as_bytes()[32..]);
    (Secret::new(rk), Secret::new(ck))
}

/// (message key, next chain key).
fn kdf_ck(chain_key: &Secret<32>) -> (Secret<32>, Secret<32>) {
    let mac = |byte: u8| {
        // HMAC accepts keys of any length.
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(chain_key.as_bytes()).expect("HMAC takes any key");
        m.update(&[byte]);
        Secret::new(m.finalize().into_bytes().into())
    };
    (mac(0x01), mac(0x02))
}

fn message_cipher(message_key: &Secret<32>) -> (ChaCha20Poly1305, Nonce) {
    let mut okm = Secret::new([0; 44]);
    Hkdf::<Sha256>::new(Some(&[0; 32]), message_key.as_bytes())
        .expand(MESSAGE_INFO, okm.as_mut())
        // 44 bytes is far below HKDF-SHA256's output limit of 255 * 32.
        .expect("44-byte HKDF output is valid");
    let mut key = Secret::new([0; 32]);
    key.as_mut().copy_from_slice(&okm.as_bytes()[..32]);
    let mut nonce = [0; 12];
    nonce.copy_from_slice(&okm.as_bytes()[32..]);
    (ChaCha20Poly1305::new(&(*key.as_bytes()).into()), nonce.into())
}

fn associated_data(ad: &[u8], header: &Header) -> Vec<u8> {
    [ad, &header.encode()].concat()
}

fn open(message_key: &Secret<32>, message: &RatchetMessage, ad: &[u8]) -> Result<Vec<u8>, E2eeError> {
    if message.ciphertext.len() < TAG_LEN {
        return Err(E2eeError::Malformed("ratchet ciphertext"));
    }
    let (cipher, nonce) = message_cipher(message_key);
    cipher
        .decrypt(&nonce, Payload { msg: &message.ciphertext, aad: &associated_data(ad, &message.header) })
        .map_err(|_| E2eeError::Decrypt)
}

/// Advances `chain` (belonging to remote key `dh`) to message number `until`, appending the skipped keys to `out`.
fn skip(out: &mut Vec<SkippedKey>, dh: RatchetKey, chain: &mut Chain, until: u32) -> Result<(), E2eeError> {
    let count = until.saturating_sub(chain.n);
    if count > MAX_SKIP {
        return Err(E2eeError::TooManySkipped { skipped: count.into(), max: MAX_SKIP });
    }
    out.reserve(count as usize);
    while chain.n < until {
        let (message_key, next) = kdf_ck(&chain.key);
        out.push(SkippedKey { id: MessageId { dh, n: chain.n }, key: message_key });
        chain.key = next;
        chain.n += 1;
    }
    Ok(())
}

/// What a DH ratchet step changes besides the receiving chain, staged until the message authenticates.
struct Step {
    root: Secret<32>,
    dh_self: StaticSecret,
    sending: Chain,
    /// The receiving chain being closed, with where it ended.
    closed: Option<PastChain>,
}

impl RatchetState {
    /// The initiator's state after PQXDH: `their_signed_prekey` (from the bundle) is the first remote ratchet key.
    pub fn init_initiator(shared: &SharedSecret, their_signed_prekey: &[u8; 32]) -> Result<Self, E2eeError> {
        let dh_self = StaticSecret::random_from_rng(&mut rand::rng());
        let (root, sending) = kdf_rk(shared.secret(), &x25519(&dh_self, their_signed_prekey)?);
        Ok(Self {
            root,
            dh_self_public: RatchetKey(PublicKey::from(&dh_self).to_bytes()),
            dh_self: Secret::new(dh_self.to_bytes()),
            dh_remote: Some(RatchetKey(*their_signed_prekey)),
            sending: Some(Chain { key: sending, n: 0 }),
            receiving: None,
            previous_sending_len: 0,
            skipped: VecDeque::new(),
            evicted: VecDeque::new(),
            past_chains: VecDeque::new(),
        })
    }

    /// The responder's state after PQXDH: the signed prekey pair the initiator used is the first ratchet key pair
    /// (see [`PrekeyStore::signed_prekey_secret`](super::PrekeyStore::signed_prekey_secret)).
    pub fn init_responder(shared: &SharedSecret, signed_prekey: &StaticSecret) -> Self {
        Self {
            root: shared.secret().clone(),
            dh_self_public: RatchetKey(PublicKey::from(signed_prekey).to_bytes()),
            dh_self: Secret::new(signed_prekey.to_bytes()),
            dh_remote: None,
            sending: None,
            receiving: None,
            previous_sending_len: 0,
            skipped: VecDeque::new(),
            evicted: VecDeque::new(),
            past_chains: VecDeque::new(),
        }
    }

    /// Whether [`encrypt`](Self::encrypt) can be called: always for the initiator, for the responder once a
    /// message has been received.
    pub fn can_send(&self) -> bool {
        self.sending.is_some()
    }

    /// How many skipped message keys are held, waiting for late messages.
    pub fn skipped_keys(&self) -> usize {
        self.skipped.len()
    }

    /// Encrypts `plaintext`; `ad` is the session's associated data from PQXDH.
    pub fn encrypt(&mut self, plaintext: &[u8], ad: &[u8]) -> Result<RatchetMessage, E2eeError> {
        let chain = self.sending.as_mut().ok_or(E2eeError::NotReady)?;
        let header = Header { dh: self.dh_self_public.0, pn: self.previous_sending_len, n: chain.n };
        let next_n = chain.n.checked_add(1).ok_or(E2eeError::ChainExhausted)?;
        let (message_key, next_key) = kdf_ck(&chain.key);
        let (cipher, nonce) = message_cipher(&message_key);
        let ciphertext = cipher
            .encrypt(&nonce, Payload { msg: plaintext, aad: &associated_data(ad, &header) })
            // ChaCha20-Poly1305 refuses only messages over 256 GiB, which no caller can hold in memory twice.
            .map_err(|_| E2eeError::Malformed("plaintext too long"))?;
        chain.key = next_key;
        chain.n = next_n;
        Ok(RatchetMessage { header, ciphertext })
    }

    /// Decrypts `message`; `ad` is the session's associated data from PQXDH. On error the state is unchanged.
    pub fn decrypt(&mut self, message: &RatchetMessage, ad: &[u8]) -> Result<Vec<u8>, E2eeError> {
        let header = &message.header;
        let id = MessageId { dh: RatchetKey(header.dh), n: header.n };
        if let Some(pos) = self.skipped.iter().position(|s| s.id == id) {
            let plaintext = open(&self.skipped[pos].key, message, ad)?;
            self.skipped.remove(pos);
            return Ok(plaintext);
        }
        if self.evicted.contains(&id) {
            return Err(E2eeError::KeyEvicted);
        }
        if let Some(past) = self.past_chains.iter().find(|c| c.dh == id.dh) {
            // An honest sender never uses a chain beyond the PN it announced when it moved on.
            return Err(if header.n < past.end { E2eeError::Replay } else { E2eeError::Decrypt });
        }

        let mut skipped = Vec::new();
        let (mut receiving, step) = if self.dh_remote == Some(id.dh) {
            // The initiator's first remote key (the signed prekey) never sends: no receiving chain for it.
            let chain = self.receiving.clone().ok_or(E2eeError::Decrypt)?;
            if header.n < chain.n {
                return Err(E2eeError::Replay);
            }
            (chain, None)
        } else {
            self.stage_step(header, &mut skipped)?
        };
        skip(&mut skipped, id.dh, &mut receiving, header.n)?;
        let next_n = header.n.checked_add(1).ok_or(E2eeError::ChainExhausted)?;
        let (message_key, next_key) = kdf_ck(&receiving.key);
        let plaintext = open(&message_key, message, ad)?;

        // Authenticated: commit.
        receiving.key = next_key;
        receiving.n = next_n;
        if let Some(step) = step {
            if let Some(closed) = step.closed {
                if self.past_chains.len() == MAX_PAST_CHAINS {
                    self.past_chains.pop_front();
                }
                self.past_chains.push_back(closed);
            }
            self.previous_sending_len = self.sending.as_ref().map_or(0, |c| c.n);
            self.root = step.root;
            self.dh_self_public = RatchetKey(PublicKey::from(&step.dh_self).to_bytes());
            self.dh_self = Secret::new(step.dh_self.to_bytes());
            self.dh_remote = Some(id.dh);
            self.sending = Some(step.sending);
        }
        self.receiving = Some(receiving);
        for key in skipped {
            self.store_skipped(key);
        }
        Ok(plaintext)
    }

    /// Computes a DH ratchet step to the remote key in `header` without changing `self`: the keys skipped in the
    /// closing receiving chain (up to PN) go to `skipped`; returns the new receiving chain and the rest.
    fn stage_step(&self, header: &Header, skipped: &mut Vec<SkippedKey>) -> Result<(Chain, Option<Step>), E2eeError> {
        let closed = match (&self.receiving, self.dh_remote) {
            (Some(chain), Some(remote)) => {
                let mut chain = chain.clone();
                skip(skipped, remote, &mut chain, header.pn)?;
                Some(PastChain { dh: remote, end: chain.n })
            }
            _ => None,
        };
        let dh_self = StaticSecret::from(*self.dh_self.as_bytes());
        let (root, receiving) = kdf_rk(&self.root, &x25519(&dh_self, &header.dh)?);
        let dh_self = StaticSecret::random_from_rng(&mut rand::rng());
        let (root, sending) = kdf_rk(&root, &x25519(&dh_self, &header.dh)?);
        let step = Step { root, dh_self, sending: Chain { key: sending, n: 0 }, closed };
        Ok((Chain { key: receiving, n: 0 }, Some(step)))
    }

    fn store_skipped(&mut self, key: SkippedKey) {
        self.skipped.push_back(key);
        while self.skipped.len() > MAX_SKIPPED_KEYS {
            let Some(oldest) = self.skipped.pop_front() else { break };
            if self.evicted.len() == MAX_EVICTED_IDS {
                self.evicted.pop_front();
            }
            self.evicted.push_back(oldest.id);
        }
    }
}
