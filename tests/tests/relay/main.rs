//! Integration tests against real relays on loopback: one binary, a module per area.

mod access;
mod access_matrix;
mod bad_input;
mod client_state;
mod consent;
mod crash;
mod durability;
mod e2ee;
mod erasure;
mod export;
mod exporter;
mod exportlog;
mod exports_verify;
mod failover;
mod identity;
mod jetstream;
mod jetstream_conformance;
mod jetstream_leases;
mod jetstream_stores;
mod limits;
mod logdamage;
mod memory;
mod messaging;
mod metrics;
mod pipeline;
mod prekeys;
mod privacy;
mod protocol_doc;
mod regulator;
mod storage;
mod verification;
mod witness;

use std::time::Duration;

/// Upper bound for any single wait in these tests; they never sleep for a fixed time to "let things happen".
pub const WAIT: Duration = Duration::from_secs(20);

/// Runs `f` with a bound, failing the test if it does not finish.
pub async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {WAIT:?}"),
    }
}
