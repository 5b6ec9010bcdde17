//! One client connection's request streams, dispatched by request family.
//!
//! Each bidirectional stream carries request frames answered in order; a stream that sends `Subscribe` becomes the
//! delivery stream. A refused request gets an error frame and the stream stays usable. A frame that is oversized,
//! undecodable or cut short gets an error frame, and then that stream (only) is closed with a protocol error code;
//! the connection and its other streams go on.
//!
//! Families, each a handler given only the handles it may use (mini-redis's `apply(db, dst)` is the model):
//! [`auth`] (`Register`, `Auth`, `RequestCode`, `SetRegistrationLock`, `GetSenderCertificate`), [`messaging`]
//! (`Send`, `SealedSend`, `Ack`, `Subscribe`; `OpenSendStream` turns the stream into a [`pipeline`]), [`keys`] (`Lookup`, `FetchBundle`, `UploadPrekeys`, `SetAccessKey`),
//! [`consent`] (`PutConsent`, `ListConsent`, `ConsentHistory`, `ListExports`, `GetNotice`), [`account`]
//! (`DeleteAccount`: once it is answered, the connection is closed and no other stream of it is served again).
//! [`messaging::Messaging`] holds the mailboxes, the identity keys ([`crate::store::Identities`]) and the access
//! keys, and no [`crate::store::Directory`]: the message path cannot read a phone number or device info, by type
//! (invariant 2). The connection's own state is [`Session`].

pub mod account;
pub mod auth;
pub mod checks;
pub mod connections;
pub mod consent;
pub mod keys;
pub mod messaging;
pub mod pipeline;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use relay_proto::wire::{ClientFrame, client_frame::Body as Req};
use relay_quic::{NextRequest, next_request_held, write_frame};

pub use state::{Budgets, Session};

use crate::metrics::Metrics;
use crate::reject::Reject;

/// Every request family's handler, shared by all connections.
pub struct Handlers {
    /// `Register`, `Auth`, `RequestCode`, `SetRegistrationLock`, `GetSenderCertificate`.
    pub auth: auth::Auth,
    /// `Send`, `SealedSend`, `Ack`, `Subscribe`.
    pub messaging: messaging::Messaging,
    /// `Lookup`, `FetchBundle`, `UploadPrekeys`, `SetAccessKey`.
    pub keys: keys::Keys,
    /// `PutConsent`, `ListConsent`, `ConsentHistory`, `ListExports`, `GetNotice`.
    pub consent: consent::Consent,
    /// `DeleteAccount`.
    pub account: account::Account,
    /// Refusals are counted by code.
    pub metrics: Arc<Metrics>,
    /// Time a started request frame has to complete.
    pub frame_timeout: Duration,
}

/// Serves one request stream.
pub async fn serve_stream(
    handlers: Arc<Handlers>,
    session: Arc<Session>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    loop {
        if session.ended() {
            return;
        }
        let error = |code, message| Reject::new(code, message).to_frame();
        let budget = Some(session.frame_budget());
        let next = next_request_held::<ClientFrame, _>(&mut send, &mut recv, handlers.frame_timeout, budget, error);
        // The request's bytes stay counted against the connection's frame budget until it is answered (a send
        // waiting for the disk is bounded like a frame still arriving).
        let (next, _hold) = next.await;
        let frame = match next {
            NextRequest::Request(frame) => frame,
            NextRequest::Closed => return,
            NextRequest::Refused(code) => {
                handlers.metrics.error(code);
                return;
            }
        };
        let h = &handlers;
        let reply = match frame.body {
            Some(Req::Subscribe(_)) => match session.account() {
                Ok(account) => return h.messaging.subscribe(account, session.frame_budget(), send, recv).await,
                Err(reject) => Err(reject),
            },
            Some(Req::OpenSendStream(_)) => return pipeline::serve(h, &session, send, recv).await,
            Some(Req::PipelinedSend(_)) => Err(Reject::invalid("PipelinedSend outside a pipelined send stream")),
            Some(Req::Register(r)) => h.auth.register(&session, r).await,
            Some(Req::Auth(a)) => h.auth.auth(&session, a).await,
            Some(Req::RequestCode(c)) => h.auth.request_code(&session, c).await,
            Some(Req::SetRegistrationLock(l)) => h.auth.set_registration_lock(&session, l).await,
            Some(Req::GetSenderCertificate(_)) => h.auth.sender_certificate(&session).await,
            Some(Req::Send(s)) => h.messaging.send(&session, s).await,
            Some(Req::SealedSend(s)) => h.messaging.sealed_send(s).await,
            Some(Req::Ack(a)) => h.messaging.ack(&session, a).await,
            Some(Req::Lookup(l)) => h.keys.lookup(&session, l).await,
            Some(Req::FetchBundle(f)) => h.keys.fetch_bundle(&session, f).await,
            Some(Req::UploadPrekeys(u)) => h.keys.upload_prekeys(&session, u).await,
            Some(Req::SetAccessKey(k)) => h.keys.set_access_key(&session, k).await,
            Some(Req::PutConsent(c)) => h.consent.put(&session, c).await,
            Some(Req::ListConsent(_)) => h.consent.list(&session).await,
            Some(Req::ListExports(l)) => h.consent.list_exports(&session, l).await,
            Some(Req::GetNotice(n)) => h.consent.notice(&session, n).await,
            Some(Req::ConsentHistory(c)) => h.consent.history(&session, c).await,
            Some(Req::DeleteAccount(d)) => h.account.delete(&session, d).await,
            None => Err(Reject::invalid("empty or unknown request")),
        };
        let frame = reply.unwrap_or_else(|r| {
            handlers.metrics.error(r.code);
            r.to_frame()
        });
        if write_frame(&mut send, &frame).await.is_err() {
            return;
        }
        if session.ended() {
            // The account was erased: the answer goes out whole, then the connection closes.
            let _ = send.finish();
            let _ = tokio::time::timeout(handlers.frame_timeout, send.stopped()).await;
            session.close();
            return;
        }
    }
}
