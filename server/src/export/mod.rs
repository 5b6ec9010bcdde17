//! The export interface: a second QUIC endpoint (`export_listen`, off by default) for the metadata exporter only.
//!
//! It speaks its own ALPN ([`relay_proto::EXPORT_ALPN`]) and requires mutual TLS: the relay accepts exactly the
//! client certificate pinned by `exporter_cert_sha256` ([`relay_quic::pin::PinnedClientCert`]). Requests are served by an
//! [`handler::ExportHandler`] built from the consent registry, the directory and the withdrawal fence only; this
//! module hands it nothing else, and in particular never a `MailboxStore` handle, so the export interface cannot serve
//! or alter a mailbox. Framing is as on the messaging endpoint: one bidirectional stream per exchange, each request
//! answered in order; a frame that does not decode (a messaging `ClientFrame`, say) is refused and closes its stream.

pub mod handler;

use std::sync::Arc;

use relay_proto::wire::{ExportRequest, ExportResponse};
use relay_quic::{NextRequest, next_request, write_frame};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

pub use handler::ExportHandler;

/// Concurrent request streams per exporter connection.
pub const EXPORT_STREAMS: u32 = 64;

/// Time the exporter has to complete a request frame once started.
pub const EXPORT_FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Accepts exporter connections until `shutdown`, then closes the endpoint.
pub async fn run(endpoint: quinn::Endpoint, handler: Arc<ExportHandler>, shutdown: watch::Receiver<bool>) {
    relay_quic::accept::accept_until(&endpoint, shutdown, "export", |incoming| {
        serve_connection(handler.clone(), incoming)
    })
    .await;
}

async fn serve_connection(handler: Arc<ExportHandler>, incoming: quinn::Incoming) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Includes every refused client certificate.
            tracing::info!(error = %e, "export handshake failed");
            return;
        }
    };
    tracing::info!("exporter connected");
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(handler.clone(), send, recv).in_current_span());
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "export connection closed");
                    break;
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

async fn serve_stream(handler: Arc<ExportHandler>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    loop {
        let request =
            match next_request::<ExportRequest, _>(&mut send, &mut recv, EXPORT_FRAME_TIMEOUT, ExportResponse::error)
                .await
            {
                NextRequest::Request(r) => r,
                NextRequest::Closed | NextRequest::Refused(_) => return,
            };
        // Registry and profile reads are short sled look-ups, like the messaging handlers' reads; a publication
        // waits for the group commit.
        let reply = handler.handle(request.body).await;
        if write_frame(&mut send, &reply).await.is_err() {
            return;
        }
    }
}
