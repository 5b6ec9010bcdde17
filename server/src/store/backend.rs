//! The storage traits: one per concern the relay persists, so that the embedded sled store and a distributed engine
//! can serve the same relay (DESIGN.md "Storage").
//!
//! Contract shared by every implementation:
//! - Methods are async and may be slow (a network round trip for a distributed engine); none blocks a runtime
//!   worker for long (a long walk yields now and then).
//! - A write is not acknowledged to a client until the store's durability barrier ([`crate::store::GroupCommit`]
//!   for sled) has covered it, unless the method says the write is durable when it returns.
//! - Every method that touches a mailbox takes the account from its caller (the authenticated account): no method
//!   lets one account read or remove another's entries.
//! - Failures of the engine itself are [`BackendError`]s: the relay answers `STORAGE_UNAVAILABLE` and acknowledges
//!   nothing; they never carry message contents or phone numbers.
//!
//! `crate::store::conformance` (test builds) holds the tests every implementation must pass.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use relay_proto::consent::{ConsentStatement, Purpose};
use relay_proto::merkle::SignedTreeHead;
use relay_proto::wire::{DeviceInfo, KemPrekey, OneTimePrekey, SignedPrekey};
use relay_proto::witness::Cosignature;
use relay_proto::{AccountId, PhoneNumber};

use super::commit::CommitError;
use super::consent::{Recorded, RegistryError};
use super::directory::{AccountKeys, AccountProfile, Claim, DirectoryError, Registered};
use super::erasures::{Erasure, ErasureStoreError};
use super::exportlog::{CopyPage, ExportLogError, Listing};
use super::mailbox::{Appended, MailboxError, StoredEnvelope};
use super::notices::{NoticeStoreError, Published};
use super::prekeys::{Counts, PrekeyError, Taken};
use super::verification::VerificationStoreError;
use crate::fence::{FenceError, LeaseId, Pair};
use crate::verify::code::{Attempt, PendingCode, PhoneTag, RequestId};
use crate::verify::lock::Lock;

/// A boxed future, so that the traits can be used as `dyn` objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The storage engine failed (I/O, a lost quorum, a corrupt record). Its text names the engine's error, never the
/// data.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

impl From<sled::Error> for BackendError {
    fn from(e: sled::Error) -> Self {
        Self(format!("sled: {e}"))
    }
}

/// Per-recipient queues of opaque envelopes.
///
/// Ids are assigned by the store: at least 1, unique across all mailboxes and never reused; within one mailbox they
/// increase, across restarts too, and entries become visible to [`MailboxStore::scan`] in id order, so a reader
/// that follows a mailbox with a cursor never passes over an entry. Appends are checked against the mailbox's
/// message quota, and against its byte quota where the backend enforces one (sled does; JetStream cannot, see
/// [`crate::store::nats::mailbox`]), and refused with [`MailboxError::QuotaExceeded`] when it is reached. Expiry
/// follows the `now_ms` the relay passes: expired entries are never returned by a scan.
pub trait MailboxStore: Send + Sync {
    /// Stores `envelope` for `recipient`, stamped `now_ms`.
    fn append<'a>(
        &'a self,
        recipient: &'a AccountId,
        envelope: &'a [u8],
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Appended, MailboxError>>;

    /// Up to `limit` unexpired entries of `recipient` with ids above `after`, oldest first; it stops once the
    /// envelopes read add up to `max_bytes` or more (returning at least one entry if there is one).
    fn scan<'a>(
        &'a self,
        recipient: &'a AccountId,
        after: u64,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEnvelope>, MailboxError>>;

    /// Removes the listed entries from `recipient`'s own mailbox; ids that are not there are ignored. Returns how
    /// many were removed. A removal lost in a crash means a redelivery, which clients de-duplicate.
    fn remove<'a>(&'a self, recipient: &'a AccountId, ids: &'a [u64]) -> BoxFuture<'a, Result<u32, MailboxError>>;

    /// Removes every entry of `recipient`'s mailbox (the account is erased); returns how many.
    fn purge<'a>(&'a self, recipient: &'a AccountId) -> BoxFuture<'a, Result<u64, MailboxError>>;

    /// Removes every expired entry; returns how many.
    fn sweep_expired(&self, now_ms: u64) -> BoxFuture<'_, Result<u64, MailboxError>>;

    /// Entries queued for `recipient`.
    fn depth<'a>(&'a self, recipient: &'a AccountId) -> BoxFuture<'a, Result<u64, MailboxError>>;

    /// Entries queued in all mailboxes, as far as this node knows (for metrics).
    fn queued(&self) -> u64;
}

/// The durability barrier: [`Durability::durable`] returns once every write applied before the call is durable
/// (a group-commit flush for sled), or fails if it may not be. Nothing is acknowledged to a client before it.
pub trait Durability: Send + Sync {
    /// Waits until every write applied before this call is durable.
    fn durable(&self) -> BoxFuture<'_, Result<(), CommitError>>;
}

/// The identity keys alone: what authentication and routing need, and all the message path may hold. It has no way
/// to reach a phone number or device info (invariant 2: a type fact).
pub trait IdentityStore: Send + Sync {
    /// Public keys of `account`, if it exists.
    fn keys<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<AccountKeys>, DirectoryError>>;

    /// Whether `account` exists.
    fn exists<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<bool, DirectoryError>>;
}

/// A handle on the identity keys alone.
pub type Identities = Arc<dyn IdentityStore>;

/// The directory: accounts, their public keys, phone numbers and device info. A phone number maps to at most one
/// account, whatever the number of relay nodes writing at once; a registration and the takeover it may imply
/// (removing the account that held the number) happen together or not at all.
pub trait DirectoryStore: Send + Sync {
    /// A handle on the identity keys alone, for code that must not read personal data.
    fn identities(&self) -> Identities;

    /// Creates the account of `keys.identity_key`, or updates its sealing key, phone and device info, on the
    /// grounds of `claim` (see [`Claim`]); a changed number or device is recorded as a subject change. Not yet
    /// durable: await the durability barrier before acknowledging.
    fn register<'a>(
        &'a self,
        keys: AccountKeys,
        phone: &'a PhoneNumber,
        device: DeviceInfo,
        now_ms: u64,
        claim: Claim,
    ) -> BoxFuture<'a, Result<Registered, DirectoryError>>;

    /// Public keys of `account`, if it exists.
    fn keys<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<AccountKeys>, DirectoryError>>;

    /// The profile (phone number and device info) of `account`, if it exists. Personal data: only the export
    /// interface and the account's own session read it, never the message path.
    fn profile<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<AccountProfile>, DirectoryError>>;

    /// Up to `limit` accounts whose phone number or device info changed after cursor `after` (0: from the start),
    /// oldest first, each with its cursor; cursors become visible in order.
    fn subject_changes(&self, after: u64, limit: usize)
    -> BoxFuture<'_, Result<Vec<(u64, AccountId)>, DirectoryError>>;

    /// Removes `account`: its keys, its profile and its number's mapping (the number can then be registered
    /// again). Returns the number it held, if any. Not yet durable.
    fn remove<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<PhoneNumber>, DirectoryError>>;

    /// The account registered with `phone` and its keys.
    fn lookup<'a>(
        &'a self,
        phone: &'a PhoneNumber,
    ) -> BoxFuture<'a, Result<Option<(AccountId, AccountKeys)>, DirectoryError>>;
}

/// A handle on the directory.
pub type Directory = Arc<dyn DirectoryStore>;

/// Published public prekeys and sealed-sender access-key verifiers. Keys are stored as opaque, size-checked bytes;
/// a one-time prekey is handed out at most once, even to fetches racing on several nodes.
pub trait PrekeyStore: Send + Sync {
    /// Stores what `account` uploads (size-checked, pools bounded); the counts after it. Not yet durable.
    fn upload<'a>(
        &'a self,
        account: &'a AccountId,
        signed: Option<&'a SignedPrekey>,
        one_time: &'a [OneTimePrekey],
        kem: &'a [KemPrekey],
        last_resort: Option<&'a KemPrekey>,
    ) -> BoxFuture<'a, Result<Counts, PrekeyError>>;

    /// How many prekeys `account` has published.
    fn counts<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Counts, PrekeyError>>;

    /// A bundle for a new session with `account`: its signed prekey, one one-time prekey (removed), one one-time
    /// KEM prekey (removed) or the last-resort one. `None` if it published no signed prekey.
    fn take_bundle<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<Taken>, PrekeyError>>;

    /// Sets the SHA-256 of `account`'s sealed-sender access key. Not yet durable.
    fn set_access_verifier<'a>(
        &'a self,
        account: &'a AccountId,
        verifier: &'a [u8],
    ) -> BoxFuture<'a, Result<(), PrekeyError>>;

    /// Removes every prekey and the access key of `account` (erasure, takeover). Not yet durable.
    fn forget<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<(), PrekeyError>>;

    /// Whether `access_key` is `account`'s sealed-sender access key (false when none is set).
    fn access_allowed<'a>(
        &'a self,
        account: &'a AccountId,
        access_key: &'a [u8],
    ) -> BoxFuture<'a, Result<bool, PrekeyError>>;
}

/// A handle on the prekeys.
pub type Prekeys = Arc<dyn PrekeyStore>;

/// The consent registry: every consent statement an account signed, the latest per (affiliate, purpose), and one
/// global recording order that the export interface pages through (cursors become visible in order). Sequence
/// numbers strictly increase per account, whichever node records them, so a replayed or reordered statement never
/// overrides a later one.
pub trait ConsentStore: Send + Sync {
    /// Records a statement whose signature was verified over `encoded`, the bytes as received, which are what is
    /// stored (never a re-encoding); refuses one that does not decode or whose sequence number is not above the
    /// account's last. Not yet durable: await the group commit before acknowledging.
    fn record<'a>(
        &'a self,
        encoded: &'a [u8],
        signature: &'a [u8; 64],
        now_ms: u64,
    ) -> BoxFuture<'a, Result<ConsentStatement, RegistryError>>;

    /// The highest sequence number recorded for `account` (0 if none).
    fn last_sequence<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<u64, RegistryError>>;

    /// The latest statement of `account` for every pair it ever decided on.
    fn latest<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Vec<Recorded>, RegistryError>>;

    /// The latest statement of `account` for one pair, if any.
    fn latest_for<'a>(
        &'a self,
        account: &'a AccountId,
        purpose: Purpose,
        affiliate: &'a str,
    ) -> BoxFuture<'a, Result<Option<Recorded>, RegistryError>>;

    /// Up to `limit` statements of any account recorded after `after` (a cursor; 0 for the start), in recording
    /// order, each with its cursor.
    fn changes(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<(u64, Recorded)>, RegistryError>>;

    /// Up to `limit` statements of `account` with a sequence number above `after_sequence`, oldest first, and whether
    /// others follow.
    fn history_page<'a>(
        &'a self,
        account: &'a AccountId,
        after_sequence: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<(Vec<Recorded>, bool), RegistryError>>;

    /// Every statement of `account`, in sequence order.
    fn history<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Vec<Recorded>, RegistryError>>;
}

/// A handle on the consent registry.
pub type ConsentRegistry = Arc<dyn ConsentStore>;

/// Accepted DeleteAccount requests, append-only, in recording order: what the exporter's erasure feed pages
/// through (cursors become visible in order).
pub trait ErasureStore: Send + Sync {
    /// Appends `erasure`; its cursor. Not yet durable: await the group commit before deleting anything.
    fn record<'a>(&'a self, erasure: &'a Erasure) -> BoxFuture<'a, Result<u64, ErasureStoreError>>;

    /// Whether `account` was ever erased (its identity key may not register again).
    fn erased<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<bool, ErasureStoreError>>;

    /// Up to `limit` erasures recorded after cursor `after` (0: from the start), oldest first, with their cursors.
    fn changes(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<(u64, Erasure)>, ErasureStoreError>>;
}

/// A handle on it (see [`ErasureStore`]).
pub type Erasures = Arc<dyn ErasureStore>;

/// The exporter's published notice documents, by hash (kept for ever, so old statements stay checkable), and the
/// current notice per (affiliate, purpose).
pub trait NoticeStore: Send + Sync {
    /// Stores every document of `documents` and makes them the complete current set. Not durable until the next
    /// group commit.
    fn publish<'a>(&'a self, documents: &'a [Vec<u8>]) -> BoxFuture<'a, Result<Published, NoticeStoreError>>;

    /// How many pairs have a current notice.
    fn current_count(&self) -> BoxFuture<'_, Result<usize, NoticeStoreError>>;

    /// The current notice hash of the pair, if the exporter published one.
    fn current_hash<'a>(
        &'a self,
        affiliate: &'a str,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Option<[u8; 32]>, NoticeStoreError>>;

    /// The current notice document of the pair.
    fn current<'a>(
        &'a self,
        affiliate: &'a str,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, NoticeStoreError>>;

    /// The document whose SHA-256 is `hash`, current or not.
    fn by_hash<'a>(&'a self, hash: &'a [u8; 32]) -> BoxFuture<'a, Result<Option<Vec<u8>>, NoticeStoreError>>;
}

/// A handle on it (see [`NoticeStore`]).
pub type Notices = Arc<dyn NoticeStore>;

/// The relay's copy of the exporter's Merkle export log: leaves indexed by account, the signed heads and the
/// witnesses' cosignatures. A publication is accepted only if it extends the log consistently under the same key;
/// what the relay serves to users is always a prefix the exporter signed.
pub trait ExportLogStore: Send + Sync {
    /// Number of leaves held.
    fn len(&self) -> BoxFuture<'_, u64>;

    /// Whether no leaf was published.
    fn is_empty(&self) -> BoxFuture<'_, bool>;

    /// Appends `entries` at `first_index` with the exporter's `head` over the result. Returns the log size afterwards;
    /// if `first_index` is not the current size, nothing is written and the current size is returned, so that the
    /// exporter resumes from it. Not yet durable: the caller awaits the group commit.
    fn publish<'a>(
        &'a self,
        first_index: u64,
        entries: &'a [(AccountId, Vec<u8>)],
        head: &'a SignedTreeHead,
        key: &'a VerifyingKey,
        cosignatures: &'a [Cosignature],
    ) -> BoxFuture<'a, Result<u64, ExportLogError>>;

    /// The witnesses' cosignatures of the head of size `size`.
    fn cosignatures(&self, size: u64) -> BoxFuture<'_, Result<Vec<Cosignature>, ExportLogError>>;

    /// `head` as sent on the wire, with the cosignatures the relay holds for it.
    fn wire_head<'a>(
        &'a self,
        head: &'a SignedTreeHead,
    ) -> BoxFuture<'a, Result<relay_proto::wire::SignedTreeHead, ExportLogError>>;

    /// The whole log from `start`: at most `max_entries` entries whose leaves total at most `max_bytes` (at least
    /// one entry if any is asked for and there is one), with the heads over them, the size, the key and the latest
    /// head. Read under the state's lock, so one page never mixes two publications.
    fn copy(&self, start: u64, max_entries: usize, max_bytes: usize)
    -> BoxFuture<'_, Result<CopyPage, ExportLogError>>;

    /// `account`'s entries from `start_index`, at most `limit`, with audit paths to the head of size `tree_size` (0:
    /// the latest head), and a consistency proof from `since_size` (0: none).
    fn list<'a>(
        &'a self,
        account: &'a AccountId,
        tree_size: u64,
        start_index: u64,
        since_size: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Listing, ExportLogError>>;
}

/// A handle on the export log copy.
pub type ExportLog = Arc<dyn ExportLogStore>;

/// Pending verification codes (keyed by a phone tag, never the number) and registration locks. An attempt is
/// checked and counted in one step, so concurrent guesses cannot exceed the attempts a code allows.
pub trait VerificationStore: Send + Sync {
    /// Stores `pending` as `phone`'s code; returns the request it replaced, if any. Not yet durable.
    fn replace_pending<'a>(
        &'a self,
        phone: &'a PhoneTag,
        pending: &'a PendingCode,
    ) -> BoxFuture<'a, Result<Option<PendingCode>, VerificationStoreError>>;

    /// One use of `phone`'s pending code at `now_ms`; `matches` says whether the code given is the pending one.
    /// `None` when no code is pending. The request id is returned with the answer so that its file can go when
    /// the request is dropped.
    fn attempt<'a>(
        &'a self,
        phone: &'a PhoneTag,
        now_ms: u64,
        matches: &'a (dyn Fn(&PendingCode) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<Option<(Attempt, RequestId)>, VerificationStoreError>>;

    /// Drops `phone`'s pending code if it is still request `id` (a newer request is left alone); whether it was.
    fn remove_pending<'a>(
        &'a self,
        phone: &'a PhoneTag,
        id: &'a RequestId,
    ) -> BoxFuture<'a, Result<bool, VerificationStoreError>>;

    /// The request whose code is pending for `phone`, if any.
    fn pending_request<'a>(
        &'a self,
        phone: &'a PhoneTag,
    ) -> BoxFuture<'a, Result<Option<RequestId>, VerificationStoreError>>;

    /// Removes whatever code is pending for `phone`; the request it belonged to, if any. Not yet durable.
    fn drop_pending<'a>(
        &'a self,
        phone: &'a PhoneTag,
    ) -> BoxFuture<'a, Result<Option<RequestId>, VerificationStoreError>>;

    /// Removes every pending code expired at `now_ms`; their request ids.
    fn sweep_expired(&self, now_ms: u64) -> BoxFuture<'_, Result<Vec<RequestId>, VerificationStoreError>>;

    /// Number of pending codes.
    fn pending(&self) -> BoxFuture<'_, usize>;

    /// `account`'s registration lock, if it set one.
    fn lock<'a>(&'a self, account: &'a AccountId) -> BoxFuture<'a, Result<Option<Lock>, VerificationStoreError>>;

    /// Sets (`Some`) or removes (`None`) `account`'s lock. Not yet durable.
    fn set_lock<'a>(
        &'a self,
        account: &'a AccountId,
        lock: Option<&'a Lock>,
    ) -> BoxFuture<'a, Result<(), VerificationStoreError>>;

    /// Records activity of `account` at `now_ms` if it has a lock (what keeps the lock holding). Not awaited
    /// durable: losing the latest activity in a crash leaves the one before, which only shortens the lock.
    fn touch<'a>(&'a self, account: &'a AccountId, now_ms: u64) -> BoxFuture<'a, Result<(), VerificationStoreError>>;
}

/// A handle on the pending codes and registration locks.
pub type Verifications = Arc<dyn VerificationStore>;

/// Export leases (the withdrawal fence, see `crate::fence`): the exporter takes a lease on a consent pair before
/// each delivery attempt; a withdrawal, once durable, waits until the pair has no unexpired lease, whichever node
/// took it. Leases survive restarts and lapse after their time to live; ids are never reused.
pub trait LeaseStore: Send + Sync {
    /// Takes a lease on `pair` for `ttl`: its id and until when it holds, on this process's monotonic clock. Take
    /// it before reading the registry; make it durable before telling the exporter.
    fn acquire(&self, pair: Pair, ttl: Duration) -> BoxFuture<'_, Result<(LeaseId, Instant), FenceError>>;

    /// Releases a lease (unknown or lapsed ids are ignored).
    fn release<'a>(&'a self, pair: &'a Pair, id: LeaseId) -> BoxFuture<'a, ()>;

    /// Waits until `pair` has no unexpired lease.
    fn wait_clear<'a>(&'a self, pair: &'a Pair) -> BoxFuture<'a, ()>;
}

/// A handle on the export leases.
pub type Leases = Arc<dyn LeaseStore>;
