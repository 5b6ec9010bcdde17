//! The pipelined send stream (protocol.md 4.3): acknowledged only once durable, in order, refusals per frame with
//! the stream going on, and no acknowledged send lost when the relay is killed mid-window.

use std::collections::BTreeMap;

use bytes::Bytes;
use relay_client::{Connection, Identity, SendEvent};
use relay_proto::{AccountId, ErrorCode};
use relay_tests::TestRelay;

use crate::bounded;

async fn user(relay: &TestRelay, phone: &str) -> (Connection, Identity) {
    relay.raw_user(phone).await.expect("user")
}

fn code(event: &SendEvent) -> Option<ErrorCode> {
    match event {
        SendEvent::Refused { error, .. } => Some(error.code()),
        SendEvent::Acked { .. } => None,
    }
}

#[tokio::test]
async fn pipelined_sends_are_acknowledged_and_delivered_in_order() {
    let relay = TestRelay::in_process().await.expect("relay");
    let (alice, _) = user(&relay, "+33611111111").await;
    let (bob, bob_id) = user(&relay, "+33622222222").await;
    let to = bob_id.account_id();
    let sends: Vec<_> = (0..200).map(|i| (to, Bytes::from(format!("m{i:03}")))).collect();
    let events = bounded("pipelined sends", alice.send_pipelined(sends, 32)).await.expect("answers");
    assert_eq!(events.len(), 200);
    let mut last_id = 0;
    for (i, e) in events.iter().enumerate() {
        match e {
            SendEvent::Acked { seq, server_id, .. } => {
                assert_eq!(*seq, i as u64 + 1);
                assert!(*server_id > last_id, "server ids increase with the sequence: {events:?}");
                last_id = *server_id;
            }
            SendEvent::Refused { .. } => panic!("refused: {e:?}"),
        }
    }
    let got = bounded("drain", relay_tests::drain_mailbox(&bob)).await.expect("drain");
    let want: Vec<_> = (0..200).map(|i| Bytes::from(format!("m{i:03}"))).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_refused_frame_gets_its_own_error_and_the_stream_goes_on() {
    let relay = TestRelay::in_process().await.expect("relay");
    let (alice, _) = user(&relay, "+33611111111").await;
    let (bob, bob_id) = user(&relay, "+33622222222").await;
    let to = bob_id.account_id();
    let nobody = Identity::generate().account_id();
    let too_large = Bytes::from(vec![7u8; relay.config().limits.max_envelope_bytes + 1]);
    let sends = vec![
        (to, Bytes::from_static(b"first")),
        (nobody, Bytes::from_static(b"to nobody")),
        (to, too_large),
        (to, Bytes::new()),
        (to, Bytes::from_static(b"last")),
    ];
    let events = bounded("pipelined sends", alice.send_pipelined(sends, 8)).await.expect("answers");
    let codes: Vec<_> = events.iter().map(code).collect();
    assert_eq!(
        codes,
        [
            None,
            Some(ErrorCode::UnknownRecipient),
            Some(ErrorCode::EnvelopeTooLarge),
            Some(ErrorCode::InvalidRequest),
            None
        ]
    );
    let got = bounded("drain", relay_tests::drain_mailbox(&bob)).await.expect("drain");
    assert_eq!(got, [Bytes::from_static(b"first"), Bytes::from_static(b"last")]);
}

#[tokio::test]
async fn a_failed_flush_acknowledges_nothing_on_the_pipeline() {
    let relay = TestRelay::in_process().await.expect("relay");
    let faults = relay.storage_faults().expect("in-process relay");
    let (alice, _) = user(&relay, "+33611111111").await;
    let (bob, bob_id) = user(&relay, "+33622222222").await;
    let to = bob_id.account_id();
    let (mut writer, mut answers) = alice.open_send_stream().await.expect("open");

    faults.fail_flushes(true);
    for i in 0..5 {
        writer.send(&to, Bytes::from(format!("during {i}"))).await.expect("write");
    }
    for _ in 0..5 {
        let event = bounded("answer", answers.next()).await.expect("an answer").expect("readable");
        assert_eq!(code(&event), Some(ErrorCode::StorageUnavailable), "{event:?}");
    }

    // The same stream goes on once the store recovers.
    faults.fail_flushes(false);
    let seq = writer.send(&to, Bytes::from_static(b"after")).await.expect("write");
    let event = bounded("answer", answers.next()).await.expect("an answer").expect("readable");
    assert!(matches!(event, SendEvent::Acked { seq: s, .. } if s == seq), "{event:?}");
    writer.finish();
    assert!(bounded("end", answers.next()).await.is_none(), "the relay finishes after the client");
    let got = bounded("drain", relay_tests::drain_mailbox(&bob)).await.expect("drain");
    assert!(got.iter().any(|e| e.as_ref() == b"after"), "{got:?}");
}

#[tokio::test]
async fn sealed_sends_pipeline_on_an_unauthenticated_connection() {
    let relay = TestRelay::in_process().await.expect("relay");
    let (bob, bob_id) = user(&relay, "+33622222222").await;
    let key = [9u8; 32];
    bob.set_access_key(relay_proto::auth::sha256(&key)).await.expect("access key");
    let to = bob_id.account_id();
    let anonymous = relay.raw_connection().await.expect("connect");
    let (mut writer, mut answers) = anonymous.open_send_stream().await.expect("open");
    writer.sealed_send(&to, Bytes::from_static(b"sealed 1"), &key).await.expect("write");
    writer.sealed_send(&to, Bytes::from_static(b"bad key"), &[1u8; 32]).await.expect("write");
    writer.send(&to, Bytes::from_static(b"named, unauthenticated")).await.expect("write");
    writer.sealed_send(&to, Bytes::from_static(b"sealed 2"), &key).await.expect("write");
    writer.finish();
    let mut by_seq = BTreeMap::new();
    while let Some(event) = bounded("answer", answers.next()).await {
        let event = event.expect("readable");
        by_seq.insert(event.seq(), code(&event));
    }
    let want = [(1, None), (2, Some(ErrorCode::BadAccessKey)), (3, Some(ErrorCode::Unauthenticated)), (4, None)];
    assert_eq!(by_seq, BTreeMap::from(want));
    let got = bounded("drain", relay_tests::drain_mailbox(&bob)).await.expect("drain");
    assert_eq!(got, [Bytes::from_static(b"sealed 1"), Bytes::from_static(b"sealed 2")]);
}

/// `relayd` is SIGKILLed while a window of pipelined sends is in flight: every send it acknowledged is delivered
/// after the restart, once, in sequence order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_pipelined_send_survives_a_kill() {
    let mut relay = TestRelay::process().await.expect("relay");
    let (alice, _) = user(&relay, "+33611111111").await;
    let (_, bob_id) = user(&relay, "+33622222222").await;
    let to: AccountId = bob_id.account_id();
    let (mut writer, mut answers) = alice.open_send_stream().await.expect("open");
    let total = 50_000u64;
    let write = async {
        for i in 0..total {
            if writer.send(&to, Bytes::from(format!("m{i:05}"))).await.is_err() {
                break;
            }
        }
    };
    let mut acked = Vec::new();
    let read = async {
        // Kill once some acknowledgements came back and others are surely still in flight.
        while let Some(Ok(event)) = answers.next().await {
            if let SendEvent::Acked { seq, .. } = event {
                acked.push(seq);
            }
            if acked.len() >= 100 {
                break;
            }
        }
    };
    // The writer is dropped mid-window as soon as the reader has its acknowledgements.
    bounded("first acknowledgements", async {
        tokio::select! {
            () = write => {}
            () = read => {}
        }
    })
    .await;
    relay.kill().await.expect("SIGKILL");
    alice.quic().close(0u32.into(), b"relay killed");
    bounded("restart", relay.restart()).await.expect("restart");
    let bob = relay.raw_connection().await.expect("connect");
    bounded("auth", bob.authenticate(&bob_id)).await.expect("auth");
    let got = bounded("drain", relay_tests::drain_mailbox(&bob)).await.expect("drain");
    let got: Vec<String> = got.iter().map(|e| String::from_utf8_lossy(e).into_owned()).collect();
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(got, sorted, "delivered once each, in sequence order");
    for seq in &acked {
        let want = format!("m{:05}", seq - 1);
        assert!(got.contains(&want), "acknowledged {want} lost after the kill");
    }
    assert!(acked.len() >= 100);
}

#[tokio::test]
async fn a_sequence_gap_or_another_request_ends_the_pipeline_and_pipelined_send_needs_one() {
    use relay_proto::wire::server_frame::Body as Resp;
    use relay_proto::wire::{ClientFrame, OpenSendStream, PipelinedSend, ServerFrame, client_frame::Body};
    let relay = TestRelay::in_process().await.expect("relay");
    let (alice, _) = user(&relay, "+33611111111").await;
    let (_, bob_id) = user(&relay, "+33622222222").await;
    let send = |seq| {
        let s = relay_proto::wire::Send {
            recipient: Bytes::copy_from_slice(bob_id.account_id().as_bytes()),
            envelope: Bytes::from_static(b"x"),
        };
        ClientFrame { body: Some(Body::PipelinedSend(PipelinedSend { seq, send: Some(s), sealed: None })) }
    };

    // Outside a pipelined send stream.
    let err = bounded("request", alice.request(send(1).body.expect("body"))).await.expect_err("refused");
    assert_eq!(err.code(), Some(ErrorCode::InvalidRequest), "{err}");

    for bad in [send(3), ClientFrame { body: Some(Body::OpenSendStream(OpenSendStream {})) }] {
        let (mut tx, mut rx) = alice.quic().open_bi().await.expect("stream");
        let open = ClientFrame { body: Some(Body::OpenSendStream(OpenSendStream {})) };
        for frame in [open, send(1), bad] {
            relay_quic::write_frame(&mut tx, &frame).await.expect("write");
        }
        let mut answers = Vec::new();
        while let Some(frame) =
            bounded("answers", relay_quic::read_frame::<ServerFrame>(&mut rx, relay_proto::MAX_FRAME_LEN))
                .await
                .expect("readable")
        {
            answers.push(frame.body.expect("a body"));
        }
        assert!(matches!(&answers[0], Resp::SendAcks(a) if a.seqs == [1]), "{answers:?}");
        assert!(matches!(&answers[1], Resp::Error(e) if e.code() == ErrorCode::InvalidRequest), "{answers:?}");
        assert_eq!(answers.len(), 2, "the stream ends after the error: {answers:?}");
    }
}

/// Sends waiting for a stalled disk stay within the connection's frame budget (2 MiB once authenticated): the
/// relay stops reading the stream, and the rest waits in QUIC's flow control. Before, a frame's bytes left the
/// budget as soon as it was read, so the relay kept reading and holding every frame that arrived (here 48 frames
/// of 64 KiB, 3 MiB) for as long as the disk stalled.
#[tokio::test]
async fn sends_waiting_for_a_stalled_disk_stay_within_the_frame_budget() {
    use std::net::SocketAddr;

    let relay = TestRelay::in_process_with(|c| c.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0))))
        .await
        .expect("relay");
    let metrics = relay.metrics_addr().expect("metrics enabled");
    let depth = async || crate::metrics::sample(&crate::metrics::get(metrics, "/metrics").await.1, "relay_queue_depth");
    let faults = relay.storage_faults().expect("in-process relay");
    let (alice, _) = user(&relay, "+33611111111").await;
    let (_bob, bob_id) = user(&relay, "+33622222222").await;
    let to = bob_id.account_id();
    let (mut writer, mut answers) = alice.open_send_stream().await.expect("open");

    faults.hold_flushes(true);
    const FRAMES: usize = 48;
    let envelope = Bytes::from(vec![7u8; 64 * 1024]);
    // The writes block once the relay stops reading (QUIC flow control), so they go on beside the watching.
    let writing = tokio::spawn(async move {
        for _ in 0..FRAMES {
            writer.send(&to, envelope.clone()).await.expect("write");
        }
        writer
    });
    assert_held_within_budget(metrics).await;

    faults.hold_flushes(false);
    let _writer = bounded("writes", writing).await.expect("writer");
    let mut acked = 0;
    while acked < FRAMES {
        match bounded("answer", answers.next()).await.expect("an answer").expect("readable") {
            SendEvent::Acked { .. } => acked += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(depth().await, FRAMES as f64, "every send stored once the disk is back");
}

/// The same through one stream per send (the first protocol): each request's bytes stay counted until answered.
#[tokio::test]
async fn stream_per_send_requests_waiting_for_a_stalled_disk_stay_within_the_frame_budget() {
    use std::net::SocketAddr;

    let relay = TestRelay::in_process_with(|c| c.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0))))
        .await
        .expect("relay");
    let metrics = relay.metrics_addr().expect("metrics enabled");
    let faults = relay.storage_faults().expect("in-process relay");
    let (alice, _) = user(&relay, "+33611111111").await;
    let (_bob, bob_id) = user(&relay, "+33622222222").await;
    let (alice, to) = (std::sync::Arc::new(alice), bob_id.account_id());

    faults.hold_flushes(true);
    let envelope = Bytes::from(vec![7u8; 64 * 1024]);
    let sends: Vec<_> = (0..48)
        .map(|_| {
            let (alice, envelope) = (alice.clone(), envelope.clone());
            tokio::spawn(async move { alice.send(&to, envelope).await })
        })
        .collect();
    assert_held_within_budget(metrics).await;
    faults.hold_flushes(false);
    for send in sends {
        bounded("send", send).await.expect("join").expect("acknowledged once the disk is back");
    }
}

/// Watches the relay's queue depth while its flushes are held, until it stops changing for a while (at most 5 s),
/// and checks that what it took in fits the authenticated frame budget (2 MiB) in 64 KiB envelopes.
async fn assert_held_within_budget(metrics: std::net::SocketAddr) {
    let depth = async || crate::metrics::sample(&crate::metrics::get(metrics, "/metrics").await.1, "relay_queue_depth");
    let (mut most, mut still) = (0.0f64, 0);
    for _ in 0..100 {
        let now = depth().await;
        if now > most {
            (most, still) = (now, 0);
        } else {
            still += 1;
        }
        if still >= 10 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let budget_frames = (2 * 1024 * 1024 / (64 * 1024)) as f64;
    assert!(most > 0.0, "nothing was taken in at all");
    assert!(most <= budget_frames, "{most} frames of 64 KiB held while the disk stalled, beyond the 2 MiB budget");
}
