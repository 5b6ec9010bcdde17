//! Durable state of the relay, in one sled database under `<data_dir>/store`.
//!
//! One tree per concern, all named in [`trees`]. The message path ([`MailboxStore`]) and the directory
//! ([`Directory`]) share nothing but the database handle and the [`GroupCommit`] that makes their writes durable; the
//! message path reaches the directory only through [`Identities`], which holds the identity-keys tree alone.
//!
//! Every concern is reached through a trait of [`backend`] (held as `Arc<dyn …>`), so that a distributed engine can
//! serve it; the `Sled…` types here implement them, [`nats`] holds the JetStream implementations written so far
//! (mailboxes, erasures, notices, prekeys, verification codes, the fence's export leases and the durability barrier;
//! relayd does not open them yet), and `conformance` (test builds, or the `conformance` feature) holds the tests
//! every implementation passes. The export log's own tests still run against its sled implementation only.

pub mod backend;
pub mod commit;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod consent;
pub mod directory;
pub mod erasures;
pub mod exportlog;
pub mod mailbox;
pub mod nats;
pub mod notices;
pub mod prekeys;
pub mod roundlog;
pub mod verification;

use std::path::Path;
use std::sync::Arc;

pub use backend::{
    BackendError, BoxFuture, ConsentRegistry, ConsentStore, Directory, DirectoryStore, Durability, ErasureStore,
    Erasures, ExportLog, ExportLogStore, Identities, IdentityStore, LeaseStore, Leases, MailboxStore, NoticeStore,
    Notices, PrekeyStore, Prekeys, VerificationStore, Verifications,
};
pub use commit::{CommitError, GroupCommit};
pub use consent::{Recorded, RegistryError, SledConsentRegistry};
pub use directory::{AccountKeys, AccountProfile, Claim, DirectoryError, Registered, SledDirectory, SledIdentities};
pub use erasures::{Erasure, ErasureStoreError, SledErasures};
pub use exportlog::{CopyPage, ExportLogError, Listing, SledExportLog};
pub use mailbox::{Appended, MailboxError, MailboxLimits, StoredEnvelope};
pub use notices::{NoticeStoreError, Published, SledNotices};
pub use prekeys::{Counts, PrekeyError, SledPrekeys, Taken};
pub use roundlog::RoundMailboxes;
pub use verification::{SledVerifications, VerificationStoreError};

/// Names of the sled trees. Nothing else in the relay opens a tree.
pub mod trees {
    /// Round records and removal records of the mailboxes (see `store::roundlog`); entries of the layout before
    /// it (`recipient (16) ‖ server id (8)` → `stored_at_ms ‖ expires_at_ms ‖ envelope`) are converted at open.
    pub const MAILBOXES: &str = "mailboxes";
    /// `account id` → `identity key (32) ‖ sealing key (32) ‖ binding signature (64)`: all that authentication
    /// and routing need (records written before bindings existed lack the signature).
    pub const IDENTITIES: &str = "identities";
    /// `account id` → profile record (phone, device info). Never read by the message path.
    pub const PROFILES: &str = "profiles";
    /// `E.164 phone` → `account id`.
    pub const PHONES: &str = "phones";
    /// `phone tag (HMAC of the number)` → pending verification code (tag of the code, expiry, attempts left); no
    /// phone number, no code (see `store::verification`).
    pub const VERIFICATION_CODES: &str = "verification_codes";
    /// `account id` → registration lock (PBKDF2 verifier of the PIN, last activity); no PIN.
    pub const REGISTRATION_LOCKS: &str = "registration_locks";
    /// `account id ‖ kind [‖ key id]` → public prekey (and signature).
    pub const PREKEYS: &str = "prekeys";
    /// `account id` → SHA-256 of the account's sealed-sender access key.
    pub const ACCESS_KEYS: &str = "access_keys";
    /// Consent statements: last sequence, latest per (affiliate, purpose), full history, global recording order
    /// (see `store::consent`).
    pub const CONSENT: &str = "consent";
    /// Accounts whose phone number or device info changed, in order (see `store::directory`).
    pub const SUBJECT_CHANGES: &str = "subject_changes";
    /// The relay's copy of the exporter's Merkle export log, indexed by account (see `store::exportlog`).
    pub const EXPORT_LOG: &str = "export_log";
    /// Notice documents by hash, and the current notice per (affiliate, purpose) (see `store::notices`).
    pub const NOTICES: &str = "notices";
    /// Export leases not yet released: `b'l' ‖ lease id (8, big-endian)` → pair, and `next` → the last lease id
    /// (see `fence`).
    pub const EXPORT_LEASES: &str = "export_leases";
    /// Accepted `DeleteAccount` requests, append-only, in order: what the exporter's erasure feed reads (see
    /// `store::erasures`).
    pub const ERASURES: &str = "erasures";
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// sled refused (another relay may be using the directory).
    #[error(transparent)]
    Sled(#[from] sled::Error),
    /// The export log does not load.
    #[error(transparent)]
    ExportLog(#[from] ExportLogError),
    /// The export leases do not load.
    #[error(transparent)]
    Fence(#[from] crate::fence::FenceError),
    /// The mailboxes do not load.
    #[error(transparent)]
    Mailboxes(#[from] MailboxError),
}

/// The opened store.
pub struct Store {
    /// Per-recipient queues of opaque envelopes.
    pub mailboxes: Arc<dyn MailboxStore>,
    /// Accounts, keys, phone numbers and device info.
    pub directory: Directory,
    /// Published prekeys and access keys.
    pub prekeys: Prekeys,
    /// Signed consent statements.
    pub consent: ConsentRegistry,
    /// The exporter's published export log.
    pub export_log: ExportLog,
    /// The exporter's published notices.
    pub notices: Notices,
    /// Pending verification codes and registration locks.
    pub verifications: Verifications,
    /// Durability barrier shared by every write that is acknowledged to a client.
    pub commit: Arc<GroupCommit>,
    /// Export leases (the withdrawal fence), kept across restarts.
    pub fence: Leases,
    /// Accepted erasure requests.
    pub erasures: Erasures,
}

impl Store {
    /// Opens (or creates) the store in `dir`. Must be called inside a tokio runtime: it starts the flusher task.
    pub fn open(dir: &Path, limits: MailboxLimits) -> Result<Self, OpenError> {
        let db = sled::Config::new().path(dir).open()?;
        let rounds = Arc::new(RoundMailboxes::open(db.open_tree(trees::MAILBOXES)?, db.clone(), limits)?);
        let directory: Directory = Arc::new(SledDirectory::new(
            db.open_tree(trees::IDENTITIES)?,
            db.open_tree(trees::PROFILES)?,
            db.open_tree(trees::PHONES)?,
            db.open_tree(trees::SUBJECT_CHANGES)?,
        ));
        let prekeys: Prekeys =
            Arc::new(SledPrekeys::new(db.open_tree(trees::PREKEYS)?, db.open_tree(trees::ACCESS_KEYS)?));
        let consent: ConsentRegistry = Arc::new(SledConsentRegistry::new(db.open_tree(trees::CONSENT)?));
        let export_log: ExportLog = Arc::new(SledExportLog::open(db.open_tree(trees::EXPORT_LOG)?)?);
        let notices: Notices = Arc::new(SledNotices::new(db.open_tree(trees::NOTICES)?));
        let verifications: Verifications = Arc::new(SledVerifications::new(
            db.open_tree(trees::VERIFICATION_CODES)?,
            db.open_tree(trees::REGISTRATION_LOCKS)?,
        ));
        let fence = crate::fence::Fence::open(
            db.open_tree(trees::EXPORT_LEASES)?,
            std::time::Instant::now(),
            crate::fence::LEASE_TTL,
        )?;
        let erasures: Erasures = Arc::new(SledErasures::new(db.open_tree(trees::ERASURES)?));
        let sealer = rounds.clone();
        let commit = GroupCommit::start_with(db, Some(Box::new(move || sealer.seal())));
        rounds.attach(&commit);
        let mailboxes: Arc<dyn MailboxStore> = rounds;
        Ok(Self {
            mailboxes,
            directory,
            prekeys,
            consent,
            export_log,
            notices,
            verifications,
            commit,
            fence: Arc::new(fence) as Leases,
            erasures,
        })
    }
}
