//! Memory bounded by bytes: clients that open every stream they are allowed and never read, authenticated
//! (`Subscribe` on every stream, with a mailbox full of large envelopes) and not (a maximal frame announced on every
//! stream, half of them pipelined send streams, all but its last byte sent), several connections at once, while a
//! well-behaved pair keeps exchanging messages. The relay is a `relayd` child process; its resident memory is read from `/proc/PID/status`, and its
//! peak (`VmHWM`) must stay within [`BOUND_PER_CONNECTION`] per attacking connection of its resident size before
//! the attack (the bound stated in the README), for the subscribing connections, for the stalling ones (measured
//! from the resident size after the first phase) and for all four together.

use std::time::Duration;

use bytes::Bytes;
use relay_client::InboxEvent;
use relay_proto::MAX_FRAME_LEN;
use relay_proto::wire::{ClientFrame, OpenSendStream, Subscribe, client_frame::Body};
use relay_tests::TestRelay;

use crate::bounded;

/// Growth of the relay's resident memory allowed per attacking connection (README, "Memory per connection is
/// bounded by bytes").
const BOUND_PER_CONNECTION: u64 = 8 * 1024 * 1024;
/// Streams the relay allows per connection in this test (every one of them is used by the attackers).
const STREAMS: u32 = 128;
/// Authenticated attacking connections (all as one account) and unauthenticated ones.
const AUTHENTICATED: usize = 2;
const UNAUTHENTICATED: usize = 2;
/// Envelopes of the largest size queued in the attacking account's own mailbox.
const QUEUED: usize = 64;
/// Round trips of the well-behaved pair during the attack.
const ROUNDS: usize = 200;

/// `VmRSS` and `VmHWM` of `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::test]
async fn clients_that_open_every_stream_and_never_read_cost_a_bounded_number_of_bytes() {
    let relay = TestRelay::process_with(|c| c.limits.max_streams_per_connection = STREAMS).await.expect("relay");
    let pid = relay.pid().expect("a child process");

    // The attacking account queues envelopes of the largest size for itself; the well-behaved pair is set up too.
    let (attacker, attacker_id) = relay.raw_user("+33611111111").await.expect("attacker");
    let big = Bytes::from(vec![0x5a; relay.config().limits.max_envelope_bytes]);
    for _ in 0..QUEUED {
        attacker.send(&attacker_id.account_id(), big.clone()).await.expect("queued");
    }
    let (alice, _) = relay.raw_user("+33622222222").await.expect("alice");
    let (bob, bob_id) = relay.raw_user("+33633333333").await.expect("bob");
    let mut bob_inbox = bob.subscribe().await.expect("bob subscribes");
    assert!(matches!(bounded("bob's empty queue", bob_inbox.next()).await, Some(Ok(InboxEvent::QueueEmpty))));

    let (before, _) = memory(pid);

    // (a) Authenticated: every stream of every connection sends `Subscribe` and is never read (one byte at most,
    // to see that the relay acted on it). Each stream is opened, written and then held open by a task of its own
    // until the test ends, so a stream the relay does not allow (yet) only leaves its task waiting.
    let mut attacks = tokio::task::JoinSet::new();
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let mut held = Vec::new();
    for c in 0..AUTHENTICATED {
        let conn = relay.raw_connection().await.expect("connect");
        conn.authenticate(&attacker_id).await.expect("authenticate");
        for _ in 0..STREAMS {
            let (quic, answered) = (conn.quic().clone(), answered.clone());
            attacks.spawn(async move {
                let Ok((mut send, mut recv)) = quic.open_bi().await else { return };
                let subscribe = ClientFrame { body: Some(Body::Subscribe(Subscribe {})) };
                if relay_quic::write_frame(&mut send, &subscribe).await.is_err() {
                    return;
                }
                // Bytes or a reset: either way the relay acted on this `Subscribe`.
                recv.read(&mut [0u8; 1]).await.ok();
                answered.send(c).ok();
                std::future::pending::<()>().await;
                drop((send, recv));
            });
        }
        held.push(conn);
    }
    // The relay acted on each authenticated connection's `Subscribe`s (at least one of its streams was answered).
    let mut served = [false; AUTHENTICATED];
    while served.iter().any(|s| !s) {
        let c = bounded("an answer to Subscribe", answers.recv()).await.expect("a sender is alive");
        served[c] = true;
    }
    // Meanwhile the well-behaved pair is served in full.
    exchange(&alice, &bob_id.account_id(), &mut bob_inbox, 0..ROUNDS / 2).await;
    let (after_subscribe, peak_subscribe) = memory(pid);

    // (b) Unauthenticated: every stream announces a maximal frame and sends all of it but the last byte.
    let mut unauthenticated = Vec::new();
    for _ in 0..UNAUTHENTICATED {
        let conn = relay.raw_connection().await.expect("connect");
        for stream in 0..STREAMS {
            let quic = conn.quic().clone();
            let pipelined = stream % 2 == 1;
            attacks.spawn(async move {
                let Ok((mut send, recv)) = quic.open_bi().await else { return };
                // Half the streams are pipelined send streams first (protocol.md 4.3): the stalled frame is then
                // read by the pipeline, which must take the same budget.
                if pipelined {
                    let open = ClientFrame { body: Some(Body::OpenSendStream(OpenSendStream {})) };
                    if relay_quic::write_frame(&mut send, &open).await.is_err() {
                        return;
                    }
                }
                let mut frame = Vec::with_capacity(4 + MAX_FRAME_LEN - 1);
                frame.extend_from_slice(&(MAX_FRAME_LEN as u32).to_be_bytes());
                frame.resize(4 + MAX_FRAME_LEN - 1, 0x0a);
                send.write_all(&frame).await.ok();
                std::future::pending::<()>().await;
                drop((send, recv));
            });
        }
        unauthenticated.push(conn);
    }
    // Wait until each unauthenticated connection has put at least 1 MiB on the wire (what the relay lets in).
    for conn in &unauthenticated {
        bounded("the stalled frames to be sent", async {
            while conn.quic().stats().udp_tx.bytes < 1024 * 1024 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    exchange(&alice, &bob_id.account_id(), &mut bob_inbox, ROUNDS / 2..ROUNDS).await;
    let (after, peak) = memory(pid);

    // Peak growth over the whole attack, and the part of it that came with the unauthenticated connections.
    let attackers = (AUTHENTICATED + UNAUTHENTICATED) as u64;
    let growth = peak.saturating_sub(before);
    let growth_subscribe = peak_subscribe.saturating_sub(before);
    let growth_stalled = peak.saturating_sub(after_subscribe);
    eprintln!(
        "relayd RSS before {:.1} MiB, after {:.1} MiB, peak {:.1} MiB: peak growth {:.1} MiB for {attackers} \
         attacking connections ({:.1} MiB each; bound {:.1} MiB each); {:.1} MiB with the {AUTHENTICATED} \
         subscribing, {:.1} MiB more with the {UNAUTHENTICATED} stalling",
        mib(before),
        mib(after),
        mib(peak),
        mib(growth),
        mib(growth / attackers),
        mib(BOUND_PER_CONNECTION),
        mib(growth_subscribe),
        mib(growth_stalled),
    );
    let bound = |n: usize| BOUND_PER_CONNECTION * n as u64;
    assert!(growth_subscribe <= bound(AUTHENTICATED), "subscribing: {:.1} MiB", mib(growth_subscribe));
    assert!(growth_stalled <= bound(UNAUTHENTICATED), "stalling: {:.1} MiB", mib(growth_stalled));
    assert!(growth <= bound(AUTHENTICATED + UNAUTHENTICATED), "in all: {:.1} MiB", mib(growth));
    drop((held, unauthenticated));
    attacks.shutdown().await;
}

/// `rounds` messages from `alice` to `to`, each received on `inbox` and acknowledged before the next is sent.
async fn exchange(
    alice: &relay_client::Connection,
    to: &relay_proto::AccountId,
    inbox: &mut relay_client::Inbox,
    rounds: std::ops::Range<usize>,
) {
    for i in rounds {
        let body = Bytes::from(format!("round {i}"));
        bounded("alice's send", alice.send(to, body.clone())).await.expect("acknowledged");
        loop {
            match bounded("bob's delivery", inbox.next()).await.expect("open").expect("event") {
                InboxEvent::Deliver(d) => {
                    assert_eq!(d.envelope, body);
                    inbox.ack(&[d.server_id]).await.expect("ack");
                    break;
                }
                InboxEvent::QueueEmpty | InboxEvent::Acked(_) => {}
            }
        }
    }
}
