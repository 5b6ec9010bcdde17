//! `stalled`: client 0 opens its delivery stream and then never reads it; the other clients send it `--msgs` each.
//! The relay must keep at most its delivery window in flight on that stream (QUIC flow control stops the rest),
//! keep the backlog in its store, and refuse sends beyond the mailbox quota, so its memory stays bounded however
//! much is sent. Reports the relay's RSS growth, sends accepted and sends refused for the quota.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Result, anyhow};

use crate::clients::{Endpoints, register_all};
use crate::relayd::{Relay, Usage};
use crate::report::{Latency, Report, round2};
use crate::traffic::{self, Clock, Counters, SendPlan};
use crate::{Load, Target};

/// Runs `stalled`.
pub async fn run(load: &Load, target: &Target, n: usize) -> Result<Report> {
    let deadline = Instant::now() + load.limit();
    let relay = Relay::open(target, crate::online::overrides(load)).await?;
    let result = tokio::time::timeout_at(deadline.into(), measure(load, &relay, n, deadline)).await;
    relay.stop().await;
    result.map_err(|_| anyhow!("set-up did not finish within --seconds"))?
}

async fn measure(load: &Load, relay: &Relay, n: usize, deadline: Instant) -> Result<Report> {
    let endpoints = Arc::new(Endpoints::new(n, load.per_endpoint)?);
    let (clients, _) = register_all(&endpoints, n, relay.addr, relay.fingerprint, 64).await?;
    let stalled = clients[0].conn.clone().ok_or_else(|| anyhow!("client 0 has no connection"))?;
    // Held and never read: the client library buffers a bounded number of events and then stops reading.
    let inbox = stalled.subscribe().await?;
    let before = relay.stats();
    let usage = Usage::start(relay);
    let clock = Clock::start();
    let counters = Arc::new(Counters::default());
    let total = load.msgs * (n as u64 - 1);
    let progress = {
        let c = counters.clone();
        crate::progress::Progress::start("stalled", move || {
            format!(
                "sent {}/{total} accepted {} refused {}",
                c.sent.load(Ordering::Relaxed),
                c.acked.load(Ordering::Relaxed),
                c.errors.load(Ordering::Relaxed)
            )
        })
    };
    let plan = SendPlan {
        accounts: Arc::new(clients.iter().map(|c| c.account).collect()),
        recipients: Arc::new(vec![0]),
        msgs: load.msgs,
        size: load.size,
        window: load.window,
        deadline,
        rate: load.rate,
        e2ee: None,
        pipeline: false, // the stalled recipient's senders use one stream per send, as before
    };
    let senders = clients.iter().enumerate().skip(1).filter_map(|(i, c)| Some((i, c.conn.clone()?))).collect();
    let started = Instant::now();
    let sent = traffic::send_all(senders, plan, clock, counters.clone()).await;
    let elapsed = started.elapsed().as_secs_f64();
    progress.finish().await;
    let mut report = Report::new("stalled", load, n);
    usage.finish(relay, &mut report);
    let after = relay.stats();
    drop(inbox);
    endpoints.close().await;

    let acked = counters.acked.load(Ordering::Relaxed);
    let attempted = counters.sent.load(Ordering::Relaxed);
    report.complete = attempted == total;
    report.elapsed_s = round2(elapsed);
    report.delivered = 0;
    report.msgs_per_s = round2(attempted as f64 / elapsed);
    report.latency_ms = Latency::from_histogram(&sent.ack_latency);
    report.errors = sent.errors.iter().filter(|(k, _)| k.as_str() != "QUOTA_EXCEEDED").map(|(_, v)| v).sum();
    report.set("accepted", acked, true);
    report.set("refused_quota", sent.errors.get("QUOTA_EXCEEDED").copied().unwrap_or(0), true);
    report.set("latency_is", "send-to-ack of accepted sends", false);
    if let (Some(b), Some(a)) = (before, after) {
        report.set("server_rss_before_bytes", b.rss_bytes, false);
        report.set("server_rss_after_bytes", a.rss_bytes, false);
        report.set("rss_growth_mib", round2(a.rss_bytes.saturating_sub(b.rss_bytes) as f64 / 1048576.0), true);
    }
    report.set("error_reasons", traffic::errors_json(&sent.errors), false);
    Ok(report)
}
