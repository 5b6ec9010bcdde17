//! The witness's durable state: for each log (by its key), the size and root of the last head it cosigned.
//!
//! Stored as one small JSON file (`state.json` in the data dir, mode 0600) replaced atomically with
//! `relay_quic::durable_file::replace`: after [`StateFile::store`] returns the new state is on disk (file and
//! directory fsynced), and a crash leaves the old state or the new, never a mix.
//!
//! Contract: a state file that does not parse, or holds a root that is not 32 bytes of hex, stops the witness
//! ([`StateError::Corrupt`]): it is never read as "no head cosigned yet", which would let a rolled-back log be
//! cosigned again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use relay_proto::witness::Checkpoint;
use serde::{Deserialize, Serialize};

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Reading or writing the file failed.
    #[error("witness state {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not hold a valid state.
    #[error("witness state {path} is corrupt: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

#[derive(Serialize, Deserialize, Default)]
struct OnDisk {
    /// Hex log key → last cosigned head.
    logs: BTreeMap<String, Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    size: u64,
    root: String,
}

/// The state file and its contents.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    logs: BTreeMap<[u8; 32], Checkpoint>,
}

impl StateFile {
    /// Loads `path`, or an empty state if it does not exist.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let corrupt = |why: String| StateError::Corrupt { path: path.to_owned(), why };
        let logs = match std::fs::read(path) {
            Ok(bytes) => {
                let disk: OnDisk = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                let mut logs = BTreeMap::new();
                for (key, entry) in disk.logs {
                    let key: [u8; 32] = hex::decode(&key)
                        .ok()
                        .and_then(|k| k.try_into().ok())
                        .ok_or_else(|| corrupt(format!("log key {key:?}")))?;
                    let root: [u8; 32] = hex::decode(&entry.root)
                        .ok()
                        .and_then(|r| r.try_into().ok())
                        .ok_or_else(|| corrupt(format!("root of log {}", hex::encode(key))))?;
                    logs.insert(key, Checkpoint { size: entry.size, root });
                }
                logs
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(StateError::Io { path: path.to_owned(), source }),
        };
        Ok(Self { path: path.to_owned(), logs })
    }

    /// The last cosigned checkpoint of the log with key `log_key` (the empty one if none).
    pub fn checkpoint(&self, log_key: &[u8; 32]) -> Checkpoint {
        self.logs.get(log_key).copied().unwrap_or_else(Checkpoint::empty)
    }

    /// Records `checkpoint` for `log_key` and writes the whole state durably. In memory, the new value is kept only
    /// if the write succeeded.
    pub fn store(&mut self, log_key: [u8; 32], checkpoint: Checkpoint) -> Result<(), StateError> {
        let mut logs = self.logs.clone();
        logs.insert(log_key, checkpoint);
        let disk = OnDisk {
            logs: logs
                .iter()
                .map(|(k, c)| (hex::encode(k), Entry { size: c.size, root: hex::encode(c.root) }))
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&disk)
            .map_err(|e| StateError::Corrupt { path: self.path.clone(), why: format!("cannot encode: {e}") })?;
        relay_quic::durable_file::replace(&self.path, &bytes, relay_quic::durable_file::Access::Owner)
            .map_err(|source| StateError::Io { path: self.path.clone(), source })?;
        self.logs = logs;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_survives_a_reopen_and_a_corrupt_file_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.json");
        let mut state = StateFile::open(&path).expect("empty");
        assert_eq!(state.checkpoint(&[1; 32]), Checkpoint::empty());
        state.store([1; 32], Checkpoint { size: 3, root: [7; 32] }).expect("store");
        let again = StateFile::open(&path).expect("reopen");
        assert_eq!(again.checkpoint(&[1; 32]), Checkpoint { size: 3, root: [7; 32] });
        assert_eq!(again.checkpoint(&[2; 32]), Checkpoint::empty());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        }
        for bad in ["", "{", r#"{"logs":{"zz":{"size":1,"root":"00"}}}"#] {
            std::fs::write(&path, bad).expect("write");
            assert!(matches!(StateFile::open(&path), Err(StateError::Corrupt { .. })), "{bad:?}");
        }
    }
}
