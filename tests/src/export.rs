//! A minimal exporter-side client of the relay's export interface, for tests: a self-signed exporter identity made
//! with rcgen, and a connection that pins the relay's certificate, presents the exporter's (or none) and sends
//! export requests, or any raw frame, one stream per exchange.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use prost::Message;
use relay_client::pin::PinnedCert;
use relay_proto::MAX_FRAME_LEN;
use relay_proto::wire::{ExportRequest, ExportResponse, export_request, export_response};
use relay_quic::{read_frame, write_frame};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A self-signed exporter certificate and its key.
pub struct ExporterIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl ExporterIdentity {
    /// A fresh identity.
    pub fn generate() -> Result<Self> {
        let generated = rcgen::generate_simple_self_signed(vec!["relay-exporter".to_owned()])?;
        Ok(Self {
            cert: generated.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()),
        })
    }

    /// Hex SHA-256 of the certificate: what the relay pins.
    pub fn fingerprint(&self) -> String {
        relay_server::tls::cert_fingerprint(self.cert.as_ref())
    }
}

/// A connection to the export interface.
pub struct ExportClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl ExportClient {
    /// Connects to `addr`, accepting only the relay certificate with SHA-256 `relay_fingerprint`, presenting
    /// `identity`'s certificate (or none). The relay checks the client certificate after the client has finished its
    /// side of the handshake, so a refused certificate shows on the first request, if not here.
    pub async fn connect(
        addr: SocketAddr,
        relay_fingerprint: [u8; 32],
        identity: Option<&ExporterIdentity>,
    ) -> Result<Self> {
        let provider = relay_quic::crypto_provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert::new(relay_fingerprint, provider)));
        let mut tls = match identity {
            Some(id) => {
                builder.with_client_auth_cert(vec![id.cert.clone()], PrivateKeyDer::Pkcs8(id.key.clone_key()))?
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![relay_proto::EXPORT_ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(relay_quic::transport_config(16, Duration::from_secs(60), None)));
        let endpoint = relay_quic::endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), None)?;
        let conn = endpoint.connect_with(config, addr, "consent-relay")?.await.context("export handshake")?;
        Ok(Self { endpoint, conn })
    }

    /// Sends `frame` (any protobuf message, framed) on a new stream and decodes the answer as an export response.
    pub async fn raw<M: Message>(&self, frame: &M) -> Result<ExportResponse> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_frame(&mut send, frame).await?;
        send.finish().ok();
        read_frame::<ExportResponse>(&mut recv, MAX_FRAME_LEN)
            .await?
            .ok_or_else(|| anyhow!("stream closed without a response"))
    }

    /// Sends one export request; an error frame becomes an error whose text starts with the code's name.
    pub async fn request(&self, body: export_request::Body) -> Result<export_response::Body> {
        match self.raw(&ExportRequest { body: Some(body) }).await?.body {
            Some(export_response::Body::Error(e)) => bail!("{e}"),
            Some(body) => Ok(body),
            None => bail!("empty response"),
        }
    }

    /// Closes the connection and waits for the endpoint to finish.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }
}
