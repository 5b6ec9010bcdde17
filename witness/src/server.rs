//! The witness's QUIC endpoint: TLS 1.3 with the witness's own certificate (pinned by submitters by SHA-256), ALPN
//! `consent-relay-witness/1`, no client certificate; each connection's bidirectional streams carry framed
//! `WitnessRequest`s answered by `WitnessResponse`s.
//!
//! Contract: input is bounded before it is decoded (relay-quic's frame limit and frame timeout, a few streams per
//! connection, a token bucket of requests per connection, [`crate::limit`]); a bad frame closes only its stream;
//! nothing a peer sends panics the process. Requests are answered on a blocking thread, since an answer may wait for
//! an fsync.

use std::sync::Arc;
use std::time::Duration;

use relay_proto::ErrorCode;
use relay_proto::wire::{WitnessRequest, WitnessResponse};
use relay_quic::{NextRequest, next_request, write_frame};
use tokio::sync::watch;

use crate::limit::Bucket;
use crate::service::Witness;

/// Concurrent request streams per connection.
pub const STREAMS_PER_CONNECTION: u32 = 4;

/// Time a peer has to complete a request frame once started.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle connections are closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The server configuration of the witness endpoint.
pub fn server_config(
    identity: &relay_quic::identity::Identity,
) -> Result<quinn::ServerConfig, relay_quic::identity::TlsError> {
    let crypto = identity.server_crypto_with_alpn(relay_proto::WITNESS_ALPN)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(relay_quic::transport_config(STREAMS_PER_CONNECTION, IDLE_TIMEOUT, None)));
    Ok(server)
}

/// Serves `endpoint` until `shutdown` turns true.
pub async fn run(endpoint: quinn::Endpoint, witness: Arc<Witness>, shutdown: watch::Receiver<bool>) {
    relay_quic::accept::accept_until(&endpoint, shutdown, "witness", |incoming| {
        serve_connection(witness.clone(), incoming)
    })
    .await;
}

async fn serve_connection(witness: Arc<Witness>, incoming: quinn::Incoming) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "witness handshake failed");
            return;
        }
    };
    let bucket = Arc::new(std::sync::Mutex::new(Bucket::new(relay_proto::now_ms())));
    let mut streams = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(witness.clone(), bucket.clone(), send, recv));
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "witness connection closed");
                    break;
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

async fn serve_stream(
    witness: Arc<Witness>,
    bucket: Arc<std::sync::Mutex<Bucket>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    loop {
        let request = match next_request::<WitnessRequest, _>(
            &mut send,
            &mut recv,
            FRAME_TIMEOUT,
            WitnessResponse::error,
        )
        .await
        {
            NextRequest::Request(r) => r,
            NextRequest::Closed | NextRequest::Refused(_) => return,
        };
        let allowed = bucket.lock().map(|mut b| b.take(relay_proto::now_ms())).unwrap_or(false);
        let reply = if allowed {
            let witness = witness.clone();
            tokio::task::spawn_blocking(move || witness.handle(request.body, relay_proto::now_ms()))
                .await
                .unwrap_or_else(|_| WitnessResponse::error(ErrorCode::Internal, "the witness failed to answer"))
        } else {
            WitnessResponse::error(ErrorCode::RateLimited, "too many requests on this connection")
        };
        if write_frame(&mut send, &reply).await.is_err() {
            return;
        }
    }
}
