//! The regulator pack (`relay-audit --regulator-pack`), from a real exporter's data dir: what was shared in a period,
//! exactly as delivered, with the log's proofs, the notices in force and the Article 30 record, owner-only.

use std::os::unix::fs::PermissionsExt;

use relay_proto::consent::Decision;
use relay_proto::merkle::{leaf_hash, verify_inclusion};
use relay_tests::affiliate::{Sink, TestExporter, test_catalogue};
use serde_json::Value;

use crate::{WAIT, bounded};

const CONTROLLER: &str =
    "\n[controller]\nname = \"Consent Relay Operator SAS\"\ncontact = \"dpo@relay.example\"\ncountry = \"FR\"\n";

async fn audit(args: &[&str]) -> std::process::Output {
    let bin = relay_tests::binary_path("relay-audit", "RELAY_AUDIT_BIN").expect("relay-audit is built");
    let mut command = tokio::process::Command::new(bin);
    command.args(args).kill_on_drop(true);
    bounded("relay-audit", command.output()).await.expect("run relay-audit")
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("JSON")
}

#[tokio::test]
async fn a_regulator_pack_holds_what_left_exactly_with_proofs_notices_and_the_article_30_record() {
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco");
    let catalogue = format!("{}{CONTROLLER}", test_catalogue(&adsco, &shieldco));
    let (relay, mut exporter) = TestExporter::start(&catalogue).await.expect("relay and exporter");
    let alice = relay.user("+33612345678").await.expect("alice");
    let bob = relay.user("+33655555555").await.expect("bob");
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    bob.messenger.decide_consent("shieldco", "security", Decision::Grant, None).await.expect("grant");
    let sent: Vec<_> =
        [adsco.wait_events(1, WAIT).await.expect("adsco"), shieldco.wait_events(1, WAIT).await.expect("shieldco")]
            .concat();
    exporter.wait_until(WAIT, |p| p.logged >= 2 && p.published >= 2).await.expect("logged");
    exporter.stop().await.expect("stop the exporter");

    let dir = tempfile::tempdir().expect("dir");
    let affiliates = dir.path().join("affiliates.toml");
    std::fs::write(&affiliates, &catalogue).expect("catalogue");
    let pack = dir.path().join("pack");
    let today = relay_proto::time::date(relay_proto::now_ms());
    let data = exporter.data_dir();
    let args = |pack: &std::path::Path, from: &str, to: &str| -> Vec<String> {
        [
            "--exporter-data",
            data.to_str().expect("utf-8"),
            "--affiliates",
            affiliates.to_str().expect("utf-8"),
            "--regulator-pack",
            pack.to_str().expect("utf-8"),
            "--from",
            from,
            "--to",
            to,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let run = |a: Vec<String>| async move { audit(&a.iter().map(String::as_str).collect::<Vec<_>>()).await };
    let out = run(args(&pack, &today, &today)).await;
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // Owner-only: the pack holds personal data.
    assert_eq!(std::fs::metadata(&pack).expect("pack").permissions().mode() & 0o777, 0o700);
    for entry in std::fs::read_dir(&pack).expect("list") {
        let meta = entry.expect("entry").metadata().expect("meta");
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(meta.permissions().mode() & 0o777, want);
    }

    // The bodies are exactly what the affiliates received.
    let bodies: Vec<Value> = std::fs::read_to_string(pack.join("bodies.jsonl"))
        .expect("bodies")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(bodies.len(), 2);
    for a in &sent {
        let kept = bodies.iter().find(|b| b["id"] == a.id.as_str()).expect("each delivered body is kept");
        assert_eq!(kept["body"], a.raw.as_str(), "byte for byte");
    }

    // Every entry's inclusion proof leads to the latest head's root; the head verifies under the log key.
    let log = read_json(&pack.join("log.json"));
    let head = log["heads"].as_array().and_then(|h| h.last()).cloned().expect("a head");
    let size = head["size"].as_u64().expect("size");
    let root: [u8; 32] = hex::decode(head["root"].as_str().expect("root")).expect("hex").try_into().expect("32");
    let entries = log["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2);
    for e in entries {
        let leaf = hex::decode(e["leaf"].as_str().expect("leaf")).expect("hex");
        let proof: Vec<[u8; 32]> = e["inclusion_proof"]
            .as_array()
            .expect("a proof")
            .iter()
            .map(|h| hex::decode(h.as_str().expect("hex")).expect("hex").try_into().expect("32"))
            .collect();
        let index = e["index"].as_u64().expect("index");
        verify_inclusion(&leaf_hash(&leaf), index, size, &proof, &root).expect("the proof verifies");
        assert_eq!(e["body_kept"], true);
    }

    // The notices in force, byte for byte; the Article 30 record from the catalogue; no secret anywhere.
    let notices = read_json(&pack.join("notices.json"));
    let notices = notices.as_array().expect("notices");
    assert_eq!(notices.iter().filter(|n| n["in_force_in_period"] == true).count(), 3);
    for n in notices {
        let doc = std::fs::read(pack.join("notices").join(format!("{}.txt", n["hash"].as_str().expect("hash"))))
            .expect("the document");
        assert_eq!(hex::encode(relay_proto::notice::notice_hash(&doc)), n["hash"].as_str().expect("hash"));
    }
    let record = read_json(&pack.join("article30.json"));
    assert_eq!(record["controller"]["name"], "Consent Relay Operator SAS");
    let purposes: Vec<&str> =
        record["activities"].as_array().expect("activities").iter().filter_map(|a| a["purpose"].as_str()).collect();
    assert_eq!(purposes, ["security", "analytics", "advertising"]);
    let md = std::fs::read_to_string(pack.join("article30.md")).expect("markdown");
    assert!(md.contains("| ShieldCo GmbH (shieldco) | DE | no | phone_pseudonym, os | 90 days |"), "{md}");
    let everything: String = ["catalogue.json", "article30.json", "log.json", "notices.json", "README.txt"]
        .iter()
        .map(|f| std::fs::read_to_string(pack.join(f)).expect("read"))
        .collect();
    assert!(!everything.contains("whsec_"), "no webhook secret in the pack");

    // A period without exports: an empty pack; a pack is never written over.
    let empty = dir.path().join("empty");
    let out = run(args(&empty, "2020-01-01", "2020-12-31")).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_json(&empty.join("summary.json"))["entries"], 0);
    assert_eq!(std::fs::read_to_string(empty.join("bodies.jsonl")).expect("bodies"), "");
    let out = run(args(&pack, &today, &today)).await;
    assert_eq!(out.status.code(), Some(2), "exists: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
}
