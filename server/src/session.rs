//! One client connection: its authentication state and its request streams.
//!
//! Each bidirectional stream carries request frames answered in order; a stream that sends `Subscribe` becomes the
//! delivery stream. A refused request gets an error frame and the stream stays usable. A frame that is oversized,
//! undecodable or cut short gets an error frame, and then that stream (only) is closed with a protocol error code;
//! the connection and its other streams go on.
//!
//! Authentication (`Auth`, or `Register` for a new account) is a signature by the account's identity key over a
//! transcript whose challenge is 32 bytes of keying material exported from this connection's TLS session. Both
//! sides derive it independently, it depends on fresh randomness from both, and no other connection has the same
//! value, so it serves as the server's challenge without an extra round trip, and a signature cannot be replayed on
//! another connection. A connection authenticates once, as one account.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use ed25519_dalek::{Signature, VerifyingKey};
use relay_proto::auth::{EKM_LEN, KEY_LEN, auth_transcript, register_transcript};
use relay_proto::consent::{ConsentError, ConsentStatement, Decision};
use relay_proto::merkle;
use relay_proto::wire::{
    AccessKeySet, Ack, Acked, Auth, AuthOk, Bundle, ClientFrame, ConsentList, ConsentRecorded, ExportList, FetchBundle,
    ListExports, LogLeaf, Lookup, LookupResult, PrekeyCounts, PutConsent, Register, Registered, SealedSend, Send,
    SendAck, ServerFrame, SetAccessKey, SignedStatement, UploadPrekeys, client_frame::Body as Req,
    server_frame::Body as Resp,
};
use relay_proto::{AccountId, ErrorCode, MAX_FRAME_LEN, PROTOCOL_VERSION, PhoneNumber};
use relay_quic::{ReadError, read_frame_within, write_frame};

use crate::reject::Reject;
use crate::relay::Shared;
use crate::store::directory::AccountKeys;

/// Longest accepted device-info field, in bytes.
pub const MAX_DEVICE_FIELD: usize = 64;
/// Length of a sealed-sender access key.
pub const ACCESS_KEY_LEN: usize = 32;
/// Clients are told to replenish a one-time prekey pool below this many keys.
pub const PREKEY_LOW_WATERMARK: u32 = 20;

/// Per-connection state.
pub struct Session {
    ekm: [u8; EKM_LEN],
    account: OnceLock<AccountId>,
    peer: std::net::IpAddr,
}

impl Session {
    /// A new, unauthenticated session bound to the connection's exported keying material.
    pub fn new(ekm: [u8; EKM_LEN], peer: std::net::IpAddr) -> Self {
        Self { ekm, account: OnceLock::new(), peer }
    }

    fn account(&self) -> Result<AccountId, Reject> {
        self.account.get().copied().ok_or_else(Reject::unauthenticated)
    }

    fn authenticate(&self, account: AccountId) -> Result<(), Reject> {
        let current = *self.account.get_or_init(|| account);
        if current != account {
            return Err(Reject::invalid("this connection is already authenticated as another account"));
        }
        Ok(())
    }
}

/// Serves one request stream.
pub async fn serve_stream(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    loop {
        let frame =
            match read_frame_within::<ClientFrame>(&mut recv, MAX_FRAME_LEN, shared.limits.frame_timeout()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    send.finish().ok();
                    return;
                }
                Err(ReadError::Stream(_)) => return,
                Err(e) => {
                    let (code, close) = e.codes();
                    shared.metrics.error(code);
                    tracing::debug!(error = %e, "bad frame, closing stream");
                    recv.stop(close.code().into()).ok();
                    write_frame(&mut send, &Reject::new(code, e.to_string()).to_frame()).await.ok();
                    send.finish().ok();
                    return;
                }
            };
        let reply = match frame.body {
            Some(Req::Subscribe(_)) => match session.account() {
                Ok(account) => return crate::delivery::run(shared, account, send, recv).await,
                Err(reject) => Err(reject),
            },
            Some(Req::Register(r)) => register(&shared, &session, r).await,
            Some(Req::Auth(a)) => auth(&shared, &session, a),
            Some(Req::Lookup(l)) => lookup(&shared, &session, l),
            Some(Req::Send(s)) => send_envelope(&shared, &session, s).await,
            Some(Req::Ack(a)) => ack(&shared, &session, a),
            Some(Req::UploadPrekeys(u)) => upload_prekeys(&shared, &session, u).await,
            Some(Req::FetchBundle(f)) => fetch_bundle(&shared, &session, f).await,
            Some(Req::SetAccessKey(k)) => set_access_key(&shared, &session, k).await,
            Some(Req::SealedSend(s)) => sealed_send(&shared, s).await,
            Some(Req::PutConsent(c)) => put_consent(&shared, &session, c).await,
            Some(Req::ListConsent(_)) => list_consent(&shared, &session),
            Some(Req::ListExports(l)) => list_exports(&shared, &session, l),
            None => Err(Reject::invalid("empty or unknown request")),
        };
        let frame = reply.unwrap_or_else(|r| {
            shared.metrics.error(r.code);
            r.to_frame()
        });
        if write_frame(&mut send, &frame).await.is_err() {
            return;
        }
    }
}

fn resp(body: Resp) -> Result<ServerFrame, Reject> {
    Ok(ServerFrame { body: Some(body) })
}

fn key32(bytes: &[u8], what: &str) -> Result<[u8; KEY_LEN], Reject> {
    bytes.try_into().map_err(|_| Reject::invalid(format!("{what} must be {KEY_LEN} bytes")))
}

fn check_version(v: u32) -> Result<(), Reject> {
    if v != PROTOCOL_VERSION {
        return Err(Reject::new(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {v} is not supported (this relay speaks {PROTOCOL_VERSION})"),
        ));
    }
    Ok(())
}

fn verify(identity_key: &[u8; KEY_LEN], transcript: &[u8], signature: &[u8]) -> Result<(), Reject> {
    let bad = || Reject::new(ErrorCode::BadSignature, "signature does not verify for this identity key and connection");
    let key = VerifyingKey::from_bytes(identity_key).map_err(|_| bad())?;
    let sig = Signature::from_slice(signature).map_err(|_| bad())?;
    key.verify_strict(transcript, &sig).map_err(|_| bad())
}

async fn register(shared: &Shared, session: &Session, r: Register) -> Result<ServerFrame, Reject> {
    check_version(r.protocol_version)?;
    if !shared.registrations.allow(crate::ratelimit::address_key(session.peer), Instant::now()) {
        return Err(Reject::new(
            ErrorCode::RateLimited,
            format!(
                "at most {} registrations per minute from one address",
                shared.limits.registrations_per_minute_per_ip
            ),
        ));
    }
    let identity_key = key32(&r.identity_key, "identity_key")?;
    let sealing_key = key32(&r.sealing_key, "sealing_key")?;
    let phone = PhoneNumber::parse(&r.phone).map_err(|e| Reject::new(ErrorCode::InvalidPhone, e.to_string()))?;
    let device = r.device.unwrap_or_default();
    for (name, value) in [("model", &device.model), ("os", &device.os), ("app_version", &device.app_version)] {
        if value.len() > MAX_DEVICE_FIELD || value.chars().any(char::is_control) {
            return Err(Reject::invalid(format!(
                "device {name} must be at most {MAX_DEVICE_FIELD} bytes of printable text"
            )));
        }
    }
    let transcript = register_transcript(&session.ekm, &identity_key, &sealing_key, phone.as_str(), &device);
    verify(&identity_key, &transcript, &r.signature)?;
    let account = AccountId::from_identity_key(&identity_key);
    if session.account.get().is_some_and(|a| *a != account) {
        return Err(Reject::invalid("this connection is already authenticated as another account"));
    }
    let keys = AccountKeys { identity_key, sealing_key };
    let (account, created) = shared.store.directory.register(keys, &phone, device, relay_proto::now_ms())?;
    shared.store.commit.durable().await?;
    session.authenticate(account)?;
    tracing::info!(%account, created, "registered");
    resp(Resp::Registered(Registered { account_id: account.as_bytes().to_vec().into(), created }))
}

fn auth(shared: &Shared, session: &Session, a: Auth) -> Result<ServerFrame, Reject> {
    check_version(a.protocol_version)?;
    let account = AccountId::from_slice(&a.account_id).ok_or_else(|| Reject::invalid("account_id must be 16 bytes"))?;
    let keys = shared
        .store
        .directory
        .keys(&account)?
        .ok_or_else(|| Reject::new(ErrorCode::NotFound, "no such account: register first"))?;
    verify(&keys.identity_key, &auth_transcript(&session.ekm, &account), &a.signature)?;
    session.authenticate(account)?;
    tracing::debug!(%account, "authenticated");
    let prekeys = Some(prekey_counts(shared, &account)?);
    resp(Resp::AuthOk(AuthOk { account_id: a.account_id, server_time_ms: relay_proto::now_ms(), prekeys }))
}

fn lookup(shared: &Shared, session: &Session, l: Lookup) -> Result<ServerFrame, Reject> {
    let account = session.account()?;
    if !shared.lookups.allow(account, Instant::now()) {
        return Err(Reject::new(
            ErrorCode::RateLimited,
            format!("at most {} lookups per minute", shared.limits.lookups_per_minute),
        ));
    }
    let phone = PhoneNumber::parse(&l.phone).map_err(|e| Reject::new(ErrorCode::InvalidPhone, e.to_string()))?;
    let (found, keys) = shared
        .store
        .directory
        .lookup(&phone)?
        .ok_or_else(|| Reject::new(ErrorCode::NotFound, "no account with this phone number"))?;
    resp(Resp::LookupResult(LookupResult {
        account_id: found.as_bytes().to_vec().into(),
        identity_key: keys.identity_key.to_vec().into(),
        sealing_key: keys.sealing_key.to_vec().into(),
    }))
}

/// The message path: stores an opaque envelope for the recipient and acknowledges once it is durable. It records
/// nothing about the sender and reads no phone number or device info.
async fn store_envelope(shared: &Shared, recipient: &[u8], envelope: &[u8]) -> Result<ServerFrame, Reject> {
    let recipient =
        AccountId::from_slice(recipient).ok_or_else(|| Reject::invalid("recipient must be a 16-byte account id"))?;
    let max = shared.limits.max_envelope_bytes;
    if envelope.len() > max {
        return Err(Reject::new(
            ErrorCode::EnvelopeTooLarge,
            format!("envelope of {} bytes exceeds the limit of {max} bytes", envelope.len()),
        ));
    }
    if envelope.is_empty() {
        return Err(Reject::invalid("empty envelope"));
    }
    if !shared.store.directory.exists(&recipient)? {
        return Err(Reject::new(ErrorCode::UnknownRecipient, "no such recipient account"));
    }
    let stored = shared.store.mailboxes.append(&recipient, envelope, relay_proto::now_ms())?;
    shared.store.commit.durable().await?;
    shared.metrics.stored();
    shared.subscribers.notify(&recipient);
    resp(Resp::SendAck(SendAck { server_id: stored.id, stored_at_ms: stored.stored_at_ms }))
}

async fn send_envelope(shared: &Shared, session: &Session, s: Send) -> Result<ServerFrame, Reject> {
    let account = session.account()?;
    if !shared.sends.allow(account, Instant::now()) {
        return Err(Reject::new(
            ErrorCode::RateLimited,
            format!("at most {} sends per second from one account", shared.limits.sends_per_second),
        ));
    }
    store_envelope(shared, &s.recipient, &s.envelope).await
}

/// A send that names no sender, on any connection: authorised by the recipient's access key, and limited per
/// recipient (on top of the mailbox quota) so that a leaked key cannot flood a mailbox faster than the limit.
async fn sealed_send(shared: &Shared, s: SealedSend) -> Result<ServerFrame, Reject> {
    let recipient =
        AccountId::from_slice(&s.recipient).ok_or_else(|| Reject::invalid("recipient must be a 16-byte account id"))?;
    let bad_key = || Reject::new(ErrorCode::BadAccessKey, "access key not valid for this recipient");
    if s.access_key.len() != ACCESS_KEY_LEN || !shared.store.prekeys.access_allowed(&recipient, &s.access_key)? {
        return Err(bad_key());
    }
    if !shared.sealed_sends.allow(recipient, Instant::now()) {
        return Err(Reject::new(
            ErrorCode::RateLimited,
            format!("at most {} sealed sends per minute to one recipient", shared.limits.sealed_sends_per_minute),
        ));
    }
    store_envelope(shared, &s.recipient, &s.envelope).await
}

fn prekey_counts(shared: &Shared, account: &AccountId) -> Result<PrekeyCounts, Reject> {
    let c = shared.store.prekeys.counts(account)?;
    Ok(PrekeyCounts {
        one_time_prekeys: c.one_time,
        kem_prekeys: c.kem,
        low_watermark: PREKEY_LOW_WATERMARK,
        has_signed_prekey: c.signed,
        has_last_resort_kem_prekey: c.last_resort,
    })
}

async fn upload_prekeys(shared: &Shared, session: &Session, u: UploadPrekeys) -> Result<ServerFrame, Reject> {
    let account = session.account()?;
    shared.store.prekeys.upload(
        &account,
        u.signed_prekey.as_ref(),
        &u.one_time_prekeys,
        &u.kem_prekeys,
        u.last_resort_kem_prekey.as_ref(),
    )?;
    shared.store.commit.durable().await?;
    resp(Resp::PrekeyCounts(prekey_counts(shared, &account)?))
}

async fn fetch_bundle(shared: &Shared, session: &Session, f: FetchBundle) -> Result<ServerFrame, Reject> {
    let me = session.account()?;
    if !shared.lookups.allow(me, Instant::now()) {
        return Err(Reject::new(
            ErrorCode::RateLimited,
            format!("at most {} lookups and bundle fetches per minute", shared.limits.lookups_per_minute),
        ));
    }
    let account = AccountId::from_slice(&f.account_id).ok_or_else(|| Reject::invalid("account_id must be 16 bytes"))?;
    let keys =
        shared.store.directory.keys(&account)?.ok_or_else(|| Reject::new(ErrorCode::NotFound, "no such account"))?;
    let taken = shared
        .store
        .prekeys
        .take_bundle(&account)?
        .ok_or_else(|| Reject::new(ErrorCode::NoPrekeys, "this account has not published prekeys"))?;
    // The consumed one-time keys must stay consumed across a crash before the bundle is handed out.
    shared.store.commit.durable().await?;
    resp(Resp::Bundle(Bundle {
        account_id: f.account_id,
        identity_key: keys.identity_key.to_vec().into(),
        identity_dh_key: keys.sealing_key.to_vec().into(),
        signed_prekey: Some(taken.signed),
        one_time_prekey: taken.one_time,
        kem_prekey: Some(taken.kem),
        kem_last_resort: taken.kem_last_resort,
    }))
}

async fn set_access_key(shared: &Shared, session: &Session, k: SetAccessKey) -> Result<ServerFrame, Reject> {
    let account = session.account()?;
    shared.store.prekeys.set_access_verifier(&account, &k.verifier)?;
    shared.store.commit.durable().await?;
    resp(Resp::AccessKeySet(AccessKeySet {}))
}

/// Records a consent statement: it must be the caller's own, signed by the caller's identity key, for a purpose in
/// the catalogue (a grant: under its current notice), with a sequence number above the last. Acknowledged only once
/// durable, so that an acknowledged withdrawal is what the export interface reads from then on.
async fn put_consent(shared: &Shared, session: &Session, c: PutConsent) -> Result<ServerFrame, Reject> {
    let account = session.account()?;
    let rejected = |m: String| Reject::new(ErrorCode::ConsentRejected, m);
    let statement = ConsentStatement::decode(&c.statement).map_err(|e| rejected(e.to_string()))?;
    if statement.account != account {
        return Err(rejected(ConsentError::WrongAccount.to_string()));
    }
    let keys = shared.store.directory.keys(&account)?.ok_or_else(Reject::unauthenticated)?;
    let signature: [u8; 64] =
        c.signature.as_ref().try_into().map_err(|_| rejected(ConsentError::BadSignature.to_string()))?;
    verify(&keys.identity_key, &statement.signed_bytes(), &signature)
        .map_err(|_| rejected(ConsentError::BadSignature.to_string()))?;
    let now = relay_proto::now_ms();
    shared.store.consent.record(&statement, &signature, now)?;
    shared.store.commit.durable().await?;
    if statement.decision == Decision::Withdraw {
        // The withdrawal fence: an export of this pair in flight finishes (or its lease lapses) before the user hears
        // that the withdrawal took effect; any later export attempt reads the withdrawal and is refused.
        shared.fence.wait_clear(&(account, statement.purpose, statement.affiliate.clone())).await;
    }
    resp(Resp::ConsentRecorded(ConsentRecorded {
        sequence: statement.sequence,
        recorded_at_ms: now,
        statement_hash: statement.hash().to_vec().into(),
    }))
}

fn list_consent(shared: &Shared, session: &Session) -> Result<ServerFrame, Reject> {
    let account = session.account()?;
    let latest = shared
        .store
        .consent
        .latest(&account)?
        .into_iter()
        .map(|r| SignedStatement {
            statement: r.encoded.into(),
            signature: r.signature.to_vec().into(),
            recorded_at_ms: r.recorded_at_ms,
        })
        .collect();
    let last_sequence = shared.store.consent.last_sequence(&account)?;
    resp(Resp::ConsentList(ConsentList { latest, last_sequence }))
}

/// The authenticated account's entries of the export log, with proofs; no request names another account.
fn list_exports(shared: &Shared, session: &Session, l: ListExports) -> Result<ServerFrame, Reject> {
    let account = session.account()?;
    let listing = shared.store.export_log.list(
        &account,
        l.tree_size,
        l.start_index,
        l.since_size,
        relay_proto::MAX_LISTED_EXPORTS,
    )?;
    let entries = listing
        .entries
        .into_iter()
        .map(|(index, leaf, proof)| LogLeaf { index, leaf: leaf.into(), proof: merkle::proof_to_wire(&proof) })
        .collect();
    resp(Resp::ExportList(ExportList {
        log_key: listing.log_key.map(|k| k.to_bytes().to_vec().into()).unwrap_or_default(),
        head: listing.head.as_ref().map(Into::into),
        entries,
        next_index: listing.next_index,
        more: listing.more,
        consistency: merkle::proof_to_wire(&listing.consistency),
    }))
}

fn ack(shared: &Shared, session: &Session, a: Ack) -> Result<ServerFrame, Reject> {
    let account = session.account()?;
    let removed = shared.store.mailboxes.remove(&account, &a.server_ids)?;
    resp(Resp::Acked(Acked { removed }))
}
