//! The messaging client as an application sees it: a home directory, a connection authenticated as its account,
//! end-to-end encrypted text messages to phone numbers, and received messages decrypted, verified and de-duplicated.
//!
//! Sending: the recipient is resolved by phone number; its sealing key must carry a valid binding signature by its
//! identity key (a key the relay made up is refused, loudly: [`MessengerError::UnboundKey`]), and both keys are
//! checked against those first seen for that number (trust on first use). A changed identity or sealing key is
//! reported loudly and messages to it are held until the user accepts the new keys
//! ([`Messenger::accept_identity`]). The message is encrypted in the session with the recipient (set up from its
//! prekey bundle on first contact), wrapped in the sealed-sender layer with this account's sender certificate (the
//! relay's signed statement of its number and keys, fetched when needed and cached in the home until shortly before
//! it expires), and sent without naming the sender — on a separate, unauthenticated connection authorised by the
//! recipient's access key — once the recipient has shared that key; before that, on the authenticated connection
//! (the relay stores no sender either way). Every message carries the sender's own access key so the peer can
//! answer sealed.
//!
//! Receiving is the reverse. The sender shown is the number in its certificate, checked under the relay's
//! certificate key pinned at registration, never a string the sender chose. An envelope that cannot be opened,
//! verified or decrypted is kept in the home's quarantine with the reason, and reported, before it is acknowledged:
//! nothing is lost without the user learning of it. A replay is not a quarantine entry: it is recognised as a
//! duplicate (below) and changes nothing.
//!
//! One writer per home: every operation that reads state to write it back (sessions, prekeys, contacts, seen
//! ids, quarantined envelopes, held messages, the access key) takes the home's lock ([`crate::home::HomeLock`]),
//! loads that state from disk afresh (another process may have changed it: `relay chat` open while a script runs
//! `relay send`), works, writes, and releases the lock, so two clients of one home never encrypt under one ratchet
//! key nor write back stale state. A messenger holds the lock only for an operation, never while it waits on the
//! user or the network for something new: a receive batch ([`Messenger::accept`] … [`Messenger::save_seen`]) covers
//! the deliveries already received, including the quarantine record of one that could not be read and the note
//! that it was seen. Lookups and sends to the relay run outside the lock, except fetching the bundle a new session
//! starts from. The relay's sender-certificate key (pinned once) and this account's own certificate (replaced
//! whole by what the relay last issued) are written under the lock too, but are nothing to merge: the messenger
//! keeps them as fields.
//!
//! Replays change nothing: a delivered message's side effects (the sender's access key) apply only once it is
//! known to be new — not a redelivery of an envelope, not a message id already seen, and not older than what the
//! bounded seen list forgot of that sender (see [`crate::home::Seen`]).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use relay_proto::verification::{RegistrationPin, VerificationCode};
use relay_proto::wire::{Deliver, DeviceInfo};
use relay_proto::{AccountId, ErrorCode, PhoneNumber};
use serde::Serialize;
use tokio::sync::{Mutex, MutexGuard, OnceCell};
use tokio::time::Instant;

use ed25519_dalek::VerifyingKey;
use relay_proto::identity::{SenderCertificate, SignedCertificate};

use crate::connection::{Authenticated, ClientError, Connection, DirectoryEntry, Inbox, InboxEvent};
use crate::content::{Content, MESSAGE_ID_LEN};
use crate::e2ee::E2eeError;
use crate::e2ee::message::E2eeMessage;
use crate::e2ee::safety::{Party, SafetyNumber};
use crate::home::{
    ChangedIdentity, Contact, Device, Freshness, HeldMessage, Home, HomeError, Profile, Quarantined, RelayInfo, Seen,
};
use crate::identity::Identity;
use crate::nodes::Nodes;
use crate::sealed::{OpenError, open_message_with, seal_message};
use crate::sessions::{SessionError, Sessions};
use crate::verified_certificates::VerifiedCertificates;

/// Acknowledge received envelopes at least every this many.
const ACK_BATCH: usize = 64;
/// A contact's identity is checked against the directory again when its last check is older than this, so that
/// sending many messages does not spend the lookup rate limit while a changed identity is still noticed promptly.
pub const CONTACT_RECHECK_MS: u64 = 60_000;
/// A cached sender certificate is replaced when it has less than this left, so that an envelope it signs is stored
/// by the relay well before it expires.
pub const CERTIFICATE_REFRESH_MS: u64 = 3600 * 1000;
/// Home file caching this account's sender certificate.
const CERTIFICATE_FILE: &str = "sender-certificate.json";

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
    /// The recipient's identity key or sealing key is not the one seen before: the message was held.
    #[error(
        "SAFETY NUMBER CHANGED: {phone} is now registered with different keys. Your message was held. \
         Compare safety numbers with `relay verify --with {phone}`, then accept with `relay verify --with {phone} --accept`"
    )]
    IdentityChanged {
        /// The contact.
        phone: String,
    },
    /// The directory returned, for `phone`, a sealing key its identity key did not sign: nothing was sent to it and
    /// nothing was recorded, since no one can have vouched for that key (the relay, or someone between, made it up).
    #[error(
        "REFUSED: the relay returned for {phone} a sealing key that {phone}'s identity key did not sign. Nothing was \
         sent. The relay (or someone in the middle) may be trying to read your messages; if {phone} registered \
         with an old client, ask them to register again"
    )]
    UnboundKey {
        /// The contact.
        phone: String,
    },
    /// The relay's sender certificate for this account cannot be used, or the relay's certificate key is not the
    /// one pinned at registration.
    #[error("sender certificate: {0}")]
    SenderCertificate(String),
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

    /// Whether the connection to the relay failed (see [`ClientError::is_transport`]).
    pub fn is_transport(&self) -> bool {
        matches!(self, MessengerError::Client(c) if c.is_transport())
    }
}

/// A message received, decrypted and verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReceivedMessage {
    /// Sender-chosen message id (hex), the de-duplication key.
    pub id: String,
    /// Relay's id for the envelope.
    pub server_id: u64,
    /// Sender's phone number, as the relay certified it for the key that signed the message (strict E.164).
    pub from: String,
    /// Sender's account id (hex), derived from the signing key.
    pub from_account: String,
    /// The text.
    pub text: String,
    /// When the sender wrote it (ms since the Unix epoch).
    pub sent_at: u64,
    /// When the relay stored it (ms since the Unix epoch).
    pub stored_at: u64,
    /// The sender's identity key or sealing key is not the one first seen for this phone number.
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

/// What [`Messenger::send_batch`] did.
#[derive(Debug)]
pub struct BatchSent {
    /// The messages the relay acknowledged: the first ones of the batch, in order.
    pub sent: Vec<Sent>,
    /// What stopped the rest, if anything did. Messages after it were not sent (those already encrypted only
    /// skip message numbers of their session).
    pub stopped_by: Option<MessengerError>,
}

/// What became of a delivered envelope that this device processed; acknowledge it in every case. (When the device
/// itself failed, [`Messenger::accept`] returns an error instead, and the envelope must not be acknowledged.)
#[derive(Debug)]
pub enum Accepted {
    /// A new message.
    New(ReceivedMessage),
    /// Already received before (a redelivery, or a replay); nothing changed.
    Duplicate,
    /// Could not be opened, verified or decrypted (tampered, not for us, a forged or expired sender certificate,
    /// sealed to a substituted key, from a session this device no longer has): kept in the home's quarantine with
    /// the reason, durably.
    Quarantined(Quarantined),
}

/// What one call to [`Messenger::receive_all`] received.
#[derive(Debug, Default)]
pub struct Received {
    /// New messages, in delivery order.
    pub messages: Vec<ReceivedMessage>,
    /// Envelopes set aside in the quarantine, in delivery order.
    pub quarantined: Vec<Quarantined>,
}

impl Received {
    fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.quarantined.is_empty()
    }

    fn len(&self) -> usize {
        self.messages.len().saturating_add(self.quarantined.len())
    }
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
    PhoneNumber::parse_valid(phone)
        .map_err(|e| MessengerError::Input(format!("invalid phone number {phone:?}: {e}")))?;
    Ok(home.init(&Profile { phone: phone.to_owned(), device, relay: None })?)
}

fn parse_relay(server: &str, cert_sha256: &str) -> Result<Nodes, MessengerError> {
    Nodes::parse(server, cert_sha256).map_err(|e| MessengerError::Input(e.to_string()))
}

/// A number the user typed, checked against its numbering plan before it is sent anywhere (refused, not repaired).
fn parse_phone(phone: &str) -> Result<(), MessengerError> {
    PhoneNumber::parse_valid(phone)
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
        sealing_key_signature: hex::decode(&c.sealing_key_signature).ok()?,
    })
}

fn contact_of(e: &DirectoryEntry) -> Contact {
    Contact {
        account_id: e.account.to_string(),
        identity_key: hex::encode(e.identity_key),
        sealing_key: hex::encode(e.sealing_key),
        sealing_key_signature: hex::encode(&e.sealing_key_signature),
        changed: None,
        checked_at: relay_proto::now_ms(),
    }
}

/// `sender-certificate.json`: this account's cached sender certificate, as the relay issued it.
#[derive(serde::Serialize, serde::Deserialize)]
struct CertificateFile {
    certificate: String,
    signature: String,
}

/// The relay's sender-certificate key offered in `auth`, checked against the one pinned in the home's profile
/// (pinned now, under the home's lock, if the profile has none yet). `profile` is updated to what was saved.
async fn pin_certificate_key(
    home: &Home,
    profile: &mut Profile,
    auth: &Authenticated,
) -> Result<VerifyingKey, MessengerError> {
    let bad = |why: &str| MessengerError::SenderCertificate(why.to_owned());
    let offered = auth.sender_certificate_key.ok_or_else(|| bad("the relay sent no sender-certificate key"))?;
    let pinned = |p: &Profile| -> Result<Option<String>, MessengerError> {
        Ok(p.relay.as_ref().ok_or(HomeError::NotRegistered)?.sender_certificate_key.clone())
    };
    if pinned(profile)?.is_none() {
        // Pinned once: read again under the lock, since another client of this home may have pinned it meanwhile.
        let _lock = home.lock().await?;
        *profile = home.profile()?;
        if pinned(profile)?.is_none() {
            let relay = profile.relay.as_mut().ok_or(HomeError::NotRegistered)?;
            relay.sender_certificate_key = Some(hex::encode(offered));
            home.save_profile(profile)?;
        }
    }
    match pinned(profile)? {
        Some(pinned) if key_hex(&pinned) == Some(offered) => {}
        _ => {
            return Err(bad(
                "the relay's sender-certificate key is not the one pinned at registration: refusing to trust the \
                 senders it certifies (register again only if the relay's operator confirms a new key)",
            ));
        }
    }
    VerifyingKey::from_bytes(&offered).map_err(|_| bad("the relay's sender-certificate key is not an Ed25519 key"))
}

/// The home's state while a messenger holds the home's lock: loaded when an operation (or a receive batch)
/// begins, written when it ends.
struct Held {
    sessions: Sessions,
    /// Loaded on first use (receiving only).
    seen: Option<Seen>,
    /// Whether `seen` changed since it was loaded.
    seen_changed: bool,
}

impl Held {
    fn seen(&mut self, home: &Home) -> Result<&mut Seen, HomeError> {
        if self.seen.is_none() {
            self.seen = Some(home.seen()?);
        }
        Ok(self.seen.get_or_insert_with(Seen::default))
    }

    /// Writes what changed, then releases the lock (held by `sessions`): sessions first, so that a crash
    /// between the two writes leaves messages decryptable-again rather than seen and undecryptable.
    fn close(self, home: &Home) -> Result<(), MessengerError> {
        let Held { mut sessions, seen, seen_changed } = self;
        sessions.flush()?;
        if let Some(seen) = seen.filter(|_| seen_changed) {
            home.save_seen(&seen)?;
        }
        drop(sessions);
        Ok(())
    }
}

/// One operation under the home's lock (see the module header). It continues a receive batch if one holds the
/// lock, and keeps it for that batch when done. Otherwise [`Op::end`] writes and releases; dropped without
/// `end` (an error), it releases without writing more, which is safe: an encryption's state is written before the
/// message leaves, and what was decrypted and not written comes again, being unacknowledged.
pub(crate) struct Op<'a> {
    slot: MutexGuard<'a, Option<Held>>,
    held: Option<Held>,
    keep: bool,
}

impl Op<'_> {
    fn held(&mut self) -> &mut Held {
        // `held` is taken only by `end`, which consumes the operation.
        self.held.as_mut().expect("the state is held until the operation ends")
    }

    fn sessions(&mut self) -> &mut Sessions {
        &mut self.held().sessions
    }

    /// Ends the operation: writes what changed and releases the lock, unless a receive batch keeps it.
    pub(crate) fn end(mut self, home: &Home) -> Result<(), MessengerError> {
        if !self.keep
            && let Some(held) = self.held.take()
        {
            held.close(home)?;
        }
        Ok(())
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if self.keep {
            *self.slot = self.held.take();
        }
    }
}

/// A connected, authenticated client.
pub struct Messenger {
    home: Home,
    identity: Identity,
    profile: Profile,
    relay: Nodes,
    conn: Connection,
    anonymous: OnceCell<Connection>,
    /// The home's state while this messenger holds the home's lock; `None` otherwise.
    state: Mutex<Option<Held>>,
    /// The contacts as last read from the home.
    contacts: BTreeMap<String, Contact>,
    contact_recheck_ms: u64,
    /// The certificates of senders that verified under the relay's sender-certificate key, pinned at registration
    /// (what every sender's certificate must verify under): each is checked in full once, its expiry at every use.
    certificates: VerifiedCertificates,
    /// This account's own sender certificate, once fetched (also cached in the home). Issued by the relay from its
    /// directory, not state this device derives: a stale copy is replaced, never merged.
    certificate: Mutex<Option<SignedCertificate>>,
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
        let conn = relay.connect().await?;
        let d = &profile.device;
        let device = DeviceInfo { model: d.model.clone(), os: d.os.clone(), app_version: d.app_version.clone() };
        let created = conn.register_verified(&identity, &profile.phone, device, &code, &pin).await?;
        let access_key = home.access_key()?;
        conn.set_access_key(relay_proto::auth::sha256(&access_key)).await?;
        // A registration pins the relay anew: its TLS certificate, and the sender-certificate key it offers next.
        let relay_info = RelayInfo {
            server: server.to_owned(),
            cert_sha256: cert_sha256.to_lowercase(),
            sender_certificate_key: None,
        };
        {
            let _lock = home.lock().await?;
            profile = home.profile()?;
            profile.relay = Some(relay_info);
            home.save_profile(&profile)?;
        }
        let auth = conn.authenticate_as(&identity).await?;
        let certificate_key = pin_certificate_key(home, &mut profile, &auth).await?;
        let m = Self::with(home, identity, profile, relay, conn, certificate_key)?;
        m.replenish(&auth.prekeys).await?;
        Ok((m, created))
    }

    /// Asks the relay at `server` (pinning `cert_sha256`) to send a verification code to the home's phone number.
    pub async fn request_code(home: &Home, server: &str, cert_sha256: &str) -> Result<CodeRequested, MessengerError> {
        let profile = home.profile()?;
        let relay = parse_relay(server, cert_sha256)?;
        let conn = relay.connect().await?;
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

    /// Connects to the home's relay (the first of its nodes that answers within
    /// [`crate::nodes::DEFAULT_CONNECT_TIMEOUT`]), authenticates, and replenishes the published prekeys if the relay
    /// reports them low.
    pub async fn open(home: &Home) -> Result<Self, MessengerError> {
        Self::open_via(home, crate::nodes::DEFAULT_CONNECT_TIMEOUT).await
    }

    /// [`Messenger::open`], giving each node `timeout` to answer.
    pub async fn open_via(home: &Home, timeout: std::time::Duration) -> Result<Self, MessengerError> {
        let (identity, mut profile) = (home.identity()?, home.profile()?);
        let info = profile.relay.clone().ok_or(HomeError::NotRegistered)?;
        let relay = parse_relay(&info.server, &info.cert_sha256)?.with_timeout(timeout);
        let conn = relay.connect().await?;
        let auth = conn.authenticate_as(&identity).await?;
        let certificate_key = pin_certificate_key(home, &mut profile, &auth).await?;
        let m = Self::with(home, identity, profile, relay, conn, certificate_key)?;
        m.replenish(&auth.prekeys).await?;
        Ok(m)
    }

    fn with(
        home: &Home,
        identity: Identity,
        profile: Profile,
        relay: Nodes,
        conn: Connection,
        certificate_key: VerifyingKey,
    ) -> Result<Self, MessengerError> {
        // Homes written by earlier versions left files readable by others.
        home.secure()?;
        let cached: Option<CertificateFile> = home.load_private(CERTIFICATE_FILE)?;
        let certificate = cached.and_then(|f| {
            let (certificate, signature) = (hex::decode(f.certificate).ok()?, hex::decode(f.signature).ok()?);
            SignedCertificate::from_parts(&certificate, &signature).ok()
        });
        Ok(Self {
            certificates: VerifiedCertificates::new(certificate_key),
            certificate: Mutex::new(certificate),
            state: Mutex::new(None),
            contacts: home.contacts()?,
            contact_recheck_ms: CONTACT_RECHECK_MS,
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
        let mut op = self.begin(false).await?;
        let upload = op.sessions().replenish(counts)?;
        op.end(&self.home)?;
        if let Some(upload) = upload {
            self.conn.upload_prekeys(upload).await?;
        }
        Ok(())
    }

    /// Begins an operation on the home's state (see [`Op`]): continues the receive batch that holds the lock, or
    /// takes the lock (waiting up to [`crate::home::LOCK_WAIT`]) and loads the state afresh. `keep` makes it a
    /// receive batch, which [`Messenger::save_seen`] ends.
    pub(crate) async fn begin(&self, keep: bool) -> Result<Op<'_>, MessengerError> {
        let mut slot = self.state.lock().await;
        let (held, batch) = match slot.take() {
            Some(held) => (held, true),
            None => {
                let lock = self.home.lock().await?;
                let sessions = Sessions::load(&self.home, &self.identity, lock)?;
                (Held { sessions, seen: None, seen_changed: false }, false)
            }
        };
        Ok(Op { slot, held: Some(held), keep: keep || batch })
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

    /// The address (`ip:port`) of the relay node this messenger is connected to.
    pub fn relay_address(&self) -> String {
        self.relay.current().addr.to_string()
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

    /// Resolves `phone` through the directory (at most once per [`CONTACT_RECHECK_MS`]), refuses a sealing key its
    /// identity key did not sign ([`MessengerError::UnboundKey`], nothing recorded), and checks both keys against
    /// those first seen for the number. New keys are recorded as pending and reported as
    /// [`MessengerError::IdentityChanged`]: the safety number covers both keys, so either changing changes it.
    pub async fn contact(&mut self, phone: &str) -> Result<DirectoryEntry, MessengerError> {
        parse_phone(phone)?;
        self.contacts = self.home.contacts()?;
        let now = relay_proto::now_ms();
        if let Some(c) = self.contacts.get(phone)
            && c.changed.is_none()
            && now.saturating_sub(c.checked_at) < self.contact_recheck_ms
            && let Some(entry) = contact_entry(c)
            // A contact saved before bindings existed has no signature: it is looked up and checked again.
            && entry.verify_binding().is_ok()
        {
            return Ok(entry);
        }
        // The lookup runs without the lock; what it found is merged into the contacts as they are once the lock
        // is held, so that a contact another process recorded meanwhile is neither lost nor overwritten.
        let found = self.conn.lookup(phone).await?;
        if found.verify_binding().is_err() {
            tracing::warn!("the directory returned a sealing key its identity key did not sign: refused");
            return Err(MessengerError::UnboundKey { phone: phone.to_owned() });
        }
        let op = self.begin(false).await?;
        let mut contacts = self.home.contacts()?;
        let changed = match contacts.get_mut(phone) {
            None => {
                contacts.insert(phone.to_owned(), contact_of(&found));
                false
            }
            Some(c)
                if c.identity_key == hex::encode(found.identity_key)
                    && c.sealing_key == hex::encode(found.sealing_key)
                    && c.changed.is_none() =>
            {
                c.sealing_key_signature = hex::encode(&found.sealing_key_signature);
                c.checked_at = now;
                false
            }
            Some(c) => {
                let new = contact_of(&found);
                c.changed = Some(ChangedIdentity {
                    account_id: new.account_id,
                    identity_key: new.identity_key,
                    sealing_key: new.sealing_key,
                    sealing_key_signature: new.sealing_key_signature,
                });
                true
            }
        };
        self.home.save_contacts(&contacts)?;
        op.end(&self.home)?;
        self.contacts = contacts;
        if changed {
            return Err(MessengerError::IdentityChanged { phone: phone.to_owned() });
        }
        Ok(found)
    }

    /// Sends `text` to the account registered with `phone`; returns once the relay acknowledged it durably. If the
    /// contact's identity changed, the message is held (see [`Messenger::held`]) and an error says so.
    pub async fn send_text(&mut self, phone: &str, text: &str) -> Result<Sent, MessengerError> {
        self.contacts = self.home.contacts()?;
        let pending = self.contacts.get(phone).is_some_and(|c| c.changed.is_some());
        let to = if pending {
            Err(MessengerError::IdentityChanged { phone: phone.to_owned() })
        } else {
            self.contact(phone).await
        };
        match to {
            Ok(to) => self.send_to(&to, text).await,
            Err(e @ MessengerError::IdentityChanged { .. }) => {
                let op = self.begin(false).await?;
                let mut held = self.home.held()?;
                held.push(HeldMessage { to: phone.to_owned(), text: text.to_owned(), held_at: relay_proto::now_ms() });
                self.home.save_held(&held)?;
                op.end(&self.home)?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends `text` to `to` in the end-to-end session with it (set up from its prekey bundle if there is none).
    /// `to` is trusted as given: resolve it with [`Messenger::contact`], which checks its keys. Takes `&self`, so
    /// many sends can run at once. A batch of one ([`Messenger::send_batch`]).
    pub async fn send_to(&self, to: &DirectoryEntry, text: &str) -> Result<Sent, MessengerError> {
        let BatchSent { mut sent, stopped_by } = self.send_batch(&[(to, text)]).await;
        match (stopped_by, sent.pop()) {
            (Some(e), _) => Err(e),
            (None, Some(s)) => Ok(s),
            (None, None) => Err(MessengerError::Input("nothing was sent".into())),
        }
    }

    /// Sends each `(to, text)` in order, as [`Messenger::send_to`] does, with the state of every session the batch
    /// uses written once, before the first message leaves: all are encrypted under one hold of the home's lock
    /// ([`Sessions::encrypt_batch`] writes each session it changed, then returns the messages), then sealed and
    /// handed to the relay one after the other. Stops at the first failure ([`BatchSent::stopped_by`]).
    pub async fn send_batch(&self, items: &[(&DirectoryEntry, &str)]) -> BatchSent {
        if items.is_empty() {
            return BatchSent { sent: Vec::new(), stopped_by: None };
        }
        let encrypted = match self.encrypt_batch(items).await {
            Ok(e) => e,
            Err(e) => return BatchSent { sent: Vec::new(), stopped_by: Some(e) },
        };
        let certificate = match self.sender_certificate().await {
            Ok(c) => c,
            Err(e) => return BatchSent { sent: Vec::new(), stopped_by: Some(e) },
        };
        let mut sent = Vec::with_capacity(items.len());
        for ((to, _), (id, payload, access_key)) in items.iter().zip(encrypted) {
            match self.seal_and_send(to, &certificate, id, payload, access_key).await {
                Ok(s) => sent.push(s),
                Err(e) => return BatchSent { sent, stopped_by: Some(e) },
            }
        }
        BatchSent { sent, stopped_by: None }
    }

    /// Encrypts every message of a batch with the latest state on disk, under the lock, and writes the new states
    /// before the lock goes (and before any message leaves): another client of this home then continues from them,
    /// never from a key already used. Returns each message's id, payload and the recipient's access key (if known).
    async fn encrypt_batch(
        &self,
        items: &[(&DirectoryEntry, &str)],
    ) -> Result<Vec<([u8; MESSAGE_ID_LEN], Vec<u8>, Option<[u8; 32]>)>, MessengerError> {
        let mut op = self.begin(false).await?;
        // Read under the lock: another client of this home may have rotated it.
        let own_access_key = self.home.access_key()?;
        let mut ids = Vec::with_capacity(items.len());
        let mut plaintexts = Vec::with_capacity(items.len());
        for (to, text) in items {
            let id: [u8; MESSAGE_ID_LEN] = rand::random();
            let content = Content {
                message_id: id.to_vec(),
                sent_at_ms: relay_proto::now_ms(),
                text: (*text).to_owned(),
                sender_access_key: own_access_key.to_vec(),
            };
            let sessions = op.sessions();
            if !sessions.has(&to.account)? {
                let bundle = self.conn.fetch_bundle(&to.account).await?;
                sessions.start(&bundle, &to.identity_key, &to.sealing_key)?;
            }
            ids.push(id);
            plaintexts.push((to.account, content.encode_to_vec()));
        }
        let sessions = op.sessions();
        let payloads = sessions.encrypt_batch(&plaintexts)?;
        let out = ids
            .into_iter()
            .zip(payloads)
            .zip(items)
            .map(|((id, payload), (to, _))| (id, payload, sessions.peer_access_key(&to.account)))
            .collect();
        op.end(&self.home)?;
        Ok(out)
    }

    /// Seals one encrypted message and sends it: sealed (unauthenticated, with `access_key`) if the recipient
    /// shared its key, else on the authenticated connection.
    async fn seal_and_send(
        &self,
        to: &DirectoryEntry,
        certificate: &SignedCertificate,
        id: [u8; MESSAGE_ID_LEN],
        payload: Vec<u8>,
        access_key: Option<[u8; 32]>,
    ) -> Result<Sent, MessengerError> {
        let envelope = Bytes::from(seal_message(&self.identity, certificate, &to.account, &to.sealing_key, payload)?);
        if let Some(key) = access_key {
            match self.anonymous_connection().await?.sealed_send(&to.account, envelope.clone(), &key).await {
                Ok(ack) => return Ok(Sent { id: hex::encode(id), server_id: ack.server_id, sealed: true }),
                // The recipient rotated its key: forget it (unless a newer one arrived meanwhile) and fall back to
                // the authenticated path.
                Err(e) if e.code() == Some(ErrorCode::BadAccessKey) => {
                    let mut op = self.begin(false).await?;
                    if op.sessions().peer_access_key(&to.account) == Some(key) {
                        op.sessions().set_peer_access_key(&to.account, None)?;
                    }
                    op.end(&self.home)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let ack = self.conn.send(&to.account, envelope).await?;
        Ok(Sent { id: hex::encode(id), server_id: ack.server_id, sealed: false })
    }

    /// This account's sender certificate: the cached one while it has more than [`CERTIFICATE_REFRESH_MS`] left
    /// and states the number this home registered, else a new one from the relay, checked (the relay's pinned key
    /// signed it, it names this device's keys) and cached in the home. The relay's number is the one recipients
    /// see, whatever the profile says.
    pub async fn sender_certificate(&self) -> Result<SignedCertificate, MessengerError> {
        let mut cached = self.certificate.lock().await;
        let soon = relay_proto::now_ms().saturating_add(CERTIFICATE_REFRESH_MS);
        if let Some(c) = cached.as_ref()
            && let Ok(cert) = self.own_certificate(c, soon)
            // After a change of number, the old number's certificate is not used any more.
            && cert.phone.as_str() == self.profile.phone
        {
            return Ok(c.clone());
        }
        let fresh = self.conn.sender_certificate().await?;
        self.own_certificate(&fresh, relay_proto::now_ms())?;
        let file =
            CertificateFile { certificate: hex::encode(&fresh.certificate), signature: hex::encode(fresh.signature) };
        // A whole-file replace of what the relay issued (no state read back), under the lock like every write.
        let op = self.begin(false).await?;
        self.home.save_private(CERTIFICATE_FILE, &Some(file))?;
        op.end(&self.home)?;
        *cached = Some(fresh.clone());
        Ok(fresh)
    }

    /// What `c` states, if it is a certificate of this device's keys by the pinned relay key, valid at `at_ms`.
    fn own_certificate(&self, c: &SignedCertificate, at_ms: u64) -> Result<SenderCertificate, MessengerError> {
        let cert = c
            .verify(self.certificates.issuer(), at_ms)
            .map_err(|e| MessengerError::SenderCertificate(e.to_string()))?;
        if cert.identity_key != self.identity.identity_key() || cert.sealing_key != self.identity.sealing_key() {
            return Err(MessengerError::SenderCertificate("the relay certified other keys than this device's".into()));
        }
        Ok(cert)
    }

    async fn anonymous_connection(&self) -> Result<&Connection, ClientError> {
        self.anonymous.get_or_try_init(|| self.relay.connect()).await
    }

    /// Replaces this account's sealed-sender access key: the relay refuses sealed sends under the old one at once,
    /// so contacts fall back to sending over their authenticated connection until this account's next message to
    /// them carries the new key. The way to cut off a contact that abuses sealed sending.
    pub async fn rotate_access_key(&mut self) -> Result<(), MessengerError> {
        let op = self.begin(false).await?;
        let key = self.home.rotate_access_key()?;
        op.end(&self.home)?;
        self.conn.set_access_key(relay_proto::auth::sha256(&key)).await?;
        Ok(())
    }

    /// Messages held because their recipient's identity changed.
    pub fn held(&self) -> Result<Vec<HeldMessage>, MessengerError> {
        Ok(self.home.held()?)
    }

    /// The safety number with `phone`'s current keys (and, if they changed, with the new ones), for comparison out
    /// of band: 60 digits in twelve groups of five, the same on both sides, covering both parties' identity and
    /// sealing keys and numbers (see [`SafetyNumber`]).
    pub fn safety_numbers(&self, phone: &str) -> Result<(String, Option<String>), MessengerError> {
        let c = self.contacts.get(phone).ok_or_else(|| {
            MessengerError::Input(format!("{phone} is not a contact yet: send or receive a message first"))
        })?;
        let bad = |what: &str| MessengerError::Input(format!("corrupt {what}"));
        let my_phone = PhoneNumber::parse(&self.profile.phone).map_err(|_| bad("profile"))?;
        let their_phone = PhoneNumber::parse(phone).map_err(|_| bad("contact"))?;
        let (my_identity, my_sealing) = (self.identity.identity_key(), self.identity.sealing_key());
        let me = Party { phone: &my_phone, identity_key: &my_identity, sealing_key: &my_sealing };
        let number = |identity: &str, sealing: &str| match (key_hex(identity), key_hex(sealing)) {
            (Some(identity_key), Some(sealing_key)) => {
                let them = Party { phone: &their_phone, identity_key: &identity_key, sealing_key: &sealing_key };
                Ok(SafetyNumber::new(&me, &them).to_string())
            }
            _ => Err(bad("contact")),
        };
        let changed = c.changed.as_ref().map(|n| number(&n.identity_key, &n.sealing_key)).transpose()?;
        Ok((number(&c.identity_key, &c.sealing_key)?, changed))
    }

    /// Accepts the new identity of `phone`: it replaces the old one, the old session is dropped, and the held
    /// messages to `phone` are sent. Returns what was sent.
    pub async fn accept_identity(&mut self, phone: &str) -> Result<Vec<Sent>, MessengerError> {
        let mut op = self.begin(false).await?;
        let mut contacts = self.home.contacts()?;
        let c = contacts.get_mut(phone).ok_or_else(|| MessengerError::Input(format!("{phone} is not a contact")))?;
        let Some(new) = c.changed.take() else { return Ok(Vec::new()) };
        let old = AccountId::from_hex(&c.account_id);
        *c = Contact {
            account_id: new.account_id,
            identity_key: new.identity_key,
            sealing_key: new.sealing_key,
            sealing_key_signature: new.sealing_key_signature,
            changed: None,
            checked_at: relay_proto::now_ms(),
        };
        let to = contact_entry(c).ok_or_else(|| MessengerError::Input("corrupt contact".into()))?;
        self.home.save_contacts(&contacts)?;
        if let Some(old) = old {
            op.sessions().forget(&old)?;
        }
        let mine: Vec<_> = self.home.held()?.into_iter().filter(|h| h.to == phone).collect();
        op.end(&self.home)?;
        self.contacts = contacts;
        let batch: Vec<(&DirectoryEntry, &str)> = mine.iter().map(|h| (&to, h.text.as_str())).collect();
        let BatchSent { sent, stopped_by: failure } = self.send_batch(&batch).await;
        // Drop exactly what was sent from the held messages as they are now (others may have been held meanwhile).
        let op = self.begin(false).await?;
        let mut held = self.home.held()?;
        for done in &mine[..sent.len()] {
            if let Some(i) = held.iter().position(|h| h == done) {
                held.remove(i);
            }
        }
        self.home.save_held(&held)?;
        op.end(&self.home)?;
        match failure {
            Some(e) => Err(e),
            None => Ok(sent),
        }
    }

    /// Opens the delivery stream.
    pub async fn inbox(&self) -> Result<Inbox, MessengerError> {
        Ok(self.conn.subscribe().await?)
    }

    /// Opens, verifies, decrypts and de-duplicates a delivered envelope; one that cannot be read or believed is
    /// kept in the home's quarantine (durably) with the reason. The first call of a receive batch takes the home's
    /// lock (and reads the state afresh); [`Messenger::save_seen`] writes what the batch changed and releases it:
    /// call it before acknowledging, and before waiting for more deliveries.
    ///
    /// `Ok`, whatever the [`Accepted`]: the envelope was dealt with (shown, recognised, or kept in quarantine);
    /// acknowledge it once the batch is saved. An error means this device failed (the home's lock is busy, a file
    /// cannot be read, the quarantine record cannot be written): nothing was decided about the envelope, it must not
    /// be acknowledged, and it comes again.
    pub async fn accept(&mut self, d: &Deliver) -> Result<Accepted, MessengerError> {
        let mut op = self.begin(true).await?;
        // Read before anything changes, so that no failure to read can come after a state change.
        let contacts = self.home.contacts()?;
        let seen = op.held().seen(&self.home)?;
        // A redelivery of an envelope already processed (acknowledgement lost), read or quarantined, is recognised
        // before decryption: its ratchet key is spent, so decrypting it again would fail as a replay.
        let envelope_key = format!("envelope:{}", d.server_id);
        if seen.contains(&envelope_key) {
            return Ok(Accepted::Duplicate);
        }
        let accepted = match self.decrypt_delivery(&mut op, &contacts, d) {
            Ok(Some(m)) => Accepted::New(m),
            Ok(None) => Accepted::Duplicate,
            Err(e) if is_local(&e) => return Err(e),
            // A replay is a duplicate, not a loss to report: the message it repeats was shown when it first came.
            Err(MessengerError::Session(SessionError::InitialReplayed | SessionError::E2ee(E2eeError::Replay))) => {
                tracing::debug!(server_id = d.server_id, "replayed message ignored");
                return Ok(Accepted::Duplicate);
            }
            Err(e) => {
                let q = Quarantined {
                    error: e.to_string(),
                    server_id: d.server_id,
                    stored_at: d.stored_at_ms,
                    quarantined_at: relay_proto::now_ms(),
                    envelope: hex::encode(&d.envelope),
                };
                // Kept (durably, under the batch's lock) before the envelope can be acknowledged; if it cannot be,
                // the error leaves the envelope on the relay.
                let path = self.home.quarantine(&q)?;
                tracing::warn!(server_id = d.server_id, error = %e, file = %path.display(), "envelope quarantined");
                Accepted::Quarantined(q)
            }
        };
        // Recorded with the rest of the batch: a redelivery (acknowledgement lost) is then a duplicate, not a second
        // message or a second quarantine report.
        op.held().seen(&self.home)?.insert(&envelope_key);
        op.held().seen_changed = true;
        op.end(&self.home)?;
        Ok(accepted)
    }

    fn decrypt_delivery(
        &self,
        op: &mut Op<'_>,
        contacts: &BTreeMap<String, Contact>,
        d: &Deliver,
    ) -> Result<Option<ReceivedMessage>, MessengerError> {
        let sealed = open_message_with(&self.identity, &d.envelope, &self.certificates, d.stored_at_ms)?;
        // A session's first message names the sender's X25519 identity key: it must be the one the relay certified.
        if let Ok(E2eeMessage::PreKey { header, .. }) = E2eeMessage::decode(&sealed.payload)
            && header.identity_dh_key != sealed.sender.sealing_key
        {
            return Err(
                SessionError::IdentityMismatch("the session names another X25519 key than the certificate").into()
            );
        }
        let sender_key = sealed.sender_identity_key();
        let sender = sealed.sender_account();
        let plaintext = op.sessions().decrypt(&sender_key, &sealed.payload)?;
        let content = Content::decode(plaintext.as_slice()).map_err(|_| OpenError::Content)?;
        if content.message_id.len() != MESSAGE_ID_LEN {
            return Err(OpenError::Content.into());
        }
        // Side effects only once the message is known to be new: a replayed old message must not bring back the
        // access key it carried.
        let id = hex::encode(&content.message_id);
        let from_account = sender.to_string();
        let seen = op.held().seen(&self.home)?;
        match seen.freshness(&id, &from_account, content.sent_at_ms) {
            Freshness::New => {}
            Freshness::Duplicate => return Ok(None),
            Freshness::Stale => {
                tracing::debug!(server_id = d.server_id, "message older than the seen list's memory ignored");
                return Ok(None);
            }
        }
        seen.record(&id, &from_account, content.sent_at_ms);
        if let Ok(key) = <[u8; 32]>::try_from(content.sender_access_key.as_slice()) {
            op.sessions().learn_peer_access_key(&sender, key, content.sent_at_ms)?;
        }
        let from = sealed.sender.phone.as_str().to_owned();
        let identity_changed = match contacts.get(&from) {
            Some(c) => {
                c.identity_key != hex::encode(sender_key) || c.sealing_key != hex::encode(sealed.sender.sealing_key)
            }
            None => false,
        };
        if identity_changed {
            tracing::warn!("SAFETY NUMBER CHANGED: a message certified for a known phone number comes with new keys");
        }
        Ok(Some(ReceivedMessage {
            id,
            server_id: d.server_id,
            from,
            from_account,
            text: content.text,
            sent_at: content.sent_at_ms,
            stored_at: d.stored_at_ms,
            identity_changed,
        }))
    }

    /// Ends the receive batch: writes what receiving changed (session states, de-duplication ids) and releases the
    /// home's lock. Call before acknowledging. Nothing to do when no batch is open.
    pub async fn save_seen(&self) -> Result<(), MessengerError> {
        let held = self.state.lock().await.take();
        match held {
            Some(held) => held.close(&self.home),
            None => Ok(()),
        }
    }

    /// [`Messenger::receive_all`], returning the messages only: envelopes quarantined meanwhile are in the home's
    /// quarantine and on the log (and `relay status` counts them), not in the result.
    pub async fn receive(&mut self, min: usize, wait: Duration) -> Result<Vec<ReceivedMessage>, MessengerError> {
        Ok(self.receive_all(min, wait).await?.messages)
    }

    /// Receives until the mailbox is drained and at least `min` envelopes were received (new messages and envelopes
    /// quarantined both count), or `wait` has passed with the mailbox drained. Every delivered envelope is
    /// acknowledged (after the de-duplication state is saved, and an unreadable one kept in the quarantine) before
    /// this returns; one this device failed to process (see [`Messenger::accept`]) is not, and comes again.
    ///
    /// If the connection fails once messages were received, those are returned (their de-duplication state saved
    /// first) and the failure shows on the next call: a batch already acknowledged is never delivered again, and one
    /// not yet acknowledged is recognised as seen when it is, so an error here never loses a message nor shows it
    /// twice. Not cancellation-safe: dropping the future drops what it had received.
    pub async fn receive_all(&mut self, min: usize, wait: Duration) -> Result<Received, MessengerError> {
        let mut out = Received::default();
        let result = self.receive_into(min, wait, &mut out).await;
        // Whatever happened, no batch stays open: it would keep the home locked.
        let saved = self.save_seen().await;
        match (result, saved) {
            (Ok(()), Ok(())) => Ok(out),
            (Ok(()), Err(e)) | (Err(e), _) if out.is_empty() => Err(e),
            (Ok(()), Err(e)) | (Err(e), _) => {
                // Unsaved, the tail may be shown again after a restart: better than losing the saved head.
                tracing::warn!(error = %e, received = out.len(), "receiving stopped early");
                Ok(out)
            }
        }
    }

    async fn receive_into(&mut self, min: usize, wait: Duration, out: &mut Received) -> Result<(), MessengerError> {
        // `wait` comes from the user (`recv --wait`): a huge one means "no deadline", not an overflow.
        let deadline = Instant::now().checked_add(wait).unwrap_or_else(far_future);
        let mut inbox = self.inbox().await?;
        let mut pending = Vec::new();
        let (mut drained, mut acks_in_flight) = (false, 0usize);
        loop {
            let settled = drained && acks_in_flight == 0 && pending.is_empty();
            if settled && (out.len() >= min || Instant::now() >= deadline) {
                return Ok(());
            }
            // Past the deadline, only finish acknowledging what was received (bounded by a grace period).
            let grace = deadline.max(Instant::now()).checked_add(Duration::from_secs(10)).unwrap_or(deadline);
            let until = if settled { deadline } else { grace };
            let event = match tokio::time::timeout_at(until, inbox.next()).await {
                Ok(Some(event)) => event?,
                Ok(None) => return Err(ClientError::Protocol("relay closed the delivery stream".into()).into()),
                Err(_) if settled => return Ok(()),
                Err(_) => return Err(MessengerError::Timeout("relay did not confirm acknowledgements".into())),
            };
            match event {
                InboxEvent::Deliver(d) => {
                    drained = false;
                    // An error (this device failed) leaves this envelope unacknowledged: the relay delivers it again.
                    match self.accept(&d).await? {
                        Accepted::New(m) => out.messages.push(m),
                        Accepted::Duplicate => {}
                        Accepted::Quarantined(q) => out.quarantined.push(q),
                    }
                    pending.push(d.server_id);
                }
                InboxEvent::QueueEmpty => drained = true,
                InboxEvent::Acked(_) => acks_in_flight = acks_in_flight.saturating_sub(1),
            }
            // The batch ends (and the home's lock is released) before waiting on the network again.
            if !pending.is_empty() && (drained || pending.len() >= ACK_BATCH || !inbox.has_buffered()) {
                self.save_seen().await?;
                inbox.ack(&pending).await?;
                pending.clear();
                acks_in_flight += 1;
            }
        }
    }

    /// Erases this account on the relay (`DeleteAccount`, signed by the identity key over this connection's delete
    /// transcript): the relay records the erasure for the exporter, which tells every affiliate that received data,
    /// then removes the directory entry, keys, prekeys and mailbox, and closes the connection. The home is left as it
    /// is ([`Home::erase`] removes it); if the relay refused, nothing was erased.
    pub async fn delete_account(self) -> Result<(), MessengerError> {
        let deleted = self.conn.delete_account(&self.identity).await;
        self.close().await;
        Ok(deleted?)
    }

    /// Closes the connections.
    pub async fn close(self) {
        if let Some(anon) = self.anonymous.into_inner() {
            anon.close().await;
        }
        self.conn.close().await;
    }
}

/// A deadline no wait reaches (about thirty years from now).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(30 * 365 * 24 * 3600)
}

/// Whether `e` is about this device's own state (the home) rather than about the envelope: such a delivery was not
/// processed and must not be acknowledged.
fn is_local(e: &MessengerError) -> bool {
    matches!(e, MessengerError::Home(_) | MessengerError::Session(SessionError::Home(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers the user types are checked against their numbering plan before anything is written or sent.
    #[test]
    fn numbers_outside_the_numbering_plan_are_refused_before_anything_is_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().join("h"));
        for bad in ["+99912345678", "+3361234567", "+33690123456", "+330612345678"] {
            let err = init(&home, bad, Device::default()).expect_err(bad);
            assert!(
                matches!(&err, MessengerError::Input(m) if m.contains("numbering plan") || m.contains("canonical"))
            );
            assert!(matches!(parse_phone(bad), Err(MessengerError::Input(_))), "{bad}");
        }
        assert!(!dir.path().join("h").join("identity.json").exists(), "nothing written for a refused number");
        assert_eq!(parse_phone("+33612345678").ok(), Some(()));
        init(&home, "+33612345678", Device::default()).expect("a valid French mobile");
    }
}
