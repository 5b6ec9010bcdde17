//! Tests every storage backend must pass, written once against the traits of [`crate::store::backend`]; each
//! backend's module runs them over its own fixture (a fresh, empty store per call of the factory).
//!
//! Built for this crate's tests and, with the `conformance` feature, for backends tested elsewhere: the mailbox and
//! lease suites are public so that the integration harness runs them against the JetStream mailboxes and leases on a
//! real cluster. Where backends legitimately differ (the byte quota), the fixture declares what its backend does
//! ([`mailboxes::ByteQuota`]) and the suite checks exactly that, both ways: a backend that enforced what it claims
//! not to would fail too.

pub mod mailboxes {
    //! The [`MailboxStore`] suite.

    use std::future::Future;
    use std::sync::Arc;

    use relay_proto::AccountId;

    use crate::store::{MailboxError, MailboxLimits, MailboxStore};

    /// What a backend enforces of [`MailboxLimits::max_bytes`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ByteQuota {
        /// An append that would take the mailbox past `max_bytes` is refused (sled: it counts each mailbox's bytes).
        Enforced,
        /// Not checked per mailbox: only the message quota is, so a mailbox's bytes are bounded by `max_messages`
        /// times the envelope size limit (JetStream: streams limit messages per subject, not bytes per subject).
        NotEnforced,
    }

    /// A backend under test: `open` gives a store over the fixture's data; a second `open` is what a restarted
    /// relay would see of what `durable` made durable.
    pub trait Fixture {
        /// What the backend enforces of the byte quota; the quota test checks exactly this.
        fn byte_quota(&self) -> ByteQuota;
        /// A store over the fixture's data with `limits`.
        fn open(&self, limits: MailboxLimits) -> impl Future<Output = Arc<dyn MailboxStore>>;
        /// Makes everything the last opened store accepted durable (what the group commit does before an ack).
        fn durable(&self) -> impl Future<Output = ()>;
    }

    fn limits(max_messages: u64, max_bytes: u64) -> MailboxLimits {
        MailboxLimits { max_messages, max_bytes, ttl_ms: 1000 }
    }

    /// Runs every single-task test, each on a fresh fixture from `fresh`.
    pub async fn run_all<F: Fixture>(fresh: &dyn Fn() -> F) {
        a_scan_bounded_by_bytes_stops_after_the_entry_that_reaches_the_bound(&fresh()).await;
        scan_is_ordered_and_isolated_per_recipient(&fresh()).await;
        quota_by_messages_and_bytes_and_release_on_remove(&fresh()).await;
        expired_entries_are_hidden_then_swept(&fresh()).await;
        purge_empties_one_mailbox_only(&fresh()).await;
        usage_and_ids_survive_a_reopen(&fresh()).await;
    }

    /// A scan stops once the bytes read reach its bound, returning at least one entry; the count bound still holds.
    pub async fn a_scan_bounded_by_bytes_stops_after_the_entry_that_reaches_the_bound(f: &impl Fixture) {
        let m = f.open(limits(100, 10_000)).await;
        let a = AccountId([1; 16]);
        for _ in 0..5 {
            m.append(&a, &[0u8; 100], 0).await.expect("append");
        }
        assert_eq!(m.scan(&a, 0, 10, 250, 1).await.expect("scan").len(), 3);
        assert_eq!(m.scan(&a, 0, 10, 1, 1).await.expect("scan").len(), 1, "at least one entry");
        assert_eq!(m.scan(&a, 0, 2, 10_000, 1).await.expect("scan").len(), 2, "the count still applies");
    }

    /// Scans return one recipient's entries in id order; ids are unique across mailboxes; one account cannot
    /// remove another's entries.
    pub async fn scan_is_ordered_and_isolated_per_recipient(f: &impl Fixture) {
        let m = f.open(limits(100, 10_000)).await;
        let (a, b) = (AccountId([1; 16]), AccountId([2; 16]));
        let e1 = m.append(&a, b"one", 0).await.expect("append");
        let other = m.append(&b, b"other", 0).await.expect("append");
        let e2 = m.append(&a, b"two", 0).await.expect("append");
        assert!(e1.id >= 1 && e2.id > e1.id, "ids start at 1 and increase");
        assert!(other.id >= 1 && other.id != e1.id && other.id != e2.id, "ids are unique across mailboxes");
        let got = m.scan(&a, 0, 10, usize::MAX, 1).await.expect("scan");
        assert_eq!(got.iter().map(|e| &e.envelope[..]).collect::<Vec<_>>(), vec![&b"one"[..], b"two"]);
        assert_eq!(m.scan(&a, e1.id, 10, usize::MAX, 1).await.expect("scan").len(), 1);
        // b cannot remove a's entries by id.
        assert_eq!(m.remove(&b, &[e1.id, e2.id]).await.expect("remove"), 0);
        assert_eq!(m.remove(&a, &[e1.id, e2.id, 999]).await.expect("remove"), 2);
        assert_eq!(m.depth(&a).await.expect("depth"), 0);
        assert_eq!(m.depth(&b).await.expect("depth"), 1);
        assert_eq!(m.queued(), 1);
    }

    /// The message quota is enforced by every backend; the byte quota exactly as the fixture declares
    /// ([`ByteQuota`]); removing an entry makes room again.
    pub async fn quota_by_messages_and_bytes_and_release_on_remove(f: &impl Fixture) {
        let m = f.open(limits(2, 10)).await;
        let a = AccountId([1; 16]);
        let e = m.append(&a, b"12345", 0).await.expect("append");
        let past_the_bytes = m.append(&a, b"123456", 0).await;
        match f.byte_quota() {
            ByteQuota::Enforced => {
                assert!(
                    matches!(past_the_bytes, Err(MailboxError::QuotaExceeded { bytes: 5, .. })),
                    "{past_the_bytes:?}"
                )
            }
            ByteQuota::NotEnforced => {
                // Declared: 11 bytes in a mailbox limited to 10 are accepted (within the message quota).
                let over = past_the_bytes.expect("a backend that does not enforce bytes accepts it");
                assert_eq!(m.remove(&a, &[over.id]).await.expect("remove"), 1);
            }
        }
        m.append(&a, b"1", 0).await.expect("append");
        assert!(matches!(m.append(&a, b"1", 0).await, Err(MailboxError::QuotaExceeded { messages: 2, .. })));
        m.remove(&a, &[e.id]).await.expect("remove");
        m.append(&a, b"1", 0).await.expect("room again after removal");
    }

    /// Entries expired at the relay's `now_ms` are never scanned, and a sweep removes exactly those.
    pub async fn expired_entries_are_hidden_then_swept(f: &impl Fixture) {
        let m = f.open(limits(10, 1000)).await;
        let a = AccountId([1; 16]);
        m.append(&a, b"old", 0).await.expect("append");
        m.append(&a, b"new", 5000).await.expect("append");
        assert_eq!(m.scan(&a, 0, 10, usize::MAX, 2000).await.expect("scan").len(), 1);
        assert_eq!(m.sweep_expired(2000).await.expect("sweep"), 1);
        assert_eq!(m.depth(&a).await.expect("depth"), 1);
        assert_eq!(m.sweep_expired(2000).await.expect("sweep"), 0, "nothing left to sweep");
    }

    /// A purge empties one mailbox and leaves the others alone.
    pub async fn purge_empties_one_mailbox_only(f: &impl Fixture) {
        let m = f.open(limits(10, 1000)).await;
        let (a, b) = (AccountId([1; 16]), AccountId([2; 16]));
        for _ in 0..3 {
            m.append(&a, b"x", 0).await.expect("append");
        }
        m.append(&b, b"y", 0).await.expect("append");
        assert_eq!(m.purge(&a).await.expect("purge"), 3);
        assert_eq!(m.depth(&a).await.expect("depth"), 0);
        assert!(m.scan(&a, 0, 10, usize::MAX, 1).await.expect("scan").is_empty());
        assert_eq!(m.depth(&b).await.expect("depth"), 1, "another account's mailbox is untouched");
    }

    /// What a restart sees: the quota counts what is queued, and a mailbox's new ids stay above its old ones and
    /// unlike any other's.
    pub async fn usage_and_ids_survive_a_reopen(f: &impl Fixture) {
        let a = AccountId([1; 16]);
        let (first, last) = {
            let m = f.open(limits(2, 1000)).await;
            let first = m.append(&a, b"x", 0).await.expect("append").id;
            let last = m.append(&a, b"y", 0).await.expect("append").id;
            f.durable().await;
            (first, last)
        };
        let fresh = f.open(limits(2, 1000)).await;
        assert!(matches!(fresh.append(&a, b"z", 0).await, Err(MailboxError::QuotaExceeded { .. })));
        assert_eq!(fresh.depth(&a).await.expect("depth"), 2);
        let b = AccountId([2; 16]);
        let other = fresh.append(&b, b"w", 0).await.expect("append").id;
        assert!(other != first && other != last, "ids are unique across mailboxes after a reopen");
        assert_eq!(fresh.remove(&a, &[first]).await.expect("remove"), 1);
        let next = fresh.append(&a, b"z", 0).await.expect("room after the removal").id;
        assert!(next > last && next != other, "a mailbox's ids increase across a reopen");
        let ids: Vec<u64> = fresh.scan(&a, 0, 10, usize::MAX, 1).await.expect("scan").iter().map(|e| e.id).collect();
        assert_eq!(ids, [last, next]);
    }

    /// A reader that follows a mailbox with a cursor (as a delivery stream does) must see every entry: an entry
    /// must never become visible after an entry with a higher id for the same recipient. Needs a multi-threaded
    /// runtime.
    pub async fn cursor_readers_miss_nothing_under_concurrent_appends(f: &impl Fixture) {
        let m = f.open(limits(1_000_000, 1 << 40)).await;
        let a = AccountId([1; 16]);
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                tokio::spawn(async move {
                    for _ in 0..3000 {
                        m.append(&a, b"x", 0).await.expect("append");
                    }
                })
            })
            .collect();
        let (mut cursor, mut seen) = (0, 0usize);
        while seen < 12_000 {
            for e in m.scan(&a, cursor, 1000, usize::MAX, 0).await.expect("scan") {
                cursor = e.id;
                seen += 1;
            }
            if writers.iter().all(|w| w.is_finished())
                && m.scan(&a, cursor, 1, usize::MAX, 0).await.expect("scan").is_empty()
            {
                break;
            }
            tokio::task::yield_now().await;
        }
        for w in writers {
            w.await.expect("writer");
        }
        assert_eq!(seen, 12_000, "a cursor reader skipped entries that were inserted out of id order");
    }
}

pub mod leases {
    //! The [`LeaseStore`] suite: the withdrawal fence's export leases.
    //!
    //! A wait that must not end yet is watched for [`STILL_WAITING`]: long enough for a backend that polls (the
    //! JetStream one looks every 250 ms) to have looked several times, so a store that let the withdrawal through
    //! would be caught; a wait that must end is bounded by [`BOUND`] only to stop a test that would hang.

    use std::collections::HashSet;
    use std::future::Future;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use relay_proto::AccountId;
    use relay_proto::consent::Purpose;

    use crate::fence::{LEASE_TTL, LeaseId, Pair};
    use crate::store::LeaseStore;

    /// How long a wait that must not end is watched.
    pub const STILL_WAITING: Duration = Duration::from_secs(1);
    /// Hang protection for a wait that must end.
    pub const BOUND: Duration = Duration::from_secs(60);

    /// A backend under test: `open` gives a lease store over the fixture's leases; a second `open` is what a
    /// restarted relay node (or another node) sees of what `durable` made durable.
    pub trait Fixture {
        /// A lease store over the fixture's leases.
        fn open(&self) -> impl Future<Output = Arc<dyn LeaseStore>>;
        /// Makes the leases the opened stores took durable (what the export handler does before answering).
        fn durable(&self) -> impl Future<Output = ()>;
        /// A short TTL the backend keeps exactly or longer, for the lapse test.
        fn short_ttl(&self) -> Duration;
    }

    fn pair(n: u8) -> Pair {
        (AccountId([n; 16]), Purpose::Advertising, "adsco".into())
    }

    async fn clears(leases: &dyn LeaseStore, pair: &Pair, what: &str) {
        if tokio::time::timeout(BOUND, leases.wait_clear(pair)).await.is_err() {
            panic!("{what}: wait_clear did not return within {BOUND:?}");
        }
    }

    async fn still_waits(leases: &dyn LeaseStore, pair: &Pair, what: &str) {
        let waited = tokio::time::timeout(STILL_WAITING, leases.wait_clear(pair)).await;
        assert!(waited.is_err(), "{what}: wait_clear returned while a lease was held");
    }

    /// Runs every test, each on a fresh fixture from `fresh`.
    pub async fn run_all<F: Fixture>(fresh: &dyn Fn() -> F) {
        a_withdrawal_waits_for_every_lease_of_its_pair_and_no_other(&fresh()).await;
        a_lapsed_lease_stops_holding_a_withdrawal(&fresh()).await;
        leases_and_ids_survive_a_reopen(&fresh()).await;
    }

    /// No lease, no wait; several leases on one pair each hold its withdrawal until the last is released; another
    /// pair's lease holds nothing up; unknown ids are ignored; ids are distinct.
    pub async fn a_withdrawal_waits_for_every_lease_of_its_pair_and_no_other(f: &impl Fixture) {
        let leases = f.open().await;
        let (p, q) = (pair(1), pair(2));
        clears(&*leases, &p, "no lease").await;
        let (a1, _) = leases.acquire(p.clone(), LEASE_TTL).await.expect("lease");
        let (a2, _) = leases.acquire(p.clone(), LEASE_TTL).await.expect("a second lease on the same pair");
        let (b1, _) = leases.acquire(q.clone(), LEASE_TTL).await.expect("lease");
        assert_eq!(HashSet::from([a1, a2, b1]).len(), 3, "ids must be distinct: {a1:?} {a2:?} {b1:?}");
        f.durable().await;
        still_waits(&*leases, &p, "two leases").await;
        leases.release(&p, a1).await;
        still_waits(&*leases, &p, "the second lease of the pair").await;
        // Unknown ids and another pair's id are ignored: they release nothing.
        leases.release(&p, LeaseId(u64::MAX)).await;
        leases.release(&p, b1).await;
        still_waits(&*leases, &q, "another pair's release must not release this lease").await;
        leases.release(&p, a2).await;
        clears(&*leases, &p, "every lease of the pair released").await;
        still_waits(&*leases, &q, "the other pair's lease").await;
        leases.release(&q, b1).await;
        clears(&*leases, &q, "released").await;
    }

    /// An abandoned lease holds a withdrawal until its TTL has run out, and then no longer (only a lower bound on
    /// the time is checked: no upper bound on a shared machine).
    pub async fn a_lapsed_lease_stops_holding_a_withdrawal(f: &impl Fixture) {
        let leases = f.open().await;
        let ttl = f.short_ttl();
        let before = Instant::now();
        let (_, deadline) = leases.acquire(pair(3), ttl).await.expect("lease");
        assert!(deadline >= before + ttl, "the deadline is at least the TTL after the request");
        f.durable().await;
        clears(&*leases, &pair(3), "a lapsed lease").await;
        assert!(before.elapsed() >= ttl, "held until the TTL ran out");
    }

    /// After a reopen (a restarted or another relay node), a lease taken and not released still holds its pair's
    /// withdrawal until released by the id granted before; a released one is not brought back; ids granted after
    /// the reopen are none of the earlier ones.
    pub async fn leases_and_ids_survive_a_reopen(f: &impl Fixture) {
        let (p, q) = (pair(4), pair(5));
        let before = f.open().await;
        let (held, _) = before.acquire(p.clone(), LEASE_TTL).await.expect("lease");
        let (released, _) = before.acquire(q.clone(), LEASE_TTL).await.expect("lease");
        before.release(&q, released).await;
        // Another pair's release by this id is ignored, in the durable record too.
        before.release(&q, held).await;
        f.durable().await;

        let after = f.open().await;
        clears(&*after, &q, "a lease released before the reopen").await;
        still_waits(&*after, &p, "a lease from before the reopen").await;
        let mut earlier = HashSet::from([held, released]);
        for _ in 0..3 {
            let (fresh, _) = after.acquire(q.clone(), LEASE_TTL).await.expect("lease");
            assert!(earlier.insert(fresh), "id {fresh:?} granted again after the reopen");
            after.release(&q, fresh).await;
        }
        after.release(&p, held).await;
        clears(&*after, &p, "released through the reopened store by its old id").await;
    }
}

#[cfg(test)]
pub(crate) mod directory {
    use relay_proto::wire::DeviceInfo;
    use relay_proto::{AccountId, PhoneNumber};

    use crate::store::{AccountKeys, Claim, Directory, DirectoryError, Registered};

    pub(crate) fn keys(n: u8) -> AccountKeys {
        AccountKeys { identity_key: [n; 32], sealing_key: [n + 100; 32], sealing_key_signature: Some([n; 64]) }
    }

    /// Runs every test, each on a fresh, empty directory from `fresh`.
    pub(crate) async fn run_all(fresh: &dyn Fn() -> Directory) {
        register_lookup_update_and_phone_ownership(&fresh()).await;
        changed_phone_or_device_is_recorded_in_order_and_a_plain_reregistration_is_not(&fresh()).await;
        a_verified_claim_takes_the_number_over_and_removes_the_old_account(&fresh()).await;
        removal_frees_the_number_and_forgets_keys_and_profile(&fresh()).await;
    }

    /// A first-come registration: (account, created).
    async fn first_come(
        d: &Directory,
        keys: AccountKeys,
        phone: &PhoneNumber,
        device: DeviceInfo,
        now: u64,
    ) -> Result<(AccountId, bool), DirectoryError> {
        d.register(keys, phone, device, now, Claim::FirstCome).await.map(|r| (r.account, r.created))
    }

    fn phone(s: &str) -> PhoneNumber {
        PhoneNumber::parse(s).expect("valid")
    }

    pub(crate) async fn register_lookup_update_and_phone_ownership(d: &Directory) {
        let (p1, p2) = (phone("+33612345678"), phone("+33698765432"));
        let (a, created) = first_come(d, keys(1), &p1, DeviceInfo::default(), 1).await.expect("register");
        assert!(created);
        assert_eq!(d.lookup(&p1).await.expect("lookup"), Some((a, keys(1))));
        let taken = first_come(d, keys(2), &p1, DeviceInfo::default(), 2).await;
        assert!(matches!(taken, Err(DirectoryError::PhoneTaken)), "{taken:?}");
        // The same identity moves to a new number: the old one is released.
        let (a2, created) = first_come(d, keys(1), &p2, DeviceInfo::default(), 3).await.expect("update");
        assert_eq!((a2, created), (a, false));
        assert_eq!(d.lookup(&p1).await.expect("lookup"), None);
        let (b, _) = first_come(d, keys(2), &p1, DeviceInfo::default(), 4).await.expect("number is free again");
        assert!(d.identities().exists(&b).await.expect("exists"));
        assert!(!d.identities().exists(&AccountId([9; 16])).await.expect("exists"));
        assert_eq!(d.identities().keys(&b).await.expect("keys"), Some(keys(2)));
        assert_eq!(d.profile(&a).await.expect("profile").map(|p| p.phone), Some(p2.as_str().to_owned()));
        assert_eq!(d.profile(&AccountId([9; 16])).await.expect("profile"), None);
    }

    pub(crate) async fn changed_phone_or_device_is_recorded_in_order_and_a_plain_reregistration_is_not(d: &Directory) {
        let (p1, p2) = (phone("+33612345678"), phone("+33698765432"));
        let pixel = DeviceInfo { model: "Pixel 8".into(), os: "Android 15".into(), app_version: "1.0".into() };
        let (a, _) = first_come(d, keys(1), &p1, pixel.clone(), 1).await.expect("register");
        let (b, _) = first_come(d, keys(2), &p2, pixel.clone(), 1).await.expect("register");
        assert!(d.subject_changes(0, 10).await.expect("changes").is_empty(), "a first registration is not a change");
        first_come(d, keys(1), &p1, pixel.clone(), 2).await.expect("same again");
        assert!(d.subject_changes(0, 10).await.expect("changes").is_empty(), "nothing changed");
        let newer = DeviceInfo { app_version: "1.1".into(), ..pixel.clone() };
        first_come(d, keys(1), &p1, newer, 3).await.expect("new version");
        first_come(d, keys(2), &phone("+33600000000"), pixel, 3).await.expect("new number");
        assert_eq!(d.subject_changes(0, 10).await.expect("changes"), [(1, a), (2, b)]);
        assert_eq!(d.subject_changes(1, 10).await.expect("changes"), [(2, b)]);
        assert_eq!(d.subject_changes(0, 1).await.expect("changes"), [(1, a)]);
        assert!(d.subject_changes(2, 10).await.expect("changes").is_empty());
    }

    pub(crate) async fn a_verified_claim_takes_the_number_over_and_removes_the_old_account(d: &Directory) {
        let p = phone("+33612345678");
        let (squatter, _) = first_come(d, keys(1), &p, DeviceInfo::default(), 1).await.expect("first come");
        let owner = AccountId::from_identity_key(&keys(2).identity_key);
        let stale = Claim::Verified { holder: None };
        let refused = d.register(keys(2), &p, DeviceInfo::default(), 2, stale).await;
        assert!(matches!(refused, Err(DirectoryError::HolderChanged)), "{refused:?}");
        let claim = Claim::Verified { holder: Some(squatter) };
        let r = d.register(keys(2), &p, DeviceInfo::default(), 2, claim).await.expect("takeover");
        assert_eq!(r, Registered { account: owner, created: true, displaced: Some(squatter) });
        assert_eq!(d.lookup(&p).await.expect("lookup").map(|(a, _)| a), Some(owner));
        assert_eq!(d.keys(&squatter).await.expect("keys"), None, "the old key no longer authenticates");
        assert_eq!(d.profile(&squatter).await.expect("profile"), None, "nothing of the old account can be exported");
        assert!(!d.identities().exists(&squatter).await.expect("exists"), "and it receives nothing");
        // A claim on one's own number displaces nobody.
        let r = d.register(keys(2), &p, DeviceInfo::default(), 3, Claim::Verified { holder: Some(owner) }).await;
        assert_eq!(r.expect("own number").displaced, None);
    }

    pub(crate) async fn removal_frees_the_number_and_forgets_keys_and_profile(d: &Directory) {
        let p = phone("+33612345678");
        let (a, _) = first_come(d, keys(1), &p, DeviceInfo::default(), 1).await.expect("register");
        assert_eq!(d.remove(&a).await.expect("remove"), Some(p.clone()));
        assert_eq!(d.lookup(&p).await.expect("lookup"), None, "the number is free");
        assert_eq!(d.keys(&a).await.expect("keys"), None);
        assert_eq!(d.profile(&a).await.expect("profile"), None);
        assert_eq!(d.remove(&a).await.expect("remove again"), None);
        first_come(d, keys(2), &p, DeviceInfo::default(), 2).await.expect("someone else takes the number");
    }
}

#[cfg(any(test, feature = "conformance"))]
pub mod prekeys {
    //! The [`crate::store::PrekeyStore`] suite (public with the `conformance` feature: the JetStream prekeys run it
    //! on a real cluster).

    use std::collections::HashSet;

    use relay_proto::AccountId;
    use relay_proto::wire::{KemPrekey, OneTimePrekey, SignedPrekey};
    use sha2::{Digest, Sha256};

    use crate::store::prekeys::{KEM_PUBLIC_LEN, MAX_POOL};
    use crate::store::{Counts, PrekeyError, Prekeys};

    fn kem(id: u32) -> KemPrekey {
        KemPrekey { id, public_key: vec![id as u8; KEM_PUBLIC_LEN].into(), signature: vec![1; 64].into() }
    }

    fn signed() -> SignedPrekey {
        SignedPrekey { id: 1, public_key: vec![2; 32].into(), signature: vec![3; 64].into() }
    }

    /// Runs every single-task test, each on a fresh, empty store from `fresh`.
    /// Runs every single-task test, each on a fresh, empty store from `fresh`.
    pub async fn run_all(fresh: &dyn Fn() -> Prekeys) {
        bundle_consumes_one_time_keys_then_falls_back_to_last_resort(&fresh()).await;
        sizes_and_pool_bound_are_checked(&fresh()).await;
        access_key_checks(&fresh()).await;
        forgetting_an_account_removes_its_keys_and_no_one_elses(&fresh()).await;
    }

    /// A bundle takes one one-time key of each kind, then falls back to the last-resort KEM key.
    pub async fn bundle_consumes_one_time_keys_then_falls_back_to_last_resort(p: &Prekeys) {
        let a = AccountId([1; 16]);
        assert_eq!(p.take_bundle(&a).await.expect("take"), None, "nothing published");
        let ot = [OneTimePrekey { id: 7, public_key: vec![7; 32].into() }];
        let c = p.upload(&a, Some(&signed()), &ot, &[kem(10)], Some(&kem(99))).await.expect("upload");
        assert_eq!(c, Counts { one_time: 1, kem: 1, signed: true, last_resort: true });
        let first = p.take_bundle(&a).await.expect("take").expect("bundle");
        assert_eq!(first.one_time.map(|k| k.id), Some(7));
        assert_eq!((first.kem.id, first.kem_last_resort), (10, false));
        let second = p.take_bundle(&a).await.expect("take").expect("bundle");
        assert_eq!(second.one_time, None, "pool empty: no one-time X25519 key");
        assert_eq!((second.kem.id, second.kem_last_resort), (99, true));
        let after = p.counts(&a).await.expect("counts");
        assert_eq!(after, Counts { one_time: 0, kem: 0, signed: true, last_resort: true });
    }

    /// Needs a multi-threaded runtime.
    pub async fn racing_fetches_never_share_a_one_time_key(p: &Prekeys) {
        let a = AccountId([1; 16]);
        let ot: Vec<_> = (0..200).map(|i| OneTimePrekey { id: i, public_key: vec![0; 32].into() }).collect();
        let kems: Vec<_> = (0..200).map(kem).collect();
        p.upload(&a, Some(&signed()), &ot, &kems, Some(&kem(999))).await.expect("upload");
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    for _ in 0..60 {
                        got.extend(p.take_bundle(&a).await.expect("take"));
                    }
                    got
                })
            })
            .collect();
        let (mut ids, mut kem_ids) = (HashSet::new(), HashSet::new());
        for t in takers {
            for b in t.await.expect("join") {
                if let Some(k) = b.one_time {
                    assert!(ids.insert(k.id), "one-time prekey {} handed out twice", k.id);
                }
                if !b.kem_last_resort {
                    assert!(kem_ids.insert(b.kem.id), "KEM prekey {} handed out twice", b.kem.id);
                }
            }
        }
        assert_eq!((ids.len(), kem_ids.len()), (200, 200));
    }

    /// Wrong sizes and pools past `MAX_POOL` are refused.
    pub async fn sizes_and_pool_bound_are_checked(p: &Prekeys) {
        let a = AccountId([1; 16]);
        let bad = SignedPrekey { id: 1, public_key: vec![2; 31].into(), signature: vec![3; 64].into() };
        assert!(matches!(p.upload(&a, Some(&bad), &[], &[], None).await, Err(PrekeyError::Invalid(_))));
        let too_many: Vec<_> =
            (0..=MAX_POOL as u32).map(|i| OneTimePrekey { id: i, public_key: vec![0; 32].into() }).collect();
        assert!(matches!(p.upload(&a, None, &too_many, &[], None).await, Err(PrekeyError::Invalid(_))));
    }

    /// Sealed sends are allowed only with the access key whose hash was set, for that account only.
    pub async fn access_key_checks(p: &Prekeys) {
        let a = AccountId([1; 16]);
        assert!(!p.access_allowed(&a, b"anything").await.expect("check"), "no key set: sealed sends refused");
        p.set_access_verifier(&a, &Sha256::digest(b"secret-key")).await.expect("set");
        assert!(p.access_allowed(&a, b"secret-key").await.expect("check"));
        assert!(!p.access_allowed(&a, b"secret-kez").await.expect("check"));
        assert!(!p.access_allowed(&AccountId([2; 16]), b"secret-key").await.expect("check"));
    }

    /// Forgetting an account removes its prekeys and access key, and no other account's.
    pub async fn forgetting_an_account_removes_its_keys_and_no_one_elses(p: &Prekeys) {
        let (a, b) = (AccountId([1; 16]), AccountId([2; 16]));
        let ot = [OneTimePrekey { id: 7, public_key: vec![7; 32].into() }];
        for account in [&a, &b] {
            p.upload(account, Some(&signed()), &ot, &[kem(10)], Some(&kem(99))).await.expect("upload");
            p.set_access_verifier(account, &Sha256::digest(b"k")).await.expect("set");
        }
        p.forget(&a).await.expect("forget");
        assert_eq!(p.counts(&a).await.expect("counts"), Counts::default());
        assert!(!p.access_allowed(&a, b"k").await.expect("check"));
        let full = Counts { one_time: 1, kem: 1, signed: true, last_resort: true };
        assert_eq!(p.counts(&b).await.expect("counts"), full);
        assert!(p.access_allowed(&b, b"k").await.expect("check"));
    }
}

#[cfg(test)]
pub(crate) mod consent {
    use relay_proto::AccountId;
    use relay_proto::consent::{ConsentError, ConsentStatement, Decision, Purpose};

    use crate::store::{ConsentRegistry, Recorded, RegistryError};

    fn statement(sequence: u64, affiliate: &str, purpose: Purpose, decision: Decision) -> ConsentStatement {
        ConsentStatement {
            account: AccountId([1; 16]),
            affiliate: affiliate.into(),
            purpose,
            decision,
            notice_hash: [9; 32],
            sequence,
            time_ms: 1000 + sequence,
            expires_ms: None,
        }
    }

    pub(crate) async fn latest_per_pair_wins_and_history_keeps_everything(r: &ConsentRegistry) {
        let a = AccountId([1; 16]);
        r.record(&statement(1, "adsco", Purpose::Advertising, Decision::Grant).encode(), &[0; 64], 10)
            .await
            .expect("record");
        r.record(&statement(2, "adsco", Purpose::Analytics, Decision::Grant).encode(), &[0; 64], 11)
            .await
            .expect("record");
        r.record(&statement(3, "adsco", Purpose::Advertising, Decision::Withdraw).encode(), &[0; 64], 12)
            .await
            .expect("record");
        let ads = r.latest_for(&a, Purpose::Advertising, "adsco").await.expect("get").expect("present");
        assert_eq!((ads.statement.decision, ads.recorded_at_ms), (Decision::Withdraw, 12));
        assert_eq!(r.latest(&a).await.expect("latest").len(), 2);
        assert_eq!(
            r.history(&a).await.expect("history").iter().map(|h| h.statement.sequence).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let seqs =
            |(page, more): (Vec<Recorded>, bool)| (page.iter().map(|h| h.statement.sequence).collect::<Vec<_>>(), more);
        assert_eq!(seqs(r.history_page(&a, 0, 2).await.expect("page")), (vec![1, 2], true));
        assert_eq!(seqs(r.history_page(&a, 2, 2).await.expect("page")), (vec![3], false));
        assert_eq!(seqs(r.history_page(&a, 3, 2).await.expect("page")), (vec![], false));
        assert_eq!(seqs(r.history_page(&a, u64::MAX, 2).await.expect("page")), (vec![], false));
        assert_eq!(r.last_sequence(&a).await.expect("seq"), 3);
        assert_eq!(r.latest_for(&a, Purpose::Advertising, "otherco").await.expect("get"), None, "default: nothing");
    }

    pub(crate) async fn changes_page_through_every_account_in_recording_order(r: &ConsentRegistry) {
        let other = |seq| ConsentStatement {
            account: AccountId([2; 16]),
            ..statement(seq, "adsco", Purpose::Security, Decision::Grant)
        };
        r.record(&statement(1, "adsco", Purpose::Advertising, Decision::Grant).encode(), &[0; 64], 10)
            .await
            .expect("record");
        r.record(&other(1).encode(), &[0; 64], 11).await.expect("record");
        r.record(&statement(2, "adsco", Purpose::Advertising, Decision::Withdraw).encode(), &[0; 64], 12)
            .await
            .expect("record");
        assert!(r.record(&other(1).encode(), &[0; 64], 13).await.is_err(), "a refused statement gets no cursor");
        let all = r.changes(0, 10).await.expect("changes");
        let seen: Vec<_> =
            all.iter().map(|(c, rec)| (*c, rec.statement.account.0[0], rec.statement.sequence)).collect();
        assert_eq!(seen, [(1, 1, 1), (2, 2, 1), (3, 1, 2)]);
        let page: Vec<_> = r.changes(1, 1).await.expect("changes").into_iter().map(|(c, _)| c).collect();
        assert_eq!(page, [2]);
        assert!(r.changes(3, 10).await.expect("changes").is_empty());
        assert!(r.changes(u64::MAX, 10).await.expect("changes").is_empty());
    }

    pub(crate) async fn replayed_or_reordered_statements_are_refused(r: &ConsentRegistry) {
        r.record(&statement(5, "adsco", Purpose::Advertising, Decision::Withdraw).encode(), &[0; 64], 10)
            .await
            .expect("record");
        for seq in [5, 4, 1] {
            let err =
                r.record(&statement(seq, "adsco", Purpose::Advertising, Decision::Grant).encode(), &[0; 64], 11).await;
            assert!(matches!(err, Err(RegistryError::Rejected(ConsentError::StaleSequence { .. }))), "{seq}");
        }
        let a = AccountId([1; 16]);
        let latest = r.latest_for(&a, Purpose::Advertising, "adsco").await.expect("get").expect("present");
        assert_eq!(latest.statement.decision, Decision::Withdraw, "the replayed grant did not override");
    }

    /// Runs every test, each on a fresh, empty store from `fresh`.
    pub(crate) async fn run_all(fresh: &dyn Fn() -> ConsentRegistry) {
        latest_per_pair_wins_and_history_keeps_everything(&fresh()).await;
        changes_page_through_every_account_in_recording_order(&fresh()).await;
        replayed_or_reordered_statements_are_refused(&fresh()).await;
    }
}

#[cfg(any(test, feature = "conformance"))]
pub mod erasures {
    //! The [`crate::store::ErasureStore`] suite (public with the `conformance` feature: the JetStream feed runs it
    //! on a real cluster).

    use relay_proto::AccountId;

    use crate::store::{Erasure, Erasures};

    fn erasure(n: u8) -> Erasure {
        Erasure {
            account: AccountId([n; 16]),
            identity_key: [n; 32],
            recorded_at_ms: u64::from(n),
            signature: [n; 64],
            signed: vec![n; 3],
        }
    }

    /// Cursors start at 1 and follow recording order; pages are bounded; an erased account is marked. `feed`
    /// must be empty.
    pub async fn erasures_page_in_order_and_mark_the_account(feed: &Erasures) {
        assert_eq!(feed.record(&erasure(1)).await.expect("record"), 1);
        assert_eq!(feed.record(&erasure(2)).await.expect("record"), 2);
        assert_eq!(feed.changes(0, 10).await.expect("changes"), [(1, erasure(1)), (2, erasure(2))]);
        assert_eq!(feed.changes(1, 10).await.expect("changes"), [(2, erasure(2))]);
        assert_eq!(feed.changes(0, 1).await.expect("changes").len(), 1);
        assert!(feed.changes(u64::MAX, 10).await.expect("changes").is_empty());
        assert!(feed.erased(&AccountId([1; 16])).await.expect("erased"));
        assert!(!feed.erased(&AccountId([3; 16])).await.expect("erased"));
    }

    /// Runs every test, each on a fresh, empty store from `fresh`.
    pub async fn run_all(fresh: &dyn Fn() -> Erasures) {
        erasures_page_in_order_and_mark_the_account(&fresh()).await;
    }
}

#[cfg(any(test, feature = "conformance"))]
pub mod notices {
    //! The [`crate::store::NoticeStore`] suite (public with the `conformance` feature: the JetStream notices run it
    //! on a real cluster). Each test needs an empty store.

    use relay_proto::consent::Purpose;
    use relay_proto::notice::{Field, Notice, Retention, notice_hash};

    use crate::store::{NoticeStoreError, Notices, Published};

    fn notice(affiliate: &str, purpose: Purpose, fields: Vec<Field>, version: u32) -> Vec<u8> {
        Notice {
            version,
            affiliate: affiliate.into(),
            legal_name: "Some Company SA".into(),
            country: "FR".into(),
            purpose,
            fields,
            retention: Retention::Days(30),
        }
        .encode()
        .expect("valid notice")
    }

    /// A publication replaces the current set whole; every document ever published stays readable by hash.
    pub async fn the_published_set_replaces_the_current_one_and_old_documents_stay_readable(n: &Notices) {
        let ads_v1 = notice("adsco", Purpose::Advertising, vec![Field::DeviceModel], 1);
        let sec = notice("shieldco", Purpose::Security, vec![Field::Phone], 1);
        assert_eq!(
            n.publish(&[ads_v1.clone(), sec.clone()]).await.expect("publish"),
            Published { new_documents: 2, current: 2 }
        );
        assert_eq!(n.current("adsco", Purpose::Advertising).await.expect("read"), Some(ads_v1.clone()));
        assert_eq!(n.current_hash("adsco", Purpose::Analytics).await.expect("read"), None);
        assert_eq!(n.current_count().await.expect("count"), 2);

        let ads_v2 = notice("adsco", Purpose::Advertising, vec![Field::Phone, Field::DeviceModel], 2);
        assert_eq!(
            n.publish(std::slice::from_ref(&ads_v2)).await.expect("publish"),
            Published { new_documents: 1, current: 1 }
        );
        assert_eq!(n.current_hash("adsco", Purpose::Advertising).await.expect("read"), Some(notice_hash(&ads_v2)));
        assert_eq!(n.current_hash("shieldco", Purpose::Security).await.expect("read"), None, "left the set: no notice");
        assert_eq!(n.current_count().await.expect("count"), 1);
        assert_eq!(
            n.by_hash(&notice_hash(&ads_v1)).await.expect("read"),
            Some(ads_v1),
            "the old version stays readable"
        );
        assert_eq!(n.publish(&[ads_v2]).await.expect("again"), Published { new_documents: 0, current: 1 });
    }

    /// Non-canonical documents and two documents for one pair are refused, and change nothing.
    pub async fn only_canonical_documents_one_per_pair_are_published(n: &Notices) {
        let good = notice("adsco", Purpose::Advertising, vec![Field::DeviceModel], 1);
        let mut bad = good.clone();
        bad.push(b'\n');
        assert!(matches!(n.publish(&[good.clone(), bad]).await, Err(NoticeStoreError::Invalid { index: 1, .. })));
        let other = notice("adsco", Purpose::Advertising, vec![Field::Os], 2);
        assert!(matches!(n.publish(&[good, other]).await, Err(NoticeStoreError::Duplicate { .. })));
        assert_eq!(
            n.current_hash("adsco", Purpose::Advertising).await.expect("read"),
            None,
            "a refused set changes nothing"
        );
    }

    /// Runs every test, each on a fresh, empty store from `fresh`.
    pub async fn run_all(fresh: &dyn Fn() -> Notices) {
        the_published_set_replaces_the_current_one_and_old_documents_stay_readable(&fresh()).await;
        only_canonical_documents_one_per_pair_are_published(&fresh()).await;
    }
}

#[cfg(any(test, feature = "conformance"))]
pub mod verification {
    //! The [`crate::store::VerificationStore`] suite (public with the `conformance` feature: the JetStream bucket
    //! runs it on a real cluster). Each test needs an empty store.

    use relay_proto::AccountId;
    use relay_proto::verification::{CODE_ATTEMPTS, CODE_TTL_MS, VerificationCode};

    use crate::store::Verifications;
    use crate::verify::code::{Attempt, CodeKey, PendingCode, PhoneTag, RequestId};
    use crate::verify::lock::Lock;

    /// A new request replaces the pending one; attempts are counted in the store, then the code is dropped.
    pub async fn a_new_request_replaces_the_pending_one_and_attempts_are_counted_in_the_store(s: &Verifications) {
        let key = CodeKey::from_bytes(&[1; 32]);
        let phone = PhoneTag([5; 32]);
        let code = VerificationCode::parse("111111").expect("code");
        let first = PendingCode::new(&key, RequestId([1; 16]), &code, 0);
        assert_eq!(s.replace_pending(&phone, &first).await.expect("put"), None);
        let second = PendingCode::new(&key, RequestId([2; 16]), &code, 0);
        assert_eq!(s.replace_pending(&phone, &second).await.expect("put"), Some(first));
        assert_eq!(s.pending_request(&phone).await.expect("read"), Some(RequestId([2; 16])));
        assert!(!s.remove_pending(&phone, &RequestId([1; 16])).await.expect("remove"), "an older id leaves it alone");

        for left in (0..CODE_ATTEMPTS).rev() {
            let got = s.attempt(&phone, 1, &|_| false).await.expect("attempt");
            assert_eq!(got, Some((Attempt::Wrong { left }, RequestId([2; 16]))));
        }
        assert_eq!(s.attempt(&phone, 1, &|_| true).await.expect("attempt"), None, "used up: dropped");
        assert_eq!(s.pending().await, 0);

        s.replace_pending(&phone, &second).await.expect("put");
        assert_eq!(s.sweep_expired(CODE_TTL_MS - 1).await.expect("sweep"), []);
        assert_eq!(s.sweep_expired(CODE_TTL_MS).await.expect("sweep"), [RequestId([2; 16])]);
        assert_eq!(s.pending().await, 0);
    }

    /// Registration locks are set, touched and removed.
    pub async fn locks_are_set_touched_and_removed(s: &Verifications) {
        let account = AccountId([3; 16]);
        s.touch(&account, 5).await.expect("touching an account without a lock does nothing");
        assert_eq!(s.lock(&account).await.expect("read"), None);
        let pin = relay_proto::verification::RegistrationPin::parse("0000").expect("pin");
        let lock = Lock::new(&pin, 10);
        s.set_lock(&account, Some(&lock)).await.expect("set");
        s.touch(&account, 20).await.expect("touch");
        assert_eq!(s.lock(&account).await.expect("read").map(|l| l.last_active_ms), Some(20));
        s.set_lock(&account, None).await.expect("remove");
        assert_eq!(s.lock(&account).await.expect("read"), None);
    }

    /// Runs every test, each on a fresh, empty store from `fresh`.
    pub async fn run_all(fresh: &dyn Fn() -> Verifications) {
        a_new_request_replaces_the_pending_one_and_attempts_are_counted_in_the_store(&fresh()).await;
        locks_are_set_touched_and_removed(&fresh()).await;
    }
}
