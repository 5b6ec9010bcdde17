//! The accept loop shared by the relay's messaging endpoint and its export interface: each incoming connection is
//! served on its own task inside a `conn` tracing span (kind, sequence number), until shutdown.
//!
//! Contract: the span carries no address. Lines inside it may name an account, and one line naming both would tie
//! a person to where they connected from; the address is logged once, at debug level, outside the span and without
//! the connection's number.

use std::future::Future;
use std::time::Duration;

use relay_proto::StreamCloseCode;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

/// How long closing connections get to tell their peers before the tasks serving them are cancelled.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Accepts connections on `endpoint` and serves each with `serve` until `shutdown` turns true (or the endpoint
/// closes); then closes the endpoint with [`StreamCloseCode::Shutdown`], waits up to [`CLOSE_GRACE`] for peers to
/// be told, and cancels whatever still runs.
pub async fn accept_until<F, Fut>(
    endpoint: &quinn::Endpoint,
    mut shutdown: watch::Receiver<bool>,
    kind: &'static str,
    serve: F,
) where
    F: Fn(quinn::Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                next_id += 1;
                tracing::debug!(kind, remote = %incoming.remote_address(), "incoming connection");
                let span = tracing::info_span!("conn", kind, id = next_id);
                connections.spawn(serve(incoming).instrument(span));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    endpoint.close(StreamCloseCode::Shutdown.code().into(), b"relay shutting down");
    if tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await.is_err() {
        tracing::warn!(kind, "connections did not close within {CLOSE_GRACE:?}");
    }
    connections.shutdown().await;
}
