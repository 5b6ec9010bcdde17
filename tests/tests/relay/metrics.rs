//! The metrics endpoint: off unless configured, counts traffic in aggregate, and never names an account or a phone.

use std::net::SocketAddr;

use bytes::Bytes;
use relay_client::pin::parse_fingerprint;
use relay_client::{Connection, Identity, InboxEvent};
use relay_proto::wire::DeviceInfo;
use relay_proto::{AccountId, ErrorCode};
use relay_server::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bounded;

const PHONES: [&str; 2] = ["+33612345678", "+33698765432"];

/// One HTTP/1.1 request on a fresh connection; returns the status line and the body.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to metrics port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// The value of the sample named exactly `name` (labels included).
pub(crate) fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .parse()
        .expect("numeric sample")
}

async fn client(addr: SocketAddr, fp: [u8; 32], phone: &str) -> (Connection, AccountId) {
    let identity = Identity::generate();
    let conn = Connection::connect(addr, fp).await.expect("connect");
    let device = DeviceInfo { model: "test".into(), os: "linux".into(), app_version: "0".into() };
    conn.register(&identity, phone, device).await.expect("register");
    (conn, identity.account_id())
}

#[tokio::test]
async fn metrics_are_off_by_default() {
    assert!(Config::default().metrics_listen.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_after_traffic_shows_moved_counters_and_no_personal_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let config = Config {
        listen: loopback,
        data_dir: dir.path().join("data"),
        metrics_listen: Some(loopback),
        ..Config::default()
    };
    let relay = relay_server::start(config).await.expect("relay");
    let metrics = relay.metrics_addr().expect("metrics enabled");
    let fp = parse_fingerprint(relay.cert_fingerprint()).expect("fingerprint");

    let (status, before) = bounded("first scrape", get(metrics, "/metrics")).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(sample(&before, "relay_messages_stored_total"), 0.0);

    let (alice, alice_account) = client(relay.local_addr(), fp, PHONES[0]).await;
    let (bob, bob_account) = client(relay.local_addr(), fp, PHONES[1]).await;
    let mut inbox = bob.subscribe().await.expect("subscribe");
    for _ in 0..5 {
        alice.send(&bob_account, Bytes::from_static(b"opaque envelope")).await.expect("send");
    }
    let (mut ids, mut removed) = (Vec::new(), 0);
    while removed < 5 {
        match bounded("delivery", inbox.next()).await {
            Some(Ok(InboxEvent::Deliver(d))) => {
                ids.push(d.server_id);
                if ids.len() == 5 {
                    inbox.ack(&ids).await.expect("ack");
                }
            }
            Some(Ok(InboxEvent::Acked(n))) => removed += n,
            Some(Ok(InboxEvent::QueueEmpty)) => {}
            other => panic!("delivery stream ended: {other:?}"),
        }
    }
    let unknown = alice.send(&AccountId([7; 16]), Bytes::from_static(b"x")).await.expect_err("no such recipient");
    assert_eq!(unknown.code(), Some(ErrorCode::UnknownRecipient));

    let (_, after) = bounded("second scrape", get(metrics, "/metrics")).await;
    assert_eq!(sample(&after, "relay_messages_stored_total"), 5.0);
    assert!(sample(&after, "relay_messages_delivered_total") >= 5.0);
    assert_eq!(sample(&after, "relay_messages_acknowledged_total"), 5.0);
    assert_eq!(sample(&after, "relay_queue_depth"), 0.0);
    assert_eq!(sample(&after, "relay_connections_open"), 2.0);
    assert!(sample(&after, "relay_connections_total") >= 2.0);
    assert_eq!(sample(&after, "relay_delivery_streams_open"), 1.0);
    assert!(sample(&after, "relay_flush_batch_size_count") >= 1.0);
    assert!(sample(&after, "relay_flush_duration_seconds_count") >= 1.0);
    assert_eq!(sample(&after, "relay_errors_total{code=\"UNKNOWN_RECIPIENT\"}"), 1.0);

    // Aggregate only: no account id (hex or raw), no phone number in any form.
    for account in [alice_account, bob_account] {
        assert!(!after.contains(&account.to_string()), "an account id in the metrics");
        assert!(!after.as_bytes().windows(16).any(|w| w == account.as_bytes()), "raw account id in the metrics");
    }
    for phone in PHONES {
        assert!(!after.contains(phone.trim_start_matches('+')), "a phone number in the metrics");
    }
    for line in after.lines().filter(|l| !l.starts_with('#')) {
        let labels = line.split_once('{').map(|(_, rest)| rest).unwrap_or_default();
        assert!(labels.is_empty() || labels.starts_with("le=") || labels.starts_with("code="), "label in {line}");
    }

    let (status, _) = bounded("other path", get(metrics, "/")).await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    alice.close().await;
    bob.close().await;
    relay.shutdown().await;
}
