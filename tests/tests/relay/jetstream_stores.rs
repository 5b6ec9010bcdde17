//! The relay's JetStream erasure feed and notices (`relay_server::store::nats::{NatsErasures, NatsNotices}`) on a
//! real 3-node cluster: the conformance suites the sled stores pass; one feed across relay nodes (an erasure
//! recorded through one node is read, in order, through another), which survives the death of its stream's leader
//! and which the server refuses to shorten; notices published through one node served by another; prekeys whose
//! one-time keys are each handed out once to fetches racing through different nodes; verification codes whose
//! attempts, guessed through different nodes at once, never exceed what a code allows.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use relay_proto::AccountId;
use relay_server::store::conformance::erasures as suite;
use relay_server::store::nats::{NatsErasures, NatsNotices, NatsPrekeys, NatsVerifications};
use relay_server::store::{Erasure, ErasureStore, Erasures, NoticeStore, Notices, Prekeys, Verifications};
use relay_store_nats::Layout;
use relay_tests::nats::NatsCluster;

use crate::WAIT;

fn erasure(n: u8) -> Erasure {
    Erasure {
        account: AccountId([n; 16]),
        identity_key: [n; 32],
        recorded_at_ms: u64::from(n),
        signature: [n; 64],
        signed: vec![n; 40],
    }
}

/// A JetStream context on node `i`, with short requests (retried during elections).
async fn context(cluster: &NatsCluster, i: usize) -> jetstream::Context {
    cluster.context(i, Duration::from_secs(1)).await.expect("context")
}

/// Retries `f` until it succeeds, for at most [`WAIT`] (see `relay_tests::nats::until_ok`).
async fn until_ok<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    f: impl FnMut() -> F,
) -> T {
    relay_tests::nats::until_ok(what, WAIT, f).await
}

#[tokio::test]
async fn the_jetstream_erasure_feed_passes_the_suite_and_is_one_feed_across_nodes() {
    let mut cluster = NatsCluster::start().await.expect("3-node cluster");
    let layout = Layout::default();
    let through_a = NatsErasures::open(context(&cluster, 0).await, &layout).await.expect("feed through node 0");
    let feed: Erasures = Arc::new(through_a);
    suite::erasures_page_in_order_and_mark_the_account(&feed).await;

    // Another relay node, on another NATS server, records into the same feed: one order, no gap.
    let through_b = NatsErasures::open(context(&cluster, 1).await, &layout).await.expect("feed through node 1");
    assert_eq!(through_b.record(&erasure(3)).await.expect("record through node 1"), 3);
    assert!(feed.erased(&AccountId([3; 16])).await.expect("seen through node 0"));
    let all = feed.changes(0, 10).await.expect("changes");
    assert_eq!(all.iter().map(|(c, e)| (*c, e.account.0[0])).collect::<Vec<_>>(), [(1, 1), (2, 2), (3, 3)]);
    assert_eq!(all[2].1, erasure(3), "read back exactly as recorded");

    // The server refuses to shorten the feed: no delete, no purge.
    let js = context(&cluster, 2).await;
    let stream = js.get_stream(relay_server::store::nats::erasures::STREAM).await.expect("stream");
    assert!(stream.delete_message(1).await.is_err(), "a recorded erasure was deleted");
    assert!(stream.purge().await.is_err(), "the feed was purged");

    // The stream's leader dies: the feed is read whole through a surviving node, and recording goes on.
    let mut stream = js.get_stream(relay_server::store::nats::erasures::STREAM).await.expect("stream");
    let info = stream.info().await.expect("info");
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("a leader");
    let victim = cluster.index_of(&leader).expect("the leader is a node");
    let survivor = [2, 1, 0].into_iter().find(|&i| i != victim).expect("a survivor");
    let through_c = NatsErasures::open(context(&cluster, survivor).await, &layout).await.expect("feed");
    cluster.kill(victim).expect("SIGKILL the stream leader");
    let read = until_ok("read after the leader died", || through_c.changes(0, 10)).await;
    assert_eq!(read, all, "every acknowledged erasure, in order");
    let fourth = erasure(4);
    assert_eq!(until_ok("record after the leader died", || through_c.record(&fourth)).await, 4);
}

#[tokio::test]
async fn the_jetstream_notices_pass_the_suite_and_every_node_serves_what_one_published() {
    use relay_server::store::conformance::notices;

    let cluster = NatsCluster::start().await.expect("3-node cluster");
    let layout = Layout::default();
    let store: Notices = Arc::new(NatsNotices::open(context(&cluster, 0).await, &layout).await.expect("bucket"));
    // The refusal test first: it needs an empty bucket, and a refused set changes nothing.
    notices::only_canonical_documents_one_per_pair_are_published(&store).await;
    notices::the_published_set_replaces_the_current_one_and_old_documents_stay_readable(&store).await;

    // What node 0 published, node 2 serves: the current set and every document by hash.
    let other = NatsNotices::open(context(&cluster, 2).await, &layout).await.expect("bucket through node 2");
    let here = store.current_hash("adsco", relay_proto::consent::Purpose::Advertising).await.expect("read");
    let there = other.current_hash("adsco", relay_proto::consent::Purpose::Advertising).await.expect("read");
    assert!(here.is_some() && here == there, "{here:?} against {there:?}");
    let document = other.by_hash(&there.expect("a current notice")).await.expect("read").expect("the document");
    assert_eq!(relay_proto::notice::notice_hash(&document), there.expect("hash"));
    assert_eq!(other.current_count().await.expect("count"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_jetstream_prekeys_pass_the_suite_and_racing_nodes_never_share_a_one_time_key() {
    use relay_server::store::conformance::prekeys;

    let cluster = NatsCluster::start().await.expect("3-node cluster");
    let layout = Layout::default();
    let js = context(&cluster, 0).await;
    let store: Prekeys = Arc::new(NatsPrekeys::open(js.clone(), &layout).await.expect("stream"));
    // Each test of the suite on an empty stream.
    let empty = async || {
        let stream = js.get_stream(relay_server::store::nats::prekeys::STREAM).await.expect("stream");
        stream.purge().await.expect("purge");
    };
    empty().await;
    prekeys::bundle_consumes_one_time_keys_then_falls_back_to_last_resort(&store).await;
    empty().await;
    prekeys::sizes_and_pool_bound_are_checked(&store).await;
    empty().await;
    prekeys::access_key_checks(&store).await;
    empty().await;
    prekeys::forgetting_an_account_removes_its_keys_and_no_one_elses(&store).await;
    empty().await;
    prekeys::racing_fetches_never_share_a_one_time_key(&store).await;

    // Takers on three nodes share one pool: every one-time key goes to exactly one of them.
    let account = AccountId([42; 16]);
    let nodes = [
        store.clone(),
        Arc::new(NatsPrekeys::open(context(&cluster, 1).await, &layout).await.expect("node 1")) as Prekeys,
        Arc::new(NatsPrekeys::open(context(&cluster, 2).await, &layout).await.expect("node 2")) as Prekeys,
    ];
    let signed =
        relay_proto::wire::SignedPrekey { id: 1, public_key: vec![2; 32].into(), signature: vec![3; 64].into() };
    let pool: Vec<_> =
        (0..60).map(|i| relay_proto::wire::OneTimePrekey { id: i, public_key: vec![i as u8; 32].into() }).collect();
    let last_resort = relay_proto::wire::KemPrekey {
        id: 99,
        public_key: vec![9; relay_server::store::prekeys::KEM_PUBLIC_LEN].into(),
        signature: vec![1; 64].into(),
    };
    store.upload(&account, Some(&signed), &pool, &[], Some(&last_resort)).await.expect("upload");
    let takers: Vec<_> = (0..6)
        .map(|i| {
            let node = nodes[i % 3].clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..15 {
                    got.extend(node.take_bundle(&account).await.expect("take").and_then(|b| b.one_time).map(|k| k.id));
                }
                got
            })
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for t in takers {
        for id in t.await.expect("taker") {
            assert!(seen.insert(id), "one-time prekey {id} handed out twice");
        }
    }
    assert_eq!(seen.len(), 60, "every key handed out once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_jetstream_verification_codes_pass_the_suite_and_racing_guesses_never_exceed_the_attempts() {
    use relay_proto::verification::{CODE_ATTEMPTS, VerificationCode};
    use relay_server::store::conformance::verification;
    use relay_server::verify::code::{Attempt, CodeKey, PendingCode, PhoneTag, RequestId};

    let cluster = NatsCluster::start().await.expect("3-node cluster");
    let layout = Layout::default();
    let js = context(&cluster, 0).await;
    let empty = async || {
        let stream = js.get_stream(format!("KV_{}", relay_server::store::nats::verification::BUCKET)).await;
        stream.expect("bucket stream").purge().await.expect("purge");
    };
    let store: Verifications = Arc::new(NatsVerifications::open(js.clone(), &layout).await.expect("bucket"));
    empty().await;
    verification::a_new_request_replaces_the_pending_one_and_attempts_are_counted_in_the_store(&store).await;
    empty().await;
    verification::locks_are_set_touched_and_removed(&store).await;

    // Wrong guesses through three nodes at once: the code allows CODE_ATTEMPTS of them, whoever makes them.
    empty().await;
    let key = CodeKey::from_bytes(&[1; 32]);
    let phone = PhoneTag([5; 32]);
    let code = VerificationCode::parse("111111").expect("code");
    store.replace_pending(&phone, &PendingCode::new(&key, RequestId([1; 16]), &code, 0)).await.expect("put");
    let mut nodes = vec![store.clone()];
    for i in 1..3 {
        nodes.push(Arc::new(NatsVerifications::open(context(&cluster, i).await, &layout).await.expect("bucket")));
    }
    let guessers: Vec<_> = (0..9)
        .map(|i| {
            let node = nodes[i % 3].clone();
            tokio::spawn(async move {
                let mut counted = 0;
                for _ in 0..3 {
                    match node.attempt(&PhoneTag([5; 32]), 1, &|_| false).await.expect("attempt") {
                        Some((Attempt::Wrong { .. }, _)) => counted += 1,
                        Some((other, _)) => panic!("{other:?}"),
                        None => {}
                    }
                }
                counted
            })
        })
        .collect();
    let mut counted = 0;
    for g in guessers {
        counted += g.await.expect("guesser");
    }
    assert_eq!(counted, CODE_ATTEMPTS, "27 guesses through three nodes, as many counted as the code allows");
    assert_eq!(store.pending_request(&phone).await.expect("read"), None, "used up: dropped");
}
