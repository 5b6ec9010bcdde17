//! The exporter's side of the export interface: a QUIC connection that presents the exporter's certificate, accepts
//! only the pinned relay certificate, and sends one export request per bidirectional stream.
//!
//! Contract: every answer is checked to be a response frame; an `Error` frame becomes [`RelayLinkError::Refused`] and
//! nothing here panics on what the relay sends. A request not answered within [`REQUEST_TIMEOUT`] fails and closes
//! the connection: a relay that was killed and restarted never answers on the old connection (its stateless resets
//! do not match the old connection's tokens), which would otherwise hang until the idle timeout, a minute.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_proto::MAX_FRAME_LEN;
use relay_proto::wire::{ExportRequest, ExportResponse, export_request, export_response};
use relay_quic::{read_frame, write_frame};

use relay_quic::identity::{Identity, TlsError};

/// How long connecting to the relay may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the relay may take to answer one request before the connection is given up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an export request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayLinkError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Connecting to the relay failed or timed out.
    #[error("cannot connect to the relay's export interface: {0}")]
    Connect(String),
    /// The stream or connection failed.
    #[error("export interface: {0}")]
    Stream(String),
    /// The relay answered with an error frame.
    #[error("relay refused the request: {0}")]
    Refused(String),
    /// The relay answered with nothing or with a response of the wrong kind.
    #[error("unexpected answer from the relay: {0}")]
    Unexpected(String),
}

/// A connection to the relay's export interface.
pub struct ExportClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl ExportClient {
    /// Connects to `addr` as `identity`, accepting only the relay certificate with SHA-256 `relay_fingerprint`.
    pub async fn connect(
        addr: SocketAddr,
        relay_fingerprint: [u8; 32],
        identity: &Identity,
    ) -> Result<Self, RelayLinkError> {
        Self::connect_with(addr, identity.export_client_crypto(relay_fingerprint)?).await
    }

    /// Connects to `addr` with a ready client configuration (see [`relay_quic::identity::export_client_crypto`]).
    pub async fn connect_with(
        addr: SocketAddr,
        quic: quinn::crypto::rustls::QuicClientConfig,
    ) -> Result<Self, RelayLinkError> {
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(relay_quic::transport_config(
            16,
            Duration::from_secs(60),
            Some(Duration::from_secs(15)),
        )));
        let local = if addr.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
        let endpoint = relay_quic::endpoint(local, None).map_err(|e| RelayLinkError::Connect(e.to_string()))?;
        let connecting =
            endpoint.connect_with(config, addr, "consent-relay").map_err(|e| RelayLinkError::Connect(e.to_string()))?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(RelayLinkError::Connect(e.to_string())),
            Err(_) => return Err(RelayLinkError::Connect(format!("no handshake within {CONNECT_TIMEOUT:?}"))),
        };
        Ok(Self { endpoint, conn })
    }

    /// Sends `frame` (any protobuf message, framed) on a new stream and reads the answer as an export response.
    pub async fn raw<M: prost::Message>(&self, frame: &M) -> Result<ExportResponse, RelayLinkError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(frame)).await {
            Ok(answer) => answer,
            Err(_) => {
                self.conn.close(0u32.into(), b"request timed out");
                Err(RelayLinkError::Stream(format!("no answer within {REQUEST_TIMEOUT:?}")))
            }
        }
    }

    async fn exchange<M: prost::Message>(&self, frame: &M) -> Result<ExportResponse, RelayLinkError> {
        let stream = |e: &dyn std::fmt::Display| RelayLinkError::Stream(e.to_string());
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| stream(&e))?;
        write_frame(&mut send, frame).await.map_err(|e| stream(&e))?;
        send.finish().ok();
        read_frame::<ExportResponse>(&mut recv, MAX_FRAME_LEN)
            .await
            .map_err(|e| stream(&e))?
            .ok_or_else(|| RelayLinkError::Unexpected("stream closed without a response".into()))
    }

    /// Sends one request on a new stream and returns the relay's answer; an error frame is [`RelayLinkError::Refused`].
    pub async fn request(&self, body: export_request::Body) -> Result<export_response::Body, RelayLinkError> {
        let reply = self.raw(&ExportRequest { body: Some(body) }).await?;
        match reply.body {
            Some(export_response::Body::Error(e)) => Err(RelayLinkError::Refused(e.to_string())),
            Some(body) => Ok(body),
            None => Err(RelayLinkError::Unexpected("empty response".into())),
        }
    }

    /// Whether the connection has been closed (by either side, or by an idle timeout).
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Closes the connection and waits (bounded) for the endpoint to finish.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await.ok();
    }
}
