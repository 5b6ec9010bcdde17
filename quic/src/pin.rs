//! Certificate pinning for both directions of a connection: a peer is accepted only if its certificate's SHA-256 is
//! the one configured, and the TLS 1.3 handshake signature is still verified with that certificate's key (so the
//! peer must hold the private key, not merely a copy of the certificate). No CA is involved anywhere.
//!
//! - [`PinnedServerCert`]: clients pin the relay (messaging clients, and the exporter on the export interface).
//! - [`PinnedClientCert`]: the relay's export interface requires the exporter's certificate (mutual TLS).
//!
//! Every endpoint speaks TLS 1.3 only, so a TLS 1.2 signature is refused.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

/// Parses a 64-character hex SHA-256 fingerprint.
pub fn parse_fingerprint(hex_str: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str.trim(), &mut out).ok()?;
    Some(out)
}

/// Lowercase hex SHA-256 of a DER certificate: what peers pin.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The pin and the signature checks shared by both verifiers.
#[derive(Debug)]
struct Pin {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl Pin {
    fn matches(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if Sha256::digest(end_entity.as_ref()).as_slice() == self.fingerprint {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn tls12(&self) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepts only the server certificate with the pinned SHA-256.
#[derive(Debug)]
pub struct PinnedServerCert(Pin);

impl PinnedServerCert {
    /// Pins the server certificate whose DER encoding has SHA-256 `fingerprint`.
    pub fn new(fingerprint: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        Self(Pin { fingerprint, provider })
    }
}

impl ServerCertVerifier for PinnedServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.matches(end_entity).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

/// Requires a client certificate and accepts only the one with the pinned SHA-256.
#[derive(Debug)]
pub struct PinnedClientCert(Pin);

impl PinnedClientCert {
    /// Accepts only the client certificate whose DER encoding has SHA-256 `fingerprint`.
    pub fn new(fingerprint: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        Self(Pin { fingerprint, provider })
    }
}

impl ClientCertVerifier for PinnedClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA: the client knows which certificate to present.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.matches(end_entity).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pinned_certificate_passes_both_ways() {
        let pinned = CertificateDer::from(vec![1u8, 2, 3]);
        let other = CertificateDer::from(vec![1u8, 2, 4]);
        let fp = parse_fingerprint(&fingerprint(pinned.as_ref())).expect("hex round trip");
        let client = PinnedClientCert::new(fp, crate::crypto_provider());
        assert!(client.offer_client_auth() && client.client_auth_mandatory() && client.root_hint_subjects().is_empty());
        assert!(client.verify_client_cert(&pinned, &[], UnixTime::now()).is_ok());
        assert!(client.verify_client_cert(&other, &[], UnixTime::now()).is_err());
        let server = PinnedServerCert::new(fp, crate::crypto_provider());
        let name = ServerName::try_from("relay").expect("name");
        assert!(server.verify_server_cert(&pinned, &[], &name, &[], UnixTime::now()).is_ok());
        assert!(server.verify_server_cert(&other, &[], &name, &[], UnixTime::now()).is_err());
    }

    #[test]
    fn fingerprints_parse_strictly() {
        assert!(parse_fingerprint(&"ab".repeat(32)).is_some());
        assert!(parse_fingerprint("abc").is_none());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_none());
    }
}
