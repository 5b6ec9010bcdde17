//! The withdrawal fence's export leases in JetStream (`relay_server::store::nats::NatsLeases`) on a real 3-node
//! cluster: the lease conformance suite the sled fence passes (relay-server's `store::conformance::leases`, public
//! through its `conformance` feature); a lease taken through one node holding up a withdrawal waited for through
//! another until it is released there, or until it lapses; a lease surviving the SIGKILL of its stream's leader.
//!
//! Each `NatsLeases` stands for one relay node, connected to its own NATS server. Each test starts its own cluster
//! (tests/src/nats.rs), killed when the test ends, passing or not; each fixture of the suite starts from no fence
//! stream at all (it deletes it at its first open).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use relay_proto::AccountId;
use relay_proto::consent::Purpose;
use relay_server::fence::{LEASE_TTL, Pair};
use relay_server::store::LeaseStore;
use relay_server::store::conformance::leases::{self as suite, STILL_WAITING};
use relay_server::store::nats::NatsLeases;
use relay_store_nats::Layout;
use relay_tests::nats::NatsCluster;

use crate::WAIT;

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

/// Fresh leases on the cluster: the first `open` deletes the fence stream; each `open` goes through the next node,
/// so a reopen is another relay node over the same stream.
struct Jet {
    nodes: Vec<jetstream::Context>,
    opened: AtomicUsize,
}

impl suite::Fixture for Jet {
    async fn open(&self) -> Arc<dyn LeaseStore> {
        let n = self.opened.fetch_add(1, Ordering::Relaxed);
        let js = &self.nodes[n % self.nodes.len()];
        if n == 0 {
            match js.delete_stream(relay_store_nats::layout::FENCE_STREAM).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => panic!("deleting the fence stream: {e}"),
            }
        }
        Arc::new(NatsLeases::open(js.clone(), &Layout::default()).await.expect("fence stream"))
    }

    async fn durable(&self) {
        // Nothing to do: a lease is acknowledged by a quorum when `acquire` returns.
    }

    fn short_ttl(&self) -> Duration {
        // The server's TTLs are whole seconds.
        Duration::from_secs(1)
    }
}

fn pair() -> Pair {
    (AccountId([9; 16]), Purpose::Analytics, "shieldco".into())
}

/// Hang protection for a wait that must end.
async fn clears(leases: &NatsLeases, pair: &Pair, what: &str) {
    if tokio::time::timeout(WAIT, leases.wait_clear(pair)).await.is_err() {
        panic!("{what}: wait_clear did not return within {WAIT:?}");
    }
}

/// A wait that must not end yet, watched for [`STILL_WAITING`] (four looks of the JetStream store).
async fn still_waits(leases: &NatsLeases, pair: &Pair, what: &str) {
    let waited = tokio::time::timeout(STILL_WAITING, leases.wait_clear(pair)).await;
    assert!(waited.is_err(), "{what}: wait_clear returned while a lease was held");
}

#[tokio::test]
async fn the_jetstream_leases_pass_the_lease_conformance_suite() {
    let cluster = cluster().await;
    let nodes = contexts(&cluster, false).await;
    let started = Instant::now();
    suite::run_all(&|| Jet { nodes: nodes.clone(), opened: AtomicUsize::new(0) }).await;
    eprintln!("lease suite on JetStream: {:?}", started.elapsed());
}

/// Relay node A takes a lease through NATS server 0; a withdrawal on node B (server 1) waits until A releases it;
/// then, with a lease A abandons, until it lapses (only a lower bound on the time is checked).
#[tokio::test]
async fn a_lease_taken_through_one_node_holds_a_withdrawal_through_another() {
    let cluster = cluster().await;
    let nodes = contexts(&cluster, false).await;
    let a = NatsLeases::open(nodes[0].clone(), &Layout::default()).await.expect("node A");
    let b = NatsLeases::open(nodes[1].clone(), &Layout::default()).await.expect("node B");
    let started = Instant::now();

    let (id, _) = a.try_acquire(&pair(), LEASE_TTL).await.expect("lease through A");
    let b = Arc::new(b);
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.wait_clear(&pair()).await })
    };
    tokio::time::sleep(STILL_WAITING).await;
    assert!(!waiter.is_finished(), "B let the withdrawal through while A held a lease");
    assert!(a.try_release(&pair(), id).await.expect("release through A"), "the lease was held");
    tokio::time::timeout(WAIT, waiter).await.expect("B sees the release").expect("join");

    let ttl = Duration::from_secs(2);
    let before = Instant::now();
    a.try_acquire(&pair(), ttl).await.expect("a lease A abandons");
    still_waits(&b, &pair(), "a lease of A not yet lapsed").await;
    clears(&b, &pair(), "a lapsed lease of A").await;
    assert!(before.elapsed() >= ttl, "B waited for the whole TTL");
    eprintln!("cross-node lease test: {:?}", started.elapsed());
}

/// Retries `f` until it succeeds, for at most [`WAIT`] (see `relay_tests::nats::until_ok`).
async fn until_ok<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    f: impl FnMut() -> F,
) -> T {
    relay_tests::nats::until_ok(what, WAIT, f).await
}

/// A lease taken through one node is still held, and still holds the withdrawal, after the fence stream's leader
/// is killed; it is then released by its id through a surviving node.
#[tokio::test]
async fn a_lease_survives_the_death_of_its_stream_leader() {
    let mut cluster = cluster().await;
    let nodes = contexts(&cluster, true).await;
    let started = Instant::now();
    let a = NatsLeases::open(nodes[0].clone(), &Layout::default()).await.expect("node A");
    let (id, _) = a.try_acquire(&pair(), LEASE_TTL).await.expect("lease through A");

    let mut stream = nodes[0].get_stream(relay_store_nats::layout::FENCE_STREAM).await.expect("stream");
    let info = stream.info().await.expect("info");
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("the stream has a leader");
    let victim = cluster.index_of(&leader).expect("the leader is a node");
    let survivor = [1, 2, 0].into_iter().find(|&i| i != victim).expect("a node survives");
    let layout = Layout::default();
    let b = until_ok("opening node B", || NatsLeases::open(nodes[survivor].clone(), &layout)).await;
    cluster.kill(victim).expect("SIGKILL the fence stream's leader");

    let p = pair();
    assert!(until_ok("looking for the lease after the leader died", || b.held(&p)).await, "the lease was lost");
    still_waits(&b, &pair(), "a lease from before the leader died").await;
    assert!(until_ok("releasing through B", || b.try_release(&p, id)).await, "the lease was still there");
    clears(&b, &pair(), "released through a surviving node").await;
    eprintln!("lease through a leader's death: {:?}", started.elapsed());
}
