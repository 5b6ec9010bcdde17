//! A connection to a relay: QUIC with the relay's certificate pinned, then the wire protocol's requests.
//!
//! Each request runs on its own bidirectional stream, so concurrent requests (many sends at once) do not wait for
//! each other. The delivery stream ([`Inbox`]) is read by its own task and handed over through a channel, so a
//! caller can `select!` on it safely.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relay_proto::auth::{EKM_LEN, auth_transcript, delete_transcript, register_transcript};
use relay_proto::wire::{
    self, Ack, Auth, Bundle, ClientFrame, CodeSent, ConsentList, ConsentRecorded, Deliver, DeviceInfo, FetchBundle,
    GetSenderCertificate, ListConsent, Lookup, PrekeyCounts, PutConsent, Register, RequestCode, SealedSend, SendAck,
    ServerFrame, SetAccessKey, SetRegistrationLock, Subscribe, UploadPrekeys, client_frame::Body as Req,
    server_frame::Body as Resp,
};
use relay_proto::{AccountId, ErrorCode, MAX_FRAME_LEN, PROTOCOL_VERSION};
use relay_quic::{read_frame, write_frame};
use tokio::sync::mpsc;

use crate::identity::Identity;
use crate::pin::PinnedCert;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection could not be set up.
    #[error("cannot connect to relay: {0}")]
    Connect(String),
    /// The relay refused the request.
    #[error("relay refused: {0}")]
    Rejected(wire::Error),
    /// The relay answered something the protocol does not allow here.
    #[error("protocol violation by relay: {0}")]
    Protocol(String),
    /// The connection failed.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A frame could not be written.
    #[error(transparent)]
    Write(#[from] relay_quic::WriteError),
    /// A frame could not be read.
    #[error(transparent)]
    Read(#[from] relay_quic::ReadError),
}

impl ClientError {
    /// The relay's error code, if the relay refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Rejected(e) => Some(e.code()),
            _ => None,
        }
    }

    /// Whether the connection itself failed (could not be set up, was lost, or a frame could not be moved), as
    /// opposed to an answer of the relay: connecting again may help.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            ClientError::Connect(_) | ClientError::Connection(_) | ClientError::Write(_) | ClientError::Read(_)
        )
    }
}

/// A contact as the directory returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// Account id.
    pub account: AccountId,
    /// Ed25519 identity key.
    pub identity_key: [u8; 32],
    /// X25519 sealing key.
    pub sealing_key: [u8; 32],
    /// The identity key's binding of the sealing key, as the relay handed it out (empty if it had none): not
    /// checked by [`Connection::lookup`]; see [`DirectoryEntry::verify_binding`].
    pub sealing_key_signature: Vec<u8>,
}

impl DirectoryEntry {
    /// Whether the identity key signed the sealing key (`relay_proto::identity`), and the account derives from it:
    /// a key the relay made up for the account fails here.
    pub fn verify_binding(&self) -> Result<(), relay_proto::identity::IdentityError> {
        if AccountId::from_identity_key(&self.identity_key) != self.account {
            return Err(relay_proto::identity::IdentityError::BadSignature);
        }
        relay_proto::identity::verify_binding(&self.identity_key, &self.sealing_key, &self.sealing_key_signature)
    }
}

/// What `AuthOk` tells a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// How many prekeys the relay holds for the account.
    pub prekeys: PrekeyCounts,
    /// The relay's sender-certificate key, to pin (`None` if the relay sent none, or not 32 bytes).
    pub sender_certificate_key: Option<[u8; 32]>,
}

/// An open connection to a relay.
pub struct Connection {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    ekm: [u8; EKM_LEN],
}

/// The rustls client configuration: TLS 1.3 only, the messaging ALPN, the relay certificate pinned by `fingerprint`.
/// Its cipher suites come in the provider's order (AES-256-GCM-SHA384 first), and the relay follows the client's
/// order, so this decides the hash of the keying material authentication is bound to.
pub fn tls_config(fingerprint: [u8; 32]) -> Result<rustls::ClientConfig, ClientError> {
    let provider = relay_quic::crypto_provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Connect(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert::new(fingerprint, provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![relay_proto::ALPN.to_vec()];
    Ok(tls)
}

/// How long the client waits without hearing from the relay before it treats the connection as lost (the relay's
/// own idle timeout, if shorter, wins): a relay that crashed or whose node went away is noticed within this, and
/// `chat` reconnects.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// How often an otherwise idle client pings the relay: three times per idle timeout, so one lost ping does not
/// end a healthy connection.
pub const KEEP_ALIVE: Duration = Duration::from_secs(6);

/// Builds the quinn client configuration that pins `fingerprint`.
pub fn client_config(fingerprint: [u8; 32]) -> Result<quinn::ClientConfig, ClientError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls_config(fingerprint)?))
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(relay_quic::transport_config(1024, CLIENT_IDLE_TIMEOUT, Some(KEEP_ALIVE))));
    Ok(config)
}

impl Connection {
    /// Connects to the relay at `addr`, accepting only the certificate with SHA-256 `fingerprint`.
    pub async fn connect(addr: SocketAddr, fingerprint: [u8; 32]) -> Result<Self, ClientError> {
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .map_err(|_| ClientError::Connect("bad bind address".into()))?;
        let endpoint = relay_quic::endpoint(bind, None).map_err(|e| ClientError::Connect(e.to_string()))?;
        Self::connect_on(&endpoint, addr, fingerprint).await
    }

    /// Like [`Connection::connect`], but through an existing client endpoint, so that many connections share one
    /// UDP socket (the load tool opens thousands). [`Connection::close`] then waits for the whole endpoint.
    pub async fn connect_on(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        fingerprint: [u8; 32],
    ) -> Result<Self, ClientError> {
        let conn = endpoint
            .connect_with(client_config(fingerprint)?, addr, "consent-relay")
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let ekm = relay_quic::ekm(&conn).map_err(|_| ClientError::Connect("no keying material".into()))?;
        Ok(Self { endpoint: endpoint.clone(), conn, ekm })
    }

    /// The underlying QUIC connection (for tests that speak raw frames).
    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Sends one request on a new stream and returns the relay's answer; an error frame becomes
    /// [`ClientError::Rejected`].
    pub async fn request(&self, body: Req) -> Result<Resp, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_frame(&mut send, &ClientFrame { body: Some(body) }).await?;
        send.finish().ok();
        match read_frame::<ServerFrame>(&mut recv, MAX_FRAME_LEN).await? {
            Some(ServerFrame { body: Some(Resp::Error(e)) }) => Err(ClientError::Rejected(e)),
            Some(ServerFrame { body: Some(body) }) => Ok(body),
            Some(ServerFrame { body: None }) => Err(ClientError::Protocol("empty response".into())),
            None => Err(ClientError::Protocol("stream closed without a response".into())),
        }
    }

    /// Registers (or updates) `identity`'s account and authenticates this connection as it. Returns whether the
    /// account was created. On a relay that verifies phone numbers this works only for the number `identity`
    /// already holds; see [`Connection::register_verified`].
    pub async fn register(&self, identity: &Identity, phone: &str, device: DeviceInfo) -> Result<bool, ClientError> {
        self.register_verified(identity, phone, device, "", "").await
    }

    /// [`Connection::register`] with the verification code sent to `phone` (after [`Connection::request_code`])
    /// and, to take over a number protected by a registration lock, its PIN; empty strings for none.
    pub async fn register_verified(
        &self,
        identity: &Identity,
        phone: &str,
        device: DeviceInfo,
        code: &str,
        registration_lock_pin: &str,
    ) -> Result<bool, ClientError> {
        let (ik, sk) = (identity.identity_key(), identity.sealing_key());
        let signature = identity.sign(&register_transcript(&self.ekm, &ik, &sk, phone, &device));
        let req = Register {
            protocol_version: PROTOCOL_VERSION,
            identity_key: Bytes::copy_from_slice(&ik),
            sealing_key: Bytes::copy_from_slice(&sk),
            phone: phone.to_owned(),
            device: Some(device),
            signature: Bytes::copy_from_slice(&signature),
            code: code.to_owned(),
            registration_lock_pin: registration_lock_pin.to_owned(),
            sealing_key_signature: Bytes::copy_from_slice(&identity.sealing_key_signature()),
        };
        match self.request(Req::Register(req)).await? {
            Resp::Registered(r) if r.account_id.as_ref() == identity.account_id().as_bytes() => Ok(r.created),
            other => Err(unexpected("Registered", &other)),
        }
    }

    /// Asks the relay to send a verification code to `phone` (no authentication needed).
    pub async fn request_code(&self, phone: &str) -> Result<CodeSent, ClientError> {
        match self.request(Req::RequestCode(RequestCode { phone: phone.to_owned() })).await? {
            Resp::CodeSent(c) => Ok(c),
            other => Err(unexpected("CodeSent", &other)),
        }
    }

    /// Sets (or, with an empty `pin`, removes) the registration lock of the authenticated account; returns whether
    /// a lock is now set.
    pub async fn set_registration_lock(&self, pin: &str) -> Result<bool, ClientError> {
        match self.request(Req::SetRegistrationLock(SetRegistrationLock { pin: pin.to_owned() })).await? {
            Resp::RegistrationLockSet(r) => Ok(r.enabled),
            other => Err(unexpected("RegistrationLockSet", &other)),
        }
    }

    /// Authenticates this connection as `identity`'s account; returns the relay's prekey counts for it.
    pub async fn authenticate(&self, identity: &Identity) -> Result<PrekeyCounts, ClientError> {
        Ok(self.authenticate_as(identity).await?.prekeys)
    }

    /// Authenticates this connection as `identity`'s account; returns what the relay says in `AuthOk`.
    pub async fn authenticate_as(&self, identity: &Identity) -> Result<Authenticated, ClientError> {
        let account = identity.account_id();
        let signature = identity.sign(&auth_transcript(&self.ekm, &account));
        let req = Auth {
            protocol_version: PROTOCOL_VERSION,
            account_id: Bytes::copy_from_slice(account.as_bytes()),
            signature: Bytes::copy_from_slice(&signature),
        };
        match self.request(Req::Auth(req)).await? {
            Resp::AuthOk(ok) => Ok(Authenticated {
                prekeys: ok.prekeys.unwrap_or_default(),
                sender_certificate_key: ok.sender_certificate_key.as_ref().try_into().ok(),
            }),
            other => Err(unexpected("AuthOk", &other)),
        }
    }

    /// Erases `identity`'s account, which this connection is authenticated as (`DeleteAccount`, signed over this
    /// connection's delete transcript). The relay closes the connection after answering.
    pub async fn delete_account(&self, identity: &Identity) -> Result<(), ClientError> {
        let signature = identity.sign(&delete_transcript(&self.ekm, &identity.account_id()));
        let req = relay_proto::wire::DeleteAccount { signature: Bytes::copy_from_slice(&signature) };
        match self.request(Req::DeleteAccount(req)).await? {
            Resp::AccountDeleted(_) => Ok(()),
            other => Err(unexpected("AccountDeleted", &other)),
        }
    }

    /// A sender certificate for the authenticated account, as the relay sent it (the caller verifies it).
    pub async fn sender_certificate(&self) -> Result<relay_proto::identity::SignedCertificate, ClientError> {
        match self.request(Req::GetSenderCertificate(GetSenderCertificate {})).await? {
            Resp::SenderCertificate(c) => {
                relay_proto::identity::SignedCertificate::from_parts(&c.certificate, &c.signature)
                    .map_err(|e| ClientError::Protocol(e.to_string()))
            }
            other => Err(unexpected("SenderCertificate", &other)),
        }
    }

    /// Looks up the account registered with `phone`. The binding of its sealing key is not checked here
    /// ([`DirectoryEntry::verify_binding`]).
    pub async fn lookup(&self, phone: &str) -> Result<DirectoryEntry, ClientError> {
        match self.request(Req::Lookup(Lookup { phone: phone.to_owned() })).await? {
            Resp::LookupResult(r) => {
                let bad = || ClientError::Protocol("malformed lookup result".into());
                Ok(DirectoryEntry {
                    account: AccountId::from_slice(&r.account_id).ok_or_else(bad)?,
                    identity_key: r.identity_key.as_ref().try_into().map_err(|_| bad())?,
                    sealing_key: r.sealing_key.as_ref().try_into().map_err(|_| bad())?,
                    sealing_key_signature: r.sealing_key_signature.to_vec(),
                })
            }
            other => Err(unexpected("LookupResult", &other)),
        }
    }

    /// Stores `envelope` for `recipient`; returns once the relay has acknowledged it durably.
    pub async fn send(&self, recipient: &AccountId, envelope: Bytes) -> Result<SendAck, ClientError> {
        let req = wire::Send { recipient: Bytes::copy_from_slice(recipient.as_bytes()), envelope };
        match self.request(Req::Send(req)).await? {
            Resp::SendAck(a) => Ok(a),
            other => Err(unexpected("SendAck", &other)),
        }
    }

    /// Stores `envelope` for `recipient` without naming the sender, authorised by the recipient's access key. Use it
    /// on a connection that is not authenticated, or the relay learns who is sending.
    pub async fn sealed_send(
        &self,
        recipient: &AccountId,
        envelope: Bytes,
        access_key: &[u8],
    ) -> Result<SendAck, ClientError> {
        let req = SealedSend {
            recipient: Bytes::copy_from_slice(recipient.as_bytes()),
            envelope,
            access_key: Bytes::copy_from_slice(access_key),
        };
        match self.request(Req::SealedSend(req)).await? {
            Resp::SendAck(a) => Ok(a),
            other => Err(unexpected("SendAck", &other)),
        }
    }

    /// Publishes prekeys; returns the counts the relay now holds.
    pub async fn upload_prekeys(&self, upload: UploadPrekeys) -> Result<PrekeyCounts, ClientError> {
        match self.request(Req::UploadPrekeys(upload)).await? {
            Resp::PrekeyCounts(c) => Ok(c),
            other => Err(unexpected("PrekeyCounts", &other)),
        }
    }

    /// Fetches (and so consumes one-time prekeys of) `account`'s prekey bundle.
    pub async fn fetch_bundle(&self, account: &AccountId) -> Result<Bundle, ClientError> {
        let req = FetchBundle { account_id: Bytes::copy_from_slice(account.as_bytes()) };
        match self.request(Req::FetchBundle(req)).await? {
            Resp::Bundle(b) if b.account_id.as_ref() == account.as_bytes() => Ok(b),
            other => Err(unexpected("Bundle", &other)),
        }
    }

    /// Sets the verifier (SHA-256) of the access key senders must present for sealed sends to this account.
    pub async fn set_access_key(&self, verifier: [u8; 32]) -> Result<(), ClientError> {
        let req = SetAccessKey { verifier: Bytes::copy_from_slice(&verifier) };
        match self.request(Req::SetAccessKey(req)).await? {
            Resp::AccessKeySet(_) => Ok(()),
            other => Err(unexpected("AccessKeySet", &other)),
        }
    }

    /// Records a signed consent statement; returns once the relay holds it durably.
    pub async fn put_consent(&self, statement: Vec<u8>, signature: [u8; 64]) -> Result<ConsentRecorded, ClientError> {
        let req = PutConsent { statement: statement.into(), signature: Bytes::copy_from_slice(&signature) };
        match self.request(Req::PutConsent(req)).await? {
            Resp::ConsentRecorded(r) => Ok(r),
            other => Err(unexpected("ConsentRecorded", &other)),
        }
    }

    /// A notice document the exporter published: the pair's current one, or (with `hash`) the one with that SHA-256.
    /// The bytes as served; the caller checks them ([`relay_proto::notice::Notice::decode`] and the hash).
    pub async fn get_notice(
        &self,
        affiliate: &str,
        purpose: &str,
        hash: Option<[u8; 32]>,
    ) -> Result<Vec<u8>, ClientError> {
        let req = relay_proto::wire::GetNotice {
            affiliate: affiliate.to_owned(),
            purpose: purpose.to_owned(),
            hash: hash.map(|h| Bytes::copy_from_slice(&h)).unwrap_or_default(),
        };
        match self.request(Req::GetNotice(req)).await? {
            Resp::NoticeDocument(d) => Ok(d.document.to_vec()),
            other => Err(unexpected("NoticeDocument", &other)),
        }
    }

    /// One page of the account's consent statements after `after_sequence`, as recorded.
    pub async fn consent_history(
        &self,
        after_sequence: u64,
    ) -> Result<relay_proto::wire::ConsentHistoryPage, ClientError> {
        match self.request(Req::ConsentHistory(relay_proto::wire::ConsentHistory { after_sequence })).await? {
            Resp::ConsentHistoryPage(p) => Ok(p),
            other => Err(unexpected("ConsentHistoryPage", &other)),
        }
    }

    /// The account's latest consent statement per pair, and its last sequence number.
    pub async fn list_consent(&self) -> Result<ConsentList, ClientError> {
        match self.request(Req::ListConsent(ListConsent {})).await? {
            Resp::ConsentList(l) => Ok(l),
            other => Err(unexpected("ConsentList", &other)),
        }
    }

    /// One page of this account's export log entries with proofs (see `ListExports` in the schema).
    pub async fn list_exports(
        &self,
        tree_size: u64,
        start_index: u64,
        since_size: u64,
    ) -> Result<relay_proto::wire::ExportList, ClientError> {
        let req = relay_proto::wire::ListExports { tree_size, start_index, since_size };
        match self.request(Req::ListExports(req)).await? {
            Resp::ExportList(l) => Ok(l),
            other => Err(unexpected("ExportList", &other)),
        }
    }

    /// Acknowledges delivered envelopes outside the delivery stream; returns how many the relay removed.
    pub async fn ack(&self, server_ids: Vec<u64>) -> Result<u32, ClientError> {
        match self.request(Req::Ack(Ack { server_ids })).await? {
            Resp::Acked(a) => Ok(a.removed),
            other => Err(unexpected("Acked", &other)),
        }
    }

    /// Opens the delivery stream.
    pub async fn subscribe(&self) -> Result<Inbox, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_frame(&mut send, &ClientFrame { body: Some(Req::Subscribe(Subscribe {})) }).await?;
        let (tx, events) = mpsc::channel(1024);
        tokio::spawn(read_inbox(recv, tx));
        Ok(Inbox { send, events })
    }

    /// Closes the connection and waits briefly for the relay to see it.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await.ok();
    }
}

fn unexpected(wanted: &str, got: &Resp) -> ClientError {
    let name = match got {
        Resp::Registered(_) => "Registered",
        Resp::AuthOk(_) => "AuthOk",
        Resp::LookupResult(_) => "LookupResult",
        Resp::SendAck(_) => "SendAck",
        Resp::Deliver(_) => "Deliver",
        Resp::QueueEmpty(_) => "QueueEmpty",
        Resp::Acked(_) => "Acked",
        Resp::PrekeyCounts(_) => "PrekeyCounts",
        Resp::Bundle(_) => "Bundle",
        Resp::AccessKeySet(_) => "AccessKeySet",
        Resp::ConsentRecorded(_) => "ConsentRecorded",
        Resp::ConsentList(_) => "ConsentList",
        Resp::ExportList(_) => "ExportList",
        Resp::SenderCertificate(_) => "SenderCertificate",
        Resp::CodeSent(_) => "CodeSent",
        Resp::RegistrationLockSet(_) => "RegistrationLockSet",
        Resp::NoticeDocument(_) => "NoticeDocument",
        Resp::ConsentHistoryPage(_) => "ConsentHistoryPage",
        Resp::AccountDeleted(_) => "AccountDeleted",
        Resp::SendAcks(_) => "SendAcks",
        Resp::SendRefused(_) => "SendRefused",
        Resp::Error(_) => "Error",
    };
    ClientError::Protocol(format!("expected {wanted}, got {name}"))
}

/// What the delivery stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum InboxEvent {
    /// An envelope from the mailbox.
    Deliver(Deliver),
    /// Everything in the mailbox right now has been delivered.
    QueueEmpty,
    /// The relay processed an `Ack` and removed this many envelopes.
    Acked(u32),
}

/// The delivery stream of a connection.
pub struct Inbox {
    send: quinn::SendStream,
    events: mpsc::Receiver<Result<InboxEvent, ClientError>>,
}

async fn read_inbox(mut recv: quinn::RecvStream, tx: mpsc::Sender<Result<InboxEvent, ClientError>>) {
    loop {
        let event = match read_frame::<ServerFrame>(&mut recv, MAX_FRAME_LEN).await {
            Ok(Some(ServerFrame { body: Some(Resp::Deliver(d)) })) => Ok(InboxEvent::Deliver(d)),
            Ok(Some(ServerFrame { body: Some(Resp::QueueEmpty(_)) })) => Ok(InboxEvent::QueueEmpty),
            Ok(Some(ServerFrame { body: Some(Resp::Acked(a)) })) => Ok(InboxEvent::Acked(a.removed)),
            Ok(Some(ServerFrame { body: Some(Resp::Error(e)) })) => Err(ClientError::Rejected(e)),
            Ok(Some(_)) => Err(ClientError::Protocol("unexpected frame on the delivery stream".into())),
            Ok(None) => return,
            Err(e) => Err(e.into()),
        };
        let stop = event.is_err();
        if tx.send(event).await.is_err() || stop {
            return;
        }
    }
}

impl Inbox {
    /// The next event; `None` when the relay closed the stream. Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<InboxEvent, ClientError>> {
        self.events.recv().await
    }

    /// Whether events have arrived that [`Inbox::next`] would return without waiting.
    pub fn has_buffered(&self) -> bool {
        !self.events.is_empty()
    }

    /// Acknowledges envelopes by server id; the relay answers with [`InboxEvent::Acked`].
    pub async fn ack(&mut self, server_ids: &[u64]) -> Result<(), ClientError> {
        write_frame(&mut self.send, &ClientFrame { body: Some(Req::Ack(Ack { server_ids: server_ids.to_vec() })) })
            .await?;
        Ok(())
    }
}
