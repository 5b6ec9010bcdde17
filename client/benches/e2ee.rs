//! End-to-end encryption costs: one full session set-up, and one message encrypted and decrypted at 256 B and 16 KiB.
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

criterion_group!(benches, session_set_up, message_round_trip);
criterion_main!(benches);
