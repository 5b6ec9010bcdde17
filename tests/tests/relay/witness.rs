//! Witnesses (issue #12, point 2): a `relay-witness` process cosigns the exporter's tree heads only while the log
//! grows. A holder of the exporter's `log.key` who (a) drops the newest entry, (b) deletes entry 0 and re-signs every
//! head, or (c) alters an entry's payload hash and re-signs, gets no cosignature for the rewritten log, before or after
//! the witness restarts; `relay-audit` passes each rewrite without a witness (as it always did) and fails it with
//! the witness configured; a user's `relay exports --verify --witness-key` fails on a relay serving the rewritten
//! log. A witness that is down holds nothing up, and a witness that holds another size than the exporter believes is
//! caught up by one retry.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use relay_client::exports::ExportsReport;
use relay_client::witnessed::Witnesses;
use relay_exporter::core::LogRecord;
use relay_exporter::ids::WebhookId;
use relay_exporter::outbox::ExporterStore;
use relay_exporter::witness_link::{self, WitnessSpec};
use relay_proto::consent::Decision;
use relay_proto::merkle::{ExportLeaf, MerkleLog, TreeHead};
use relay_tests::affiliate::{ExporterProcess, Sink, test_catalogue};
use relay_tests::witness::WitnessProcess;
use relay_tests::{TestRelay, TestUser};

use crate::{WAIT, bounded};

/// The user's verified exports once the relay serves a head of at least `size` (polled, within the bound).
async fn verified_at(user: &TestUser, size: u64) -> ExportsReport {
    bounded("the log published to the relay", async {
        loop {
            let report = user.messenger.exports(true).await.expect("exports");
            if report.tree_size >= size {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Like [`verified_at`], until verification passes (a cosignature obtained after a retry comes with a later pass).
async fn verified_clean(user: &TestUser, size: u64) -> ExportsReport {
    bounded("a verified, witnessed head", async {
        loop {
            let report = user.messenger.exports(true).await.expect("exports");
            if report.tree_size >= size && report.problems.is_empty() {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// `relay-audit` on the exporter data dir `data` with `extra` arguments.
async fn audit(data: &Path, log_key: &str, extra: &[&str]) -> Output {
    let bin = relay_tests::binary_path("relay-audit", "RELAY_AUDIT_BIN").expect("relay-audit");
    let mut command = tokio::process::Command::new(bin);
    command.arg("--exporter-data").arg(data).arg("--log-key").arg(log_key).args(extra).kill_on_drop(true);
    bounded("relay-audit", command.output()).await.expect("relay-audit runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// What a holder of `log.key` does to the stopped exporter's store.
#[derive(Debug, Clone, Copy)]
enum Attack {
    /// (a) The newest entry dropped, with its heads and cosignatures.
    DropNewest,
    /// (b) Entry 0 deleted, every head re-signed with the real key.
    DeleteFirst,
    /// (c) Entry 1's payload hash altered, every head re-signed with the real key.
    AlterPayload,
}

/// Performs `attack` on the exporter data dir `data`, re-signing with its own `log.key`.
async fn rewrite(data: &Path, attack: Attack) {
    let seed: [u8; 32] = std::fs::read(data.join("log.key")).expect("log.key").try_into().expect("32 bytes");
    let log_key = SigningKey::from_bytes(&seed);
    let store = ExporterStore::open(&data.join("db")).expect("store");
    let mut records: Vec<LogRecord> =
        store.log_records(0, 1_000).expect("records").into_iter().map(|(_, r)| r).collect();
    assert!(records.len() >= 2, "the attack needs at least two entries");
    match attack {
        Attack::DropNewest => {
            store.drop_log_tail(records.len() as u64 - 1).expect("drop the newest");
            return;
        }
        Attack::DeleteFirst => {
            records.remove(0);
        }
        Attack::AlterPayload => {
            let mut leaf = ExportLeaf::decode(&records[1].leaf).expect("leaf");
            leaf.payload_hash = [0xee; 32];
            records[1].leaf = leaf.encode().expect("leaf");
        }
    }
    store.drop_log_tail(0).expect("drop");
    let mut log = MerkleLog::new();
    for (index, record) in records.iter().enumerate() {
        let export_id = ExportLeaf::decode(&record.leaf).expect("leaf").export_id;
        store.append_recovered(index as u64, &WebhookId::from_export_id(export_id), record).expect("append");
        log.append(&record.leaf);
        let head = TreeHead { size: log.len(), root: log.root(), timestamp_ms: relay_proto::now_ms() };
        store.put_head(&head.sign(&log_key)).expect("head");
    }
    store.flush().await.expect("flush");
}

/// Asks the witness to cosign the latest head of the (rewritten) store in `data`, claiming every old size up to
/// `honest`: it must refuse each.
async fn witness_refuses(witness: &WitnessSpec, data: &Path, honest: u64) {
    let (log, head, log_key) = {
        let store = ExporterStore::open(&data.join("db")).expect("store");
        let log = relay_exporter::process::load_log(&store).expect("log");
        let head = store.heads().expect("heads").last().copied().expect("a head");
        let seed: [u8; 32] = std::fs::read(data.join("log.key")).expect("log.key").try_into().expect("32 bytes");
        (log, head, SigningKey::from_bytes(&seed).verifying_key())
    };
    for believed in 0..=honest {
        let result = witness_link::cosign(witness, &log, &log_key, &head, believed).await;
        assert!(result.is_err(), "the witness cosigned a rewritten head of size {} (from {believed})", head.head.size);
    }
}

#[tokio::test]
async fn a_witness_refuses_rewrites_by_the_log_key_holder_and_the_verifiers_fail_them() {
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco");
    let mut exporter = ExporterProcess::new(&test_catalogue(&adsco, &shieldco), 20).await.expect("exporter identity");
    let mut witness = WitnessProcess::start(&[exporter.log_key()]).await.expect("witness");
    let spec: WitnessSpec = witness.spec().parse().expect("spec");
    exporter.add_witness(&witness.spec());
    let relay = TestRelay::with_export_for(exporter.fingerprint().to_owned()).await.expect("relay");
    let relay_fp = relay.fingerprint().to_owned();
    exporter.start(relay.export_addr().expect("export interface"), &relay_fp).await.expect("exporter");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let bob = relay.user("+33655555555").await.expect("bob");
    Witnesses::remember(&alice.home, &[witness.public_key().to_owned()]).expect("alice requires the witness");

    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    bob.messenger.decide_consent("shieldco", "security", Decision::Grant, None).await.expect("grant");
    adsco.wait_events(1, WAIT).await.expect("alice's export");
    shieldco.wait_events(1, WAIT).await.expect("bob's export");
    let honest = verified_at(&alice, 2).await;
    assert!(honest.problems.is_empty(), "the cosigned head verifies: {:?}", honest.problems);

    // A webhook queued now carries the latest head with the witness's cosignature, verifiable from the body alone.
    alice
        .messenger
        .update_device(relay_client::Device { model: "Pixel 10".into(), os: "linux".into(), app_version: "2.0".into() })
        .await
        .expect("new phone");
    let events = adsco.wait_events(2, WAIT).await.expect("re-export");
    let reexport = events.iter().find(|e| e.body["data"]["device_model"] == "Pixel 10").expect("the new model");
    let head = &reexport.body["log_head"];
    assert_eq!(head["log_key"], exporter.log_key(), "{}", reexport.raw);
    assert!(head["size"].as_u64().is_some_and(|s| s >= 2), "{head}");
    let hex32 = |v: &serde_json::Value| -> [u8; 32] {
        hex::decode(v.as_str().expect("hex")).expect("hex").try_into().expect("32 bytes")
    };
    let hex64 = |v: &serde_json::Value| -> [u8; 64] {
        hex::decode(v.as_str().expect("hex")).expect("hex").try_into().expect("64 bytes")
    };
    let signed = relay_proto::merkle::SignedTreeHead {
        head: TreeHead {
            size: head["size"].as_u64().expect("size"),
            root: hex32(&head["root"]),
            timestamp_ms: head["timestamp_ms"].as_u64().expect("time"),
        },
        signature: hex64(&head["signature"]),
    };
    let log_key = relay_proto::witness::parse_witness_key(exporter.log_key()).expect("log key");
    signed.verify(&log_key).expect("the head in the body is signed by the log key");
    let cosignatures: Vec<_> = head["cosignatures"]
        .as_array()
        .expect("cosignatures")
        .iter()
        .map(|c| relay_proto::witness::Cosignature {
            witness_key: hex32(&c["witness_key"]),
            timestamp_ms: c["timestamp_ms"].as_u64().expect("time"),
            signature: hex64(&c["signature"]),
        })
        .collect();
    let required = [spec.key];
    relay_proto::witness::require_cosignatures(&log_key, &signed.head, &cosignatures, &required)
        .expect("the head in the body is cosigned by the witness");
    let report = verified_clean(&alice, 3).await;
    let size = report.tree_size;
    // `exports --json` carries the head's cosignatures: an independent verifier checks them the same way.
    let served = report.head.as_ref().expect("a head");
    let cosignatures: Vec<_> = served
        .cosignatures
        .iter()
        .map(|c| relay_proto::witness::Cosignature {
            witness_key: hex32(&serde_json::Value::from(c.witness_key.clone())),
            timestamp_ms: c.timestamp_ms,
            signature: hex64(&serde_json::Value::from(c.signature.clone())),
        })
        .collect();
    let served_head = TreeHead {
        size: served.size,
        root: hex32(&serde_json::Value::from(served.root.clone())),
        timestamp_ms: served.timestamp_ms,
    };
    relay_proto::witness::require_cosignatures(&log_key, &served_head, &cosignatures, &required)
        .expect("the exports report's head is cosigned by the witness");
    exporter.stop(WAIT).await.expect("stop the exporter");

    // The honest log passes the audit with the witness configured, both ways.
    let data = exporter.data_dir();
    let (witness_key, witness_spec) = (witness.public_key().to_owned(), witness.spec());
    let with_key = ["--witness-key", witness_key.as_str()];
    let with_witness = ["--witness", witness_spec.as_str()];
    for extra in [&with_key[..], &with_witness[..]] {
        let out = audit(&data, exporter.log_key(), extra).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }

    // The witness restarts (killed: no shutdown code runs) before the attacks: its state is on disk.
    witness.kill().await.expect("kill the witness");
    witness.restart().await.expect("restart the witness");

    let copies = tempfile::tempdir().expect("copies");
    for attack in [Attack::DropNewest, Attack::DeleteFirst, Attack::AlterPayload] {
        let copy = copies.path().join(format!("{attack:?}"));
        copy_dir(&data, &copy);
        rewrite(&copy, attack).await;
        witness_refuses(&spec, &copy, size).await;
        // Without a witness the rewritten log passes, as it did before witnesses existed.
        let alone = audit(&copy, exporter.log_key(), &[]).await;
        assert_eq!(alone.status.code(), Some(0), "{attack:?}: {}", text(&alone));
        // With the witness asked for its checkpoint, it fails.
        let out = audit(&copy, exporter.log_key(), &with_witness).await;
        assert_eq!(out.status.code(), Some(1), "{attack:?}: {}", text(&out));
        assert!(text(&out).contains("does not extend"), "{attack:?}: {}", text(&out));
        // With the witness key only, the re-signed heads fail: none carries the witness's cosignature.
        if !matches!(attack, Attack::DropNewest) {
            let out = audit(&copy, exporter.log_key(), &with_key).await;
            assert_eq!(out.status.code(), Some(1), "{attack:?}: {}", text(&out));
            assert!(text(&out).contains("carries no cosignature from witness"), "{attack:?}: {}", text(&out));
        }
    }

    // (c) on the exporter's own store, published by the log key holder to a relay it runs: the exporter asks the
    // witness, which refuses, and publishes the rewritten heads without cosignature. A user of that relay who never
    // pinned a head passes `exports --verify` without a witness, and fails it with the witness configured.
    rewrite(&data, Attack::AlterPayload).await;
    let theirs = TestRelay::with_export_for(exporter.fingerprint().to_owned()).await.expect("the attacker's relay");
    exporter.start(theirs.export_addr().expect("export interface"), theirs.fingerprint()).await.expect("exporter");
    let dave = theirs.user("+33633333333").await.expect("dave");
    let unwitnessed = verified_at(&dave, size).await;
    assert!(unwitnessed.problems.is_empty(), "without a witness the rewrite verifies: {:?}", unwitnessed.problems);
    Witnesses::remember(&dave.home, std::slice::from_ref(&witness_key)).expect("dave requires the witness");
    let refused = dave.messenger.exports(true).await.expect("exports");
    assert!(refused.problems.iter().any(|p| p.contains("NOT WITNESSED")), "{:?}", refused.problems);
    let log = std::fs::read_to_string(exporter.log_path()).expect("exporter log");
    assert!(log.contains("the witness did not cosign"), "{log}");
    exporter.stop(WAIT).await.expect("stop");
}

#[tokio::test]
async fn a_witness_that_is_down_or_holds_another_size_holds_nothing_up() {
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco");
    let mut exporter = ExporterProcess::new(&test_catalogue(&adsco, &shieldco), 20).await.expect("exporter identity");
    let mut witness = WitnessProcess::start(&[exporter.log_key()]).await.expect("witness");
    let spec: WitnessSpec = witness.spec().parse().expect("spec");
    exporter.add_witness(&witness.spec());
    witness.stop(WAIT).await.expect("the witness is down");
    let relay = TestRelay::with_export_for(exporter.fingerprint().to_owned()).await.expect("relay");
    let export_addr = relay.export_addr().expect("export interface");
    exporter.start(export_addr, relay.fingerprint()).await.expect("exporter");
    let alice = relay.user("+33612345678").await.expect("alice");
    let bob = relay.user("+33655555555").await.expect("bob");

    // Down: the export leaves and its head is published all the same, without the cosignature.
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    adsco.wait_events(1, WAIT).await.expect("alice's export");
    let unwitnessed = verified_at(&alice, 1).await;
    assert!(unwitnessed.problems.is_empty(), "{:?}", unwitnessed.problems);
    Witnesses::remember(&alice.home, &[witness.public_key().to_owned()]).expect("alice requires the witness");
    let missing = alice.messenger.exports(true).await.expect("exports");
    assert!(missing.problems.iter().any(|p| p.contains("NOT WITNESSED")), "{:?}", missing.problems);
    exporter.stop(WAIT).await.expect("stop the exporter");
    let log = std::fs::read_to_string(exporter.log_path()).expect("exporter log");
    assert!(log.contains("the witness did not cosign"), "{log}");

    // Meanwhile the witness cosigned that head for someone else: the exporter's belief (nothing cosigned) is stale.
    witness.restart().await.expect("the witness is back");
    {
        let store = ExporterStore::open(&exporter.data_dir().join("db")).expect("store");
        let log = relay_exporter::process::load_log(&store).expect("log");
        let head = store.heads().expect("heads").last().copied().expect("head");
        let log_key = relay_proto::witness::parse_witness_key(exporter.log_key()).expect("log key");
        witness_link::cosign(&spec, &log, &log_key, &head, 0).await.expect("cosigned outside the exporter");
        assert!(store.cosignatures(head.head.size).expect("cosignatures").is_empty(), "the exporter does not know");
    }

    // Restarted, the exporter's first submission gets a conflict with the witness's size, retries from it, and
    // the relay serves the head with the cosignature; the next head is cosigned from there.
    exporter.start(export_addr, relay.fingerprint()).await.expect("restart the exporter");
    let retried = verified_clean(&alice, 1).await;
    assert!(retried.problems.is_empty(), "{:?}", retried.problems);
    bob.messenger.decide_consent("shieldco", "security", Decision::Grant, None).await.expect("grant");
    shieldco.wait_events(1, WAIT).await.expect("bob's export");
    let next = verified_clean(&alice, 2).await;
    assert_eq!(next.tree_size, 2);
    exporter.stop(WAIT).await.expect("stop");
    let log = std::fs::read_to_string(exporter.log_path()).expect("exporter log");
    assert!(log.contains("retrying from it"), "{log}");
    let audited = audit(&exporter.data_dir(), exporter.log_key(), &["--witness", &witness.spec()]).await;
    assert_eq!(audited.status.code(), Some(0), "{}", text(&audited));
}
