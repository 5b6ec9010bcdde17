//! Traffic shared by the relay modes: stamped random payloads, senders that keep `--window` sends in flight per
//! client, and receivers that read delivery streams, measure send-to-deliver latency, de-duplicate and acknowledge in
//! batches.
//!
//! A payload starts with a 16-byte stamp (microseconds since the run's clock base, sender index, sequence number) and
//! continues with random bytes. Sender and receiver live in this process, so one monotonic clock serves both ends.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use relay_client::{ClientError, Connection, Inbox, InboxEvent};
use relay_proto::AccountId;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::e2ee::{Outbox, Pairs};

/// Bytes of the stamp at the start of every payload.
pub const HEADER_LEN: usize = 16;

/// The clock all stamps are relative to.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    /// Starts the clock.
    pub fn start() -> Self {
        Self(Instant::now())
    }

    /// Microseconds since the start.
    pub fn now_us(&self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }

    /// The instant `us` microseconds after the start.
    pub fn at(&self, us: u64) -> Instant {
        self.0 + Duration::from_micros(us)
    }
}

/// A payload of `size` bytes: the stamp (sent at `sent_us`), then `filler`.
pub fn payload(sent_us: u64, sender: u32, seq: u32, filler: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + filler.len());
    b.put_u64(sent_us);
    b.put_u32(sender);
    b.put_u32(seq);
    b.put_slice(filler);
    b.freeze()
}

/// The stamp of a payload: (sent at µs, sender, sequence number).
pub fn stamp(envelope: &[u8]) -> Option<(u64, u32, u32)> {
    let sent = u64::from_be_bytes(envelope.get(..8)?.try_into().ok()?);
    let sender = u32::from_be_bytes(envelope.get(8..12)?.try_into().ok()?);
    let seq = u32::from_be_bytes(envelope.get(12..16)?.try_into().ok()?);
    Some((sent, sender, seq))
}

/// Counters shared by every task of a run (read by the progress line).
#[derive(Debug, Default)]
pub struct Counters {
    /// Sends started.
    pub sent: AtomicU64,
    /// Sends acknowledged durably by the relay.
    pub acked: AtomicU64,
    /// Sends or deliveries that failed.
    pub errors: AtomicU64,
    /// Distinct envelopes delivered.
    pub delivered: AtomicU64,
    /// Envelopes delivered more than once.
    pub duplicates: AtomicU64,
    /// Clock time of the latest delivery, µs.
    pub last_delivery_us: AtomicU64,
    /// Clock time of the latest acknowledged send, µs.
    pub last_ack_us: AtomicU64,
}

/// What the senders of a run are to do.
pub struct SendPlan {
    /// Account id of every client, by index.
    pub accounts: Arc<Vec<AccountId>>,
    /// Indices of the clients that may be sent to.
    pub recipients: Arc<Vec<usize>>,
    /// Messages per sender.
    pub msgs: u64,
    /// Payload size.
    pub size: usize,
    /// Sends in flight per sender.
    pub window: usize,
    /// Stop starting sends after this.
    pub deadline: Instant,
    /// Open loop: total sends per second over all senders; `None` sends as fast as the window allows.
    pub rate: Option<f64>,
    /// End-to-end sessions (`--e2ee`): recipients are the sender's session peers and payloads are encrypted.
    pub e2ee: Option<Arc<Pairs>>,
    /// Each sender uses one pipelined send stream ([`crate::pipelined`]; the default, off with `--stream-per-send`).
    pub pipeline: bool,
}

/// Where in each send interval sender `index` of `count` sends (0 ≤ phase < 1), so senders are evenly spread.
pub fn phase_of(index: usize, count: usize) -> f64 {
    index as f64 / count.max(1) as f64
}

/// What the senders did.
pub struct SendOutcome {
    /// Send-to-acknowledgement latency, µs.
    pub ack_latency: Histogram<u64>,
    /// Failed sends by reason.
    pub errors: BTreeMap<String, u64>,
    /// Acknowledged sends per recipient index.
    pub acked_to: Vec<u64>,
}

pub(crate) fn reason(e: &ClientError) -> String {
    match e.code() {
        Some(code) => code.as_str_name().trim_start_matches("ERROR_CODE_").to_owned(),
        None => "transport".to_owned(),
    }
}

/// Runs every sender `(client index, connection)` of `plan` to the end (or the deadline).
pub async fn send_all(
    senders: Vec<(usize, Arc<Connection>)>,
    plan: SendPlan,
    clock: Clock,
    counters: Arc<Counters>,
) -> SendOutcome {
    let clients = plan.accounts.len();
    // Open loop: each sender's n-th send is due at start + (n + its phase) × interval, whatever happened to earlier
    // ones; the phases (sender index ÷ senders) spread the senders over the interval instead of all sending at once.
    let count = senders.len();
    let interval_us = plan.rate.map(|r| count as f64 / r.max(1e-3) * 1e6);
    let start_us = clock.now_us();
    let plan = Arc::new(plan);
    let mut workers = JoinSet::new();
    for (slot, (me, conn)) in senders.into_iter().enumerate() {
        if plan.pipeline {
            let (plan, counters) = (plan.clone(), counters.clone());
            // The sender's phase shifts its whole schedule, as for the window workers below.
            let phased_start = start_us + interval_us.map_or(0, |iv| (phase_of(slot, count) * iv) as u64);
            workers.spawn(crate::pipelined::sender(me, conn, plan, clock, counters, interval_us, phased_start));
            continue;
        }
        let next = Arc::new(AtomicU64::new(0));
        // --e2ee: the window workers of one sender share its group commit.
        let outbox = plan.e2ee.as_ref().map(|pairs| Arc::new(Outbox::new(pairs.clone(), me)));
        for _ in 0..plan.window {
            let (conn, next, plan, counters) = (conn.clone(), next.clone(), plan.clone(), counters.clone());
            let outbox = outbox.clone();
            workers.spawn(async move {
                let mut rng = SmallRng::from_rng(&mut rand::rng());
                let mut filler = vec![0u8; plan.size - HEADER_LEN];
                rng.fill(&mut filler[..]);
                let mut hist = crate::report::histogram();
                let mut errors = BTreeMap::<String, u64>::new();
                let mut acked_to = vec![0u64; clients];
                loop {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq >= plan.msgs || Instant::now() >= plan.deadline {
                        break;
                    }
                    let to = match &plan.e2ee {
                        Some(pairs) => pairs.recipient(me, rng.random_range(0..usize::MAX)),
                        None => loop {
                            let r = plan.recipients[rng.random_range(0..plan.recipients.len())];
                            if r != me || plan.recipients.len() == 1 {
                                break r;
                            }
                        },
                    };
                    // Latency counts from when a send was due, not from when a window slot freed up for it, so a
                    // slow relay cannot hide its queueing (coordinated omission).
                    let due_us = match interval_us {
                        Some(iv) => {
                            let phase = phase_of(slot, count);
                            let due = start_us + ((seq as f64 + phase) * iv) as u64;
                            tokio::time::sleep_until(clock.at(due).into()).await;
                            due
                        }
                        None => clock.now_us(),
                    };
                    // Indices and sequence numbers fit in u32: checked when the arguments were parsed.
                    let mut body = payload(due_us, me as u32, seq as u32, &filler);
                    if let Some(outbox) = &outbox {
                        match outbox.seal(to, body.to_vec()).await {
                            Ok(sealed) => body = sealed,
                            Err(e) => {
                                *errors.entry(format!("encrypt: {e}")).or_default() += 1;
                                counters.errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    let started = clock.at(due_us);
                    let left = plan.deadline.saturating_duration_since(started);
                    match tokio::time::timeout(left, conn.send(&plan.accounts[to], body)).await {
                        Ok(Ok(_)) => {
                            hist.saturating_record(started.elapsed().as_micros() as u64);
                            acked_to[to] += 1;
                            counters.acked.fetch_add(1, Ordering::Relaxed);
                            counters.last_ack_us.fetch_max(clock.now_us(), Ordering::Relaxed);
                        }
                        Ok(Err(e)) => {
                            *errors.entry(reason(&e)).or_default() += 1;
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => break,
                    }
                }
                (hist, errors, acked_to)
            });
        }
    }
    let mut out =
        SendOutcome { ack_latency: crate::report::histogram(), errors: BTreeMap::new(), acked_to: vec![0; clients] };
    while let Some(joined) = workers.join_next().await {
        let Ok((hist, errors, acked_to)) = joined else { continue };
        out.ack_latency.add(&hist).ok();
        for (k, v) in errors {
            *out.errors.entry(k).or_default() += v;
        }
        for (total, n) in out.acked_to.iter_mut().zip(acked_to) {
            *total += n;
        }
    }
    out
}

/// What one receiver saw.
pub struct Received {
    /// Send-to-deliver latency, µs.
    pub latency: Histogram<u64>,
    /// Distinct envelopes.
    pub delivered: u64,
    /// Failures on the delivery stream.
    pub errors: BTreeMap<String, u64>,
}

/// Acknowledge at least this often while deliveries keep coming.
const MAX_ACK_BATCH: usize = 64;

/// Reads `inbox` until `stop` turns true or the stream ends: records latency, counts duplicates, and acknowledges
/// everything it got in batches (whenever no further delivery is ready, or every [`MAX_ACK_BATCH`]).
pub async fn receive(
    mut inbox: Inbox,
    clock: Clock,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
    e2ee: Option<(Arc<Pairs>, usize)>,
) -> Received {
    let mut out = Received { latency: crate::report::histogram(), delivered: 0, errors: BTreeMap::new() };
    let mut seen = HashSet::new();
    let mut pending = Vec::with_capacity(MAX_ACK_BATCH);
    // Senders whose session states the deliveries in `pending` changed.
    let mut touched: Vec<usize> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            event = inbox.next(), if pending.len() < MAX_ACK_BATCH => match event {
                Some(Ok(InboxEvent::Deliver(d))) => {
                    pending.push(d.server_id);
                    let opened;
                    let body = match &e2ee {
                        Some((pairs, me)) => match pairs.open(*me, &d.envelope) {
                            Ok((from, plain)) => {
                                if !touched.contains(&from) {
                                    touched.push(from);
                                }
                                opened = plain;
                                &opened[..]
                            }
                            Err(e) => {
                                *out.errors.entry(format!("decrypt: {e}")).or_default() += 1;
                                counters.errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        },
                        None => &d.envelope[..],
                    };
                    let Some((sent, sender, seq)) = stamp(body) else {
                        *out.errors.entry("unstamped delivery".into()).or_default() += 1;
                        continue;
                    };
                    if seen.insert((u64::from(sender) << 32) | u64::from(seq)) {
                        let now = clock.now_us();
                        out.latency.saturating_record(now.saturating_sub(sent));
                        out.delivered += 1;
                        counters.delivered.fetch_add(1, Ordering::Relaxed);
                        counters.last_delivery_us.fetch_max(now, Ordering::Relaxed);
                    } else {
                        counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    *out.errors.entry(format!("delivery stream: {}", reason(&e))).or_default() += 1;
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => break,
            },
            _ = std::future::ready(()), if !pending.is_empty() => {
                // --e2ee: the sessions' new receiving states are written before the batch is acknowledged.
                if let Some((pairs, me)) = e2ee.clone().filter(|_| !touched.is_empty()) {
                    let senders = std::mem::take(&mut touched);
                    let written = tokio::task::spawn_blocking(move || pairs.persist_received(me, &senders)).await;
                    if !matches!(written, Ok(Ok(()))) {
                        *out.errors.entry("writing session state".into()).or_default() += 1;
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                if let Err(e) = inbox.ack(&pending).await {
                    *out.errors.entry(format!("ack: {}", reason(&e))).or_default() += 1;
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                pending.clear();
            }
        }
    }
    out
}

/// Waits until `done` holds, checking every millisecond, or until `deadline`; true if it held.
pub async fn wait_until(deadline: Instant, done: impl Fn() -> bool) -> bool {
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// Merges the receivers' results into `latency` and `errors`.
pub fn merge_received(all: Vec<Received>, latency: &mut Histogram<u64>, errors: &mut BTreeMap<String, u64>) {
    for r in all {
        latency.add(&r.latency).ok();
        for (k, v) in r.errors {
            *errors.entry(k).or_default() += v;
        }
    }
}

/// Error reasons as a JSON object.
pub fn errors_json(errors: &BTreeMap<String, u64>) -> serde_json::Value {
    serde_json::Value::Object(errors.iter().map(|(k, v)| (k.clone(), (*v).into())).collect())
}
