//! A server process's TLS identity (the relay's, and the exporter's client certificate): a self-signed certificate
//! generated on first start and kept in the data directory (`cert.der`, `key.der`, both readable by the owner
//! only, like everything in a data directory). Peers pin it by the SHA-256 of the DER certificate; nothing here trusts a CA.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The certificate and key the relay presents.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

/// Why the TLS identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading or writing the files failed.
    #[error("TLS identity files: {0}")]
    Io(#[from] std::io::Error),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls rejected the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn rejected the TLS configuration (missing TLS 1.3 suite).
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

impl Identity {
    /// Loads the identity from `dir`, generating and storing a new one if there is none yet.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join("cert.der");
        let key_path = dir.join("key.der");
        if cert_path.exists() && key_path.exists() {
            let cert = CertificateDer::from(std::fs::read(&cert_path)?);
            let key = PrivatePkcs8KeyDer::from(std::fs::read(&key_path)?);
            return Ok(Self { cert, key });
        }
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "consent-relay".to_owned()])?;
        let cert = generated.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der());
        // The certificate first: a crash between the two leaves no key, so the next start generates both again.
        crate::durable_file::replace(&cert_path, cert.as_ref(), crate::durable_file::Access::Owner)?;
        crate::durable_file::create_secret(&key_path, key.secret_pkcs8_der())?;
        Ok(Self { cert, key })
    }

    /// Lowercase hex SHA-256 of the DER certificate: what clients pin.
    pub fn fingerprint(&self) -> String {
        cert_fingerprint(self.cert.as_ref())
    }

    /// SHA-256 of the DER certificate.
    pub fn cert_sha256(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(self.cert.as_ref()).into()
    }

    /// rustls server configuration of the export interface: TLS 1.3 only, the export ALPN, no 0-RTT, and client
    /// certificates checked by `client_auth` (a [`crate::pin::PinnedClientCert`]).
    pub fn export_server_crypto(
        &self,
        client_auth: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    ) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_auth)
            .with_single_cert(vec![self.cert.clone()], PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        tls.alpn_protocols = vec![relay_proto::EXPORT_ALPN.to_vec()];
        tls.max_early_data_size = 0;
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).map_err(|e| TlsError::Quic(e.to_string()))
    }

    /// The exporter's client configuration for the export interface: presents this identity's certificate and
    /// accepts only the relay certificate with SHA-256 `relay_fingerprint`.
    pub fn export_client_crypto(
        &self,
        relay_fingerprint: [u8; 32],
    ) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
        export_client_crypto(relay_fingerprint, Some((self.cert.clone(), PrivateKeyDer::Pkcs8(self.key.clone_key()))))
    }

    /// rustls server configuration of a service spoken with ALPN `alpn` (the witness's): TLS 1.3 only, no client
    /// certificate, no 0-RTT.
    pub fn server_crypto_with_alpn(&self, alpn: &[u8]) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
        let mut tls = self.server_tls()?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).map_err(|e| TlsError::Quic(e.to_string()))
    }

    /// rustls server configuration of the messaging endpoint: TLS 1.3 only, our ALPN, no 0-RTT (early data can be
    /// replayed).
    pub fn server_crypto(&self) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(self.server_tls()?))
            .map_err(|e| TlsError::Quic(e.to_string()))
    }

    /// The rustls configuration inside [`Identity::server_crypto`], for tests that drive a handshake without sockets
    /// (which cipher suite is negotiated decides the hash of the exported keying material).
    pub fn server_tls(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        tls.alpn_protocols = vec![relay_proto::ALPN.to_vec()];
        tls.max_early_data_size = 0;
        Ok(tls)
    }
}

/// Lowercase hex SHA-256 of a DER certificate: how certificates are pinned, by clients and by the export interface.
pub fn cert_fingerprint(der: &[u8]) -> String {
    crate::pin::fingerprint(der)
}

/// A client configuration for the export interface: TLS 1.3, the export ALPN, only the relay certificate with SHA-256
/// `relay_fingerprint` accepted, and `client_cert` (certificate and key) presented, or none (which the relay refuses;
/// tests use it to check that).
pub fn export_client_crypto(
    relay_fingerprint: [u8; 32],
    client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    let provider = crate::crypto_provider();
    let verifier = Arc::new(crate::pin::PinnedServerCert::new(relay_fingerprint, provider.clone()));
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![relay_proto::EXPORT_ALPN.to_vec()];
    quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).map_err(|e| TlsError::Quic(e.to_string()))
}

/// A client configuration for a service spoken with ALPN `alpn` (the witness's): TLS 1.3, only the server certificate
/// with SHA-256 `server_fingerprint` accepted, no client certificate.
pub fn pinned_client_crypto(
    server_fingerprint: [u8; 32],
    alpn: &[u8],
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
    let provider = crate::crypto_provider();
    let verifier = Arc::new(crate::pin::PinnedServerCert::new(server_fingerprint, provider.clone()));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).map_err(|e| TlsError::Quic(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::load_or_create(dir.path()).expect("create");
        let again = Identity::load_or_create(dir.path()).expect("reload");
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert_eq!(first.fingerprint().len(), 64);
        first.server_crypto().expect("valid rustls config");
    }
}
