//! Aggregate metrics, served in the Prometheus text exposition format (version 0.0.4) on an opt-in local HTTP port
//! (`metrics_listen`, off by default).
//!
//! Only totals over the whole relay are kept: counters, gauges and histograms with no label at all except the error
//! code name. Nothing here may ever carry an account id, a phone number, an address, an envelope or anything else
//! about one user; a metric that needs such a label does not belong here.
//!
//! A leaf of the relay: it is handed counters ([`Metrics`]) and, at each scrape, the gauges ([`Gauges`]); it imports
//! nothing of the connection, delivery or store modules.
//!
//! The HTTP side is `relay_quic::metrics_http`, shared with the exporter.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use relay_proto::ErrorCode;

use crate::histogram::{Histogram, header};

/// Error codes are counted by their wire number, up to this one.
const MAX_CODE: usize = 31;

/// Relay-wide counters kept by the connection and message paths.
pub struct Metrics {
    connections_open: AtomicI64,
    connections_total: AtomicU64,
    refused: AtomicU64,
    stored: AtomicU64,
    delivered: AtomicU64,
    acknowledged: AtomicU64,
    errors: [AtomicU64; MAX_CODE + 1],
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections_open: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Counts an open connection until dropped.
pub struct ConnectionGuard<'a>(&'a Metrics);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// A connection completed its handshake; it counts as open until the guard is dropped.
    pub fn connection(&self) -> ConnectionGuard<'_> {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self)
    }

    /// A connection was refused before its handshake (too many from its address).
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// An envelope was stored durably and acknowledged to its sender.
    pub fn stored(&self) {
        self.stored.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` envelopes were pushed on delivery streams.
    pub fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }

    /// Recipients' acknowledgements removed `n` envelopes.
    pub fn acknowledged(&self, n: u64) {
        self.acknowledged.fetch_add(n, Ordering::Relaxed);
    }

    /// A request was refused with `code`.
    pub fn error(&self, code: ErrorCode) {
        let i = usize::try_from(code as i32).unwrap_or(0).min(MAX_CODE);
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }
}

fn metric(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

/// What the metrics endpoint reads from outside this module at each scrape: gauges of the delivery streams and the
/// store, and the group commit's histograms. The relay gathers them; this module knows none of their owners.
pub struct Gauges<'a> {
    /// Accounts with a delivery stream open now.
    pub delivery_streams_open: usize,
    /// Envelopes queued in all mailboxes.
    pub queue_depth: u64,
    /// Durable writes covered by one store flush.
    pub flush_batch_sizes: &'a Histogram,
    /// Duration of one store flush.
    pub flush_durations: &'a Histogram,
}

/// The relay's metrics in the Prometheus text format.
pub fn render(m: &Metrics, gauges: &Gauges<'_>) -> String {
    let mut out = String::with_capacity(4096);
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    metric(
        &mut out,
        "relay_connections_open",
        "Client connections open now.",
        "gauge",
        m.connections_open.load(Ordering::Relaxed).max(0),
    );
    metric(
        &mut out,
        "relay_connections_total",
        "Client connections accepted since start.",
        "counter",
        load(&m.connections_total),
    );
    metric(
        &mut out,
        "relay_connections_refused_total",
        "Connections refused before the handshake because their address held max_connections_per_ip.",
        "counter",
        load(&m.refused),
    );
    metric(
        &mut out,
        "relay_delivery_streams_open",
        "Accounts with a delivery stream open now.",
        "gauge",
        gauges.delivery_streams_open,
    );
    metric(
        &mut out,
        "relay_messages_stored_total",
        "Envelopes stored durably and acknowledged to their senders.",
        "counter",
        load(&m.stored),
    );
    metric(
        &mut out,
        "relay_messages_delivered_total",
        "Envelopes pushed to recipients (redeliveries included).",
        "counter",
        load(&m.delivered),
    );
    metric(
        &mut out,
        "relay_messages_acknowledged_total",
        "Envelopes removed because their recipient acknowledged them.",
        "counter",
        load(&m.acknowledged),
    );
    metric(&mut out, "relay_queue_depth", "Envelopes queued in all mailboxes.", "gauge", gauges.queue_depth);
    gauges.flush_batch_sizes.render(&mut out, "relay_flush_batch_size", "Durable writes covered by one store flush.");
    gauges.flush_durations.render(&mut out, "relay_flush_duration_seconds", "Duration of one store flush.");
    header(&mut out, "relay_errors_total", "Requests refused, by error code.", "counter");
    for (i, count) in m.errors.iter().enumerate() {
        let n = count.load(Ordering::Relaxed);
        let Some(code) = ErrorCode::try_from(i as i32).ok().filter(|_| n > 0) else { continue };
        let name = code.as_str_name();
        let _ =
            writeln!(out, "relay_errors_total{{code=\"{}\"}} {n}", name.strip_prefix("ERROR_CODE_").unwrap_or(name));
    }
    out
}

pub use relay_quic::metrics_http::{Renderer, serve};
