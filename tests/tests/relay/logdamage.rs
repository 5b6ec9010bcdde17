//! A damaged export log is never silently turned into a shorter history (invariant 8, issue #12): an exporter whose
//! store lost logged exports stops, with a non-zero exit and before any webhook; `relay-audit` fails the shortened
//! log against a head a user pinned and against the relay's heads, though the store alone still looks sound; and
//! `relay-exporter --recover-log-from-relay` rebuilds the log from the relay's copy, after which the audit passes
//! and the exporter resumes exporting and publishing.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use relay_client::exports::ExportsReport;
use relay_exporter::outbox::ExporterStore;
use relay_proto::consent::Decision;
use relay_tests::affiliate::{ExporterProcess, Sink, test_catalogue};
use relay_tests::{TestRelay, TestUser};

use crate::{WAIT, bounded};

/// The user's verified exports, once the relay serves a head of at least `size` (the relay's copy has no change feed
/// to wait on: it is polled, within the bound). Verifying pins the head in the user's home.
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

/// Runs `relay-audit` on the exporter's data dir with `extra` arguments.
async fn audit(exporter: &ExporterProcess, extra: &[&str]) -> Output {
    let bin = relay_tests::binary_path("relay-audit", "RELAY_AUDIT_BIN").expect("relay-audit");
    let mut command = tokio::process::Command::new(bin);
    command
        .arg("--exporter-data")
        .arg(exporter.data_dir())
        .arg("--log-key")
        .arg(exporter.log_key())
        .arg("--affiliates")
        .arg(exporter.catalogue_path())
        .args(extra)
        .kill_on_drop(true);
    bounded("relay-audit", command.output()).await.expect("relay-audit runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

#[tokio::test]
async fn a_store_that_lost_logged_exports_stops_the_exporter_fails_the_audit_and_is_recovered_from_the_relay() {
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco");
    let mut exporter = ExporterProcess::new(&test_catalogue(&adsco, &shieldco), 20).await.expect("exporter identity");
    let relay = TestRelay::with_export_for(exporter.fingerprint().to_owned()).await.expect("relay");
    let export_addr = relay.export_addr().expect("export interface").to_string();
    let relay_fp = relay.fingerprint().to_owned();
    exporter.start(export_addr.parse().expect("addr"), &relay_fp).await.expect("exporter");
    relay.wait_for_notices(WAIT).await.expect("the exporter's notices");
    let alice = relay.user("+33612345678").await.expect("alice");
    let bob = relay.user("+33655555555").await.expect("bob");
    let carol = relay.user("+33644444444").await.expect("carol");

    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    bob.messenger.decide_consent("shieldco", "security", Decision::Grant, None).await.expect("grant");
    adsco.wait_events(1, WAIT).await.expect("alice's export");
    shieldco.wait_events(1, WAIT).await.expect("bob's export");
    // Alice verifies the log and pins its head of size 2 in her home (`exports.json`).
    let before = verified_at(&alice, 2).await;
    assert!(before.problems.is_empty(), "{:?}", before.problems);
    let pinned = alice.home_dir().join(relay_client::exports::STATE_FILE);
    exporter.stop(WAIT).await.expect("stop the exporter");

    // The damage: sled keeps its files up to a damaged point and drops every write after it, here the newest log
    // record and every head over it. What is left is a sound log of one entry.
    {
        let store = ExporterStore::open(&exporter.data_dir().join("db")).expect("exporter store");
        store.drop_log_tail(1).expect("damage");
    }

    // The store alone cannot show it: the audit of the shortened log passes, as it always did.
    let alone = audit(&exporter, &[]).await;
    assert_eq!(alone.status.code(), Some(0), "{}", text(&alone));
    // Against the head Alice pinned, and against the relay's heads, it fails.
    let against_pin = audit(&exporter, &["--head", path(&pinned)]).await;
    assert_eq!(against_pin.status.code(), Some(1), "{}", text(&against_pin));
    assert!(text(&against_pin).contains("does not extend"), "{}", text(&against_pin));
    let against_relay = audit(&exporter, &["--relay", &export_addr, "--relay-cert-sha256", &relay_fp]).await;
    assert_eq!(against_relay.status.code(), Some(1), "{}", text(&against_relay));
    assert!(text(&against_relay).contains("does not extend"), "{}", text(&against_relay));

    // Carol grants while the exporter is down. Restarted on the damaged store, it stops before exporting anything:
    // a non-zero exit naming the damage, and no webhook.
    carol.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("carol's grant");
    exporter.restart().await.expect("restart on the damaged store");
    let exit = exporter.wait_exit(WAIT).await.expect("the exporter stops by itself");
    assert_eq!(exit.code(), Some(3), "the exit status of a damaged log: {exit}");
    let log = std::fs::read_to_string(exporter.log_path()).expect("exporter log");
    assert!(log.contains("export log damaged"), "{log}");
    assert!(log.contains("--recover-log-from-relay"), "{log}");
    assert_eq!(adsco.attempts().len(), 1, "no webhook from an exporter whose log lost entries");

    // Rebuilt from the relay's copy, verified against the signed heads: the audit passes against both.
    let recovered = exporter.run_once(&["--recover-log-from-relay"], WAIT).await.expect("recovery runs");
    assert!(recovered.status.success(), "{}", text(&recovered));
    assert!(text(&recovered).contains("recovered 1 entr"), "{}", text(&recovered));
    let both = ["--head", path(&pinned), "--relay", &export_addr, "--relay-cert-sha256", &relay_fp];
    let audited = audit(&exporter, &both).await;
    assert_eq!(audited.status.code(), Some(0), "{}", text(&audited));

    // The exporter resumes: Carol's export leaves, is logged after the recovered entries and published; Alice's
    // pinned head is consistent with the new one.
    exporter.restart().await.expect("restart on the recovered store");
    adsco.wait_events(2, WAIT).await.expect("carol's export");
    let carols = verified_at(&carol, 3).await;
    assert!(carols.problems.is_empty(), "{:?}", carols.problems);
    assert_eq!(carols.entries.iter().map(|e| e.index).collect::<Vec<_>>(), [2]);
    let after = verified_at(&alice, 3).await;
    assert!(after.problems.is_empty(), "{:?}", after.problems);
    // The same entries; their inclusion proofs now lead to the larger head.
    let without_proofs = |r: &relay_client::exports::ExportsReport| {
        r.entries.iter().map(|e| (e.index, e.leaf.clone(), e.problem.clone())).collect::<Vec<_>>()
    };
    assert_eq!(without_proofs(&after), without_proofs(&before));
    assert!(after.entries.iter().all(|e| e.inclusion.tree_size == 3), "{after:?}");
    exporter.stop(WAIT).await.expect("stop");
}
