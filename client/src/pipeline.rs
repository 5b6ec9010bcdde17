//! The client side of a pipelined send stream (protocol.md 4.3): one long-lived stream carrying many sends, each
//! tagged with a sequence number, answered in batches.
//!
//! Contract: [`Connection::open_send_stream`] gives a [`PipelineWriter`] (writes `PipelinedSend` frames, numbering
//! them 1, 2, …) and a [`PipelineAnswers`] (reads `SendAcks` and `SendRefused` and yields one [`SendEvent`] per
//! frame, each sequence number exactly once); the two halves may live in different tasks. A [`SendEvent::Acked`] is
//! the relay's statement that the envelope is durable. [`Connection::send_pipelined`] sends a whole list with at most
//! `window` frames unanswered and returns the answers in sequence order.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use relay_proto::wire::{
    self, ClientFrame, OpenSendStream, PipelinedSend, SealedSend, Send, ServerFrame, client_frame::Body as Req,
    server_frame::Body as Resp,
};
use relay_proto::{AccountId, MAX_FRAME_LEN};
use relay_quic::{read_frame, write_frame};
use tokio::sync::Semaphore;

use crate::connection::{ClientError, Connection};

/// The relay's answer to one pipelined frame.
#[derive(Debug, Clone, PartialEq)]
pub enum SendEvent {
    /// Stored durably.
    Acked {
        /// The frame's sequence number.
        seq: u64,
        /// The relay's id for the envelope.
        server_id: u64,
        /// When the relay stored the batch (its last envelope).
        stored_at_ms: u64,
    },
    /// Refused; nothing was stored.
    Refused {
        /// The frame's sequence number.
        seq: u64,
        /// Why.
        error: wire::Error,
    },
}

impl SendEvent {
    /// The frame's sequence number.
    pub fn seq(&self) -> u64 {
        match self {
            SendEvent::Acked { seq, .. } | SendEvent::Refused { seq, .. } => *seq,
        }
    }
}

/// The writing half of a pipelined send stream.
pub struct PipelineWriter {
    send: quinn::SendStream,
    next_seq: u64,
}

impl PipelineWriter {
    /// Writes a send to `recipient`; returns its sequence number.
    pub async fn send(&mut self, recipient: &AccountId, envelope: Bytes) -> Result<u64, ClientError> {
        let send = Send { recipient: Bytes::copy_from_slice(recipient.as_bytes()), envelope };
        self.write(Some(send), None).await
    }

    /// Writes a sealed send (authorised by the recipient's access key); returns its sequence number.
    pub async fn sealed_send(
        &mut self,
        recipient: &AccountId,
        envelope: Bytes,
        access_key: &[u8],
    ) -> Result<u64, ClientError> {
        let sealed = SealedSend {
            recipient: Bytes::copy_from_slice(recipient.as_bytes()),
            envelope,
            access_key: Bytes::copy_from_slice(access_key),
        };
        self.write(None, Some(sealed)).await
    }

    async fn write(&mut self, send: Option<Send>, sealed: Option<SealedSend>) -> Result<u64, ClientError> {
        let seq = self.next_seq;
        let frame = ClientFrame { body: Some(Req::PipelinedSend(PipelinedSend { seq, send, sealed })) };
        write_frame(&mut self.send, &frame).await?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Ends the stream from this side: the relay answers what it has and then finishes its own side.
    pub fn finish(&mut self) {
        self.send.finish().ok();
    }
}

/// The reading half of a pipelined send stream.
pub struct PipelineAnswers {
    recv: quinn::RecvStream,
    ready: VecDeque<SendEvent>,
}

impl PipelineAnswers {
    /// The next answer, in the order the relay sent them (acks of one batch in sequence order); `None` once the relay
    /// finished the stream.
    pub async fn next(&mut self) -> Option<Result<SendEvent, ClientError>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            let frame = match read_frame::<ServerFrame>(&mut self.recv, MAX_FRAME_LEN).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return None,
                Err(e) => return Some(Err(e.into())),
            };
            match frame.body {
                Some(Resp::SendAcks(a)) if a.seqs.len() == a.server_ids.len() => {
                    let at = a.stored_at_ms;
                    self.ready.extend(a.seqs.iter().zip(&a.server_ids).map(|(&seq, &server_id)| SendEvent::Acked {
                        seq,
                        server_id,
                        stored_at_ms: at,
                    }));
                }
                Some(Resp::SendRefused(r)) => {
                    let error = r.error.unwrap_or_default();
                    self.ready.push_back(SendEvent::Refused { seq: r.seq, error });
                }
                Some(Resp::Error(e)) => return Some(Err(ClientError::Rejected(e))),
                _ => return Some(Err(ClientError::Protocol("unexpected frame on a pipelined send stream".into()))),
            }
        }
    }
}

impl Connection {
    /// Opens a pipelined send stream (usable before authentication for sealed sends).
    pub async fn open_send_stream(&self) -> Result<(PipelineWriter, PipelineAnswers), ClientError> {
        let (mut send, recv) = self.quic().open_bi().await?;
        write_frame(&mut send, &ClientFrame { body: Some(Req::OpenSendStream(OpenSendStream {})) }).await?;
        Ok((PipelineWriter { send, next_seq: 1 }, PipelineAnswers { recv, ready: VecDeque::new() }))
    }

    /// Sends every `(recipient, envelope)` on one pipelined stream, with at most `window` (at least 1) frames
    /// unanswered; returns one answer per send, in the order given.
    pub async fn send_pipelined(
        &self,
        sends: Vec<(AccountId, Bytes)>,
        window: usize,
    ) -> Result<Vec<SendEvent>, ClientError> {
        let total = sends.len();
        let (mut writer, mut answers) = self.open_send_stream().await?;
        let slots = Arc::new(Semaphore::new(window.max(1)));
        let write = async {
            for (recipient, envelope) in sends {
                if let Ok(permit) = slots.acquire().await {
                    permit.forget();
                }
                writer.send(&recipient, envelope).await?;
            }
            writer.finish();
            Ok::<_, ClientError>(())
        };
        let read = async {
            let mut out = Vec::with_capacity(total);
            while out.len() < total {
                match answers.next().await {
                    Some(Ok(event)) => {
                        slots.add_permits(1);
                        out.push(event);
                    }
                    Some(Err(e)) => return Err(e),
                    None => return Err(ClientError::Protocol("send stream ended before every answer".into())),
                }
            }
            Ok(out)
        };
        let ((), mut out) = tokio::try_join!(write, read)?;
        out.sort_by_key(SendEvent::seq);
        Ok(out)
    }
}
