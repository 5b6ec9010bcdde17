//! relayd: the Consent Relay QUIC store-and-forward relay.
//!
//! The relay stores and forwards opaque envelopes. It never links AEAD, ratchet or KEM code, so it cannot decrypt
//! what it carries; it stores no sender for an envelope; its message path reads no phone number or device info.
//! A send is acknowledged only once the envelope is durable (group commit).
//!
//! Modules: [`config`] (settings and limits), [`certificates`] (the sender-certificate key), [`store`] (sled trees,
//! group commit), [`relay`] (endpoint, connections, and the wiring that gives each request family its handles),
//! [`session`] (requests on a connection, one handler per request family), [`delivery`] (push and acks),
//! [`subscribers`] (wake-ups of online recipients), [`reject`] (error codes), [`ratelimit`], [`metrics`] (aggregate
//! Prometheus metrics, opt-in; a leaf handed counters and gauges) with [`histogram`], [`fence`] (export leases that
//! withdrawals wait for), [`export`] (the relay's side of the export interface: the exporter's mutual-TLS endpoint,
//! opt-in), [`verify`] (phone-number verification at registration: the pluggable verifier, codes, registration
//! locks), [`tamper`] (a test-only hook that makes the relay lie). The TLS identity, pinning and the accept loop are
//! `relay-quic`'s; the metadata exporter is its own crate and process (`relay-exporter`), which this crate cannot
//! name.

pub mod certificates;
pub mod config;
pub mod delivery;
pub mod export;
pub mod fence;
pub mod histogram;
pub mod metrics;
pub mod ratelimit;
pub mod reject;
pub mod relay;
pub mod session;
pub mod store;
pub mod subscribers;
pub mod tamper;
pub mod verify;

pub use config::Config;
pub use relay::{RelayHandle, StartError, start};
