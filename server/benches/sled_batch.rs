//! Does one sled `Batch` per group-commit round make appends and removals cheaper than one call per entry?
//!
//! A round of 64 mailbox entries (16-byte recipient ‖ 8-byte id keys, 16-byte header + 256-byte envelope values)
//! is written to a temporary tree as 64 `insert` calls or as one `apply_batch`, then removed as 64 `remove` calls or
//! one batch of removals, with recipients spread over 64 mailboxes (as under load) or all in one (keys adjacent).
//! Run: `cargo bench -p relay-server --bench sled_batch`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const ROUND: usize = 64;

fn key(recipient: u8, id: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&[recipient; 16]);
    k[16..].copy_from_slice(&id.to_be_bytes());
    k
}

fn rounds(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new().path(dir.path()).open().expect("open");
    let tree = db.open_tree("mailboxes").expect("tree");
    let value = vec![0x5a_u8; 16 + 256];
    let mut next = 0u64;
    let mut group = c.benchmark_group("sled_round");
    group.sample_size(20).measurement_time(Duration::from_secs(4)).throughput(Throughput::Elements(ROUND as u64));
    for (layout, spread) in [("64_mailboxes", true), ("one_mailbox", false)] {
        let recipient = |i: usize| if spread { i as u8 } else { 0 };
        group.bench_function(BenchmarkId::new("per_entry", layout), |b| {
            b.iter(|| {
                let first = next;
                for i in 0..ROUND {
                    next += 1;
                    tree.insert(key(recipient(i), next), value.as_slice()).expect("insert");
                }
                for (i, id) in (first + 1..=next).enumerate() {
                    tree.remove(key(recipient(i), id)).expect("remove");
                }
            })
        });
        group.bench_function(BenchmarkId::new("one_batch", layout), |b| {
            b.iter(|| {
                let first = next;
                let mut append = sled::Batch::default();
                for i in 0..ROUND {
                    next += 1;
                    append.insert(&key(recipient(i), next), value.as_slice());
                }
                tree.apply_batch(append).expect("append batch");
                let mut remove = sled::Batch::default();
                for (i, id) in (first + 1..=next).enumerate() {
                    remove.remove(&key(recipient(i), id));
                }
                tree.apply_batch(remove).expect("remove batch");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, rounds);
criterion_main!(benches);
