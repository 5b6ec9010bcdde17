//! The messaging client as an application sees it: a home directory, a connection authenticated as its account,
//! sealed text messages to phone numbers, and received messages opened, verified and de-duplicated.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use relay_proto::wire::{Deliver, DeviceInfo};
use relay_proto::{AccountId, PhoneNumber};
use serde::Serialize;
use tokio::time::Instant;

use crate::connection::{ClientError, Connection, DirectoryEntry, Inbox, InboxEvent};
use crate::home::{Contact, Device, Home, HomeError, Profile, RelayInfo, Seen};
use crate::identity::Identity;
use crate::pin::parse_fingerprint;
use crate::sealed::{OpenError, open_message, seal_message};

/// Acknowledge received envelopes at least every this many.
const ACK_BATCH: usize = 64;

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
    /// Sealing failed.
    #[error("cannot seal message: {0}")]
    Seal(#[from] OpenError),
    /// Bad input from the user.
    #[error("{0}")]
    Input(String),
    /// Nothing arrived in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// A message received, opened and verified.
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
}

/// A message acknowledged by the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sent {
    /// Sender-chosen message id (hex).
    pub id: String,
    /// Relay's id for the envelope.
    pub server_id: u64,
}

/// What became of a delivered envelope.
#[derive(Debug)]
pub enum Accepted {
    /// A new message.
    New(ReceivedMessage),
    /// Already received before (a redelivery).
    Duplicate,
    /// Could not be opened or verified; it is acknowledged and dropped.
    Unreadable(OpenError),
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

/// A connected, authenticated client.
pub struct Messenger {
    home: Home,
    identity: Identity,
    profile: Profile,
    conn: Connection,
    contacts: BTreeMap<String, Contact>,
    seen: Seen,
}

impl Messenger {
    /// Registers the home's identity with the relay at `server`, pinning `cert_sha256`, and saves the relay.
    pub async fn register(home: &Home, server: &str, cert_sha256: &str) -> Result<(Self, bool), MessengerError> {
        let (identity, mut profile) = (home.identity()?, home.profile()?);
        let (addr, fp) = parse_relay(server, cert_sha256)?;
        let conn = Connection::connect(addr, fp).await?;
        let d = &profile.device;
        let device = DeviceInfo { model: d.model.clone(), os: d.os.clone(), app_version: d.app_version.clone() };
        let created = conn.register(&identity, &profile.phone, device).await?;
        profile.relay = Some(RelayInfo { server: server.to_owned(), cert_sha256: cert_sha256.to_lowercase() });
        home.save_profile(&profile)?;
        Ok((Self::with(home, identity, profile, conn)?, created))
    }

    /// Connects to the home's relay and authenticates.
    pub async fn open(home: &Home) -> Result<Self, MessengerError> {
        let (identity, profile) = (home.identity()?, home.profile()?);
        let relay = profile.relay.clone().ok_or(HomeError::NotRegistered)?;
        let (addr, fp) = parse_relay(&relay.server, &relay.cert_sha256)?;
        let conn = Connection::connect(addr, fp).await?;
        conn.authenticate(&identity).await?;
        Self::with(home, identity, profile, conn)
    }

    fn with(home: &Home, identity: Identity, profile: Profile, conn: Connection) -> Result<Self, MessengerError> {
        Ok(Self { contacts: home.contacts()?, seen: home.seen()?, home: home.clone(), identity, profile, conn })
    }

    /// Own account id.
    pub fn account_id(&self) -> AccountId {
        self.identity.account_id()
    }

    /// Own phone number.
    pub fn phone(&self) -> &str {
        &self.profile.phone
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The directory entry of `phone`, from the contacts or else looked up (and remembered).
    pub async fn contact(&mut self, phone: &str) -> Result<DirectoryEntry, MessengerError> {
        PhoneNumber::parse(phone).map_err(|e| MessengerError::Input(format!("invalid phone number {phone:?}: {e}")))?;
        if let Some(c) = self.contacts.get(phone)
            && let Some(entry) = decode_contact(c)
        {
            return Ok(entry);
        }
        let entry = self.conn.lookup(phone).await?;
        let contact = Contact {
            account_id: entry.account.to_string(),
            identity_key: hex::encode(entry.identity_key),
            sealing_key: hex::encode(entry.sealing_key),
            access_key: None,
            changed: None,
        };
        self.contacts.insert(phone.to_owned(), contact);
        self.home.save_contacts(&self.contacts)?;
        Ok(entry)
    }

    /// Sends `text` to the account registered with `phone`; returns once the relay acknowledged it durably.
    pub async fn send_text(&mut self, phone: &str, text: &str) -> Result<Sent, MessengerError> {
        let to = self.contact(phone).await?;
        self.send_to(&to, text).await
    }

    /// Sends `text` to `to`. Takes `&self`, so many sends can run at once.
    pub async fn send_to(&self, to: &DirectoryEntry, text: &str) -> Result<Sent, MessengerError> {
        let id: [u8; 16] = rand::random();
        let envelope = seal_message(&self.identity, &self.profile.phone, &to.account, &to.sealing_key, id, text)?;
        let ack = self.conn.send(&to.account, Bytes::from(envelope)).await?;
        Ok(Sent { id: hex::encode(id), server_id: ack.server_id })
    }

    /// Opens the delivery stream.
    pub async fn inbox(&self) -> Result<Inbox, MessengerError> {
        Ok(self.conn.subscribe().await?)
    }

    /// Opens, verifies and de-duplicates a delivered envelope. Call [`Messenger::save_seen`] before acknowledging.
    pub fn accept(&mut self, d: &Deliver) -> Accepted {
        let m = match open_message(&self.identity, &d.envelope) {
            Ok(m) => m,
            Err(e) => return Accepted::Unreadable(e),
        };
        let id = hex::encode(&m.message_id);
        if !self.seen.insert(&id) {
            return Accepted::Duplicate;
        }
        let from_account = m.sender_account().map(|a| a.to_string()).unwrap_or_default();
        Accepted::New(ReceivedMessage {
            id,
            server_id: d.server_id,
            from: m.sender_phone,
            from_account,
            text: m.text,
            sent_at: m.sent_at_ms,
            stored_at: d.stored_at_ms,
        })
    }

    /// Persists the de-duplication state.
    pub fn save_seen(&self) -> Result<(), MessengerError> {
        Ok(self.home.save_seen(&self.seen)?)
    }

    /// Receives until the mailbox is drained and at least `min` new messages arrived, or `wait` has passed with the
    /// mailbox drained. Every delivered envelope is acknowledged (after the de-duplication state is saved) before
    /// this returns. Unreadable envelopes are acknowledged, dropped and reported on the log.
    pub async fn receive(&mut self, min: usize, wait: Duration) -> Result<Vec<ReceivedMessage>, MessengerError> {
        let deadline = Instant::now() + wait;
        let mut inbox = self.inbox().await?;
        let mut out = Vec::new();
        let mut pending = Vec::new();
        let (mut drained, mut acks_in_flight) = (false, 0usize);
        loop {
            let settled = drained && acks_in_flight == 0 && pending.is_empty();
            if settled && (out.len() >= min || Instant::now() >= deadline) {
                return Ok(out);
            }
            // Past the deadline, only finish acknowledging what was received (bounded by a grace period).
            let until = if settled { deadline } else { deadline.max(Instant::now()) + Duration::from_secs(10) };
            let event = match tokio::time::timeout_at(until, inbox.next()).await {
                Ok(Some(event)) => event?,
                Ok(None) => return Err(ClientError::Protocol("relay closed the delivery stream".into()).into()),
                Err(_) if settled => return Ok(out),
                Err(_) => return Err(MessengerError::Timeout("relay did not confirm acknowledgements".into())),
            };
            match event {
                InboxEvent::Deliver(d) => {
                    drained = false;
                    match self.accept(&d) {
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
                self.save_seen()?;
                inbox.ack(&pending).await?;
                pending.clear();
                acks_in_flight += 1;
            }
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.conn.close().await;
    }
}

fn decode_contact(c: &Contact) -> Option<DirectoryEntry> {
    let key = |s: &str| {
        let mut k = [0u8; 32];
        hex::decode_to_slice(s, &mut k).ok().map(|_| k)
    };
    Some(DirectoryEntry {
        account: AccountId::from_hex(&c.account_id)?,
        identity_key: key(&c.identity_key)?,
        sealing_key: key(&c.sealing_key)?,
    })
}
