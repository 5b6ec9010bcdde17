//! Access control: nothing without authentication, no replayed or forged authentication, and no way into another
//! account's mailbox or phone number.

use std::time::Duration;

use bytes::Bytes;
use relay_client::{Connection, Identity};
use relay_proto::auth::auth_transcript;
use relay_proto::wire::{Auth, Lookup, Subscribe, client_frame::Body};
use relay_proto::{AccountId, ErrorCode, PROTOCOL_VERSION};
use relay_tests::TestRelay;

async fn raw_connection(relay: &TestRelay) -> Connection {
    let fp = relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fp");
    Connection::connect(relay.addr(), fp).await.expect("connect")
}

fn auth_with(conn_for_transcript: &Connection, account: AccountId, signer: &Identity) -> Body {
    let ekm = relay_quic::ekm(conn_for_transcript.quic()).expect("keying material");
    let signature = signer.sign(&auth_transcript(&ekm, &account));
    Body::Auth(Auth {
        protocol_version: PROTOCOL_VERSION,
        account_id: Bytes::copy_from_slice(account.as_bytes()),
        signature: Bytes::copy_from_slice(&signature),
    })
}

#[tokio::test]
async fn unauthenticated_operations_are_refused() {
    let relay = TestRelay::in_process().await.expect("relay");
    let bob = relay.user("+33698765432").await.expect("bob");
    let conn = raw_connection(&relay).await;
    let bob_id = bob.messenger.account_id();

    let lookup = conn.request(Body::Lookup(Lookup { phone: "+33698765432".into() })).await.expect_err("lookup");
    assert_eq!(lookup.code(), Some(ErrorCode::Unauthenticated));
    let send = conn.send(&bob_id, vec![1, 2, 3].into()).await.expect_err("send");
    assert_eq!(send.code(), Some(ErrorCode::Unauthenticated));
    let ack = conn.ack(vec![1]).await.expect_err("ack");
    assert_eq!(ack.code(), Some(ErrorCode::Unauthenticated));
    let sub = conn.request(Body::Subscribe(Subscribe {})).await.expect_err("subscribe");
    assert_eq!(sub.code(), Some(ErrorCode::Unauthenticated));
}

#[tokio::test]
async fn forged_replayed_and_unknown_authentication_is_refused() {
    let relay = TestRelay::in_process().await.expect("relay");
    let bob = relay.user("+33698765432").await.expect("bob");
    let bob_identity = bob.home.identity().expect("bob's keys");
    let bob_id = bob_identity.account_id();
    let eve = Identity::generate();

    // Eve signs for Bob's account with her own key.
    let conn = raw_connection(&relay).await;
    let err = conn.request(auth_with(&conn, bob_id, &eve)).await.expect_err("forged");
    assert_eq!(err.code(), Some(ErrorCode::BadSignature));

    // A valid signature of Bob's, made for another connection, replayed here.
    let other = raw_connection(&relay).await;
    let err = conn.request(auth_with(&other, bob_id, &bob_identity)).await.expect_err("replayed");
    assert_eq!(err.code(), Some(ErrorCode::BadSignature));
    // ... while on its own connection it is accepted.
    other.request(auth_with(&other, bob_id, &bob_identity)).await.expect("genuine");

    // An account that does not exist.
    let err = conn.request(auth_with(&conn, eve.account_id(), &eve)).await.expect_err("unknown");
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    // A connection authenticates as one account only.
    let err = other.register(&eve, "+33611111111", Default::default()).await.expect_err("second account");
    assert_eq!(err.code(), Some(ErrorCode::InvalidRequest));
}

#[tokio::test]
async fn one_user_cannot_read_or_ack_another_users_mailbox() {
    let relay = TestRelay::in_process().await.expect("relay");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let mut bob = relay.user("+33698765432").await.expect("bob");
    let mut eve = relay.user("+33655555555").await.expect("eve");
    let sent = alice.messenger.send_text("+33698765432", "for bob only").await.expect("send");

    // Eve acknowledges Bob's envelope by its id: nothing is removed.
    assert_eq!(eve.messenger.connection().ack(vec![sent.server_id]).await.expect("ack"), 0);
    // Eve's delivery stream carries only her own (empty) mailbox.
    let got = eve.messenger.receive(0, Duration::from_millis(200)).await.expect("receive");
    assert!(got.is_empty(), "eve received {got:?}");

    // Bob still gets it.
    let got = bob.messenger.receive(1, crate::WAIT).await.expect("receive");
    assert_eq!(got[0].text, "for bob only");
}

#[tokio::test]
async fn a_phone_number_belongs_to_one_identity() {
    let relay = TestRelay::in_process().await.expect("relay");
    let bob = relay.user("+33698765432").await.expect("bob");
    let conn = raw_connection(&relay).await;
    let eve = Identity::generate();
    let err = conn.register(&eve, "+33698765432", Default::default()).await.expect_err("taken");
    assert_eq!(err.code(), Some(ErrorCode::PhoneTaken));
    let entry = bob.messenger.connection().lookup("+33698765432").await.expect("lookup");
    assert_eq!(entry.account, bob.messenger.account_id(), "the directory still points at bob");
}
