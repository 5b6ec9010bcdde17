//! Limits and abuse, slow and stuck peers: each limit is hit by one abusive client, which gets a clear error (or a
//! refused connection), while another client keeps being served in full. Client addresses: the abuser connects from
//! 127.0.0.1, the bystander from 127.0.0.2 where the limit is per address.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use relay_client::{Connection, Identity, InboxEvent};
use relay_proto::ErrorCode;
use relay_proto::wire::{ClientFrame, ServerFrame, server_frame::Body as Resp};
use relay_tests::TestRelay;

use crate::{WAIT, bounded};

/// A connection from the loopback address `ip` (127.0.0.x).
async fn connect_from(relay: &TestRelay, ip: [u8; 4]) -> Result<Connection, relay_client::ClientError> {
    let endpoint = relay_quic::endpoint(SocketAddr::from((ip, 0)), None).expect("client endpoint");
    let fp = relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fingerprint");
    Connection::connect_on(&endpoint, relay.addr(), fp).await
}

async fn registered_from(relay: &TestRelay, ip: [u8; 4], phone: &str) -> (Connection, Identity) {
    let conn = connect_from(relay, ip).await.expect("connect");
    let id = Identity::generate();
    conn.register(&id, phone, Default::default()).await.expect("register");
    (conn, id)
}

/// Drains a recipient's mailbox through a delivery stream, acknowledging everything; the envelopes received.
async fn drain(conn: &Connection) -> Vec<Bytes> {
    relay_tests::drain_mailbox(conn).await.expect("drain the mailbox")
}

#[tokio::test]
async fn connections_over_the_per_address_limit_are_refused_before_the_handshake() {
    let relay = TestRelay::in_process_with(|c| c.limits.max_connections_per_ip = 3).await.expect("relay");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(&relay, [127, 0, 0, 1]).await.expect("within the limit"));
    }
    let Err(refused) = connect_from(&relay, [127, 0, 0, 1]).await else {
        panic!("a fourth connection from the same address was accepted");
    };
    assert!(refused.to_string().to_lowercase().contains("refused"), "{refused}");

    // Another address is served in full meanwhile.
    let (bystander, _) = registered_from(&relay, [127, 0, 0, 2], "+33611111111").await;
    let (other, other_id) = registered_from(&relay, [127, 0, 0, 2], "+33622222222").await;
    bystander.send(&other_id.account_id(), Bytes::from_static(b"still served")).await.expect("send");
    assert_eq!(drain(&other).await, [Bytes::from_static(b"still served")]);

    // A closed connection frees its slot.
    held.pop().expect("one").close().await;
    let deadline = Instant::now() + WAIT;
    loop {
        match connect_from(&relay, [127, 0, 0, 1]).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "slot not released yet");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the slot was never released: {e}"),
        }
    }
}

#[tokio::test]
async fn registrations_from_one_address_are_rate_limited() {
    let relay = TestRelay::in_process_with(|c| c.limits.registrations_per_minute_per_ip = 3).await.expect("relay");
    for i in 0..3 {
        registered_from(&relay, [127, 0, 0, 1], &format!("+3361000000{i}")).await;
    }
    let conn = connect_from(&relay, [127, 0, 0, 1]).await.expect("connect");
    let err = conn.register(&Identity::generate(), "+33610000009", Default::default()).await.expect_err("limited");
    assert_eq!(err.code(), Some(ErrorCode::RateLimited), "{err}");
    // The same connection, and other addresses, keep working.
    registered_from(&relay, [127, 0, 0, 2], "+33620000000").await;
    assert!(conn.lookup("+33610000000").await.is_err(), "not authenticated: refused, but answered");
}

#[tokio::test]
async fn an_account_over_its_send_rate_is_refused_and_nothing_refused_is_stored() {
    let relay = TestRelay::in_process_with(|c| c.limits.sends_per_second = 5).await.expect("relay");
    let (abuser, _) = registered_from(&relay, [127, 0, 0, 1], "+33611111111").await;
    let (bystander, _) = registered_from(&relay, [127, 0, 0, 1], "+33622222222").await;
    let (recipient, recipient_id) = registered_from(&relay, [127, 0, 0, 1], "+33633333333").await;
    let to = recipient_id.account_id();

    let start = Instant::now();
    let mut accepted = Vec::new();
    for i in 0..40u32 {
        match abuser.send(&to, Bytes::from(format!("flood {i}"))).await {
            Ok(_) => accepted.push(Bytes::from(format!("flood {i}"))),
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::RateLimited), "{e}"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The burst (twice the rate) plus what refilled while the loop ran: a count, not a timing threshold.
    let most = 10 + (elapsed * 5.0).ceil() as usize + 1;
    assert!(accepted.len() >= 10 && accepted.len() <= most, "{} accepted in {elapsed:.2} s", accepted.len());
    assert!(accepted.len() < 40, "the limit was hit");

    // Another account sending at the same time is not limited by the abuser's bucket.
    for i in 0..10u32 {
        bystander.send(&to, Bytes::from(format!("fine {i}"))).await.expect("the bystander is served");
    }
    let got = drain(&recipient).await;
    let flood = got.iter().filter(|e| e.starts_with(b"flood")).count();
    assert_eq!(flood, accepted.len(), "exactly the acknowledged sends are stored");
    assert_eq!(got.len(), accepted.len() + 10);
}

#[tokio::test]
async fn a_client_that_stalls_mid_frame_is_cut_off_and_others_are_served() {
    let relay = TestRelay::in_process_with(|c| {
        c.limits.frame_timeout_secs = 1;
        c.limits.max_streams_per_connection = 4;
    })
    .await
    .expect("relay");
    let abuser = connect_from(&relay, [127, 0, 0, 1]).await.expect("connect");
    // Every stream the relay allows starts a frame (two bytes of the four-byte length) and stalls.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let (mut send, recv) = abuser.quic().open_bi().await.expect("stream");
        send.write_all(&[0, 0]).await.expect("half a prefix");
        stalled.push((send, recv));
    }
    // Meanwhile another client is served in full.
    let (a, _) = registered_from(&relay, [127, 0, 0, 2], "+33611111111").await;
    let (b, b_id) = registered_from(&relay, [127, 0, 0, 2], "+33622222222").await;
    a.send(&b_id.account_id(), Bytes::from_static(b"hello")).await.expect("send");
    assert_eq!(drain(&b).await, [Bytes::from_static(b"hello")]);

    // Each stalled stream is answered FRAME_TIMEOUT and closed.
    for (_, mut recv) in stalled {
        let reply = bounded("timeout answer", relay_quic::read_frame::<ServerFrame>(&mut recv, 1 << 16))
            .await
            .expect("answer")
            .expect("a frame");
        match reply.body {
            Some(Resp::Error(e)) => assert_eq!(e.code(), ErrorCode::FrameTimeout, "{e}"),
            other => panic!("expected FRAME_TIMEOUT, got {other:?}"),
        }
    }
    // The slots are free again: a complete request on the same connection is answered.
    let (mut send, mut recv) = abuser.quic().open_bi().await.expect("a fresh stream");
    let lookup =
        relay_proto::wire::client_frame::Body::Lookup(relay_proto::wire::Lookup { phone: "+33611111111".into() });
    relay_quic::write_frame(&mut send, &ClientFrame { body: Some(lookup) }).await.expect("write");
    let reply = bounded("answer", relay_quic::read_frame::<ServerFrame>(&mut recv, 1 << 16)).await.expect("read");
    match reply.and_then(|f| f.body) {
        Some(Resp::Error(e)) => assert_eq!(e.code(), ErrorCode::Unauthenticated, "{e}"),
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
}

#[tokio::test]
async fn a_recipient_that_stops_acking_gets_at_most_its_window_and_loses_nothing() {
    let relay = TestRelay::in_process_with(|c| c.limits.delivery_window = 8).await.expect("relay");
    let (sender, _) = registered_from(&relay, [127, 0, 0, 1], "+33611111111").await;
    let (stuck, stuck_id) = registered_from(&relay, [127, 0, 0, 1], "+33622222222").await;
    let mut inbox = stuck.subscribe().await.expect("subscribe");
    for i in 0..50u32 {
        sender.send(&stuck_id.account_id(), Bytes::from(format!("m{i}"))).await.expect("acknowledged");
    }
    let mut pushed = 0;
    while pushed < 8 {
        if let InboxEvent::Deliver(_) = bounded("push", inbox.next()).await.expect("open").expect("event") {
            pushed += 1;
        }
    }
    // Another pair exchanges a message end to end: by then the relay had every chance to push more.
    let (c, _) = registered_from(&relay, [127, 0, 0, 2], "+33633333333").await;
    let (d, d_id) = registered_from(&relay, [127, 0, 0, 2], "+33644444444").await;
    c.send(&d_id.account_id(), Bytes::from_static(b"unaffected")).await.expect("send");
    assert_eq!(drain(&d).await, [Bytes::from_static(b"unaffected")]);
    let more = tokio::time::timeout(std::time::Duration::from_millis(200), inbox.next()).await;
    assert!(more.is_err(), "nothing beyond the window without acks: {more:?}");

    // The recipient comes back and acknowledges: all 50 arrive, none lost.
    drop(inbox);
    stuck.close().await;
    let again = connect_from(&relay, [127, 0, 0, 1]).await.expect("reconnect");
    again.authenticate(&stuck_id).await.expect("auth");
    let got = drain(&again).await;
    assert_eq!(got.len(), 50, "every acknowledged send is still there");
}

#[tokio::test]
async fn a_recipient_that_never_reads_does_not_hold_up_senders_or_others() {
    let relay = TestRelay::in_process().await.expect("relay");
    let (sender, _) = registered_from(&relay, [127, 0, 0, 1], "+33611111111").await;
    let (deaf, deaf_id) = registered_from(&relay, [127, 0, 0, 1], "+33622222222").await;
    // Subscribes, then never reads its stream: pushes pile up against QUIC flow control.
    let _inbox = deaf.subscribe().await.expect("subscribe");
    let big = Bytes::from(vec![7u8; 32 * 1024]);
    for _ in 0..64 {
        bounded("send to a deaf recipient", sender.send(&deaf_id.account_id(), big.clone())).await.expect("acked");
    }
    let (c, _) = registered_from(&relay, [127, 0, 0, 2], "+33633333333").await;
    let (d, d_id) = registered_from(&relay, [127, 0, 0, 2], "+33644444444").await;
    c.send(&d_id.account_id(), Bytes::from_static(b"unaffected")).await.expect("send");
    assert_eq!(drain(&d).await, [Bytes::from_static(b"unaffected")]);
}
