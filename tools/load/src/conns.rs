//! `connections`: opens `--clients` connections (default 10,000), each registering a fresh account (which
//! authenticates it), optionally opens its delivery stream, holds them idle for `--hold` seconds, and reports the
//! relay's resident memory per connection: (RSS while holding − RSS before) / connections. The directory entries
//! of the new accounts are counted in that figure too, so it is an upper bound on the cost of a connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use crate::clients::{Endpoints, register_all};
use crate::relayd::{Relay, Usage};
use crate::report::{Latency, Report, round2};
use crate::{Load, Target};

/// How `connections` runs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long to hold the connections before measuring.
    pub hold: Duration,
    /// Open each connection's delivery stream too.
    pub subscribe: bool,
    /// Connection set-ups in flight at once.
    pub concurrency: usize,
}

/// Runs `connections`.
pub async fn run(load: &Load, target: &Target, n: usize, settings: Settings) -> Result<Report> {
    let deadline = Instant::now() + load.limit();
    let relay = Relay::open(target, Default::default()).await?;
    let result = tokio::time::timeout_at(deadline.into(), measure(load, &relay, n, settings)).await;
    relay.stop().await;
    result.map_err(|_| anyhow!("connections were not all established within --seconds"))?
}

async fn measure(load: &Load, relay: &Relay, n: usize, settings: Settings) -> Result<Report> {
    let endpoints = Arc::new(Endpoints::new(n, load.per_endpoint)?);
    let before = relay.stats();
    let usage = Usage::start(relay);
    let started = Instant::now();
    let (clients, setup) = register_all(&endpoints, n, relay.addr, relay.fingerprint, settings.concurrency).await?;
    let mut inboxes = Vec::new();
    if settings.subscribe {
        for c in &clients {
            if let Some(conn) = &c.conn {
                inboxes.push(conn.subscribe().await?);
            }
        }
    }
    let establish_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(settings.hold).await;
    let alive = clients.iter().filter(|c| c.conn.as_ref().is_some_and(|c| c.quic().close_reason().is_none())).count();
    let during = relay.stats();

    let mut report = Report::new("connections", load, n);
    usage.finish(relay, &mut report);
    report.elapsed_s = round2(establish_s);
    report.delivered = 0;
    report.msgs_per_s = round2(n as f64 / establish_s);
    report.latency_ms = Latency::from_histogram(&setup);
    report.errors = (n - alive) as u64;
    report.complete = alive == n;
    report.set("subscribed", settings.subscribe, false);
    report.set("establish_s", round2(establish_s), true);
    report.set("alive", alive, false);
    report.set("client_endpoints", n.div_ceil(load.per_endpoint), false);
    if let (Some(b), Some(d)) = (before, during) {
        let per = d.rss_bytes.saturating_sub(b.rss_bytes) as f64 / n as f64;
        report.set("server_rss_before_bytes", b.rss_bytes, false);
        report.set("server_rss_holding_bytes", d.rss_bytes, false);
        report.set("server_rss_per_connection_bytes", per.round(), false);
        report.set("rss_per_conn_kib", round2(per / 1024.0), true);
    }
    drop(inboxes);
    endpoints.close().await;
    Ok(report)
}
