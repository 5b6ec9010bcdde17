//! Storage faults: a store that cannot be written makes the relay refuse with STORAGE_UNAVAILABLE instead of
//! acknowledging, and it never acknowledges what it did not persist.
//!
//! Two ways in: flush failures injected into the relay's durability path (always run), and a real full disk, a
//! small tmpfs mounted for the test (needs the right to mount: `#[ignore]`d, run by `.ci/run` where mounting works).

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use relay_client::{Connection, Identity};
use relay_proto::ErrorCode;
use relay_tests::TestRelay;

use crate::bounded;

async fn user(relay: &TestRelay, phone: &str) -> (Connection, Identity) {
    relay.raw_user(phone).await.expect("user")
}

async fn drain(conn: &Connection) -> Vec<Bytes> {
    relay_tests::drain_mailbox(conn).await.expect("drain the mailbox")
}

#[tokio::test]
async fn a_store_that_cannot_flush_refuses_writes_and_acknowledges_nothing() {
    let relay = TestRelay::in_process().await.expect("relay");
    let faults = relay.storage_faults().expect("in-process relay");
    let (alice, _) = user(&relay, "+33611111111").await;
    let (bob, bob_id) = user(&relay, "+33622222222").await;
    let to = bob_id.account_id();
    alice.send(&to, Bytes::from_static(b"before")).await.expect("acknowledged");

    faults.fail_flushes(true);
    for i in 0..5 {
        let err = alice.send(&to, Bytes::from(format!("during {i}"))).await.expect_err("not acknowledged");
        assert_eq!(err.code(), Some(ErrorCode::StorageUnavailable), "{err}");
        assert!(err.to_string().contains("nothing was acknowledged"), "{err}");
    }
    let conn = relay_client::Connection::connect(
        relay.addr(),
        relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fp"),
    )
    .await
    .expect("connect");
    let err = conn.register(&Identity::generate(), "+33633333333", Default::default()).await.expect_err("no account");
    assert_eq!(err.code(), Some(ErrorCode::StorageUnavailable), "{err}");
    // Reads keep working while writes fail.
    assert_eq!(alice.lookup("+33622222222").await.expect("lookup").account, to);

    faults.fail_flushes(false);
    alice.send(&to, Bytes::from_static(b"after")).await.expect("acknowledged again");
    let got = drain(&bob).await;
    for acked in [&b"before"[..], b"after"] {
        assert!(got.iter().any(|e| e.as_ref() == acked), "{acked:?} missing from {got:?}");
    }
    // A refused send may still surface once the disk recovers (it was written in memory): delivery is at least
    // once, clients retry refused sends and recipients de-duplicate by message id. What must never happen is an
    // acknowledgement without durability, which the real-disk test below checks across a SIGKILL.
}

/// A tmpfs mounted for the test and unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        Command::new("umount").arg(&self.0).status().ok();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// Run by `.ci/run` when the machine lets it mount a tmpfs: `cargo test -p relay-tests --test relay -- --ignored
/// full_disk`.
#[tokio::test]
#[ignore = "needs the right to mount a tmpfs; .ci/run runs it where it can"]
async fn a_full_disk_refuses_sends_and_every_acknowledged_one_survives() {
    let scratch = tempfile::tempdir().expect("scratch");
    let mnt = scratch.path().join("disk");
    std::fs::create_dir_all(&mnt).expect("mount point");
    let Some(disk) = SmallDisk::mount(&mnt, "8m") else { panic!("cannot mount a tmpfs here") };
    let data = mnt.join("data");
    let mut relay = TestRelay::process_with(|c| {
        c.data_dir = data.clone();
        c.limits.mailbox_max_bytes = 1 << 30;
    })
    .await
    .expect("relay on the small disk");
    let (alice, _) = user(&relay, "+33611111111").await;
    let (_, bob_id) = user(&relay, "+33622222222").await;
    let to = bob_id.account_id();

    // Fill the disk: 32 KiB envelopes until the relay refuses.
    let mut acked = Vec::new();
    let mut refusal = None;
    for i in 0..2_000u32 {
        let mut body = format!("envelope {i:05} ").into_bytes();
        body.resize(32 * 1024, b'x');
        match bounded("send", alice.send(&to, Bytes::from(body.clone()))).await {
            Ok(_) => acked.push(body),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let refusal = refusal.expect("an 8 MiB disk fills up before 64 MiB of envelopes");
    assert_eq!(refusal.code(), Some(ErrorCode::StorageUnavailable), "{refusal}");
    assert!(!acked.is_empty());
    eprintln!("full disk: {} envelopes of 32 KiB acknowledged, then: {refusal}", acked.len());

    // Kill it while the disk is full, then read the store back elsewhere: everything acknowledged is there.
    relay.kill().await.expect("SIGKILL");
    let copy = scratch.path().join("copy");
    copy_dir(&data, &copy);
    drop(disk);
    let reader = TestRelay::process_with(|c| c.data_dir = copy.clone()).await.expect("relay on the copy");
    let bob =
        Connection::connect(reader.addr(), relay_client::pin::parse_fingerprint(reader.fingerprint()).expect("fp"))
            .await
            .expect("connect");
    bob.authenticate(&bob_id).await.expect("bob");
    let got = drain(&bob).await;
    for body in &acked {
        assert!(got.iter().any(|e| e.as_ref() == body.as_slice()), "acknowledged envelope {:?} lost", &body[..15]);
    }
    assert!(std::fs::read_to_string(relay.log_path()).expect("log").find("panicked").is_none(), "relayd panicked");
}
