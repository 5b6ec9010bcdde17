//! The JetStream layout (relay-store-nats) against a real 3-node cluster on loopback: mailboxes (append, scan,
//! remove, quota, ownership), an acknowledged append surviving the loss and restart of a node, claims by
//! create-if-absent under a race, leases, the consent feed, and wake-ups across nodes.
//!
//! Each test starts its own cluster (tests/src/nats.rs), which is killed when the test ends, passing or not.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_proto::AccountId;
use relay_store_nats::cas::{CasBucket, ClaimKey};
use relay_store_nats::feed::Feed;
use relay_store_nats::layout::FEED_STREAM;
use relay_store_nats::lease::Leases;
use relay_store_nats::mailbox::Mailboxes;
use relay_store_nats::wake::Wakeups;
use relay_store_nats::{Layout, StoreError};
use relay_tests::nats::NatsCluster;
use tokio::task::JoinSet;

use crate::{WAIT, bounded};

/// An account whose id ends in `n` (big-endian in its first eight bytes, so its shard is `n % shards`).
fn account(n: u8, tag: u8) -> AccountId {
    let mut id = [tag; 16];
    id[..8].copy_from_slice(&u64::from(n).to_be_bytes());
    AccountId(id)
}

fn layout(shards: u32, quota: u32) -> Layout {
    Layout { shards, replicas: 3, mailbox_quota: quota, ..Layout::default() }
}

async fn cluster() -> NatsCluster {
    let started = Instant::now();
    let cluster = NatsCluster::start().await.expect("3-node cluster");
    eprintln!("3-node JetStream cluster ready in {:?}", started.elapsed());
    cluster
}

/// Retries `f` until it succeeds, for at most [`WAIT`] (a leader election after a node is killed takes seconds).
async fn until_ok<T, F: std::future::Future<Output = Result<T, StoreError>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: {e}; retrying ({:?} in)", WAIT - (deadline - Instant::now()));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what} still failing after {WAIT:?}: {e}"),
        }
    }
}

#[tokio::test]
async fn mailboxes_append_scan_remove_and_refuse_past_the_quota() {
    let cluster = cluster().await;
    let layout = layout(2, 3);
    let boxes = Mailboxes::open(cluster.jetstream(0).await.expect("js"), layout.clone()).await.expect("streams");
    // Opening again through another node finds the same streams.
    let other = Mailboxes::open(cluster.jetstream(2).await.expect("js"), layout.clone()).await.expect("again");
    let (alice, bob, carol) = (account(0, 1), account(2, 2), account(1, 3));
    assert_eq!(layout.shard_of(&alice), layout.shard_of(&bob), "alice and bob share a stream");
    assert_ne!(layout.shard_of(&alice), layout.shard_of(&carol));

    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(boxes.append(&alice, Bytes::from(format!("to alice {i}"))).await.expect("append"));
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequences increase: {seqs:?}");
    // The quota is 3: the fourth is refused, and the three stay as they were.
    assert!(matches!(boxes.append(&alice, Bytes::from_static(b"one too many")).await, Err(StoreError::MailboxFull)));
    let bob_seq = boxes.append(&bob, Bytes::from_static(b"to bob")).await.expect("bob's own quota");
    let carol_seq = other.append(&carol, Bytes::from_static(b"to carol")).await.expect("other shard");

    let all = other.scan(&alice, 0, 100).await.expect("scan");
    assert_eq!(all.iter().map(|s| s.seq).collect::<Vec<_>>(), seqs);
    let texts: Vec<_> = all.iter().map(|s| s.envelope.clone()).collect();
    assert_eq!(texts, (0..3).map(|i| Bytes::from(format!("to alice {i}"))).collect::<Vec<_>>());
    assert!(all.iter().all(|s| s.stored_at_ms > 0));
    assert_eq!(boxes.scan(&alice, seqs[0], 100).await.expect("scan").len(), 2, "strictly above the cursor");
    assert_eq!(boxes.scan(&alice, 0, 1).await.expect("scan")[0].seq, seqs[0], "at most max, oldest first");
    let bobs = boxes.scan(&bob, 0, 100).await.expect("scan");
    assert_eq!((bobs.len(), bobs[0].seq, &bobs[0].envelope[..]), (1, bob_seq, &b"to bob"[..]));
    let carols = boxes.scan(&carol, 0, 100).await.expect("scan");
    assert_eq!((carols.len(), carols[0].seq), (1, carol_seq));

    // Alice cannot remove Bob's message, even though it is in her stream; it stays.
    assert!(matches!(boxes.remove(&alice, bob_seq).await, Err(StoreError::NotInMailbox { seq }) if seq == bob_seq));
    assert_eq!(boxes.scan(&bob, 0, 100).await.expect("scan").len(), 1);
    // Removing frees quota; removing twice is not an error.
    assert!(boxes.remove(&alice, seqs[1]).await.expect("remove"));
    assert!(!other.remove(&alice, seqs[1]).await.expect("gone already"));
    let left: Vec<u64> = boxes.scan(&alice, 0, 100).await.expect("scan").iter().map(|s| s.seq).collect();
    assert_eq!(left, vec![seqs[0], seqs[2]]);
    let fourth = boxes.append(&alice, Bytes::from_static(b"fits again")).await.expect("room after removal");
    assert!(fourth > seqs[2]);
}

#[tokio::test]
async fn mailbox_messages_expire_after_the_ttl_and_oversized_ones_are_refused() {
    let cluster = cluster().await;
    let layout = Layout { mailbox_ttl: Duration::from_secs(1), max_envelope_bytes: 1_000, ..layout(1, 10) };
    let boxes = Mailboxes::open(cluster.jetstream(1).await.expect("js"), layout).await.expect("streams");
    let alice = account(0, 5);
    assert!(boxes.append(&alice, Bytes::from(vec![7u8; 1_001])).await.is_err(), "larger than the envelope limit");
    boxes.append(&alice, Bytes::from(vec![7u8; 1_000])).await.expect("at the limit");
    assert_eq!(boxes.scan(&alice, 0, 10).await.expect("scan").len(), 1);
    // Undelivered, it is removed by the stream once its TTL has passed (polled, bounded).
    let deadline = Instant::now() + WAIT;
    while !boxes.scan(&alice, 0, 10).await.expect("scan").is_empty() {
        assert!(Instant::now() < deadline, "the message outlived its TTL by {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_acknowledged_append_survives_killing_and_restarting_a_node() {
    let mut cluster = cluster().await;
    let layout = layout(1, 1_000);
    // A client that knows all three nodes and fails over between them, as a relay node's would.
    let client = cluster.connect_any().await.expect("client");
    let js = async_nats::jetstream::new(client.clone());
    let boxes = Mailboxes::open(js.clone(), layout.clone()).await.expect("streams");
    // The same client with requests that time out after a second (not five), for the retries during elections.
    let quick = async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(1)).build(client);
    let quick = Mailboxes::open(quick, layout.clone()).await.expect("streams");
    let alice = account(0, 7);
    let mut acked: BTreeMap<u64, Bytes> = BTreeMap::new();
    for i in 0..20 {
        let envelope = Bytes::from(format!("before {i}"));
        acked.insert(boxes.append(&alice, envelope.clone()).await.expect("append"), envelope);
    }
    // Kill the stream's leader: the node that acknowledged the appends.
    let mut stream = js.get_stream("MBOX-0").await.expect("stream");
    let info = stream.info().await.expect("info");
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("the stream has a leader");
    let victim = cluster.index_of(&leader).expect("the leader is a node");
    cluster.kill(victim).expect("SIGKILL");

    // The two others elect a new leader and still have every acknowledged message; appends go on.
    let during = until_ok("scan while a node is down", || quick.scan(&alice, 0, 1_000)).await;
    let found: BTreeMap<u64, Bytes> = during.into_iter().map(|s| (s.seq, s.envelope)).collect();
    assert_eq!(found, acked, "every acknowledged message, and nothing else, after the leader's death");
    let mut tried = Vec::new();
    for i in 0..5 {
        let envelope = Bytes::from(format!("while down {i}"));
        tried.push(envelope.clone());
        let seq = until_ok("append while a node is down", || quick.append(&alice, envelope.clone())).await;
        acked.insert(seq, envelope);
    }

    // The killed node comes back on its ports and store; then another node dies, so the stream's quorum now
    // includes the node that was dead: everything acknowledged, before and during its absence, is still there.
    cluster.restart(victim).await.expect("restarted");
    cluster.kill((victim + 1) % 3).expect("SIGKILL");
    let after = until_ok("scan after the restart", || quick.scan(&alice, 0, 1_000)).await;
    let found: BTreeMap<u64, Bytes> = after.into_iter().map(|s| (s.seq, s.envelope)).collect();
    for (seq, envelope) in &acked {
        assert_eq!(found.get(seq), Some(envelope), "acknowledged message {seq} lost");
    }
    // An append retried during the election may have been stored as well as acknowledged later: nothing else.
    assert!(found.values().all(|e| acked.values().any(|a| a == e) || tried.contains(e)), "only what was appended");
}

#[tokio::test]
async fn a_claim_is_won_by_exactly_one_of_concurrent_claimants_across_nodes() {
    let cluster = cluster().await;
    let layout = layout(1, 1);
    let mut buckets = Vec::new();
    for node in 0..3 {
        buckets.push(CasBucket::claims(cluster.jetstream(node).await.expect("js"), &layout).await.expect("bucket"));
    }
    for round in 0..5 {
        let key = ClaimKey::hashed("phone", format!("+3361234567{round}").as_bytes());
        let mut claims = JoinSet::new();
        for claimant in 0..9u8 {
            let (bucket, key) = (buckets[usize::from(claimant) % 3].clone(), key.clone());
            claims.spawn(async move { (claimant, bucket.create(key.as_str(), Bytes::from(vec![claimant])).await) });
        }
        let mut winners = Vec::new();
        while let Some(joined) = bounded("claims", claims.join_next()).await {
            match joined.expect("join") {
                (claimant, Ok(revision)) => winners.push((claimant, revision)),
                (_, Err(StoreError::Exists)) => {}
                (_, Err(e)) => panic!("a claim failed otherwise: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one claimant wins, not {winners:?}");
        let (winner, revision) = winners[0];
        let entry = buckets[2].entry(key.as_str()).await.expect("read").expect("claimed");
        assert_eq!((entry.value, entry.revision), (Bytes::from(vec![winner]), revision));
    }

    // Updates and deletes take effect only at the revision the writer read.
    let key = ClaimKey::hashed("phone", b"+33698765432");
    let first = buckets[0].create(key.as_str(), Bytes::from_static(b"alice")).await.expect("claim");
    let second = buckets[1].update(key.as_str(), Bytes::from_static(b"alice, new keys"), first).await.expect("update");
    assert!(matches!(
        buckets[2].update(key.as_str(), Bytes::from_static(b"mallory"), first).await,
        Err(StoreError::RevisionChanged { expected }) if expected == first
    ));
    assert!(matches!(buckets[2].delete(key.as_str(), first).await, Err(StoreError::RevisionChanged { .. })));
    let entry = buckets[0].entry(key.as_str()).await.expect("read").expect("present");
    assert_eq!((&entry.value[..], entry.revision), (&b"alice, new keys"[..], second));
    // Released, the number can be claimed again, once.
    buckets[1].delete(key.as_str(), second).await.expect("release");
    assert_eq!(buckets[2].entry(key.as_str()).await.expect("read"), None);
    buckets[2].create(key.as_str(), Bytes::from_static(b"bob")).await.expect("claim a released number");
    assert!(matches!(buckets[0].create(key.as_str(), Bytes::from_static(b"eve")).await, Err(StoreError::Exists)));
}

#[tokio::test]
async fn leases_are_exclusive_renewable_releasable_and_expire_on_the_server() {
    let cluster = cluster().await;
    let layout = layout(1, 1);
    let a = Leases::open(cluster.jetstream(0).await.expect("js"), &layout).await.expect("bucket");
    let b = Leases::open(cluster.jetstream(2).await.expect("js"), &layout).await.expect("bucket");
    let long = Duration::from_secs(60);

    let lease = a.take("fence.x", "node-a", long).await.expect("take");
    assert!(
        matches!(b.take("fence.x", "node-b", long).await, Err(StoreError::LeaseHeld { holder }) if holder == "node-a")
    );
    let renewed = a.renew(&lease).await.expect("renew");
    assert!(renewed.revision > lease.revision && renewed.valid_until >= lease.valid_until);
    assert!(matches!(a.renew(&lease).await, Err(StoreError::LeaseLost)), "a stale revision is not the lease");
    a.release(renewed.clone()).await.expect("release");
    assert_eq!(b.holder("fence.x").await.expect("read"), None);
    let taken = b.take("fence.x", "node-b", long).await.expect("free after release");
    assert!(matches!(a.renew(&renewed).await, Err(StoreError::LeaseLost)));
    assert!(matches!(a.release(renewed).await, Err(StoreError::LeaseLost)));
    assert_eq!(a.holder("fence.x").await.expect("read").as_deref(), Some("node-b"));
    b.release(taken).await.expect("release");

    // Concurrent takers: exactly one wins.
    let mut takers = JoinSet::new();
    for i in 0..6 {
        let leases = if i % 2 == 0 { a.clone() } else { b.clone() };
        takers.spawn(async move { leases.take("fence.race", &format!("taker-{i}"), long).await });
    }
    let mut won = 0;
    while let Some(joined) = bounded("takers", takers.join_next()).await {
        match joined.expect("join") {
            Ok(_) => won += 1,
            Err(StoreError::LeaseHeld { .. }) => {}
            Err(e) => panic!("a take failed otherwise: {e}"),
        }
    }
    assert_eq!(won, 1);

    // Not renewed, a lease expires on the server's clock and another node takes it; the old holder has lost it.
    let short = a.take("fence.y", "node-a", Duration::from_secs(1)).await.expect("take");
    let deadline = Instant::now() + WAIT;
    let by_b = loop {
        match b.take("fence.y", "node-b", long).await {
            Ok(lease) => break lease,
            Err(StoreError::LeaseHeld { holder }) if Instant::now() < deadline => {
                assert_eq!(holder, "node-a");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("fence.y was not free after its TTL: {e}"),
        }
    };
    assert!(Instant::now() >= short.valid_until, "taken over before the holder's own deadline");
    assert!(matches!(a.renew(&short).await, Err(StoreError::LeaseLost)));
    assert_eq!(a.holder("fence.y").await.expect("read").as_deref(), Some("node-b"));
    assert_eq!(by_b.holder, "node-b");
    assert!(matches!(a.take("fence.y", "node-a", Duration::from_millis(1500)).await, Err(StoreError::Invalid(_))));
}

#[tokio::test]
async fn the_consent_feed_orders_statements_and_refuses_deletion() {
    let cluster = cluster().await;
    let layout = layout(1, 1);
    let feeds = [
        Feed::open(cluster.jetstream(0).await.expect("js"), &layout).await.expect("feed"),
        Feed::open(cluster.jetstream(1).await.expect("js"), &layout).await.expect("feed"),
    ];
    let (alice, bob) = (account(1, 1), account(2, 2));
    let mut appended = Vec::new();
    for i in 0..6 {
        let who = if i % 2 == 0 { alice } else { bob };
        let statement = Bytes::from(format!("statement {i}"));
        let seq = feeds[i % 2].append(&who, statement.clone()).await.expect("append");
        appended.push((seq, who, statement));
    }
    assert!(appended.windows(2).all(|w| w[0].0 < w[1].0), "one order across accounts and nodes");
    let read = |cursor, max| feeds[1].read(cursor, max);
    let all: Vec<_> = read(0, 100).await.expect("read").into_iter().map(|e| (e.seq, e.account, e.statement)).collect();
    assert_eq!(all, appended);
    let rest = read(appended[1].0, 100).await.expect("read");
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), appended[2..].iter().map(|a| a.0).collect::<Vec<_>>());
    assert_eq!(read(0, 2).await.expect("read").len(), 2);
    assert!(read(appended[5].0, 100).await.expect("read").is_empty(), "nothing above the last cursor");

    // The stream itself refuses to lose a statement.
    let js = cluster.jetstream(2).await.expect("js");
    let stream = js.get_stream(FEED_STREAM).await.expect("stream");
    assert!(stream.delete_message(appended[0].0).await.is_err(), "deletes are denied");
    assert!(stream.purge().await.is_err(), "purges are denied");
    assert_eq!(read(0, 100).await.expect("read").len(), appended.len());
}

#[tokio::test]
async fn a_wakeup_published_through_one_node_reaches_a_subscriber_on_another() {
    let cluster = cluster().await;
    let layout = layout(2, 1);
    let (alice, bob) = (account(0, 1), account(1, 2));
    assert_ne!(layout.shard_of(&alice), layout.shard_of(&bob));
    let listener = Wakeups::new(cluster.connect(0).await.expect("client"), layout.clone());
    let publisher = Wakeups::new(cluster.connect(2).await.expect("client"), layout.clone());
    let mut wakeups = listener.subscribe(layout.shard_of(&alice)).await.expect("subscribe");

    // Interest reaches the other nodes over the routes a moment after the subscription: publish until one arrives
    // (wake-ups are hints, lost when nobody listens). Bob's shard is published first each time and never arrives.
    let mut first = None;
    let deadline = Instant::now() + WAIT;
    while first.is_none() {
        assert!(Instant::now() < deadline, "no wake-up crossed the cluster within {WAIT:?}");
        publisher.notify(&bob).await.expect("notify bob");
        publisher.notify(&alice).await.expect("notify alice");
        if let Ok(got) = tokio::time::timeout(Duration::from_millis(200), wakeups.next()).await {
            first = got;
        }
    }
    assert_eq!(first.expect("a wake-up").expect("an account"), alice);

    // A payload that is not an account id is reported, not taken for one.
    let raw = cluster.connect(1).await.expect("client");
    let subject = layout.shard_of(&alice).wake_subject();
    let deadline = Instant::now() + WAIT;
    loop {
        raw.publish(subject.clone(), Bytes::from_static(b"junk")).await.expect("publish");
        raw.flush().await.expect("flush");
        match tokio::time::timeout(Duration::from_millis(200), wakeups.next()).await {
            Ok(Some(Err(StoreError::BadWakeup { len: 4 }))) => break,
            Ok(Some(Ok(a))) => assert_eq!(a, alice, "only alice's shard"),
            Ok(other) => panic!("unexpected: {other:?}"),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "the junk wake-up never arrived");
    }
}

#[tokio::test]
async fn a_node_stops_and_restarts_and_a_dropped_cluster_leaves_no_server_even_after_a_panic() {
    let mut cluster = cluster().await;
    // SIGTERM one node and start it again on its ports and store: it answers through the cluster again.
    let stopped = cluster.pid(1).expect("running");
    cluster.stop(1).await.expect("SIGTERM");
    assert!(cluster.pid(1).is_none() && !Path::new(&format!("/proc/{stopped}")).exists(), "exited and reaped");
    cluster.restart(1).await.expect("restarted");
    let js = cluster.jetstream(1).await.expect("js");
    bounded("account info", js.query_account()).await.expect("JetStream answers through the restarted node");

    // A test that panics while it owns the cluster still kills and reaps every node.
    let pids: Vec<u32> = (0..3).map(|i| cluster.pid(i).expect("running")).collect();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _owned = cluster;
        panic!("deliberate: checking that the nodes die when a test panics");
    }));
    assert!(outcome.is_err());
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "nats-server {pid} outlived its cluster");
    }
}
