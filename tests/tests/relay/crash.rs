//! Crash campaigns: the relay, then the exporter, as child processes killed with SIGKILL at random moments under
//! load and restarted on the same data directory. A quick campaign runs with the suite; a long one is ignored:
//!
//! ```sh
//! cargo build --workspace --bins
//! cargo test -p relay-tests --test relay -- --ignored crash --nocapture
//! ```
//!
//! Each campaign prints its seed; `CRASH_SEED=<seed>` replays the same schedule of delays (the machine's timing
//! still varies). The checks: every send the relay acknowledged is delivered afterwards, the application sees each
//! message once and nothing that was never sent, and the store opens and serves after the last crash; every grant
//! still in force reaches its affiliate under one webhook id, nothing of a pair leaves after its withdrawal was
//! acknowledged, every export an affiliate accepted is in the export log, and users and the auditor verify the log.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_client::DirectoryEntry;
use relay_exporter::Catalogue;
use relay_exporter::audit::audit;
use relay_exporter::core::EntryState;
use relay_exporter::ids::{Pair, WebhookId};
use relay_exporter::outbox::ExporterStore;
use relay_proto::consent::{ConsentStatement, Decision, Purpose};
use relay_proto::merkle::{ExportLeaf, LeafKind};
use relay_tests::affiliate::{Attempt, ExporterProcess, Sink, test_catalogue};
use relay_tests::chaos::Rng;
use relay_tests::{TestRelay, TestUser};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::{WAIT, bounded};

const SENDERS: usize = 3;
const RECIPIENTS: usize = 2;

/// What the application side of every client saw.
#[derive(Default)]
struct Ledger {
    /// Texts whose send the relay acknowledged, with their recipient.
    acked: BTreeMap<String, usize>,
    /// Texts whose send failed or was cut off by a crash: they may or may not arrive.
    unacked: BTreeSet<String>,
    /// Per recipient, every text the application was handed, in order.
    received: Vec<Vec<String>>,
}

type SharedLedger = Arc<Mutex<Ledger>>;

fn ledger(l: &SharedLedger) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Sender {
    index: usize,
    user: TestUser,
    to: Vec<DirectoryEntry>,
    next: usize,
}

/// Sends, alternating recipients, until `stop` or the first failure (the relay died); records every outcome.
async fn send_until_stopped(mut s: Sender, log: SharedLedger, stop: watch::Receiver<bool>) -> Sender {
    while !*stop.borrow() {
        let r = s.next % RECIPIENTS;
        let text = format!("s{} to r{r} #{}", s.index, s.next);
        s.next += 1;
        match s.user.messenger.send_to(&s.to[r], &text).await {
            Ok(_) => {
                ledger(&log).acked.insert(text, r);
            }
            Err(_) => {
                // Possibly stored before the relay died: it may arrive; retrying would be a new message.
                ledger(&log).unacked.insert(text);
                break;
            }
        }
    }
    s
}

/// Receives until `stop` or the first failure; records what the application is handed.
async fn receive_until_stopped(
    index: usize,
    mut user: TestUser,
    log: SharedLedger,
    stop: watch::Receiver<bool>,
) -> (usize, TestUser) {
    while !*stop.borrow() {
        match user.messenger.receive(1, Duration::from_millis(250)).await {
            Ok(got) => ledger(&log).received[index].extend(got.into_iter().map(|m| m.text)),
            Err(_) => break,
        }
    }
    (index, user)
}

/// Figures of a relay campaign, printed at its end.
#[derive(Debug)]
#[allow(dead_code, reason = "read through Debug, when printed")]
struct RelayFigures {
    seed: u64,
    kills: usize,
    acked: usize,
    unacked: usize,
    delivered: usize,
    unacked_delivered: usize,
    elapsed: Duration,
}

/// Three senders to two recipients through a `relayd` that is SIGKILLed `kills` times at random moments, each after
/// 50–400 ms of load, and restarted; every client reconnects after each restart.
async fn relay_campaign(kills: usize) -> RelayFigures {
    let started = Instant::now();
    let (mut rng, seed) = Rng::for_campaign("relay crash campaign");
    let mut relay = TestRelay::process().await.expect("relay");
    let phone = |role: char, i: usize| format!("+336{}00000{i:02}", if role == 's' { 1 } else { 2 });
    let mut recipients = Vec::new();
    for r in 0..RECIPIENTS {
        recipients.push(Some(relay.user(&phone('r', r)).await.expect("recipient")));
    }
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut user = relay.user(&phone('s', s)).await.expect("sender");
        let mut to = Vec::new();
        for r in 0..RECIPIENTS {
            to.push(user.messenger.contact(&phone('r', r)).await.expect("lookup"));
        }
        senders.push(Some(Sender { index: s, user, to, next: 0 }));
    }
    let log: SharedLedger =
        Arc::new(Mutex::new(Ledger { received: vec![Vec::new(); RECIPIENTS], ..Ledger::default() }));

    for round in 0..=kills {
        let (stop_tx, stop) = watch::channel(false);
        // Handles on every client's connection, to cut them when the relay dies (see below).
        let mut connections = Vec::new();
        let mut sending = JoinSet::new();
        for slot in &mut senders {
            let s = slot.take().expect("sender back from the last round");
            connections.push(s.user.messenger.connection().quic().clone());
            sending.spawn(send_until_stopped(s, log.clone(), stop.clone()));
        }
        let mut receiving = JoinSet::new();
        for (r, slot) in recipients.iter_mut().enumerate() {
            let user = slot.take().expect("recipient back from the last round");
            connections.push(user.messenger.connection().quic().clone());
            receiving.spawn(receive_until_stopped(r, user, log.clone(), stop.clone()));
        }

        tokio::time::sleep(rng.millis(50, 400)).await;
        let last = round == kills;
        if !last {
            relay.kill().await.expect("SIGKILL");
            // A client notices a dead relay only at its idle timeout (a minute): the restarted relay's stateless
            // resets do not match the old connection's tokens. Closing the connections here takes the same error
            // paths at once.
            for c in &connections {
                c.close(0u32.into(), b"relay killed");
            }
        }
        stop_tx.send_replace(true);
        while let Some(s) = bounded("senders stop", sending.join_next()).await {
            let s = s.expect("sender task");
            let i = s.index;
            senders[i] = Some(s);
        }
        while let Some(r) = bounded("recipients stop", receiving.join_next()).await {
            let (i, user) = r.expect("recipient task");
            recipients[i] = Some(user);
        }
        if !last {
            bounded("restart", relay.restart()).await.expect("restart after SIGKILL");
            for user in senders.iter_mut().flatten().map(|s| &mut s.user).chain(recipients.iter_mut().flatten()) {
                bounded("reconnect", user.reconnect()).await.expect("reconnect after the restart");
            }
        }
    }

    // Drain: every acknowledged send must arrive; then one more pass shows whether anything arrives twice.
    let deadline = Instant::now() + WAIT;
    for (r, slot) in recipients.iter_mut().enumerate() {
        let user = slot.as_mut().expect("recipient");
        loop {
            let missing = {
                let l = ledger(&log);
                let got: BTreeSet<&String> = l.received[r].iter().collect();
                l.acked.iter().filter(|(t, to)| **to == r && !got.contains(t)).count()
            };
            if missing == 0 || Instant::now() >= deadline {
                break;
            }
            let got = user.messenger.receive(1, Duration::from_millis(500)).await.expect("drain");
            ledger(&log).received[r].extend(got.into_iter().map(|m| m.text));
        }
        let rest = user.messenger.receive(0, Duration::ZERO).await.expect("final drain");
        ledger(&log).received[r].extend(rest.into_iter().map(|m| m.text));
    }

    let figures = {
        let l = ledger(&log);
        let mut delivered = 0;
        let mut unacked_delivered = 0;
        for (r, texts) in l.received.iter().enumerate() {
            let mut once = BTreeSet::new();
            for t in texts {
                assert!(once.insert(t), "recipient {r}: {t:?} handed to the application twice (seed {seed})");
                match l.acked.get(t) {
                    Some(to) => assert_eq!(*to, r, "{t:?} reached the wrong recipient (seed {seed})"),
                    None if l.unacked.contains(t) => unacked_delivered += 1,
                    None => panic!("recipient {r} received {t:?}, which was never sent (seed {seed})"),
                }
                assert!(t.contains(&format!(" to r{r} ")), "{t:?} reached recipient {r} (seed {seed})");
            }
            delivered += texts.len();
            let lost: Vec<_> =
                l.acked.iter().filter(|(t, to)| **to == r && !once.contains(t)).map(|(t, _)| t).collect();
            assert!(lost.is_empty(), "recipient {r}: {} acknowledged sends lost (seed {seed}): {lost:?}", lost.len());
        }
        RelayFigures {
            seed,
            kills,
            acked: l.acked.len(),
            unacked: l.unacked.len(),
            delivered,
            unacked_delivered,
            elapsed: Duration::ZERO,
        }
    };

    // The store survived: a clean restart, then a fresh round trip; and relayd never panicked.
    relay.stop().await.expect("clean stop");
    relay.restart().await.expect("clean restart");
    let mut sender = senders.swap_remove(0).expect("sender").user;
    let mut recipient = recipients.swap_remove(0).expect("recipient");
    sender.reconnect().await.expect("reconnect");
    recipient.reconnect().await.expect("reconnect");
    sender.messenger.send_text(&phone('r', 0), "after the campaign").await.expect("send after the campaign");
    let got = recipient.messenger.receive(1, WAIT).await.expect("receive after the campaign");
    assert_eq!(got.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["after the campaign"]);
    let relay_log = std::fs::read_to_string(relay.log_path()).expect("relayd log");
    assert!(!relay_log.contains("panicked"), "relayd panicked (seed {seed}); see {}", relay.log_path().display());

    let figures = RelayFigures { elapsed: started.elapsed(), ..figures };
    println!("relay crash campaign: {figures:?}");
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_relay_quick_campaign_loses_no_acknowledged_send() {
    let f = relay_campaign(5).await;
    assert!(f.acked > 0, "{f:?}");
}

/// `cargo test -p relay-tests --test relay -- --ignored crash_relay_long --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long crash campaign (25 SIGKILLs); run with --ignored"]
async fn crash_relay_long_campaign_loses_no_acknowledged_send() {
    let f = relay_campaign(25).await;
    assert!(f.acked > 0, "{f:?}");
}

/// The affiliates' catalogue: two affiliates, three pairs.
const PAIRS: [(&str, &str); 3] = [("adsco", "advertising"), ("adsco", "analytics"), ("shieldco", "security")];
const USERS: usize = 6;

/// One grant a user made, and when its withdrawal was acknowledged to the user, if it was.
struct Grant {
    user: usize,
    hash: String,
    withdrawn_at: Option<Instant>,
}

/// The users' consent decisions, as acknowledged to them.
struct Consents {
    users: Vec<TestUser>,
    grants: Vec<Grant>,
    /// Per user and pair, the grant in force (an index into `grants`).
    in_force: Vec<[Option<usize>; PAIRS.len()]>,
}

impl Consents {
    async fn grant(&mut self, user: usize, pair: usize) {
        let (affiliate, purpose) = PAIRS[pair];
        let m = &self.users[user].messenger;
        let receipt =
            bounded("grant", m.decide_consent(affiliate, purpose, Decision::Grant, None)).await.expect("grant");
        let statement = hex::decode(&receipt.statement).expect("hex");
        let hash = hex::encode(ConsentStatement::decode_stored(&statement).expect("statement").hash());
        self.grants.push(Grant { user, hash, withdrawn_at: None });
        self.in_force[user][pair] = Some(self.grants.len() - 1);
    }

    async fn withdraw(&mut self, user: usize, pair: usize) {
        let (affiliate, purpose) = PAIRS[pair];
        let m = &self.users[user].messenger;
        // Bounded by the relay's lease on an export in flight, which an exporter killed mid-attempt never releases: it
        // lapses within LEASE_TTL, so the bound is that plus the usual one.
        let bound = relay_server::fence::LEASE_TTL + crate::WAIT;
        tokio::time::timeout(bound, m.decide_consent(affiliate, purpose, Decision::Withdraw, None))
            .await
            .unwrap_or_else(|_| panic!("withdraw did not finish within {bound:?}"))
            .expect("withdraw");
        let acknowledged = Instant::now();
        if let Some(g) = self.in_force[user][pair].take() {
            self.grants[g].withdrawn_at = Some(acknowledged);
        }
    }

    /// Flips one random pair of one random user: withdraws a grant in force (and sometimes grants it again at once),
    /// or grants.
    async fn flip(&mut self, rng: &mut Rng) {
        let user = rng.below(0, USERS as u64) as usize;
        let pair = rng.below(0, PAIRS.len() as u64) as usize;
        if self.in_force[user][pair].is_some() {
            self.withdraw(user, pair).await;
            if !rng.chance(50) {
                return;
            }
        }
        self.grant(user, pair).await;
    }
}

fn export_attempts(sinks: &[&Sink]) -> Vec<(usize, Attempt)> {
    sinks
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.attempts().into_iter().map(move |a| (i, a)))
        .filter(|(_, a)| a.body["type"] == "user.metadata.exported")
        .collect()
}

/// Figures of an exporter campaign, printed at its end.
#[derive(Debug)]
#[allow(dead_code, reason = "read through Debug, when printed")]
struct ExporterFigures {
    seed: u64,
    kills: usize,
    grants: usize,
    withdrawals: usize,
    attempts: usize,
    exports_delivered: usize,
    redelivered_same_id: usize,
    notices: usize,
    logged: u64,
    /// Logged, though no 200 was seen: dropped after an attempt with no answer.
    logged_unanswered: usize,
    /// Of those, never seen by the affiliate at all.
    logged_unseen: usize,
    elapsed: Duration,
}

/// Six users granting and withdrawing three pairs while `relay-exporter` delivers to two slow affiliates, SIGKILLed
/// `kills` times in the middle of a delivery and restarted on the same data directory.
async fn exporter_campaign(kills: usize) -> ExporterFigures {
    let started = Instant::now();
    let (mut rng, seed) = Rng::for_campaign("exporter crash campaign");
    let adsco = Sink::start(b"adsco webhook key 0123456789").await.expect("adsco sink");
    let shieldco = Sink::start(b"shieldco webhook key 98765432").await.expect("shieldco sink");
    // Slow affiliates: a backlog takes long enough to deliver that the kills land in the middle of it.
    for s in [&adsco, &shieldco] {
        s.set_delay(Duration::from_millis(15));
    }
    let text = test_catalogue(&adsco, &shieldco);
    let mut exporter = ExporterProcess::new(&text, 20).await.expect("exporter identity");
    let relay = TestRelay::with_export_for(exporter.fingerprint().to_owned()).await.expect("relay");
    let export_addr = relay.export_addr().expect("export interface");
    exporter.start(export_addr, relay.fingerprint()).await.expect("exporter");
    relay.wait_for_notices(WAIT).await.expect("the exporter's notices");

    let mut c = Consents { users: Vec::new(), grants: Vec::new(), in_force: vec![[None; PAIRS.len()]; USERS] };
    for u in 0..USERS {
        c.users.push(relay.user(&format!("+3365000000{u}")).await.expect("user"));
    }
    for u in 0..USERS {
        for p in 0..PAIRS.len() {
            c.grant(u, p).await;
        }
    }
    let sinks = [&adsco, &shieldco];
    let mut withdrawals_while_down = 0;
    for _ in 0..kills {
        // While the exporter delivers: a few users change their minds, and the last one grants (again), so that a
        // request reaches an affiliate after `seen`.
        let seen = [adsco.attempts().len(), shieldco.attempts().len()];
        for _ in 0..2 {
            c.flip(&mut rng).await;
        }
        let (u, p) = (rng.below(0, USERS as u64) as usize, rng.below(0, PAIRS.len() as u64) as usize);
        if c.in_force[u][p].is_some() {
            c.withdraw(u, p).await;
        }
        c.grant(u, p).await;
        // In the middle of a delivery: once the next request reached an affiliate, at a random moment.
        tokio::select! {
            r = adsco.wait_until(WAIT, |a| a.len() > seen[0]) => r,
            r = shieldco.wait_until(WAIT, |a| a.len() > seen[1]) => r,
        }
        .expect("a delivery under way");
        tokio::time::sleep(rng.millis(0, 150)).await;
        exporter.kill().await.expect("SIGKILL");
        // Sometimes a user withdraws while the exporter is down: its last deliveries may be unrecorded.
        if rng.chance(50) {
            let u = rng.below(0, USERS as u64) as usize;
            if let Some(p) = (0..PAIRS.len()).find(|&p| c.in_force[u][p].is_some()) {
                c.withdraw(u, p).await;
                withdrawals_while_down += 1;
            }
        }
        bounded("restart", exporter.restart()).await.expect("restart after SIGKILL");
    }

    // Every grant still in force reaches its affiliate.
    let pair_sink = |pair: usize| if PAIRS[pair].0 == "adsco" { &adsco } else { &shieldco };
    for (u, pairs) in c.in_force.iter().enumerate() {
        for (p, g) in pairs.iter().enumerate() {
            let Some(g) = g else { continue };
            let hash = c.grants[*g].hash.clone();
            let delivered = |a: &[Attempt]| {
                a.iter().any(|a| a.status == 200 && a.body["data"]["consent"].as_str() == Some(hash.as_str()))
            };
            pair_sink(p)
                .wait_until(WAIT, delivered)
                .await
                .unwrap_or_else(|e| panic!("user {u}'s grant of {:?} never delivered (seed {seed}): {e}", PAIRS[p]));
        }
    }
    exporter.stop(WAIT).await.expect("clean stop");

    let exports = export_attempts(&sinks);
    let by_hash: BTreeMap<&str, &Grant> = c.grants.iter().map(|g| (g.hash.as_str(), g)).collect();
    let mut ids_per_export: BTreeMap<(usize, String), BTreeSet<String>> = BTreeMap::new();
    let mut body_per_id: BTreeMap<&str, &str> = BTreeMap::new();
    let mut delivered_ids = BTreeSet::new();
    for (sink, a) in &exports {
        assert!(a.signature_ok, "bad signature on {} (seed {seed})", a.id);
        let hash = a.body["data"]["consent"].as_str().expect("consent hash");
        let grant = by_hash.get(hash).unwrap_or_else(|| panic!("export under an unknown grant {hash} (seed {seed})"));
        // The withdrawal fence: nothing of a pair starts after its withdrawal was acknowledged to the user.
        if let Some(withdrawn) = grant.withdrawn_at {
            assert!(
                a.at < withdrawn,
                "export {} of user {} started {:?} after the withdrawal was acknowledged (seed {seed})",
                a.id,
                grant.user,
                a.at - withdrawn
            );
        }
        // A retry after a crash repeats the webhook id and the body; the same data never gets a second id.
        assert_eq!(*body_per_id.entry(&a.id).or_insert(&a.raw), a.raw.as_str(), "{} changed body (seed {seed})", a.id);
        if a.status == 200 {
            ids_per_export.entry((*sink, a.body["data"].to_string())).or_default().insert(a.id.clone());
            delivered_ids.insert(a.id.clone());
        }
    }
    for ((sink, data), ids) in &ids_per_export {
        assert_eq!(
            ids.len(),
            1,
            "affiliate {sink}: one export under several webhook ids {ids:?}: {data} (seed {seed})"
        );
    }
    let redelivered_same_id = exports.iter().filter(|(_, a)| a.status == 200).count() - delivered_ids.len();

    // Every export an affiliate accepted is in the log, once; the auditor passes the log.
    let catalogue = Catalogue::parse(&text).expect("catalogue");
    let key = relay_proto::merkle::log_key_from_wire(&hex::decode(exporter.log_key()).expect("hex")).expect("key");
    let mut logged_by_account: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (logged, logged_unanswered, logged_unseen) = {
        let store = ExporterStore::open(&exporter.data_dir().join("db")).expect("exporter store");
        let report = audit(&store, &key, Some(&catalogue)).expect("audit");
        if !report.passed() {
            // Everything needed to tell a wrong entry from a wrong audit.
            let history = std::fs::read_to_string(exporter.log_path()).unwrap_or_default();
            let mut details = String::new();
            for (index, record) in store.log_records(0, usize::MAX).expect("log") {
                if !report.problems.iter().any(|p| p.starts_with(&format!("entry {index}:"))) {
                    continue;
                }
                let leaf = ExportLeaf::decode(&record.leaf).expect("leaf");
                let id = WebhookId::from_export_id(leaf.export_id).to_string();
                let purpose = Purpose::parse(&leaf.purpose).expect("purpose");
                let pair = Pair::new(record.account, leaf.affiliate.clone(), purpose);
                details.push_str(&format!(
                    "entry {index} {id} time {} evidence recorded {}\n",
                    leaf.time_ms, record.evidence.recorded_at_ms
                ));
                for (seq, e) in store.statements_of(&pair).expect("statements") {
                    details.push_str(&format!("  statement {seq} recorded {}\n", e.recorded_at_ms));
                }
                for line in history.lines().filter(|l| l.contains(&id)) {
                    details.push_str(&format!("  log: {line}\n"));
                }
                for (_, a) in exports.iter().filter(|(_, a)| a.id == id) {
                    details.push_str(&format!("  sink: status {} at {:?}\n", a.status, a.at));
                }
            }
            panic!("audit (seed {seed}): {:?}\n{details}", report.problems);
        }
        let mut logged = BTreeSet::new();
        for (index, record) in store.log_records(0, usize::MAX).expect("log") {
            let leaf = ExportLeaf::decode(&record.leaf).expect("leaf");
            let id = WebhookId::from_export_id(leaf.export_id).to_string();
            // Users see withdrawal notices among their entries; the figures below are about exports.
            logged_by_account.entry(record.account.to_string()).or_default().insert(id.clone());
            if leaf.kind != LeafKind::Export {
                continue;
            }
            assert!(logged.insert(id.clone()), "{id} logged twice, again at {index} (seed {seed})");
        }
        // An export whose attempt got no answer before the last kill may still be in the outbox, marked in flight,
        // when the exporter is stopped: it is logged when it leaves the outbox (settled or dropped), so it counts
        // as pending, not as missing. Anything else accepted by an affiliate must be in the log.
        let pending: BTreeSet<String> = store
            .entries()
            .expect("outbox")
            .into_iter()
            .filter(|(_, e)| matches!(e.state, EntryState::InFlight(_)))
            .map(|(id, _)| id.to_string())
            .collect();
        let unlogged: Vec<_> = delivered_ids.difference(&logged).filter(|id| !pending.contains(*id)).collect();
        if !unlogged.is_empty() {
            let history = std::fs::read_to_string(exporter.log_path()).unwrap_or_default();
            let history: Vec<_> =
                history.lines().filter(|l| unlogged.iter().any(|id| l.contains(id.as_str()))).collect();
            panic!(
                "accepted by an affiliate but not in the export log (seed {seed}): {unlogged:?}\nattempts: {:?}\n\
                 exporter log:\n{}",
                exports
                    .iter()
                    .filter(|(_, a)| unlogged.contains(&&a.id))
                    .map(|(_, a)| (&a.id, a.status))
                    .collect::<Vec<_>>(),
                history.join("\n")
            );
        }
        // The other way round is allowed: an export whose attempt got no answer before a crash is logged when its
        // pair is withdrawn, though the request may not have reached the affiliate (the log errs on the safe side).
        let attempted: BTreeSet<&String> = exports.iter().map(|(_, a)| &a.id).collect();
        let unanswered = logged.iter().filter(|id| !delivered_ids.contains(*id)).count();
        (report.entries, unanswered, logged.iter().filter(|id| !attempted.contains(id)).count())
    };

    for (_, a) in exports.iter().filter(|(_, a)| a.status == 200) {
        let user = by_hash[a.body["data"]["consent"].as_str().unwrap_or_default()].user;
        let account = c.users[user].messenger.account_id().to_string();
        assert!(
            logged_by_account.get(&account).is_some_and(|ids| ids.contains(&a.id)),
            "{} logged under another account (seed {seed})",
            a.id
        );
    }

    // Each user sees and verifies exactly their own log entries, once the exporter has published the log again.
    exporter.restart().await.expect("restart to publish");
    for (u, user) in c.users.iter().enumerate() {
        let want = logged_by_account.get(&user.messenger.account_id().to_string()).cloned().unwrap_or_default();
        // The relay's copy has no change feed to wait on: poll it, within the bound.
        let report = bounded("the log published to the relay", async {
            loop {
                let report = user.messenger.exports(true).await.expect("exports");
                let got: BTreeSet<String> = report.entries.iter().map(|e| format!("msg_{}", e.export_id)).collect();
                if got == want {
                    return report;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(report.problems.is_empty(), "user {u}'s verification (seed {seed}): {:?}", report.problems);
        assert!(report.entries.iter().all(|e| e.problem.is_none()), "user {u} (seed {seed}): {:?}", report.entries);
    }
    exporter.stop(WAIT).await.expect("clean stop");
    let exporter_log = std::fs::read_to_string(exporter.log_path()).expect("exporter log");
    assert!(!exporter_log.contains("panicked"), "relay-exporter panicked (seed {seed}); see its log");

    let notices = sinks.iter().flat_map(|s| s.events()).filter(|a| a.body["type"] == "consent.withdrawn").count();
    let figures = ExporterFigures {
        seed,
        kills,
        grants: c.grants.len(),
        withdrawals: c.grants.iter().filter(|g| g.withdrawn_at.is_some()).count(),
        attempts: exports.len(),
        exports_delivered: delivered_ids.len(),
        redelivered_same_id,
        notices,
        logged,
        logged_unanswered,
        logged_unseen,
        elapsed: started.elapsed(),
    };
    println!("exporter crash campaign: {figures:?} ({withdrawals_while_down} withdrawals while it was down)");
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_exporter_quick_campaign_delivers_each_export_once_and_nothing_after_a_withdrawal() {
    let f = exporter_campaign(5).await;
    assert!(f.exports_delivered > 0, "{f:?}");
}

/// `cargo test -p relay-tests --test relay -- --ignored crash_exporter_long --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long crash campaign (20 SIGKILLs); run with --ignored"]
async fn crash_exporter_long_campaign_delivers_each_export_once_and_nothing_after_a_withdrawal() {
    let f = exporter_campaign(20).await;
    assert!(f.exports_delivered > 0, "{f:?}");
}
