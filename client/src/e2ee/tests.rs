//! Whole-session tests, in memory: PQXDH set-up through the wire encoding, then the Double Ratchet under
//! reordering, loss, replay, tampering and restarts.

use super::ratchet::{MAX_SKIP, MAX_SKIPPED_KEYS};
use super::*;
use crate::identity::Identity;

/// Both sides of an established session.
struct Pair {
    alice: RatchetState,
    bob: RatchetState,
    ad: Vec<u8>,
}

impl Pair {
    fn a2b(&mut self, text: &str) -> RatchetMessage {
        self.alice.encrypt(text.as_bytes(), &self.ad).expect("alice encrypts")
    }

    fn b2a(&mut self, text: &str) -> RatchetMessage {
        self.bob.encrypt(text.as_bytes(), &self.ad).expect("bob encrypts")
    }

    fn deliver_to_bob(&mut self, m: &RatchetMessage) -> Result<String, E2eeError> {
        self.bob.decrypt(m, &self.ad).map(|p| String::from_utf8(p).expect("utf-8"))
    }

    fn deliver_to_alice(&mut self, m: &RatchetMessage) -> Result<String, E2eeError> {
        self.alice.decrypt(m, &self.ad).map(|p| String::from_utf8(p).expect("utf-8"))
    }

    /// Alice sends `n` messages, all delivered in order.
    fn burst_a2b(&mut self, n: usize) {
        for i in 0..n {
            let m = self.a2b(&format!("a{i}"));
            assert_eq!(self.deliver_to_bob(&m).as_deref(), Ok(format!("a{i}").as_str()));
        }
    }

    fn burst_b2a(&mut self, n: usize) {
        for i in 0..n {
            let m = self.b2a(&format!("b{i}"));
            assert_eq!(self.deliver_to_alice(&m).as_deref(), Ok(format!("b{i}").as_str()));
        }
    }
}

fn bob_with_pools(pools: bool) -> (Identity, PrekeyStore) {
    let bob = Identity::generate();
    let mut store = PrekeyStore::generate(&bob);
    if pools {
        store.generate_one_time(3);
        store.generate_kem(&bob, 3);
    }
    (bob, store)
}

/// Alice's side of the first message: bundle → PreKey message bytes, and her state.
fn alice_starts(alice: &Identity, bundle: &PrekeyBundle, text: &str) -> (Vec<u8>, RatchetState, Vec<u8>) {
    let (header, sk, ad) = initiate(alice, bundle).expect("initiate");
    let mut state = RatchetState::init_initiator(&sk, &bundle.signed_prekey.public).expect("init initiator");
    let message = state.encrypt(text.as_bytes(), &ad).expect("encrypt");
    (E2eeMessage::PreKey { header, message }.encode(), state, ad)
}

/// Bob's side of the first message: wire bytes → his state, the associated data and the plaintext.
fn bob_answers(
    bob: &Identity,
    store: &mut PrekeyStore,
    wire: &[u8],
) -> Result<(RatchetState, Vec<u8>, Vec<u8>), E2eeError> {
    let E2eeMessage::PreKey { header, message } = E2eeMessage::decode(wire)? else {
        return Err(E2eeError::Malformed("expected a PreKey message"));
    };
    let (sk, ad) = respond(bob, store, &header)?;
    let mut state = RatchetState::init_responder(&sk, &store.signed_prekey_secret(header.signed_prekey_id)?);
    let plaintext = state.decrypt(&message, &ad)?;
    Ok((state, ad, plaintext))
}

fn establish(pools: bool) -> Pair {
    let alice = Identity::generate();
    let (bob, mut store) = bob_with_pools(pools);
    let (wire, alice_state, ad_a) = alice_starts(&alice, &store.bundle(&bob), "hello bob");
    let (bob_state, ad_b, plaintext) = bob_answers(&bob, &mut store, &wire).expect("bob answers");
    assert_eq!((plaintext.as_slice(), &ad_a), (b"hello bob".as_slice(), &ad_b));
    Pair { alice: alice_state, bob: bob_state, ad: ad_a }
}

#[test]
fn set_up_works_with_full_and_with_empty_one_time_pools() {
    for pools in [true, false] {
        let alice = Identity::generate();
        let (bob, mut store) = bob_with_pools(pools);
        let bundle = store.bundle(&bob);
        assert_eq!(bundle.one_time_prekey.is_some(), pools);
        assert_eq!(bundle.kem_prekey.last_resort, !pools);
        let (wire, alice_state, ad) = alice_starts(&alice, &bundle, "first");
        let (bob_state, _, plaintext) = bob_answers(&bob, &mut store, &wire).expect("bob answers");
        assert_eq!(plaintext, b"first");
        let mut pair = Pair { alice: alice_state, bob: bob_state, ad };
        pair.burst_b2a(2);
        pair.burst_a2b(2);
    }
}

#[test]
fn the_responder_cannot_send_first() {
    let (bob, store) = bob_with_pools(false);
    let (_, sk, ad) = initiate(&Identity::generate(), &store.bundle(&bob)).expect("initiate");
    let spk = store.signed_prekey_secret(store.signed_prekey().id).expect("current");
    let mut state = RatchetState::init_responder(&sk, &spk);
    assert!(!state.can_send());
    assert_eq!(state.encrypt(b"x", &ad).err(), Some(E2eeError::NotReady));
}

#[test]
fn a_corrupted_kem_ciphertext_breaks_the_session() {
    let alice = Identity::generate();
    let (bob, store) = bob_with_pools(true);
    let (wire, _, _) = alice_starts(&alice, &store.bundle(&bob), "hello");
    let E2eeMessage::PreKey { mut header, message } = E2eeMessage::decode(&wire).expect("decode") else {
        panic!("not a PreKey message")
    };
    header.kem_ciphertext[0] ^= 0x80;
    let corrupted = E2eeMessage::PreKey { header, message }.encode();
    // Everything else being intact, only the ML-KEM shared secret differs: the first message cannot decrypt.
    assert_eq!(bob_answers(&bob, &mut store.clone(), &corrupted).err(), Some(E2eeError::Decrypt));
    let (_, _, plaintext) = bob_answers(&bob, &mut store.clone(), &wire).expect("intact message decrypts");
    assert_eq!(plaintext, b"hello");
}

#[test]
fn a_replayed_initial_message_finds_its_one_time_prekey_gone() {
    let alice = Identity::generate();
    let (bob, mut store) = bob_with_pools(true);
    let (wire, _, _) = alice_starts(&alice, &store.bundle(&bob), "hello");
    bob_answers(&bob, &mut store, &wire).expect("first delivery");
    assert!(matches!(
        bob_answers(&bob, &mut store, &wire),
        Err(E2eeError::MissingPrekey { kind: PrekeyKind::OneTime, .. })
    ));
}

#[test]
fn in_order_both_ways() {
    let mut p = establish(true);
    for _ in 0..3 {
        p.burst_b2a(3);
        p.burst_a2b(3);
    }
    assert_eq!((p.alice.skipped_keys(), p.bob.skipped_keys()), (0, 0));
}

#[test]
fn out_of_order_within_and_across_ratchet_steps() {
    let mut p = establish(true);
    let a: Vec<_> = (0..5).map(|i| p.a2b(&format!("a{i}"))).collect();
    assert_eq!(p.deliver_to_bob(&a[3]).as_deref(), Ok("a3"));
    assert_eq!(p.deliver_to_bob(&a[0]).as_deref(), Ok("a0"));
    assert_eq!(p.bob.skipped_keys(), 2);
    // Bob answers: Alice's next messages are in a new chain.
    let b0 = p.b2a("b0");
    assert_eq!(p.deliver_to_alice(&b0).as_deref(), Ok("b0"));
    let c: Vec<_> = (0..3).map(|i| p.a2b(&format!("c{i}"))).collect();
    assert_eq!(p.deliver_to_bob(&c[2]).as_deref(), Ok("c2"));
    // The new chain closed the old one at PN = 5: a4 was skipped then.
    assert_eq!(p.bob.skipped_keys(), 2 + 1 + 2);
    for (m, text) in [(&a[4], "a4"), (&c[0], "c0"), (&a[1], "a1"), (&c[1], "c1"), (&a[2], "a2")] {
        assert_eq!(p.deliver_to_bob(m).as_deref(), Ok(text));
    }
    assert_eq!(p.bob.skipped_keys(), 0);
    p.burst_b2a(2);
}

#[test]
fn dropped_messages_do_not_block_later_ones() {
    let mut p = establish(false);
    let a: Vec<_> = (0..4).map(|i| p.a2b(&format!("a{i}"))).collect();
    for i in [0, 3] {
        assert_eq!(p.deliver_to_bob(&a[i]).as_deref(), Ok(format!("a{i}").as_str()));
    }
    let b: Vec<_> = (0..3).map(|i| p.b2a(&format!("b{i}"))).collect();
    assert_eq!(p.deliver_to_alice(&b[2]).as_deref(), Ok("b2"));
    p.burst_a2b(3);
    p.burst_b2a(3);
    assert_eq!((p.bob.skipped_keys(), p.alice.skipped_keys()), (2, 2), "the lost ones wait, nothing else does");
}

#[test]
fn replays_are_rejected_as_such_and_change_nothing() {
    let mut p = establish(true);
    let a: Vec<_> = (0..3).map(|i| p.a2b(&format!("a{i}"))).collect();
    assert_eq!(p.deliver_to_bob(&a[0]).as_deref(), Ok("a0"));
    assert_eq!(p.deliver_to_bob(&a[0]), Err(E2eeError::Replay), "in-order message replayed");
    assert_eq!(p.deliver_to_bob(&a[2]).as_deref(), Ok("a2"));
    assert_eq!(p.deliver_to_bob(&a[1]).as_deref(), Ok("a1"));
    assert_eq!(p.deliver_to_bob(&a[1]), Err(E2eeError::Replay), "skipped message replayed");
    // Across a ratchet step: the old chain is closed, its messages are still recognised.
    let b0 = p.b2a("b0");
    assert_eq!(p.deliver_to_alice(&b0).as_deref(), Ok("b0"));
    assert_eq!(p.deliver_to_alice(&b0), Err(E2eeError::Replay));
    let c0 = p.a2b("c0");
    assert_eq!(p.deliver_to_bob(&c0).as_deref(), Ok("c0"));
    assert_eq!(p.deliver_to_bob(&a[2]), Err(E2eeError::Replay), "message of a closed chain replayed");
    assert_eq!(p.deliver_to_bob(&c0), Err(E2eeError::Replay));
    p.burst_b2a(2);
    p.burst_a2b(2);
}

#[test]
fn tampering_is_rejected_and_the_session_goes_on() {
    let mut p = establish(true);
    let a: Vec<_> = (0..3).map(|i| p.a2b(&format!("a{i}"))).collect();
    assert_eq!(p.deliver_to_bob(&a[0]).as_deref(), Ok("a0"));

    let mut bad = a[1].clone();
    let last = bad.ciphertext.len() - 1;
    bad.ciphertext[last] ^= 1;
    assert_eq!(p.deliver_to_bob(&bad), Err(E2eeError::Decrypt));
    let mut bad = a[1].clone();
    bad.ciphertext[0] ^= 1;
    assert_eq!(p.deliver_to_bob(&bad), Err(E2eeError::Decrypt));
    let mut bad = a[1].clone();
    bad.header.n += 1;
    assert_eq!(p.deliver_to_bob(&bad), Err(E2eeError::Decrypt));
    let mut bad = a[1].clone();
    bad.header.pn = 9;
    assert_eq!(p.deliver_to_bob(&bad), Err(E2eeError::Decrypt));
    let mut bad = a[1].clone();
    bad.header.dh[5] ^= 1;
    assert!(matches!(p.deliver_to_bob(&bad), Err(E2eeError::Decrypt | E2eeError::Degenerate)));
    let mut bad = a[2].clone();
    bad.header.n = a[1].header.n;
    assert_eq!(p.deliver_to_bob(&bad), Err(E2eeError::Decrypt), "a2's body under a1's number");
    let other_ad = vec![0; p.ad.len()];
    assert_eq!(p.bob.decrypt(&a[1], &other_ad), Err(E2eeError::Decrypt), "wrong associated data");
    assert_eq!(p.bob.skipped_keys(), 0, "no failed attempt left a trace");

    assert_eq!(p.deliver_to_bob(&a[2]).as_deref(), Ok("a2"));
    assert_eq!(p.deliver_to_bob(&a[1]).as_deref(), Ok("a1"));
    p.burst_b2a(2);
    p.burst_a2b(2);
}

#[test]
fn two_hundred_alternating_turns() {
    let mut p = establish(true);
    for turn in 0..200 {
        if turn % 2 == 0 {
            let m = p.b2a(&format!("turn {turn}"));
            assert_eq!(p.deliver_to_alice(&m), Ok(format!("turn {turn}")));
        } else {
            let m = p.a2b(&format!("turn {turn}"));
            assert_eq!(p.deliver_to_bob(&m), Ok(format!("turn {turn}")));
        }
    }
    // Every turn was a ratchet step: the chains are fresh.
    assert_eq!(p.bob.encrypt(b"x", &p.ad).expect("encrypt").header.n, 0);
}

#[test]
fn more_than_max_skip_in_one_chain_is_an_error() {
    let mut p = establish(true);
    let a: Vec<_> = (0..=MAX_SKIP + 1).map(|i| p.a2b(&format!("a{i}"))).collect();
    let over = &a[(MAX_SKIP + 1) as usize];
    assert_eq!(p.deliver_to_bob(over), Err(E2eeError::TooManySkipped { skipped: 1001, max: MAX_SKIP }));
    assert_eq!(p.bob.skipped_keys(), 0);
    let at_limit = &a[MAX_SKIP as usize];
    assert_eq!(p.deliver_to_bob(at_limit).as_deref(), Ok("a1000"), "exactly MAX_SKIP skipped keys is allowed");
    assert_eq!(p.bob.skipped_keys(), MAX_SKIP as usize);
    assert_eq!(p.deliver_to_bob(over).as_deref(), Ok("a1001"));
}

#[test]
fn too_many_skipped_at_a_ratchet_step_is_an_error() {
    let mut p = establish(true);
    let b0 = p.b2a("b0");
    assert_eq!(p.deliver_to_alice(&b0).as_deref(), Ok("b0"));
    let c0 = p.a2b("c0");
    assert_eq!(p.deliver_to_bob(&c0).as_deref(), Ok("c0"));
    for i in 1..=MAX_SKIP + 1 {
        p.a2b(&format!("lost c{i}"));
    }
    let b1 = p.b2a("b1");
    assert_eq!(p.deliver_to_alice(&b1).as_deref(), Ok("b1"));
    // Alice's next chain announces PN = 1002 for the chain Bob last saw at message 0: closing it would skip 1001.
    let d0 = p.a2b("d0");
    assert_eq!(d0.header.pn, MAX_SKIP + 2);
    assert_eq!(p.deliver_to_bob(&d0), Err(E2eeError::TooManySkipped { skipped: 1001, max: MAX_SKIP }));
    assert_eq!(p.bob.skipped_keys(), 0);
}

#[test]
fn the_skipped_key_store_is_bounded_and_evicts_the_oldest() {
    let mut p = establish(true);
    // Three chains of Alice's, each delivered only by its last message, with replies in between.
    let mut first_chain = Vec::new();
    for chain in 0..3 {
        let count = if chain < 2 { MAX_SKIP + 1 } else { 11 };
        let sent: Vec<_> = (0..count).map(|i| p.a2b(&format!("{chain}/{i}"))).collect();
        let last = sent.last().expect("not empty");
        assert_eq!(p.deliver_to_bob(last), Ok(format!("{chain}/{}", count - 1)));
        let reply = p.b2a("ack");
        assert_eq!(p.deliver_to_alice(&reply).as_deref(), Ok("ack"));
        if chain == 0 {
            first_chain = sent;
        }
    }
    // 1000 + 1000 + 10 keys were skipped; the 10 oldest went.
    assert_eq!(p.bob.skipped_keys(), MAX_SKIPPED_KEYS);
    assert_eq!(p.deliver_to_bob(&first_chain[0]), Err(E2eeError::KeyEvicted));
    assert_eq!(p.deliver_to_bob(&first_chain[9]), Err(E2eeError::KeyEvicted));
    assert_eq!(p.deliver_to_bob(&first_chain[10]).as_deref(), Ok("0/10"), "the oldest kept key");
    assert_eq!(p.bob.skipped_keys(), MAX_SKIPPED_KEYS - 1);
    p.burst_a2b(2);
    p.burst_b2a(2);
}

#[test]
fn ratchet_state_survives_a_restart_mid_conversation() {
    let mut p = establish(true);
    p.burst_b2a(2);
    let pending: Vec<_> = (0..3).map(|i| p.a2b(&format!("a{i}"))).collect();
    assert_eq!(p.deliver_to_bob(&pending[2]).as_deref(), Ok("a2"));

    let restart = |s: &RatchetState| {
        let json = serde_json::to_string(s).expect("serialize");
        serde_json::from_str::<RatchetState>(&json).expect("deserialize")
    };
    p.alice = restart(&p.alice);
    p.bob = restart(&p.bob);
    assert_eq!(p.bob.skipped_keys(), 2);
    assert_eq!(p.deliver_to_bob(&pending[0]).as_deref(), Ok("a0"), "skipped key persisted");
    assert_eq!(p.deliver_to_bob(&pending[2]), Err(E2eeError::Replay), "replay protection persisted");
    p.burst_b2a(3);
    p.burst_a2b(3);
    assert_eq!(p.deliver_to_bob(&pending[1]).as_deref(), Ok("a1"));
    let debug = format!("{:?}", p.bob);
    assert!(debug.contains("skipped_keys: 0"), "{debug}");
}

#[test]
fn prekey_store_survives_a_restart_between_sessions() {
    let (alice, carol) = (Identity::generate(), Identity::generate());
    let (bob, mut store) = bob_with_pools(true);
    let first_bundle = store.bundle(&bob);
    let (wire, _, _) = alice_starts(&alice, &first_bundle, "from alice");
    bob_answers(&bob, &mut store, &wire).expect("alice's session");
    store.rotate_signed_prekey(&bob, 1_000);

    let json = serde_json::to_string(&store).expect("serialize");
    let mut restored: PrekeyStore = serde_json::from_str(&json).expect("deserialize");
    assert_eq!((restored.one_time_count(), restored.kem_count()), (2, 2));
    // Carol fetched her bundle before the rotation: the previous signed prekey still answers.
    let mut stale = restored.bundle(&bob);
    stale.signed_prekey = first_bundle.signed_prekey.clone();
    let (wire, _, _) = alice_starts(&carol, &stale, "from carol");
    let (_, _, plaintext) = bob_answers(&bob, &mut restored, &wire).expect("carol's session");
    assert_eq!(plaintext, b"from carol");
    assert_eq!(restored.one_time_count(), 1);
}
