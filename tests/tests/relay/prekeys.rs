//! Prekey publication and bundle fetches, and sealed-sender sends, at the wire level.

use bytes::Bytes;
use relay_client::{Connection, InboxEvent};
use relay_proto::ErrorCode;
use relay_proto::auth::sha256;
use relay_proto::wire::{KemPrekey, OneTimePrekey, SignedPrekey, UploadPrekeys};
use relay_tests::TestRelay;

fn kem(id: u32) -> KemPrekey {
    KemPrekey { id, public_key: vec![id as u8; 1184].into(), signature: vec![0; 64].into() }
}

fn upload() -> UploadPrekeys {
    UploadPrekeys {
        signed_prekey: Some(SignedPrekey { id: 1, public_key: vec![1; 32].into(), signature: vec![0; 64].into() }),
        one_time_prekeys: (10..12).map(|id| OneTimePrekey { id, public_key: vec![2; 32].into() }).collect(),
        kem_prekeys: vec![kem(20)],
        last_resort_kem_prekey: Some(kem(99)),
    }
}

#[tokio::test]
async fn bundles_consume_one_time_keys_and_fall_back_to_last_resort() {
    let relay = TestRelay::in_process().await.expect("relay");
    let (alice, alice_identity) = relay.raw_user("+33612345678").await.expect("alice");
    let (bob, bob_identity) = relay.raw_user("+33698765432").await.expect("bob");
    let counts = alice.upload_prekeys(upload()).await.expect("upload");
    assert_eq!((counts.one_time_prekeys, counts.kem_prekeys), (2, 1));
    assert!(counts.has_signed_prekey && counts.has_last_resort_kem_prekey);

    let conn = &bob;
    let alice_id = alice_identity.account_id();
    let b1 = conn.fetch_bundle(&alice_id).await.expect("bundle");
    let b2 = conn.fetch_bundle(&alice_id).await.expect("bundle");
    let b3 = conn.fetch_bundle(&alice_id).await.expect("bundle");
    let otp = |b: &relay_proto::wire::Bundle| b.one_time_prekey.as_ref().map(|k| k.id);
    assert_eq!((otp(&b1), otp(&b2), otp(&b3)), (Some(10), Some(11), None));
    let kem_id = |b: &relay_proto::wire::Bundle| (b.kem_prekey.as_ref().map(|k| k.id), b.kem_last_resort);
    assert_eq!(kem_id(&b1), (Some(20), false));
    assert_eq!(kem_id(&b2), (Some(99), true));
    assert_eq!(b1.identity_dh_key.as_ref(), alice_identity.sealing_key());

    // The owner learns that its pools ran dry when it next authenticates.
    let fp = relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fp");
    let again = Connection::connect(relay.addr(), fp).await.expect("connect");
    let counts = again.authenticate(&alice_identity).await.expect("auth");
    assert_eq!((counts.one_time_prekeys, counts.kem_prekeys), (0, 0));
    assert!(counts.low_watermark > 0);

    // Bob has published nothing.
    let err = alice.fetch_bundle(&bob_identity.account_id()).await.expect_err("none");
    assert_eq!(err.code(), Some(ErrorCode::NoPrekeys));
}

#[tokio::test]
async fn sealed_sends_need_the_recipients_access_key_and_nothing_else() {
    let relay = TestRelay::in_process().await.expect("relay");
    let (bob, bob_identity) = relay.raw_user("+33698765432").await.expect("bob");
    let bob_id = bob_identity.account_id();
    let fp = relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fp");
    let anonymous = Connection::connect(relay.addr(), fp).await.expect("connect");
    let envelope = Bytes::from_static(b"opaque sealed envelope");

    // No access key set yet: refused.
    let err = anonymous.sealed_send(&bob_id, envelope.clone(), &[7; 32]).await.expect_err("no key");
    assert_eq!(err.code(), Some(ErrorCode::BadAccessKey));
    let access_key = [42u8; 32];
    bob.set_access_key(sha256(&access_key)).await.expect("set");
    let err = anonymous.sealed_send(&bob_id, envelope.clone(), &[7; 32]).await.expect_err("wrong key");
    assert_eq!(err.code(), Some(ErrorCode::BadAccessKey));
    anonymous.sealed_send(&bob_id, envelope.clone(), &access_key).await.expect("right key");

    // The anonymous connection can do nothing that needs an identity.
    let err = anonymous.lookup("+33698765432").await.expect_err("lookup");
    assert_eq!(err.code(), Some(ErrorCode::Unauthenticated));

    let mut inbox = bob.subscribe().await.expect("inbox");
    loop {
        match crate::bounded("delivery", inbox.next()).await {
            Some(Ok(InboxEvent::Deliver(d))) => {
                assert_eq!(d.envelope, envelope);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn sealed_sends_are_rate_limited_per_recipient() {
    let relay = TestRelay::in_process_with(|c| c.limits.sealed_sends_per_minute = 3).await.expect("relay");
    let (bob, bob_identity) = relay.raw_user("+33698765432").await.expect("bob");
    let key = [1u8; 32];
    bob.set_access_key(sha256(&key)).await.expect("set");
    let fp = relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fp");
    let anonymous = Connection::connect(relay.addr(), fp).await.expect("connect");
    for _ in 0..3 {
        anonymous.sealed_send(&bob_identity.account_id(), Bytes::from_static(b"x"), &key).await.expect("within");
    }
    let err = anonymous.sealed_send(&bob_identity.account_id(), Bytes::from_static(b"x"), &key).await;
    assert_eq!(err.expect_err("limited").code(), Some(ErrorCode::RateLimited));
}

/// Peers consume one-time prekeys; a client tops its pools up when it refreshes (and at every connect).
#[tokio::test]
async fn a_client_replenishes_its_pools_when_peers_drained_them() {
    let relay = TestRelay::in_process().await.expect("relay");
    let alice = relay.user("+33612345678").await.expect("alice");
    let alice_id = alice.messenger.account_id();
    // Two peers (each within its own lookup budget) take 100 bundles: the pools that registration filled run dry.
    let (p1, _) = relay.raw_user("+33611111111").await.expect("peer");
    let (p2, _) = relay.raw_user("+33622222222").await.expect("peer");
    for peer in [&p1, &p2] {
        for _ in 0..50 {
            peer.fetch_bundle(&alice_id).await.expect("bundle");
        }
    }
    let counts = alice.messenger.connection().upload_prekeys(Default::default()).await.expect("counts");
    assert_eq!((counts.one_time_prekeys, counts.kem_prekeys), (0, 0));

    alice.messenger.refresh_prekeys().await.expect("refresh");
    let counts = alice.messenger.connection().upload_prekeys(Default::default()).await.expect("counts");
    assert!(
        counts.one_time_prekeys >= counts.low_watermark && counts.kem_prekeys >= counts.low_watermark,
        "{counts:?}"
    );
    // And a fresh bundle has a one-time key again, that Alice can answer.
    let b = p1.fetch_bundle(&alice_id).await.expect("bundle");
    assert!(b.one_time_prekey.is_some() && !b.kem_last_resort);
}
