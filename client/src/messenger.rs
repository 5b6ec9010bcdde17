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
//! nothing is lost without the user learning of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use relay_proto::wire::{Deliver, DeviceInfo};
use relay_proto::{AccountId, ErrorCode, PhoneNumber};
use serde::Serialize;
use tokio::sync::{Mutex, OnceCell};
use tokio::time::Instant;

use ed25519_dalek::VerifyingKey;
use relay_proto::identity::{SenderCertificate, SignedCertificate};

use crate::connection::{Authenticated, ClientError, Connection, DirectoryEntry, Inbox, InboxEvent};
use crate::content::{Content, MESSAGE_ID_LEN};
use crate::e2ee::message::E2eeMessage;
use crate::e2ee::safety::{Party, SafetyNumber};
use crate::home::{
    ChangedIdentity, Contact, Device, HeldMessage, Home, HomeError, Profile, Quarantined, RelayInfo, Seen,
};
use crate::identity::Identity;
use crate::pin::parse_fingerprint;
use crate::sealed::{OpenError, open_message, seal_message};
use crate::sessions::{SessionError, Sessions};

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

    /// Whether this device failed (its home could not be read or written), as opposed to the envelope or the peer.
    fn is_local(&self) -> bool {
        matches!(self, MessengerError::Home(_) | MessengerError::Session(SessionError::Home(_)))
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

/// What became of a delivered envelope.
#[derive(Debug)]
pub enum Accepted {
    /// A new message.
    New(ReceivedMessage),
    /// Already received before (a redelivery).
    Duplicate,
    /// Could not be opened, verified or decrypted (tampered, replayed, not for us, a forged sender): kept in the
    /// home's quarantine with the reason, durably. Acknowledge it like the others.
    Quarantined(Quarantined),
    /// This device failed (its home could not be read or written): nothing was decided about the envelope. Do not
    /// acknowledge it; the relay delivers it again.
    Failed(MessengerError),
}

impl Accepted {
    /// Whether the relay may now delete the envelope.
    pub fn may_acknowledge(&self) -> bool {
        !matches!(self, Accepted::Failed(_))
    }
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
        self.messages.len() + self.quarantined.len()
    }
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

/// The relay's sender-certificate key offered in `auth`, checked against the one pinned in `profile` (pinned now,
/// and saved, if the home has none yet).
fn pin_certificate_key(
    home: &Home,
    profile: &mut Profile,
    auth: &Authenticated,
) -> Result<VerifyingKey, MessengerError> {
    let bad = |why: &str| MessengerError::SenderCertificate(why.to_owned());
    let offered = auth.sender_certificate_key.ok_or_else(|| bad("the relay sent no sender-certificate key"))?;
    let relay = profile.relay.as_mut().ok_or(HomeError::NotRegistered)?;
    match &relay.sender_certificate_key {
        Some(pinned) if key_hex(pinned) == Some(offered) => {}
        Some(_) => {
            return Err(bad(
                "the relay's sender-certificate key is not the one pinned at registration: refusing to trust the \
                 senders it certifies (register again only if the relay's operator confirms a new key)",
            ));
        }
        None => {
            relay.sender_certificate_key = Some(hex::encode(offered));
            home.save_profile(profile)?;
        }
    }
    VerifyingKey::from_bytes(&offered).map_err(|_| bad("the relay's sender-certificate key is not an Ed25519 key"))
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
    /// The relay's sender-certificate key, pinned at registration: what every sender's certificate must verify under.
    certificate_key: VerifyingKey,
    /// This account's own sender certificate, once fetched (also cached in the home).
    certificate: Mutex<Option<SignedCertificate>>,
}

impl Messenger {
    /// Registers the home's identity with the relay at `server`, pinning `cert_sha256`, publishes prekeys and the
    /// access-key verifier, and saves the relay.
    pub async fn register(home: &Home, server: &str, cert_sha256: &str) -> Result<(Self, bool), MessengerError> {
        let (identity, mut profile) = (home.identity()?, home.profile()?);
        let relay = parse_relay(server, cert_sha256)?;
        let conn = Connection::connect(relay.0, relay.1).await?;
        let d = &profile.device;
        let device = DeviceInfo { model: d.model.clone(), os: d.os.clone(), app_version: d.app_version.clone() };
        let created = conn.register(&identity, &profile.phone, device).await?;
        let access_key = home.access_key()?;
        conn.set_access_key(relay_proto::auth::sha256(&access_key)).await?;
        profile.relay = Some(RelayInfo {
            server: server.to_owned(),
            cert_sha256: cert_sha256.to_lowercase(),
            sender_certificate_key: None,
        });
        home.save_profile(&profile)?;
        let auth = conn.authenticate_as(&identity).await?;
        let certificate_key = pin_certificate_key(home, &mut profile, &auth)?;
        let m = Self::with(home, identity, profile, relay, conn, certificate_key)?;
        m.replenish(&auth.prekeys).await?;
        Ok((m, created))
    }

    /// Connects to the home's relay, authenticates, and replenishes the published prekeys if the relay reports
    /// them low.
    pub async fn open(home: &Home) -> Result<Self, MessengerError> {
        let (identity, mut profile) = (home.identity()?, home.profile()?);
        let info = profile.relay.clone().ok_or(HomeError::NotRegistered)?;
        let relay = parse_relay(&info.server, &info.cert_sha256)?;
        let conn = Connection::connect(relay.0, relay.1).await?;
        let auth = conn.authenticate_as(&identity).await?;
        let certificate_key = pin_certificate_key(home, &mut profile, &auth)?;
        let m = Self::with(home, identity, profile, relay, conn, certificate_key)?;
        m.replenish(&auth.prekeys).await?;
        Ok(m)
    }

    fn with(
        home: &Home,
        identity: Identity,
        profile: Profile,
        relay: (SocketAddr, [u8; 32]),
        conn: Connection,
        certificate_key: VerifyingKey,
    ) -> Result<Self, MessengerError> {
        let cached: Option<CertificateFile> = home.load_private(CERTIFICATE_FILE)?;
        let certificate = cached.and_then(|f| {
            let (certificate, signature) = (hex::decode(f.certificate).ok()?, hex::decode(f.signature).ok()?);
            SignedCertificate::from_parts(&certificate, &signature).ok()
        });
        Ok(Self {
            certificate_key,
            certificate: Mutex::new(certificate),
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

    /// Resolves `phone` through the directory (at most once per [`CONTACT_RECHECK_MS`]), refuses a sealing key its
    /// identity key did not sign ([`MessengerError::UnboundKey`], nothing recorded), and checks both keys against
    /// those first seen for the number. New keys are recorded as pending and reported as
    /// [`MessengerError::IdentityChanged`]: the safety number covers both keys, so either changing changes it.
    pub async fn contact(&mut self, phone: &str) -> Result<DirectoryEntry, MessengerError> {
        parse_phone(phone)?;
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
        let found = self.conn.lookup(phone).await?;
        if found.verify_binding().is_err() {
            tracing::warn!("the directory returned a sealing key its identity key did not sign: refused");
            return Err(MessengerError::UnboundKey { phone: phone.to_owned() });
        }
        match self.contacts.get_mut(phone) {
            None => {
                self.contacts.insert(phone.to_owned(), contact_of(&found));
            }
            Some(c)
                if c.identity_key == hex::encode(found.identity_key)
                    && c.sealing_key == hex::encode(found.sealing_key)
                    && c.changed.is_none() =>
            {
                c.sealing_key_signature = hex::encode(&found.sealing_key_signature);
                c.checked_at = now;
            }
            Some(c) => {
                let new = contact_of(&found);
                c.changed = Some(ChangedIdentity {
                    account_id: new.account_id,
                    identity_key: new.identity_key,
                    sealing_key: new.sealing_key,
                    sealing_key_signature: new.sealing_key_signature,
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
    /// `to` is trusted as given: resolve it with [`Messenger::contact`], which checks its keys. Takes `&self`, so
    /// many sends can run at once.
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
                sessions.start(&bundle, &to.identity_key, &to.sealing_key)?;
            }
            (sessions.encrypt(&to.account, &content.encode_to_vec())?, sessions.peer_access_key(&to.account))
        };
        let certificate = self.sender_certificate().await?;
        let envelope = Bytes::from(seal_message(&self.identity, &certificate, &to.account, &to.sealing_key, payload)?);
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
        self.home.save_private(CERTIFICATE_FILE, &Some(file))?;
        *cached = Some(fresh.clone());
        Ok(fresh)
    }

    /// What `c` states, if it is a certificate of this device's keys by the pinned relay key, valid at `at_ms`.
    fn own_certificate(&self, c: &SignedCertificate, at_ms: u64) -> Result<SenderCertificate, MessengerError> {
        let cert =
            c.verify(&self.certificate_key, at_ms).map_err(|e| MessengerError::SenderCertificate(e.to_string()))?;
        if cert.identity_key != self.identity.identity_key() || cert.sealing_key != self.identity.sealing_key() {
            return Err(MessengerError::SenderCertificate("the relay certified other keys than this device's".into()));
        }
        Ok(cert)
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
        let c =
            self.contacts.get_mut(phone).ok_or_else(|| MessengerError::Input(format!("{phone} is not a contact")))?;
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

    /// Opens, verifies, decrypts and de-duplicates a delivered envelope; one that cannot be read or believed is
    /// kept in the home's quarantine (durably) with the reason. Call [`Messenger::save_seen`] before acknowledging,
    /// and acknowledge only what [`Accepted::may_acknowledge`].
    pub async fn accept(&mut self, d: &Deliver) -> Accepted {
        match self.open_delivery(d).await {
            Ok(Some(m)) => Accepted::New(m),
            Ok(None) => Accepted::Duplicate,
            Err(e) if e.is_local() => Accepted::Failed(e),
            Err(e) => {
                let q = Quarantined {
                    error: e.to_string(),
                    server_id: d.server_id,
                    stored_at: d.stored_at_ms,
                    quarantined_at: relay_proto::now_ms(),
                    envelope: hex::encode(&d.envelope),
                };
                match self.home.quarantine(&q) {
                    Ok(path) => {
                        tracing::warn!(server_id = d.server_id, error = %e, file = %path.display(), "envelope quarantined");
                        // A redelivery (acknowledgement lost) is then a duplicate, not a second report.
                        self.seen.insert(&format!("envelope:{}", d.server_id));
                        Accepted::Quarantined(q)
                    }
                    Err(h) => Accepted::Failed(h.into()),
                }
            }
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
        let sealed = open_message(&self.identity, &d.envelope, &self.certificate_key, d.stored_at_ms)?;
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
        let from = sealed.sender.phone.as_str().to_owned();
        let identity_changed = match self.contacts.get(&from) {
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

    /// [`Messenger::receive_all`], returning the messages only: envelopes quarantined meanwhile are in the home's
    /// quarantine and on the log (and `relay status` counts them), not in the result.
    pub async fn receive(&mut self, min: usize, wait: Duration) -> Result<Vec<ReceivedMessage>, MessengerError> {
        Ok(self.receive_all(min, wait).await?.messages)
    }

    /// Receives until the mailbox is drained and at least `min` envelopes were received (new messages and envelopes
    /// quarantined both count), or `wait` has passed with the mailbox drained. Every delivered envelope is
    /// acknowledged (after the de-duplication state is saved, and an unreadable one kept in the quarantine) before
    /// this returns.
    ///
    /// If the connection fails once messages were received, those are returned (their de-duplication state saved
    /// first) and the failure shows on the next call: a batch already acknowledged is never delivered again, and one
    /// not yet acknowledged is recognised as seen when it is, so an error here never loses a message nor shows it
    /// twice. Not cancellation-safe: dropping the future drops what it had received.
    pub async fn receive_all(&mut self, min: usize, wait: Duration) -> Result<Received, MessengerError> {
        let mut out = Received::default();
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

    async fn receive_into(&mut self, min: usize, wait: Duration, out: &mut Received) -> Result<(), MessengerError> {
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
                        Accepted::New(m) => out.messages.push(m),
                        Accepted::Duplicate => {}
                        Accepted::Quarantined(q) => out.quarantined.push(q),
                        // Not acknowledged: the relay keeps it and delivers it again.
                        Accepted::Failed(e) => return Err(e),
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
