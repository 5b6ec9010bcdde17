//! Certificate pinning: the client accepts exactly the relay certificate whose SHA-256 it was given, and still
//! verifies the TLS 1.3 handshake signature with that certificate's key. The verifier lives in `relay-quic`, shared
//! with the relay and the exporter; this module names it for the client.

pub use relay_quic::pin::{PinnedServerCert as PinnedCert, fingerprint, parse_fingerprint};
