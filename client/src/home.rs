//! The client's local state in its home directory (`--home`):
//!
//! - `identity.json` — secret keys (mode 0600; never logged);
//! - `profile.json` — phone number, device info, and once registered, the relay's address and pinned certificate;
//! - `contacts.json` — phone number → account id and public keys, as first looked up;
//! - `seen.json` — ids of the most recent received messages, for de-duplication;
//! - `quarantine/` — envelopes that arrived and could not be opened, verified or decrypted, one file each (mode
//!   0600) with the reason, kept so that no message is lost without the user learning of it (see [`Quarantined`]).
//!
//! Every file is written to a temporary name, synced, renamed, and the directory synced (`relay_quic::durable_file`),
//! so a crash or power loss leaves the old or the new version, never an older one.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use relay_quic::durable_file::Access;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::identity::Identity;

/// Directory of the home that holds quarantined envelopes.
pub const QUARANTINE_DIR: &str = "quarantine";

/// How many received message and envelope ids are remembered for de-duplication.
pub const SEEN_CAPACITY: usize = 20_000;

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

/// Ids of received messages, oldest first, bounded.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Seen {
    order: VecDeque<String>,
    #[serde(skip)]
    set: HashSet<String>,
}

impl Seen {
    /// Records `id`; false if it was already there.
    pub fn insert(&mut self, id: &str) -> bool {
        if !self.set.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        while self.order.len() > SEEN_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    /// Whether `id` was seen.
    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
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

    /// Creates the home with fresh keys and `profile`; refuses if it already holds an identity.
    pub fn init(&self, profile: &Profile) -> Result<Identity, HomeError> {
        let id_path = self.path("identity.json");
        if id_path.exists() {
            return Err(HomeError::AlreadyInitialised(self.dir.clone()));
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| HomeError::Io { path: self.dir.clone(), source })?;
        let identity = Identity::generate();
        let (a, b) = identity.secrets();
        let access_key: [u8; 32] = rand::random();
        let file = IdentityFile {
            identity_secret: hex::encode(a),
            sealing_secret: hex::encode(b),
            access_key: hex::encode(access_key),
        };
        self.write_json("identity.json", &file, true)?;
        self.save_profile(profile)?;
        Ok(identity)
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
        self.write_json("identity.json", &f, true)?;
        Ok(key)
    }

    /// Loads the messages held for contacts whose identity changed.
    pub fn held(&self) -> Result<Vec<HeldMessage>, HomeError> {
        self.read_json_or_default("held.json")
    }

    /// Saves the held messages.
    pub fn save_held(&self, held: &[HeldMessage]) -> Result<(), HomeError> {
        self.write_json("held.json", &held, false)
    }

    /// Loads a private JSON document (`name` in the home), or its default when absent.
    pub fn load_private<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, HomeError> {
        self.read_json_or_default(name)
    }

    /// Saves a private JSON document (mode 0600).
    pub fn save_private<T: Serialize>(&self, name: &str, value: &T) -> Result<(), HomeError> {
        self.write_json(name, value, true)
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
        self.write_json("profile.json", p, false)
    }

    /// Loads the contacts.
    pub fn contacts(&self) -> Result<BTreeMap<String, Contact>, HomeError> {
        self.read_json_or_default("contacts.json")
    }

    /// Saves the contacts.
    pub fn save_contacts(&self, c: &BTreeMap<String, Contact>) -> Result<(), HomeError> {
        self.write_json("contacts.json", c, false)
    }

    /// Loads the seen-message ids.
    pub fn seen(&self) -> Result<Seen, HomeError> {
        let mut s: Seen = self.read_json_or_default("seen.json")?;
        s.set = s.order.iter().cloned().collect();
        Ok(s)
    }

    /// Saves the seen-message ids.
    pub fn save_seen(&self, s: &Seen) -> Result<(), HomeError> {
        self.write_json("seen.json", s, false)
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
        if !dir.exists() {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(&dir).map_err(io(&dir))?;
        }
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

    fn write_json<T: Serialize>(&self, name: &str, value: &T, private: bool) -> Result<(), HomeError> {
        let path = self.path(name);
        let text =
            serde_json::to_vec_pretty(value).map_err(|source| HomeError::Corrupt { path: path.clone(), source })?;
        let access = if private { Access::Owner } else { Access::Everyone };
        relay_quic::durable_file::replace(&path, &text, access).map_err(|source| HomeError::Io { path, source })
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
}
