//! The messaging client as an application sees it: a home directory, a connection authenticated as its account,
//! end-to-end encrypted text messages to phone numbers, and received messages decrypted, verified and de-duplicated.
//!
//! Sending: the recipient is resolved by phone number and checked against the identity first seen for that number
//! (trust on first use). A changed identity is reported loudly and messages to it are held until the user accepts
//! the new identity ([`Messenger::accept_identity`]). The message is encrypted in the session with the recipient
//! (set up from its prekey bundle on first contact), wrapped in the sealed-sender layer, and sent without naming the
//! sender — on a separate, unauthenticated connection authorised by the recipient's access key — once the
//! recipient has shared that key; before that, on the authenticated connection (the relay stores no sender either
//! way). Receiving is the reverse; every message carries the sender's own access key so the peer can answer sealed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use relay_proto::verification::{RegistrationPin, VerificationCode};
use relay_proto::wire::{Deliver, DeviceInfo};
use relay_proto::{AccountId, ErrorCode, PhoneNumber};
use serde::Serialize;
use tokio::sync::{Mutex, OnceCell};
use tokio::time::Instant;

use crate::connection::{ClientError, Connection, DirectoryEntry, Inbox, InboxEvent};
use crate::content::{Content, MESSAGE_ID_LEN};
use crate::e2ee::safety::SafetyNumber;
use crate::home::{ChangedIdentity, Contact, Device, HeldMessage, Home, HomeError, Profile, RelayInfo, Seen};
use crate::identity::Identity;
use crate::pin::parse_fingerprint;
use crate::sealed::{OpenError, open_message, seal_message};
use crate::sessions::{SessionError, Sessions};

/// Acknowledge received envelopes at least every this many.
const ACK_BATCH: usize = 64;
/// A contact's identity is checked against the directory again when its last check is older than this, so that
/// sending many messages does not spend the lookup rate limit while a changed identity is still noticed promptly.
pub const CONTACT_RECHECK_MS: u64 = 60_000;

/// Why a messaging operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessengerError {
    /// Local state.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The relay or the connection.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The sealed-sender layer.
    #[error("sealed envelope: {0}")]
    Seal(#[from] OpenError),
    /// The end-to-end session.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The recipient's identity key is not the one seen before: the message was held.
    #[error(
        "SAFETY NUMBER CHANGED: {phone} is now registered with a different identity key. Your message was held. \
         Compare safety numbers with `relay verify --with {phone}`, then accept with `relay verify --with {phone} --accept`"
    )]
    IdentityChanged {
        /// The contact.
        phone: String,
    },
    /// Bad input from the user.
    #[error("{0}")]
    Input(String),
    /// Nothing arrived in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl MessengerError {
    /// The relay's error code, if the relay refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            MessengerError::Client(c) => c.code(),
            _ => None,
        }
    }
}

/// A message received, decrypted and verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReceivedMessage {
    /// Sender-chosen message id (hex), the de-duplication key.
    pub id: String,
    /// Relay's id for the envelope.
    pub server_id: u64,
    /// Sender's phone number as signed by the sender.
    pub from: String,
    /// Sender's account id (hex), derived from the signing key.
    pub from_account: String,
    /// The text.
    pub text: String,
    /// When the sender wrote it (ms since the Unix epoch).
    pub sent_at: u64,
    /// When the relay stored it (ms since the Unix epoch).
    pub stored_at: u64,
    /// The sender's identity key is not the one first seen for this phone number.
    pub identity_changed: bool,
}

/// A message acknowledged by the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sent {
    /// Sender-chosen message id (hex).
    pub id: String,
    /// Relay's id for the envelope.
    pub server_id: u64,
    /// Whether it went without naming the sender (sealed send with the recipient's access key).
    pub sealed: bool,
}

/// What became of a delivered envelope.
#[derive(Debug)]
pub enum Accepted {
    /// A new message.
    New(ReceivedMessage),
    /// Already received before (a redelivery).
    Duplicate,
    /// Could not be opened, verified or decrypted (tampered, replayed, not for us); it is acknowledged and dropped.
    Unreadable(String),
}

/// What proves the phone number at registration on a relay that verifies numbers: the code sent to it and, to take
/// over a number protected by a registration lock, the lock's PIN. Both empty (the default) on an open relay, or to
/// re-register the number this identity already holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    /// The code sent to the number (see [`Messenger::request_code`]), as typed: spaces and dashes are dropped.
    pub code: Option<String>,
    /// The registration lock's PIN.
    pub pin: Option<String>,
}

/// A code request the relay accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CodeRequested {
    /// The request's id (names the code file with the `file` verifier).
    pub request_id: String,
    /// When the code expires (ms since the Unix epoch).
    pub expires_at: u64,
    /// How many registration attempts the code allows.
    pub attempts: u32,
}

/// Validates and creates a new home with fresh keys.
pub fn init(home: &Home, phone: &str, device: Device) -> Result<Identity, MessengerError> {
    PhoneNumber::parse(phone).map_err(|e| MessengerError::Input(format!("invalid phone number {phone:?}: {e}")))?;
    Ok(home.init(&Profile { phone: phone.to_owned(), device, relay: None })?)
}

fn parse_relay(server: &str, cert_sha256: &str) -> Result<(SocketAddr, [u8; 32]), MessengerError> {
    let addr = server.parse().map_err(|_| MessengerError::Input(format!("invalid server address {server:?}")))?;
    let fp = parse_fingerprint(cert_sha256)
        .ok_or_else(|| MessengerError::Input("--cert-sha256 must be 64 hex characters".into()))?;
    Ok((addr, fp))
}

fn parse_phone(phone: &str) -> Result<(), MessengerError> {
    PhoneNumber::parse(phone)
        .map(|_| ())
        .map_err(|e| MessengerError::Input(format!("invalid phone number {phone:?}: {e}")))
}

fn key_hex(s: &str) -> Option<[u8; 32]> {
    let mut k = [0u8; 32];
    hex::decode_to_slice(s, &mut k).ok().map(|_| k)
}

fn contact_entry(c: &Contact) -> Option<DirectoryEntry> {
    Some(DirectoryEntry {
        account: AccountId::from_hex(&c.account_id)?,
        identity_key: key_hex(&c.identity_key)?,
        sealing_key: key_hex(&c.sealing_key)?,
    })
}

fn contact_of(e: &DirectoryEntry) -> Contact {
    Contact {
        account_id: e.account.to_string(),
        identity_key: hex::encode(e.identity_key),
        sealing_key: hex::encode(e.sealing_key),
        changed: None,
        checked_at: relay_proto::now_ms(),
    }
}

/// A connected, authenticated client.
pub struct Messenger {
    home: Home,
    identity: Identity,
    access_key: [u8; 32],
    profile: Profile,
    relay: (SocketAddr, [u8; 32]),
    conn: Connection,
    anonymous: OnceCell<Connection>,
    sessions: Mutex<Sessions>,
    contacts: BTreeMap<String, Contact>,
    contact_recheck_ms: u64,
    seen: Seen,
}

impl Messenger {
    /// Registers the home's identity with the relay at `server`, pinning `cert_sha256`, publishes prekeys and the
    /// access-key verifier, and saves the relay. On a relay that verifies phone numbers, see
    /// [`Messenger::register_with`].
    pub async fn register(home: &Home, server: &str, cert_sha256: &str) -> Result<(Self, bool), MessengerError> {
        Self::register_with(home, server, cert_sha256, &Verification::default()).await
    }

    /// [`Messenger::register`] with the proof of the phone number a verifying relay asks for: without a code it
    /// refuses a number this identity does not hold yet with `VERIFICATION_REQUIRED` (then
    /// [`Messenger::request_code`]); a wrong code is `BAD_CODE`, an expired or used-up one `CODE_EXPIRED`, and a
    /// number whose holder set a registration lock needs its PIN (`REGISTRATION_LOCKED`).
    pub async fn register_with(
        home: &Home,
        server: &str,
        cert_sha256: &str,
        verification: &Verification,
    ) -> Result<(Self, bool), MessengerError> {
        let (identity, mut profile) = (home.identity()?, home.profile()?);
        let relay = parse_relay(server, cert_sha256)?;
        let code = match &verification.code {
            Some(c) => VerificationCode::from_user_input(c)
                .map_err(|e| MessengerError::Input(e.to_string()))?
                .as_str()
                .to_owned(),
            None => String::new(),
        };
        let pin = match &verification.pin {
            Some(p) => RegistrationPin::parse(p).map_err(|e| MessengerError::Input(e.to_string()))?.as_str().to_owned(),
            None => String::new(),
        };
        let conn = Connection::connect(relay.0, relay.1).await?;
        let d = &profile.device;
        let device = DeviceInfo { model: d.model.clone(), os: d.os.clone(), app_version: d.app_version.clone() };
        let created = conn.register_verified(&identity, &profile.phone, device, &code, &pin).await?;
        let access_key = home.access_key()?;
        conn.set_access_key(relay_proto::auth::sha256(&access_key)).await?;
        profile.relay = Some(RelayInfo { server: server.to_owned(), cert_sha256: cert_sha256.to_lowercase() });
        home.save_profile(&profile)?;
        let m = Self::with(home, identity, profile, relay, conn)?;
        let counts = m.conn.authenticate(&m.identity).await?;
        m.replenish(&counts).await?;
        Ok((m, created))
    }

    /// Asks the relay at `server` (pinning `cert_sha256`) to send a verification code to the home's phone number.
    pub async fn request_code(home: &Home, server: &str, cert_sha256: &str) -> Result<CodeRequested, MessengerError> {
        let profile = home.profile()?;
        let relay = parse_relay(server, cert_sha256)?;
        let conn = Connection::connect(relay.0, relay.1).await?;
        let sent = conn.request_code(&profile.phone).await;
        conn.close().await;
        let sent = sent?;
        Ok(CodeRequested { request_id: sent.request_id, expires_at: sent.expires_at_ms, attempts: sent.attempts })
    }

    /// Sets the registration lock of this account to `pin` (`None`: removes it). While this account stays active
    /// (connects at least once every 7 days), another identity needs the PIN, on top of a code sent to the number,
    /// to register this number. Returns whether a lock is now set.
    pub async fn set_registration_lock(&self, pin: Option<&str>) -> Result<bool, MessengerError> {
        let pin = match pin {
            Some(p) => RegistrationPin::parse(p).map_err(|e| MessengerError::Input(e.to_string()))?.as_str().to_owned(),
            None => String::new(),
        };
        Ok(self.conn.set_registration_lock(&pin).await?)
    }

    /// Connects to the home's relay, authenticates, and replenishes the published prekeys if the relay reports
    /// them low.
    pub async fn open(home: &Home) -> Result<Self, MessengerError> {
        let (identity, profile) = (home.identity()?, home.profile()?);
        let info = profile.relay.clone().ok_or(HomeError::NotRegistered)?;
        let relay = parse_relay(&info.server, &info.cert_sha256)?;
        let conn = Connection::connect(relay.0, relay.1).await?;
        let counts = conn.authenticate(&identity).await?;
        let m = Self::with(home, identity, profile, relay, conn)?;
        m.replenish(&counts).await?;
        Ok(m)
    }

    fn with(
        home: &Home,
        identity: Identity,
        profile: Profile,
        relay: (SocketAddr, [u8; 32]),
        conn: Connection,
    ) -> Result<Self, MessengerError> {
        Ok(Self {
            sessions: Mutex::new(Sessions::load(home, &identity)?),
            access_key: home.access_key()?,
            contacts: home.contacts()?,
            contact_recheck_ms: CONTACT_RECHECK_MS,
            seen: home.seen()?,
            home: home.clone(),
            anonymous: OnceCell::new(),
            identity,
            profile,
            relay,
            conn,
        })
    }

    /// Asks the relay how many prekeys it still holds for this account and tops the pools up if they are low. Runs
    /// at every connect; long-lived clients (chat) call it now and then, since peers consume one-time keys.
    pub async fn refresh_prekeys(&self) -> Result<(), MessengerError> {
        let counts = self.conn.upload_prekeys(Default::default()).await?;
        self.replenish(&counts).await
    }

    async fn replenish(&self, counts: &relay_proto::wire::PrekeyCounts) -> Result<(), MessengerError> {
        let upload = self.sessions.lock().await.replenish(counts)?;
        if let Some(upload) = upload {
            self.conn.upload_prekeys(upload).await?;
        }
        Ok(())
    }

    /// Own account id.
    pub fn account_id(&self) -> AccountId {
        self.identity.account_id()
    }

    /// Replaces the device info kept for this session (after [`Messenger::update_device`]).
    pub(crate) fn set_device(&mut self, device: Device) {
        self.profile.device = device;
    }

    /// Own phone number.
    pub fn phone(&self) -> &str {
        &self.profile.phone
    }

    /// Own identity keys.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The home directory.
    pub fn home(&self) -> &Home {
        &self.home
    }

    /// The relay's address, `ip:port`.
    pub fn relay_address(&self) -> String {
        self.relay.0.to_string()
    }

    /// The authenticated connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Sets how long a contact's identity, once confirmed by the directory, is used without asking again (default
    /// [`CONTACT_RECHECK_MS`]; zero checks on every send).
    pub fn set_contact_recheck(&mut self, every: Duration) {
        self.contact_recheck_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
    }

    /// The contacts, by phone number.
    pub fn contacts(&self) -> &BTreeMap<String, Contact> {
        &self.contacts
    }

    /// Resolves `phone` through the directory (at most once per [`CONTACT_RECHECK_MS`]) and checks it against the
    /// identity first seen for it. A new identity is recorded as pending and reported as
    /// [`MessengerError::IdentityChanged`].
    pub async fn contact(&mut self, phone: &str) -> Result<DirectoryEntry, MessengerError> {
        parse_phone(phone)?;
        let now = relay_proto::now_ms();
        if let Some(c) = self.contacts.get(phone)
            && c.changed.is_none()
            && now.saturating_sub(c.checked_at) < self.contact_recheck_ms
            && let Some(entry) = contact_entry(c)
        {
            return Ok(entry);
        }
        let found = self.conn.lookup(phone).await?;
        match self.contacts.get_mut(phone) {
            None => {
                self.contacts.insert(phone.to_owned(), contact_of(&found));
            }
            Some(c) if c.identity_key == hex::encode(found.identity_key) && c.changed.is_none() => {
                // Same identity; its X25519 key may have been re-registered.
                c.sealing_key = hex::encode(found.sealing_key);
                c.checked_at = now;
            }
            Some(c) => {
                let new = contact_of(&found);
                c.changed = Some(ChangedIdentity {
                    account_id: new.account_id,
                    identity_key: new.identity_key,
                    sealing_key: new.sealing_key,
                });
                self.home.save_contacts(&self.contacts)?;
                return Err(MessengerError::IdentityChanged { phone: phone.to_owned() });
            }
        }
        self.home.save_contacts(&self.contacts)?;
        Ok(found)
    }

    /// Sends `text` to the account registered with `phone`; returns once the relay acknowledged it durably. If the
    /// contact's identity changed, the message is held (see [`Messenger::held`]) and an error says so.
    pub async fn send_text(&mut self, phone: &str, text: &str) -> Result<Sent, MessengerError> {
        let pending = self.contacts.get(phone).is_some_and(|c| c.changed.is_some());
        let to = if pending {
            Err(MessengerError::IdentityChanged { phone: phone.to_owned() })
        } else {
            self.contact(phone).await
        };
        match to {
            Ok(to) => self.send_to(&to, text).await,
            Err(e @ MessengerError::IdentityChanged { .. }) => {
                let mut held = self.home.held()?;
                held.push(HeldMessage { to: phone.to_owned(), text: text.to_owned(), held_at: relay_proto::now_ms() });
                self.home.save_held(&held)?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends `text` to `to` in the end-to-end session with it (set up from its prekey bundle if there is none).
    /// Takes `&self`, so many sends can run at once.
    pub async fn send_to(&self, to: &DirectoryEntry, text: &str) -> Result<Sent, MessengerError> {
        let id: [u8; MESSAGE_ID_LEN] = rand::random();
        let content = Content {
            message_id: id.to_vec(),
            sent_at_ms: relay_proto::now_ms(),
            text: text.to_owned(),
            sender_access_key: self.access_key.to_vec(),
        };
        let (payload, access_key) = {
            let mut sessions = self.sessions.lock().await;
            if !sessions.has(&to.account)? {
                let bundle = self.conn.fetch_bundle(&to.account).await?;
                sessions.start(&bundle, &to.identity_key)?;
            }
            (sessions.encrypt(&to.account, &content.encode_to_vec())?, sessions.peer_access_key(&to.account))
        };
        let envelope =
            Bytes::from(seal_message(&self.identity, &self.profile.phone, &to.account, &to.sealing_key, payload)?);
        if let Some(key) = access_key {
            match self.anonymous_connection().await?.sealed_send(&to.account, envelope.clone(), &key).await {
                Ok(ack) => return Ok(Sent { id: hex::encode(id), server_id: ack.server_id, sealed: true }),
                // The recipient rotated its key: forget it and fall back to the authenticated path.
                Err(e) if e.code() == Some(ErrorCode::BadAccessKey) => {
                    self.sessions.lock().await.set_peer_access_key(&to.account, None)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let ack = self.conn.send(&to.account, envelope).await?;
        Ok(Sent { id: hex::encode(id), server_id: ack.server_id, sealed: false })
    }

    async fn anonymous_connection(&self) -> Result<&Connection, ClientError> {
        self.anonymous.get_or_try_init(|| Connection::connect(self.relay.0, self.relay.1)).await
    }

    /// Replaces this account's sealed-sender access key: the relay refuses sealed sends under the old one at once,
    /// so contacts fall back to sending over their authenticated connection until this account's next message to
    /// them carries the new key. The way to cut off a contact that abuses sealed sending.
    pub async fn rotate_access_key(&mut self) -> Result<(), MessengerError> {
        let key = self.home.rotate_access_key()?;
        self.conn.set_access_key(relay_proto::auth::sha256(&key)).await?;
        self.access_key = key;
        Ok(())
    }

    /// Messages held because their recipient's identity changed.
    pub fn held(&self) -> Result<Vec<HeldMessage>, MessengerError> {
        Ok(self.home.held()?)
    }

    /// The safety number with `phone`'s current identity (and, if it changed, with the new one), for comparison out
    /// of band: 60 digits in twelve groups of five, the same on both sides.
    pub fn safety_numbers(&self, phone: &str) -> Result<(String, Option<String>), MessengerError> {
        let c = self.contacts.get(phone).ok_or_else(|| {
            MessengerError::Input(format!("{phone} is not a contact yet: send or receive a message first"))
        })?;
        let mine = self.identity.identity_key();
        let bad = |what: &str| MessengerError::Input(format!("corrupt {what}"));
        let my_phone = PhoneNumber::parse(&self.profile.phone).map_err(|_| bad("profile"))?;
        let their_phone = PhoneNumber::parse(phone).map_err(|_| bad("contact"))?;
        let number = |key: &str| {
            key_hex(key)
                .map(|k| SafetyNumber::new(&mine, &my_phone, &k, &their_phone).to_string())
                .ok_or_else(|| bad("contact"))
        };
        let changed = c.changed.as_ref().map(|n| number(&n.identity_key)).transpose()?;
        Ok((number(&c.identity_key)?, changed))
    }

    /// Accepts the new identity of `phone`: it replaces the old one, the old session is dropped, and the held
    /// messages to `phone` are sent. Returns what was sent.
    pub async fn accept_identity(&mut self, phone: &str) -> Result<Vec<Sent>, MessengerError> {
        let c =
            self.contacts.get_mut(phone).ok_or_else(|| MessengerError::Input(format!("{phone} is not a contact")))?;
        let Some(new) = c.changed.take() else { return Ok(Vec::new()) };
        let old = AccountId::from_hex(&c.account_id);
        *c = Contact {
            account_id: new.account_id,
            identity_key: new.identity_key,
            sealing_key: new.sealing_key,
            changed: None,
            checked_at: relay_proto::now_ms(),
        };
        let to = contact_entry(c).ok_or_else(|| MessengerError::Input("corrupt contact".into()))?;
        self.home.save_contacts(&self.contacts)?;
        if let Some(old) = old {
            self.sessions.lock().await.forget(&old)?;
        }
        let (mine, others): (Vec<_>, Vec<_>) = self.home.held()?.into_iter().partition(|h| h.to == phone);
        let mut sent = Vec::new();
        for (i, h) in mine.iter().enumerate() {
            match self.send_to(&to, &h.text).await {
                Ok(s) => sent.push(s),
                Err(e) => {
                    // Keep what was not sent.
                    let mut keep = others;
                    keep.extend_from_slice(&mine[i..]);
                    self.home.save_held(&keep)?;
                    return Err(e);
                }
            }
        }
        self.home.save_held(&others)?;
        Ok(sent)
    }

    /// Opens the delivery stream.
    pub async fn inbox(&self) -> Result<Inbox, MessengerError> {
        Ok(self.conn.subscribe().await?)
    }

    /// Opens, verifies, decrypts and de-duplicates a delivered envelope. Call [`Messenger::save_seen`] before
    /// acknowledging.
    pub async fn accept(&mut self, d: &Deliver) -> Accepted {
        match self.open_delivery(d).await {
            Ok(Some(m)) => Accepted::New(m),
            Ok(None) => Accepted::Duplicate,
            Err(e) => Accepted::Unreadable(e.to_string()),
        }
    }

    async fn open_delivery(&mut self, d: &Deliver) -> Result<Option<ReceivedMessage>, MessengerError> {
        // A redelivery of an envelope already processed (acknowledgement lost) is recognised before decryption:
        // its ratchet key is spent, so decrypting it again would fail as a replay.
        let envelope_key = format!("envelope:{}", d.server_id);
        if self.seen.contains(&envelope_key) {
            return Ok(None);
        }
        let received = self.decrypt_delivery(d).await;
        if received.is_ok() {
            self.seen.insert(&envelope_key);
        }
        received
    }

    async fn decrypt_delivery(&mut self, d: &Deliver) -> Result<Option<ReceivedMessage>, MessengerError> {
        let sealed = open_message(&self.identity, &d.envelope)?;
        let sender_key = sealed.sender_identity_key;
        let sender = sealed.sender_account();
        let plaintext = self.sessions.lock().await.decrypt(&sender_key, &sealed.payload)?;
        let content = Content::decode(plaintext.as_slice()).map_err(|_| OpenError::Content)?;
        if content.message_id.len() != MESSAGE_ID_LEN {
            return Err(OpenError::Content.into());
        }
        if let Ok(key) = <[u8; 32]>::try_from(content.sender_access_key.as_slice()) {
            self.sessions.lock().await.set_peer_access_key(&sender, Some(key))?;
        }
        let id = hex::encode(&content.message_id);
        if !self.seen.insert(&id) {
            return Ok(None);
        }
        let identity_changed = match self.contacts.get(&sealed.sender_phone) {
            Some(c) => c.identity_key != hex::encode(sender_key),
            None => false,
        };
        if identity_changed {
            tracing::warn!("SAFETY NUMBER CHANGED: a message claims a known phone number with a new identity key");
        }
        Ok(Some(ReceivedMessage {
            id,
            server_id: d.server_id,
            from: sealed.sender_phone,
            from_account: sender.to_string(),
            text: content.text,
            sent_at: content.sent_at_ms,
            stored_at: d.stored_at_ms,
            identity_changed,
        }))
    }

    /// Persists what receiving changed (session states, de-duplication ids). Call before acknowledging.
    pub async fn save_seen(&self) -> Result<(), MessengerError> {
        self.sessions.lock().await.flush()?;
        Ok(self.home.save_seen(&self.seen)?)
    }

    /// Receives until the mailbox is drained and at least `min` new messages arrived, or `wait` has passed with the
    /// mailbox drained. Every delivered envelope is acknowledged (after the de-duplication state is saved) before
    /// this returns. Unreadable envelopes are acknowledged, dropped and reported on the log.
    ///
    /// If the connection fails once messages were received, those are returned (their de-duplication state saved
    /// first) and the failure shows on the next call: a batch already acknowledged is never delivered again, and one
    /// not yet acknowledged is recognised as seen when it is, so an error here never loses a message nor shows it
    /// twice. Not cancellation-safe: dropping the future drops what it had received.
    pub async fn receive(&mut self, min: usize, wait: Duration) -> Result<Vec<ReceivedMessage>, MessengerError> {
        let mut out = Vec::new();
        match self.receive_into(min, wait, &mut out).await {
            Ok(()) => Ok(out),
            Err(e) if !out.is_empty() => {
                if let Err(save) = self.save_seen().await {
                    // Unsaved, the tail may be shown again after a restart: better than losing the saved head.
                    tracing::warn!(error = %save, "cannot save received messages as seen");
                }
                tracing::warn!(error = %e, received = out.len(), "receiving stopped early");
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }

    async fn receive_into(
        &mut self,
        min: usize,
        wait: Duration,
        out: &mut Vec<ReceivedMessage>,
    ) -> Result<(), MessengerError> {
        let deadline = Instant::now() + wait;
        let mut inbox = self.inbox().await?;
        let mut pending = Vec::new();
        let (mut drained, mut acks_in_flight) = (false, 0usize);
        loop {
            let settled = drained && acks_in_flight == 0 && pending.is_empty();
            if settled && (out.len() >= min || Instant::now() >= deadline) {
                return Ok(());
            }
            // Past the deadline, only finish acknowledging what was received (bounded by a grace period).
            let until = if settled { deadline } else { deadline.max(Instant::now()) + Duration::from_secs(10) };
            let event = match tokio::time::timeout_at(until, inbox.next()).await {
                Ok(Some(event)) => event?,
                Ok(None) => return Err(ClientError::Protocol("relay closed the delivery stream".into()).into()),
                Err(_) if settled => return Ok(()),
                Err(_) => return Err(MessengerError::Timeout("relay did not confirm acknowledgements".into())),
            };
            match event {
                InboxEvent::Deliver(d) => {
                    drained = false;
                    match self.accept(&d).await {
                        Accepted::New(m) => out.push(m),
                        Accepted::Duplicate => {}
                        Accepted::Unreadable(e) => {
                            tracing::warn!(server_id = d.server_id, error = %e, "dropping unreadable envelope")
                        }
                    }
                    pending.push(d.server_id);
                }
                InboxEvent::QueueEmpty => drained = true,
                InboxEvent::Acked(_) => acks_in_flight = acks_in_flight.saturating_sub(1),
            }
            if !pending.is_empty() && (drained || pending.len() >= ACK_BATCH) {
                self.save_seen().await?;
                inbox.ack(&pending).await?;
                pending.clear();
                acks_in_flight += 1;
            }
        }
    }

    /// Closes the connections.
    pub async fn close(self) {
        if let Some(anon) = self.anonymous.into_inner() {
            anon.close().await;
        }
        self.conn.close().await;
    }
}
