//! Delivery: pushing a mailbox to its owner over the account's delivery stream.
//!
//! The mailbox in the store is the only source of truth. A delivery stream keeps a cursor (the highest server id it
//! has pushed) and, whenever the mailbox may have changed, pushes entries above the cursor, at most `window` of them
//! unacknowledged at a time, so a client that never reads or never acks costs bounded memory: the backlog stays in
//! sled. Senders wake delivery streams through [`Subscribers`] (in `subscribers`) after their envelope is durable.
//! Acks remove entries from the authenticated account's own mailbox only.
//!
//! Memory is bounded by bytes, not only by the window's count: one scan reads at most `burst_bytes` of envelopes
//! (at least one envelope) from the store, and its frames are encoded into a buffer handed whole to quinn, so the
//! stream keeps no encode buffer between pushes. quinn holds what is written until the peer acknowledges it, at most
//! the connection's send window; past that the write waits for the peer, and nothing more is read from the store.
//! An account has one delivery stream: a newer `Subscribe` (on any connection) ends this one with
//! `SUBSCRIPTION_REPLACED`.
//!
//! The mailbox is scanned only when it may hold something new: at start, after a wake-up, after acks when the last
//! scan stopped at a full window, and right away when the last scan stopped at its byte bound. The frames of one
//! scan (and the `QueueEmpty` that may follow them) are written at once, so they share QUIC packets.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use relay_proto::frame::encode_into;
use relay_proto::wire::{Acked, ClientFrame, Deliver, QueueEmpty, ServerFrame, client_frame, server_frame};
use relay_proto::{AccountId, ErrorCode, MAX_FRAME_LEN, StreamCloseCode};
use relay_quic::{FrameBudget, ReadError, read_frame_budgeted, write_frame};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::reject::Reject;
use crate::store::MailboxStore;
use crate::subscribers::Subscribers;

enum Incoming {
    Ack(Vec<u64>),
    Bad(Reject, StreamCloseCode),
}

/// Reads the client's half of a delivery stream: only `Ack` frames are expected. Runs in its own task so that the
/// push loop never cancels a half-read frame.
async fn read_acks(
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<Incoming>,
    frame_timeout: Duration,
    budget: FrameBudget,
) {
    loop {
        let read = read_frame_budgeted::<ClientFrame>(&mut recv, MAX_FRAME_LEN, frame_timeout, Some(&budget));
        let item = match read.await {
            Ok(Some(ClientFrame { body: Some(client_frame::Body::Ack(ack)) })) => Incoming::Ack(ack.server_ids),
            Ok(Some(ClientFrame { body: Some(client_frame::Body::Subscribe(_)) })) => Incoming::Bad(
                Reject::new(ErrorCode::AlreadySubscribed, "this stream is already the delivery stream"),
                StreamCloseCode::ProtocolError,
            ),
            Ok(Some(_)) => Incoming::Bad(
                Reject::invalid("only Ack frames are accepted on the delivery stream"),
                StreamCloseCode::ProtocolError,
            ),
            Ok(None) | Err(ReadError::Stream(_)) => return,
            Err(e) => {
                let (code, close) = e.codes();
                Incoming::Bad(Reject::new(code, e.to_string()), close)
            }
        };
        let stop = match &item {
            Incoming::Bad(_, close) => Some(*close),
            Incoming::Ack(_) => None,
        };
        if let Some(close) = stop {
            recv.stop(close.code().into()).ok();
        }
        if tx.send(item).await.is_err() || stop.is_some() {
            return;
        }
    }
}

fn frame(body: server_frame::Body) -> ServerFrame {
    ServerFrame { body: Some(body) }
}

/// What a delivery stream uses: the mailboxes (scan and remove of its own account's entries), the wake-ups, the
/// counters and its limits. Nothing else of the relay.
pub struct Delivery {
    /// The mailboxes.
    pub mailboxes: Arc<dyn MailboxStore>,
    /// Wake-ups after durable sends.
    pub subscribers: Arc<Subscribers>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Envelopes pushed and not yet acknowledged, at most.
    pub window: usize,
    /// Envelope bytes read from the store and written in one push, at most (one envelope at least).
    pub burst_bytes: usize,
    /// Time a started `Ack` frame has to complete.
    pub frame_timeout: Duration,
}

/// Serves the delivery stream of `account` until the client closes it, the connection ends, it misbehaves or a
/// newer delivery stream of the account replaces it. `budget` is the connection's, for the `Ack` frames read.
pub async fn run(
    delivery: &Delivery,
    account: AccountId,
    budget: FrameBudget,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    match push_loop(delivery, account, budget, &mut send, recv).await {
        Ok(Ended::Done) => {}
        Ok(Ended::Replaced) => {
            let reject = Reject::new(
                ErrorCode::SubscriptionReplaced,
                "a newer delivery stream of this account replaced this one",
            );
            delivery.metrics.error(reject.code);
            // A peer that does not read could hold this write for ever, and the stream (one of its stream slots)
            // with it: the frame is written only if quinn takes it at once, else the stream is reset, which also
            // drops what quinn still buffers for it.
            match tokio::time::timeout(Duration::ZERO, write_frame(&mut send, &reject.to_frame())).await {
                Ok(Ok(())) => {
                    send.finish().ok();
                }
                _ => {
                    send.reset(StreamCloseCode::ProtocolError.code().into()).ok();
                }
            }
        }
        Ok(Ended::ReplacedMidFrame) => {
            delivery.metrics.error(ErrorCode::SubscriptionReplaced);
            send.reset(StreamCloseCode::ProtocolError.code().into()).ok();
        }
        Err(e) => tracing::debug!(error = %e, "delivery stream ended"),
    }
}

/// Why [`push_loop`] returned.
enum Ended {
    /// The client ended the stream, misbehaved (and was told), or the store failed (and it was told).
    Done,
    /// A newer delivery stream of the account replaced this one.
    Replaced,
    /// The same, while a push was partly written: no frame can follow it.
    ReplacedMidFrame,
}

async fn push_loop(
    delivery: &Delivery,
    account: AccountId,
    budget: FrameBudget,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<Ended, relay_quic::WriteError> {
    let mut subscription = delivery.subscribers.subscribe(account);
    let (tx, mut incoming) = mpsc::channel(8);
    let reader = tokio::spawn(read_acks(recv, tx, delivery.frame_timeout, budget));
    let _abort_reader = AbortOnDrop(reader);
    let window = delivery.window;
    let mut cursor = 0u64;
    let mut in_flight = BTreeSet::new();
    let mut told_empty = false;
    // Whether the mailbox may hold entries above the cursor.
    let mut maybe_more = true;
    loop {
        let room = window.saturating_sub(in_flight.len());
        if room > 0 && maybe_more {
            // Mark the change seen before scanning: a send that lands during the scan wakes us again.
            subscription.rx.borrow_and_update();
            let burst = delivery.burst_bytes;
            let batch = match delivery.mailboxes.scan(&account, cursor, room, burst, relay_proto::now_ms()).await {
                Ok(b) => b,
                Err(e) => {
                    let reject = Reject::from(e);
                    delivery.metrics.error(reject.code);
                    write_frame(send, &reject.to_frame()).await?;
                    return Ok(Ended::Done);
                }
            };
            delivery.metrics.delivered(batch.len() as u64);
            let bytes: usize = batch.iter().map(|e| e.envelope.len()).sum();
            let mut out = BytesMut::with_capacity(bytes + batch.len() * 32 + 16);
            for e in &batch {
                let deliver = Deliver { server_id: e.id, stored_at_ms: e.stored_at_ms, envelope: e.envelope.clone() };
                encode_into(&frame(server_frame::Body::Deliver(deliver)), &mut out)?;
                cursor = e.id;
                in_flight.insert(e.id);
                told_empty = false;
            }
            // A batch that filled the window or reached the byte bound may have left entries behind; one that did
            // neither has emptied the mailbox.
            maybe_more = batch.len() == room || bytes >= burst;
            drop(batch);
            if !maybe_more && !told_empty {
                encode_into(&frame(server_frame::Body::QueueEmpty(QueueEmpty {})), &mut out)?;
                told_empty = true;
            }
            if !out.is_empty() {
                // Handed to quinn whole (no copy); waits while the connection's send window is full.
                let written = send.write_chunk(out.freeze());
                tokio::select! {
                    biased;
                    _ = &mut subscription.replaced => return Ok(Ended::ReplacedMidFrame),
                    r = written => r.map_err(relay_quic::WriteError::from)?,
                }
            }
        }
        if maybe_more && in_flight.len() < window {
            // The last scan stopped at its byte bound: push the rest without waiting for a wake-up.
            continue;
        }
        let has_room = in_flight.len() < window;
        tokio::select! {
            _ = &mut subscription.replaced => return Ok(Ended::Replaced),
            changed = subscription.rx.changed(), if has_room => {
                if changed.is_err() {
                    return Ok(Ended::Replaced);
                }
                maybe_more = true;
            }
            item = incoming.recv() => match item {
                Some(Incoming::Ack(ids)) => {
                    let removed = match delivery.mailboxes.remove(&account, &ids).await {
                        Ok(n) => n,
                        Err(e) => {
                            let reject = Reject::from(e);
                            delivery.metrics.error(reject.code);
                            write_frame(send, &reject.to_frame()).await?;
                            return Ok(Ended::Done);
                        }
                    };
                    delivery.metrics.acknowledged(u64::from(removed));
                    for id in &ids {
                        in_flight.remove(id);
                    }
                    write_frame(send, &frame(server_frame::Body::Acked(Acked { removed }))).await?;
                }
                Some(Incoming::Bad(reject, _)) => {
                    delivery.metrics.error(reject.code);
                    // The reader already stopped the client's half with the close code; the error frame still
                    // reaches the client before our half finishes.
                    write_frame(send, &reject.to_frame()).await?;
                    send.finish().ok();
                    return Ok(Ended::Done);
                }
                None => {
                    send.finish().ok();
                    return Ok(Ended::Done);
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
