//! Delivery: pushing a mailbox to its owner over the connection's delivery stream.
//!
//! The mailbox in the store is the only source of truth. A delivery stream keeps a cursor (the highest server id it
//! has pushed) and, whenever the mailbox may have changed, pushes entries above the cursor, at most `window` of them
//! unacknowledged at a time, so a client that never reads or never acks costs bounded memory: the backlog stays in
//! sled. Senders wake delivery streams through [`Subscribers`] (in `subscribers`) after their envelope is durable. Acks remove entries
//! from the authenticated account's own mailbox only.
//!
//! The mailbox is scanned only when it may hold something new: at start, after a wake-up, and after acks when the
//! last scan stopped at a full window. The frames of one scan (and the `QueueEmpty` that may follow them) are
//! encoded into one buffer and written at once, so they share QUIC packets.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use relay_proto::frame::encode_into;
use relay_proto::wire::{Acked, ClientFrame, Deliver, QueueEmpty, ServerFrame, client_frame, server_frame};
use relay_proto::{AccountId, ErrorCode, MAX_FRAME_LEN, StreamCloseCode};
use relay_quic::{ReadError, read_frame_within, write_frame};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::reject::Reject;
use crate::store::Mailboxes;
use crate::subscribers::Subscribers;

enum Incoming {
    Ack(Vec<u64>),
    Bad(Reject, StreamCloseCode),
}

/// Reads the client's half of a delivery stream: only `Ack` frames are expected. Runs in its own task so that the
/// push loop never cancels a half-read frame.
async fn read_acks(mut recv: quinn::RecvStream, tx: mpsc::Sender<Incoming>, frame_timeout: Duration) {
    loop {
        let item = match read_frame_within::<ClientFrame>(&mut recv, MAX_FRAME_LEN, frame_timeout).await {
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
    pub mailboxes: Arc<Mailboxes>,
    /// Wake-ups after durable sends.
    pub subscribers: Arc<Subscribers>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Envelopes pushed and not yet acknowledged, at most.
    pub window: usize,
    /// Time a started `Ack` frame has to complete.
    pub frame_timeout: Duration,
}

/// Serves a delivery stream of `account` until the client closes it, the connection ends or it misbehaves.
pub async fn run(delivery: &Delivery, account: AccountId, mut send: quinn::SendStream, recv: quinn::RecvStream) {
    if let Err(e) = push_loop(delivery, account, &mut send, recv).await {
        tracing::debug!(error = %e, "delivery stream ended");
    }
}

async fn push_loop(
    delivery: &Delivery,
    account: AccountId,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), relay_quic::WriteError> {
    let mut subscription = delivery.subscribers.subscribe(account);
    let (tx, mut incoming) = mpsc::channel(8);
    let reader = tokio::spawn(read_acks(recv, tx, delivery.frame_timeout));
    let _abort_reader = AbortOnDrop(reader);
    let window = delivery.window;
    let mut cursor = 0u64;
    let mut in_flight = BTreeSet::new();
    let mut told_empty = false;
    // Whether the mailbox may hold entries above the cursor.
    let mut maybe_more = true;
    let mut out = BytesMut::new();
    loop {
        let room = window.saturating_sub(in_flight.len());
        if room > 0 && maybe_more {
            // Mark the change seen before scanning: a send that lands during the scan wakes us again.
            subscription.rx.borrow_and_update();
            let batch = match delivery.mailboxes.scan(&account, cursor, room, relay_proto::now_ms()) {
                Ok(b) => b,
                Err(e) => {
                    let reject = Reject::from(e);
                    delivery.metrics.error(reject.code);
                    write_frame(send, &reject.to_frame()).await?;
                    return Ok(());
                }
            };
            delivery.metrics.delivered(batch.len() as u64);
            out.clear();
            for e in &batch {
                let deliver = Deliver { server_id: e.id, stored_at_ms: e.stored_at_ms, envelope: e.envelope.clone() };
                encode_into(&frame(server_frame::Body::Deliver(deliver)), &mut out)?;
                cursor = e.id;
                in_flight.insert(e.id);
                told_empty = false;
            }
            // A batch that filled the window may have left entries behind; one that did not has emptied the mailbox.
            maybe_more = batch.len() == room;
            if !maybe_more && !told_empty {
                encode_into(&frame(server_frame::Body::QueueEmpty(QueueEmpty {})), &mut out)?;
                told_empty = true;
            }
            if !out.is_empty() {
                send.write_all(&out).await.map_err(relay_quic::WriteError::from)?;
            }
        }
        let has_room = in_flight.len() < window;
        tokio::select! {
            changed = subscription.rx.changed(), if has_room => {
                if changed.is_err() {
                    return Ok(());
                }
                maybe_more = true;
            }
            item = incoming.recv() => match item {
                Some(Incoming::Ack(ids)) => {
                    let removed = match delivery.mailboxes.remove(&account, &ids) {
                        Ok(n) => n,
                        Err(e) => {
                            let reject = Reject::from(e);
                            delivery.metrics.error(reject.code);
                            write_frame(send, &reject.to_frame()).await?;
                            return Ok(());
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
                    return Ok(());
                }
                None => {
                    send.finish().ok();
                    return Ok(());
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
