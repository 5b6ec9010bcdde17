//! The export log end to end: every delivered export is logged, published to the relay and shown to its user only,
//! with proofs the client verifies; a new device re-exports exactly the fields that changed for the affiliate; the
//! auditor passes an honest log and catches a tampered one; a tampered relay copy fails the user's verification.

use relay_client::Device;
use relay_exporter::Catalogue;
use relay_exporter::audit::audit;
use relay_exporter::outbox::ExporterStore;
use relay_proto::consent::Decision;
use relay_tests::affiliate::{Sink, TestExporter, test_catalogue};

use crate::WAIT;

#[tokio::test]
async fn exports_are_logged_shown_to_their_user_only_verified_and_audited() {
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco");
    let text = test_catalogue(&adsco, &shieldco);
    let (mut relay, mut exporter) = TestExporter::start(&text).await.expect("relay and exporter");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let bob = relay.user("+33655555555").await.expect("bob");
    let carol = relay.user("+33644444444").await.expect("carol, who grants nothing");

    let grant = alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    bob.messenger.decide_consent("shieldco", "security", Decision::Grant, None).await.expect("grant");
    let first = adsco.wait_events(1, WAIT).await.expect("alice's export").remove(0);
    shieldco.wait_events(1, WAIT).await.expect("bob's export");
    exporter.wait_until(WAIT, |p| p.published >= 2).await.expect("published to the relay");

    // Alice sees her one export, proven, tied to her grant and to the exact body adsco received.
    let mine = alice.messenger.exports(true).await.expect("alice's exports");
    assert!(mine.problems.is_empty(), "{:?}", mine.problems);
    assert_eq!(mine.log_key.as_deref(), Some(exporter.log_key()));
    assert_eq!(mine.entries.len(), 1, "{mine:?}");
    let e = &mine.entries[0];
    assert_eq!((e.affiliate.as_str(), e.purpose.as_str()), ("adsco", "advertising"));
    assert_eq!(e.fields, ["phone_pseudonym", "device_model"]);
    assert_eq!(format!("msg_{}", e.export_id), first.id);
    assert_eq!(e.payload_hash, hex::encode(relay_proto::auth::sha256(first.raw.as_bytes())));
    assert_eq!(e.consent, grant.receipt_id);
    assert_eq!(e.problem, None);
    let alices_first = e.index;

    // Bob sees only his; Carol sees nothing; no request can name another account.
    let bobs = bob.messenger.exports(true).await.expect("bob's exports");
    assert!(bobs.problems.is_empty(), "{:?}", bobs.problems);
    assert_eq!(bobs.entries.len(), 1);
    assert_eq!(bobs.entries[0].affiliate, "shieldco");
    assert_ne!(bobs.entries[0].export_id, e.export_id);
    assert!(carol.messenger.exports(true).await.expect("carol's exports").entries.is_empty());

    // A new app version is not among adsco's fields: nothing is sent. A new model is: one new export, new id.
    let device =
        |model: &str, version: &str| Device { model: model.into(), os: "linux".into(), app_version: version.into() };
    alice.messenger.update_device(device("test", "2.0")).await.expect("new version");
    exporter.wait_passes(3, WAIT).await.expect("passes");
    assert_eq!(adsco.events().len(), 1, "{:?}", adsco.events());
    alice.messenger.update_device(device("Pixel 10", "2.0")).await.expect("new phone");
    let events = adsco.wait_events(2, WAIT).await.expect("re-export");
    let second = events.iter().find(|e| e.id != first.id).expect("a new webhook id");
    assert_eq!(second.body["data"]["device_model"], "Pixel 10");
    assert_eq!(second.body["data"]["phone_pseudonym"], first.body["data"]["phone_pseudonym"]);
    assert!(second.signature_ok);
    exporter.wait_until(WAIT, |p| p.published >= 3).await.expect("published");
    exporter.wait_passes(2, WAIT).await.expect("passes");
    assert_eq!(shieldco.events().len(), 1, "bob's affiliate heard nothing of alice");

    // The head Alice pinned grows consistently.
    let mine = alice.messenger.exports(true).await.expect("alice's exports again");
    assert!(mine.problems.is_empty(), "{:?}", mine.problems);
    assert_eq!(mine.entries.len(), 2);
    assert_eq!(mine.tree_size, 3);

    // The auditor passes the honest log, then catches an entry rewritten after the fact.
    exporter.stop().await.expect("stop the exporter");
    let catalogue = Catalogue::parse(&text).expect("catalogue");
    let key = relay_proto::merkle::log_key_from_wire(&hex::decode(exporter.log_key()).expect("hex")).expect("key");
    {
        let store = ExporterStore::open(&exporter.data_dir().join("db")).expect("exporter store");
        let report = audit(&store, &key, Some(&catalogue)).expect("audit");
        assert!(report.passed(), "{:?}", report.problems);
        assert_eq!((report.entries, report.signed_size), (3, 3));
        // The log holds no personal data: no phone number, no device model, in any record.
        for (_, record) in store.log_records(0, usize::MAX).expect("records") {
            let text = serde_json::to_string(&record).expect("json");
            let leaf = &record.leaf;
            for secret in ["612345678", "655555555", "Pixel"] {
                assert!(!text.contains(secret) && !String::from_utf8_lossy(leaf).contains(secret), "{text}");
            }
        }
        let (index, mut record) = store.log_records(0, 1).expect("records").remove(0);
        let mut leaf = relay_proto::merkle::ExportLeaf::decode(&record.leaf).expect("leaf");
        leaf.fields.retain(|f| f != "phone_pseudonym");
        record.leaf = leaf.encode().expect("leaf");
        store.replace_log_record(index, &record).expect("tamper");
        let report = audit(&store, &key, Some(&catalogue)).expect("audit");
        let problems = report.problems.join("\n");
        assert!(problems.contains("entry 0: fields"), "{problems}");
        assert!(problems.contains("head of size 3: root is not the root"), "{problems}");
    }

    // The relay's copy altered at rest: Alice's verification fails on the altered entry.
    relay.stop().await.expect("stop the relay");
    {
        // The stopped relay's last tasks may hold sled's lock a moment longer.
        let deadline = std::time::Instant::now() + WAIT;
        let db = loop {
            match sled::open(relay.data_dir().join("store")) {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "store still locked");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("relay store still locked: {e}"),
            }
        };
        let tree = db.open_tree("export_log").expect("tree");
        let key = [&[1u8][..], &alices_first.to_be_bytes()].concat();
        let mut value = tree.get(&key).expect("get").expect("alice's first entry").to_vec();
        let last = value.len() - 1;
        value[last] ^= 1; // the leaf's time
        tree.insert(&key, value).expect("tamper");
        db.flush().expect("flush");
    }
    relay.restart().await.expect("restart");
    alice.reconnect().await.expect("reconnect");
    let tampered = alice.messenger.exports(true).await.expect("listing still answers");
    assert!(!tampered.problems.is_empty(), "{tampered:?}");
    let altered = tampered.entries.iter().find(|e| e.index == alices_first).expect("the altered entry");
    assert!(altered.problem.as_deref().is_some_and(|p| p.contains("inclusion proof")), "{tampered:?}");
    assert_ne!(altered.time_ms, mine.entries[0].time_ms, "the altered time is what the relay serves");
}
