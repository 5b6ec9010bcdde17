//! What the relay keeps: no plaintext anywhere in its data directory or log, and no sender in mailbox entries.
//! Also quotas and lookup limits, which bound what one user can make the relay store or reveal.

use relay_proto::ErrorCode;
use relay_tests::{TestRelay, files_containing};

const MARKER: &str = "MARKER-7f3a9c-plaintext-never-on-relay";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_data_dir_and_log_hold_no_plaintext_and_entries_name_no_sender() {
    let mut relay = TestRelay::process().await.expect("relay");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let bob = relay.user("+33698765432").await.expect("bob");
    for i in 0..20 {
        alice.messenger.send_text("+33698765432", &format!("{MARKER} {i}")).await.expect("send");
    }
    let alice_identity = alice.home.identity().expect("keys");
    let alice_account = alice_identity.account_id();
    // Stop the relay cleanly so that everything it holds is on disk, then search the raw bytes.
    relay.stop().await.expect("stop");
    assert!(files_containing(relay.dir(), b"MARKER-7f3a9c").expect("scan").is_empty(), "plaintext on the relay");
    assert!(std::fs::metadata(relay.log_path()).expect("log").len() > 0, "the scan covered a non-empty log");
    // The log (at debug level) names no phone number either.
    for phone in [b"33612345678", b"33698765432"] {
        assert!(files_containing(relay.dir(), phone).expect("scan").iter().all(|p| !p.ends_with("relayd.log")));
    }

    // Every stored envelope is queued for Bob and contains neither Alice's account id, her identity key nor her
    // phone number.
    let db = sled::open(relay.data_dir().join("store")).expect("open the stopped relay's store");
    let mailboxes = db.open_tree(relay_server::store::trees::MAILBOXES).expect("tree");
    let stored = relay_server::store::roundlog::stored_envelopes(&mailboxes).expect("decode the mailbox records");
    assert_eq!(stored.len(), 20);
    assert!(stored.iter().all(|(recipient, _)| recipient == &bob.messenger.account_id()), "queued for Bob only");
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    // The raw records (keys and values), not only the decoded envelopes, hold nothing of the sender.
    for entry in mailboxes.iter() {
        let (k, v) = entry.expect("entry");
        for (what, needle) in [
            ("account id", &alice_account.as_bytes()[..]),
            ("identity key", &alice_identity.identity_key()[..]),
            ("phone", b"33612345678"),
        ] {
            assert!(!contains(&k, needle) && !contains(&v, needle), "sender {what} in a mailbox record");
        }
    }
}

#[tokio::test]
async fn mailbox_quota_gives_a_clear_error_and_frees_up_after_delivery() {
    let relay = TestRelay::in_process_with(|c| c.limits.mailbox_max_messages = 3).await.expect("relay");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let mut bob = relay.user("+33698765432").await.expect("bob");
    for i in 0..3 {
        alice.messenger.send_text("+33698765432", &format!("q{i}")).await.expect("within quota");
    }
    let err = alice.messenger.send_text("+33698765432", "q3").await.expect_err("over quota");
    let code = match &err {
        relay_client::MessengerError::Client(c) => c.code(),
        _ => None,
    };
    assert_eq!(code, Some(ErrorCode::QuotaExceeded), "{err}");
    assert!(err.to_string().contains("mailbox full"), "message says why: {err}");

    assert_eq!(bob.messenger.receive(3, crate::WAIT).await.expect("drain").len(), 3);
    alice.messenger.send_text("+33698765432", "room again").await.expect("quota released by acks");
}

#[tokio::test]
async fn undelivered_envelopes_expire_after_their_ttl() {
    let relay = TestRelay::in_process_with(|c| {
        c.limits.message_ttl_secs = 1;
        c.limits.expiry_sweep_secs = 1;
    })
    .await
    .expect("relay");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let mut bob = relay.user("+33698765432").await.expect("bob");
    alice.messenger.send_text("+33698765432", "short-lived").await.expect("send");
    // Past the TTL (not a timing assertion: any delay above one second gives the same result).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let got = bob.messenger.receive(0, std::time::Duration::ZERO).await.expect("receive");
    assert!(got.is_empty(), "expired envelope delivered: {got:?}");
    alice.messenger.send_text("+33698765432", "fresh").await.expect("send");
    assert_eq!(bob.messenger.receive(1, crate::WAIT).await.expect("receive")[0].text, "fresh");
}

#[tokio::test]
async fn phone_lookups_are_rate_limited_per_account() {
    let relay = TestRelay::in_process_with(|c| c.limits.lookups_per_minute = 3).await.expect("relay");
    let alice = relay.user("+33612345678").await.expect("alice");
    let other = relay.user("+33698765432").await.expect("other");
    let conn = alice.messenger.connection();
    for _ in 0..3 {
        conn.lookup("+33698765432").await.expect("within limit");
    }
    let err = conn.lookup("+33698765432").await.expect_err("limited");
    assert_eq!(err.code(), Some(ErrorCode::RateLimited));
    // Another account's budget is its own.
    other.messenger.connection().lookup("+33612345678").await.expect("other account unaffected");
}

/// Invariant 2: the message path never reads phone numbers or device info. With every profile (phone number and
/// device info) removed from a relay's store, registration state aside, messages still flow both ways. (Sender
/// certificates state the number, so they are issued outside the message path, from the profile: each client
/// fetches and caches its own before the profiles go.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messaging_reads_no_profile_data() {
    let mut relay = TestRelay::process().await.expect("relay");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let mut bob = relay.user("+33698765432").await.expect("bob");
    alice.messenger.contact("+33698765432").await.expect("alice knows bob");
    bob.messenger.contact("+33612345678").await.expect("bob knows alice");
    alice.messenger.sender_certificate().await.expect("alice's certificate");
    bob.messenger.sender_certificate().await.expect("bob's certificate");
    relay.stop().await.expect("stop");
    {
        let db = sled::open(relay.data_dir().join("store")).expect("open the stopped relay's store");
        let profiles = db.open_tree(relay_server::store::trees::PROFILES).expect("tree");
        assert_eq!(profiles.len(), 2);
        profiles.clear().expect("clear");
        db.flush().expect("flush");
    }
    relay.restart().await.expect("restart");
    alice.reconnect().await.expect("alice reconnects");
    bob.reconnect().await.expect("bob reconnects");
    alice.messenger.send_text("+33698765432", "no profile needed").await.expect("send");
    assert_eq!(bob.messenger.receive(1, crate::WAIT).await.expect("receive")[0].text, "no profile needed");
    bob.messenger.send_text("+33612345678", "nor here").await.expect("reply");
    assert_eq!(alice.messenger.receive(1, crate::WAIT).await.expect("receive")[0].text, "nor here");
}

/// Operators keep logs; a line naming both an account and the address it connected from would tie a person to a
/// place. At debug level the relay may log either, never both on one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_relay_log_line_ties_an_account_to_an_address() {
    let mut relay = TestRelay::process().await.expect("relay");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let mut bob = relay.user("+33698765432").await.expect("bob");
    alice.messenger.send_text("+33698765432", "hello").await.expect("send");
    bob.messenger.receive(1, crate::WAIT).await.expect("receive");
    bob.messenger.send_text("+33612345678", "hi").await.expect("reply");
    alice.messenger.receive(1, crate::WAIT).await.expect("receive");
    let accounts = [alice.messenger.account_id().to_string(), bob.messenger.account_id().to_string()];
    relay.stop().await.expect("stop");
    let log = std::fs::read_to_string(relay.log_path()).expect("log");
    assert!(log.lines().any(|l| accounts.iter().any(|a| l.contains(a.as_str()))), "the debug log names accounts");
    for line in log.lines() {
        let account = accounts.iter().any(|a| line.contains(a.as_str()));
        assert!(!(account && line.contains("127.0.0.1:")), "an account with an address: {line}");
    }
}

/// The relay's data directory holds its key and every mailbox: 0700, and every file in it 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_data_dir_is_private() {
    let mut relay = TestRelay::process().await.expect("relay");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    relay.user("+33698765432").await.expect("bob");
    alice.messenger.send_text("+33698765432", "hello").await.expect("send");
    relay.stop().await.expect("stop");
    let modes = relay_tests::private_tree(relay.data_dir()).expect("walk the data dir");
    assert!(modes.loose.is_empty(), "readable by others: {:?}", modes.loose);
    assert!(modes.files >= 3, "the store, the certificate and its key were checked");
}
