//! The result of a run: one summary line for people, the same figures as JSON for scripts.

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Map, Value};

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, three significant digits.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low ≥ 1, high ≥ 2 × low, sigfig ≤ 5).
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid constant histogram bounds")
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value.
    pub max: f64,
    /// Number of samples.
    pub count: u64,
}

impl Latency {
    /// Summarises `h` (microseconds); `None` if it is empty.
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            count: h.len(),
        })
    }

    fn short(&self) -> String {
        format!("p50={:.2}ms p99={:.2}ms p99.9={:.2}ms", self.p50, self.p99, self.p999)
    }
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The subcommand.
    pub mode: &'static str,
    /// Clients (connections).
    pub clients: usize,
    /// Messages per client asked for.
    pub msgs_per_client: u64,
    /// Envelope size in bytes.
    pub size: usize,
    /// Requests in flight per client.
    pub window: usize,
    /// False when `--seconds` ran out first.
    pub complete: bool,
    /// Seconds of the measured phase.
    pub elapsed_s: f64,
    /// Messages delivered (echo: round trips completed), each counted once.
    pub delivered: u64,
    /// The headline rate: delivered msg/s (echo: round trips/s; offline-drain: drain rate; connections:
    /// connections established per second).
    pub msgs_per_s: f64,
    /// Send-to-deliver latency (echo: round-trip time; connections: time to connect and authenticate).
    pub latency_ms: Option<Latency>,
    /// Failed requests.
    pub errors: u64,
    /// Peak resident memory of the relay process, when this tool started it.
    pub server_rss_peak_bytes: Option<u64>,
    /// Mode-specific figures.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Names of the extra figures to show in the summary line, in order.
    #[serde(skip)]
    pub headline: Vec<&'static str>,
}

impl Report {
    /// A report for `mode` with the load settings filled in and nothing measured yet.
    pub fn new(mode: &'static str, load: &crate::Load, clients: usize) -> Self {
        Self {
            mode,
            clients,
            msgs_per_client: load.msgs,
            size: load.size,
            window: load.window,
            complete: true,
            elapsed_s: 0.0,
            delivered: 0,
            msgs_per_s: 0.0,
            latency_ms: None,
            errors: 0,
            server_rss_peak_bytes: None,
            extra: Map::new(),
            headline: Vec::new(),
        }
    }

    /// Adds a mode-specific figure; `show` puts it in the summary line too.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>, show: bool) {
        self.extra.insert(key.to_owned(), value.into());
        if show {
            self.headline.push(key);
        }
    }

    /// The line printed on stdout.
    pub fn summary_line(&self) -> String {
        let mut s = format!(
            "{}: clients={} delivered={} rate={:.0}/s",
            self.mode, self.clients, self.delivered, self.msgs_per_s
        );
        if let Some(l) = &self.latency_ms {
            s.push(' ');
            s.push_str(&l.short());
        }
        for key in &self.headline {
            if let Some(v) = self.extra.get(*key) {
                match v {
                    Value::Number(n) if n.is_f64() => s.push_str(&format!(" {key}={:.2}", n.as_f64().unwrap_or(0.0))),
                    other => s.push_str(&format!(" {key}={other}")),
                }
            }
        }
        s.push_str(&format!(" errors={}", self.errors));
        if let Some(rss) = self.server_rss_peak_bytes {
            s.push_str(&format!(" server_rss_peak={:.1}MiB", rss as f64 / (1024.0 * 1024.0)));
        }
        if !self.complete {
            s.push_str(" INCOMPLETE");
        }
        s
    }
}

/// Rounds to two decimals for the report.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
