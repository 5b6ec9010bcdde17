//! The pipelined send stream (protocol.md 4.3): after `OpenSendStream`, a stream carries many `PipelinedSend`
//! frames, each tagged with the client's sequence number, and the relay acknowledges them in batches.
//!
//! Contract:
//! - Frames are served in order: each is checked and appended to its recipient's mailbox as it is read.
//! - A frame is acknowledged (in a `SendAcks`) only after a group-commit flush that started after its append
//!   returned, so only once durable; one `SendAcks` covers every frame that one flush made durable. If the flush
//!   fails, each of those frames gets `SendRefused { STORAGE_UNAVAILABLE }` instead, never an ack.
//! - A refused frame (bad recipient, too large, rate, access key) gets its own `SendRefused` with its sequence
//!   number and the stream goes on. A sequence number other than the previous plus one, another request, or a
//!   frame error ends the stream (after the answers already due).
//! - Memory: frames are read through the connection's [`relay_quic::FrameBudget`] like any request, and a stored
//!   frame's bytes stay counted against it until its answer is written (a stalled disk stops the reading, not the
//!   budget); per stream at most [`MAX_PENDING`] outcomes (a sequence number and a server id each, no envelope bytes) are queued and at most
//!   as many more are in the batch being flushed: past that the relay stops reading the stream, and QUIC flow
//!   control holds the client back.

use bytes::BytesMut;
use relay_proto::frame::encode_into;
use relay_proto::wire::{
    ClientFrame, PipelinedSend, SendAcks, SendRefused, ServerFrame, client_frame::Body as Req,
    server_frame::Body as Resp,
};
use relay_proto::{AccountId, ErrorCode, MAX_FRAME_LEN, StreamCloseCode};
use relay_quic::{FrameHold, ReadError, read_frame_held};
use tokio::sync::mpsc;

use super::Handlers;
use super::state::Session;
use crate::reject::Reject;

/// Outcomes (stored or refused frames) queued for the writing half per stream; also the largest batch it takes.
pub const MAX_PENDING: usize = 1024;

/// What the reading half hands the writing half, in stream order.
enum Outcome {
    /// Appended, not yet known durable; the frame's bytes stay counted against the connection's budget until it is
    /// answered.
    Stored { seq: u64, recipient: AccountId, id: u64, stored_at_ms: u64, hold: Option<FrameHold> },
    /// Refused before anything was stored.
    Refused { seq: u64, reject: Reject },
    /// The stream ends after this error frame (if any) is written.
    End(Option<Box<ServerFrame>>),
}

/// Serves a stream that sent `OpenSendStream`, until it ends.
pub async fn serve(handlers: &Handlers, session: &Session, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let (tx, rx) = mpsc::channel(MAX_PENDING);
    tokio::join!(read_half(handlers, session, &mut recv, tx), write_half(handlers, &mut send, rx));
}

/// Reads, checks and appends each frame, handing its outcome on in order.
async fn read_half(handlers: &Handlers, session: &Session, recv: &mut quinn::RecvStream, tx: mpsc::Sender<Outcome>) {
    let mut expected = 1u64;
    loop {
        if session.ended() {
            return;
        }
        let budget = Some(session.frame_budget());
        let read = read_frame_held::<ClientFrame>(recv, MAX_FRAME_LEN, handlers.frame_timeout, budget).await;
        let outcome = match read {
            Ok(Some((ClientFrame { body: Some(Req::PipelinedSend(p)) }, hold))) if p.seq == expected => {
                expected += 1;
                one(handlers, session, p, hold).await
            }
            Ok(Some((ClientFrame { body: Some(Req::PipelinedSend(p)) }, _))) => {
                let message = format!("sequence number {} where {expected} was due", p.seq);
                end(handlers, recv, ErrorCode::InvalidRequest, StreamCloseCode::ProtocolError, message)
            }
            Ok(Some(_)) => {
                let message = "only PipelinedSend is accepted on a pipelined send stream".to_string();
                end(handlers, recv, ErrorCode::InvalidRequest, StreamCloseCode::ProtocolError, message)
            }
            Ok(None) | Err(ReadError::Stream(_)) => return,
            Err(e) => {
                let (code, close) = e.codes();
                end(handlers, recv, code, close, e.to_string())
            }
        };
        let last = matches!(outcome, Outcome::End(_));
        if tx.send(outcome).await.is_err() || last {
            return;
        }
    }
}

/// Stops the client's half and makes the final error frame.
fn end(
    handlers: &Handlers,
    recv: &mut quinn::RecvStream,
    code: ErrorCode,
    close: StreamCloseCode,
    message: String,
) -> Outcome {
    handlers.metrics.error(code);
    recv.stop(close.code().into()).ok();
    Outcome::End(Some(Box::new(Reject::new(code, message).to_frame())))
}

/// Checks and appends one frame.
async fn one(handlers: &Handlers, session: &Session, p: PipelinedSend, hold: Option<FrameHold>) -> Outcome {
    let m = &handlers.messaging;
    let appended = match (p.send, p.sealed) {
        (Some(s), None) => match m.check_send(session) {
            Ok(()) => m.append(&s.recipient, &s.envelope).await,
            Err(reject) => Err(reject),
        },
        (None, Some(s)) => match m.check_sealed(&s).await {
            Ok(()) => m.append(&s.recipient, &s.envelope).await,
            Err(reject) => Err(reject),
        },
        _ => Err(Reject::invalid("a PipelinedSend holds exactly one of send and sealed")),
    };
    match appended {
        Ok((recipient, stored)) => {
            Outcome::Stored { seq: p.seq, recipient, id: stored.id, stored_at_ms: stored.stored_at_ms, hold }
        }
        Err(reject) => {
            handlers.metrics.error(reject.code);
            Outcome::Refused { seq: p.seq, reject }
        }
    }
}

/// Takes every outcome ready, waits for one flush covering the stored ones, and answers them in one write.
async fn write_half(handlers: &Handlers, send: &mut quinn::SendStream, mut rx: mpsc::Receiver<Outcome>) {
    let mut batch = Vec::new();
    let mut out = BytesMut::new();
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, MAX_PENDING).await == 0 {
            send.finish().ok();
            return;
        }
        let stored = batch.iter().any(|o| matches!(o, Outcome::Stored { .. }));
        // Every append in `batch` returned before it was queued, so this flush covers them all.
        let durable = if stored { handlers.messaging.commit.durable().await.map_err(Reject::from) } else { Ok(()) };
        let mut acks = SendAcks::default();
        let mut last = None;
        let mut frames = Vec::new();
        // The frames' budget, given back once their answers are written.
        let mut holds = Vec::new();
        for outcome in batch.drain(..) {
            match (outcome, &durable) {
                (Outcome::Stored { seq, recipient, id, stored_at_ms, hold }, Ok(())) => {
                    handlers.messaging.stored(&recipient);
                    acks.seqs.push(seq);
                    acks.server_ids.push(id);
                    acks.stored_at_ms = stored_at_ms;
                    holds.extend(hold);
                }
                (Outcome::Stored { seq, hold, .. }, Err(reject)) => {
                    frames.push(refused(seq, reject));
                    holds.extend(hold);
                }
                (Outcome::Refused { seq, reject }, _) => frames.push(refused(seq, &reject)),
                (Outcome::End(frame), _) => last = Some(frame),
            }
        }
        out.clear();
        if !acks.seqs.is_empty() {
            encode_into(&ServerFrame { body: Some(Resp::SendAcks(acks)) }, &mut out).ok();
        }
        for frame in frames.iter().chain(last.iter().flatten().map(|f| &**f)) {
            encode_into(frame, &mut out).ok();
        }
        if send.write_all(&out).await.is_err() {
            return;
        }
        drop(holds);
        if last.is_some() {
            send.finish().ok();
            return;
        }
    }
}

fn refused(seq: u64, reject: &Reject) -> ServerFrame {
    ServerFrame { body: Some(Resp::SendRefused(SendRefused { seq, error: Some(reject.to_frame_error()) })) }
}
