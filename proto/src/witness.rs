//! Witness cosignatures of the export log's tree heads (the model is C2SP tlog-witness and its cosignatures): what a
//! `relay-witness` signs, how a verifier checks it, and the rule a witness applies before it signs.
//!
//! A cosignature is an Ed25519 signature by the witness's own key over [`cosigned_message`]: a domain-separation
//! label, the log's key id (SHA-256 of the log's public key), the head's size and root, and the time the witness
//! cosigned. It says "this witness saw this (size, root) for this log, consistent with every head of that log it
//! cosigned before". It does not cover the log's own head timestamp or signature: any head of that size and root is
//! cosigned by it.
//!
//! Contract: pure logic, no I/O and no clock (times come in as arguments). Verification takes untrusted input and
//! never panics; a cosignature is accepted only under a key the verifier configured ([`require_cosignatures`]),
//! never under the key the cosignature itself names.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::auth::SIGNATURE_LEN;
use crate::merkle::{HASH_LEN, Hash, MerkleError, SignedTreeHead, TreeHead, verify_consistency};

/// Domain-separation label that starts every cosigned message.
pub const COSIGNATURE_LABEL: &[u8] = b"consent-relay witness cosignature v1";

/// Length of [`cosigned_message`]: label, log key id, size, root, timestamp.
pub const COSIGNED_MESSAGE_LEN: usize = COSIGNATURE_LABEL.len() + HASH_LEN + 8 + HASH_LEN + 8;

/// Most cosignatures carried with one head (on the wire and in the relay's copy).
pub const MAX_COSIGNATURES: usize = 16;

/// Why a cosignature, or a checkpoint submitted to a witness, was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessError {
    /// A key, root or signature has the wrong length, or a key is not a valid Ed25519 point.
    #[error("{0} has the wrong length or is not a valid key")]
    WrongLength(&'static str),
    /// The cosignature does not verify under the witness key.
    #[error("cosignature does not verify under witness key {witness}")]
    BadCosignature {
        /// Hex of the witness key.
        witness: String,
    },
    /// A configured witness's cosignature is missing.
    #[error("the head of size {size} carries no cosignature from witness {witness}")]
    MissingCosignature {
        /// Size of the head.
        size: u64,
        /// Hex of the witness key.
        witness: String,
    },
    /// More cosignatures than [`MAX_COSIGNATURES`].
    #[error("{0} cosignatures, more than the maximum of {MAX_COSIGNATURES}")]
    TooMany(usize),
    /// The submitted head's signature does not verify under the log key.
    #[error("the head's signature does not verify under the log key")]
    BadHeadSignature,
    /// The submitter's `old_size` is not the witness's: it should retry with a proof from `current`.
    #[error("the witness's last cosigned size for this log is {current}, not {claimed}")]
    Conflict {
        /// The size the submitter claimed.
        claimed: u64,
        /// The witness's size.
        current: u64,
    },
    /// The new head is smaller than the last one the witness cosigned: a rollback.
    #[error("head of size {new} is smaller than the cosigned head of size {old}: rollback refused")]
    Rollback {
        /// The witness's size.
        old: u64,
        /// The submitted size.
        new: u64,
    },
    /// Same size as the last cosigned head, another root: a rewrite.
    #[error("head of size {size} has another root than the one cosigned at that size: fork refused")]
    Fork {
        /// The size.
        size: u64,
    },
    /// The consistency proof from the witness's head to the new one does not verify.
    #[error("the head is not consistent with the cosigned head of size {old}: {source}")]
    Inconsistent {
        /// The witness's size.
        old: u64,
        /// Why the proof failed.
        source: MerkleError,
    },
}

/// The key id of a log: SHA-256 of its Ed25519 public key.
pub fn log_key_id(log_key: &VerifyingKey) -> Hash {
    Sha256::digest(log_key.as_bytes()).into()
}

/// The bytes a witness signs: [`COSIGNATURE_LABEL`] ‖ log key id ‖ size (u64 BE) ‖ root ‖ timestamp_ms (u64 BE).
/// Every part has a fixed length, so no two statements share an encoding.
pub fn cosigned_message(
    log_key: &VerifyingKey,
    size: u64,
    root: &Hash,
    timestamp_ms: u64,
) -> [u8; COSIGNED_MESSAGE_LEN] {
    let mut out = [0u8; COSIGNED_MESSAGE_LEN];
    let parts: [&[u8]; 5] =
        [COSIGNATURE_LABEL, &log_key_id(log_key), &size.to_be_bytes(), root, &timestamp_ms.to_be_bytes()];
    let mut at = 0;
    for part in parts {
        out[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    out
}

/// A witness's cosignature of one (log, size, root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cosignature {
    /// The witness's public key (which verifiers must have configured; the field only says which one it claims).
    pub witness_key: [u8; 32],
    /// When the witness cosigned (ms since the Unix epoch, the witness's clock).
    pub timestamp_ms: u64,
    /// Ed25519 over [`cosigned_message`].
    pub signature: [u8; SIGNATURE_LEN],
}

impl Cosignature {
    /// Cosigns `head` of the log with key `log_key` with the witness key, at `timestamp_ms`.
    pub fn sign(witness: &SigningKey, log_key: &VerifyingKey, head: &TreeHead, timestamp_ms: u64) -> Self {
        let message = cosigned_message(log_key, head.size, &head.root, timestamp_ms);
        Self {
            witness_key: witness.verifying_key().to_bytes(),
            timestamp_ms,
            signature: witness.sign(&message).to_bytes(),
        }
    }

    /// Checks that this is `witness`'s cosignature of `head` of the log with key `log_key` (`verify_strict`).
    pub fn verify(&self, witness: &VerifyingKey, log_key: &VerifyingKey, head: &TreeHead) -> Result<(), WitnessError> {
        let bad = || WitnessError::BadCosignature { witness: hex::encode(witness.as_bytes()) };
        if self.witness_key != witness.to_bytes() {
            return Err(bad());
        }
        let message = cosigned_message(log_key, head.size, &head.root, self.timestamp_ms);
        witness.verify_strict(&message, &Signature::from_bytes(&self.signature)).map_err(|_| bad())
    }

    /// Checks the signature under the key the cosignature names (what a store that knows no witness keys can check:
    /// it keeps out garbage, it proves nothing about which witnesses are trusted).
    pub fn verify_self_named(&self, log_key: &VerifyingKey, head: &TreeHead) -> Result<(), WitnessError> {
        let key = VerifyingKey::from_bytes(&self.witness_key).map_err(|_| WitnessError::WrongLength("witness key"))?;
        self.verify(&key, log_key, head)
    }
}

impl From<&Cosignature> for crate::wire::Cosignature {
    fn from(c: &Cosignature) -> Self {
        Self {
            witness_key: c.witness_key.to_vec().into(),
            timestamp_ms: c.timestamp_ms,
            signature: c.signature.to_vec().into(),
        }
    }
}

impl TryFrom<&crate::wire::Cosignature> for Cosignature {
    type Error = WitnessError;

    /// Checks lengths only; [`Cosignature::verify`] checks the signature.
    fn try_from(c: &crate::wire::Cosignature) -> Result<Self, WitnessError> {
        Ok(Self {
            witness_key: c.witness_key.as_ref().try_into().map_err(|_| WitnessError::WrongLength("witness key"))?,
            timestamp_ms: c.timestamp_ms,
            signature: c.signature.as_ref().try_into().map_err(|_| WitnessError::WrongLength("cosignature"))?,
        })
    }
}

/// The cosignatures a wire head carries; refused if there are more than [`MAX_COSIGNATURES`] or one is malformed.
pub fn cosignatures_from_wire(head: &crate::wire::SignedTreeHead) -> Result<Vec<Cosignature>, WitnessError> {
    if head.cosignatures.len() > MAX_COSIGNATURES {
        return Err(WitnessError::TooMany(head.cosignatures.len()));
    }
    head.cosignatures.iter().map(Cosignature::try_from).collect()
}

/// A signed head with its cosignatures as sent on the wire.
pub fn head_to_wire(head: &SignedTreeHead, cosignatures: &[Cosignature]) -> crate::wire::SignedTreeHead {
    let mut wire = crate::wire::SignedTreeHead::from(head);
    wire.cosignatures = cosignatures.iter().map(Into::into).collect();
    wire
}

/// A witness key given as 64 hex digits (the CLI flags' form).
pub fn parse_witness_key(hex_key: &str) -> Result<VerifyingKey, WitnessError> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(WitnessError::WrongLength("witness key"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| WitnessError::WrongLength("witness key"))
}

/// Checks that `head` of the log with key `log_key` carries, among `cosignatures`, a valid one from each of
/// `witnesses`. Cosignatures from other keys are ignored; one that claims a configured key and does not verify is an
/// error even if another one from that key does (a forged cosignature is never silently skipped).
pub fn require_cosignatures(
    log_key: &VerifyingKey,
    head: &TreeHead,
    cosignatures: &[Cosignature],
    witnesses: &[VerifyingKey],
) -> Result<(), WitnessError> {
    for witness in witnesses {
        let mut found = false;
        for c in cosignatures.iter().filter(|c| c.witness_key == witness.to_bytes()) {
            c.verify(witness, log_key, head)?;
            found = true;
        }
        if !found {
            return Err(WitnessError::MissingCosignature { size: head.size, witness: hex::encode(witness.as_bytes()) });
        }
    }
    Ok(())
}

/// The last head a witness cosigned for one log: its size and root (size 0 and the empty root before any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Number of leaves.
    pub size: u64,
    /// Root over them.
    pub root: Hash,
}

impl Checkpoint {
    /// The state before any head was cosigned.
    pub fn empty() -> Self {
        Self { size: 0, root: crate::merkle::empty_root() }
    }
}

/// The witness's rule: whether it may cosign `new` (signed by `log_key`), given its last cosigned checkpoint
/// `current`, the submitter's `old_size` and the consistency `proof` from `old_size` to `new`. On success the
/// caller stores `new` as the log's checkpoint (durably) before it answers with a cosignature.
///
/// Refused: a head whose signature does not verify; an `old_size` that is not `current.size` (a
/// [`WitnessError::Conflict`] carrying the witness's size); a smaller size; the same size with another root; a proof
/// that does not lead from `current` to the new head.
pub fn check_checkpoint(
    log_key: &VerifyingKey,
    current: Checkpoint,
    old_size: u64,
    proof: &[Hash],
    new: &SignedTreeHead,
) -> Result<Checkpoint, WitnessError> {
    new.verify(log_key).map_err(|_| WitnessError::BadHeadSignature)?;
    let head = new.head;
    if head.size < current.size {
        return Err(WitnessError::Rollback { old: current.size, new: head.size });
    }
    if old_size != current.size {
        return Err(WitnessError::Conflict { claimed: old_size, current: current.size });
    }
    if head.size == current.size && head.root != current.root {
        return Err(WitnessError::Fork { size: head.size });
    }
    verify_consistency(current.size, head.size, &current.root, &head.root, proof)
        .map_err(|source| WitnessError::Inconsistent { old: current.size, source })?;
    Ok(Checkpoint { size: head.size, root: head.root })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::MerkleLog;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn log(leaves: &[&[u8]]) -> MerkleLog {
        let mut log = MerkleLog::new();
        for leaf in leaves {
            log.append(leaf);
        }
        log
    }

    #[test]
    fn a_cosignature_verifies_only_for_its_witness_log_size_and_root() {
        let (witness, log_key) = (key(1), key(2).verifying_key());
        let head = log(&[b"a", b"b"]).tree_head(5);
        let c = Cosignature::sign(&witness, &log_key, &head, 9);
        c.verify(&witness.verifying_key(), &log_key, &head).expect("valid");
        // The log head's own timestamp is not covered.
        c.verify(&witness.verifying_key(), &log_key, &TreeHead { timestamp_ms: 6, ..head }).expect("same size, root");
        let other_root = TreeHead { root: [7; 32], ..head };
        let other_size = TreeHead { size: 3, ..head };
        for (what, k, lk, h) in [
            ("another witness", key(3).verifying_key(), log_key, head),
            ("another log", witness.verifying_key(), key(4).verifying_key(), head),
            ("another root", witness.verifying_key(), log_key, other_root),
            ("another size", witness.verifying_key(), log_key, other_size),
        ] {
            assert!(c.verify(&k, &lk, &h).is_err(), "{what}");
        }
        let stamped = Cosignature { timestamp_ms: 10, ..c };
        assert!(stamped.verify(&witness.verifying_key(), &log_key, &head).is_err(), "the timestamp is signed");
        let wire = crate::wire::Cosignature::from(&c);
        assert_eq!(Cosignature::try_from(&wire), Ok(c));
        let short = crate::wire::Cosignature { signature: vec![0; 63].into(), ..wire };
        assert!(Cosignature::try_from(&short).is_err());
    }

    #[test]
    fn a_forged_or_missing_cosignature_is_refused_by_the_verifier() {
        let (witness, log_key) = (key(1), key(2).verifying_key());
        let head = log(&[b"a"]).tree_head(5);
        let good = Cosignature::sign(&witness, &log_key, &head, 9);
        let required = [witness.verifying_key()];
        require_cosignatures(&log_key, &head, &[good], &required).expect("cosigned");
        // Signed by another key but claiming the configured witness: refused, even next to a good one.
        let mut forged = Cosignature::sign(&key(3), &log_key, &head, 9);
        forged.witness_key = witness.verifying_key().to_bytes();
        let err = require_cosignatures(&log_key, &head, &[forged], &required).expect_err("forged");
        assert!(matches!(err, WitnessError::BadCosignature { .. }), "{err}");
        assert!(require_cosignatures(&log_key, &head, &[good, forged], &required).is_err());
        // Honestly signed by another witness: not the configured one.
        let other = Cosignature::sign(&key(3), &log_key, &head, 9);
        let err = require_cosignatures(&log_key, &head, &[other], &required).expect_err("missing");
        assert!(matches!(err, WitnessError::MissingCosignature { size: 1, .. }), "{err}");
        assert!(require_cosignatures(&log_key, &head, &[], &required).is_err());
        require_cosignatures(&log_key, &head, &[], &[]).expect("no witness configured, nothing required");
    }

    /// (a) the newest entry dropped, (b) entry 0 deleted, (c) an entry changed: each re-signed with the real log
    /// key, each refused by the rule, whatever `old_size` the submitter claims.
    #[test]
    fn rollbacks_and_rewrites_signed_with_the_log_key_are_refused() {
        let log_key = key(2);
        let honest = log(&[b"e0", b"e1", b"e2"]);
        let cosigned = Checkpoint { size: 3, root: honest.root() };
        let attempts: [(&str, MerkleLog); 5] = [
            ("newest dropped", log(&[b"e0", b"e1"])),
            ("entry 0 deleted", log(&[b"e1", b"e2"])),
            ("entry 0 deleted, then grown", log(&[b"e1", b"e2", b"e3", b"e4"])),
            ("payload changed", log(&[b"e0", b"X1", b"e2"])),
            ("payload changed, then grown", log(&[b"e0", b"X1", b"e2", b"e3"])),
        ];
        for (what, forged) in attempts {
            let head = forged.tree_head(100).sign(&log_key);
            for old_size in [0, 2, 3] {
                let proof = forged.consistency_proof(old_size.min(forged.len()), forged.len()).expect("proof");
                let refused = check_checkpoint(&log_key.verifying_key(), cosigned, old_size, &proof, &head);
                assert!(refused.is_err(), "{what}, old size {old_size}: {refused:?}");
            }
            // With the right old size, the refusal says why (never a conflict).
            let proof = forged.consistency_proof(3.min(forged.len()), forged.len()).expect("proof");
            let err = check_checkpoint(&log_key.verifying_key(), cosigned, 3, &proof, &head).expect_err(what);
            assert!(
                matches!(
                    err,
                    WitnessError::Rollback { .. } | WitnessError::Fork { .. } | WitnessError::Inconsistent { .. }
                ),
                "{what}: {err}"
            );
        }
        // The honest extension is accepted; a stale old size is a conflict carrying the witness's size.
        let mut grown = honest.clone();
        grown.append(b"e3");
        let head = grown.tree_head(100).sign(&log_key);
        let proof = grown.consistency_proof(3, 4).expect("proof");
        let next = check_checkpoint(&log_key.verifying_key(), cosigned, 3, &proof, &head).expect("extends");
        assert_eq!(next, Checkpoint { size: 4, root: grown.root() });
        let stale = grown.consistency_proof(2, 4).expect("proof");
        let err = check_checkpoint(&log_key.verifying_key(), cosigned, 2, &stale, &head).expect_err("stale");
        assert_eq!(err, WitnessError::Conflict { claimed: 2, current: 3 });
        // The same head again is accepted (idempotent), a head signed by another key is not.
        check_checkpoint(&log_key.verifying_key(), cosigned, 3, &[], &honest.tree_head(1).sign(&log_key))
            .expect("same");
        let other = honest.tree_head(1).sign(&key(9));
        let err = check_checkpoint(&log_key.verifying_key(), cosigned, 3, &[], &other).expect_err("other key");
        assert_eq!(err, WitnessError::BadHeadSignature);
        // From nothing: only old size 0 and an empty proof.
        let first = check_checkpoint(&log_key.verifying_key(), Checkpoint::empty(), 0, &[], &head).expect("first");
        assert_eq!(first.size, 4);
    }
}
