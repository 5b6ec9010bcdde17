//! The exporter side of the relay's export interface, for tests: a self-signed exporter identity made with rcgen, and
//! a connection (the exporter's own [`ExportClient`]) that pins the relay's certificate and presents the identity's
//! certificate, or none.

use std::net::SocketAddr;

use anyhow::Result;
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
        relay_quic::identity::cert_fingerprint(self.cert.as_ref())
    }
}

pub use relay_exporter::relay_link::ExportClient;

/// Connects to the export interface at `addr`, accepting only the relay certificate with SHA-256
/// `relay_fingerprint`, presenting `identity`'s certificate (or none). The relay checks the client certificate after
/// the client has finished its side of the handshake, so a refused certificate shows on the first request, if not
/// here.
pub async fn connect(
    addr: SocketAddr,
    relay_fingerprint: [u8; 32],
    identity: Option<&ExporterIdentity>,
) -> Result<ExportClient> {
    let cert = identity.map(|id| (id.cert.clone(), PrivateKeyDer::Pkcs8(id.key.clone_key())));
    let quic = relay_quic::identity::export_client_crypto(relay_fingerprint, cert)?;
    Ok(ExportClient::connect_with(addr, quic).await?)
}
