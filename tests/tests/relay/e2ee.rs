//! End-to-end encryption over a real relay: sessions set up from prekey bundles, the Double Ratchet in both
//! directions, sealed sender once the peer has shared its access key, identity changes held until accepted.

use std::collections::HashMap;
use std::time::Duration;

use relay_tests::{TestRelay, TestUser};

use crate::WAIT;

const PHONES: [&str; 3] = ["+33611111111", "+33622222222", "+33633333333"];

async fn drain(u: &mut TestUser, min: usize) -> Vec<relay_client::ReceivedMessage> {
    u.messenger.receive(min, WAIT).await.expect("receive")
}

/// 200 messages interleaved both ways between three users: every one delivered, decrypted, and in sending order
/// per (sender, recipient) pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_users_interleaved_in_order_per_pair() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut users = Vec::new();
    for p in PHONES {
        users.push(relay.user(p).await.expect("user"));
    }
    let mut expected: HashMap<(usize, usize), Vec<String>> = HashMap::new();
    for i in 0..200 {
        let from = i % 3;
        let to = (i / 3 + from + 1) % 3;
        let to = if to == from { (to + 1) % 3 } else { to };
        let text = format!("m{i} {from}->{to}");
        users[from].messenger.send_text(PHONES[to], &text).await.expect("send");
        expected.entry((from, to)).or_default().push(text);
        // Let recipients read now and then, so sessions see replies and ratchet steps mid-stream.
        if i % 17 == 0 {
            for u in users.iter_mut() {
                let got = u.messenger.receive(0, Duration::ZERO).await.expect("receive");
                record(&mut expected, u.messenger.phone(), &got);
            }
        }
    }
    for u in users.iter_mut() {
        let got = drain(u, 0).await;
        record(&mut expected, u.messenger.phone(), &got);
    }
    let left: Vec<_> = expected.iter().filter(|(_, v)| !v.is_empty()).collect();
    assert!(left.is_empty(), "not delivered (or out of order): {left:?}");
}

/// Removes received messages from the front of the expected per-pair queues, asserting they come in sending order.
fn record(expected: &mut HashMap<(usize, usize), Vec<String>>, me: &str, got: &[relay_client::ReceivedMessage]) {
    let to = PHONES.iter().position(|p| *p == me).expect("known phone");
    for m in got {
        let from = PHONES.iter().position(|p| *p == m.from).expect("known sender");
        let queue = expected.get_mut(&(from, to)).expect("expected pair");
        assert_eq!(queue.first(), Some(&m.text), "out of order for {from}->{to}");
        queue.remove(0);
    }
}

#[tokio::test]
async fn replies_go_sealed_and_sessions_survive_client_restarts() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(PHONES[0]).await.expect("alice");
    let mut bob = relay.user(PHONES[1]).await.expect("bob");

    let first = alice.messenger.send_text(PHONES[1], "hello").await.expect("send");
    assert!(!first.sealed, "alice does not know bob's access key yet");
    assert_eq!(drain(&mut bob, 1).await[0].text, "hello");
    let reply = bob.messenger.send_text(PHONES[0], "hi").await.expect("reply");
    assert!(reply.sealed, "bob learned alice's access key from her message");
    assert_eq!(drain(&mut alice, 1).await[0].text, "hi");

    // Both clients restart: sessions, access keys and de-duplication state come back from their homes.
    alice.reconnect().await.expect("alice restarts");
    bob.reconnect().await.expect("bob restarts");
    let again = alice.messenger.send_text(PHONES[1], "after restart").await.expect("send");
    assert!(again.sealed);
    assert_eq!(drain(&mut bob, 1).await[0].text, "after restart");
    bob.messenger.send_text(PHONES[0], "still here").await.expect("send");
    assert_eq!(drain(&mut alice, 1).await[0].text, "still here");
}

#[tokio::test]
async fn safety_numbers_match_on_both_sides() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(PHONES[0]).await.expect("alice");
    let mut bob = relay.user(PHONES[1]).await.expect("bob");
    alice.messenger.contact(PHONES[1]).await.expect("contact");
    bob.messenger.contact(PHONES[0]).await.expect("contact");
    let (a, _) = alice.messenger.safety_numbers(PHONES[1]).expect("number");
    let (b, _) = bob.messenger.safety_numbers(PHONES[0]).expect("number");
    assert_eq!(a, b);
    let digits: String = a.chars().filter(char::is_ascii_digit).collect();
    assert_eq!((digits.len(), a.split_whitespace().count()), (60, 12));
}

/// Bob's number moves to a new identity. Alice's messages to it are held, loudly, until she accepts the new safety
/// number; then they are delivered to the new identity and never to anyone before.
#[tokio::test]
async fn changed_identity_holds_messages_until_accepted() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(PHONES[0]).await.expect("alice");
    alice.messenger.set_contact_recheck(Duration::ZERO);
    let old_bob = relay.user(PHONES[1]).await.expect("bob");
    alice.messenger.send_text(PHONES[1], "to the old bob").await.expect("send");

    // The old identity gives the number up (re-registers elsewhere) and a new identity takes it.
    let d = relay_proto::wire::DeviceInfo::default();
    let old_identity = old_bob.home.identity().expect("keys");
    old_bob.messenger.connection().register(&old_identity, PHONES[2], d).await.expect("move");
    let mut new_bob = relay.user(PHONES[1]).await.expect("new bob");

    let err = alice.messenger.send_text(PHONES[1], "held 1").await.expect_err("held");
    assert!(matches!(err, relay_client::MessengerError::IdentityChanged { .. }), "{err}");
    assert!(err.to_string().contains("SAFETY NUMBER CHANGED"));
    let err = alice.messenger.send_text(PHONES[1], "held 2").await.expect_err("held");
    assert!(matches!(err, relay_client::MessengerError::IdentityChanged { .. }));
    assert_eq!(alice.messenger.held().expect("held").len(), 2);
    let (old, new) = alice.messenger.safety_numbers(PHONES[1]).expect("numbers");
    assert_ne!(Some(old), new, "the new identity has another safety number");
    assert!(new_bob.messenger.receive(0, Duration::ZERO).await.expect("receive").is_empty(), "nothing leaked");

    let sent = alice.messenger.accept_identity(PHONES[1]).await.expect("accept");
    assert_eq!(sent.len(), 2);
    assert!(alice.messenger.held().expect("held").is_empty());
    let got = drain(&mut new_bob, 2).await;
    assert_eq!(got.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["held 1", "held 2"]);
}

/// Rotating the access key cuts off sealed sends under the old one at once; the contact falls back to its
/// authenticated connection (nothing is lost) and goes back to sealed sends once it has the new key.
#[tokio::test]
async fn a_rotated_access_key_stops_old_sealed_sends_without_losing_messages() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(PHONES[0]).await.expect("alice");
    let mut bob = relay.user(PHONES[1]).await.expect("bob");
    alice.messenger.send_text(PHONES[1], "hi").await.expect("send");
    drain(&mut bob, 1).await;
    assert!(bob.messenger.send_text(PHONES[0], "sealed").await.expect("send").sealed);
    drain(&mut alice, 1).await;

    alice.messenger.rotate_access_key().await.expect("rotate");
    let fallback = bob.messenger.send_text(PHONES[0], "after rotation").await.expect("send");
    assert!(!fallback.sealed, "the old key is refused; bob falls back to his authenticated connection");
    assert_eq!(drain(&mut alice, 1).await[0].text, "after rotation");

    alice.messenger.send_text(PHONES[1], "here is my new key").await.expect("send");
    drain(&mut bob, 1).await;
    assert!(bob.messenger.send_text(PHONES[0], "sealed again").await.expect("send").sealed);
    assert_eq!(drain(&mut alice, 1).await[0].text, "sealed again");
}

/// A batch to two contacts, the first message to each starting its session: every message arrives, in order per
/// recipient, and later messages (sealed, once the replies shared the access keys) continue the same sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_sends_arrives_in_order_and_sessions_continue() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut users = Vec::new();
    for p in PHONES {
        users.push(relay.user(p).await.expect("user"));
    }
    let bob = users[0].messenger.contact(PHONES[1]).await.expect("bob");
    let carol = users[0].messenger.contact(PHONES[2]).await.expect("carol");
    let texts = ["b1", "c1", "b2", "b3", "c2"];
    let batch: Vec<_> = texts.iter().map(|t| (if t.starts_with('b') { &bob } else { &carol }, *t)).collect();
    let done = users[0].messenger.send_batch(&batch).await;
    assert!(done.stopped_by.is_none(), "{:?}", done.stopped_by);
    assert_eq!(done.sent.len(), texts.len());
    let texts_of = |got: Vec<relay_client::ReceivedMessage>| got.into_iter().map(|m| m.text).collect::<Vec<_>>();
    assert_eq!(texts_of(drain(&mut users[1], 3).await), ["b1", "b2", "b3"]);
    assert_eq!(texts_of(drain(&mut users[2], 2).await), ["c1", "c2"]);
    for i in [1, 2] {
        users[i].messenger.send_text(PHONES[0], "reply").await.expect("reply");
    }
    assert_eq!(drain(&mut users[0], 2).await.len(), 2);
    let again = users[0].messenger.send_batch(&[(&bob, "b4"), (&carol, "c3")]).await;
    assert!(again.stopped_by.is_none(), "{:?}", again.stopped_by);
    assert!(again.sent.iter().all(|s| s.sealed), "the replies shared the access keys");
    assert_eq!(texts_of(drain(&mut users[1], 1).await), ["b4"]);
    assert_eq!(texts_of(drain(&mut users[2], 1).await), ["c3"]);
}
