//! End-to-end encryption costs: one full session set-up, one message encrypted and decrypted at 256 B and 16 KiB,
//! the sealed-sender layer (seal; open with a full check and with the sender's certificate already verified) and
//! the public-key operations it is made of.
//!
//! Run with `cargo bench -p relay-client --bench e2ee -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use relay_client::Identity;
use relay_client::e2ee::{PrekeyStore, RatchetState, initiate, respond, verify_bundle};

fn session_set_up(c: &mut Criterion) {
    let (alice, bob) = (Identity::generate(), Identity::generate());
    let mut store = PrekeyStore::generate(&bob);
    store.generate_one_time(1);
    store.generate_kem(&bob, 1);
    let bundle = store.bundle(&bob);
    c.bench_function("pqxdh set-up (verify, initiate, respond, ratchet init)", |b| {
        b.iter_batched(
            || store.clone(),
            |mut store| {
                verify_bundle(&bundle).expect("valid bundle");
                let (header, sk_a, _) = initiate(&alice, &bundle).expect("initiate");
                let (sk_b, _) = respond(&bob, &mut store, &header).expect("respond");
                let spk = store.signed_prekey_secret(header.signed_prekey_id).expect("signed prekey");
                let a = RatchetState::init_initiator(&sk_a, &bundle.signed_prekey.public).expect("init initiator");
                black_box((a, RatchetState::init_responder(&sk_b, &spk)))
            },
            BatchSize::SmallInput,
        )
    });
}

fn message_round_trip(c: &mut Criterion) {
    let (alice, bob) = (Identity::generate(), Identity::generate());
    let mut store = PrekeyStore::generate(&bob);
    let bundle = store.bundle(&bob);
    let (header, sk_a, ad) = initiate(&alice, &bundle).expect("initiate");
    let (sk_b, _) = respond(&bob, &mut store, &header).expect("respond");
    let mut a = RatchetState::init_initiator(&sk_a, &bundle.signed_prekey.public).expect("init initiator");
    let spk = store.signed_prekey_secret(header.signed_prekey_id).expect("signed prekey");
    let mut b = RatchetState::init_responder(&sk_b, &spk);

    let mut group = c.benchmark_group("ratchet encrypt+decrypt");
    for size in [256usize, 16 * 1024] {
        let plaintext = vec![0x5A; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{size} B"), |bench| {
            bench.iter(|| {
                let m = a.encrypt(black_box(&plaintext), &ad).expect("encrypt");
                black_box(b.decrypt(&m, &ad).expect("decrypt"))
            })
        });
    }
    group.finish();
}

fn sealed_sender(c: &mut Criterion) {
    use relay_client::sealed::{open_message, seal_message};
    use relay_proto::PhoneNumber;
    use relay_proto::identity::{SenderCertificate, SigningKey};

    let (alice, bob) = (Identity::generate(), Identity::generate());
    let relay = SigningKey::from_bytes(&[7; 32]);
    let phone = PhoneNumber::parse("+33612345678").expect("valid number");
    let certificate = SenderCertificate::new(alice.identity_key(), alice.sealing_key(), phone, u64::MAX).sign(&relay);
    let payload = vec![0x5A; 300];
    let seal =
        || seal_message(&alice, &certificate, &bob.account_id(), &bob.sealing_key(), payload.clone()).expect("seal");
    let envelope = seal();
    let mut group = c.benchmark_group("sealed sender, 300 B payload");
    group.bench_function("seal", |b| b.iter(|| black_box(seal())));
    group.bench_function("open, full check", |b| {
        b.iter(|| black_box(open_message(&bob, &envelope, &relay.verifying_key(), 0).expect("open")))
    });
    {
        let cache = relay_client::verified_certificates::VerifiedCertificates::new(relay.verifying_key());
        group.bench_function("open, certificate cached", |b| {
            b.iter(|| black_box(relay_client::sealed::open_message_with(&bob, &envelope, &cache, 0).expect("open")))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("public-key operations");
    let secret = x25519_dalek::StaticSecret::random_from_rng(&mut rand::rng());
    let public = x25519_dalek::PublicKey::from(bob.sealing_key());
    group.bench_function("X25519 key generation (fixed base)", |b| {
        b.iter(|| black_box(x25519_dalek::PublicKey::from(&secret)))
    });
    group.bench_function("X25519 agreement", |b| b.iter(|| black_box(secret.diffie_hellman(&public))));
    let message = [0x5Au8; 400];
    group.bench_function("Ed25519 sign, 400 B", |b| b.iter(|| black_box(alice.sign(&message))));
    let signature = ed25519_dalek::Signature::from_bytes(&alice.sign(&message));
    let key = alice.verifying_key();
    group.bench_function("Ed25519 verify_strict, 400 B", |b| {
        b.iter(|| key.verify_strict(black_box(&message), &signature).is_ok())
    });
    group.finish();
}

criterion_group!(benches, session_set_up, message_round_trip, sealed_sender);
criterion_main!(benches);
