//! `offline-drain`: the second half of the clients register and go offline; the first half send them `--msgs` each
//! (`--window` in flight per sender); then the recipients connect, authenticate and drain their mailboxes. Reports
//! the send rate (durably acknowledged sends per second) and the drain rate (distinct envelopes delivered per second,
//! from the first `Subscribe` to the last delivery). `latency_ms` is send-to-acknowledgement here: queueing time is
//! not a latency.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Result, anyhow};
use relay_client::Connection;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::clients::{Endpoints, register_all};
use crate::relayd::{Relay, Usage};
use crate::report::{Latency, Report, round2};
use crate::traffic::{self, Clock, Counters, SendPlan};
use crate::{Load, Target};

/// The relay's default per-mailbox quota.
const DEFAULT_QUOTA: u64 = 10_000;

/// Runs `offline-drain`.
pub async fn run(load: &Load, target: &Target, n: usize) -> Result<Report> {
    let deadline = Instant::now() + load.limit();
    let (senders, recipients) = (n / 2, n - n / 2);
    // Random recipients: leave room for twice the average backlog, so the quota is never what a run measures.
    let per_recipient = (senders as u64 * load.msgs).div_ceil(recipients as u64);
    let mut overrides = crate::online::overrides(load);
    if per_recipient * 2 > DEFAULT_QUOTA {
        overrides.mailbox_max_messages = Some(per_recipient * 2 + 1000);
    }
    let relay = Relay::open(target, overrides).await?;
    let result = tokio::time::timeout_at(deadline.into(), measure(load, &relay, n, deadline)).await;
    relay.stop().await;
    result.map_err(|_| anyhow!("set-up did not finish within --seconds"))?
}

async fn measure(load: &Load, relay: &Relay, n: usize, deadline: Instant) -> Result<Report> {
    let endpoints = Arc::new(Endpoints::new(n, load.per_endpoint)?);
    let (mut clients, _) = register_all(&endpoints, n, relay.addr, relay.fingerprint, 64).await?;
    let half = n / 2;
    for c in &mut clients[half..] {
        if let Some(conn) = c.conn.take() {
            conn.quic().close(0u32.into(), b"going offline");
        }
    }
    let accounts = Arc::new(clients.iter().map(|c| c.account).collect::<Vec<_>>());
    let clock = Clock::start();
    let counters = Arc::new(Counters::default());
    let mut report = Report::new("offline-drain", load, n);

    // Send phase.
    let total = load.msgs * half as u64;
    let progress = {
        let c = counters.clone();
        crate::progress::Progress::start("sending", move || {
            format!("acked {}/{total} errors {}", c.acked.load(Ordering::Relaxed), c.errors.load(Ordering::Relaxed))
        })
    };
    let usage = Usage::start(relay);
    let plan = SendPlan {
        accounts: accounts.clone(),
        recipients: Arc::new((half..n).collect()),
        msgs: load.msgs,
        size: load.size,
        window: load.window,
        deadline,
        rate: load.rate,
        e2ee: None,
        pipeline: load.pipelined(),
    };
    let senders = clients[..half].iter().enumerate().filter_map(|(i, c)| Some((i, c.conn.clone()?))).collect();
    let send_started = clock.now_us();
    let sent = traffic::send_all(senders, plan, clock, counters.clone()).await;
    progress.finish().await;
    let acked = counters.acked.load(Ordering::Relaxed);
    let send_s = (counters.last_ack_us.load(Ordering::Relaxed).max(send_started + 1) - send_started) as f64 / 1e6;
    if let Some(stats) = relay.stats() {
        report.set("server_rss_after_send_bytes", stats.rss_bytes, false);
    }

    // The recipients come online: connect and authenticate first, then drain.
    let connect_started = Instant::now();
    let mut connecting = JoinSet::new();
    for (i, client) in clients.iter().enumerate().skip(half) {
        let (endpoints, identity) = (endpoints.clone(), client.identity.clone());
        let (addr, fp) = (relay.addr, relay.fingerprint);
        connecting.spawn(async move {
            let conn = Connection::connect_on(endpoints.for_client(i), addr, fp).await?;
            conn.authenticate(&identity).await?;
            Ok::<_, relay_client::ClientError>(conn)
        });
    }
    let mut online = Vec::new();
    while let Some(c) = connecting.join_next().await {
        online.push(c??);
    }
    let connect_s = connect_started.elapsed().as_secs_f64();

    let progress = {
        let c = counters.clone();
        crate::progress::Progress::start("draining", move || {
            format!("delivered {}/{acked}", c.delivered.load(Ordering::Relaxed))
        })
    };
    let (stop, stopped) = watch::channel(false);
    let mut receivers = JoinSet::new();
    let drain_started = clock.now_us();
    let server_before_drain = relay.stats();
    let client_before_drain = crate::relayd::ProcStats::read(None).ok();
    for conn in &online {
        let inbox = conn.subscribe().await?;
        receivers.spawn(traffic::receive(inbox, clock, counters.clone(), stopped.clone(), None));
    }
    let drained = traffic::wait_until(deadline, || counters.delivered.load(Ordering::Relaxed) >= acked).await;
    let drain_end = counters.last_delivery_us.load(Ordering::Relaxed).max(drain_started + 1);
    let drain_wall = (clock.now_us() - drain_started) as f64 / 1e6;
    if let (Some(b), Some(a)) = (server_before_drain, relay.stats()) {
        report.set("server_cpu_drain_pct", round2((a.cpu_s - b.cpu_s) / drain_wall * 100.0), false);
    }
    if let (Some(b), Ok(a)) = (client_before_drain, crate::relayd::ProcStats::read(None)) {
        report.set("client_cpu_drain_pct", round2((a.cpu_s - b.cpu_s) / drain_wall * 100.0), false);
    }
    usage.finish(relay, &mut report);
    stop.send_replace(true);
    progress.finish().await;
    let mut ignored_latency = crate::report::histogram();
    let mut errors = sent.errors.clone();
    let mut received = Vec::new();
    while let Some(r) = receivers.join_next().await {
        received.push(r?);
    }
    traffic::merge_received(received, &mut ignored_latency, &mut errors);
    endpoints.close().await;

    let delivered = counters.delivered.load(Ordering::Relaxed);
    let drain_s = (drain_end - drain_started) as f64 / 1e6;
    report.complete = drained && acked == total;
    report.elapsed_s = round2(send_s + drain_s);
    report.delivered = delivered;
    report.msgs_per_s = round2(delivered as f64 / drain_s);
    report.latency_ms = Latency::from_histogram(&sent.ack_latency);
    report.errors = errors.values().sum();
    report.set("send_msgs_per_s", round2(acked as f64 / send_s), true);
    report.set("drain_msgs_per_s", round2(delivered as f64 / drain_s), true);
    report.set("send_s", round2(send_s), false);
    report.set("drain_s", round2(drain_s), false);
    report.set("reconnect_s", round2(connect_s), false);
    report.set("acked", acked, false);
    report.set("duplicates", counters.duplicates.load(Ordering::Relaxed), true);
    report.set("missing", acked.saturating_sub(delivered), false);
    report.set("latency_is", "send-to-ack", false);
    report.set("error_reasons", traffic::errors_json(&errors), false);
    Ok(report)
}
