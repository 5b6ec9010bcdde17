//! The `online` workload against an MQTT broker (`--target mqtt://IP:PORT`), for the peer comparison: one MQTT
//! connection per simulated user, subscribed at QoS 1 to its own inbox topic `relay-load/RUN/INDEX`; each publishes
//! `--msgs` QoS 1 messages of `--size` bytes to random other users' inboxes, at most `--window` unacknowledged
//! (PUBACK) at once, as fast as that allows or on the `--rate` schedule. Payloads carry the same 16-byte stamp as the
//! relay's ([`crate::traffic::payload`]), so latency is send (open loop: the scheduled send time) → delivery to the
//! subscriber, and the headline is distinct messages delivered per second from the first send to the last delivery,
//! exactly as `online` reports it. Plain TCP without Nagle's delay, clean sessions; the broker's own settings (persistence) are the caller's.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Load;
use crate::report::{Latency, Report, round2};
use crate::traffic::{self, Clock, Counters, HEADER_LEN};

/// Parses `mqtt://IP:PORT`.
pub fn parse_target(s: &str) -> Result<SocketAddr> {
    let Some(addr) = s.strip_prefix("mqtt://") else { bail!("the target must be mqtt://IP:PORT, not {s:?}") };
    addr.trim_end_matches('/').parse().map_err(|e| anyhow!("bad MQTT address {addr:?}: {e}"))
}

fn inbox(run: u32, user: usize) -> String {
    format!("relay-load/{run:08x}/{user}")
}

/// What one connection's event loop saw.
struct Seen {
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

/// Drives `events` until `stop`: counts SUBACKs and PUBACKs, records deliveries (de-duplicated by stamp).
async fn drive(
    mut events: EventLoop,
    clock: Clock,
    counters: Arc<Counters>,
    subscribed: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut out = Seen { latency: crate::report::histogram(), errors: BTreeMap::new() };
    let mut seen = HashSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subscribed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counters.acked.fetch_add(1, Ordering::Relaxed);
                    counters.last_ack_us.fetch_max(clock.now_us(), Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some((sent, sender, seq)) = traffic::stamp(&p.payload) else {
                        *out.errors.entry("unstamped delivery".into()).or_default() += 1;
                        continue;
                    };
                    if seen.insert((u64::from(sender) << 32) | u64::from(seq)) {
                        let now = clock.now_us();
                        out.latency.saturating_record(now.saturating_sub(sent));
                        counters.delivered.fetch_add(1, Ordering::Relaxed);
                        counters.last_delivery_us.fetch_max(now, Ordering::Relaxed);
                    } else {
                        counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    *out.errors.entry(format!("connection: {e}")).or_default() += 1;
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            },
        }
    }
    out
}

/// Runs `online` against the broker at `addr` with `n` users.
pub async fn run(load: &Load, addr: SocketAddr, n: usize) -> Result<Report> {
    if load.e2ee {
        bail!("--e2ee applies to the relay only");
    }
    let deadline = Instant::now() + load.limit();
    let window = u16::try_from(load.window).map_err(|_| anyhow!("--window must fit in 16 bits for MQTT"))?;
    let run_id = rand::random::<u32>();
    let clock = Clock::start();
    let counters = Arc::new(Counters::default());
    let subscribed = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = watch::channel(false);
    let mut loops = JoinSet::new();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut opts = MqttOptions::new(format!("relay-load-{run_id:08x}-{i}"), addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_inflight(window);
        // One queued request beyond the window: publishing blocks while `--window` PUBACKs are outstanding.
        let (client, mut events) = AsyncClient::new(opts, 1);
        // No Nagle delay: QUIC has none either, and the broker is told the same (tools/peers/run.sh).
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        events.set_network_options(network);
        client.subscribe(inbox(run_id, i), QoS::AtLeastOnce).await?;
        loops.spawn(drive(events, clock, counters.clone(), subscribed.clone(), stopped.clone()));
        clients.push(client);
    }
    if !traffic::wait_until(deadline, || subscribed.load(Ordering::Relaxed) >= n as u64).await {
        stop.send_replace(true);
        bail!("{} of {n} MQTT subscriptions were acknowledged within --seconds", subscribed.load(Ordering::Relaxed));
    }

    let total = load.msgs * n as u64;
    let progress = {
        let c = counters.clone();
        crate::progress::Progress::start("online-mqtt", move || {
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
    let interval_us = load.rate.map(|r| n as f64 / r.max(1e-3) * 1e6);
    let first_send_us = clock.now_us();
    let mut senders = JoinSet::new();
    for (me, client) in clients.iter().cloned().enumerate() {
        let (msgs, size, counters) = (load.msgs, load.size, counters.clone());
        senders.spawn(async move {
            let mut rng = SmallRng::from_rng(&mut rand::rng());
            let mut filler = vec![0u8; size - HEADER_LEN];
            rng.fill(&mut filler[..]);
            for seq in 0..msgs {
                if Instant::now() >= deadline {
                    break;
                }
                let to = loop {
                    let r = rng.random_range(0..n);
                    if r != me {
                        break r;
                    }
                };
                let due_us = match interval_us {
                    Some(iv) => {
                        let due = first_send_us + ((seq as f64 + traffic::phase_of(me, n)) * iv) as u64;
                        tokio::time::sleep_until(clock.at(due).into()).await;
                        due
                    }
                    None => clock.now_us(),
                };
                // Indices and sequence numbers fit in u32: checked when the arguments were parsed.
                let body = traffic::payload(due_us, me as u32, seq as u32, &filler);
                let left = deadline.saturating_duration_since(Instant::now());
                let publish = client.publish_bytes(inbox(run_id, to), QoS::AtLeastOnce, false, body);
                match tokio::time::timeout(left, publish).await {
                    Ok(Ok(())) => {
                        counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(_)) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(_) => break,
                }
            }
        });
    }
    while senders.join_next().await.is_some() {}
    let sent = counters.sent.load(Ordering::Relaxed);
    let complete = traffic::wait_until(deadline, || {
        counters.acked.load(Ordering::Relaxed) >= sent && counters.delivered.load(Ordering::Relaxed) >= sent
    })
    .await
        && sent == total;
    let end_us = counters.last_delivery_us.load(Ordering::Relaxed).max(first_send_us + 1);
    stop.send_replace(true);
    progress.finish().await;

    let mut latency = crate::report::histogram();
    let mut errors = BTreeMap::<String, u64>::new();
    while let Some(joined) = loops.join_next().await {
        let Ok(seen) = joined else { continue };
        latency.add(&seen.latency).ok();
        for (k, v) in seen.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    for client in &clients {
        client.try_disconnect().ok();
    }

    let delivered = counters.delivered.load(Ordering::Relaxed);
    let acked = counters.acked.load(Ordering::Relaxed);
    let elapsed = (end_us - first_send_us) as f64 / 1e6;
    let mut report = Report::new("online-mqtt", load, n);
    report.complete = complete;
    report.elapsed_s = round2(elapsed);
    report.delivered = delivered;
    report.msgs_per_s = round2(delivered as f64 / elapsed);
    report.latency_ms = Latency::from_histogram(&latency);
    report.errors = counters.errors.load(Ordering::Relaxed);
    report.set("acked", acked, false);
    report.set("duplicates", counters.duplicates.load(Ordering::Relaxed), true);
    report.set("missing", sent.saturating_sub(delivered), false);
    report.set("error_reasons", traffic::errors_json(&errors), false);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_only_as_mqtt_addresses() {
        assert_eq!(parse_target("mqtt://127.0.0.1:1883").ok(), Some(SocketAddr::from(([127, 0, 0, 1], 1883))));
        assert!(parse_target("127.0.0.1:1883").is_err());
        assert!(parse_target("mqtt://localhost").is_err());
        assert!(parse_target("tcp://127.0.0.1:1883").is_err());
    }
}
