//! The witness's answers: one request of the witness protocol in, one response out, with the state written before a
//! cosignature is returned.
//!
//! Contract: a cosignature is returned only for a head that `relay_proto::witness::check_checkpoint` accepts against
//! the stored checkpoint of a configured log, and only after that head is the stored checkpoint on disk. Requests
//! are answered one at a time (one lock around the state), so two submissions cannot both extend the same
//! checkpoint. A refusal names its reason; a stale `old_size` gets a `WitnessConflict` with the witness's size.
//! Logs carry log key ids and sizes, nothing else.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use ed25519_dalek::{SigningKey, VerifyingKey};
use relay_proto::ErrorCode;
use relay_proto::merkle::{SignedTreeHead, TreeHead, proof_from_wire};
use relay_proto::wire::{
    self, AddCheckpoint, GetCheckpoint, WitnessConflict, WitnessResponse, WitnessedHead, witness_request,
    witness_response,
};
use relay_proto::witness::{Cosignature, WitnessError, check_checkpoint, log_key_id};

use crate::state::{StateError, StateFile};

/// File name of the witness's Ed25519 key (32-byte seed, mode 0600) in its data dir.
pub const KEY_FILE: &str = "witness.key";

/// File name of the witness's state in its data dir.
pub const STATE_FILE: &str = "state.json";

/// Why the witness could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessOpenError {
    /// The data dir or the key file could not be used.
    #[error("witness data dir: {0}")]
    Io(#[from] std::io::Error),
    /// The key file is not a 32-byte seed.
    #[error("{0} is not 32 bytes")]
    BadKey(String),
    /// The state could not be read.
    #[error(transparent)]
    State(#[from] StateError),
}

/// The witness: its key, the logs it witnesses and its state.
pub struct Witness {
    key: SigningKey,
    logs: BTreeMap<[u8; 32], VerifyingKey>,
    state: Mutex<StateFile>,
}

/// Loads the witness key from `data_dir`, creating it (mode 0600) on first use.
pub fn load_or_create_key(data_dir: &Path) -> Result<SigningKey, WitnessOpenError> {
    relay_quic::durable_file::private_dir(data_dir)?;
    let path = data_dir.join(KEY_FILE);
    if !path.exists() {
        let seed: [u8; 32] = rand::random();
        relay_quic::durable_file::create_secret(&path, &seed)?;
    }
    let seed: [u8; 32] =
        std::fs::read(&path)?.try_into().map_err(|_| WitnessOpenError::BadKey(path.display().to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

impl Witness {
    /// Opens the witness on `data_dir` (key and state created on first start), witnessing the logs with keys
    /// `log_keys`.
    pub fn open(data_dir: &Path, log_keys: &[VerifyingKey]) -> Result<Self, WitnessOpenError> {
        let key = load_or_create_key(data_dir)?;
        let state = StateFile::open(&data_dir.join(STATE_FILE))?;
        let logs = log_keys.iter().map(|k| (k.to_bytes(), *k)).collect();
        Ok(Self { key, logs, state: Mutex::new(state) })
    }

    /// The witness's public key: what verifiers configure (`--witness-key`).
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Answers one request at `now_ms` (the cosigning time).
    pub fn handle(&self, body: Option<witness_request::Body>, now_ms: u64) -> WitnessResponse {
        let body = match body {
            Some(witness_request::Body::AddCheckpoint(add)) => self.add_checkpoint(&add, now_ms),
            Some(witness_request::Body::GetCheckpoint(get)) => self.get_checkpoint(&get, now_ms),
            None => return WitnessResponse::error(ErrorCode::InvalidRequest, "empty request"),
        };
        match body {
            Ok(body) => WitnessResponse { body: Some(body) },
            Err((code, message)) => WitnessResponse::error(code, message),
        }
    }

    fn log(&self, key: &[u8]) -> Result<VerifyingKey, (ErrorCode, String)> {
        let key: [u8; 32] =
            key.try_into().map_err(|_| (ErrorCode::InvalidRequest, "log key must be 32 bytes".to_owned()))?;
        self.logs.get(&key).copied().ok_or((ErrorCode::NotFound, "this witness does not witness that log".to_owned()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StateFile> {
        // A panic while the lock was held cannot have left a half-written state: `StateFile::store` changes memory
        // only after the file is replaced.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add_checkpoint(&self, add: &AddCheckpoint, now_ms: u64) -> Result<witness_response::Body, (ErrorCode, String)> {
        let invalid = |e: &dyn std::fmt::Display| (ErrorCode::InvalidRequest, e.to_string());
        let log_key = self.log(&add.log_key)?;
        let wire_head = add.head.as_ref().ok_or((ErrorCode::InvalidRequest, "no head".to_owned()))?;
        let head = SignedTreeHead::try_from(wire_head).map_err(|e| invalid(&e))?;
        let proof = proof_from_wire(&add.consistency).map_err(|e| invalid(&e))?;
        let id = hex::encode(&log_key_id(&log_key)[..8]);
        let mut state = self.lock();
        let current = state.checkpoint(&log_key.to_bytes());
        let next = match check_checkpoint(&log_key, current, add.old_size, &proof, &head) {
            Ok(next) => next,
            Err(WitnessError::Conflict { current, .. }) => {
                tracing::info!(log = %id, claimed = add.old_size, current, "conflict: stale old size");
                return Ok(witness_response::Body::Conflict(WitnessConflict { size: current }));
            }
            Err(e @ WitnessError::BadHeadSignature) => return Err((ErrorCode::BadSignature, e.to_string())),
            Err(e) => {
                tracing::warn!(log = %id, size = head.head.size, cosigned = current.size, error = %e, "refused a head");
                return Err(invalid(&e));
            }
        };
        if next != current {
            state.store(log_key.to_bytes(), next).map_err(|e| {
                tracing::error!(error = %e, "cannot store the witness state");
                (ErrorCode::StorageUnavailable, "the witness cannot store its state".to_owned())
            })?;
            tracing::info!(log = %id, size = next.size, "cosigned");
        }
        let cosignature = Cosignature::sign(&self.key, &log_key, &head.head, now_ms);
        Ok(witness_response::Body::Cosignature((&cosignature).into()))
    }

    fn get_checkpoint(&self, get: &GetCheckpoint, now_ms: u64) -> Result<witness_response::Body, (ErrorCode, String)> {
        let log_key = self.log(&get.log_key)?;
        let current = self.lock().checkpoint(&log_key.to_bytes());
        if current.size == 0 {
            return Ok(witness_response::Body::Witnessed(WitnessedHead::default()));
        }
        let head = TreeHead { size: current.size, root: current.root, timestamp_ms: 0 };
        let cosignature = wire::Cosignature::from(&Cosignature::sign(&self.key, &log_key, &head, now_ms));
        Ok(witness_response::Body::Witnessed(WitnessedHead {
            size: current.size,
            root: current.root.to_vec().into(),
            cosignature: Some(cosignature),
        }))
    }
}

#[cfg(test)]
mod tests {
    use relay_proto::merkle::{MerkleLog, proof_to_wire};

    use super::*;

    fn add(log_key: &SigningKey, log: &MerkleLog, old_size: u64) -> Option<witness_request::Body> {
        let proof = log.consistency_proof(old_size.min(log.len()), log.len()).expect("proof");
        Some(witness_request::Body::AddCheckpoint(AddCheckpoint {
            log_key: log_key.verifying_key().to_bytes().to_vec().into(),
            old_size,
            consistency: proof_to_wire(&proof),
            head: Some((&log.tree_head(100).sign(log_key)).into()),
        }))
    }

    fn log(leaves: &[&[u8]]) -> MerkleLog {
        let mut log = MerkleLog::new();
        for leaf in leaves {
            log.append(leaf);
        }
        log
    }

    fn cosignature(r: &WitnessResponse) -> Option<Cosignature> {
        match &r.body {
            Some(witness_response::Body::Cosignature(c)) => Cosignature::try_from(c).ok(),
            _ => None,
        }
    }

    /// The attacks of a holder of `log.key` on a witness that cosigned size 3, before and after a restart of the
    /// witness: (a) the newest entry dropped, (b) entry 0 deleted, (c) an entry's payload changed, each re-signed.
    #[test]
    fn rewrites_are_refused_and_the_state_survives_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let log_key = SigningKey::from_bytes(&[5; 32]);
        let honest = log(&[b"e0", b"e1", b"e2"]);
        let attacks = [
            ("(a) newest dropped", log(&[b"e0", b"e1"])),
            ("(a) newest dropped, another appended", log(&[b"e0", b"e1", b"X2"])),
            ("(b) entry 0 deleted", log(&[b"e1", b"e2"])),
            ("(b) entry 0 deleted, log grown", log(&[b"e1", b"e2", b"e3", b"e4"])),
            ("(c) payload changed", log(&[b"e0", b"X1", b"e2"])),
            ("(c) payload changed, log grown", log(&[b"e0", b"X1", b"e2", b"e3"])),
        ];
        {
            let witness = Witness::open(dir.path(), &[log_key.verifying_key()]).expect("open");
            let first = log(&[b"e0"]);
            let c = cosignature(&witness.handle(add(&log_key, &first, 0), 1)).expect("first head cosigned");
            c.verify(&witness.public_key(), &log_key.verifying_key(), &first.tree_head(0)).expect("valid");
            cosignature(&witness.handle(add(&log_key, &honest, 1), 2)).expect("extension cosigned");
            for (what, forged) in &attacks {
                for old_size in [0, 1, 2, 3] {
                    let r = witness.handle(add(&log_key, forged, old_size), 3);
                    assert!(cosignature(&r).is_none(), "{what} (old size {old_size}) was cosigned");
                }
            }
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE)).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the witness key is its owner's alone");
        }
        // Restarted on the same data dir: same key, same state, same refusals.
        let public = load_or_create_key(dir.path()).expect("key").verifying_key();
        let witness = Witness::open(dir.path(), &[log_key.verifying_key()]).expect("reopen");
        assert_eq!(witness.public_key(), public, "the same key after a restart");
        for (what, forged) in &attacks {
            let r = witness.handle(add(&log_key, forged, 3), 4);
            assert!(matches!(r.body, Some(witness_response::Body::Error(_))), "{what} after a restart: {:?}", r.body);
        }
        // A stale old size is answered with the witness's size; the honest extension from it is cosigned.
        let mut grown = honest.clone();
        grown.append(b"e3");
        let r = witness.handle(add(&log_key, &grown, 1), 5);
        assert_eq!(r.body, Some(witness_response::Body::Conflict(WitnessConflict { size: 3 })));
        cosignature(&witness.handle(add(&log_key, &grown, 3), 5)).expect("retried from the witness's size");
        // Its latest checkpoint, with a fresh cosignature.
        let get = GetCheckpoint { log_key: log_key.verifying_key().to_bytes().to_vec().into() };
        let Some(witness_response::Body::Witnessed(w)) =
            witness.handle(Some(witness_request::Body::GetCheckpoint(get)), 6).body
        else {
            panic!("expected the witnessed head");
        };
        assert_eq!((w.size, w.root.as_ref()), (4, &grown.root()[..]));
    }

    #[test]
    fn unknown_logs_and_bad_input_are_refused_without_state() {
        let dir = tempfile::tempdir().expect("dir");
        let (log_key, other) = (SigningKey::from_bytes(&[5; 32]), SigningKey::from_bytes(&[6; 32]));
        let witness = Witness::open(dir.path(), &[log_key.verifying_key()]).expect("open");
        let honest = log(&[b"e0"]);
        for body in [
            add(&other, &honest, 0),
            None,
            Some(witness_request::Body::AddCheckpoint(AddCheckpoint::default())),
            Some(witness_request::Body::AddCheckpoint(AddCheckpoint {
                log_key: log_key.verifying_key().to_bytes().to_vec().into(),
                head: Some(wire::SignedTreeHead::default()),
                ..AddCheckpoint::default()
            })),
            Some(witness_request::Body::AddCheckpoint(AddCheckpoint {
                log_key: log_key.verifying_key().to_bytes().to_vec().into(),
                consistency: vec![vec![0u8; 32].into(); 200],
                head: Some((&honest.tree_head(1).sign(&log_key)).into()),
                old_size: 0,
            })),
        ] {
            let r = witness.handle(body.clone(), 1);
            assert!(matches!(r.body, Some(witness_response::Body::Error(_))), "{body:?}: {:?}", r.body);
        }
        // A head signed with another key than the log's.
        let mut forged = add(&log_key, &honest, 0);
        if let Some(witness_request::Body::AddCheckpoint(a)) = &mut forged {
            a.head = Some((&honest.tree_head(1).sign(&other)).into());
        }
        assert!(cosignature(&witness.handle(forged, 1)).is_none());
        assert!(!dir.path().join(STATE_FILE).exists(), "nothing refused was stored");
    }
}
