//! The client's local state in its home directory (`--home`):
//!
//! - `identity.json` — secret keys (never logged);
//! - `profile.json` — phone number, device info, and once registered, the relay's address and pinned certificate;
//! - `contacts.json` — phone number → account id and public keys, as first looked up;
//! - `seen.json` — ids of the most recent received messages, for de-duplication;
//! - `held.json` — the text of messages held while a contact's identity change awaits the user;
//! - `prekeys.json`, `session-<account>.json`, `initial-messages.json` — end-to-end state (see `sessions`);
//! - `quarantine/` — envelopes that arrived and could not be opened, verified or decrypted, one file each (mode
//!   0600) with the reason, kept so that no message is lost without the user learning of it (see [`Quarantined`]);
//! - `lock` — empty; the one-writer lock (below).
//!
//! Contract:
//! - The home is mode 0700 and every file in it 0600, from creation on ([`Home::init`]); [`Home::secure`] tightens
//!   a home left looser by an older version.
//! - Every file is written to a temporary name, synced, renamed, and the directory synced
//!   (`relay_quic::durable_file`), so a crash or power loss leaves the old or the new version, never an older one.
//! - One writer at a time: whoever reads state in order to write it back (sessions, prekeys, contacts, seen ids,
//!   held messages, the access key, receipts) holds [`HomeLock`] from the read to the write, and reads again after
//!   taking it, since another process may have written meanwhile. The lock is an advisory `flock` on `lock`: it
//!   excludes other processes and other handles in this process alike, and the system drops it if the process
//!   dies. [`Home::lock`] waits at most [`LOCK_WAIT`] for it, saying so on the log, then refuses with
//!   [`HomeError::Busy`].

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_quic::durable_file::Access;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::identity::Identity;

/// Directory of the home that holds quarantined envelopes.
pub const QUARANTINE_DIR: &str = "quarantine";

/// How many received message and envelope ids are remembered for de-duplication.
pub const SEEN_CAPACITY: usize = 20_000;
/// The lock file in the home.
pub const LOCK_FILE: &str = "lock";
/// How long [`Home::lock`] waits for another process to release the home before refusing.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);
/// How often a waiting [`Home::lock`] tries again.
const LOCK_RETRY: Duration = Duration::from_millis(20);

/// Why local state could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HomeError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file does not parse.
    #[error("{path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
    /// The home has not been initialised.
    #[error("no identity in {0}: run `relay --home {0} init --phone +...` first")]
    NotInitialised(PathBuf),
    /// The home already has an identity.
    #[error("{0} already holds an identity; refusing to overwrite it")]
    AlreadyInitialised(PathBuf),
    /// The home has no relay yet.
    #[error("not registered with a relay: run `relay register --server ADDR --cert-sha256 HEX` first")]
    NotRegistered,
    /// Another process (or another client in this one) held the home's lock for longer than the wait allowed.
    #[error(
        "{} is in use by another relay client (it holds {}); gave up after {} s: try again once it has finished",
        dir.display(), dir.join(LOCK_FILE).display(), waited.as_secs_f32()
    )]
    Busy {
        /// The home.
        dir: PathBuf,
        /// How long this process waited.
        waited: Duration,
    },
}

/// Exclusive use of a home's state by its holder; released when dropped (or when the process dies). See the module
/// header for who must hold it.
#[derive(Debug)]
pub struct HomeLock {
    _file: std::fs::File,
}

/// Device information reported at registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Device model.
    pub model: String,
    /// Operating system.
    pub os: String,
    /// Client version.
    pub app_version: String,
}

/// The relay this home is registered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// `ip:port`.
    pub server: String,
    /// Pinned certificate SHA-256, hex.
    pub cert_sha256: String,
    /// The relay's pinned sender-certificate key (Ed25519), hex: set at registration (homes registered before
    /// sender certificates existed pin it at their next connection).
    #[serde(default)]
    pub sender_certificate_key: Option<String>,
}

/// `profile.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Own phone number (E.164).
    pub phone: String,
    /// Own device.
    pub device: Device,
    /// The relay, once registered.
    pub relay: Option<RelayInfo>,
}

/// A contact in `contacts.json`: the identity first seen for a phone number (trust on first use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// Account id, hex.
    pub account_id: String,
    /// Ed25519 identity key, hex.
    pub identity_key: String,
    /// X25519 identity DH key (sealed envelopes are encrypted to it), hex.
    pub sealing_key: String,
    /// The identity key's signature binding the sealing key to it, hex, as verified when the directory returned it
    /// (empty in contacts saved before bindings existed: those are looked up and verified again before use).
    #[serde(default)]
    pub sealing_key_signature: String,
    /// A different identity now registered for this phone number, not yet accepted by the user. While it is set,
    /// messages to this contact are held.
    #[serde(default)]
    pub changed: Option<ChangedIdentity>,
    /// When the directory last confirmed this identity for the number (ms since the Unix epoch).
    #[serde(default)]
    pub checked_at: u64,
}

/// A new identity seen for a contact's phone number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedIdentity {
    /// New account id, hex.
    pub account_id: String,
    /// New Ed25519 identity key, hex.
    pub identity_key: String,
    /// New X25519 identity DH key, hex.
    pub sealing_key: String,
    /// Its binding signature by the new identity key, hex (verified).
    #[serde(default)]
    pub sealing_key_signature: String,
}

/// An envelope that arrived and could not be opened, verified or decrypted, as kept in `quarantine/` and reported
/// (`relay recv --json` prints the first three fields as they are named here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// Why it was refused.
    pub error: String,
    /// The relay's id for the envelope.
    pub server_id: u64,
    /// When the relay stored it (ms since the Unix epoch).
    pub stored_at: u64,
    /// When this device set it aside (ms since the Unix epoch).
    pub quarantined_at: u64,
    /// The envelope, hex, for a later look (it may be a message a newer client can read).
    pub envelope: String,
}

/// A message held because the recipient's identity changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMessage {
    /// Recipient phone number.
    pub to: String,
    /// The text.
    pub text: String,
    /// When it was held (ms since the Unix epoch).
    pub held_at: u64,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    identity_secret: String,
    sealing_secret: String,
    /// This account's sealed-sender access key (shared with contacts inside encrypted messages).
    access_key: String,
}

/// Whether a received message is new, by its id and its sender's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Neither its id is remembered nor is it older than anything forgotten of its sender.
    New,
    /// Its id is remembered: a redelivery or a replay.
    Duplicate,
    /// Not newer than a message of the same sender whose id the bounded list already forgot: it may be a replay
    /// of that one, and cannot be told apart from it.
    Stale,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum SeenEntry {
    /// A message: its id, its sender's account (hex) and when the sender wrote it.
    Message(String, String, u64),
    /// An envelope key, or any id recorded without a sender (also every entry of files written before senders
    /// were recorded).
    Id(String),
}

impl SeenEntry {
    fn id(&self) -> &str {
        match self {
            Self::Message(id, ..) | Self::Id(id) => id,
        }
    }
}

/// Ids of received messages, oldest first, bounded to [`SEEN_CAPACITY`]. De-duplication survives the bound: when a
/// message id is forgotten, its send time is kept for its sender, and that sender's messages no newer than it are
/// refused as [`Freshness::Stale`] (send times come from the sender's clock, inside the encrypted content, so a
/// relay cannot change them; a sender's own clock is compared only with itself).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Seen {
    order: VecDeque<SeenEntry>,
    /// Per sender (account, hex): the newest send time among its forgotten message ids.
    #[serde(default)]
    forgotten: BTreeMap<String, u64>,
    /// Send times at or below this are stale for every sender: raised when senders are dropped from `forgotten`
    /// to keep it bounded (the oldest first).
    #[serde(default)]
    floor: u64,
    #[serde(skip)]
    set: HashSet<String>,
}

impl Seen {
    /// Records `id` (an envelope key: no sender); false if it was already there.
    pub fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        self.push(SeenEntry::Id(id.to_owned()));
        true
    }

    /// Whether `id` was seen.
    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    /// Whether message `id` from `sender`, written at `sent_at_ms` by the sender's clock, is new.
    pub fn freshness(&self, id: &str, sender: &str, sent_at_ms: u64) -> Freshness {
        if self.set.contains(id) {
            return Freshness::Duplicate;
        }
        let forgotten = self.forgotten.get(sender).copied().unwrap_or(0).max(self.floor);
        if sent_at_ms <= forgotten && forgotten > 0 { Freshness::Stale } else { Freshness::New }
    }

    /// Records message `id` from `sender` written at `sent_at_ms`; false if it was not [`Freshness::New`].
    pub fn record(&mut self, id: &str, sender: &str, sent_at_ms: u64) -> bool {
        if self.freshness(id, sender, sent_at_ms) != Freshness::New {
            return false;
        }
        self.push(SeenEntry::Message(id.to_owned(), sender.to_owned(), sent_at_ms));
        true
    }

    fn push(&mut self, entry: SeenEntry) {
        self.set.insert(entry.id().to_owned());
        self.order.push_back(entry);
        while self.order.len() > SEEN_CAPACITY {
            let Some(old) = self.order.pop_front() else { break };
            self.set.remove(old.id());
            if let SeenEntry::Message(_, sender, at) = old {
                let newest = self.forgotten.entry(sender).or_insert(0);
                *newest = (*newest).max(at);
            }
        }
        // At most one sender per remembered entry; past that, fold the oldest watermark into the floor.
        while self.forgotten.len() > SEEN_CAPACITY {
            let Some((sender, at)) = self.forgotten.iter().min_by_key(|(_, at)| **at).map(|(s, a)| (s.clone(), *a))
            else {
                break;
            };
            self.forgotten.remove(&sender);
            self.floor = self.floor.max(at);
        }
    }
}

/// A client home directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// The home at `dir` (nothing is read yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The default home: `<config dir>/consent-relay`.
    pub fn default_dir() -> PathBuf {
        dirs::config_dir().unwrap_or_else(|| PathBuf::from(".")).join("consent-relay")
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates the home (mode 0700) with fresh keys and `profile`; refuses if it already holds an identity. Two
    /// processes initialising one home at once cannot both succeed: the identity file is created exclusively.
    pub fn init(&self, profile: &Profile) -> Result<Identity, HomeError> {
        let id_path = self.path("identity.json");
        if id_path.exists() {
            return Err(HomeError::AlreadyInitialised(self.dir.clone()));
        }
        relay_quic::durable_file::private_dir(&self.dir)
            .map_err(|source| HomeError::Io { path: self.dir.clone(), source })?;
        let identity = Identity::generate();
        let (a, b) = identity.secrets();
        let access_key: [u8; 32] = rand::random();
        let file = IdentityFile {
            identity_secret: hex::encode(a),
            sealing_secret: hex::encode(b),
            access_key: hex::encode(access_key),
        };
        let text =
            serde_json::to_vec_pretty(&file).map_err(|source| HomeError::Corrupt { path: id_path.clone(), source })?;
        match relay_quic::durable_file::create_secret(&id_path, &text) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(HomeError::AlreadyInitialised(self.dir.clone()));
            }
            Err(source) => return Err(HomeError::Io { path: id_path, source }),
        }
        self.save_profile(profile)?;
        Ok(identity)
    }

    /// Removes the home and everything in it (keys, profile, contacts, sessions, receipts, held and quarantined
    /// messages): what `relay account delete` does once the relay has erased the account.
    pub fn erase(&self) -> Result<(), HomeError> {
        std::fs::remove_dir_all(&self.dir).map_err(|source| HomeError::Io { path: self.dir.clone(), source })
    }

    /// Makes the home 0700 and every file in it 0600 (homes written by earlier versions left some files 0644 and
    /// the directory as the umask made it).
    pub fn secure(&self) -> Result<(), HomeError> {
        relay_quic::durable_file::restrict_tree(&self.dir)
            .map_err(|source| HomeError::Io { path: self.dir.clone(), source })
    }

    /// Takes the home's lock now, or `None` if another holder has it.
    pub fn try_lock(&self) -> Result<Option<HomeLock>, HomeError> {
        let path = self.path(LOCK_FILE);
        if !self.dir.is_dir() {
            return Err(HomeError::NotInitialised(self.dir.clone()));
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let file = opts.open(&path).map_err(|source| HomeError::Io { path: path.clone(), source })?;
        // Named in full: std's `File::try_lock` (Rust 1.89) would shadow the trait method.
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => Ok(Some(HomeLock { _file: file })),
            Err(fs4::TryLockError::WouldBlock) => Ok(None),
            Err(fs4::TryLockError::Error(source)) => Err(HomeError::Io { path, source }),
        }
    }

    /// Takes the home's lock, waiting up to [`LOCK_WAIT`] for another holder to release it.
    pub async fn lock(&self) -> Result<HomeLock, HomeError> {
        self.lock_within(LOCK_WAIT).await
    }

    /// Takes the home's lock, waiting up to `wait`; says once on the log (warning) that it is waiting.
    pub async fn lock_within(&self, wait: Duration) -> Result<HomeLock, HomeError> {
        let started = tokio::time::Instant::now();
        let mut said = false;
        loop {
            if let Some(lock) = self.try_lock()? {
                return Ok(lock);
            }
            let waited = started.elapsed();
            if waited >= wait {
                return Err(HomeError::Busy { dir: self.dir.clone(), waited });
            }
            if !said {
                tracing::warn!(
                    "{} is in use by another relay client; waiting up to {} s for it",
                    self.dir.display(),
                    wait.as_secs_f32()
                );
                said = true;
            }
            tokio::time::sleep(LOCK_RETRY.min(wait - waited)).await;
        }
    }

    /// Loads the keys.
    pub fn identity(&self) -> Result<Identity, HomeError> {
        let path = self.path("identity.json");
        if !path.exists() {
            return Err(HomeError::NotInitialised(self.dir.clone()));
        }
        let f: IdentityFile = self.read_json("identity.json")?;
        let decode = |s: &str| {
            let mut k = [0u8; 32];
            hex::decode_to_slice(s, &mut k)
                .map(|_| k)
                .map_err(|e| HomeError::Corrupt { path: path.clone(), source: serde::de::Error::custom(e.to_string()) })
        };
        Ok(Identity::from_secrets(decode(&f.identity_secret)?, decode(&f.sealing_secret)?))
    }

    /// This account's sealed-sender access key.
    pub fn access_key(&self) -> Result<[u8; 32], HomeError> {
        let path = self.path("identity.json");
        let f: IdentityFile = self.read_json("identity.json")?;
        let mut k = [0u8; 32];
        hex::decode_to_slice(&f.access_key, &mut k)
            .map_err(|e| HomeError::Corrupt { path, source: serde::de::Error::custom(e.to_string()) })?;
        Ok(k)
    }

    /// Replaces this account's access key with a fresh random one and returns it.
    pub fn rotate_access_key(&self) -> Result<[u8; 32], HomeError> {
        let mut f: IdentityFile = self.read_json("identity.json")?;
        let key: [u8; 32] = rand::random();
        f.access_key = hex::encode(key);
        self.write_json("identity.json", &f)?;
        Ok(key)
    }

    /// Loads the messages held for contacts whose identity changed.
    pub fn held(&self) -> Result<Vec<HeldMessage>, HomeError> {
        self.read_json_or_default("held.json")
    }

    /// Saves the held messages.
    pub fn save_held(&self, held: &[HeldMessage]) -> Result<(), HomeError> {
        self.write_json("held.json", &held)
    }

    /// Loads a private JSON document (`name` in the home), or its default when absent.
    pub fn load_private<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, HomeError> {
        self.read_json_or_default(name)
    }

    /// Saves a private JSON document.
    pub fn save_private<T: Serialize>(&self, name: &str, value: &T) -> Result<(), HomeError> {
        self.write_json(name, value)
    }

    /// Saves several private JSON documents, each atomically and all durably when it returns, for about the cost of
    /// one flush (`relay_quic::durable_file::replace_all`).
    pub fn save_private_all<T: Serialize>(&self, docs: &[(String, T)]) -> Result<(), HomeError> {
        let mut files = Vec::with_capacity(docs.len());
        for (name, value) in docs {
            let path = self.path(name);
            let text =
                serde_json::to_vec_pretty(value).map_err(|source| HomeError::Corrupt { path: path.clone(), source })?;
            files.push((path, text));
        }
        let refs: Vec<(&Path, &[u8])> = files.iter().map(|(p, t)| (p.as_path(), t.as_slice())).collect();
        relay_quic::durable_file::replace_all(&refs, Access::Owner)
            .map_err(|source| HomeError::Io { path: self.dir.clone(), source })
    }

    /// Loads the profile.
    pub fn profile(&self) -> Result<Profile, HomeError> {
        if !self.path("profile.json").exists() {
            return Err(HomeError::NotInitialised(self.dir.clone()));
        }
        self.read_json("profile.json")
    }

    /// Saves the profile.
    pub fn save_profile(&self, p: &Profile) -> Result<(), HomeError> {
        self.write_json("profile.json", p)
    }

    /// Loads the contacts.
    pub fn contacts(&self) -> Result<BTreeMap<String, Contact>, HomeError> {
        self.read_json_or_default("contacts.json")
    }

    /// Saves the contacts.
    pub fn save_contacts(&self, c: &BTreeMap<String, Contact>) -> Result<(), HomeError> {
        self.write_json("contacts.json", c)
    }

    /// Loads the seen-message ids.
    pub fn seen(&self) -> Result<Seen, HomeError> {
        let mut s: Seen = self.read_json_or_default("seen.json")?;
        s.set = s.order.iter().map(|e| e.id().to_owned()).collect();
        Ok(s)
    }

    /// Saves the seen-message ids (compact: the list holds up to [`SEEN_CAPACITY`] entries).
    pub fn save_seen(&self, s: &Seen) -> Result<(), HomeError> {
        let path = self.path("seen.json");
        let text = serde_json::to_vec(s).map_err(|source| HomeError::Corrupt { path: path.clone(), source })?;
        relay_quic::durable_file::replace(&path, &text, Access::Owner).map_err(|source| HomeError::Io { path, source })
    }

    /// The quarantine directory.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.path(QUARANTINE_DIR)
    }

    /// Keeps `q` in the quarantine directory (created mode 0700; the file is 0600), durably; a redelivery of the
    /// same envelope replaces its record. Returns the file.
    pub fn quarantine(&self, q: &Quarantined) -> Result<PathBuf, HomeError> {
        let dir = self.quarantine_dir();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HomeError::Io { path, source }
        };
        relay_quic::durable_file::private_dir(&dir).map_err(io(&dir))?;
        let path = dir.join(format!("{}-{}.json", q.stored_at, q.server_id));
        let text = serde_json::to_vec_pretty(q).map_err(|source| HomeError::Corrupt { path: path.clone(), source })?;
        relay_quic::durable_file::replace(&path, &text, Access::Owner).map_err(io(&path))?;
        Ok(path)
    }

    /// How many envelopes are in quarantine.
    pub fn quarantined(&self) -> Result<usize, HomeError> {
        let dir = self.quarantine_dir();
        if !dir.exists() {
            return Ok(0);
        }
        let entries = std::fs::read_dir(&dir).map_err(|source| HomeError::Io { path: dir.clone(), source })?;
        let mut n = 0;
        for entry in entries {
            let entry = entry.map_err(|source| HomeError::Io { path: dir.clone(), source })?;
            // Temporary files of an interrupted write start with a dot and are not records.
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".json") && !name.to_string_lossy().starts_with('.') {
                n += 1;
            }
        }
        Ok(n)
    }

    fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T, HomeError> {
        let path = self.path(name);
        let text = std::fs::read_to_string(&path).map_err(|source| HomeError::Io { path: path.clone(), source })?;
        serde_json::from_str(&text).map_err(|source| HomeError::Corrupt { path, source })
    }

    fn read_json_or_default<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, HomeError> {
        if self.path(name).exists() { self.read_json(name) } else { Ok(T::default()) }
    }

    /// Every file of the home is the owner's alone: none is public, and some (held messages, contacts) are as
    /// private as the keys.
    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), HomeError> {
        let path = self.path(name);
        let text =
            serde_json::to_vec_pretty(value).map_err(|source| HomeError::Corrupt { path: path.clone(), source })?;
        relay_quic::durable_file::replace(&path, &text, Access::Owner).map_err(|source| HomeError::Io { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_load_and_refuse_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().join("h"));
        let profile = Profile { phone: "+33612345678".into(), device: Device::default(), relay: None };
        let id = home.init(&profile).expect("init");
        assert_eq!(home.identity().expect("load").account_id(), id.account_id());
        assert_eq!(home.profile().expect("profile"), profile);
        assert!(matches!(home.init(&profile), Err(HomeError::AlreadyInitialised(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("h/identity.json")).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "secret key file must not be readable by others");
        }
    }

    #[test]
    fn quarantined_envelopes_are_private_counted_and_replaced_on_redelivery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        assert_eq!(home.quarantined().expect("none yet"), 0);
        let q = Quarantined {
            error: "envelope does not decrypt".into(),
            server_id: 7,
            stored_at: 1_000,
            quarantined_at: 2_000,
            envelope: "02ff".into(),
        };
        let path = home.quarantine(&q).expect("keep");
        home.quarantine(&q).expect("again: the same record");
        home.quarantine(&Quarantined { server_id: 8, ..q.clone() }).expect("another");
        assert_eq!(home.quarantined().expect("count"), 2);
        let back: Quarantined = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
        assert_eq!(back, q);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode();
            assert_eq!(mode(&path) & 0o077, 0, "a quarantined envelope is private");
            assert_eq!(mode(&home.quarantine_dir()) & 0o077, 0, "and so is the directory");
        }
    }

    #[test]
    fn seen_is_bounded_and_persisted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        let mut s = home.seen().expect("empty");
        assert!(s.insert("a"));
        assert!(!s.insert("a"));
        for i in 0..SEEN_CAPACITY {
            s.insert(&i.to_string());
        }
        assert!(!s.contains("a"), "oldest id evicted");
        home.save_seen(&s).expect("save");
        let s = home.seen().expect("load");
        assert!(s.contains("0") && s.contains(&(SEEN_CAPACITY - 1).to_string()));
    }

    #[test]
    fn a_forgotten_message_id_still_refuses_that_senders_older_messages() {
        let mut s = Seen::default();
        assert!(s.record("m1", "alice", 1_000));
        assert_eq!(s.freshness("m1", "alice", 1_000), Freshness::Duplicate);
        for i in 0..SEEN_CAPACITY {
            s.insert(&format!("envelope:{i}"));
        }
        assert!(!s.contains("m1"), "evicted");
        assert_eq!(s.freshness("m1", "alice", 1_000), Freshness::Stale, "a replay of the forgotten message");
        assert_eq!(s.freshness("m0", "alice", 999), Freshness::Stale);
        assert_eq!(s.freshness("m2", "alice", 1_001), Freshness::New, "alice's later messages");
        assert_eq!(s.freshness("b1", "bob", 5), Freshness::New, "another sender's clock is not compared");
        assert!(!s.record("m1", "alice", 1_000));

        // The watermark survives a restart, and files written before senders were recorded still load.
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        home.save_seen(&s).expect("save");
        assert_eq!(home.seen().expect("load").freshness("m1", "alice", 1_000), Freshness::Stale);
        std::fs::write(dir.path().join("seen.json"), br#"{"order":["a","b"]}"#).expect("old format");
        let old = home.seen().expect("an old file loads");
        assert!(old.contains("a") && old.contains("b"));
    }

    #[tokio::test]
    async fn the_lock_excludes_a_second_holder_until_released_and_refuses_after_the_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        let held = home.lock().await.expect("first");
        // A second handle, even in this process, waits and then refuses with a message naming the home.
        assert!(home.try_lock().expect("try").is_none());
        let err = home.lock_within(Duration::from_millis(50)).await.expect_err("busy");
        assert!(matches!(err, HomeError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("in use by another relay client"), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
        drop(held);
        let again = home.lock_within(Duration::from_millis(50)).await.expect("free again");
        drop(again);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(LOCK_FILE)).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
