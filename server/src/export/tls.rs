//! Mutual TLS of the export interface: the relay accepts exactly one client certificate, the exporter's, pinned by
//! its SHA-256 in the configuration, and the exporter accepts exactly the relay certificate it was given the SHA-256
//! of. Both verifiers still check the handshake signature with the pinned certificate's key; they live in
//! `relay-quic` (shared with the messaging client) and are named here for the export interface.

pub use relay_quic::pin::{PinnedClientCert, PinnedServerCert};
