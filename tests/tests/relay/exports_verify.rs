//! `relay exports` against a relay that lies about the export log, and its JSON checked by hand.
//!
//! A relay that once served a tree head and now serves none, serves an older signed head, or a head (even one the log
//! key signed) that does not extend the one a home pinned, makes `exports --verify` fail with status 1 and a clear
//! problem; a relay that announces pages forever stops the client at a bound. The JSON of `relay exports --json`
//! carries each entry's leaf and inclusion proof and the signed head they were checked against: a verifier written
//! here from the documented encodings alone (RFC 6962 hashes, the tree-head encoding, Ed25519) checks every proof,
//! and fails one that was altered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use relay_client::Device;
use relay_proto::consent::Decision;
use relay_proto::merkle::{self, Hash};
use relay_proto::wire::{ExportList, SignedTreeHead};
use relay_tests::TestRelay;
use relay_tests::affiliate::{Sink, TestExporter, test_catalogue};
use sha2::{Digest, Sha256};

use crate::{WAIT, bounded};

/// A relay with an exporter, and Alice with one export to adsco, published to the relay.
struct Logged {
    relay: TestRelay,
    exporter: TestExporter,
    adsco: Sink,
    _shieldco: Sink,
    alice: relay_tests::TestUser,
}

async fn logged() -> Logged {
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco");
    let (relay, exporter) = TestExporter::start(&test_catalogue(&adsco, &shieldco)).await.expect("relay, exporter");
    let alice = relay.user("+33612345678").await.expect("alice");
    alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    adsco.wait_events(1, WAIT).await.expect("alice's export");
    exporter.wait_until(WAIT, |p| p.published >= 1).await.expect("published to the relay");
    Logged { relay, exporter, adsco, _shieldco: shieldco, alice }
}

/// A second export of Alice's (a new device model adsco receives), published: the log grows to `size`.
async fn export_again(l: &mut Logged, model: &str, size: u64) {
    let device = Device { model: model.into(), os: "linux".into(), app_version: "1".into() };
    l.alice.messenger.update_device(device).await.expect("new device");
    l.adsco.wait_events(usize::try_from(size).expect("small"), WAIT).await.expect("re-export");
    l.exporter.wait_until(WAIT, |p| p.published >= size).await.expect("published");
}

/// Runs the `relay` command line on `home` (the binary `cargo build --workspace` builds, or `RELAY_BIN`).
async fn cli(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    let bin = relay_tests::binary_path("relay", "RELAY_BIN").expect("the relay CLI is built");
    let mut command = tokio::process::Command::new(bin);
    command.arg("--home").arg(home).args(args).kill_on_drop(true);
    bounded("relay CLI", command.output()).await.expect("run the relay CLI")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Answers every `ListExports` with `lie` from now on, whatever the request.
fn lie(relay: &TestRelay, lie: impl Fn() -> ExportList + Send + Sync + 'static) {
    relay.tamper().expect("in-process relay").rewrite_export_lists(Arc::new(move |_, _| Some(lie())));
}

#[tokio::test]
async fn exports_verify_fails_when_a_relay_that_served_a_head_serves_none() {
    let l = logged().await;
    let pinned = l.alice.messenger.exports(true).await.expect("alice's exports");
    assert!(pinned.problems.is_empty(), "{:?}", pinned.problems);
    assert_eq!(pinned.tree_size, 1);
    let carol = l.relay.user("+33644444444").await.expect("carol, who never saw a head");

    // The relay now answers as if nothing had ever been exported.
    lie(&l.relay, ExportList::default);
    let report = l.alice.messenger.exports(true).await.expect("the listing answers");
    let problems = report.problems.join("\n");
    assert!(problems.contains("serves no tree head") && problems.contains("size 1"), "{report:?}");
    let out = cli(l.alice.home_dir(), &["exports", "--verify"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("PROBLEM: the relay serves no tree head"), "{}", stdout(&out));
    // Its head stays pinned: the lie is reported again, not forgotten.
    let again = l.alice.messenger.exports(true).await.expect("the listing answers");
    assert!(!again.problems.is_empty(), "{again:?}");

    // A home that never verified a head has nothing to hold the relay to.
    let fresh = carol.messenger.exports(true).await.expect("carol's exports");
    assert!(fresh.problems.is_empty() && fresh.entries.is_empty(), "{fresh:?}");
}

#[tokio::test]
async fn exports_verify_fails_on_a_signed_head_older_than_the_pinned_one() {
    let mut l = logged().await;
    // The relay keeps what it answered while the log had one entry: a head the log key really signed.
    let kept: Arc<Mutex<Option<ExportList>>> = Arc::default();
    let keep = kept.clone();
    l.relay.tamper().expect("in-process").rewrite_export_lists(Arc::new(move |_, honest| {
        if let Some(honest) = honest {
            keep.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(|| honest.clone());
        }
        None
    }));
    assert!(l.alice.messenger.exports(true).await.expect("size 1").problems.is_empty());
    export_again(&mut l, "Pixel 10", 2).await;
    let grown = l.alice.messenger.exports(true).await.expect("size 2");
    assert!(grown.problems.is_empty(), "{:?}", grown.problems);
    assert_eq!(grown.tree_size, 2);

    // Rolled back: the old, validly signed answer for every request.
    let old = kept.lock().unwrap_or_else(PoisonError::into_inner).clone().expect("the size-1 answer");
    assert_eq!(old.head.as_ref().map(|h| h.size), Some(1));
    lie(&l.relay, move || old.clone());
    let report = l.alice.messenger.exports(true).await.expect("the listing answers");
    let problems = report.problems.join("\n");
    assert!(problems.contains("older than the head of size 2"), "{report:?}");
    let out = cli(l.alice.home_dir(), &["exports", "--verify"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("older than the head of size 2"), "{}", stdout(&out));
}

#[tokio::test]
async fn exports_verify_fails_on_a_head_that_does_not_extend_the_pinned_one() {
    let l = logged().await;
    assert!(l.alice.messenger.exports(true).await.expect("size 1").problems.is_empty());
    // Whoever holds the log key rewrites history: a head of size 2, properly signed, over another tree.
    let key: [u8; 32] =
        std::fs::read(l.exporter.data_dir().join("log.key")).expect("log key").try_into().expect("32 bytes");
    let key = SigningKey::from_bytes(&key);
    let mut other = merkle::MerkleLog::new();
    other.append(b"a leaf that was never exported");
    other.append(b"another");
    let forged = other.tree_head(relay_proto::now_ms()).sign(&key);
    let proof = other.consistency_proof(1, 2).expect("in range");
    let log_key = key.verifying_key().to_bytes().to_vec();
    lie(&l.relay, move || ExportList {
        log_key: log_key.clone().into(),
        head: Some((&forged).into()),
        consistency: merkle::proof_to_wire(&proof),
        ..ExportList::default()
    });
    let report = l.alice.messenger.exports(true).await.expect("the listing answers");
    let problems = report.problems.join("\n");
    assert!(problems.contains("not consistent with the head of size 1"), "{report:?}");
    let out = cli(l.alice.home_dir(), &["exports", "--verify"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("PROBLEM: the log is not consistent"), "{}", stdout(&out));
}

/// Alice's honest first page, with its head claiming a log of `u64::MAX` entries (room for pages without end).
async fn first_page(l: &Logged) -> ExportList {
    let kept: Arc<Mutex<Option<ExportList>>> = Arc::default();
    let keep = kept.clone();
    l.relay.tamper().expect("in-process").rewrite_export_lists(Arc::new(move |_, honest| {
        if let Some(honest) = honest {
            keep.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(|| honest.clone());
        }
        None
    }));
    l.alice.messenger.exports(false).await.expect("honest listing");
    let mut first = kept.lock().unwrap_or_else(PoisonError::into_inner).clone().expect("alice's first page");
    if let Some(head) = &mut first.head {
        head.size = u64::MAX;
    }
    first
}

/// Pages that never end: each answer says there is another one just after it, under a head of enormous size.
#[tokio::test]
async fn exports_paging_stops_at_a_bound_when_the_relay_announces_pages_forever() {
    let l = logged().await;
    // Bounded lie, so that a client without a bound still ends (and the test fails rather than hangs).
    const LIES: u64 = 3_000;
    let first = first_page(&l).await;
    let asked = Arc::new(AtomicU64::new(0));
    let count = asked.clone();
    let page = first.clone();
    l.relay.tamper().expect("in-process").rewrite_export_lists(Arc::new(move |req, _| {
        if count.fetch_add(1, Ordering::SeqCst) >= LIES {
            return Some(ExportList { more: false, ..page.clone() });
        }
        Some(ExportList { more: true, next_index: req.start_index + 1, ..page.clone() })
    }));
    for verify in [false, true] {
        asked.store(0, Ordering::SeqCst);
        match l.alice.messenger.exports(verify).await {
            Err(e) => assert!(e.to_string().contains("pages"), "{e}"),
            Ok(r) => panic!("not stopped at the page bound: {} entries listed", r.entries.len()),
        }
        let asked = asked.load(Ordering::SeqCst);
        assert!(asked <= relay_client::exports::MAX_PAGES as u64 + 1, "asked for {asked} pages");
    }

    // Pages that each repeat the entries many times over: stopped at the entry bound, long before the page bound.
    let asked = Arc::new(AtomicU64::new(0));
    let count = asked.clone();
    let entry = first.entries.first().expect("alice's entry").clone();
    let page = ExportList { entries: vec![entry; 500], ..first };
    l.relay.tamper().expect("in-process").rewrite_export_lists(Arc::new(move |req, _| {
        if count.fetch_add(1, Ordering::SeqCst) >= LIES {
            return Some(ExportList { more: false, ..page.clone() });
        }
        Some(ExportList { more: true, next_index: req.start_index + 1, ..page.clone() })
    }));
    match l.alice.messenger.exports(false).await {
        Err(e) => assert!(e.to_string().contains("entries"), "{e}"),
        Ok(r) => panic!("not stopped at the entry bound: {} entries listed", r.entries.len()),
    }
    let pages = asked.load(Ordering::SeqCst);
    assert!(pages <= (relay_client::exports::MAX_ENTRIES / 500 + 1) as u64, "asked for {pages} pages");
}

/// The JSON of `relay exports --json`, checked with nothing but the documented encodings.
#[tokio::test]
async fn exports_json_carries_what_an_independent_verifier_needs() {
    let mut l = logged().await;
    export_again(&mut l, "Pixel 10", 2).await;
    let bob = l.relay.user("+33655555555").await.expect("bob");
    bob.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("bob's grant");
    l.exporter.wait_until(WAIT, |p| p.published >= 3).await.expect("published");

    for args in [&["exports", "--json"][..], &["exports", "--verify", "--json"][..]] {
        let out = cli(l.alice.home_dir(), args).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stdout(&out));
        let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
        let entries = json["entries"].as_array().expect("entries");
        assert_eq!(entries.len(), 2, "{json}");
        assert_eq!(independent_check(&json), Ok(2), "{json}");

        // Any altered byte of a proof, a leaf, the head or the key fails the check.
        let e0 = "/entries/0";
        for (pointer, what) in [
            (format!("{e0}/inclusion/hashes/0"), "inclusion proof"),
            (format!("{e0}/leaf"), "inclusion proof"),
            ("/head/root".to_owned(), "head signature"),
            ("/head/signature".to_owned(), "head signature"),
            ("/log_key".to_owned(), "head signature"),
        ] {
            let mut tampered = json.clone();
            let field = tampered.pointer_mut(&pointer).expect(&pointer);
            let text = field.as_str().expect("hex").to_owned();
            let flipped = if text.starts_with('0') { "1" } else { "0" };
            *field = serde_json::Value::String(format!("{flipped}{}", &text[1..]));
            let err = independent_check(&tampered).expect_err(&pointer);
            assert!(err.contains(what), "{pointer}: {err}");
        }
    }
}

/// Checks every entry of an `exports --json` report with only SHA-256, Ed25519 and RFC 6962's algorithms (the
/// project's stand-alone `merkle::verify_inclusion`), not the client's verification; returns how many passed.
fn independent_check(json: &serde_json::Value) -> Result<usize, String> {
    let hex32 = |v: &serde_json::Value| -> Result<[u8; 32], String> {
        let bytes = hex::decode(v.as_str().ok_or("not a string")?).map_err(|e| e.to_string())?;
        bytes.try_into().map_err(|_| "not 32 bytes".to_owned())
    };
    let head = &json["head"];
    let size = head["size"].as_u64().ok_or("head size")?;
    let timestamp = head["timestamp_ms"].as_u64().ok_or("head timestamp")?;
    let root = hex32(&head["root"])?;
    // The signed bytes: label ‖ size (u64 BE) ‖ timestamp (u64 BE) ‖ root, as README and docs/protocol.md say.
    let mut signed = b"consent-relay tree head v1".to_vec();
    signed.extend_from_slice(&size.to_be_bytes());
    signed.extend_from_slice(&timestamp.to_be_bytes());
    signed.extend_from_slice(&root);
    let key = VerifyingKey::from_bytes(&hex32(&json["log_key"])?).map_err(|e| format!("head signature: key {e}"))?;
    let signature = hex::decode(head["signature"].as_str().ok_or("signature")?).map_err(|e| e.to_string())?;
    let signature = Signature::from_slice(&signature).map_err(|e| format!("head signature: {e}"))?;
    key.verify(&signed, &signature).map_err(|e| format!("head signature: {e}"))?;

    let entries = json["entries"].as_array().ok_or("entries")?;
    for e in entries {
        let leaf = hex::decode(e["leaf"].as_str().ok_or("leaf")?).map_err(|e| e.to_string())?;
        let leaf_hash: Hash = Sha256::new().chain_update([0u8]).chain_update(&leaf).finalize().into();
        let inclusion = &e["inclusion"];
        let index = inclusion["index"].as_u64().ok_or("index")?;
        if inclusion["tree_size"].as_u64() != Some(size) || e["index"].as_u64() != Some(index) {
            return Err("inclusion proof: not against the head's size, or for another index".into());
        }
        let hashes = inclusion["hashes"].as_array().ok_or("hashes")?;
        let proof = hashes.iter().map(&hex32).collect::<Result<Vec<_>, _>>()?;
        merkle::verify_inclusion(&leaf_hash, index, size, &proof, &root)
            .map_err(|e| format!("inclusion proof: {e}"))?;
        // The leaf says what the entry shows: the canonical leaf encoding decodes to the same export.
        let decoded = merkle::ExportLeaf::decode(&leaf).map_err(|e| format!("inclusion proof: leaf {e}"))?;
        if decoded.affiliate != e["affiliate"] || hex::encode(decoded.payload_hash) != e["payload_hash"] {
            return Err("inclusion proof: the leaf is not the entry shown".into());
        }
    }
    Ok(entries.len())
}

#[test]
fn the_independent_check_signs_what_the_log_signs() {
    // The hand-written encoding above is the log's: a head signed by the project's code verifies by hand.
    let key = SigningKey::from_bytes(&[5; 32]);
    let mut log = merkle::MerkleLog::new();
    log.append(b"x");
    let head = log.tree_head(1_700_000_000_000).sign(&key);
    let wire = SignedTreeHead::from(&head);
    let mut signed = b"consent-relay tree head v1".to_vec();
    signed.extend_from_slice(&wire.size.to_be_bytes());
    signed.extend_from_slice(&wire.timestamp_ms.to_be_bytes());
    signed.extend_from_slice(&wire.root);
    assert_eq!(key.sign(&signed).to_bytes().as_slice(), wire.signature.as_ref());
}
