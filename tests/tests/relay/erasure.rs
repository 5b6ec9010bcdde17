//! `DeleteAccount` end to end (issue #12, point 6): the signed request is bound to its connection; the relay removes
//! the directory entry, keys and mailbox and frees the number (for a new identity only); the exporter sends every
//! affiliate that received data an `account.erased` notice naming the user as it received them, logs it, and keeps
//! no phone number of the account in its data dir once the notices are delivered.

use bytes::Bytes;
use relay_client::{Connection, Messenger};
use relay_exporter::outbox::ExporterStore;
use relay_proto::ErrorCode;
use relay_proto::auth::delete_transcript;
use relay_proto::consent::Decision;
use relay_proto::wire::{DeleteAccount, client_frame::Body};
use relay_tests::affiliate::{Sink, TestExporter, catalogue};
use relay_tests::{TestRelay, files_containing};

use crate::{WAIT, bounded};

const ALICE: &str = "+33612345678";
const BOB: &str = "+33698765432";

fn fp(relay: &TestRelay) -> [u8; 32] {
    relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fingerprint")
}

fn delete_frame(conn: &Connection, identity: &relay_client::Identity) -> Body {
    let ekm = relay_quic::ekm(conn.quic()).expect("keying material");
    Body::DeleteAccount(DeleteAccount {
        signature: Bytes::copy_from_slice(&identity.sign(&delete_transcript(&ekm, &identity.account_id()))),
    })
}

/// A `DeleteAccount` signature made for one connection, replayed on another connection authenticated as the same
/// account (a relay operator or anyone who saw it), erases nothing; without authentication it is refused too. The
/// genuine request erases the account and the relay closes that connection.
#[tokio::test]
async fn a_delete_request_replayed_on_another_connection_is_refused() {
    let relay = TestRelay::in_process().await.expect("relay");
    let (first, alice) = relay.raw_user(ALICE).await.expect("alice");
    let second = Connection::connect(relay.addr(), fp(&relay)).await.expect("connect");
    second.authenticate(&alice).await.expect("auth");
    let anonymous = Connection::connect(relay.addr(), fp(&relay)).await.expect("connect");
    let signed_on_first = delete_frame(&first, &alice);

    let replayed = bounded("replay", second.request(signed_on_first.clone())).await.expect_err("replayed");
    assert_eq!(replayed.code(), Some(ErrorCode::BadSignature), "{replayed}");
    let unauthenticated = bounded("anonymous", anonymous.request(signed_on_first.clone())).await.expect_err("anon");
    assert_eq!(unauthenticated.code(), Some(ErrorCode::Unauthenticated), "{unauthenticated}");
    let (bob, _) = relay.raw_user(BOB).await.expect("bob");
    assert!(bob.lookup(ALICE).await.is_ok(), "alice still exists");

    bounded("delete", first.request(signed_on_first)).await.expect("deleted");
    let gone = bob.lookup(ALICE).await.expect_err("alice is gone");
    assert_eq!(gone.code(), Some(ErrorCode::NotFound), "{gone}");
    assert!(bounded("after", first.request(Body::ListConsent(Default::default()))).await.is_err(), "closed");
    assert!(bounded("second", second.authenticate(&alice)).await.is_err(), "the other connection is closed too");
    let third = Connection::connect(relay.addr(), fp(&relay)).await.expect("connect");
    let again = bounded("auth", third.authenticate(&alice)).await.expect_err("no such account");
    assert_eq!(again.code(), Some(ErrorCode::NotFound), "{again}");
}

/// An erased account is served nowhere: its other connections, authenticated before the erasure, are closed with
/// it. Before, a second connection kept reading the account's consent history and sending as the account after
/// `AccountDeleted` was answered on the first.
#[tokio::test]
async fn an_erasure_closes_every_connection_of_the_account() {
    let relay = TestRelay::in_process().await.expect("relay");
    let (first, alice) = relay.raw_user(ALICE).await.expect("alice");
    let second = Connection::connect(relay.addr(), fp(&relay)).await.expect("connect");
    second.authenticate(&alice).await.expect("auth");
    let (bob, bob_id) = relay.raw_user(BOB).await.expect("bob");
    bounded("before", second.request(Body::ListConsent(Default::default()))).await.expect("served before");

    bounded("delete", first.request(delete_frame(&first, &alice))).await.expect("deleted");
    let listed = bounded("list", second.request(Body::ListConsent(Default::default()))).await;
    assert!(listed.is_err(), "an erased account's other connection was still served: {listed:?}");
    let sent = bounded("send", second.send(&bob_id.account_id(), Bytes::from_static(b"from the grave"))).await;
    assert!(sent.is_err(), "an erased account's other connection could still send");
    // Other accounts are untouched.
    assert!(bob.lookup(BOB).await.is_ok(), "bob is still served");
}

/// After an erasure the number is free for a new identity, the erased identity cannot come back (its statements
/// stay on the relay as evidence and must never count again), and what was queued for the account is gone: the new
/// holder of the number receives nothing sent to the old one.
#[tokio::test]
async fn an_erased_number_can_be_registered_again_by_a_new_identity_only() {
    let relay = TestRelay::in_process().await.expect("relay");
    let alice = relay.user(ALICE).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");
    bob.messenger.send_text(ALICE, "queued for the old account").await.expect("queued");
    let (old_home, old_dir) = (alice.home.clone(), alice.home_dir().to_path_buf());
    let (messenger, _guard) = alice.split();
    bounded("delete", messenger.delete_account()).await.expect("deleted");
    assert!(old_dir.exists(), "the library leaves the home to the caller");

    let err = bounded("old identity", Messenger::register(&old_home, &relay.addr().to_string(), relay.fingerprint()))
        .await
        .err()
        .expect("the erased identity may not register again");
    assert_eq!(err.code(), Some(ErrorCode::ConsentRejected), "{err}");

    let (new_conn, _) = relay.raw_user(ALICE).await.expect("the number registers again, under a new identity");
    let got = bounded("drain", relay_tests::drain_mailbox(&new_conn)).await.expect("mailbox");
    assert!(got.is_empty(), "the old account's envelopes went with it: {} left", got.len());
}

/// The exporter side: every affiliate that received data gets an `account.erased` notice naming the user as it
/// received them (shieldco got the phone, adsco a pseudonym), nothing else leaves, and once the notices are
/// delivered no file of the exporter's data dir holds the phone number.
#[tokio::test]
async fn affiliates_are_told_and_the_exporter_keeps_no_phone_number_of_an_erased_account() {
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco sink");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco sink");
    // As the test catalogue, but shieldco receives the raw phone number for security.
    let catalogue = catalogue(&[
        ("adsco", &adsco, &[("advertising", &["phone_pseudonym", "device_model"])]),
        ("shieldco", &shieldco, &[("security", &["phone", "os"])]),
    ]);
    let (relay, mut exporter) = TestExporter::start(&catalogue).await.expect("relay and exporter");
    let alice = relay.user(ALICE).await.expect("alice");
    alice.messenger.decide_consent("shieldco", "security", Decision::Grant, None).await.expect("grant");
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    let sent = shieldco.wait_events(1, WAIT).await.expect("shieldco export").remove(0);
    assert_eq!(sent.body["data"]["phone"], ALICE);
    let export = adsco.wait_events(1, WAIT).await.expect("adsco export").remove(0);
    let pseudonym = export.body["data"]["phone_pseudonym"].clone();
    let digits = &ALICE.as_bytes()[1..];
    exporter.wait_until(WAIT, |p| p.outbox == 0).await.expect("delivered");
    assert!(!files_containing(&exporter.data_dir(), digits).expect("scan").is_empty(), "delivered record kept");

    let (messenger, _guard) = alice.split();
    bounded("delete", messenger.delete_account()).await.expect("deleted");
    let erased = |events: &[relay_tests::affiliate::Attempt]| {
        events.iter().any(|e| e.status < 300 && e.body["type"] == "account.erased")
    };
    let notice = |events: Vec<relay_tests::affiliate::Attempt>| {
        events.into_iter().find(|e| e.body["type"] == "account.erased").expect("the erasure notice")
    };
    let to_shieldco = notice(shieldco.wait_until(WAIT, erased).await.expect("erasure notice"));
    let to_adsco = notice(adsco.wait_until(WAIT, erased).await.expect("erasure notice"));
    for (notice, data) in [
        (&to_shieldco, serde_json::json!({"purpose": "security", "phone": [ALICE]})),
        (&to_adsco, serde_json::json!({"purpose": "advertising", "phone_pseudonym": [pseudonym]})),
    ] {
        assert!(notice.signature_ok);
        assert_eq!(notice.body["type"], "account.erased");
        assert_eq!(notice.body["data"], data);
    }
    exporter.wait_until(WAIT, |p| p.outbox == 0 && p.logged >= 4).await.expect("notices logged");
    exporter.wait_passes(2, WAIT).await.expect("passes");
    for sink in [&adsco, &shieldco] {
        let mut kinds: Vec<_> =
            sink.events().iter().map(|e| e.body["type"].as_str().unwrap_or("").to_owned()).collect();
        kinds.sort();
        assert_eq!(kinds, ["account.erased", "user.metadata.exported"], "nothing else left");
    }
    exporter.stop().await.expect("stop");
    let left = files_containing(&exporter.data_dir(), digits).expect("scan");
    assert!(left.is_empty(), "the erased account's phone number is still in {left:?}");
    // The auditor accepts the erasure notices: each follows from the account's own signed request.
    let key = relay_proto::merkle::log_key_from_wire(&hex::decode(exporter.log_key()).expect("hex")).expect("key");
    let store = ExporterStore::open(&exporter.data_dir().join("db")).expect("exporter store");
    let report = relay_exporter::audit::audit(&store, &key, None).expect("audit");
    assert!(report.passed(), "{:?}", report.problems);
    assert_eq!(report.entries, 4, "two exports, two erasure notices");
    // The bodies kept for a regulator (sealed, for the notice's retention) went with the account.
    let bodies = relay_exporter::vault::Vault::open_existing(
        store.bodies_tree().expect("bodies"),
        &exporter.data_dir().join("bodies.key"),
    )
    .expect("vault")
    .expect("the vault exists");
    assert_eq!(bodies.len(), 0, "bodies of the erased account are still kept");
    drop(relay);
}

/// `relay account delete` erases only once the account's own phone number is typed (anything else exits 1 with
/// nothing deleted), or with `--yes`; then it exits 0, the relay no longer knows the number and the home is gone.
#[tokio::test]
async fn the_cli_deletes_only_after_the_number_is_typed_and_removes_the_home() {
    let relay = TestRelay::in_process().await.expect("relay");
    let alice = relay.user(ALICE).await.expect("alice");
    let (bob, _) = relay.raw_user(BOB).await.expect("bob");
    let home = alice.home_dir().to_owned();
    let (messenger, _guard) = alice.split();
    messenger.close().await;
    let run = |args: &'static [&'static str], typed: &'static str| {
        let home = home.clone();
        async move {
            crate::bounded("relay account delete", relay_tests::relay_cli_typing(&home, args, typed))
                .await
                .expect("run relay")
        }
    };
    for typed in ["yes\n", "", "+33612345679\n"] {
        let out = run(&["account", "delete"], typed).await;
        assert_eq!(out.status.code(), Some(1), "typed {typed:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not deleted"), "typed {typed:?}");
        assert!(bob.lookup(ALICE).await.is_ok(), "typed {typed:?}: alice still exists");
        assert!(home.join("identity.json").exists());
    }
    let out = run(&["account", "delete"], "+33612345678\n").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(bob.lookup(ALICE).await.expect_err("erased").code(), Some(ErrorCode::NotFound));
    assert!(!home.exists(), "the home is removed");
    let out = run(&["account", "delete", "--yes"], "").await;
    assert_eq!(out.status.code(), Some(1), "nothing left to delete");
}
