//! `online`: every client is subscribed and sends `--msgs` envelopes to random other clients, `--window` in flight.
//! The headline is delivered msg/s from the first send to the last delivery; latency is send-to-deliver. With
//! `--target mqtt://…` the same workload runs against an MQTT broker instead ([`crate::mqtt`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Result, anyhow};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::clients::{Endpoints, register_all};
use crate::e2ee::{self, Pairs};
use crate::relayd::{Overrides, Relay, Usage};
use crate::report::{Latency, Report, round2};
use crate::traffic::{self, Clock, Counters, SendPlan};
use crate::{Load, Target};

/// Set-ups in flight while registering.
const REGISTER_CONCURRENCY: usize = 64;

/// Relay limits a run needs: enough concurrent streams for the window.
pub fn overrides(load: &Load) -> Overrides {
    let streams = u32::try_from(load.window + 8).unwrap_or(u32::MAX);
    Overrides { max_streams: (streams > 256).then_some(streams), ..Overrides::default() }
}

/// Runs `online`.
pub async fn run(load: &Load, target: &Target, n: usize) -> Result<Report> {
    if let Some(broker) = target.mqtt {
        return crate::mqtt::run(load, broker, n).await;
    }
    let deadline = Instant::now() + load.limit();
    let relay = Relay::open(target, overrides(load)).await?;
    let result = tokio::time::timeout_at(deadline.into(), measure(load, &relay, n, deadline)).await;
    relay.stop().await;
    result.map_err(|_| anyhow!("set-up did not finish within --seconds"))?
}

async fn measure(load: &Load, relay: &Relay, n: usize, deadline: Instant) -> Result<Report> {
    let endpoints = Arc::new(Endpoints::new(n, load.per_endpoint)?);
    let (clients, _) = register_all(&endpoints, n, relay.addr, relay.fingerprint, REGISTER_CONCURRENCY).await?;
    let conns: Vec<_> = clients.iter().filter_map(|c| c.conn.clone()).collect();
    let pairs = if load.e2ee {
        let set_up = Instant::now();
        let pairs =
            Arc::new(Pairs::establish(clients.iter().map(|c| c.identity.clone()).collect(), e2ee::state_dir(load))?);
        eprintln!("e2ee: {} sessions set up in {:.2} s", n * e2ee::PEERS.min(n - 1), set_up.elapsed().as_secs_f64());
        Some(pairs)
    } else {
        None
    };
    let accounts = Arc::new(clients.iter().map(|c| c.account).collect::<Vec<_>>());
    let clock = Clock::start();
    let counters = Arc::new(Counters::default());

    let (stop, stopped) = watch::channel(false);
    let mut receivers = JoinSet::new();
    for (me, conn) in conns.iter().enumerate() {
        let inbox = conn.subscribe().await?;
        let e2ee = pairs.clone().map(|p| (p, me));
        receivers.spawn(traffic::receive(inbox, clock, counters.clone(), stopped.clone(), e2ee));
    }

    let total = load.msgs * n as u64;
    let progress = {
        let c = counters.clone();
        crate::progress::Progress::start("online", move || {
            let secs = clock.now_us().max(1) as f64 / 1e6;
            let delivered = c.delivered.load(Ordering::Relaxed);
            format!(
                "acked {}/{total} delivered {delivered} ({:.0}/s) errors {}",
                c.acked.load(Ordering::Relaxed),
                delivered as f64 / secs,
                c.errors.load(Ordering::Relaxed)
            )
        })
    };
    let usage = Usage::start(relay);
    let first_send_us = clock.now_us();
    let plan = SendPlan {
        accounts: accounts.clone(),
        recipients: Arc::new((0..n).collect()),
        msgs: load.msgs,
        size: load.size,
        window: load.window,
        deadline,
        rate: load.rate,
        e2ee: pairs.clone(),
        pipeline: load.pipelined(),
    };
    let senders = conns.iter().cloned().enumerate().collect();
    let sent = traffic::send_all(senders, plan, clock, counters.clone()).await;
    let acked = counters.acked.load(Ordering::Relaxed);
    let complete =
        traffic::wait_until(deadline, || counters.delivered.load(Ordering::Relaxed) >= acked).await && acked == total;
    let end_us = counters.last_delivery_us.load(Ordering::Relaxed).max(first_send_us + 1);
    let name = match (load.e2ee, load.pipelined()) {
        (true, true) => "online-e2ee-pipeline",
        (true, false) => "online-e2ee",
        (false, true) => "online-pipeline",
        (false, false) => "online",
    };
    let mut report = Report::new(name, load, n);
    usage.finish(relay, &mut report);
    stop.send_replace(true);
    progress.finish().await;

    let mut latency = crate::report::histogram();
    let mut errors = sent.errors.clone();
    let mut received = Vec::new();
    while let Some(r) = receivers.join_next().await {
        received.push(r?);
    }
    traffic::merge_received(received, &mut latency, &mut errors);
    endpoints.close().await;

    let delivered = counters.delivered.load(Ordering::Relaxed);
    let elapsed = (end_us - first_send_us) as f64 / 1e6;
    report.complete = complete;
    report.elapsed_s = round2(elapsed);
    report.delivered = delivered;
    report.msgs_per_s = round2(delivered as f64 / elapsed);
    report.latency_ms = Latency::from_histogram(&latency);
    report.errors = errors.values().sum();
    report.set("acked", acked, false);
    report.set("duplicates", counters.duplicates.load(Ordering::Relaxed), true);
    report.set("missing", acked.saturating_sub(delivered), false);
    report.set("ack_latency_ms", serde_json::to_value(Latency::from_histogram(&sent.ack_latency))?, false);
    if let Some(l) = Latency::from_histogram(&sent.ack_latency) {
        report.set("ack_p99_ms", l.p99, true);
    }
    report.set("error_reasons", traffic::errors_json(&errors), false);
    Ok(report)
}
