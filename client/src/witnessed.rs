//! Witnesses the user requires of the export log: the witness keys remembered in the home (`witnesses.json`, added
//! with `relay exports --verify --witness-key HEX`), and the check that the head `relay exports --verify` proves
//! entries against carries a valid cosignature from each.
//!
//! Contract: with no witness configured nothing is required (and nothing is reported); with witnesses configured, a
//! head without a valid cosignature from each one is a problem, so verification fails and the head is not pinned.
//! A cosignature claiming a configured key that does not verify is reported as such, even next to a valid one.

use ed25519_dalek::VerifyingKey;
use relay_proto::merkle::SignedTreeHead;
use relay_proto::witness::{cosignatures_from_wire, parse_witness_key, require_cosignatures};
use serde::{Deserialize, Serialize};

use crate::home::{Home, HomeError};

/// The file in the home that remembers the required witness keys.
pub const WITNESSES_FILE: &str = "witnesses.json";

/// `witnesses.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Witnesses {
    /// Hex Ed25519 keys of the witnesses whose cosignature the log's head must carry.
    pub keys: Vec<String>,
}

impl Witnesses {
    /// The remembered witnesses of `home` (none if the file does not exist).
    pub fn load(home: &Home) -> Result<Self, HomeError> {
        home.load_private(WITNESSES_FILE)
    }

    /// Adds `keys` (hex, checked) to the remembered ones and saves them; returns the whole list.
    pub fn remember(home: &Home, keys: &[String]) -> Result<Self, String> {
        let mut witnesses = Self::load(home).map_err(|e| e.to_string())?;
        for key in keys {
            let parsed = parse_witness_key(key).map_err(|_| format!("--witness-key {key:?} is not 64 hex digits"))?;
            let hex_key = hex::encode(parsed.as_bytes());
            if !witnesses.keys.contains(&hex_key) {
                witnesses.keys.push(hex_key);
            }
        }
        home.save_private(WITNESSES_FILE, &witnesses).map_err(|e| e.to_string())?;
        Ok(witnesses)
    }

    /// The keys, parsed; a remembered key that does not parse is an error, never skipped.
    pub fn parsed(&self) -> Result<Vec<VerifyingKey>, String> {
        self.keys
            .iter()
            .map(|k| parse_witness_key(k).map_err(|_| format!("{WITNESSES_FILE}: {k:?} is not a witness key")))
            .collect()
    }
}

/// The problems of `head` (as served, `wire`) of the log with key `log_key` against the required `witnesses`.
pub fn problems(
    wire: &relay_proto::wire::SignedTreeHead,
    head: &SignedTreeHead,
    log_key: &VerifyingKey,
    witnesses: &[VerifyingKey],
) -> Vec<String> {
    if witnesses.is_empty() {
        return Vec::new();
    }
    let cosignatures = match cosignatures_from_wire(wire) {
        Ok(c) => c,
        Err(e) => return vec![format!("witness cosignatures: {e}")],
    };
    witnesses
        .iter()
        .filter_map(|w| require_cosignatures(log_key, &head.head, &cosignatures, &[*w]).err())
        .map(|e| format!("NOT WITNESSED: {e}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use relay_proto::merkle::TreeHead;
    use relay_proto::witness::{Cosignature, head_to_wire};

    use super::*;

    #[test]
    fn a_head_needs_a_valid_cosignature_from_each_configured_witness() {
        let (log_key, w1, w2) =
            (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]), SigningKey::from_bytes(&[3; 32]));
        let head = TreeHead { size: 3, root: [4; 32], timestamp_ms: 5 }.sign(&log_key);
        let c1 = Cosignature::sign(&w1, &log_key.verifying_key(), &head.head, 6);
        let c2 = Cosignature::sign(&w2, &log_key.verifying_key(), &head.head, 6);
        let both = [w1.verifying_key(), w2.verifying_key()];
        let check = |cosignatures: &[Cosignature], required: &[VerifyingKey]| {
            problems(&head_to_wire(&head, cosignatures), &head, &log_key.verifying_key(), required)
        };
        assert!(check(&[c1, c2], &both).is_empty());
        assert!(check(&[], &[]).is_empty(), "nothing required without witnesses");
        let missing = check(&[c1], &both);
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(missing[0].contains("no cosignature from witness"), "{missing:?}");
        // A rewritten head (another root, re-signed with the log key) with the old cosignatures copied over.
        let rewritten = TreeHead { root: [9; 32], ..head.head }.sign(&log_key);
        let copied = problems(&head_to_wire(&rewritten, &[c1, c2]), &rewritten, &log_key.verifying_key(), &both);
        assert_eq!(copied.len(), 2, "{copied:?}");
        // A forged cosignature: another key's signature claiming the witness.
        let mut forged = Cosignature::sign(&SigningKey::from_bytes(&[8; 32]), &log_key.verifying_key(), &head.head, 6);
        forged.witness_key = w1.verifying_key().to_bytes();
        let refused = check(&[forged], &both[..1]);
        assert!(refused[0].contains("does not verify"), "{refused:?}");
    }

    #[test]
    fn witness_keys_are_remembered_in_the_home_and_checked() {
        let dir = tempfile::tempdir().expect("dir");
        let home = Home::new(dir.path());
        let key = hex::encode(SigningKey::from_bytes(&[2; 32]).verifying_key().as_bytes());
        assert_eq!(Witnesses::load(&home).expect("none"), Witnesses::default());
        Witnesses::remember(&home, std::slice::from_ref(&key)).expect("remember");
        Witnesses::remember(&home, std::slice::from_ref(&key.to_uppercase())).expect("again, once");
        let loaded = Witnesses::load(&home).expect("load");
        assert_eq!(loaded.keys, [key]);
        assert_eq!(loaded.parsed().expect("parse").len(), 1);
        assert!(Witnesses::remember(&home, &["zz".into()]).is_err());
    }
}
