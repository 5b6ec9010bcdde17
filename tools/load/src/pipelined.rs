//! The default (off with `--stream-per-send`): a sender writes all its sends on one pipelined send stream
//! (protocol.md 4.3) instead of one stream per send, with at most `--window` unanswered, and reads the batched
//! answers on the same stream.
//!
//! Latency is counted from when a send was due, as in [`crate::traffic::send_all`]; the payloads, recipients and
//! counters are the same, so a run with and without `--stream-per-send` differ only in the wire protocol. With
//! `--e2ee` (closed loop), a sender encrypts every message its free window slots allow as one batch ([`crate::e2ee`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use relay_client::{Connection, SendEvent};
use tokio::sync::Semaphore;

use crate::traffic::{Clock, Counters, HEADER_LEN, SendPlan, payload, reason};

/// What one sender did: send-to-ack latency, errors by reason, acknowledged sends per recipient.
pub type Outcome = (Histogram<u64>, BTreeMap<String, u64>, Vec<u64>);

/// Runs sender `me` of `plan` on one pipelined stream to the end (or the deadline).
pub async fn sender(
    me: usize,
    conn: Arc<Connection>,
    plan: Arc<SendPlan>,
    clock: Clock,
    counters: Arc<Counters>,
    interval_us: Option<f64>,
    start_us: u64,
) -> Outcome {
    let mut hist = crate::report::histogram();
    let mut errors = BTreeMap::<String, u64>::new();
    let mut acked_to = vec![0u64; plan.accounts.len()];
    let (mut writer, mut answers) = match conn.open_send_stream().await {
        Ok(halves) => halves,
        Err(e) => {
            *errors.entry(reason(&e)).or_default() += 1;
            return (hist, errors, acked_to);
        }
    };
    let slots = Semaphore::new(plan.window);
    // Sequence number → (when due, recipient index).
    let in_flight = Mutex::new(HashMap::<u64, (Instant, usize)>::new());
    let lock = || in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let write = async {
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let mut filler = vec![0u8; plan.size - HEADER_LEN];
        rng.fill(&mut filler[..]);
        let mut write_errors = BTreeMap::<String, u64>::new();
        // Frames written so far: a batch that failed to encrypt wrote none.
        let mut frames = 0u64;
        let mut n = 0;
        'sending: while n < plan.msgs {
            match tokio::time::timeout_at(plan.deadline.into(), slots.acquire()).await {
                Ok(Ok(permit)) => permit.forget(),
                _ => break,
            }
            // With --e2ee in a closed loop, a batch is every slot free now (the messenger's `send_batch`: the
            // sessions' states are written once for it, before any of it leaves); otherwise one send at a time.
            let mut batch = 1;
            while plan.e2ee.is_some() && interval_us.is_none() && n + batch < plan.msgs {
                match slots.try_acquire() {
                    Ok(permit) => permit.forget(),
                    Err(_) => break,
                }
                batch += 1;
            }
            let mut sends = Vec::with_capacity(batch as usize);
            for k in n..n + batch {
                let to = match &plan.e2ee {
                    Some(pairs) => pairs.recipient(me, rng.random_range(0..usize::MAX)),
                    None => loop {
                        let r = plan.recipients[rng.random_range(0..plan.recipients.len())];
                        if r != me || plan.recipients.len() == 1 {
                            break r;
                        }
                    },
                };
                let due_us = match interval_us {
                    Some(iv) => {
                        let due = start_us + (k as f64 * iv) as u64;
                        tokio::time::sleep_until(clock.at(due).into()).await;
                        due
                    }
                    None => clock.now_us(),
                };
                // Indices and sequence numbers fit in u32: checked when the arguments were parsed.
                sends.push((to, due_us, payload(due_us, me as u32, k as u32, &filler)));
            }
            n += batch;
            let bodies = match &plan.e2ee {
                None => sends.iter().map(|(_, _, body)| body.clone()).collect(),
                Some(pairs) => {
                    let pairs = pairs.clone();
                    let items: Vec<(usize, Vec<u8>)> = sends.iter().map(|(to, _, b)| (*to, b.to_vec())).collect();
                    let sealed = tokio::task::spawn_blocking(move || pairs.seal_batch(me, &items))
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|r| r);
                    match sealed {
                        Ok(bodies) => bodies,
                        Err(e) => {
                            *write_errors.entry(format!("encrypt: {e}")).or_default() += batch;
                            counters.errors.fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
                            slots.add_permits(batch as usize);
                            continue;
                        }
                    }
                }
            };
            for ((to, due_us, _), body) in sends.into_iter().zip(bodies) {
                counters.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // The stream numbers frames 1, 2, … in the order written, and every frame is written or the loop
                // ends.
                frames += 1;
                lock().insert(frames, (clock.at(due_us), to));
                if let Err(e) = writer.send(&plan.accounts[to], body).await {
                    *write_errors.entry(reason(&e)).or_default() += 1;
                    break 'sending;
                }
            }
        }
        writer.finish();
        write_errors
    };
    let read = async {
        loop {
            let event = match tokio::time::timeout_at(plan.deadline.into(), answers.next()).await {
                Ok(Some(Ok(event))) => event,
                Ok(Some(Err(e))) => {
                    *errors.entry(reason(&e)).or_default() += 1;
                    break;
                }
                Ok(None) | Err(_) => break,
            };
            slots.add_permits(1);
            let Some((started, to)) = lock().remove(&event.seq()) else { continue };
            match event {
                SendEvent::Acked { .. } => {
                    hist.saturating_record(started.elapsed().as_micros() as u64);
                    acked_to[to] += 1;
                    counters.acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    counters.last_ack_us.fetch_max(clock.now_us(), std::sync::atomic::Ordering::Relaxed);
                }
                SendEvent::Refused { error, .. } => {
                    let code = error.code().as_str_name().trim_start_matches("ERROR_CODE_").to_owned();
                    *errors.entry(code).or_default() += 1;
                    counters.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        // Nothing more will free a slot: a writer waiting for one stops.
        slots.close();
    };
    let (write_errors, ()) = tokio::join!(write, read);
    for (k, v) in write_errors {
        *errors.entry(k).or_default() += v;
    }
    (hist, errors, acked_to)
}
