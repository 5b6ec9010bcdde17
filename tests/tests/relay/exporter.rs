//! The `relay-exporter` logic end to end: a real relay with its export interface, the exporter in-process, and
//! affiliates as HTTP sinks. Default deny, exactly the catalogue's fields per pair, signatures, pseudonyms that
//! differ per affiliate, retries until the affiliate is back (each webhook id processed once), and the withdrawal
//! fence: a queued export never leaves after the withdrawal is acknowledged, and an affiliate that received data
//! gets a `consent.withdrawn` notice naming the user as it received them (here, by the pseudonym only).

use relay_exporter::ids::WebhookId;
use relay_proto::consent::{ConsentStatement, Decision};
use relay_tests::TestRelay;
use relay_tests::affiliate::{Sink, TestExporter, test_catalogue};
use serde_json::Value;

use crate::WAIT;

const ALICE: &str = "+33612345678";

struct Setup {
    relay: TestRelay,
    exporter: TestExporter,
    adsco: Sink,
    shieldco: Sink,
}

async fn setup() -> Setup {
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco sink");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco sink");
    let catalogue = test_catalogue(&adsco, &shieldco);
    let (relay, exporter) = TestExporter::start(&catalogue).await.expect("relay and exporter");
    Setup { relay, exporter, adsco, shieldco }
}

fn statement_hash(statement_hex: &str) -> [u8; 32] {
    ConsentStatement::decode_stored(&hex::decode(statement_hex).expect("hex")).expect("statement").hash()
}

fn data_keys(body: &Value) -> Vec<String> {
    body["data"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

#[tokio::test]
async fn nothing_leaves_without_a_grant_the_catalogue_allows() {
    let s = setup().await;
    let _alice = s.relay.user(ALICE).await.expect("alice, who never grants");
    let bob = s.relay.user("+33655555555").await.expect("bob");
    // Pairs the catalogue does not allow have no notice: a grant for them cannot even be made.
    for (affiliate, purpose) in [("shieldco", "advertising"), ("adsco", "security")] {
        let err = bob.messenger.decide_consent(affiliate, purpose, Decision::Grant, None).await.expect_err("no notice");
        assert!(err.to_string().contains("no notice is published"), "{err}");
    }
    // Nor signed blind, under a notice hash of the user's choosing.
    let bob_id = bob.home.identity().expect("keys");
    let blind = ConsentStatement {
        account: bob_id.account_id(),
        affiliate: "shieldco".into(),
        purpose: relay_proto::consent::Purpose::Advertising,
        decision: Decision::Grant,
        notice_hash: [7; 32],
        sequence: 1,
        time_ms: relay_proto::now_ms(),
        expires_ms: None,
    };
    let refused = bob.messenger.connection().put_consent(blind.encode(), bob_id.sign(&blind.signed_bytes())).await;
    assert_eq!(refused.expect_err("blind grant").code(), Some(relay_proto::ErrorCode::ConsentRejected));
    let p = s.exporter.wait_passes(2, WAIT).await.expect("passes");
    assert_eq!(p.outbox, 0, "nothing queued");
    assert_eq!(p.delivered, 0);
    assert!(s.adsco.attempts().is_empty(), "{:?}", s.adsco.attempts());
    assert!(s.shieldco.attempts().is_empty(), "{:?}", s.shieldco.attempts());
}

#[tokio::test]
async fn a_grant_delivers_exactly_the_catalogue_fields_signed_and_pseudonymised_per_affiliate() {
    let s = setup().await;
    let alice = s.relay.user(ALICE).await.expect("alice");
    let ads = alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    let sec = alice.messenger.decide_consent("shieldco", "security", Decision::Grant, None).await.expect("grant");
    alice.messenger.decide_consent("shieldco", "advertising", Decision::Grant, None).await.expect_err("no notice");

    let adsco = s.adsco.wait_events(1, WAIT).await.expect("adsco export");
    let shieldco = s.shieldco.wait_events(1, WAIT).await.expect("shieldco export");
    s.exporter.wait_until(WAIT, |p| p.changes >= 2 && p.outbox == 0).await.expect("all processed");
    s.exporter.wait_passes(2, WAIT).await.expect("passes");

    let a = &adsco[0];
    assert_eq!(s.adsco.attempts().len(), 1, "one request, no duplicate");
    assert_eq!(s.adsco.events().len(), 1, "nothing for (adsco, analytics)");
    assert!(a.signature_ok, "adsco verifies the signature");
    let hash = statement_hash(&ads.statement);
    assert!(a.id.starts_with("msg_") && a.id.len() == 36, "{}", a.id);
    assert_eq!(a.body["type"], "user.metadata.exported");
    assert!(a.body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{}", a.raw);
    assert_eq!(data_keys(&a.body), ["consent", "device_model", "phone_pseudonym", "purpose"]);
    assert_eq!(a.body["data"]["purpose"], "advertising");
    assert_eq!(a.body["data"]["consent"], hex::encode(hash));
    assert_eq!(a.body["data"]["device_model"], "test");

    let b = &shieldco[0];
    assert_eq!(s.shieldco.attempts().len(), 1, "nothing for (shieldco, advertising)");
    assert!(b.signature_ok, "shieldco verifies the signature");
    assert_eq!(data_keys(&b.body), ["consent", "os", "phone_pseudonym", "purpose"]);
    assert_eq!(b.body["data"]["purpose"], "security");
    assert_eq!(b.body["data"]["consent"], hex::encode(statement_hash(&sec.statement)));

    let (pa, pb) = (a.body["data"]["phone_pseudonym"].as_str(), b.body["data"]["phone_pseudonym"].as_str());
    assert!(pa.is_some_and(|p| p.len() == 64), "{pa:?}");
    assert_ne!(pa, pb, "pseudonyms are unlinkable across affiliates");
    for raw in [&a.raw, &b.raw] {
        assert!(!raw.contains("612345678"), "no raw phone number: {raw}");
    }
}

#[tokio::test]
async fn an_affiliate_that_is_down_gets_the_export_once_it_is_back() {
    let s = setup().await;
    s.adsco.set_failing(true);
    let alice = s.relay.user(ALICE).await.expect("alice");
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    s.adsco.wait_until(WAIT, |a| !a.is_empty()).await.expect("a first, failed attempt");
    assert_eq!(s.exporter.progress().delivered, 0);
    s.adsco.set_failing(false);
    let events = s.adsco.wait_events(1, WAIT).await.expect("delivered after the retry");
    s.exporter.wait_until(WAIT, |p| p.outbox == 0).await.expect("outbox empty");
    s.exporter.wait_passes(2, WAIT).await.expect("passes");

    let attempts = s.adsco.attempts();
    assert!(attempts.len() >= 2, "{attempts:?}");
    assert_eq!(attempts[0].status, 503);
    assert!(attempts.iter().all(|a| a.id == events[0].id && a.signature_ok), "same webhook id on every retry");
    assert!(attempts.iter().all(|a| a.raw == events[0].raw), "same body on every retry");
    assert_eq!(attempts.iter().filter(|a| a.status == 200).count(), 1, "removed after the 2xx");
    assert_eq!(s.adsco.events().len(), 1);
}

#[tokio::test]
async fn a_withdrawal_stops_a_queued_export_for_good() {
    let s = setup().await;
    s.adsco.set_failing(true);
    let alice = s.relay.user(ALICE).await.expect("alice");
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    s.adsco.wait_until(WAIT, |a| !a.is_empty()).await.expect("queued and failing");
    alice.messenger.decide_consent("adsco", "advertising", Decision::Withdraw, None).await.expect("withdraw");
    // Acknowledged: from now on nothing of that export may leave, even with the affiliate back.
    let failed = s.adsco.attempts().len();
    s.adsco.set_failing(false);
    s.exporter.wait_until(WAIT, |p| p.changes >= 2 && p.outbox == 0).await.expect("outbox gone through");
    s.exporter.wait_passes(2, WAIT).await.expect("passes");
    let attempts = s.adsco.attempts();
    assert_eq!(attempts.len(), failed, "no attempt after the withdrawal was acknowledged: {attempts:?}");
    assert!(attempts.iter().all(|a| a.status == 503));
    assert!(s.adsco.events().is_empty(), "never delivered, so no withdrawal notice either");
    assert_eq!(s.exporter.progress().delivered, 0);
}

#[tokio::test]
async fn an_affiliate_that_received_data_is_told_of_the_withdrawal_by_pseudonym() {
    let s = setup().await;
    let alice = s.relay.user(ALICE).await.expect("alice");
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    let export = s.adsco.wait_events(1, WAIT).await.expect("export").remove(0);
    let withdrawal =
        alice.messenger.decide_consent("adsco", "advertising", Decision::Withdraw, None).await.expect("withdraw");
    let events = s.adsco.wait_events(2, WAIT).await.expect("withdrawal notice");
    let notice = events.iter().find(|e| e.id != export.id).expect("the notice");
    assert!(notice.signature_ok);
    assert_eq!(notice.id, WebhookId::notice(&statement_hash(&withdrawal.statement), "adsco").to_string());
    assert_eq!(notice.body["type"], "consent.withdrawn");
    assert_eq!(data_keys(&notice.body), ["phone_pseudonym", "purpose"]);
    assert_eq!(notice.body["data"]["purpose"], "advertising");
    assert_eq!(notice.body["data"]["phone_pseudonym"], serde_json::json!([export.body["data"]["phone_pseudonym"]]));
    assert!(!notice.raw.contains("612345678"), "{}", notice.raw);
    s.exporter.wait_until(WAIT, |p| p.outbox == 0).await.expect("outbox empty");
    s.exporter.wait_passes(2, WAIT).await.expect("passes");
    assert_eq!(s.adsco.events().len(), 2, "one export, one notice");
    assert!(s.shieldco.attempts().is_empty());
}

#[tokio::test]
async fn an_expired_grant_stops_a_queued_export() {
    let s = setup().await;
    s.adsco.set_failing(true);
    let alice = s.relay.user(ALICE).await.expect("alice");
    // A grant that lapses 1.5 s from now (the CLI counts in days; the protocol in milliseconds).
    let now = relay_proto::now_ms();
    let grant = ConsentStatement {
        account: alice.messenger.account_id(),
        affiliate: "adsco".into(),
        purpose: relay_proto::consent::Purpose::Advertising,
        decision: Decision::Grant,
        notice_hash: alice.messenger.notice("adsco", "advertising").await.expect("the notice").hash,
        sequence: 1,
        time_ms: now,
        expires_ms: Some(now + 1_500),
    };
    let signature = alice.messenger.identity().sign(&grant.signed_bytes());
    alice.messenger.connection().put_consent(grant.encode(), signature).await.expect("grant");
    s.adsco.wait_until(WAIT, |a| !a.is_empty()).await.expect("a first, failed attempt");
    // Wait for the clock, not for the exporter: the grant must have lapsed before the affiliate comes back.
    while relay_proto::now_ms() <= now + 1_500 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    s.adsco.set_failing(false);
    s.exporter.wait_until(WAIT, |p| p.outbox == 0).await.expect("the lapsed export is dropped");
    s.exporter.wait_passes(2, WAIT).await.expect("passes");
    assert!(s.adsco.events().is_empty(), "nothing delivered after the expiry: {:?}", s.adsco.attempts());
    assert!(s.adsco.attempts().iter().all(|a| a.status == 503));
    assert_eq!(s.exporter.progress().logged, 0, "nothing logged");
}

#[tokio::test]
async fn https_affiliates_are_reached_only_over_a_verified_connection() {
    let trusted = Sink::start_tls(b"adsco webhook key 0123456789").await.expect("https sink");
    let untrusted = Sink::start_tls(b"shieldco webhook key 98765432").await.expect("https sink with an unknown CA");
    let catalogue = test_catalogue(&trusted, &untrusted);
    assert!(trusted.url().starts_with("https://127.0.0.1:"), "{}", trusted.url());
    let (relay, exporter) =
        TestExporter::start_trusting(&catalogue, trusted.ca_pem()).await.expect("relay and exporter");
    let alice = relay.user(ALICE).await.expect("alice");
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    alice.messenger.decide_consent("shieldco", "security", Decision::Grant, None).await.expect("grant");

    let event = trusted.wait_events(1, WAIT).await.expect("delivered over https").remove(0);
    assert!(event.signature_ok);
    assert_eq!(data_keys(&event.body), ["consent", "device_model", "phone_pseudonym", "purpose"]);
    // The affiliate whose certificate no trusted CA signed never gets a request: the handshake fails, the export
    // stays queued for a retry.
    exporter.wait_until(WAIT, |p| p.delivered == 1 && p.changes >= 2).await.expect("progress");
    exporter.wait_passes(3, WAIT).await.expect("passes");
    assert!(untrusted.attempts().is_empty(), "{:?}", untrusted.attempts());
    assert_eq!(exporter.progress().outbox, 1, "the unverified affiliate's export waits in the outbox");
}

/// The exporter's data directory holds its keys (pseudonyms, log, TLS) and the outbox of personal data: 0700, and
/// every file in it 0600.
#[tokio::test]
async fn the_exporter_data_dir_is_private() {
    let s = setup().await;
    let modes = relay_tests::private_tree(&s.exporter.data_dir()).expect("walk the data dir");
    assert!(modes.loose.is_empty(), "readable by others: {:?}", modes.loose);
    assert!(modes.files >= 4, "the keys and the store were checked");
    drop(s.relay);
}

/// An objection to a purpose: the affiliate that received data is told (the client withdraws its grant first), and
/// nothing more leaves for the purpose — not a device change, not a grant a relay might let through — until lifted.
#[tokio::test]
async fn an_objection_tells_the_affiliate_and_stops_the_purpose() {
    let s = setup().await;
    let mut alice = s.relay.user(ALICE).await.expect("alice");
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    s.adsco.wait_events(1, WAIT).await.expect("export");
    alice.messenger.object_to_purpose("advertising", false).await.expect("object");
    let events = s.adsco.wait_events(2, WAIT).await.expect("withdrawal notice");
    assert!(events.iter().any(|e| e.body["type"] == "consent.withdrawn"), "{events:?}");
    let device =
        relay_client::home::Device { model: "Pixel 10".into(), os: "Android 17".into(), app_version: "2.0".into() };
    alice.messenger.update_device(device).await.expect("new device");
    s.exporter.wait_until(WAIT, |p| p.outbox == 0).await.expect("settled");
    s.exporter.wait_passes(3, WAIT).await.expect("passes");
    assert_eq!(s.adsco.events().len(), 2, "nothing after the objection: {:?}", s.adsco.events());
}

/// Issue #12, point 4, end to end: relayd killed and restarted while the exporter's request was at a slow affiliate.
/// Leases lived in the relay's memory, so a withdrawal recorded after the restart was acknowledged at once while the
/// export was still going out. Now the relay still counts the lease after its restart, and the withdrawal is
/// acknowledged only once the affiliate has answered that request and the exporter, on its new connection, has
/// released the lease. Ordering only: the affiliate holds its answer until the relay says the withdrawal waits.
#[tokio::test]
async fn a_relay_restart_does_not_let_a_withdrawal_overtake_an_export_in_flight() {
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco sink");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco sink");
    let (mut relay, _exporter) =
        TestExporter::start_with_relay_process(&test_catalogue(&adsco, &shieldco)).await.expect("relay and exporter");
    let mut alice = relay.user(ALICE).await.expect("alice");
    adsco.hold(true);
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    adsco.wait_arrivals(1, WAIT).await.expect("the export reaches the affiliate");

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
            if std::fs::read_to_string(&log).unwrap_or_default().contains("withdrawal waits for the export leases") {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let answered = |s: &Sink| s.attempts().iter().any(|a| a.body["type"] == "user.metadata.exported");
    assert!(waits && !answered(&adsco), "the withdrawal was acknowledged while the export was at the affiliate");

    adsco.hold(false);
    let (_alice, result) = crate::bounded("withdrawal acknowledged", &mut withdrawal).await.expect("join");
    result.expect("withdrawal acknowledged");
    assert!(answered(&adsco), "acknowledged only after the affiliate answered the export");
    relay.stop().await.expect("stop");
}

/// An affiliate that never takes a withdrawal notice: after the retry period (`--notice-retry-for`, 1 s here) the
/// notice is abandoned, `relay_exporter_abandoned_notices_total` on the exporter's metrics port counts it, and an
/// error line names the webhook and the affiliate, never the user.
#[tokio::test]
async fn an_abandoned_withdrawal_notice_is_counted_on_the_metrics_port_and_logged_without_personal_data() {
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco sink");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco sink");
    let mut exporter = relay_tests::affiliate::ExporterProcess::new(&test_catalogue(&adsco, &shieldco), 20)
        .await
        .expect("exporter identity");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    exporter.add_args(&["--notice-retry-for", "1s", "--metrics-listen", &metrics.to_string()]);
    let relay = TestRelay::with_export_for(exporter.fingerprint().to_owned()).await.expect("relay");
    exporter.start(relay.export_addr().expect("export interface"), relay.fingerprint()).await.expect("exporter");
    relay.wait_for_notices(WAIT).await.expect("notices");
    let alice = relay.user(ALICE).await.expect("alice");
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    adsco.wait_events(1, WAIT).await.expect("the export");
    adsco.set_failing(true);
    alice.messenger.decide_consent("adsco", "advertising", Decision::Withdraw, None).await.expect("withdraw");

    let abandoned = crate::bounded("the notice abandoned", async {
        loop {
            let (status, body) = crate::metrics::get(metrics, "/metrics").await;
            assert!(status.contains("200"), "{status}");
            if crate::metrics::sample(&body, "relay_exporter_abandoned_notices_total") >= 1.0 {
                return body;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(crate::metrics::sample(&abandoned, "relay_exporter_delivered_total"), 1.0, "{abandoned}");
    assert!(adsco.attempts().iter().any(|a| a.status == 503 && a.body["type"] == "consent.withdrawn"));
    exporter.stop(WAIT).await.expect("stop");
    let log = std::fs::read_to_string(exporter.log_path()).expect("the exporter's log");
    assert!(log.contains("ERROR") && log.contains("abandoned"), "{log}");
    assert!(!log.contains("612345678"), "no phone number in the exporter's log");
}
