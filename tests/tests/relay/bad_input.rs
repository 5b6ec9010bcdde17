//! Malformed, truncated and oversized input: an error frame with a stable code, only the offending stream closed,
//! and the relay keeps serving the same connection and other clients.

use bytes::{BufMut, BytesMut};
use relay_proto::wire::{ClientFrame, ServerFrame, client_frame::Body, server_frame};
use relay_proto::{ErrorCode, MAX_FRAME_LEN, StreamCloseCode};
use relay_quic::read_frame;
use relay_tests::TestRelay;

use crate::bounded;

/// Writes raw bytes on a new stream of `conn` and returns the relay's first frame and whether the relay then
/// stopped reading that stream with a protocol close code.
async fn raw_exchange(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> (ServerFrame, Option<u32>) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    send.write_all(bytes).await.expect("write");
    if finish {
        send.finish().expect("finish");
    }
    let frame = bounded("error frame", read_frame::<ServerFrame>(&mut recv, MAX_FRAME_LEN))
        .await
        .expect("readable")
        .expect("a frame");
    let stopped = bounded("stop", send.stopped()).await.ok().flatten().map(|c| c.into_inner() as u32);
    (frame, stopped)
}

fn error_code(frame: &ServerFrame) -> ErrorCode {
    match &frame.body {
        Some(server_frame::Body::Error(e)) => e.code(),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_frames_get_errors_and_everyone_else_is_still_served() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let mut bob = relay.user("+33698765432").await.expect("bob");
    let conn = alice.messenger.connection().quic().clone();

    // Garbage body that is not protobuf.
    let mut garbage = BytesMut::new();
    garbage.put_u32(3);
    garbage.put_slice(&[0xff, 0xff, 0xff]);
    let (frame, stopped) = raw_exchange(&conn, &garbage, false).await;
    assert_eq!(error_code(&frame), ErrorCode::MalformedFrame);
    assert_eq!(stopped, Some(StreamCloseCode::ProtocolError.code()));

    // A length prefix above the maximum: refused before any body is read or allocated.
    let mut oversized = BytesMut::new();
    oversized.put_u32((MAX_FRAME_LEN + 1) as u32);
    let (frame, stopped) = raw_exchange(&conn, &oversized, false).await;
    assert_eq!(error_code(&frame), ErrorCode::FrameTooLarge);
    assert_eq!(stopped, Some(StreamCloseCode::FrameTooLarge.code()));

    // A frame cut short by the end of the stream, and a prefix cut short.
    let mut truncated = BytesMut::new();
    truncated.put_u32(100);
    truncated.put_slice(&[0u8; 10]);
    let (frame, _) = raw_exchange(&conn, &truncated, true).await;
    assert_eq!(error_code(&frame), ErrorCode::MalformedFrame);
    let (frame, _) = raw_exchange(&conn, &[0, 0], true).await;
    assert_eq!(error_code(&frame), ErrorCode::MalformedFrame);

    // An empty request is refused, but the stream stays usable for the next request.
    let empty = relay_proto::frame::encode(&ClientFrame { body: None }).expect("encode");
    let lookup = relay_proto::frame::encode(&ClientFrame {
        body: Some(Body::Lookup(relay_proto::wire::Lookup { phone: "+33698765432".into() })),
    })
    .expect("encode");
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    send.write_all(&empty).await.expect("write");
    send.write_all(&lookup).await.expect("write");
    send.finish().expect("finish");
    let first = read_frame::<ServerFrame>(&mut recv, MAX_FRAME_LEN).await.expect("read").expect("frame");
    assert_eq!(error_code(&first), ErrorCode::InvalidRequest);
    let second = read_frame::<ServerFrame>(&mut recv, MAX_FRAME_LEN).await.expect("read").expect("frame");
    assert!(matches!(second.body, Some(server_frame::Body::LookupResult(_))), "{second:?}");

    // The same connection and another client are still served.
    alice.messenger.send_text("+33698765432", "still here").await.expect("send after bad frames");
    let got = bob.messenger.receive(1, crate::WAIT).await.expect("receive");
    assert_eq!(got[0].text, "still here");
}

#[tokio::test]
async fn oversized_envelope_and_bad_fields_are_refused_with_codes() {
    let relay = TestRelay::in_process_with(|c| c.limits.max_envelope_bytes = 1024).await.expect("relay");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    relay.user("+33698765432").await.expect("bob");
    let bob = alice.messenger.contact("+33698765432").await.expect("lookup");
    let conn = alice.messenger.connection();

    let err = conn.send(&bob.account, vec![7u8; 1025].into()).await.expect_err("too large");
    assert_eq!(err.code(), Some(ErrorCode::EnvelopeTooLarge));
    let ok = conn.send(&bob.account, vec![7u8; 1024].into()).await;
    assert!(ok.is_ok(), "at the limit is accepted: {ok:?}");

    let err = conn.send(&relay_proto::AccountId([9; 16]), vec![1].into()).await.expect_err("unknown");
    assert_eq!(err.code(), Some(ErrorCode::UnknownRecipient));
    let err = conn
        .request(Body::Send(relay_proto::wire::Send { recipient: vec![1, 2, 3].into(), envelope: vec![1].into() }))
        .await
        .expect_err("short id");
    assert_eq!(err.code(), Some(ErrorCode::InvalidRequest));
}

#[tokio::test]
async fn invalid_phone_numbers_are_rejected_not_repaired() {
    let relay = TestRelay::in_process().await.expect("relay");
    let fp = relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fp");
    let conn = relay_client::Connection::connect(relay.addr(), fp).await.expect("connect");
    let id = relay_client::Identity::generate();
    for bad in ["+3367a829916", "33612345678", "+33 612345678", "+0612345678", ""] {
        let err = conn.register(&id, bad, Default::default()).await.expect_err(bad);
        assert_eq!(err.code(), Some(ErrorCode::InvalidPhone), "{bad:?}: {err}");
    }
    // Valid syntax, but outside any numbering plan: no country +999, a French number one digit short, one in a French
    // range nobody is assigned, one that is valid only once its trunk prefix is dropped (refused, not repaired).
    for (bad, why) in [
        ("+99912345678", "country calling code"),
        ("+3361234567", "too short"),
        ("+33690123456", "does not assign"),
        ("+330612345678", "canonical"),
    ] {
        let err = conn.register(&id, bad, Default::default()).await.expect_err(bad);
        assert_eq!(err.code(), Some(ErrorCode::InvalidPhone), "{bad:?}: {err}");
        assert!(err.to_string().contains(why), "{bad:?}: {err}");
        // Nor is a verification code sent to it.
        let err = conn.request_code(bad).await.expect_err(bad);
        assert_eq!(err.code(), Some(ErrorCode::InvalidPhone), "{bad:?}: {err}");
    }
    // Nothing was stored: the number, spelled correctly, is free.
    assert!(conn.register(&id, "+33678829916", Default::default()).await.expect("valid"));
}
