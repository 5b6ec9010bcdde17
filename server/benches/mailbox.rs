//! Mailbox throughput on a temporary sled store: appends made durable by the group commit (many concurrent writers
//! sharing flushes, as under load), then the recipient's acknowledgements removing them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use relay_proto::AccountId;
use relay_server::store::{MailboxLimits, Store};

/// Writers appending at once, each to its own recipient.
const WRITERS: usize = 64;

fn append_and_ack(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = MailboxLimits { max_messages: u64::MAX, max_bytes: u64::MAX, ttl_ms: 3_600_000 };
    let store = Arc::new(runtime.block_on(async { Store::open(dir.path(), limits) }).expect("store"));
    let envelope = Arc::new(vec![0x5a_u8; 256]);

    let mut group = c.benchmark_group("mailbox");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    for per_writer in [1usize, 16] {
        let batch = WRITERS * per_writer;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("append_durable_ack", batch), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let mut tasks = Vec::with_capacity(WRITERS);
                        for w in 0..WRITERS {
                            let (store, envelope) = (store.clone(), envelope.clone());
                            tasks.push(tokio::spawn(async move {
                                let recipient = AccountId([w as u8; 16]);
                                let mut ids = Vec::with_capacity(per_writer);
                                for _ in 0..per_writer {
                                    let stored =
                                        store.mailboxes.append(&recipient, &envelope, 0).await.expect("append");
                                    store.commit.durable().await.expect("durable");
                                    ids.push(stored.id);
                                }
                                store.mailboxes.remove(&recipient, &ids).await.expect("ack");
                            }));
                        }
                        for t in tasks {
                            t.await.expect("writer");
                        }
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, append_and_ack);
criterion_main!(benches);
