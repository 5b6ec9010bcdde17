//! The delivery and crash rules of the core, each on the in-memory world of `sim`, deterministically: no socket,
//! no disk, no sleep, and a crash wherever a test puts it. The process-killing campaigns of
//! `tests/tests/relay/crash.rs` check the same rules on the real process at random moments.

use relay_proto::consent::{Decision, Purpose};
use relay_proto::merkle::{ExportLeaf, LeafKind};
use serde_json::Value;
use sha2::Digest;

use super::sim::{Behaviour, CATALOGUE, LEASE_MS, MASTER_KEY, SeededEntropy, World};
use super::*;
use crate::payload::phone_pseudonym;

use Behaviour::{Accept, AnswerLost, Refuse, RequestLost, Unreachable};

/// A short name per effect, so that a test can state the order of a batch.
fn kind(effect: &Effect) -> &'static str {
    match effect {
        Effect::Write(Write::Statement { .. }) => "statement",
        Effect::Write(Write::Put { .. }) => "put",
        Effect::Write(Write::Remove { .. }) => "remove",
        Effect::Write(Write::Settle { .. }) => "settle",
        Effect::Write(Write::SetExported { .. }) => "exported",
        Effect::Write(Write::ForgetExported { .. }) => "forget-exported",
        Effect::Write(Write::ForgetDelivered { .. }) => "forget-delivered",
        Effect::Write(Write::Cursor { .. }) => "cursor",
        Effect::Write(Write::EraseBodies { .. }) => "erase-bodies",
        Effect::Write(Write::Erased { .. }) => "erased",
        Effect::Flush => "flush",
        Effect::CheckLease { .. } => "check",
        Effect::AskLease { .. } => "lease",
        Effect::Post { .. } => "post",
        Effect::ReleaseLease { .. } => "release",
    }
}

/// Every effect the world performed (or the core returned) since batch `from`, by kind.
fn kinds(world: &World, from: usize) -> Vec<&'static str> {
    world.batches[from..].iter().flatten().map(kind).collect()
}

fn body(text: &str) -> Value {
    serde_json::from_str(text).expect("an event body is JSON")
}

/// The one entry in the core's outbox.
fn only_entry(world: &World) -> (WebhookId, Entry) {
    let outbox = world.core.outbox();
    assert_eq!(outbox.len(), 1, "{outbox:?}");
    outbox.iter().map(|(id, e)| (*id, e.clone())).next().expect("one entry")
}

fn leaf(record: &LogRecord) -> ExportLeaf {
    ExportLeaf::decode(&record.leaf).expect("leaf")
}

/// A world with Alice (who granted adsco advertising) and the grant's hash, before any pass.
fn alice_grants() -> (World, usize, [u8; 32]) {
    let mut w = World::new(7);
    let alice = w.user(1, "Pixel 9");
    let hash = w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    (w, alice, hash)
}

#[test]
fn an_export_goes_lease_then_durably_in_flight_then_post_then_release_then_settle() {
    let (mut w, alice, hash) = alice_grants();
    w.pass().expect("no crash");
    assert_eq!(
        kinds(&w, 0),
        [
            "statement",
            "put",
            "exported",
            "flush",
            "cursor",
            "flush", // the feed, its cursor last
            "lease",
            "put",
            "flush",
            "check",
            "post",
            "release",
            "settle",
            "flush", // the delivery
        ]
    );
    // What was stored before the post: in flight since the attempt began, before its lease was asked for.
    let started = w.batches.iter().flatten().find_map(|e| match e {
        Effect::Write(Write::Put { entry, .. }) => match &entry.state {
            EntryState::InFlight(f) => Some(f.since),
            _ => None,
        },
        _ => None,
    });
    let received = &w.affiliates["adsco"].received;
    assert_eq!(received.len(), 1);
    let event = body(&received[0].body);
    assert_eq!(event["type"], "user.metadata.exported");
    assert_eq!(event["data"]["consent"], hex::encode(hash));
    let keys: Vec<&String> = event["data"].as_object().expect("data").keys().collect();
    assert_eq!(keys, ["consent", "device_model", "phone_pseudonym", "purpose"]);

    // Logged once, at the attempt's start, out of the outbox, the pair delivered with its pseudonym.
    assert_eq!(w.logged(), [received[0].id]);
    let record = &w.store.durable.log[0];
    assert_eq!(Some(leaf(record).time_ms), started);
    assert_eq!((leaf(record).consent_hash, record.account), (hash, w.relay.users[alice].account()));
    assert!(w.core.outbox().is_empty() && w.store.durable.outbox.is_empty());
    let pair = w.pair(alice, "adsco", Purpose::Advertising);
    let pseudonym = phone_pseudonym(&MASTER_KEY, "adsco", &w.relay.users[alice].phone);
    let delivered = w.store.durable.delivered.get(&pair).expect("delivered");
    assert_eq!(
        (&delivered.phone_pseudonym, &delivered.webhook_ids),
        (&vec![pseudonym], &vec![received[0].id.to_string()])
    );
    assert!(delivered.phone.is_empty(), "adsco gets no phone for advertising");
    assert_eq!(w.core.delivered(), 1);
    assert!(w.relay.asked.iter().all(|(p, granted)| *p == pair && *granted));
}

/// An event carries the log head the core had when it was queued; a head that changes while it is retried does not
/// change its body.
#[test]
fn a_body_keeps_the_log_head_it_was_queued_with_across_retries() {
    let mut w = World::new(5);
    w.core.set_log_head(Some(serde_json::json!({"size": 1, "root": "aa"})));
    let alice = w.user(1, "Pixel 9");
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    w.affiliate("adsco").script = [Refuse].into();
    w.pass().expect("no crash");
    w.core.set_log_head(Some(serde_json::json!({"size": 2, "root": "bb"})));
    let (_, entry) = only_entry(&w);
    w.now = entry.next_attempt_ms;
    w.pass().expect("no crash");
    let received = &w.affiliates["adsco"].received;
    assert_eq!(received.len(), 2, "refused, then accepted");
    assert_eq!(received[0].body, received[1].body, "one body across retries");
    assert_eq!(body(&received[0].body)["log_head"], serde_json::json!({"size": 1, "root": "aa"}));
}

#[test]
fn failures_are_retried_after_one_second_doubling_with_the_injected_jitter_under_one_id_and_body() {
    let mut w = World::with_jitter(3, 100);
    // A still clock: each retry's time is exactly the pass's time plus its delay.
    w.tick = 0;
    let alice = w.user(1, "Pixel 9");
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    w.affiliate("adsco").script = [Refuse, Unreachable, AnswerLost, RequestLost, Refuse].into();
    w.pass().expect("no crash");
    let mut states = Vec::new();
    let mut delays = Vec::new();
    for _ in 0..5 {
        let (_, entry) = only_entry(&w);
        states.push(entry.state.unanswered_since());
        // The retry waits for its time: nothing is attempted a millisecond early.
        let settled_at = w.now;
        w.now = entry.next_attempt_ms - 1;
        w.pass().expect("no crash");
        assert_eq!(only_entry(&w).1.attempts, entry.attempts, "not due yet");
        w.now = entry.next_attempt_ms;
        delays.push(entry.next_attempt_ms - settled_at);
        w.pass().expect("no crash");
    }
    // 1 s, 2 s, 4 s, 8 s, 16 s, each × 0.8 plus the jitter drawn (100 ms).
    assert_eq!(delays, [900, 1_700, 3_300, 6_500, 12_900]);
    assert!(w.core.outbox().is_empty(), "the sixth attempt is accepted");
    let received = &w.affiliates["adsco"].received;
    // Refused, answer lost, refused, accepted arrived; the unreachable and the lost request did not.
    assert_eq!(received.len(), 4);
    assert!(received.iter().all(|r| r.id == received[0].id && r.body == received[0].body), "one id, one body");
    // After each of the five failures: queued after a refusal and after a request that never left; in flight from
    // the lost answer on, since that attempt, whatever later attempts are told.
    let lost_since = states[2];
    assert!(lost_since.is_some());
    assert_eq!(states, [None, None, lost_since, lost_since, lost_since]);
    // An acknowledged retry is logged at its own start, not at the lost attempt's.
    let logged = leaf(&w.store.durable.log[0]).time_ms;
    assert!(Some(logged) > lost_since, "{logged} vs {lost_since:?}");
}

#[test]
fn a_crash_after_the_in_flight_mark_leaves_an_export_that_is_logged_and_notified_when_withdrawn() {
    // Where the post of the first attempt falls.
    let (mut dry, _, _) = alice_grants();
    dry.pass().expect("no crash");
    let post_step = dry.affiliates["adsco"].received[0].step;

    for keep in [0, usize::MAX] {
        let (mut w, alice, _) = alice_grants();
        w.crash_at = Some(post_step - 1);
        assert!(w.pass().is_err(), "dies just before the request leaves");
        w.restart(keep);
        assert!(w.affiliates["adsco"].received.is_empty());
        let (id, entry) = only_entry(&w);
        let since = entry.state.unanswered_since().expect("durably in flight whatever the crash kept");

        let withdrawal = w.decide(alice, "adsco", Purpose::Advertising, Decision::Withdraw);
        w.drain(4, 0);
        // The log errs on the side of the affiliate holding the data: logged at the attempt's time...
        assert_eq!(w.logged(), [id]);
        assert_eq!(leaf(&w.store.durable.log[0]).time_ms, since);
        // ...and the affiliate is told of the withdrawal, by the pseudonym it received only.
        let received = &w.affiliates["adsco"].received;
        assert_eq!(received.len(), 1, "{received:?}");
        assert_eq!(received[0].id, WebhookId::notice(&withdrawal, "adsco"));
        let notice = body(&received[0].body);
        assert_eq!(notice["type"], "consent.withdrawn");
        let pseudonym = phone_pseudonym(&MASTER_KEY, "adsco", &w.relay.users[alice].phone);
        assert_eq!(notice["data"], serde_json::json!({"purpose": "advertising", "phone_pseudonym": [pseudonym]}));
    }
}

#[test]
fn a_crash_before_the_in_flight_mark_is_durable_leaves_an_export_that_never_left() {
    let (mut dry, _, _) = alice_grants();
    dry.pass().expect("no crash");
    let post_step = dry.affiliates["adsco"].received[0].step;
    // Before the flush that precedes the post, with the in-flight write lost.
    let (mut w, alice, _) = alice_grants();
    w.crash_at = Some(post_step - 3);
    assert!(w.pass().is_err());
    w.restart(0);
    assert_eq!(only_entry(&w).1.state, EntryState::Queued);
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Withdraw);
    w.drain(4, 0);
    assert!(w.logged().is_empty(), "nothing left, nothing logged");
    assert!(w.affiliates["adsco"].received.is_empty(), "and no notice for data never sent");
    assert!(w.core.outbox().is_empty());
}

#[test]
fn an_export_whose_answer_never_came_is_logged_when_denied_or_superseded() {
    // Denied (the grant lapsed) after a lost answer: logged at that attempt's time, the pair delivered.
    let (mut w, alice, _) = alice_grants();
    w.affiliate("adsco").script = [AnswerLost].into();
    w.pass().expect("no crash");
    let (id, entry) = only_entry(&w);
    let since = entry.state.unanswered_since().expect("in flight");
    let pair = w.pair(alice, "adsco", Purpose::Advertising);
    w.expire(&pair);
    w.now = entry.next_attempt_ms;
    w.pass().expect("no crash");
    assert_eq!(w.relay.asked.last(), Some(&(pair.clone(), false)));
    assert_eq!(w.logged(), [id]);
    assert_eq!(leaf(&w.store.durable.log[0]).time_ms, since);
    assert!(w.store.durable.delivered.contains_key(&pair), "a later withdrawal notifies the affiliate");
    assert!(w.core.outbox().is_empty());

    // Superseded by new data after a lost answer: the old export is logged, the new one queued.
    let (mut w, alice, _) = alice_grants();
    w.affiliate("adsco").script = [AnswerLost, Unreachable].into();
    w.pass().expect("no crash");
    let (old, _) = only_entry(&w);
    w.change_device(alice, "Pixel 10");
    w.pass().expect("no crash");
    assert_eq!(w.logged(), [old]);
    let (new, entry) = only_entry(&w);
    assert_ne!(new, old);
    assert!(entry.body.contains("Pixel 10"));
    assert_eq!(entry.state, EntryState::Queued, "its only attempt never left");
}

#[test]
fn a_denied_lease_drops_an_export_that_never_left_without_a_trace() {
    let (mut w, alice, _) = alice_grants();
    w.affiliate("adsco").script = [Refuse, Unreachable].into();
    w.pass().expect("no crash");
    w.now = only_entry(&w).1.next_attempt_ms;
    w.pass().expect("no crash");
    let pair = w.pair(alice, "adsco", Purpose::Advertising);
    w.expire(&pair);
    w.now = only_entry(&w).1.next_attempt_ms;
    let before = w.batches.len();
    w.pass().expect("no crash");
    assert_eq!(kinds(&w, before), ["lease", "remove", "flush"]);
    assert!(w.core.outbox().is_empty() && w.logged().is_empty());
    assert!(!w.store.durable.delivered.contains_key(&pair), "refused and unreachable: the affiliate holds nothing");
}

#[test]
fn a_withdrawal_removes_its_pairs_queued_exports_only_and_notifies_only_an_affiliate_that_had_data() {
    let mut w = World::new(11);
    let alice = w.user(1, "Pixel 9");
    let bob = w.user(2, "Galaxy");
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    w.decide(alice, "adsco", Purpose::Analytics, Decision::Grant);
    w.decide(bob, "adsco", Purpose::Advertising, Decision::Grant);
    w.affiliate("adsco").script = [Unreachable, Unreachable, Unreachable].into();
    w.pass().expect("no crash");
    assert_eq!(w.core.outbox_len(), 3);

    let withdrawal = w.decide(alice, "adsco", Purpose::Advertising, Decision::Withdraw);
    w.read_feeds().expect("no crash");
    let left: Vec<Pair> = w.core.outbox().values().map(|e| e.pair.clone()).collect();
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&w.pair(alice, "adsco", Purpose::Advertising)), "{left:?}");
    assert!(w.core.outbox().values().all(|e| e.kind == Kind::Export), "never delivered: no notice");
    assert!(w.logged().is_empty());
    assert_ne!(WebhookId::notice(&withdrawal, "adsco"), *w.core.outbox().keys().next().expect("entry"));

    // Delivered, then withdrawn: one notice, without a lease, retried until taken.
    w.drain(8, 0);
    assert_eq!(w.logged().len(), 2);
    let asked = w.relay.asked.len();
    w.affiliate("adsco").script = [Refuse].into();
    let withdrawal = w.decide(bob, "adsco", Purpose::Advertising, Decision::Withdraw);
    w.drain(8, 0);
    assert_eq!(w.relay.asked.len(), asked, "a notice takes no lease");
    let notices: Vec<_> =
        w.affiliates["adsco"].received.iter().filter(|r| r.id == WebhookId::notice(&withdrawal, "adsco")).collect();
    assert_eq!(notices.len(), 2, "refused once, then taken");
    assert_eq!(notices[0].body, notices[1].body);
    let pseudonym = phone_pseudonym(&MASTER_KEY, "adsco", "+33612345602");
    assert_eq!(body(&notices[0].body)["data"]["phone_pseudonym"], serde_json::json!([pseudonym]));
    assert!(!w.store.durable.delivered.contains_key(&w.pair(bob, "adsco", Purpose::Advertising)));
}

#[test]
fn an_acknowledged_export_is_logged_once_even_when_a_crash_brings_its_entry_back() {
    let (mut dry, _, _) = alice_grants();
    dry.pass().expect("no crash");
    // The crash falls after the settle (log durable) and before the flush of its removal.
    let settle_step = dry.step;
    let (mut w, _, _) = alice_grants();
    w.crash_at = Some(settle_step - 1);
    assert!(w.pass().is_err());
    w.restart(0);
    assert_eq!(w.logged().len(), 1, "the log append was durable before the removal");
    let (id, entry) = only_entry(&w);
    assert!(entry.state.unanswered_since().is_some(), "back in flight: its answer is not known any more");
    w.drain(4, 0);
    assert_eq!(w.logged(), [id], "settled again without a second record");
    let received = &w.affiliates["adsco"].received;
    assert_eq!(received.len(), 2, "the affiliate sees the same event twice");
    assert_eq!((received[0].id, &received[0].body), (received[1].id, &received[1].body));
}

#[test]
fn an_attempt_whose_lease_is_too_short_sends_nothing_and_releases_it() {
    let (mut w, _, _) = alice_grants();
    w.relay.lease_ms = LEASE_NEEDED.as_millis() as u64 - 1;
    let before = w.batches.len();
    w.pass().expect("no crash");
    let delivery: Vec<_> = kinds(&w, before).into_iter().skip_while(|k| *k != "lease").collect();
    assert_eq!(delivery, ["lease", "release", "put", "flush"]);
    assert!(w.affiliates["adsco"].received.is_empty());
    let (_, entry) = only_entry(&w);
    assert_eq!((entry.attempts, entry.state), (1, EntryState::Queued));
    assert_eq!(w.relay.leases_out(), 0, "released");
}

#[test]
fn an_attempt_the_relay_does_not_answer_leaves_the_entry_as_it_was() {
    let (mut w, _, _) = alice_grants();
    w.read_feeds().expect("no crash");
    let stored = w.store.durable.entries();
    w.relay.down = true;
    let before = w.batches.len();
    w.deliver().expect("no crash");
    assert_eq!(kinds(&w, before), ["lease"], "the pass ends with the relay");
    assert_eq!(w.store.live.entries(), stored, "nothing written");
    assert_eq!(only_entry(&w).1, stored[0].1);
}

#[test]
fn a_pass_attempts_at_most_64_due_entries_soonest_first_and_none_twice() {
    let mut w = World::new(5);
    for n in 1..=35 {
        let user = w.user(n, "Pixel 9");
        w.decide(user, "adsco", Purpose::Advertising, Decision::Grant);
        w.decide(user, "adsco", Purpose::Analytics, Decision::Grant);
    }
    w.affiliate("adsco").script = std::iter::repeat_n(Unreachable, 200).collect();
    w.read_feeds().expect("no crash");
    assert_eq!(w.core.outbox_len(), 70);
    // Soonest first, by webhook id among entries due at the same millisecond.
    let mut due: Vec<(u64, WebhookId)> = w.core.outbox().iter().map(|(id, e)| (e.next_attempt_ms, *id)).collect();
    due.sort();
    let before = w.batches.len();
    w.deliver().expect("no crash");
    let posted: Vec<WebhookId> = w.batches[before..]
        .iter()
        .flatten()
        .filter_map(|e| if let Effect::Post { id, .. } = e { Some(*id) } else { None })
        .collect();
    let expected: Vec<WebhookId> = due.iter().take(DELIVERIES_PER_PASS).map(|(_, id)| *id).collect();
    assert_eq!(posted, expected);
    assert_eq!(w.core.outbox().values().filter(|e| e.attempts == 1).count(), DELIVERIES_PER_PASS);
    // The six left over go first in the next pass, before the ones that just failed are due again.
    let before = w.batches.len();
    w.deliver().expect("no crash");
    assert_eq!(kinds(&w, before).iter().filter(|k| **k == "lease").count(), 6);
    assert!(w.core.outbox().values().all(|e| e.attempts == 1));
}

#[test]
fn the_core_refuses_events_out_of_turn() {
    let catalogue = Catalogue::parse(CATALOGUE).expect("catalogue");
    let mut core = Core::new(catalogue, MASTER_KEY, [], [], Box::new(SeededEntropy(1)));
    assert_eq!(core.handle_lease(LeaseAnswer::Failed, 1, 1), Err(CoreError::Unasked("a lease answer")));
    assert_eq!(core.handle_lease_check(1), Err(CoreError::Unasked("a lease check")));
    assert_eq!(core.handle_answer(Answer::Status(200), 1), Err(CoreError::Unasked("a webhook answer")));
    assert_eq!(core.handle_released(1), Err(CoreError::Unasked("a released lease")));
    assert_eq!(core.poll_attempt(1), None, "nothing planned");

    let (mut w, alice, _) = alice_grants();
    w.read_feeds().expect("no crash");
    w.core.plan_deliveries(w.now);
    let first = w.core.poll_attempt(w.now).expect("an attempt");
    assert!(matches!(first[..], [Effect::AskLease { .. }]));
    assert_eq!(w.core.poll_attempt(w.now), None, "one attempt at a time");
    assert!(matches!(w.core.handle_answer(Answer::Status(200), w.now), Err(CoreError::Unasked(_))));
    // A change now could drop the entry under way.
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Withdraw);
    let page = w.relay.page(Feed::Consents, 1);
    let change = CheckedChange::new(&page.changes[0]);
    let busy = w.core.handle_change(change, Known::default(), w.now);
    assert!(matches!(busy, Err(CoreError::Busy(_))), "{busy:?}");
    // The attempt goes on as if nothing had been asked.
    let denied = w.core.handle_lease(LeaseAnswer::Denied { reason: "withdrawn".into() }, w.now, w.now);
    assert_eq!(denied.map(|e| e.len()), Ok(1));
}

#[test]
fn a_grant_queues_once_and_only_new_data_supersedes_it() {
    let (mut w, alice, hash) = alice_grants();
    w.affiliate("adsco").script = std::iter::repeat_n(Unreachable, 10).collect();
    w.read_feeds().expect("no crash");
    let (first, _) = only_entry(&w);
    let pair = w.pair(alice, "adsco", Purpose::Advertising);
    let marker = w.store.live.exported.get(&pair).copied().expect("marked");
    assert_eq!(marker.statement_hash, hash);

    // The same change read again, as after a crash before the cursor moved.
    let page = w.relay.page(Feed::Consents, 0);
    let again = |w: &mut World| {
        let change = CheckedChange::new(&page.changes[0]);
        let known = w.store.known(&pair);
        w.core.handle_change(change, known, w.now).expect("applied")
    };
    let (applied, effects) = again(&mut w);
    assert_eq!(applied, Applied::Unchanged);
    assert_eq!(effects.iter().map(kind).collect::<Vec<_>>(), ["statement"], "kept as evidence, nothing queued");

    // A new OS is not a field adsco gets for advertising; a new model is.
    w.relay.users[alice].model = "Pixel 9".into();
    w.change_device(alice, "Pixel 9");
    w.read_feeds().expect("no crash");
    assert_eq!(only_entry(&w).0, first);
    w.change_device(alice, "Pixel 10");
    w.read_feeds().expect("no crash");
    let (second, entry) = only_entry(&w);
    assert_ne!(second, first);
    assert_eq!(second, WebhookId::derive(&hash, "adsco", &w.store.live.exported[&pair].digest));
    assert_eq!(entry.fields, ["phone_pseudonym", "device_model"]);

    // Not in the catalogue, or not signed by the account's key: nothing.
    w.decide(alice, "shieldco", Purpose::Advertising, Decision::Grant);
    let mut forged = w.relay.page(Feed::Consents, 1).changes.remove(0);
    let (applied, _) = w.core.handle_change(CheckedChange::new(&forged), Known::default(), w.now).expect("applied");
    assert_eq!(applied, Applied::Nothing);
    forged.signature = vec![0; 64].into();
    let (applied, effects) =
        w.core.handle_change(CheckedChange::new(&forged), Known::default(), w.now).expect("applied");
    assert!(matches!(applied, Applied::Rejected(_)) && effects.is_empty(), "not even kept as evidence");
}

#[test]
fn a_feeds_cursor_moves_only_after_the_writes_of_its_page_are_durable() {
    let (mut w, _, _) = alice_grants();
    let effects = w.core.page_done(Feed::Consents, 9);
    assert_eq!(effects.iter().map(kind).collect::<Vec<_>>(), ["flush", "cursor", "flush"]);
    assert_eq!(
        w.core.page_done(Feed::Consents, 4)[1],
        Effect::Write(Write::Cursor { feed: Feed::Consents, cursor: 9 })
    );
    assert_eq!(w.core.cursor(Feed::Consents), 9, "never back");
    assert_eq!(w.core.cursor(Feed::Subjects), 0);

    // A crash before the page's first flush, whatever it keeps, leaves the change to read again, never skipped.
    let (mut w, _, _) = alice_grants();
    w.crash_at = Some(3);
    assert!(w.read_feeds().is_err());
    for keep in 0..=w.store.pending() {
        let mut again = World::new(7);
        let user = again.user(1, "Pixel 9");
        again.decide(user, "adsco", Purpose::Advertising, Decision::Grant);
        again.crash_at = Some(3);
        assert!(again.read_feeds().is_err());
        again.restart(keep);
        assert_eq!(again.core.cursor(Feed::Consents), 0);
        again.drain(4, 0);
        assert_eq!(again.affiliates["adsco"].received.len(), 1, "keep {keep}");
    }
}

#[test]
fn an_entry_whose_affiliate_left_the_catalogue_is_dropped_unlogged() {
    // As the exporter has always done: an affiliate removed from the catalogue has no endpoint to post to, and
    // its entries go, logged or not (docs/exporter.md, "Known gaps").
    let (mut w, _, _) = alice_grants();
    w.affiliate("adsco").script = [AnswerLost].into();
    w.pass().expect("no crash");
    let (_, entry) = only_entry(&w);
    assert!(entry.state.unanswered_since().is_some());
    let without_adsco =
        Catalogue::parse(&CATALOGUE.replace("id = \"adsco\"", "id = \"adsco-gone\"")).expect("catalogue");
    let mut core = Core::new(without_adsco, MASTER_KEY, w.store.durable.entries(), [], Box::new(SeededEntropy(2)));
    core.plan_deliveries(entry.next_attempt_ms);
    let effects = core.poll_attempt(entry.next_attempt_ms).expect("an effect");
    assert!(matches!(effects[..], [Effect::Write(Write::Remove { .. })]), "{effects:?}");
    assert_eq!(core.outbox_len(), 0);
}

/// One run of the campaign's story, with at most one crash (before effect `crash_at`) that keeps `keep` pending
/// writes. Each user action happens once, on the relay; a pass that crashes is run again after the restart.
fn story(crash_at: Option<u64>, keep: usize) -> World {
    let mut w = World::new(42);
    w.crash_at = crash_at;
    let alice = w.user(1, "Pixel 9");
    let bob = w.user(2, "Galaxy S30");
    w.affiliate("adsco").script = [AnswerLost, Refuse, Accept, RequestLost, Accept, AnswerLost, Unreachable].into();
    w.affiliate("shieldco").script = [Unreachable, AnswerLost, Accept].into();
    let pass = |w: &mut World| {
        while w.pass().is_err() {
            w.restart(keep);
        }
    };
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    w.decide(alice, "adsco", Purpose::Analytics, Decision::Grant);
    w.decide(bob, "shieldco", Purpose::Security, Decision::Grant);
    pass(&mut w);
    w.now += 2_000;
    pass(&mut w);
    w.change_device(alice, "Pixel 10");
    pass(&mut w);
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Withdraw);
    pass(&mut w);
    w.now += 5_000;
    w.decide(bob, "shieldco", Purpose::Security, Decision::Withdraw);
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    pass(&mut w);
    w.drain(40, keep);
    w
}

/// The statement hash an export body follows from.
fn consent_of(event: &Value) -> [u8; 32] {
    let hex = event["data"]["consent"].as_str().expect("an export names its consent");
    hex::decode(hex).ok().and_then(|h| h.try_into().ok()).expect("32 bytes of hex")
}

/// What must hold at the end of any run of the story, whatever crash it had.
fn check(w: &World, run: &str) {
    assert!(w.core.outbox().is_empty() && w.store.durable.outbox.is_empty(), "{run}: outbox drained");
    let logged = w.logged();
    let unique: std::collections::BTreeSet<_> = logged.iter().collect();
    assert_eq!(unique.len(), logged.len(), "{run}: an export logged twice: {logged:?}");
    let withdrawals = w.acknowledged();

    let mut bodies = std::collections::BTreeMap::new();
    for (affiliate, r) in w.received() {
        // One id, one body, on every retry and across crashes.
        assert_eq!(*bodies.entry(r.id).or_insert(&r.body), &r.body, "{run}: {} changed body", r.id);
        let event = body(&r.body);
        if event["type"] == "consent.withdrawn" {
            let keys: Vec<&String> = event["data"].as_object().expect("data").keys().collect();
            // adsco got the pseudonym for advertising, shieldco the phone for security: each is told by that alone.
            let expected = if affiliate == "adsco" { ["phone_pseudonym", "purpose"] } else { ["phone", "purpose"] };
            assert_eq!(keys, expected, "{run}: a notice names the user as the affiliate received them, nothing more");
            continue;
        }
        assert_eq!(event["type"], "user.metadata.exported", "{run}");
        // Whatever an affiliate may hold is in the log.
        if r.held() {
            assert!(logged.contains(&r.id), "{run}: {affiliate} holds {} but it is not logged", r.id);
        }
        // Nothing leaves under a grant once a withdrawal of its pair recorded after it is acknowledged.
        let consent = consent_of(&event);
        let (pair, granted_at) = (w.statement_pair(&consent), w.recorded_at(&consent));
        for (withdrawn, withdrawn_at, acknowledged) in &withdrawals {
            if Some(withdrawn) == pair.as_ref() && granted_at.is_some_and(|g| g < *withdrawn_at) {
                assert!(
                    r.step < *acknowledged,
                    "{run}: {} reached {affiliate} at step {} after the withdrawal was acknowledged at {acknowledged}",
                    r.id,
                    r.step
                );
            }
        }
    }

    // A withdrawal notifies the affiliate if it may hold data of the pair from the grants before it, and only if
    // the exporter logged some.
    for (i, (pair, withdrawn_at, _)) in withdrawals.iter().enumerate() {
        let since = withdrawals[..i].iter().filter(|(p, _, _)| p == pair).map(|(_, at, _)| *at).max();
        let of_these_grants = |consent: &[u8; 32]| {
            w.statement_pair(consent).as_ref() == Some(pair)
                && w.recorded_at(consent).is_some_and(|at| at < *withdrawn_at && since.is_none_or(|s| at > s))
        };
        let exports = &w.affiliates[&pair.affiliate].received;
        let held = exports.iter().any(|r| {
            let event = body(&r.body);
            r.held() && event["type"] == "user.metadata.exported" && of_these_grants(&consent_of(&event))
        });
        let logged_any = w.store.durable.log.iter().any(|record| of_these_grants(&leaf(record).consent_hash));
        let notice = WebhookId::notice(&w.statement_hash_at(*withdrawn_at), &pair.affiliate);
        let notified = exports.iter().any(|r| r.id == notice && r.behaviour == Accept);
        assert!(!held || notified, "{run}: withdrawal of {pair}: the affiliate holds data and was not told");
        assert!(!notified || logged_any, "{run}: withdrawal of {pair}: a notice for nothing logged");
    }

    // Every grant in force at the end reached its affiliate with the latest data: no change was skipped.
    for pair in w.in_force() {
        let consent = w.grant_in_force(&pair).expect("in force");
        let user = w.relay.users.iter().find(|u| u.account() == pair.account).expect("user");
        let latest = w.affiliates[&pair.affiliate]
            .received
            .iter()
            .rev()
            .find(|r| {
                let event = body(&r.body);
                r.behaviour == Accept && event["type"] == "user.metadata.exported" && consent_of(&event) == consent
            })
            .unwrap_or_else(|| panic!("{run}: {pair} in force but never delivered"));
        assert_eq!(body(&latest.body)["data"]["device_model"], user.model.as_str(), "{run}: {pair} has stale data");
    }
}

#[test]
fn a_crash_before_any_effect_of_the_story_breaks_no_delivery_or_crash_rule() {
    let clean = story(None, 0);
    check(&clean, "no crash");
    assert!(clean.logged().len() >= 4, "the story delivers: {:?}", clean.logged());
    let steps = clean.step;
    let mut runs = 0;
    for crash_at in 0..steps {
        for keep in [0, 1, 2, usize::MAX] {
            let w = story(Some(crash_at), keep);
            check(&w, &format!("crash before effect {crash_at}, keeping {keep} pending writes"));
            runs += 1;
        }
    }
    assert!(runs >= 4 * 60, "{runs} runs over {steps} effects");
}

/// A grant names the notice the user was shown. A relay that showed another document than the catalogue's (one
/// without the phone number, say, or an older version) gets a grant the exporter does not act on: nothing leaves.
#[test]
fn a_grant_under_a_notice_that_is_not_the_catalogues_current_one_exports_nothing() {
    let mut w = World::new(7);
    let alice = w.user(1, "Pixel 9");
    let current = w.catalogue.notice("adsco", Purpose::Advertising).expect("a notice").hash;
    for other in [[0; 32], [7; 32]] {
        assert_ne!(other, current);
        w.decide_under(alice, "adsco", Purpose::Advertising, Decision::Grant, other);
        w.drain(10, 0);
        assert!(w.affiliates["adsco"].received.is_empty(), "nothing left under notice {}", hex::encode(other));
        assert!(w.core.outbox().is_empty());
    }
    // The same user granting under the current notice: exported.
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    w.drain(10, 0);
    assert_eq!(w.affiliates["adsco"].received.len(), 1);
}

/// The operator adds the raw phone number to what AdsCo receives for advertising and restarts the exporter: the
/// notice changes, so the grants made under the old one cover nothing any more. What was still queued under them is
/// dropped (never sent with the new fields, nor the old), and a new export needs a new grant under the new notice.
#[test]
fn widening_an_affiliates_fields_voids_the_grants_made_before_until_the_user_grants_again() {
    let mut w = World::new(11);
    let alice = w.user(1, "Pixel 9");
    let old = w.catalogue.notice("adsco", Purpose::Advertising).expect("a notice").hash;
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    w.affiliate("adsco").script = [Unreachable].into();
    w.pass().expect("no crash");
    assert_eq!(w.core.outbox().len(), 1, "queued, its first attempt not through");

    let widened = CATALOGUE.replace(
        r#"advertising = ["phone_pseudonym", "device_model"]"#,
        r#"advertising = ["phone", "phone_pseudonym", "device_model"]"#,
    );
    assert_ne!(widened, CATALOGUE);
    w.catalogue = crate::affiliates::Catalogue::parse(&widened).expect("catalogue");
    let new = w.catalogue.notice("adsco", Purpose::Advertising).expect("a notice").hash;
    assert_ne!(old, new, "new terms, new notice");
    w.restart(0);
    w.drain(10, 0);
    assert!(w.affiliates["adsco"].received.is_empty(), "nothing left under the old grant");
    assert!(w.core.outbox().is_empty(), "the export queued under the old notice is gone");
    // Device changes re-read the grant: still nothing under the old notice.
    w.change_device(alice, "Pixel 10");
    w.drain(10, 0);
    assert!(w.affiliates["adsco"].received.is_empty());

    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    w.drain(10, 0);
    let received = &w.affiliates["adsco"].received;
    assert_eq!(received.len(), 1, "granted again under the new notice");
    let data = body(&received[0].body)["data"].clone();
    assert_eq!(data["phone"], w.relay.users[alice].phone.as_str(), "with the fields the new notice names");
}

/// An objection to a purpose drops what is queued for it to every affiliate; and a grant for that purpose recorded
/// while the objection stands exports nothing, even from a relay that passes it on and grants its lease. After a
/// lift, a new grant exports again.
#[test]
fn an_objection_stops_every_affiliate_of_the_purpose_and_later_grants_until_lifted() {
    let mut w = World::new(13);
    let alice = w.user(1, "Pixel 9");
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    w.affiliate("adsco").script = [Unreachable, Unreachable].into();
    w.pass().expect("no crash");
    assert_eq!(w.core.outbox().len(), 1, "queued, not through");

    w.decide_under(alice, "", Purpose::Advertising, Decision::Object, [0; 32]);
    w.read_feeds().expect("no crash");
    assert!(w.core.outbox().is_empty(), "the objection dropped the queued export");
    // A compromised relay records a grant for the objected purpose and grants its lease: the exporter ignores it.
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    w.drain(10, 0);
    assert!(w.affiliates["adsco"].received.iter().all(|r| r.behaviour != Accept), "nothing delivered while objected");
    assert!(w.core.outbox().is_empty());

    w.decide_under(alice, "", Purpose::Advertising, Decision::Lift, [0; 32]);
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Grant);
    w.drain(10, 0);
    assert_eq!(w.affiliates["adsco"].received.iter().filter(|r| r.behaviour == Accept).count(), 1, "after the lift");
}

/// Issue #12, point 4: the lease's time left was checked before the flush that marks the entry in flight, and that
/// flush is unbounded: a slow disk let a request start with less than its timeout left on the relay's lease, which
/// could then lapse (and a withdrawal be acknowledged) while the request was still going out.
#[test]
fn a_slow_flush_before_the_post_never_eats_into_the_requests_timeout() {
    let (mut w, _, _) = alice_grants();
    // 30 s of lease, 17 s needed at the grant; a flush of 20 s leaves 10 s, less than the 12 s a request needs.
    w.flush_ms = 20_000;
    w.drain(3, 0);
    assert!(w.affiliates["adsco"].received.is_empty(), "no request may leave once the flush ate the margin");
    assert_eq!(w.relay.leases_out(), 0, "every lease released");
    assert_eq!(w.core.outbox_len(), 1, "the export waits for a faster attempt");
    // The disk recovers: the export goes out, inside its lease.
    w.flush_ms = 0;
    w.drain(3, 0);
    assert_eq!(w.affiliates["adsco"].received.len(), 1);
}

/// Issue #12, point 4: the exporter trusted the relay's ordering. A compromised relay that serves a validly signed
/// grant again after the withdrawal that superseded it (and lies that it is in force) got it queued and delivered.
/// The exporter keeps the latest sequence number it has seen per pair and ignores a statement not above it.
#[test]
fn a_replayed_old_grant_after_its_withdrawal_is_ignored() {
    let (mut w, alice, _) = alice_grants();
    w.drain(3, 0);
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Withdraw);
    w.drain(3, 0);
    let exports = |w: &World| {
        w.affiliates["adsco"].received.iter().filter(|r| body(&r.body)["type"] == "user.metadata.exported").count()
    };
    assert_eq!(exports(&w), 1);
    w.replay(0);
    w.drain(3, 0);
    assert_eq!(exports(&w), 1, "the replayed grant must not be exported again");
    assert!(w.core.outbox().is_empty());
}

/// Issue #12, point 4: the lease's deadline was the relay's wall-clock time, compared on the exporter's clock, and
/// counted from the answer. It is now what the relay says is left, counted on the exporter's monotonic clock from
/// when the lease was asked for: an answer that took long to arrive leaves less of the lease, and an attempt whose
/// request could outlast the relay's lease sends nothing.
#[test]
fn a_lease_is_counted_from_when_it_was_asked_for() {
    let (mut w, _, _) = alice_grants();
    // The relay took the lease at once, but its answer took 25 s to arrive: 5 s of 30 are left.
    w.lease_answer_ms = 25_000;
    w.drain(2, 0);
    assert!(w.affiliates["adsco"].received.is_empty(), "no request with less than its timeout left");
    assert_eq!(w.relay.leases_out(), 0, "released");
    // Just enough left: the export leaves (and the sim checks it fits in the relay's lease).
    w.lease_answer_ms = LEASE_MS - LEASE_NEEDED.as_millis() as u64;
    w.drain(3, 0);
    assert_eq!(w.affiliates["adsco"].received.len(), 1);
}

/// Issue #12, point 5: a withdrawal notice carried the exporter's pseudonym of the user to every affiliate, even one
/// that had received the raw phone number (and so cannot match a pseudonym it never saw) or no identifier at all. A
/// notice now names the user exactly as that affiliate received them: the phone if it got the phone, the pseudonym
/// if it got that; and an affiliate that got neither gets the webhook ids of the exports it received.
#[test]
fn a_withdrawal_notice_names_the_user_as_the_affiliate_received_them() {
    let mut w = World::new(11);
    let alice = w.user(1, "Pixel 9");
    for (affiliate, purpose) in
        [("shieldco", Purpose::Security), ("adsco", Purpose::Advertising), ("adsco", Purpose::Analytics)]
    {
        w.decide(alice, affiliate, purpose, Decision::Grant);
    }
    w.drain(3, 0);
    let exports: Vec<(String, Value)> = w
        .received()
        .into_iter()
        .map(|(a, r)| (a.to_owned(), body(&r.body)))
        .filter(|(_, b)| b["type"] == "user.metadata.exported")
        .collect();
    assert_eq!(exports.len(), 3);
    let analytics_id = w.affiliates["adsco"]
        .received
        .iter()
        .find(|r| body(&r.body)["data"]["purpose"] == "analytics")
        .map(|r| r.id.to_string())
        .expect("the analytics export");
    for (affiliate, purpose) in
        [("shieldco", Purpose::Security), ("adsco", Purpose::Advertising), ("adsco", Purpose::Analytics)]
    {
        w.decide(alice, affiliate, purpose, Decision::Withdraw);
    }
    w.drain(3, 0);
    let notice = |affiliate: &str, purpose: &str| {
        w.affiliates[affiliate]
            .received
            .iter()
            .map(|r| body(&r.body))
            .find(|b| b["type"] == "consent.withdrawn" && b["data"]["purpose"] == purpose)
            .unwrap_or_else(|| panic!("a notice to {affiliate} for {purpose}"))["data"]
            .clone()
    };
    let phone = w.relay.users[alice].phone.clone();
    let pseudonym = phone_pseudonym(&MASTER_KEY, "adsco", &phone);
    assert_eq!(notice("shieldco", "security"), serde_json::json!({"purpose": "security", "phone": [phone]}));
    assert_eq!(
        notice("adsco", "advertising"),
        serde_json::json!({"purpose": "advertising", "phone_pseudonym": [pseudonym]})
    );
    assert_eq!(
        notice("adsco", "analytics"),
        serde_json::json!({"purpose": "analytics", "webhook_ids": [analytics_id]})
    );
}

/// Issue #12, point 5: a withdrawal notice an affiliate never accepts was retried for ever, and nobody heard of it.
/// It is retried for 7 days (simulated clock) from when it was queued, then abandoned: out of the outbox, counted,
/// and (not checked here) an `error!` line names its webhook id and affiliate.
#[test]
fn a_withdrawal_notice_is_abandoned_after_seven_days_of_failures_and_counted() {
    let (mut w, alice, _) = alice_grants();
    w.drain(3, 0);
    let withdrawal = w.decide(alice, "adsco", Purpose::Advertising, Decision::Withdraw);
    w.affiliate("adsco").script = std::iter::repeat_n(Refuse, 5_000).collect();
    w.read_feeds().expect("no crash");
    let (id, entry) = only_entry(&w);
    assert_eq!((id, entry.kind), (WebhookId::notice(&withdrawal, "adsco"), Kind::Withdrawn));
    let queued = entry.queued_ms.expect("a notice knows when it was queued");
    assert_eq!(w.store.live.entry(&id).and_then(|e| e.queued_ms), Some(queued), "and so does the store");
    let week = NOTICE_RETRY_FOR.as_millis() as u64;
    let mut passes = 0;
    while !w.core.outbox().is_empty() {
        assert!(w.now < queued + week + RETRY_MAX.as_millis() as u64 * 2, "still retried long after the bound");
        assert_eq!(w.core.abandoned(), 0);
        w.pass().expect("no crash");
        passes += 1;
        if let Some(next) = w.core.outbox().values().map(|e| e.next_attempt_ms).min() {
            w.now = w.now.max(next);
        }
    }
    assert!(w.now >= queued + week, "abandoned only after the bound");
    assert_eq!(w.core.abandoned(), 1);
    assert!(w.store.durable.outbox.is_empty(), "out of the store too");
    let tries = w.affiliates["adsco"].received.iter().filter(|r| r.id == id).count();
    assert!(tries > 1_000 && tries == passes, "retried every pass until then: {tries} of {passes}");
}

/// The bound is configurable (`--notice-retry-for`): an hour here.
#[test]
fn the_notice_retry_bound_is_configurable() {
    let (mut w, alice, _) = alice_grants();
    w.drain(3, 0);
    w.core.set_notice_retry_for(std::time::Duration::from_secs(3600));
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Withdraw);
    w.affiliate("adsco").script = std::iter::repeat_n(Refuse, 100).collect();
    w.read_feeds().expect("no crash");
    let queued = only_entry(&w).1.queued_ms.expect("queued at");
    w.drain(100, 0);
    assert!(w.core.outbox().is_empty());
    assert_eq!(w.core.abandoned(), 1);
    assert!(w.now >= queued + 3_600_000 && w.now < queued + 3_600_000 + 2 * RETRY_MAX.as_millis() as u64);
}

/// Issue #12, point 5: a withdrawal notice's delivery was not logged. A notice the affiliate took is a leaf of the
/// export log of its own kind: the withdrawal as its consent hash (and as its evidence), the withdrawn grant's
/// notice hash, no fields, the body's hash; an export's leaf records the notice its grant signed.
#[test]
fn a_delivered_withdrawal_notice_is_logged_as_a_leaf_of_its_own_kind() {
    let (mut w, alice, grant) = alice_grants();
    w.drain(3, 0);
    let withdrawal = w.decide(alice, "adsco", Purpose::Advertising, Decision::Withdraw);
    w.drain(3, 0);
    let notice_id = WebhookId::notice(&withdrawal, "adsco");
    assert_eq!(w.logged_notices(), [notice_id]);
    assert_eq!(w.logged().len(), 1, "and the export before it");
    let leaves: Vec<(ExportLeaf, &LogRecord)> = w.store.durable.log.iter().map(|r| (leaf(r), r)).collect();
    let notice_hash = w.catalogue.notice("adsco", Purpose::Advertising).map(|n| n.hash);
    let (export, _) = &leaves[0];
    assert_eq!((export.kind, export.consent_hash, export.notice_hash), (LeafKind::Export, grant, notice_hash));
    let (notice, record) = &leaves[1];
    assert_eq!(
        (notice.kind, notice.consent_hash, notice.notice_hash),
        (LeafKind::WithdrawalNotice, withdrawal, notice_hash)
    );
    assert!(notice.fields.is_empty());
    let received = w.affiliates["adsco"].received.iter().find(|r| r.id == notice_id).expect("the notice");
    let sent: [u8; 32] = sha2::Sha256::digest(received.body.as_bytes()).into();
    assert_eq!(notice.payload_hash, sent);
    let evidence = hex::decode(&record.evidence.statement).expect("hex");
    assert_eq!(relay_proto::consent::statement_hash(&evidence), withdrawal, "the withdrawal is the evidence");
    // A notice that fails is not logged.
    let (mut w, alice, _) = alice_grants();
    w.drain(3, 0);
    w.decide(alice, "adsco", Purpose::Advertising, Decision::Withdraw);
    w.affiliate("adsco").script = [Refuse].into();
    w.pass().expect("no crash");
    assert!(w.logged_notices().is_empty());
}

/// Erasures that reach the core: each of the three pairs of Alice that received data, and Bob's, delivered.
fn alice_and_bob_delivered() -> (World, usize, usize) {
    let mut w = World::new(13);
    let alice = w.user(1, "Pixel 9");
    let bob = w.user(2, "Galaxy");
    for (affiliate, purpose) in
        [("shieldco", Purpose::Security), ("adsco", Purpose::Advertising), ("adsco", Purpose::Analytics)]
    {
        w.decide(alice, affiliate, purpose, Decision::Grant);
    }
    w.decide(bob, "shieldco", Purpose::Security, Decision::Grant);
    w.drain(4, 0);
    assert_eq!(w.logged().len(), 4);
    (w, alice, bob)
}

/// What the durable store holds, as text: every outbox entry, delivered record, export marker, statement and log
/// record (the places a phone number could be kept).
fn stored_text(w: &World) -> String {
    let image = &w.store.durable;
    let mut text = String::new();
    for v in image.outbox.values() {
        text.push_str(&String::from_utf8_lossy(v));
    }
    text.push_str(&format!("{:?}", image.delivered.values().map(|d| d.to_stored()).collect::<Vec<_>>()));
    for d in image.delivered.values() {
        text.push_str(&String::from_utf8_lossy(&d.to_stored()));
    }
    for m in image.exported.values() {
        text.push_str(&m.to_string());
    }
    for e in image.statements.values().chain(image.erased.values()) {
        text.push_str(&serde_json::to_string(e).expect("evidence"));
    }
    for r in &image.log {
        text.push_str(&serde_json::to_string(r).expect("record"));
    }
    text
}

/// Issue #12, point 6 (erasure): an erasure drops the account's queued exports, tells every affiliate that received
/// data an `account.erased` notice naming the user exactly as that affiliate received them, logs each as an erasure
/// notice whose evidence is the signed request, and forgets the account's delivered records and export markers: no
/// phone number of the account is left in the store once the notices are delivered. Bob is untouched.
#[test]
fn an_erasure_notifies_each_affiliate_as_it_received_the_user_then_forgets_the_account() {
    let (mut w, alice, bob) = alice_and_bob_delivered();
    let analytics_id = w.affiliates["adsco"]
        .received
        .iter()
        .find(|r| body(&r.body)["data"]["purpose"] == "analytics")
        .map(|r| r.id.to_string())
        .expect("the analytics export");
    let phone = w.relay.users[alice].phone.clone();
    assert!(stored_text(&w).contains(&phone), "the delivered record holds the phone shieldco received");
    // A new device: an export queued for each pair that affiliates have not taken yet.
    w.affiliate("adsco").script = [Unreachable, Unreachable].into();
    w.affiliate("shieldco").script = [Unreachable].into();
    w.change_device(alice, "Pixel 10");
    w.pass().expect("no crash");
    assert_eq!(w.core.outbox().values().filter(|e| e.kind == Kind::Export).count(), 3);

    let erasure = w.erase(alice, [5; 32]);
    w.drain(4, 0);
    assert!(w.core.outbox().is_empty(), "{:?}", w.core.outbox());
    let erased = |affiliate: &str, purpose: &str| {
        let found: Vec<Value> = w.affiliates[affiliate]
            .received
            .iter()
            .map(|r| body(&r.body))
            .filter(|b| b["type"] == "account.erased" && b["data"]["purpose"] == purpose)
            .collect();
        assert_eq!(found.len(), 1, "one erasure notice to {affiliate} for {purpose}");
        found[0]["data"].clone()
    };
    let pseudonym = phone_pseudonym(&MASTER_KEY, "adsco", &phone);
    assert_eq!(erased("shieldco", "security"), serde_json::json!({"purpose": "security", "phone": [phone]}));
    assert_eq!(
        erased("adsco", "advertising"),
        serde_json::json!({"purpose": "advertising", "phone_pseudonym": [pseudonym]})
    );
    assert_eq!(
        erased("adsco", "analytics"),
        serde_json::json!({"purpose": "analytics", "webhook_ids": [analytics_id]})
    );
    // Nothing of the new device left: the queued exports were dropped, not sent.
    assert!(w.received().iter().all(|(_, r)| !r.body.contains("Pixel 10")));

    // Logged as erasure notices, each following from the signed request.
    let logged = w.logged_erasures();
    assert_eq!(logged.len(), 3);
    let signed_hash: [u8; 32] = sha2::Sha256::digest(&erasure.signed).into();
    for record in w.store.durable.log.iter().filter(|r| leaf(r).kind == LeafKind::ErasureNotice) {
        assert_eq!(leaf(record).consent_hash, signed_hash);
        assert!(leaf(record).fields.is_empty());
        assert_eq!(erasure::verify_evidence(&record.evidence), Ok((w.relay.users[alice].account(), signed_hash)));
    }

    // The account's records are gone, Bob's stay; no phone number of Alice anywhere in the store.
    let alice_id = w.relay.users[alice].account();
    assert!(w.store.durable.delivered.keys().all(|p| p.account != alice_id));
    assert!(w.store.durable.exported.keys().all(|p| p.account != alice_id));
    assert!(w.store.durable.erased.contains_key(&alice_id));
    assert!(w.store.durable.delivered.contains_key(&w.pair(bob, "shieldco", Purpose::Security)));
    let text = stored_text(&w);
    assert!(!text.contains(&phone) && !text.contains(&phone[1..]), "Alice's phone number is still stored");
    assert!(text.contains(&w.relay.users[bob].phone[1..]), "Bob's delivered record is kept");
}

/// Issue #12, point 6: a compromised relay that, after an erasure, serves the account's old grant again (validly
/// signed, with a subject, and grants its leases) must get nothing exported: the exporter keeps its own record of
/// the erasure.
#[test]
fn a_grant_of_an_erased_account_replayed_by_the_relay_exports_nothing() {
    let (mut w, alice, _) = alice_grants();
    w.drain(3, 0);
    assert_eq!(w.affiliates["adsco"].received.len(), 1);
    w.erase(alice, [6; 32]);
    w.drain(3, 0);
    assert_eq!(w.logged_erasures().len(), 1);
    let received = w.affiliates["adsco"].received.len();
    w.replay(0);
    w.drain(3, 0);
    assert_eq!(w.affiliates["adsco"].received.len(), received, "the replayed grant must not be exported");
    assert!(w.core.outbox().is_empty());
}

/// An erasure the user did not sign, or that is not a delete request of the account it names, is ignored: nothing
/// is dropped, forgotten or sent.
#[test]
fn an_erasure_the_user_did_not_sign_is_ignored() {
    let (mut w, alice, _) = alice_grants();
    w.affiliate("adsco").script = [Unreachable].into();
    w.pass().expect("no crash");
    let genuine = w.erase(alice, [7; 32]);
    let account = w.relay.users[alice].account();
    let mallory = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let mut forged = genuine.clone();
    forged.signature = ed25519_dalek::Signer::sign(&mallory, &genuine.signed).to_bytes().to_vec().into();
    // Mallory signs a request to erase Alice with her own key.
    let mut other_key = forged.clone();
    other_key.identity_key = mallory.verifying_key().as_bytes().to_vec().into();
    // A signature the user really made, but over an authentication transcript, not a delete request.
    let auth = relay_proto::auth::auth_transcript(&[7; 32], &account);
    let mut not_delete = genuine.clone();
    not_delete.signature = ed25519_dalek::Signer::sign(&w.relay.users[alice].key, &auth).to_bytes().to_vec().into();
    not_delete.signed = auth.into();
    let mut other_account = genuine.clone();
    other_account.account_id = vec![0; 16].into();
    for (change, why) in [
        (&forged, "signature does not verify"),
        (&other_key, "the erased account does not derive from the identity key"),
        (&not_delete, "the signed bytes are not a delete request"),
        (&other_account, "the request erases another account than the change names"),
    ] {
        let checked = CheckedErasure::new(change);
        let (erased, effects) =
            w.core.handle_erasure(checked, AccountRecords::default(), w.now).expect("no attempt under way");
        assert_eq!(erased, Erased::Rejected(why));
        assert!(effects.is_empty());
    }
    assert_eq!(w.core.outbox_len(), 1, "the export is still queued");
}

/// A crash anywhere while an erasure is applied loses neither a notice nor the erasure: the feed's cursor moves only
/// once its writes are durable, and applying it again queues nothing twice.
#[test]
fn a_crash_while_an_erasure_is_applied_loses_neither_a_notice_nor_the_erasure() {
    let (probe, alice, _) = alice_and_bob_delivered();
    let start = probe.step;
    for offset in 0..16 {
        let (mut w, _, _) = alice_and_bob_delivered();
        assert_eq!(w.step, start);
        w.erase(alice, [8; 32]);
        w.crash_at = Some(start + offset);
        w.drain(12, offset as usize % 3);
        let notices: Vec<_> = w
            .received()
            .into_iter()
            .filter(|(_, r)| body(&r.body)["type"] == "account.erased")
            .map(|(a, r)| (a.to_owned(), r.id))
            .collect();
        let distinct: std::collections::BTreeSet<_> = notices.iter().cloned().collect();
        assert_eq!(distinct.len(), 3, "crash at +{offset}: {notices:?}");
        assert_eq!(w.logged_erasures().len(), 3, "crash at +{offset}");
        let alice_id = w.relay.users[alice].account();
        assert!(w.store.durable.erased.contains_key(&alice_id), "crash at +{offset}");
        assert!(w.store.durable.delivered.keys().all(|p| p.account != alice_id), "crash at +{offset}");
        assert!(w.core.outbox().is_empty(), "crash at +{offset}");
    }
}

/// Erasure notices are retried for a bounded time like withdrawal notices, then abandoned (counted, out of the
/// outbox, which then holds no personal data of the account).
#[test]
fn an_erasure_notice_is_abandoned_after_its_retry_period() {
    let (mut w, alice, _) = alice_and_bob_delivered();
    w.core.set_notice_retry_for(std::time::Duration::from_secs(60));
    w.affiliate("shieldco").script = std::iter::repeat_n(Unreachable, 64).collect();
    w.erase(alice, [9; 32]);
    w.drain(40, 0);
    assert_eq!(w.core.abandoned(), 1);
    assert!(w.core.outbox().is_empty());
    assert_eq!(w.logged_erasures().len(), 2, "adsco's two notices were delivered");
    assert!(!stored_text(&w).contains(&w.relay.users[alice].phone[1..]));
}
