//! The device's end-to-end state and its persistence: the prekey store (`prekeys.json`), one Double Ratchet
//! session per peer account (`session-<account>.json`) and the first messages already answered
//! (`initial-messages.json`), each file private (0600) in the home, rewritten (synced, then renamed) when it
//! changes:
//! - after encrypting a batch of outgoing messages ([`Sessions::encrypt_batch`]), once per peer the batch touched
//!   and before any message of the batch is returned, so none can leave the device before the state that follows
//!   it is on disk, and a crash can never make the device reuse a key; a batch of N messages to one peer costs one
//!   write, not N, and the files of all the peers a batch touched are flushed together (about one flush per batch,
//!   `relay_quic::durable_file::replace_all`);
//! - after decrypting, at the latest in [`Sessions::flush`], which the messenger calls before acknowledging
//!   deliveries to the relay. A crash before that only means the relay delivers again and the old state decrypts
//!   again, so receiving a batch costs one write per peer instead of one per message, all flushed together.
//!
//! One writer: a `Sessions` is loaded from disk under the home's lock ([`HomeLock`]) and owns it until it is
//! closed or dropped, so no two of them (in one process or two) ever hold state for the same home at once, and
//! each encrypts with the latest state written. Load one per operation: keeping it while idle would keep every
//! other client of the home waiting.
//!
//! Replays change nothing. The ratchet refuses a message it already decrypted. A first (PreKey) message that no
//! current state accepts is answered with PQXDH only if it was never answered before: the digest of each initial
//! header answered is remembered (for as long as its signed prekey lives, since without it the header cannot be
//! answered anyway; at most [`MAX_INITIAL_MESSAGES`], oldest forgotten first). Otherwise a replayed first message
//! would set up its session again, pushing a new state each time until the genuine one is evicted. A peer's
//! access key is replaced only by one sent later than the key held ([`Sessions::learn_peer_access_key`]).
//!
//! A session is started from a peer's prekey bundle (PQXDH) by [`Sessions::start`]; until the peer answers, every
//! message carries the PQXDH header. A first message from a peer starts the responder side.
//!
//! When both sides start a session at the same time, each ends up with two: the one it initiated and the one the
//! other initiated. So a peer keeps up to [`MAX_STATES`] session states, newest first; a message is tried against
//! each, and the state that decrypts it becomes the current one. Both sides thus converge on one session within a
//! round trip, and no message of either session is lost.

use std::collections::{HashMap, VecDeque};

use relay_proto::AccountId;
use relay_proto::wire::{self, KemPrekey, OneTimePrekey, PrekeyCounts, SignedPrekey, UploadPrekeys};
use serde::{Deserialize, Serialize};

use crate::e2ee::E2eeError;
use crate::e2ee::message::E2eeMessage;
use crate::e2ee::pqxdh::{self, InitialHeader};
use crate::e2ee::prekeys::{self, PrekeyBundle, PrekeyStore};
use crate::e2ee::ratchet::{RatchetMessage, RatchetState};
use crate::home::{Home, HomeError, HomeLock};
use crate::identity::Identity;

/// Session states kept per peer (the current one and those it replaced).
pub const MAX_STATES: usize = 4;
/// One-time prekeys of each kind generated per replenishment.
pub const PREKEY_BATCH: usize = 100;
/// The signed prekey is rotated after this long (the previous one stays usable for a grace period).
pub const SIGNED_PREKEY_ROTATION_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most initial headers remembered as answered (see the module header).
pub const MAX_INITIAL_MESSAGES: usize = 10_000;
const INITIAL_FILE: &str = "initial-messages.json";
const INITIAL_DIGEST_LABEL: &[u8] = b"ConsentRelay_InitialHeader_v1";

/// Why an end-to-end operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The cryptography refused (bad signature, tampered, replayed, unknown prekey...).
    #[error(transparent)]
    E2ee(#[from] E2eeError),
    /// Local state.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The relay's bundle is not well formed.
    #[error("malformed prekey bundle from the relay: {0}")]
    Bundle(&'static str),
    /// A bundle or message names another identity than expected.
    #[error("identity key mismatch: {0}")]
    IdentityMismatch(&'static str),
    /// A ratchet message arrived for a session this device does not have.
    #[error("no session with the sender (it may have been reset): ask them to send again")]
    NoSession,
    /// A first message whose session was already set up from it, and that no current state accepts: a replay (or a
    /// late message of a session since replaced). Nothing changed.
    #[error("first message of a session already set up (replayed, or its session was replaced): ignored")]
    InitialReplayed,
}

#[derive(Serialize, Deserialize)]
struct PrekeyFile {
    store: PrekeyStore,
    signed_rotated_at_ms: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct SessionState {
    #[serde(with = "crate::e2ee::hex_bytes")]
    ad: Vec<u8>,
    ratchet: RatchetState,
    /// Sent with every message until the peer has answered.
    pending_header: Option<InitialHeader>,
}

#[derive(Clone, Serialize, Deserialize)]
struct PeerSession {
    #[serde(with = "crate::e2ee::hex_bytes")]
    peer_identity_key: [u8; 32],
    /// Newest (current) first, at most [`MAX_STATES`].
    states: Vec<SessionState>,
    /// The peer's sealed-sender access key, once it shared it.
    #[serde(default, with = "hex_opt")]
    access_key: Option<[u8; 32]>,
    /// When the peer wrote the message that carried the newest access key seen (its clock, ms): an older
    /// message's key never replaces it.
    #[serde(default)]
    access_key_sent_at_ms: u64,
}

impl PeerSession {
    /// Makes `state` the current one.
    fn push(&mut self, state: SessionState) {
        self.states.insert(0, state);
        self.states.truncate(MAX_STATES);
    }

    /// Decrypts with the first state that accepts the message and makes it current; `answered` clears its pending
    /// header. Nothing changes if no state accepts it; the error is the current state's.
    fn decrypt(&mut self, message: &RatchetMessage, answered: bool) -> Result<Vec<u8>, E2eeError> {
        let mut first_error = None;
        for i in 0..self.states.len() {
            let mut trial = self.states[i].ratchet.clone();
            match trial.decrypt(message, &self.states[i].ad) {
                Ok(plain) => {
                    let mut state = self.states.remove(i);
                    state.ratchet = trial;
                    if answered {
                        state.pending_header = None;
                    }
                    self.states.insert(0, state);
                    return Ok(plain);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(E2eeError::Malformed("no session state")))
    }
}

mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(k) => s.serialize_some(&hex::encode(k)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else { return Ok(None) };
        let mut k = [0u8; 32];
        hex::decode_to_slice(&text, &mut k).map_err(serde::de::Error::custom)?;
        Ok(Some(k))
    }
}

/// The digests of initial headers answered, oldest first, each with the signed prekey it used.
#[derive(Default, Serialize, Deserialize)]
struct InitialMessages {
    answered: VecDeque<(u32, String)>,
}

impl InitialMessages {
    fn contains(&self, digest: &str) -> bool {
        self.answered.iter().any(|(_, d)| d == digest)
    }
}

/// What identifies an initial header: its ephemeral key and KEM ciphertext are fresh for every session, and the
/// sender's key ties it to its sender.
fn initial_digest(header: &InitialHeader) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(INITIAL_DIGEST_LABEL);
    h.update(header.identity_key);
    h.update(header.ephemeral);
    h.update(&header.kem_ciphertext);
    hex::encode(h.finalize())
}

/// Prekeys and sessions of this device, loaded under the home's lock (which it holds until dropped).
pub struct Sessions {
    home: Home,
    identity: Identity,
    prekeys: PrekeyFile,
    peers: HashMap<AccountId, PeerSession>,
    /// Peers (and the prekey store) changed by decryption and not yet written.
    dirty: std::collections::HashSet<AccountId>,
    prekeys_dirty: bool,
    /// Loaded when a first message needs answering.
    initial: Option<InitialMessages>,
    initial_dirty: bool,
    /// Session files written since loading (what a test counts to check one write per peer per batch).
    session_writes: u64,
    _lock: HomeLock,
}

fn session_file(peer: &AccountId) -> String {
    format!("session-{peer}.json")
}

fn key32(b: &[u8], what: &'static str) -> Result<[u8; 32], SessionError> {
    b.try_into().map_err(|_| SessionError::Bundle(what))
}

fn sig64(b: &[u8], what: &'static str) -> Result<[u8; 64], SessionError> {
    b.try_into().map_err(|_| SessionError::Bundle(what))
}

/// Converts the relay's bundle into the form the key agreement checks.
fn bundle_of(b: &wire::Bundle) -> Result<PrekeyBundle, SessionError> {
    let spk = b.signed_prekey.as_ref().ok_or(SessionError::Bundle("no signed prekey"))?;
    let kem = b.kem_prekey.as_ref().ok_or(SessionError::Bundle("no KEM prekey"))?;
    Ok(PrekeyBundle {
        identity_key: key32(&b.identity_key, "identity key")?,
        identity_dh_key: key32(&b.identity_dh_key, "identity DH key")?,
        identity_dh_signature: sig64(&b.identity_dh_signature, "identity DH key signature")?,
        signed_prekey: prekeys::SignedPrekey {
            id: spk.id,
            public: key32(&spk.public_key, "signed prekey")?,
            signature: sig64(&spk.signature, "signed prekey signature")?,
        },
        one_time_prekey: b
            .one_time_prekey
            .as_ref()
            .map(|k| {
                Ok::<_, SessionError>(prekeys::OneTimePrekey {
                    id: k.id,
                    public: key32(&k.public_key, "one-time prekey")?,
                })
            })
            .transpose()?,
        kem_prekey: prekeys::SignedKemPrekey {
            id: kem.id,
            public: kem.public_key.to_vec(),
            signature: sig64(&kem.signature, "KEM prekey signature")?,
            last_resort: b.kem_last_resort,
        },
    })
}

fn wire_kem(k: &prekeys::SignedKemPrekey) -> KemPrekey {
    KemPrekey { id: k.id, public_key: k.public.clone().into(), signature: k.signature.to_vec().into() }
}

fn wire_signed(k: &prekeys::SignedPrekey) -> SignedPrekey {
    SignedPrekey { id: k.id, public_key: k.public.to_vec().into(), signature: k.signature.to_vec().into() }
}

impl Sessions {
    /// Loads the prekey store (creating one on first use) under `lock`, the home's lock, which this value keeps;
    /// sessions are loaded when first needed.
    pub fn load(home: &Home, identity: &Identity, lock: HomeLock) -> Result<Self, SessionError> {
        let stored: Option<PrekeyFile> = home.load_private("prekeys.json")?;
        let prekeys = match stored {
            Some(p) => p,
            None => {
                let p =
                    PrekeyFile { store: PrekeyStore::generate(identity), signed_rotated_at_ms: relay_proto::now_ms() };
                home.save_private("prekeys.json", &Some(&p))?;
                p
            }
        };
        Ok(Self {
            home: home.clone(),
            identity: identity.clone(),
            prekeys,
            peers: HashMap::new(),
            dirty: Default::default(),
            prekeys_dirty: false,
            initial: None,
            initial_dirty: false,
            session_writes: 0,
            _lock: lock,
        })
    }

    /// Writes what changed ([`Sessions::flush`]) and releases the home's lock.
    pub fn close(mut self) -> Result<(), SessionError> {
        self.flush()
    }

    /// The initial headers answered, loaded on first use; those whose signed prekey is gone are dropped, since
    /// such a header can no longer be answered.
    fn initial_messages(&mut self) -> Result<&mut InitialMessages, SessionError> {
        if self.initial.is_none() {
            let mut loaded: InitialMessages = self.home.load_private(INITIAL_FILE)?;
            let store = &self.prekeys.store;
            let before = loaded.answered.len();
            loaded.answered.retain(|(spk, _)| store.signed_prekey_secret(*spk).is_ok());
            self.initial_dirty |= loaded.answered.len() != before;
            self.initial = Some(loaded);
        }
        Ok(self.initial.get_or_insert_with(InitialMessages::default))
    }

    fn save_prekeys(&self) -> Result<(), SessionError> {
        Ok(self.home.save_private("prekeys.json", &Some(&self.prekeys))?)
    }

    /// What to upload so that the relay holds enough prekeys, given its counts; `None` if nothing is needed.
    /// Generates (and persists) new keys as needed, and rotates the signed prekey when it is old.
    pub fn replenish(&mut self, counts: &PrekeyCounts) -> Result<Option<UploadPrekeys>, SessionError> {
        let now = relay_proto::now_ms();
        let mut upload = UploadPrekeys::default();
        let store = &mut self.prekeys.store;
        let rotate = now.saturating_sub(self.prekeys.signed_rotated_at_ms) > SIGNED_PREKEY_ROTATION_MS;
        if rotate {
            store.rotate_signed_prekey(&self.identity, now);
            self.prekeys.signed_rotated_at_ms = now;
        }
        store.expire_signed_prekeys(now);
        if rotate || !counts.has_signed_prekey {
            upload.signed_prekey = Some(wire_signed(&store.signed_prekey()));
        }
        if !counts.has_last_resort_kem_prekey {
            upload.last_resort_kem_prekey = Some(wire_kem(&store.last_resort_kem_prekey()));
        }
        if counts.one_time_prekeys < counts.low_watermark {
            upload.one_time_prekeys = store
                .generate_one_time(PREKEY_BATCH)
                .iter()
                .map(|k| OneTimePrekey { id: k.id, public_key: k.public.to_vec().into() })
                .collect();
        }
        if counts.kem_prekeys < counts.low_watermark {
            upload.kem_prekeys = store.generate_kem(&self.identity, PREKEY_BATCH).iter().map(wire_kem).collect();
        }
        if upload == UploadPrekeys::default() {
            return Ok(None);
        }
        self.save_prekeys()?;
        Ok(Some(upload))
    }

    fn peer(&mut self, peer: &AccountId) -> Result<Option<&mut PeerSession>, SessionError> {
        if !self.peers.contains_key(peer) {
            let stored: Option<PeerSession> = self.home.load_private(&session_file(peer))?;
            match stored {
                Some(s) => {
                    self.peers.insert(*peer, s);
                }
                None => return Ok(None),
            }
        }
        Ok(self.peers.get_mut(peer))
    }

    fn save_peer(&mut self, peer: &AccountId) -> Result<(), SessionError> {
        self.save_peers(std::slice::from_ref(peer))
    }

    /// Writes the sessions with `peers`, together (one flush for all of them).
    fn save_peers(&mut self, peers: &[AccountId]) -> Result<(), SessionError> {
        let docs: Vec<_> = peers.iter().map(|p| (session_file(p), self.peers.get(p))).collect();
        self.home.save_private_all(&docs)?;
        for peer in peers {
            self.dirty.remove(peer);
        }
        self.session_writes += peers.len() as u64;
        Ok(())
    }

    /// Writes every state changed by decryption since the last flush.
    pub fn flush(&mut self) -> Result<(), SessionError> {
        if self.prekeys_dirty {
            self.save_prekeys()?;
            self.prekeys_dirty = false;
        }
        if self.initial_dirty
            && let Some(initial) = &self.initial
        {
            self.home.save_private(INITIAL_FILE, initial)?;
            self.initial_dirty = false;
        }
        let dirty: Vec<_> = self.dirty.iter().copied().collect();
        self.save_peers(&dirty)
    }

    /// Whether a session with `peer` exists.
    pub fn has(&mut self, peer: &AccountId) -> Result<bool, SessionError> {
        Ok(self.peer(peer)?.is_some())
    }

    /// Starts a session from `peer`'s bundle (PQXDH as initiator), after checking that the bundle is signed by
    /// `expected_identity_key` and names `expected_sealing_key`, the keys the user trusts for that peer.
    pub fn start(
        &mut self,
        bundle: &wire::Bundle,
        expected_identity_key: &[u8; 32],
        expected_sealing_key: &[u8; 32],
    ) -> Result<(), SessionError> {
        let peer = AccountId::from_slice(&bundle.account_id).ok_or(SessionError::Bundle("account id"))?;
        let bundle = bundle_of(bundle)?;
        if &bundle.identity_key != expected_identity_key || AccountId::from_identity_key(&bundle.identity_key) != peer {
            return Err(SessionError::IdentityMismatch("the bundle is not signed by the contact's identity key"));
        }
        if &bundle.identity_dh_key != expected_sealing_key {
            return Err(SessionError::IdentityMismatch("the bundle names another X25519 key than the contact's"));
        }
        let (header, secret, ad) = pqxdh::initiate(&self.identity, &bundle)?;
        let ratchet = RatchetState::init_initiator(&secret, &bundle.signed_prekey.public)?;
        let state = SessionState { ad, ratchet, pending_header: Some(header) };
        match self.peer(&peer)? {
            Some(s) => s.push(state),
            None => {
                let session = PeerSession {
                    peer_identity_key: bundle.identity_key,
                    states: vec![state],
                    access_key: None,
                    access_key_sent_at_ms: 0,
                };
                self.peers.insert(peer, session);
            }
        }
        self.save_peer(&peer)
    }

    /// Encrypts `plaintext` for `peer`; the new state is persisted before the message is returned. A batch of one
    /// ([`Sessions::encrypt_batch`]).
    pub fn encrypt(&mut self, peer: &AccountId, plaintext: &[u8]) -> Result<Vec<u8>, SessionError> {
        let mut out = self.encrypt_batch(std::slice::from_ref(&(*peer, plaintext)))?;
        out.pop().ok_or(SessionError::NoSession)
    }

    /// Encrypts each `(peer, plaintext)` in order, then writes every session the batch changed, once each, and only
    /// then returns the messages: whatever it returns may leave the device at once, since no key it used can be
    /// used again after a crash. If one fails, the sessions already advanced are written all the same (a state
    /// ahead of what was sent only skips message numbers) and the error is returned, with no message.
    pub fn encrypt_batch<P: AsRef<[u8]>>(&mut self, items: &[(AccountId, P)]) -> Result<Vec<Vec<u8>>, SessionError> {
        let mut out = Vec::with_capacity(items.len());
        let mut changed: Vec<AccountId> = Vec::new();
        let mut failure = None;
        for (peer, plaintext) in items {
            match self.encrypt_in_memory(peer, plaintext.as_ref()) {
                Ok(message) => {
                    if !changed.contains(peer) {
                        changed.push(*peer);
                    }
                    out.push(message);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        self.save_peers(&changed)?;
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// One encryption, the new state in memory only: [`Sessions::encrypt_batch`] writes it.
    fn encrypt_in_memory(&mut self, peer: &AccountId, plaintext: &[u8]) -> Result<Vec<u8>, SessionError> {
        let s = self.peer(peer)?.ok_or(SessionError::NoSession)?;
        let s = s.states.first_mut().ok_or(SessionError::NoSession)?;
        let message = s.ratchet.encrypt(plaintext, &s.ad)?;
        let out = match &s.pending_header {
            Some(header) => E2eeMessage::PreKey { header: header.clone(), message },
            None => E2eeMessage::Ratchet(message),
        };
        Ok(out.encode())
    }

    /// Decrypts `payload` from the holder of `sender_identity_key` (as authenticated by the sealed-sender layer),
    /// starting the responder side of a session for a first message. State changes only if the message decrypts;
    /// it is written by the next [`Sessions::flush`].
    pub fn decrypt(&mut self, sender_identity_key: &[u8; 32], payload: &[u8]) -> Result<Vec<u8>, SessionError> {
        let sender = AccountId::from_identity_key(sender_identity_key);
        match E2eeMessage::decode(payload)? {
            E2eeMessage::PreKey { header, message } => {
                if &header.identity_key != sender_identity_key {
                    return Err(SessionError::IdentityMismatch("session header names another identity"));
                }
                // A PreKey message of a session we already have (its initiator has not heard from us yet).
                if let Some(s) = self.peer(&sender)?
                    && let Ok(plain) = s.decrypt(&message, false)
                {
                    self.dirty.insert(sender);
                    return Ok(plain);
                }
                // No current state accepts it: answer it with PQXDH, unless it was answered before (a replay would
                // push one more state each time, until the genuine one is evicted).
                let digest = initial_digest(&header);
                if self.initial_messages()?.contains(&digest) {
                    return Err(SessionError::InitialReplayed);
                }
                let mut store = self.prekeys.store.clone();
                let (secret, ad) = pqxdh::respond(&self.identity, &mut store, &header)?;
                let spk = store.signed_prekey_secret(header.signed_prekey_id)?;
                let mut ratchet = RatchetState::init_responder(&secret, &spk);
                let plain = ratchet.decrypt(&message, &ad)?;
                let state = SessionState { ad, ratchet, pending_header: None };
                self.prekeys.store = store;
                self.prekeys_dirty = true;
                let initial = self.initial_messages()?;
                initial.answered.push_back((header.signed_prekey_id, digest));
                while initial.answered.len() > MAX_INITIAL_MESSAGES {
                    initial.answered.pop_front();
                }
                self.initial_dirty = true;
                match self.peer(&sender)? {
                    Some(s) => s.push(state),
                    None => {
                        let session = PeerSession {
                            peer_identity_key: *sender_identity_key,
                            states: vec![state],
                            access_key: None,
                            access_key_sent_at_ms: 0,
                        };
                        self.peers.insert(sender, session);
                    }
                }
                self.dirty.insert(sender);
                Ok(plain)
            }
            E2eeMessage::Ratchet(message) => {
                let s = self.peer(&sender)?.ok_or(SessionError::NoSession)?;
                if &s.peer_identity_key != sender_identity_key {
                    return Err(SessionError::IdentityMismatch("session belongs to another identity"));
                }
                // A plain ratchet message means the peer has the session: no more PQXDH header on that one.
                let plain = s.decrypt(&message, true)?;
                self.dirty.insert(sender);
                Ok(plain)
            }
        }
    }

    /// The sealed-sender access key `peer` shared, if any.
    pub fn peer_access_key(&mut self, peer: &AccountId) -> Option<[u8; 32]> {
        self.peer(peer).ok().flatten().and_then(|s| s.access_key)
    }

    /// Records the access key `peer` sent in a message it wrote at `sent_at_ms` (its clock), unless a key from a
    /// later message is already held: a late or replayed message cannot bring back a key the peer has replaced.
    /// Written by the next [`Sessions::flush`], with the state that decrypted the message.
    pub fn learn_peer_access_key(
        &mut self,
        peer: &AccountId,
        key: [u8; 32],
        sent_at_ms: u64,
    ) -> Result<(), SessionError> {
        if let Some(s) = self.peer(peer)?
            && sent_at_ms >= s.access_key_sent_at_ms
            && (s.access_key != Some(key) || sent_at_ms != s.access_key_sent_at_ms)
        {
            s.access_key = Some(key);
            s.access_key_sent_at_ms = sent_at_ms;
            self.dirty.insert(*peer);
        }
        Ok(())
    }

    /// Records (or forgets) `peer`'s access key.
    pub fn set_peer_access_key(&mut self, peer: &AccountId, key: Option<[u8; 32]>) -> Result<(), SessionError> {
        if let Some(s) = self.peer(peer)?
            && s.access_key != key
        {
            s.access_key = key;
            self.save_peer(peer)?;
        }
        Ok(())
    }

    /// Drops the session with `peer` (after its identity changed).
    pub fn forget(&mut self, peer: &AccountId) -> Result<(), SessionError> {
        self.peers.remove(peer);
        Ok(self.home.save_private(&session_file(peer), &None::<PeerSession>)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::{Device, Profile};

    struct Device_ {
        home: Home,
        identity: Identity,
        _dir: tempfile::TempDir,
    }

    fn device(phone: &str) -> Device_ {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().join("home"));
        let profile = Profile { phone: phone.into(), device: Device::default(), relay: None };
        let identity = home.init(&profile).expect("init");
        Device_ { home, identity, _dir: dir }
    }

    fn sessions(d: &Device_) -> Sessions {
        let lock = d.home.try_lock().expect("lock").expect("free");
        Sessions::load(&d.home, &d.identity, lock).expect("load")
    }

    /// What the relay would hand out for `of`: a bundle from its prekey store.
    fn bundle(of: &Device_, store: &Sessions) -> wire::Bundle {
        let b = store.prekeys.store.bundle(&of.identity);
        wire::Bundle {
            account_id: of.identity.account_id().as_bytes().to_vec().into(),
            identity_key: b.identity_key.to_vec().into(),
            identity_dh_key: b.identity_dh_key.to_vec().into(),
            signed_prekey: Some(wire_signed(&b.signed_prekey)),
            one_time_prekey: b
                .one_time_prekey
                .map(|k| OneTimePrekey { id: k.id, public_key: k.public.to_vec().into() }),
            kem_prekey: Some(wire_kem(&b.kem_prekey)),
            kem_last_resort: b.kem_prekey.last_resort,
            identity_dh_signature: b.identity_dh_signature.to_vec().into(),
        }
    }

    /// The message number the next encryption of the session with `peer` would use, as the state on disk says.
    fn next_number_on_disk(d: &Device_, peer: &AccountId) -> u32 {
        let stored: Option<PeerSession> = d.home.load_private(&session_file(peer)).expect("readable");
        let mut state = stored.expect("a session file").states.remove(0);
        state.ratchet.encrypt(b"probe", &state.ad).expect("encrypt").header.n
    }

    /// A batch is written once per peer it touched, and before it is returned: at the moment the caller can hand
    /// the messages to the relay, the state on disk is the one after the last of them. Then a crash (the sessions
    /// dropped without closing) and a restart continue from there: the next message uses a new key, which the
    /// recipient accepts after the whole batch.
    #[test]
    fn a_batch_is_on_disk_once_per_peer_before_it_is_returned() {
        let (alice, bob, carol) = (device("+33611111111"), device("+33622222222"), device("+33633333333"));
        let (mut bob_s, mut carol_s) = (sessions(&bob), sessions(&carol));
        let (bob_id, carol_id) = (bob.identity.account_id(), carol.identity.account_id());
        let mut a = sessions(&alice);
        a.start(&bundle(&bob, &bob_s), &bob.identity.identity_key(), &bob.identity.sealing_key()).expect("start");
        a.start(&bundle(&carol, &carol_s), &carol.identity.identity_key(), &carol.identity.sealing_key())
            .expect("start");
        assert_eq!(next_number_on_disk(&alice, &bob_id), 0);
        let writes = a.session_writes;

        let batch: Vec<(AccountId, Vec<u8>)> = vec![
            (bob_id, b"b1".to_vec()),
            (carol_id, b"c1".to_vec()),
            (bob_id, b"b2".to_vec()),
            (bob_id, b"b3".to_vec()),
        ];
        let out = a.encrypt_batch(&batch).expect("encrypt");
        // What a sender would do now: send. The disk already says the keys are used.
        assert_eq!((next_number_on_disk(&alice, &bob_id), next_number_on_disk(&alice, &carol_id)), (3, 1));
        assert_eq!(a.session_writes - writes, 2, "one write per peer of the batch");

        drop(a);
        let mut a = sessions(&alice);
        let next = a.encrypt(&bob_id, b"b4").expect("encrypt after a restart");
        let alice_key = alice.identity.identity_key();
        let to_bob: Vec<_> = [&out[0], &out[2], &out[3], &next]
            .iter()
            .map(|m| bob_s.decrypt(&alice_key, m).expect("bob decrypts"))
            .collect();
        assert_eq!(to_bob, [b"b1".to_vec(), b"b2".to_vec(), b"b3".to_vec(), b"b4".to_vec()]);
        assert_eq!(carol_s.decrypt(&alice_key, &out[1]).expect("carol decrypts"), b"c1");
    }

    /// A batch that fails part-way returns no message and leaves on disk the states it advanced.
    #[test]
    fn a_failed_batch_returns_nothing_and_keeps_the_advanced_state() {
        let (alice, bob) = (device("+33611111111"), device("+33622222222"));
        let bob_s = sessions(&bob);
        let bob_id = bob.identity.account_id();
        let mut a = sessions(&alice);
        a.start(&bundle(&bob, &bob_s), &bob.identity.identity_key(), &bob.identity.sealing_key()).expect("start");
        let stranger = Identity::generate().account_id();
        let batch = vec![(bob_id, b"b1".to_vec()), (stranger, b"x".to_vec())];
        assert!(matches!(a.encrypt_batch(&batch), Err(SessionError::NoSession)));
        assert_eq!(next_number_on_disk(&alice, &bob_id), 1);
    }
}
