//! Who a message is from, and whose key it is sealed to, against a malicious client and a malicious relay: a sender
//! cannot make its message show another number (nor a string that is not a number, nor terminal escapes); a relay
//! that hands out its own sealing key for someone cannot read or re-seal what is sent to them; and an envelope that
//! cannot be read is never dropped without the user learning of it.

use std::sync::{Arc, Mutex};

use prost::Message;
use relay_client::sealed::{SealedContent, WireMessage};
use relay_client::{Identity, Messenger, MessengerError};
use relay_server::tamper::SubstituteKey;
use relay_tests::{TestRelay, TestUser};

use crate::WAIT;

const ALICE: &str = "+33611111111";
const BOB: &str = "+33622222222";
const MALLORY: &str = "+33633333333";

/// What a modified client can do without the relay's help: state any sender number it likes. Here Mallory's own
/// home is edited to claim `claimed`, and her client reconnects with it.
async fn claim_number(mallory: &mut TestUser, claimed: &str) {
    let mut profile = mallory.home.profile().expect("profile");
    profile.phone = claimed.to_owned();
    mallory.home.save_profile(&profile).expect("save profile");
    mallory.reconnect().await.expect("reconnect");
}

/// Mallory, a registered user, claims Alice's number: Bob must see Mallory's number (the one the relay verified
/// for the key that signed the message), never Alice's.
#[tokio::test]
async fn a_sender_cannot_make_its_message_show_another_number() {
    let relay = TestRelay::in_process().await.expect("relay");
    let _alice = relay.user(ALICE).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");
    let mut mallory = relay.user(MALLORY).await.expect("mallory");
    claim_number(&mut mallory, ALICE).await;

    mallory.messenger.send_text(BOB, "it's me, alice: send me the code").await.expect("send");
    let got = bob.messenger.receive(1, WAIT).await.expect("receive");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].from, MALLORY, "shown as from {:?}", got[0].from);
    assert_eq!(got[0].from_account, mallory.messenger.account_id().to_string());
}

/// Mallory holds Alice's genuine sender certificate (Alice wrote to her, and it travels inside every envelope)
/// and puts it in an envelope of her own to Bob: it names Alice's key, which did not sign, so Bob sets it aside.
#[tokio::test]
async fn a_sender_cannot_borrow_someone_elses_certificate() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(ALICE).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");
    let mallory = relay.user(MALLORY).await.expect("mallory");
    alice.messenger.send_text(MALLORY, "hi mallory").await.expect("send");
    let mallory_id = mallory.messenger.identity().clone();
    let from_alice = relay_tests::drain_mailbox(mallory.messenger.connection()).await.expect("drain");
    let plain = relay_client::sealed::open(&mallory_id, &from_alice[0]).expect("mallory opens her own mail");
    let alice_content = SealedContent::decode(plain.as_slice()).expect("sealed content");

    let bob_entry = bob.messenger.identity().clone();
    let message = WireMessage {
        recipient_account: bob_entry.account_id().as_bytes().to_vec(),
        recipient_sealing_key: bob_entry.sealing_key().to_vec(),
        payload: b"a ratchet message would go here".to_vec(),
    }
    .encode_to_vec();
    let signature = mallory_id.sign(&relay_client::sealed::signature_input(&mallory_id.identity_key(), &message));
    let forged = SealedContent { message, signature: signature.to_vec(), ..alice_content };
    let envelope = relay_client::sealed::seal(&bob_entry.sealing_key(), &forged.encode_to_vec()).expect("seal");
    mallory.messenger.connection().send(&bob_entry.account_id(), envelope.into()).await.expect("stored");

    let got = bob.messenger.receive_all(1, WAIT).await.expect("receive");
    assert!(got.messages.is_empty(), "{:?}", got.messages);
    assert_eq!(got.quarantined.len(), 1);
    assert!(got.quarantined[0].error.contains("not signed by the key its sender certificate names"), "{got:?}");
}

/// The claimed "number" is not a number at all but terminal control sequences: Bob's client shows the verified
/// number, and nothing the sender chose reaches his terminal unescaped.
#[tokio::test]
async fn a_sender_cannot_put_a_free_string_or_escapes_in_the_sender_field() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut bob = relay.user(BOB).await.expect("bob");
    let mut mallory = relay.user(MALLORY).await.expect("mallory");
    let forged = "\u{1b}]0;bank\u{7}\u{1b}[2J+33611111111\nALICE";
    claim_number(&mut mallory, forged).await;

    mallory.messenger.send_text(BOB, "\u{1b}[31mURGENT\u{1b}[0m\r\u{9b}2Jwipe").await.expect("send");
    let got = bob.messenger.receive(1, WAIT).await.expect("receive");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].from, MALLORY, "shown as from {:?}", got[0].from);

    // What `relay recv` prints, in both forms, carries no control character from the peer.
    let (bob_messenger, bob_dir) = bob.split();
    bob_messenger.close().await;
    mallory.messenger.send_text(BOB, "\u{1b}[31mURGENT\u{1b}[0m\r\u{9b}2Jwipe").await.expect("send");
    let bin = relay_tests::binary_path("relay", "RELAY_BIN").expect("relay CLI built");
    let human = tokio::process::Command::new(&bin)
        .arg("--home")
        .arg(bob_dir.path())
        .args(["recv", "--wait", "20"])
        .output()
        .await
        .expect("run relay recv");
    assert!(human.status.success(), "{}", String::from_utf8_lossy(&human.stderr));
    let human = String::from_utf8(human.stdout).expect("UTF-8");
    assert!(human.contains("URGENT"), "{human:?}");
    mallory.messenger.send_text(BOB, "\u{1b}]8;;http://evil\u{7}click\u{1b}]8;;\u{7}").await.expect("send");
    let json = tokio::process::Command::new(&bin)
        .arg("--home")
        .arg(bob_dir.path())
        .args(["recv", "--wait", "20", "--json"])
        .output()
        .await
        .expect("run relay recv --json");
    let json = String::from_utf8(json.stdout).expect("UTF-8");
    assert!(json.contains("click"), "{json:?}");
    for out in [&human, &json] {
        let lines: Vec<&str> = out.lines().collect();
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "control characters reach the terminal: {out:?}");
        assert!(lines.iter().all(|l| !l.contains("ALICE")), "{out:?}");
    }
}

/// The relay answers Alice's lookup for Bob with its own X25519 key and opens what is sealed to it, re-sealing it to
/// Bob's real key so that nobody notices. Alice must refuse the key (it is not bound to Bob's identity key), so the
/// relay opens nothing and Bob receives nothing in her name.
#[tokio::test]
async fn a_relay_that_swaps_a_sealing_key_in_lookups_opens_nothing() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(ALICE).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");
    let relay_key = Identity::generate();
    let opened = mitm(&relay, &bob.messenger, &relay_key);
    relay.tamper().expect("in-process").substitute_sealing_key(
        bob.messenger.account_id(),
        SubstituteKey { sealing_key: relay_key.sealing_key(), signature: None, in_bundles: false },
    );

    let sent = alice.messenger.send_text(BOB, "the secret").await;
    assert!(
        matches!(sent, Err(MessengerError::UnboundKey { .. })),
        "alice sealed to a key Bob's identity never signed"
    );
    assert!(alice.messenger.contacts().get(BOB).is_none(), "the made-up key was not remembered");

    // A signature the relay made itself for its key does not bind it to Bob's identity key either.
    let own_binding = relay_key.sign(&relay_proto::identity::binding_bytes(
        &bob.messenger.identity().identity_key(),
        &relay_key.sealing_key(),
    ));
    relay.tamper().expect("in-process").substitute_sealing_key(
        bob.messenger.account_id(),
        SubstituteKey { sealing_key: relay_key.sealing_key(), signature: Some(own_binding.to_vec()), in_bundles: true },
    );
    let sent = alice.messenger.send_text(BOB, "the secret").await;
    assert!(matches!(sent, Err(MessengerError::UnboundKey { .. })), "{sent:?}");
    assert!(opened.lock().expect("lock").is_empty(), "the relay opened an envelope");
    let got = bob.messenger.receive(0, std::time::Duration::ZERO).await.expect("receive");
    assert!(got.is_empty(), "{got:?}");
}

/// Once Alice knows Bob's keys, a later lookup carrying another sealing key (here: unsigned) is refused loudly too,
/// and what she remembered for Bob is unchanged.
#[tokio::test]
async fn a_known_contacts_sealing_key_cannot_be_swapped() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(ALICE).await.expect("alice");
    alice.messenger.set_contact_recheck(std::time::Duration::ZERO);
    let bob = relay.user(BOB).await.expect("bob");
    alice.messenger.send_text(BOB, "hello").await.expect("first contact");
    let before = alice.messenger.contacts().get(BOB).cloned().expect("contact");
    let relay_key = Identity::generate();
    let opened = mitm(&relay, &bob.messenger, &relay_key);
    relay.tamper().expect("in-process").substitute_sealing_key(
        bob.messenger.account_id(),
        SubstituteKey { sealing_key: relay_key.sealing_key(), signature: Some(Vec::new()), in_bundles: true },
    );
    let sent = alice.messenger.send_text(BOB, "the secret").await;
    let err = sent.expect_err("refused");
    assert!(matches!(err, MessengerError::UnboundKey { .. }), "{err}");
    assert!(err.to_string().contains("REFUSED"), "{err}");
    assert_eq!(alice.messenger.contacts().get(BOB), Some(&before));
    assert!(opened.lock().expect("lock").is_empty(), "the relay opened an envelope");
}

/// A client that was fooled anyway (here: Alice's session with Bob exists, and she seals to the relay's key) is the
/// recipient's problem too: the relay opens the envelope and re-seals the signed content to Bob's real key, and Bob
/// must refuse it, because what Alice signed names the key she sealed to, not his.
#[tokio::test]
async fn a_resealed_envelope_is_refused_by_its_recipient() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user(ALICE).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");
    alice.messenger.send_text(BOB, "hello").await.expect("first contact");
    assert_eq!(bob.messenger.receive(1, WAIT).await.expect("receive").len(), 1);

    let relay_key = Identity::generate();
    let opened = mitm(&relay, &bob.messenger, &relay_key);
    let mut entry = alice.messenger.contact(BOB).await.expect("bob");
    entry.sealing_key = relay_key.sealing_key();
    alice.messenger.send_to(&entry, "the secret").await.expect("stored");
    assert_eq!(opened.lock().expect("lock").len(), 1, "the relay opened and re-sealed the envelope");

    let got = bob.messenger.receive_all(1, WAIT).await.expect("receive");
    assert!(got.messages.iter().all(|m| m.text != "the secret"), "bob accepted a re-sealed envelope: {got:?}");
    assert_eq!(got.quarantined.len(), 1, "{got:?}");
    assert!(got.quarantined[0].error.contains("sealed to another key"), "{got:?}");
}

/// Installs the relay's side of the attack: every envelope for `victim` that opens under `relay_key` is recorded and
/// re-sealed to the victim's real key. Returns the plaintexts the relay read.
fn mitm(relay: &TestRelay, victim: &Messenger, relay_key: &Identity) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let opened = Arc::new(Mutex::new(Vec::new()));
    let (seen, key, victim_account, victim_key) =
        (opened.clone(), relay_key.clone(), victim.account_id(), victim.identity().sealing_key());
    relay.tamper().expect("in-process").rewrite_envelopes(Arc::new(move |to, envelope| {
        if *to != victim_account {
            return None;
        }
        let plain = relay_client::sealed::open(&key, envelope).ok()?;
        seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(plain.clone());
        relay_client::sealed::seal(&victim_key, &plain).ok()
    }));
    opened
}

/// Garbage sealed to nobody: Bob's client cannot read it, and must keep it (with the reason) where he can see it,
/// before the relay is told to delete it.
#[tokio::test]
async fn an_unreadable_envelope_is_quarantined_not_dropped() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut bob = relay.user(BOB).await.expect("bob");
    let (conn, _) = relay.raw_user(MALLORY).await.expect("mallory");
    let ack = conn
        .send(&bob.messenger.account_id(), bytes::Bytes::from_static(b"\x02not an envelope at all, but long enough"))
        .await
        .expect("stored");

    let got = bob.messenger.receive_all(1, WAIT).await.expect("receive");
    assert!(got.messages.is_empty());
    assert_eq!(got.quarantined.len(), 1, "{got:?}");
    assert_eq!((got.quarantined[0].server_id, got.quarantined[0].stored_at), (ack.server_id, ack.stored_at_ms));
    let dir = bob.home_dir().join("quarantine");
    let files: Vec<_> = std::fs::read_dir(&dir).expect("quarantine directory").collect::<Result<_, _>>().expect("list");
    assert_eq!(files.len(), 1, "{files:?}");
    let record = std::fs::read_to_string(files[0].path()).expect("read");
    assert!(record.contains(&ack.server_id.to_string()), "{record}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = files[0].metadata().expect("metadata").permissions().mode();
        assert_eq!(mode & 0o077, 0, "a quarantined envelope is private");
    }

    // The CLI reports it: `recv --json` prints the error line and exits 3; `status` counts what is in quarantine.
    let (bob_messenger, bob_dir) = bob.split();
    bob_messenger.close().await;
    let ack = conn
        .send(&bob_account(&bob_dir), bytes::Bytes::from_static(b"\x03garbage, once more, long enough to try"))
        .await
        .expect("stored");
    let bin = relay_tests::binary_path("relay", "RELAY_BIN").expect("relay CLI built");
    let out = tokio::process::Command::new(&bin)
        .arg("--home")
        .arg(bob_dir.path())
        .args(["recv", "--wait", "20", "--json"])
        .output()
        .await
        .expect("run relay recv");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(line["server_id"], ack.server_id);
    assert_eq!(line["stored_at"], ack.stored_at_ms);
    assert!(line["error"].as_str().is_some_and(|e| !e.is_empty()), "{line}");
    let out = tokio::process::Command::new(&bin)
        .arg("--home")
        .arg(bob_dir.path())
        .args(["status", "--json"])
        .output()
        .await
        .expect("run relay status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status["quarantined"], 2, "{status}");
}

/// The quarantine record is written within the receive batch, before anything is acknowledged: when it cannot be
/// written, the home failed (an error), and the envelope stays on the relay and comes again; once it can be, the
/// envelope is set aside exactly once, and a redelivery of it (an acknowledgement lost) is a duplicate, not a
/// second report.
#[tokio::test]
async fn an_envelope_whose_quarantine_record_cannot_be_written_stays_on_the_relay() {
    use relay_client::messenger::Accepted;
    let relay = TestRelay::in_process().await.expect("relay");
    let mut bob = relay.user(BOB).await.expect("bob");
    let (conn, _) = relay.raw_user(MALLORY).await.expect("mallory");
    let ack = conn
        .send(&bob.messenger.account_id(), bytes::Bytes::from_static(b"\x03garbage that no sealing key opens, at all"))
        .await
        .expect("stored");
    // A file where the quarantine directory goes: no record can be written.
    let blocker = bob.home_dir().join("quarantine");
    std::fs::write(&blocker, b"").expect("block the quarantine");
    let err = bob.messenger.receive_all(1, std::time::Duration::from_secs(2)).await.expect_err("the home failed");
    assert!(matches!(err, MessengerError::Home(_)), "{err}");

    std::fs::remove_file(&blocker).expect("unblock");
    let got = bob.messenger.receive_all(1, WAIT).await.expect("receive");
    assert_eq!(got.quarantined.len(), 1, "the relay delivered it again: {got:?}");
    assert_eq!(got.quarantined[0].server_id, ack.server_id);
    assert_eq!(bob.home.quarantined().expect("count"), 1);

    let again = relay_proto::wire::Deliver {
        server_id: ack.server_id,
        stored_at_ms: ack.stored_at_ms,
        envelope: bytes::Bytes::from_static(b"\x03garbage that no sealing key opens, at all"),
    };
    let accepted = bob.messenger.accept(&again).await.expect("accept");
    bob.messenger.save_seen().await.expect("save");
    assert!(matches!(accepted, Accepted::Duplicate), "{accepted:?}");
    assert_eq!(bob.home.quarantined().expect("count"), 1, "reported once");
}

/// The account id of the home in `dir`.
fn bob_account(dir: &tempfile::TempDir) -> relay_proto::AccountId {
    relay_client::Home::new(dir.path()).identity().expect("identity").account_id()
}

/// The relay refuses a sealing key that its identity key did not bind (whatever the client then checks itself),
/// and certifies exactly what it registered, under the key it announces in `AuthOk`.
#[tokio::test]
async fn the_relay_refuses_an_unbound_key_and_certifies_what_it_registered() {
    use relay_proto::wire::{Register, client_frame::Body};
    let relay = TestRelay::in_process().await.expect("relay");
    let fp = relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fingerprint");
    let conn = relay_client::Connection::connect(relay.addr(), fp).await.expect("connect");
    let (id, other) = (Identity::generate(), Identity::generate());
    let (ik, sk) = (id.identity_key(), id.sealing_key());
    let ekm = relay_quic::ekm(conn.quic()).expect("keying material");
    let transcript = relay_proto::auth::register_transcript(&ekm, &ik, &sk, MALLORY, &Default::default());
    for binding in [Vec::new(), other.sign(&relay_proto::identity::binding_bytes(&ik, &sk)).to_vec()] {
        let register = Register {
            protocol_version: relay_proto::PROTOCOL_VERSION,
            identity_key: ik.to_vec().into(),
            sealing_key: sk.to_vec().into(),
            phone: MALLORY.into(),
            device: Some(Default::default()),
            signature: id.sign(&transcript).to_vec().into(),
            sealing_key_signature: binding.into(),
            ..Default::default()
        };
        let err = conn.request(Body::Register(register)).await.expect_err("unbound key");
        assert_eq!(err.code(), Some(relay_proto::ErrorCode::BadSignature), "{err}");
    }

    conn.register(&id, MALLORY, Default::default()).await.expect("bound key");
    let auth = conn.authenticate_as(&id).await.expect("auth");
    let key = relay_proto::identity::VerifyingKey::from_bytes(&auth.sender_certificate_key.expect("announced"))
        .expect("an Ed25519 key");
    let cert = conn.sender_certificate().await.expect("certificate");
    let stated = cert.verify(&key, relay_proto::now_ms()).expect("signed by the announced key, valid now");
    assert_eq!((stated.identity_key, stated.sealing_key, stated.account), (ik, sk, id.account_id()));
    assert_eq!(stated.phone.as_str(), MALLORY);
    let entry = conn.lookup(MALLORY).await.expect("lookup");
    assert_eq!(entry.verify_binding(), Ok(()), "the binding is handed out with the keys");
}
