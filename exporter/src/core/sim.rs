//! A deterministic world for the core, in memory: a store that models what a crash keeps ([`MemStore`]), a relay
//! that serves the feeds and grants or denies export leases as the export interface does ([`Relay`]), affiliates
//! that answer as told and remember what reached them ([`Affiliate`]), a clock, and the driver loop of
//! `crate::process` (effects performed in order, each answer handed back) with a crash possible before any effect.
//!
//! The driver also checks, at every request it lets leave, the crash rule the others rest on: an export's entry is
//! durably in flight before its request leaves.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use ed25519_dalek::{Signer, SigningKey};
use relay_proto::AccountId;
use relay_proto::consent::{ConsentStatement, Decision, Purpose};
use relay_proto::wire::{ConsentChange, ConsentChangeList, DeviceInfo, ErasureChange, Subject};

use super::{
    AccountRecords, Answer, CheckedChange, CheckedErasure, Core, Delivered, Effect, Entropy, Entry, EntryState,
    Evidence, ExportMarker, Known, Lease, LeaseAnswer, LogRecord, Write,
};
use crate::affiliates::Catalogue;
use crate::feed::{self, Feed};
use crate::ids::{Pair, WebhookId};

/// The catalogue of the tests: adsco (advertising, analytics) and shieldco (security).
pub const CATALOGUE: &str = include_str!("../../affiliates.example.toml");

/// The exporter's pseudonym key in the tests.
pub const MASTER_KEY: [u8; 32] = [3; 32];
/// How long a lease lasts, as the relay's `LEASE_TTL`.
pub const LEASE_MS: u64 = 30_000;

/// Reproducible randomness (SplitMix64).
#[derive(Debug, Clone)]
pub struct SeededEntropy(pub u64);

impl SeededEntropy {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Entropy for SeededEntropy {
    fn jitter(&mut self) -> u64 {
        self.next()
    }

    fn nonce(&mut self) -> [u8; 16] {
        let mut nonce = [0; 16];
        nonce[..8].copy_from_slice(&self.next().to_le_bytes());
        nonce[8..].copy_from_slice(&self.next().to_le_bytes());
        nonce
    }
}

/// Random nonces, but the same jitter every time: retry times that a test can compute.
#[derive(Debug, Clone)]
pub struct FixedJitter(pub u64, pub SeededEntropy);

impl Entropy for FixedJitter {
    fn jitter(&mut self) -> u64 {
        self.0
    }

    fn nonce(&mut self) -> [u8; 16] {
        self.1.nonce()
    }
}

/// Everything the store holds, as sled would hand it back (entries as their stored JSON).
#[derive(Debug, Clone, Default)]
pub struct Image {
    pub outbox: BTreeMap<WebhookId, Vec<u8>>,
    pub exported: BTreeMap<Pair, ExportMarker>,
    pub delivered: BTreeMap<Pair, Delivered>,
    pub statements: BTreeMap<(Pair, u64), Evidence>,
    pub log: Vec<LogRecord>,
    pub logged: BTreeMap<WebhookId, u64>,
    pub cursors: HashMap<Feed, u64>,
    pub erased: BTreeMap<AccountId, Evidence>,
}

impl Image {
    pub fn entries(&self) -> Vec<(WebhookId, Entry)> {
        self.outbox.iter().map(|(id, v)| (*id, serde_json::from_slice(v).expect("stored entry decodes"))).collect()
    }

    pub fn entry(&self, id: &WebhookId) -> Option<Entry> {
        self.outbox.get(id).map(|v| serde_json::from_slice(v).expect("stored entry decodes"))
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write(Write::Statement { pair, sequence, evidence }) => {
                self.statements.insert((pair.clone(), *sequence), evidence.clone());
            }
            Op::Write(Write::Put { id, entry }) => {
                self.outbox.insert(*id, serde_json::to_vec(entry).expect("entry encodes"));
            }
            Op::Write(Write::Remove { id }) => {
                self.outbox.remove(id);
            }
            Op::Write(Write::SetExported { pair, marker }) => {
                self.exported.insert(pair.clone(), *marker);
            }
            Op::Write(Write::ForgetExported { pair }) => {
                self.exported.remove(pair);
            }
            Op::Write(Write::ForgetDelivered { pair }) => {
                self.delivered.remove(pair);
            }
            Op::Write(Write::Cursor { feed, cursor }) => {
                self.cursors.insert(*feed, *cursor);
            }
            Op::Write(Write::EraseBodies { .. }) => {}
            Op::Write(Write::Erased { account, evidence }) => {
                self.erased.insert(*account, evidence.clone());
            }
            Op::Write(Write::Settle { .. }) => unreachable!("a settle is split into its log append and its removal"),
            Op::Unlist { id, pair, delivered } => {
                if let Some(delivered) = delivered {
                    self.delivered.entry(pair.clone()).or_default().merge(delivered.clone());
                }
                self.outbox.remove(id);
            }
        }
    }

    fn append_log(&mut self, id: WebhookId, record: &LogRecord) {
        if !self.logged.contains_key(&id) {
            self.logged.insert(id, self.log.len() as u64);
            self.log.push(record.clone());
        }
    }
}

/// A write not yet durable.
#[derive(Debug, Clone)]
enum Op {
    Write(Write),
    /// The second half of a settle: out of the outbox, pair delivered (one transaction).
    Unlist {
        id: WebhookId,
        pair: Pair,
        delivered: Option<Delivered>,
    },
}

/// The exporter's store as sled behaves for it: writes visible at once, durable at a flush; a settle flushes
/// everything before it with its log append, then removes the entry in one transaction; a crash keeps what was
/// durable plus a prefix of what was not.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    pub live: Image,
    pub durable: Image,
    pending: Vec<Op>,
}

impl MemStore {
    pub fn apply(&mut self, write: &Write) {
        match write {
            Write::Settle { id, pair, delivered, record } => {
                self.flush();
                self.live.append_log(*id, record);
                self.durable.append_log(*id, record);
                let op = Op::Unlist { id: *id, pair: pair.clone(), delivered: delivered.clone() };
                self.live.apply(&op);
                self.pending.push(op);
            }
            other => {
                let op = Op::Write(other.clone());
                self.live.apply(&op);
                self.pending.push(op);
            }
        }
    }

    pub fn flush(&mut self) {
        for op in self.pending.drain(..) {
            self.durable.apply(&op);
        }
    }

    /// Writes not yet durable.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The process died: what survives is what was durable and the first `keep` writes after it.
    pub fn crash(&mut self, keep: usize) {
        for op in self.pending.drain(..).take(keep) {
            self.durable.apply(&op);
        }
        self.live = self.durable.clone();
    }

    pub fn known(&self, pair: &Pair) -> Known {
        let purpose_level = Pair::new(pair.account, "", pair.purpose);
        let evidence = self.live.statements.iter().filter(|((p, _), _)| *p == purpose_level).map(|(_, e)| e);
        let latest = self.live.statements.range((pair.clone(), 0)..=(pair.clone(), u64::MAX)).next_back().map(
            |((_, sequence), evidence)| {
                let bytes = hex::decode(&evidence.statement).expect("statement hex");
                (*sequence, relay_proto::consent::statement_hash(&bytes))
            },
        );
        Known {
            exported: self.live.exported.get(pair).copied(),
            delivered: self.live.delivered.get(pair).cloned(),
            latest,
            objection: Known::latest_objection(evidence),
            erased: self.live.erased.contains_key(&pair.account),
        }
    }

    /// What an erasure of `account` needs to know, as `ExporterStore::account_records` reads it.
    pub fn account_records(&self, account: &AccountId) -> AccountRecords {
        AccountRecords {
            delivered: self
                .live
                .delivered
                .iter()
                .filter(|(p, _)| p.account == *account)
                .map(|(p, d)| (p.clone(), d.clone()))
                .collect(),
            exported: self.live.exported.keys().filter(|p| p.account == *account).cloned().collect(),
        }
    }
}

/// How an affiliate answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// 200.
    Accept,
    /// 503.
    Refuse,
    /// The connection is refused: nothing of the request arrives.
    Unreachable,
    /// The request arrives, the answer is lost.
    AnswerLost,
    /// No answer, and the request did not arrive either (the exporter cannot tell this from `AnswerLost`).
    RequestLost,
}

/// A request that reached an affiliate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub id: WebhookId,
    pub body: String,
    /// The world's step when it arrived.
    pub step: u64,
    /// How the affiliate answered it.
    pub behaviour: Behaviour,
}

impl Received {
    /// Whether the affiliate took the event: it answered 2xx, heard or not.
    pub fn held(&self) -> bool {
        matches!(self.behaviour, Behaviour::Accept | Behaviour::AnswerLost)
    }
}

/// An affiliate's endpoint.
#[derive(Debug, Default)]
pub struct Affiliate {
    /// How the next requests are answered, in order; then [`Behaviour::Accept`].
    pub script: VecDeque<Behaviour>,
    pub received: Vec<Received>,
}

/// A user, as the relay knows them.
#[derive(Debug, Clone)]
pub struct User {
    pub key: SigningKey,
    pub phone: String,
    pub model: String,
    sequence: u64,
}

impl User {
    pub fn account(&self) -> AccountId {
        AccountId::from_identity_key(self.key.verifying_key().as_bytes())
    }
}

/// A statement the relay recorded.
#[derive(Debug, Clone)]
struct Recorded {
    user: usize,
    statement: ConsentStatement,
    signature: Vec<u8>,
    recorded_at_ms: u64,
}

/// The relay's side of the export interface.
#[derive(Debug, Default)]
pub struct Relay {
    pub users: Vec<User>,
    consents: Vec<Recorded>,
    /// The subject feed: the accounts whose data changed, in order.
    subjects: Vec<usize>,
    /// The statement in force per pair.
    in_force: BTreeMap<Pair, [u8; 32]>,
    leases: BTreeMap<u64, (Pair, u64)>,
    next_lease: u64,
    /// While set, every request to the relay fails.
    pub down: bool,
    /// How long leases last.
    pub lease_ms: u64,
    /// Changes per page.
    pub page: usize,
    /// Withdrawals recorded: the pair, the position of the withdrawal in the consent feed, and the step at which it
    /// was acknowledged to its user (once no lease of its pair was out).
    pub withdrawals: Vec<(Pair, usize, Option<u64>)>,
    /// Every lease asked for: pair, and whether it was granted.
    pub asked: Vec<(Pair, bool)>,
    /// The erasure feed, in order.
    pub erasures: Vec<ErasureChange>,
}

impl Relay {
    fn new() -> Self {
        Self { lease_ms: LEASE_MS, page: 2, ..Self::default() }
    }

    fn change(&self, r: &Recorded, with_subject: bool) -> ConsentChange {
        let user = &self.users[r.user];
        let pair = Pair::new(r.statement.account, r.statement.affiliate.clone(), r.statement.purpose);
        let in_force = self.in_force.get(&pair) == Some(&r.statement.hash());
        ConsentChange {
            cursor: 0,
            account_id: r.statement.account.as_bytes().to_vec().into(),
            identity_key: user.key.verifying_key().as_bytes().to_vec().into(),
            statement: r.statement.encode().into(),
            signature: r.signature.clone().into(),
            recorded_at_ms: r.recorded_at_ms,
            subject: (with_subject && in_force).then(|| Subject {
                phone: user.phone.clone(),
                device: Some(DeviceInfo {
                    model: user.model.clone(),
                    os: "Android 16".into(),
                    app_version: "1.0".into(),
                }),
            }),
        }
    }

    /// The page of `feed` after `after`, as the export interface serves it (subjects only for grants in force now).
    pub fn page(&self, feed: Feed, after: u64) -> ConsentChangeList {
        let mut changes = Vec::new();
        let mut next_cursor = after;
        match feed {
            Feed::Consents => {
                for (i, r) in self.consents.iter().enumerate().skip(after as usize).take(self.page) {
                    let mut change = self.change(r, r.statement.decision == Decision::Grant);
                    change.cursor = i as u64 + 1;
                    next_cursor = change.cursor;
                    changes.push(change);
                }
            }
            // Served by `erasure_page`.
            Feed::Erasures => {}
            Feed::Subjects => {
                for (i, user) in self.subjects.iter().enumerate().skip(after as usize).take(self.page) {
                    next_cursor = i as u64 + 1;
                    // The latest statement of each pair of the account that is a grant in force now.
                    let mut latest: BTreeMap<Pair, &Recorded> = BTreeMap::new();
                    for r in self.consents.iter().filter(|r| r.user == *user) {
                        latest.insert(
                            Pair::new(r.statement.account, r.statement.affiliate.clone(), r.statement.purpose),
                            r,
                        );
                    }
                    for (pair, r) in latest {
                        if self.in_force.get(&pair) == Some(&r.statement.hash()) {
                            let mut change = self.change(r, true);
                            change.cursor = next_cursor;
                            changes.push(change);
                        }
                    }
                }
            }
        }
        ConsentChangeList { changes, next_cursor }
    }

    /// The erasure feed after `after`.
    pub fn erasure_page(&self, after: u64) -> Vec<ErasureChange> {
        self.erasures.iter().skip(after as usize).take(self.page).cloned().collect()
    }

    /// Leases granted and neither released nor lapsed.
    pub fn leases_out(&self) -> usize {
        self.leases.len()
    }

    fn begin(&mut self, pair: &Pair, statement_hash: [u8; 32], now: u64) -> LeaseAnswer {
        if self.down {
            return LeaseAnswer::Failed;
        }
        let granted = self.in_force.get(pair) == Some(&statement_hash);
        self.asked.push((pair.clone(), granted));
        if !granted {
            return LeaseAnswer::Denied { reason: "not the latest grant in force".into() };
        }
        self.next_lease += 1;
        self.leases.insert(self.next_lease, (pair.clone(), now + self.lease_ms));
        LeaseAnswer::Granted(Lease { id: self.next_lease, valid_for_ms: self.lease_ms })
    }

    /// Lets the leases past their deadline lapse, and acknowledges the withdrawals whose pair has no lease out any
    /// more, at `step`.
    fn acknowledge(&mut self, step: u64, now: u64) {
        self.leases.retain(|_, (_, deadline)| *deadline > now);
        for (pair, _, acknowledged) in &mut self.withdrawals {
            if acknowledged.is_none() && !self.leases.values().any(|(p, _)| p == pair) {
                *acknowledged = Some(step);
            }
        }
    }
}

/// The process died before performing an effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crashed;

/// The core, its store, the relay, the affiliates and the clock.
pub struct World {
    pub core: Core,
    pub store: MemStore,
    pub relay: Relay,
    pub affiliates: BTreeMap<String, Affiliate>,
    /// The catalogue the core starts with (at the next restart, if changed).
    pub catalogue: Catalogue,
    pub now: u64,
    /// How far the clock moves per effect performed (ms).
    pub tick: u64,
    /// How much longer than `tick` a flush takes (ms): a slow disk.
    pub flush_ms: u64,
    /// How long the relay's answer to a lease request takes to arrive (ms), after the relay took the lease.
    pub lease_answer_ms: u64,
    /// Effects performed so far, across restarts.
    pub step: u64,
    /// The process dies before performing the effect of this step.
    pub crash_at: Option<u64>,
    /// Every batch of effects the core returned, in order (what a test inspects).
    pub batches: Vec<Vec<Effect>>,
    seed: u64,
    /// The jitter every retry draws, if fixed.
    jitter: Option<u64>,
}

impl World {
    pub fn new(seed: u64) -> Self {
        let affiliates = ["adsco", "shieldco"].into_iter().map(|a| (a.to_owned(), Affiliate::default())).collect();
        let store = MemStore::default();
        let catalogue = Catalogue::parse(CATALOGUE).expect("catalogue");
        Self {
            core: Self::core(&catalogue, &store, seed, None),
            store,
            relay: Relay::new(),
            affiliates,
            catalogue,
            now: 1_000_000,
            tick: 1,
            flush_ms: 0,
            lease_answer_ms: 0,
            step: 0,
            crash_at: None,
            batches: Vec::new(),
            seed,
            jitter: None,
        }
    }

    /// A world whose retries all draw `jitter`.
    pub fn with_jitter(seed: u64, jitter: u64) -> Self {
        let mut world = Self::new(seed);
        world.jitter = Some(jitter);
        world.core = Self::core(&world.catalogue, &world.store, seed, Some(jitter));
        world
    }

    fn core(catalogue: &Catalogue, store: &MemStore, seed: u64, jitter: Option<u64>) -> Core {
        let catalogue = catalogue.clone();
        let cursors = store.durable.cursors.clone();
        let entropy: Box<dyn Entropy> = match jitter {
            Some(j) => Box::new(FixedJitter(j, SeededEntropy(seed))),
            None => Box::new(SeededEntropy(seed)),
        };
        Core::new(catalogue, MASTER_KEY, store.live.entries(), cursors, entropy)
    }

    /// A new user with the `n`th key.
    pub fn user(&mut self, n: u8, model: &str) -> usize {
        let key = SigningKey::from_bytes(&[n; 32]);
        let phone = format!("+336123456{n:02}");
        self.relay.users.push(User { key, phone, model: model.into(), sequence: 0 });
        self.relay.users.len() - 1
    }

    pub fn pair(&self, user: usize, affiliate: &str, purpose: Purpose) -> Pair {
        Pair::new(self.relay.users[user].account(), affiliate, purpose)
    }

    /// The user decides, and the relay records it (a withdrawal waits for the pair's leases to be acknowledged).
    pub fn decide(&mut self, user: usize, affiliate: &str, purpose: Purpose, decision: Decision) -> [u8; 32] {
        // The user signs the notice the relay serves, which is the catalogue's current one.
        let notice = match decision {
            Decision::Grant => self.catalogue.notice(affiliate, purpose).map_or([0; 32], |n| n.hash),
            Decision::Withdraw | Decision::Object | Decision::Lift => [0; 32],
        };
        self.decide_under(user, affiliate, purpose, decision, notice)
    }

    /// As [`World::decide`], the statement naming `notice_hash` (a relay that showed the user another document).
    pub fn decide_under(
        &mut self,
        user: usize,
        affiliate: &str,
        purpose: Purpose,
        decision: Decision,
        notice_hash: [u8; 32],
    ) -> [u8; 32] {
        let u = &mut self.relay.users[user];
        u.sequence += 1;
        let statement = ConsentStatement {
            account: u.account(),
            affiliate: affiliate.into(),
            purpose,
            decision,
            notice_hash,
            sequence: u.sequence,
            time_ms: self.now,
            expires_ms: None,
        };
        let signature = u.key.sign(&statement.signed_bytes()).to_bytes().to_vec();
        let pair = self.pair(user, affiliate, purpose);
        let hash = statement.hash();
        match decision {
            Decision::Grant => {
                self.relay.in_force.insert(pair, hash);
            }
            Decision::Withdraw => {
                self.relay.in_force.remove(&pair);
                self.relay.withdrawals.push((pair, self.relay.consents.len(), None));
                self.relay.acknowledge(self.step, self.now);
            }
            // The relay denies every lease of the purpose from now on, and acknowledges the objection like a
            // withdrawal of each of them.
            Decision::Object => {
                let objected: Vec<Pair> = self
                    .relay
                    .in_force
                    .keys()
                    .filter(|p| p.account == pair.account && p.purpose == purpose)
                    .cloned()
                    .collect();
                for p in objected {
                    self.relay.in_force.remove(&p);
                    self.relay.withdrawals.push((p, self.relay.consents.len(), None));
                }
                self.relay.acknowledge(self.step, self.now);
            }
            Decision::Lift => {}
        }
        self.relay.consents.push(Recorded { user, statement, signature, recorded_at_ms: self.now });
        hash
    }

    /// A compromised relay serves again, as a new change, the statement at position `at` of the consent feed (validly
    /// signed, but old), and treats it as the one in force (it grants its leases and attaches the subject).
    pub fn replay(&mut self, at: usize) {
        let r = self.relay.consents[at].clone();
        let pair = Pair::new(r.statement.account, r.statement.affiliate.clone(), r.statement.purpose);
        if r.statement.decision == Decision::Grant {
            self.relay.in_force.insert(pair, r.statement.hash());
        }
        self.relay.consents.push(r);
    }

    /// The user erases their account: the relay records the signed request (made on a connection whose keying
    /// material is `ekm`), and from then on holds nothing in force for it (an honest relay).
    pub fn erase(&mut self, user: usize, ekm: [u8; 32]) -> ErasureChange {
        let u = &self.relay.users[user];
        let account = u.account();
        let signed = relay_proto::auth::delete_transcript(&ekm, &account);
        let change = ErasureChange {
            cursor: self.relay.erasures.len() as u64 + 1,
            account_id: account.as_bytes().to_vec().into(),
            identity_key: u.key.verifying_key().as_bytes().to_vec().into(),
            signature: u.key.sign(&signed).to_bytes().to_vec().into(),
            signed: signed.into(),
            recorded_at_ms: self.now,
        };
        self.relay.in_force.retain(|p, _| p.account != account);
        self.relay.erasures.push(change.clone());
        change
    }

    /// The user reports a new device model.
    pub fn change_device(&mut self, user: usize, model: &str) {
        self.relay.users[user].model = model.into();
        self.relay.subjects.push(user);
    }

    pub fn affiliate(&mut self, id: &str) -> &mut Affiliate {
        self.affiliates.get_mut(id).expect("an affiliate of the catalogue")
    }

    /// Performs `effects` in order, and what the core returns for each answer, as `crate::process` does.
    pub fn perform(&mut self, effects: Vec<Effect>) -> Result<(), Crashed> {
        self.batches.push(effects.clone());
        let mut queue = VecDeque::from(effects);
        while let Some(effect) = queue.pop_front() {
            if self.crash_at.is_some_and(|at| at <= self.step) {
                self.crash_at = None;
                return Err(Crashed);
            }
            self.step += 1;
            self.now += self.tick;
            let next = match effect {
                Effect::Write(write) => {
                    self.store.apply(&write);
                    continue;
                }
                Effect::Flush => {
                    self.store.flush();
                    self.now += self.flush_ms;
                    continue;
                }
                Effect::AskLease { pair, statement_hash } => {
                    // The sim's one clock is both the wall clock and the monotonic one (and the relay's).
                    let asked = self.now;
                    let answer = self.relay.begin(&pair, statement_hash, self.now);
                    self.now += self.lease_answer_ms;
                    self.core.handle_lease(answer, asked, self.now).expect("a lease was asked for")
                }
                Effect::CheckLease { .. } => self.core.handle_lease_check(self.now).expect("a check was asked for"),
                Effect::Post { id, affiliate, body } => {
                    let answer = self.post(id, &affiliate, body);
                    self.core.handle_answer(answer, self.now).expect("a request was posted")
                }
                Effect::ReleaseLease { lease, .. } => {
                    if !self.relay.down {
                        self.relay.leases.remove(&lease.id);
                    }
                    self.relay.acknowledge(self.step, self.now);
                    self.core.handle_released(self.now).expect("a lease was released")
                }
            };
            self.batches.push(next.clone());
            queue.extend(next);
        }
        Ok(())
    }

    fn post(&mut self, id: WebhookId, affiliate: &str, body: String) -> Answer {
        // The rule everything else rests on: an export is durably in flight before its request leaves.
        if let Some(stored) = self.store.durable.entry(&id) {
            if stored.kind == super::Kind::Export {
                let live = self.core.outbox().get(&id).expect("the entry under way");
                assert!(
                    matches!(stored.state, EntryState::InFlight(_))
                        && stored.state.unanswered_since() == live.state.unanswered_since(),
                    "{id} posted while stored as {:?}",
                    stored.state
                );
            }
            // The fence: an export request leaves only with its whole timeout inside a lease the relay holds.
            if stored.kind == super::Kind::Export {
                let timeout = u64::try_from(super::HTTP_TIMEOUT.as_millis()).expect("ms");
                assert!(
                    self.relay
                        .leases
                        .values()
                        .any(|(p, deadline)| *p == stored.pair && *deadline >= self.now + timeout),
                    "{id} posted with less than its timeout left on the relay's lease"
                );
            }
        } else {
            panic!("{id} posted without being durably in the outbox");
        }
        let step = self.step;
        let a = self.affiliates.get_mut(affiliate).expect("affiliate");
        let behaviour = a.script.pop_front().unwrap_or(Behaviour::Accept);
        let arrives = matches!(behaviour, Behaviour::Accept | Behaviour::Refuse | Behaviour::AnswerLost);
        if arrives {
            a.received.push(Received { id, body, step, behaviour });
        }
        match behaviour {
            Behaviour::Accept => Answer::Status(200),
            Behaviour::Refuse => Answer::Status(503),
            Behaviour::Unreachable => Answer::NotSent("connection refused".into()),
            Behaviour::AnswerLost | Behaviour::RequestLost => Answer::Unknown("connection reset".into()),
        }
    }

    /// One pass of the driver: both feeds, then the due deliveries; a relay that is down ends it, as it ends the
    /// process's pass.
    pub fn pass(&mut self) -> Result<(), Crashed> {
        self.read_feeds()?;
        self.deliver()
    }

    /// Reads the feeds until they are caught up: erasures first, as `crate::process` does.
    pub fn read_feeds(&mut self) -> Result<(), Crashed> {
        loop {
            let after = self.core.cursor(Feed::Erasures);
            if self.relay.down {
                return Ok(());
            }
            let page = self.relay.erasure_page(after);
            let Some(last) = page.last().map(|c| c.cursor) else { break };
            for change in &page {
                let erasure = CheckedErasure::new(change);
                let records = erasure.account().map(|a| self.store.account_records(&a)).unwrap_or_default();
                let (_, effects) = self.core.handle_erasure(erasure, records, self.now).expect("no attempt under way");
                self.perform(effects)?;
            }
            let effects = self.core.page_done(Feed::Erasures, last);
            self.perform(effects)?;
        }
        for feed in Feed::ALL {
            loop {
                let after = self.core.cursor(feed);
                if self.relay.down {
                    return Ok(());
                }
                let page = self.relay.page(feed, after);
                if feed::caught_up(after, &page) {
                    break;
                }
                for change in &page.changes {
                    let change = CheckedChange::new(change);
                    let known = change.pair().map(|p| self.store.known(p)).unwrap_or_default();
                    let (_, effects) = self.core.handle_change(change, known, self.now).expect("no attempt under way");
                    self.perform(effects)?;
                }
                let effects = self.core.page_done(feed, page.next_cursor);
                self.perform(effects)?;
            }
        }
        Ok(())
    }

    /// Attempts what is due, one attempt after the other.
    pub fn deliver(&mut self) -> Result<(), Crashed> {
        self.relay.acknowledge(self.step, self.now);
        self.core.plan_deliveries(self.now);
        while let Some(effects) = self.core.poll_attempt(self.now) {
            self.perform(effects)?;
            if self.relay.down {
                break;
            }
        }
        Ok(())
    }

    /// The process dies and starts again on what its store kept (all that was durable and the first `keep`
    /// pending writes); its leases lapse.
    pub fn restart(&mut self, keep: usize) {
        self.store.crash(keep);
        self.relay.leases.clear();
        self.relay.acknowledge(self.step, self.now);
        self.seed = self.seed.wrapping_add(1);
        self.core = Self::core(&self.catalogue, &self.store, self.seed, self.jitter);
    }

    /// Runs passes, moving the clock to the next due attempt between them, until the outbox is empty (at most
    /// `passes` passes). A crash restarts with `keep` pending writes kept.
    pub fn drain(&mut self, passes: usize, keep: usize) {
        for _ in 0..passes {
            if self.pass().is_err() {
                self.restart(keep);
                continue;
            }
            match self.core.outbox().values().map(|e| e.next_attempt_ms).min() {
                None => return,
                Some(next) => self.now = self.now.max(next),
            }
        }
    }

    /// Every request any affiliate received, with the affiliate.
    pub fn received(&self) -> Vec<(&str, &Received)> {
        self.affiliates.iter().flat_map(|(a, aff)| aff.received.iter().map(move |r| (a.as_str(), r))).collect()
    }

    /// The webhook ids of the exports in the durable log, in order.
    pub fn logged(&self) -> Vec<WebhookId> {
        self.logged_of(relay_proto::merkle::LeafKind::Export)
    }

    /// The webhook ids of the erasure notices in the durable log, in order.
    pub fn logged_erasures(&self) -> Vec<WebhookId> {
        self.logged_of(relay_proto::merkle::LeafKind::ErasureNotice)
    }

    /// The webhook ids of the withdrawal notices in the durable log, in order.
    pub fn logged_notices(&self) -> Vec<WebhookId> {
        self.logged_of(relay_proto::merkle::LeafKind::WithdrawalNotice)
    }

    fn logged_of(&self, kind: relay_proto::merkle::LeafKind) -> Vec<WebhookId> {
        self.store
            .durable
            .log
            .iter()
            .map(|r| relay_proto::merkle::ExportLeaf::decode(&r.leaf).expect("leaf"))
            .filter(|l| l.kind == kind)
            .map(|l| WebhookId::from_export_id(l.export_id))
            .collect()
    }

    /// The pairs whose withdrawal was acknowledged, with the step it was.
    pub fn acknowledged(&self) -> Vec<(Pair, usize, u64)> {
        self.relay.withdrawals.iter().filter_map(|(p, at, ack)| ack.map(|ack| (p.clone(), *at, ack))).collect()
    }

    /// The pair of the recorded statement with hash `hash`.
    pub fn statement_pair(&self, hash: &[u8; 32]) -> Option<Pair> {
        let r = self.relay.consents.iter().find(|r| r.statement.hash() == *hash)?;
        Some(Pair::new(r.statement.account, r.statement.affiliate.clone(), r.statement.purpose))
    }

    /// The hash of the statement at position `at` of the consent feed.
    pub fn statement_hash_at(&self, at: usize) -> [u8; 32] {
        self.relay.consents[at].statement.hash()
    }

    /// The position in the consent feed of the statement with hash `hash`.
    pub fn recorded_at(&self, hash: &[u8; 32]) -> Option<usize> {
        self.relay.consents.iter().position(|r| r.statement.hash() == *hash)
    }

    /// The statement in force for `pair`, if any.
    pub fn grant_in_force(&self, pair: &Pair) -> Option<[u8; 32]> {
        self.relay.in_force.get(pair).copied()
    }

    /// The grant or withdrawal in force ends without a statement (an expiry): the relay denies its leases.
    pub fn expire(&mut self, pair: &Pair) {
        self.relay.in_force.remove(pair);
    }

    /// The distinct pairs with a grant in force.
    pub fn in_force(&self) -> BTreeSet<Pair> {
        self.relay.in_force.keys().cloned().collect()
    }
}
