//! The client's home under stress: two processes (here, two messengers) on one home never encrypt twice under one
//! ratchet key nor write back stale state; replayed first messages change nothing, whatever they carry; and every
//! file of the home is the owner's alone.

use std::collections::BTreeSet;
use std::path::Path;

use relay_client::messenger::Accepted;
use relay_client::{Home, Messenger};
use relay_proto::wire::Deliver;
use relay_tests::{TestRelay, drain_mailbox};

use crate::WAIT;

const ALICE: &str = "+33611111111";
const BOB: &str = "+33622222222";
const CAROL: &str = "+33633333333";

fn texts(got: &[relay_client::ReceivedMessage]) -> BTreeSet<String> {
    got.iter().map(|m| m.text.clone()).collect()
}

/// `relay chat` open while a script runs `relay send` on the same home: each must encrypt with the ratchet state the
/// other left, or both use one message key (and nonce) and the recipient refuses the second as a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_messengers_on_one_home_never_reuse_a_message_key() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(ALICE).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");
    alice.messenger.send_text(BOB, "a0").await.expect("send");
    let mut second = Messenger::open(&alice.home).await.expect("a second messenger on alice's home");
    second.send_text(BOB, "b1").await.expect("send");
    alice.messenger.send_text(BOB, "a2").await.expect("send");
    second.send_text(BOB, "b3").await.expect("send");
    // And at the same time.
    let (a, b) = tokio::join!(alice.messenger.send_text(BOB, "a4"), second.send_text(BOB, "b5"));
    a.expect("send");
    b.expect("send");

    let mut got = BTreeSet::new();
    while got.len() < 6 {
        let batch = bob.messenger.receive(1, WAIT).await.expect("receive");
        assert!(!batch.is_empty(), "bob decrypted only {got:?}: a message key was used twice");
        got.extend(texts(&batch));
    }
    let want: BTreeSet<String> = ["a0", "b1", "a2", "b3", "a4", "b5"].iter().map(|s| s.to_string()).collect();
    assert_eq!(got, want);
    // Bob's answer reaches both: they share one session.
    bob.messenger.send_text(ALICE, "to both").await.expect("reply");
    assert_eq!(texts(&second.receive(1, WAIT).await.expect("receive")), BTreeSet::from(["to both".to_owned()]));
    second.close().await;
}

fn one_time_prekeys(home: &Home) -> (usize, usize) {
    let text = std::fs::read_to_string(home.dir().join("prekeys.json")).expect("prekeys.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let count = |kind: &str| v["store"][kind].as_object().map_or(0, |o| o.len());
    (count("one_time"), count("kem"))
}

/// A messenger that loaded the prekeys before another consumed one must not write its stale copy back: consumed
/// one-time keys would come back (and keys generated meanwhile be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_messenger_does_not_bring_back_consumed_prekeys() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(ALICE).await.expect("alice");
    let mut second = Messenger::open(&alice.home).await.expect("second messenger");
    let mut bob = relay.user(BOB).await.expect("bob");
    let mut carol = relay.user(CAROL).await.expect("carol");
    let (one_time, kem) = one_time_prekeys(&alice.home);

    bob.messenger.send_text(ALICE, "from bob").await.expect("send");
    assert_eq!(texts(&second.receive(1, WAIT).await.expect("receive")), BTreeSet::from(["from bob".to_owned()]));
    carol.messenger.send_text(ALICE, "from carol").await.expect("send");
    let got = alice.messenger.receive(1, WAIT).await.expect("receive");
    assert_eq!(texts(&got), BTreeSet::from(["from carol".to_owned()]));
    assert_eq!(one_time_prekeys(&alice.home), (one_time - 2, kem - 2), "both first messages consumed their keys");
    second.close().await;
}

/// Every file and directory under `dir` (and `dir` itself) with a mode that lets others in.
fn open_to_others(dir: &Path) -> Vec<(std::path::PathBuf, u32)> {
    relay_tests::private_tree(dir).expect("walk the home").loose
}

/// The home holds keys, sessions, contacts and the plaintext of held messages: 0700, every file 0600, from
/// creation on, and a home left looser by an older version is tightened when opened.
#[tokio::test]
async fn the_home_and_every_file_in_it_are_private() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut bob = relay.user(BOB).await.expect("bob");
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = Home::new(tmp.path().join("alice"));
    let device = relay_client::Device::default();
    relay_client::messenger::init(&home, ALICE, device).expect("init");
    assert_eq!(open_to_others(home.dir()), [], "after init");
    let (mut alice, _) = Messenger::register(&home, &relay.addr().to_string(), relay.fingerprint()).await.expect("reg");
    alice.send_text(BOB, "hello").await.expect("send");
    bob.messenger.receive(1, WAIT).await.expect("receive");
    bob.messenger.send_text(ALICE, "hi").await.expect("reply");
    alice.receive(1, WAIT).await.expect("receive");
    alice.close().await;
    assert_eq!(open_to_others(home.dir()), [], "after register, send and receive");

    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(home.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(home.dir().join("contacts.json"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    Messenger::open(&home).await.expect("open").close().await;
    assert_eq!(open_to_others(home.dir()), [], "an older, looser home is tightened");
}

fn redeliver(envelope: &bytes::Bytes, server_id: u64) -> Deliver {
    Deliver { server_id, stored_at_ms: relay_proto::now_ms(), envelope: envelope.clone() }
}

/// A relay (or anyone who recorded it) delivers Alice's first message to Bob again, five times, after the session
/// went both ways and Alice rotated her access key. With a last-resort-only bundle, PQXDH alone would answer each
/// replay with a new session state. Nothing may change: the replay is not shown, Bob keeps Alice's current access key
/// (so his answers stay sealed), and the session keeps working both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_first_message_changes_nothing() {
    let relay = TestRelay::in_process_with(|c| c.limits.lookups_per_minute = 10_000).await.expect("relay");
    let mut alice = relay.user(ALICE).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");
    // Empty Bob's one-time pools, so that Alice's session starts from his last-resort keys.
    let (carol, _) = relay.raw_user(CAROL).await.expect("carol");
    let bob_account = bob.messenger.account_id();
    for _ in 0..relay_client::sessions::PREKEY_BATCH {
        carol.fetch_bundle(&bob_account).await.expect("bundle");
    }
    assert!(carol.fetch_bundle(&bob_account).await.expect("bundle").one_time_prekey.is_none(), "pool empty");

    alice.messenger.send_text(BOB, "first").await.expect("send");
    let first = drain_mailbox(bob.messenger.connection()).await.expect("drain");
    assert_eq!(first.len(), 1);
    match bob.messenger.accept(&redeliver(&first[0], 1_000_000)).await.expect("accept") {
        Accepted::New(m) => assert_eq!(m.text, "first"),
        other => panic!("first message not accepted: {other:?}"),
    }
    bob.messenger.save_seen().await.expect("save");
    bob.messenger.send_text(ALICE, "answer").await.expect("send");
    assert_eq!(texts(&alice.messenger.receive(1, WAIT).await.expect("receive")), BTreeSet::from(["answer".into()]));
    alice.messenger.rotate_access_key().await.expect("rotate");
    alice.messenger.send_text(BOB, "new key").await.expect("send");
    assert_eq!(texts(&bob.messenger.receive(1, WAIT).await.expect("receive")), BTreeSet::from(["new key".into()]));

    for i in 1..=5 {
        let again = bob.messenger.accept(&redeliver(&first[0], 1_000_000 + i)).await.expect("accept");
        // A duplicate: neither shown again nor reported as an envelope that could not be read.
        assert!(matches!(again, Accepted::Duplicate), "replay {i}: {again:?}");
    }
    bob.messenger.save_seen().await.expect("save");
    assert_eq!(bob.home.quarantined().expect("count"), 0, "a replay is not a quarantine entry");

    let sent = bob.messenger.send_text(ALICE, "after the replays").await.expect("send");
    assert!(sent.sealed, "bob kept alice's current access key");
    let got = alice.messenger.receive(1, WAIT).await.expect("receive");
    assert_eq!(texts(&got), BTreeSet::from(["after the replays".into()]));
    alice.messenger.send_text(BOB, "still one session").await.expect("send");
    let got = bob.messenger.receive(1, WAIT).await.expect("receive");
    assert_eq!(texts(&got), BTreeSet::from(["still one session".into()]));
}

/// Once the seen list has forgotten a message id (it keeps the most recent ones), a replay of that message must
/// still not be shown as new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_forgotten_by_the_seen_list_is_not_shown_again() {
    let relay = TestRelay::in_process_with(|c| c.limits.lookups_per_minute = 10_000).await.expect("relay");
    let mut alice = relay.user(ALICE).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");
    let (carol, _) = relay.raw_user(CAROL).await.expect("carol");
    let bob_account = bob.messenger.account_id();
    for _ in 0..relay_client::sessions::PREKEY_BATCH {
        carol.fetch_bundle(&bob_account).await.expect("bundle");
    }
    alice.messenger.send_text(BOB, "only once").await.expect("send");
    let first = drain_mailbox(bob.messenger.connection()).await.expect("drain");
    assert!(matches!(bob.messenger.accept(&redeliver(&first[0], 1)).await, Ok(Accepted::New(_))));
    bob.messenger.save_seen().await.expect("save");
    bob.messenger.close().await;

    // Twenty thousand later messages push the id out of the seen list.
    let mut seen = bob.home.seen().expect("seen");
    for i in 0..relay_client::home::SEEN_CAPACITY {
        seen.insert(&format!("envelope:{}", 10 + i));
    }
    bob.home.save_seen(&seen).expect("save");
    let mut bob_again = Messenger::open(&bob.home).await.expect("reopen");
    let replay = bob_again.accept(&redeliver(&first[0], 5_000_000)).await.expect("accept");
    assert!(matches!(replay, Accepted::Duplicate), "an old message shown again or reported: {replay:?}");
    bob_again.save_seen().await.expect("save");
    assert_eq!(bob.home.quarantined().expect("count"), 0, "a replay is not a quarantine entry");
    bob_again.close().await;
}

/// A `relay` process started while another client holds the home says that it waits, and goes on once the home
/// is free (the refusal after the bounded wait is covered by the home module's unit test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_process_waits_for_the_home_and_says_so() {
    use tokio::io::AsyncBufReadExt;
    let relay = TestRelay::in_process().await.expect("relay");
    let alice = relay.user(ALICE).await.expect("alice");
    let held = alice.home.lock().await.expect("lock");
    let bin = relay_tests::binary_path("relay", "RELAY_BIN").expect("the relay binary");
    let mut child = tokio::process::Command::new(bin)
        .arg("--home")
        .arg(alice.home_dir())
        .args(["recv", "--json"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn relay");
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    crate::bounded("the waiting notice", async {
        loop {
            let line = stderr.next_line().await.expect("read").expect("a notice before the process ends");
            if line.contains("is in use by another relay client; waiting") {
                break;
            }
        }
    })
    .await;
    drop(held);
    let status = crate::bounded("relay recv", child.wait()).await.expect("wait");
    assert!(status.success(), "relay recv went on once the home was free: {status}");
}

/// `recv --wait` takes any number of seconds: a huge wait means no deadline, not an overflow.
#[tokio::test]
async fn a_huge_wait_is_no_deadline() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(ALICE).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");
    alice.messenger.send_text(BOB, "waiting for me").await.expect("send");
    let got = crate::bounded("receive", bob.messenger.receive(1, std::time::Duration::MAX)).await.expect("receive");
    assert_eq!(texts(&got), BTreeSet::from(["waiting for me".to_owned()]));
}
