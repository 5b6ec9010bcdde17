//! The relay's JetStream mailboxes (`relay_server::store::nats::NatsMailboxes`) on a real 3-node cluster: the
//! mailbox conformance suite that the sled mailboxes pass (relay-server's `store::conformance::mailboxes`, public
//! through its `conformance` feature); an envelope appended through one node read through another after the
//! death of its stream's leader; and what the JetStream mailboxes promise beyond the suite (the sweep's stop rule,
//! the cached `queued`, damage reported).
//!
//! Each test starts its own cluster (tests/src/nats.rs), killed when the test ends, passing or not; each fixture
//! of the suite starts from no mailbox stream at all (it deletes them at its first open).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::TryStreamExt;
use relay_proto::AccountId;
use relay_server::store::conformance::mailboxes::{self as suite, ByteQuota};
use relay_server::store::nats::NatsMailboxes;
use relay_server::store::{MailboxLimits, MailboxStore, StoredEnvelope};
use relay_store_nats::Layout;
use relay_tests::nats::NatsCluster;

use crate::WAIT;

/// Two shards (the suite's two accounts land in different streams, so ids must be unique across shards), three
/// replicas, and a stream `max_age` far beyond anything the suite's injected clock means: expiry in the suite is
/// the relay's, decided by `now_ms`, never the server's.
fn layout() -> Layout {
    Layout { shards: 2, replicas: 3, mailbox_ttl: Duration::from_secs(3600), ..Layout::default() }
}

async fn cluster() -> NatsCluster {
    let started = Instant::now();
    let cluster = NatsCluster::start().await.expect("3-node cluster");
    eprintln!("3-node JetStream cluster ready in {:?}", started.elapsed());
    cluster
}

/// A JetStream context on each node; with `quick`, requests time out after a second instead of five (for retries
/// during an election).
async fn contexts(cluster: &NatsCluster, quick: bool) -> Vec<jetstream::Context> {
    let timeout = if quick { Duration::from_secs(1) } else { Duration::from_secs(5) };
    cluster.contexts(timeout).await.expect("contexts")
}

/// Hang protection for the suite's tests: far above what they take on a loaded 2-core machine (seconds), so it
/// only ends a test that would not end.
const SUITE_BOUND: Duration = Duration::from_secs(300);

async fn within_bound<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(SUITE_BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {SUITE_BOUND:?}"),
    }
}

/// A fresh set of mailboxes on the cluster: its first `open` deletes every mailbox stream; each `open` goes
/// through the next node, so a reopen is another relay node over the same streams.
struct Jet {
    nodes: Vec<jetstream::Context>,
    opened: AtomicUsize,
}

impl Jet {
    fn new(nodes: &[jetstream::Context]) -> Self {
        Self { nodes: nodes.to_vec(), opened: AtomicUsize::new(0) }
    }
}

impl suite::Fixture for Jet {
    fn byte_quota(&self) -> ByteQuota {
        ByteQuota::NotEnforced
    }

    async fn open(&self, limits: MailboxLimits) -> Arc<dyn MailboxStore> {
        let n = self.opened.fetch_add(1, Ordering::Relaxed);
        let js = &self.nodes[n % self.nodes.len()];
        if n == 0 {
            let names: Vec<String> = js.stream_names().try_collect().await.expect("stream names");
            for name in names.iter().filter(|s| s.starts_with("MBOX-")) {
                js.delete_stream(name).await.expect("delete a mailbox stream");
            }
        }
        Arc::new(NatsMailboxes::open(js.clone(), &layout(), limits).await.expect("mailbox streams"))
    }

    async fn durable(&self) {
        // Nothing to do: an append returned after a quorum acknowledged it (JetStreamDurability).
    }
}

#[tokio::test]
async fn the_jetstream_mailboxes_pass_the_mailbox_conformance_suite() {
    let cluster = cluster().await;
    let nodes = contexts(&cluster, false).await;
    let started = Instant::now();
    within_bound("the mailbox suite", suite::run_all(&|| Jet::new(&nodes))).await;
    eprintln!("mailbox suite on JetStream: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_cursor_readers_miss_nothing_under_concurrent_appends() {
    let cluster = cluster().await;
    let nodes = contexts(&cluster, false).await;
    let started = Instant::now();
    let fixture = Jet::new(&nodes);
    // 12,000 quorum-acknowledged appends from four tasks while a cursor reader follows the mailbox.
    within_bound("the cursor test", suite::cursor_readers_miss_nothing_under_concurrent_appends(&fixture)).await;
    eprintln!("concurrent cursor test on JetStream: {:?}", started.elapsed());
}

/// Retries `f` until it succeeds, for at most [`WAIT`] (see `relay_tests::nats::until_ok`).
async fn until_ok<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    f: impl FnMut() -> F,
) -> T {
    relay_tests::nats::until_ok(what, WAIT, f).await
}

fn by_id(entries: Vec<StoredEnvelope>) -> BTreeMap<u64, (u64, Vec<u8>)> {
    entries.into_iter().map(|e| (e.id, (e.stored_at_ms, e.envelope.to_vec()))).collect()
}

#[tokio::test]
async fn an_envelope_appended_through_one_node_is_read_through_another_after_its_leader_dies() {
    let mut cluster = cluster().await;
    let nodes = contexts(&cluster, true).await;
    let layout = Layout { shards: 1, ..layout() };
    let limits = MailboxLimits { max_messages: 1000, max_bytes: 1 << 20, ttl_ms: 3_600_000 };
    let through_a = NatsMailboxes::open(nodes[0].clone(), &layout, limits).await.expect("streams through node 0");
    let alice = AccountId([7; 16]);
    let now = relay_proto::now_ms();
    let mut acked = BTreeMap::new();
    for i in 0..10u64 {
        let envelope = format!("sealed {i}").into_bytes();
        let appended = through_a.append(&alice, &envelope, now + i).await.expect("append through node 0");
        acked.insert(appended.id, (now + i, envelope));
    }

    // Kill the stream's leader (whichever node it is), then read through a node still alive that is not node 0
    // when it can be: another relay node, on another NATS server.
    let mut stream = nodes[0].get_stream("MBOX-0").await.expect("stream");
    let info = stream.info().await.expect("info");
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("the stream has a leader");
    let victim = cluster.index_of(&leader).expect("the leader is a node");
    let b = [1, 2, 0].into_iter().find(|&i| i != victim).expect("a node survives");
    let through_b =
        until_ok("opening the mailboxes through node B", || NatsMailboxes::open(nodes[b].clone(), &layout, limits))
            .await;
    cluster.kill(victim).expect("SIGKILL the stream leader");

    let read =
        until_ok("scan through node B after the leader died", || through_b.scan(&alice, 0, 100, usize::MAX, now + 100))
            .await;
    assert_eq!(by_id(read), acked, "every acknowledged envelope, with its id and stamp, and nothing else");
    assert_eq!(until_ok("depth", || through_b.depth(&alice)).await, 10);

    // Appends go on through B under the new leader, with ids above every earlier one (a sequence is never reused).
    let last = *acked.keys().last().expect("ids");
    let during = until_ok("append through node B", || through_b.append(&alice, b"after the death", now + 50)).await;
    assert!(during.id > last, "id {} reused or not above {last}", during.id);

    // The dead node comes back: what both leaders acknowledged is read through it.
    cluster.restart(victim).await.expect("restarted");
    let through_victim =
        until_ok("opening through the restarted node", || NatsMailboxes::open(nodes[victim].clone(), &layout, limits))
            .await;
    let read =
        until_ok("scan through the restarted node", || through_victim.scan(&alice, 0, 100, usize::MAX, now + 100))
            .await;
    acked.insert(during.id, (now + 50, b"after the death".to_vec()));
    assert_eq!(by_id(read), acked);
    // And an append through the restarted node still gets an id above all of them.
    let after =
        until_ok("append through the restarted node", || through_victim.append(&alice, b"after the restart", now + 60))
            .await;
    assert!(after.id > during.id, "id {} not above {}", after.id, during.id);
}

/// What `NatsMailboxes` adds to the suite's contract: the sweep's stop rule, the cached `queued` figure, `depth`
/// counting expired entries until they are swept, and a message without a stamp reported as damage.
#[tokio::test]
async fn the_jetstream_mailboxes_keep_their_own_contract_on_sweeps_counts_and_damage() {
    let cluster = cluster().await;
    let nodes = contexts(&cluster, false).await;
    let layout = Layout { shards: 1, ..layout() };
    let limits = MailboxLimits { max_messages: 100, max_bytes: 1 << 20, ttl_ms: 1000 };
    let a = NatsMailboxes::open(nodes[0].clone(), &layout, limits).await.expect("streams through node 0");
    let b = NatsMailboxes::open(nodes[1].clone(), &layout, limits).await.expect("streams through node 1");
    let alice = AccountId([3; 16]);

    // An entry that expires far beyond the skew allowance, then one already expired at `now`: appended in that
    // order (two relay clocks far apart), the sweep stops at the first and leaves the second to the backstop, while
    // scans still hide it and depth still counts it.
    let far = 10 * relay_server::store::nats::mailbox::SWEEP_CLOCK_SKEW_MS;
    a.append(&alice, b"far future", far).await.expect("append");
    a.append(&alice, b"expired", 0).await.expect("append");
    let now = 2000;
    let seen: Vec<_> =
        a.scan(&alice, 0, 10, usize::MAX, now).await.expect("scan").into_iter().map(|e| e.envelope).collect();
    assert_eq!(seen, [&b"far future"[..]]);
    assert_eq!(a.depth(&alice).await.expect("depth"), 2, "an expired entry counts until it is swept");
    assert_eq!(a.sweep_expired(now).await.expect("sweep"), 0, "the walk stopped at the far-future entry");
    assert_eq!(a.depth(&alice).await.expect("depth"), 2);

    // Behind an entry within the allowance, the walk goes on and removes what expired.
    let bob = AccountId([4; 16]);
    b.purge(&alice).await.expect("purge");
    b.append(&bob, b"expired", 0).await.expect("append");
    b.append(&bob, b"within the skew", now + 1).await.expect("append");
    b.append(&bob, b"also expired", 0).await.expect("append");
    assert_eq!(b.sweep_expired(now).await.expect("sweep"), 2);
    assert_eq!(b.depth(&bob).await.expect("depth"), 1);

    // `queued` is node-local between sweeps: node 0 saw its own appends and not node 1's purge and appends; its
    // next sweep reads the streams' counts.
    assert_eq!(a.queued(), 2, "node 0's own two appends");
    assert_eq!(b.queued(), 1, "node 1 swept: the streams' count");
    assert_eq!(a.sweep_expired(now).await.expect("sweep"), 0);
    assert_eq!(a.queued(), 1, "refreshed by the sweep");

    // A message on a mailbox subject without a stamp is damage, in scans and sweeps alike.
    let raw = relay_store_nats::mailbox::Mailboxes::open(
        nodes[2].clone(),
        relay_server::store::nats::mailbox::stream_layout(&layout, &limits).expect("layout"),
    )
    .await
    .expect("streams");
    raw.append(&alice, bytes::Bytes::from_static(b"short")).await.expect("raw append");
    let scanned = a.scan(&alice, 0, 10, usize::MAX, now).await;
    assert!(scanned.as_ref().is_err_and(|e| e.to_string().contains("no stamp")), "{scanned:?}");
    let swept = a.sweep_expired(now).await;
    assert!(swept.as_ref().is_err_and(|e| e.to_string().contains("no stamp")), "{swept:?}");
}
