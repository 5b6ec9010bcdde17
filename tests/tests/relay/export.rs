//! The export interface over a real relay: mutual TLS with the pinned exporter certificate only, the consent change
//! feed (personal data only for grants in force), export leases granted only for the latest statement in force,
//! the withdrawal fence (an acknowledged withdrawal waits for the lease in flight), and no way to reach a mailbox.

use std::time::Duration;

use relay_client::InboxEvent;
use relay_proto::consent::Decision;
use relay_proto::wire::{
    Ack, BeginExport, ClientFrame, ConsentChange, ConsentChanges, EndExport, ExportGranted, Send, Subscribe,
    client_frame, export_request::Body as Req, export_response::Body as Resp,
};
use relay_proto::{AccountId, ErrorCode};
use relay_tests::TestRelay;
use relay_tests::export::{ExportClient, ExporterIdentity};

const ALICE: &str = "+33612345678";

async fn relay_and_exporter() -> (TestRelay, ExportClient) {
    let id = ExporterIdentity::generate().expect("exporter identity");
    let relay = TestRelay::with_export(&id).await.expect("relay");
    let exporter = relay.exporter(Some(&id)).await.expect("exporter connects");
    publish_notices(&exporter).await;
    (relay, exporter)
}

/// Publishes the test catalogue's notices over the export interface, as an exporter does when it connects.
async fn publish_notices(exporter: &ExportClient) {
    let documents = relay_tests::test_notices().expect("notices").into_iter().map(Into::into).collect();
    let published = exporter.request(Req::PublishNotices(relay_proto::wire::PublishNotices { documents })).await;
    assert!(matches!(published.expect("published"), Resp::NoticesPublished(p) if p.current > 0));
}

async fn changes(exporter: &ExportClient, after_cursor: u64) -> Vec<ConsentChange> {
    match exporter.request(Req::ConsentChanges(ConsentChanges { after_cursor })).await.expect("changes") {
        Resp::ConsentChangeList(l) => l.changes,
        other => panic!("expected ConsentChangeList, got {other:?}"),
    }
}

fn begin(account: AccountId, affiliate: &str, purpose: &str, statement_hash: &str) -> Req {
    Req::BeginExport(BeginExport {
        account_id: account.as_bytes().to_vec().into(),
        affiliate: affiliate.into(),
        purpose: purpose.into(),
        statement_hash: hex::decode(statement_hash).expect("hex").into(),
    })
}

fn end(account: AccountId, affiliate: &str, purpose: &str, lease_id: u64) -> Req {
    Req::EndExport(EndExport {
        account_id: account.as_bytes().to_vec().into(),
        affiliate: affiliate.into(),
        purpose: purpose.into(),
        lease_id,
    })
}

async fn granted(exporter: &ExportClient, req: Req) -> ExportGranted {
    match exporter.request(req).await.expect("begin") {
        Resp::ExportGranted(g) => g,
        other => panic!("expected ExportGranted, got {other:?}"),
    }
}

async fn denied(exporter: &ExportClient, req: Req) -> String {
    match exporter.request(req).await.expect("begin") {
        Resp::ExportDenied(d) => d.reason,
        other => panic!("expected ExportDenied, got {other:?}"),
    }
}

/// Whether the relay refused the connection: at the handshake, or (the client's side of a TLS 1.3 handshake ends
/// before the server has checked its certificate) at the first request.
async fn refused(relay: &TestRelay, identity: Option<&ExporterIdentity>) -> bool {
    match relay.exporter(identity).await {
        Err(_) => true,
        Ok(client) => client.request(Req::ConsentChanges(ConsentChanges { after_cursor: 0 })).await.is_err(),
    }
}

#[tokio::test]
async fn only_the_pinned_exporter_certificate_is_accepted() {
    let exporter = ExporterIdentity::generate().expect("identity");
    let stranger = ExporterIdentity::generate().expect("identity");
    let relay = TestRelay::with_export(&exporter).await.expect("relay");
    assert!(refused(&relay, None).await, "no client certificate");
    assert!(refused(&relay, Some(&stranger)).await, "another certificate");
    assert!(!refused(&relay, Some(&exporter)).await, "the pinned one");
    // Off by default.
    assert_eq!(TestRelay::in_process().await.expect("relay").export_addr(), None);
}

#[tokio::test]
async fn consent_changes_carry_the_subject_only_for_grants_in_force() {
    let (relay, exporter) = relay_and_exporter().await;
    let alice = relay.user(ALICE).await.expect("alice");
    let carol = relay.user("+33655555555").await.expect("carol");
    let grant = alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");

    let all = changes(&exporter, 0).await;
    assert!(all.iter().all(|c| c.account_id.as_ref() != carol.messenger.account_id().as_bytes()), "default: nothing");
    assert_eq!(all.len(), 1);
    let c = &all[0];
    assert_eq!(c.account_id.as_ref(), alice.messenger.account_id().as_bytes());
    assert_eq!(hex::encode(&c.statement), grant.statement);
    assert_eq!(hex::encode(&c.signature), grant.signature);
    assert_eq!(c.identity_key.as_ref(), alice.messenger.identity().verifying_key().as_bytes());
    let subject = c.subject.as_ref().expect("a grant in force carries the subject");
    assert_eq!(subject.phone, ALICE);
    assert_eq!(subject.device.as_ref().map(|d| d.model.as_str()), Some("test"));

    alice.messenger.decide_consent("adsco", "advertising", Decision::Withdraw, None).await.expect("withdraw");
    let all = changes(&exporter, 0).await;
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|c| c.subject.is_none()), "no personal data once withdrawn: {all:?}");
    assert!(all[0].cursor < all[1].cursor);
    let after = changes(&exporter, all[0].cursor).await;
    assert_eq!(after.iter().map(|c| c.cursor).collect::<Vec<_>>(), [all[1].cursor], "paged by cursor");
    assert!(changes(&exporter, all[1].cursor).await.is_empty());
}

#[tokio::test]
async fn an_export_lease_needs_the_latest_statement_in_force_for_exactly_that_pair() {
    let (relay, exporter) = relay_and_exporter().await;
    let alice = relay.user(ALICE).await.expect("alice");
    let a = alice.messenger.account_id();
    assert!(!denied(&exporter, begin(a, "adsco", "advertising", &"00".repeat(32))).await.is_empty(), "default deny");
    let first = alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");

    let g = granted(&exporter, begin(a, "adsco", "advertising", &first.receipt_id)).await;
    assert_eq!(g.subject.as_ref().map(|s| s.phone.as_str()), Some(ALICE));
    assert!(g.deadline_ms > relay_proto::now_ms());
    assert!(matches!(exporter.request(end(a, "adsco", "advertising", g.lease_id)).await, Ok(Resp::ExportEnded(_))));
    denied(&exporter, begin(a, "otherco", "advertising", &first.receipt_id)).await;
    denied(&exporter, begin(a, "adsco", "analytics", &first.receipt_id)).await;

    // A newer statement for the pair makes the older one stale, even if both are grants.
    let second = alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    denied(&exporter, begin(a, "adsco", "advertising", &first.receipt_id)).await;
    let g = granted(&exporter, begin(a, "adsco", "advertising", &second.receipt_id)).await;
    exporter.request(end(a, "adsco", "advertising", g.lease_id)).await.expect("end");

    let withdrawal =
        alice.messenger.decide_consent("adsco", "advertising", Decision::Withdraw, None).await.expect("withdraw");
    denied(&exporter, begin(a, "adsco", "advertising", &second.receipt_id)).await;
    denied(&exporter, begin(a, "adsco", "advertising", &withdrawal.receipt_id)).await;

    // Malformed requests are errors, not denials.
    let short = Req::BeginExport(BeginExport { account_id: vec![1, 2, 3].into(), ..Default::default() });
    let err = exporter.request(short).await.expect_err("malformed");
    assert!(err.to_string().contains("INVALID_REQUEST"), "{err}");
    let err = exporter.request(begin(a, "adsco", "astrology", &second.receipt_id)).await.expect_err("purpose");
    assert!(err.to_string().contains("INVALID_REQUEST"), "{err}");
}

#[tokio::test]
async fn an_acknowledged_withdrawal_waits_for_the_export_in_flight() {
    let (relay, exporter) = relay_and_exporter().await;
    let alice = relay.user(ALICE).await.expect("alice");
    let a = alice.messenger.account_id();
    let grant = alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    let lease = granted(&exporter, begin(a, "adsco", "advertising", &grant.receipt_id)).await;

    let mut withdrawal = tokio::spawn(async move {
        let r = alice.messenger.decide_consent("adsco", "advertising", Decision::Withdraw, None).await;
        (alice, r)
    });
    // Wait until the relay has recorded the withdrawal: from then on it is only waiting for the lease.
    crate::bounded("withdrawal recorded", async {
        while changes(&exporter, 0).await.len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut withdrawal).await.is_err(),
        "the withdrawal must not be acknowledged while the export lease is held"
    );
    // Recorded, so a new export of the pair is already refused.
    denied(&exporter, begin(a, "adsco", "advertising", &grant.receipt_id)).await;

    exporter.request(end(a, "adsco", "advertising", lease.lease_id)).await.expect("end");
    let (_alice, result) = crate::bounded("withdrawal acknowledged", withdrawal).await.expect("join");
    let receipt = result.expect("withdrawal acknowledged once the lease is released");
    denied(&exporter, begin(a, "adsco", "advertising", &grant.receipt_id)).await;
    denied(&exporter, begin(a, "adsco", "advertising", &receipt.receipt_id)).await;
}

/// Issue #12, point 4: leases lived only in the relay's memory, so a relay restarted while an export was in flight
/// acknowledged a withdrawal at once while the exporter's request ran on. The lease granted before the restart
/// (standing for a request still being posted to a slow affiliate) must hold the withdrawal until it is released,
/// by its id, after the restart. Ordering only: the relay either acknowledges or logs that it waits.
#[tokio::test]
async fn a_withdrawal_after_a_relay_restart_still_waits_for_the_export_in_flight() {
    let id = ExporterIdentity::generate().expect("exporter identity");
    let port = relay_tests::free_udp_port().expect("port");
    let mut relay = TestRelay::process_with(|c| {
        c.export_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        c.exporter_cert_sha256 = Some(id.fingerprint());
    })
    .await
    .expect("relay");
    let mut alice = relay.user(ALICE).await.expect("alice");
    let a = alice.messenger.account_id();
    let exporter = relay.exporter(Some(&id)).await.expect("exporter connects");
    publish_notices(&exporter).await;
    let grant = alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    let lease = granted(&exporter, begin(a, "adsco", "advertising", &grant.receipt_id)).await;
    assert!(lease.valid_for_ms > 0, "the lease's remaining duration is on the wire");
    exporter.close().await;

    // Killed, not stopped: the lease must have been durable before the grant was answered.
    crate::bounded("kill", relay.kill()).await.expect("kill");
    crate::bounded("restart", relay.restart()).await.expect("restart");
    crate::bounded("reconnect", alice.reconnect()).await.expect("reconnect");
    let mut withdrawal = tokio::spawn(async move {
        let r = alice.messenger.decide_consent("adsco", "advertising", Decision::Withdraw, None).await;
        (alice, r)
    });
    let log = relay.log_path();
    let waits = crate::bounded("the withdrawal acknowledged or waiting for the lease", async {
        loop {
            if withdrawal.is_finished() {
                return false;
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("withdrawal waits for the export leases of its pair") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waits, "the withdrawal was acknowledged while the export leased before the restart was in flight");
    assert!(!withdrawal.is_finished(), "still waiting");

    // The exporter's attempt ends: it releases the lease by the id it was granted before the restart.
    let exporter = crate::bounded("exporter reconnects", relay.exporter(Some(&id))).await.expect("reconnects");
    assert!(matches!(exporter.request(end(a, "adsco", "advertising", lease.lease_id)).await, Ok(Resp::ExportEnded(_))));
    let (_alice, result) = crate::bounded("withdrawal acknowledged", &mut withdrawal).await.expect("join");
    result.expect("withdrawal acknowledged once the lease is released");
    denied(&exporter, begin(a, "adsco", "advertising", &grant.receipt_id)).await;
    exporter.close().await;
    relay.stop().await.expect("stop");
}

#[tokio::test]
async fn the_export_protocol_cannot_reach_a_mailbox() {
    let (relay, exporter) = relay_and_exporter().await;
    let (alice, _) = relay.raw_user(ALICE).await.expect("alice");
    let (bob, bob_id) = relay.raw_user("+33698765432").await.expect("bob");
    let b = bob_id.account_id();
    let queued = alice.send(&b, b"sealed for bob".to_vec().into()).await.expect("send");

    // Every request of the export protocol...
    changes(&exporter, 0).await;
    denied(&exporter, begin(b, "adsco", "advertising", &"00".repeat(32))).await;
    exporter.request(end(b, "adsco", "advertising", 1)).await.expect("end");
    // ...and the messaging protocol's frames, which the export endpoint does not understand.
    for body in [
        client_frame::Body::Send(Send {
            recipient: b.as_bytes().to_vec().into(),
            envelope: b"injected".to_vec().into(),
        }),
        client_frame::Body::Ack(Ack { server_ids: vec![queued.server_id] }),
        client_frame::Body::Subscribe(Subscribe {}),
    ] {
        let reply = exporter.raw(&ClientFrame { body: Some(body) }).await.expect("answered");
        match reply.body {
            // Refused either as a request this protocol does not have or as one that does not decode.
            Some(Resp::Error(e)) => {
                assert!(matches!(e.code(), ErrorCode::InvalidRequest | ErrorCode::MalformedFrame), "{e}")
            }
            other => panic!("a messaging frame must be refused, got {other:?}"),
        }
    }

    // Bob's mailbox holds exactly what Alice sent.
    let mut inbox = bob.subscribe().await.expect("subscribe");
    let mut delivered = Vec::new();
    loop {
        match crate::bounded("delivery", inbox.next()).await.expect("open").expect("event") {
            InboxEvent::Deliver(d) => delivered.push((d.server_id, d.envelope.to_vec())),
            InboxEvent::QueueEmpty => break,
            InboxEvent::Acked(_) => {}
        }
    }
    assert_eq!(delivered, [(queued.server_id, b"sealed for bob".to_vec())]);
}

/// The relay's lease outlasts what the exporter needs left of it when the grant arrives (its HTTP timeout, the
/// bound on the flush before the request and the clock slack), with 10 s to spare for the lease request's own round
/// trip: the numbers `docs/exporter.md` gives ("The withdrawal fence").
#[test]
fn the_relays_lease_covers_the_exporters_margins() {
    use relay_exporter::core::{CLOCK_SLACK, FLUSH_BOUND, HTTP_TIMEOUT, LEASE_NEEDED};
    assert_eq!(LEASE_NEEDED, HTTP_TIMEOUT + FLUSH_BOUND + CLOCK_SLACK);
    assert_eq!(relay_server::fence::LEASE_TTL, Duration::from_secs(30));
    assert!(relay_server::fence::LEASE_TTL >= LEASE_NEEDED + Duration::from_secs(10));
}
