//! Aggregate metrics, served in the Prometheus text exposition format (version 0.0.4) on an opt-in local HTTP port
//! (`metrics_listen`, off by default).
//!
//! Only totals over the whole relay are kept: counters, gauges and histograms with no label at all except the error
//! code name. Nothing here may ever carry an account id, a phone number, an address, an envelope or anything else
//! about one user; a metric that needs such a label does not belong here.
//!
//! The HTTP side is deliberately tiny: one request per TCP connection, `GET /metrics` answered with the text format,
//! anything else with 404 or 405, requests larger than 8 KiB or slower than 5 s dropped, a few connections at once.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use relay_proto::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::relay::Shared;

/// Error codes are counted by their wire number, up to this one.
const MAX_CODE: usize = 31;

/// A histogram with fixed bucket bounds, updated with atomics. Values are recorded in integer base units
/// (nanoseconds, counts) and exported divided by `scale` (seconds, counts).
pub struct Histogram {
    bounds: &'static [u64],
    scale: f64,
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram with upper bucket bounds `bounds` (ascending, base units) exported divided by `scale`.
    pub fn new(bounds: &'static [u64], scale: f64) -> Self {
        Self {
            bounds,
            scale,
            buckets: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn record(&self, value: u64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Values recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = *bound as f64 / self.scale;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        // Read count after the buckets so that +Inf is never below the last bucket.
        let count = self.count().max(cumulative);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum.load(Ordering::Relaxed) as f64 / self.scale);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Bucket bounds for flush batch sizes (writes made durable by one flush).
pub const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192];
/// Bucket bounds for flush latency, in nanoseconds (50 µs to 2.5 s).
pub const LATENCY_BOUNDS_NS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];

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

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn metric(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

/// The relay's metrics in the Prometheus text format.
pub fn render(shared: &Shared) -> String {
    let m = &shared.metrics;
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
        shared.subscribers.online(),
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
    metric(
        &mut out,
        "relay_queue_depth",
        "Envelopes queued in all mailboxes.",
        "gauge",
        shared.store.mailboxes.queued(),
    );
    let commit = &shared.store.commit;
    commit.batch_sizes().render(&mut out, "relay_flush_batch_size", "Durable writes covered by one store flush.");
    commit.latencies().render(&mut out, "relay_flush_duration_seconds", "Duration of one store flush.");
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

/// Largest request accepted by the metrics responder.
const MAX_REQUEST: usize = 8 * 1024;
/// Scrapes served at once.
const MAX_SCRAPES: usize = 8;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &shared)).await.ok();
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(shared)),
        (b"GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found: try /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_scaled() {
        let h = Histogram::new(&[10, 100], 10.0);
        for v in [5, 50, 500] {
            h.record(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum 55.5\n") && out.contains("x_count 3\n"), "{out}");
    }
}
