//! The bodies the exporter delivered, kept encrypted at rest for as long as the notice let the affiliate keep them,
//! so that the operator can show a regulator exactly what was shared (`relay-audit --regulator-pack`), and for no
//! longer.
//!
//! Contract: a body is stored sealed with ChaCha20-Poly1305 under `bodies.key` (32 random bytes, mode 0600, in the
//! exporter's data dir; never in the store), a fresh random nonce per body, and its webhook id, account, affiliate,
//! purpose and times as associated data, so a record moved to another id or edited does not open. A body carries a
//! deadline: the notice's retention counted from delivery, or none for "until withdrawn", in which case the pair's
//! withdrawal deletes it. [`Vault::purge`] deletes what is past its deadline; [`Vault::erase_account`] deletes an
//! account's bodies at once (erasure). Nothing here logs a body or a phone number.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use relay_proto::AccountId;
use relay_proto::consent::Purpose;
use serde::{Deserialize, Serialize};

use crate::ids::{Pair, WebhookId};

/// Why the vault failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// sled failed.
    #[error("body vault: {0}")]
    Sled(#[from] sled::Error),
    /// The key file could not be read or made.
    #[error("body vault key: {0}")]
    Key(#[from] std::io::Error),
    /// A stored record does not decode or does not open under the key.
    #[error("body vault holds a record that does not open: {0}")]
    Corrupt(String),
}

/// One delivered body, opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptBody {
    /// The webhook id it was delivered under.
    pub id: String,
    /// The account it is about.
    pub account: String,
    /// The affiliate that received it.
    pub affiliate: String,
    /// The purpose.
    pub purpose: String,
    /// When it was delivered (ms since the Unix epoch): the export's log time.
    pub delivered_ms: u64,
    /// When it is deleted, if the retention is a number of days.
    pub delete_after_ms: Option<u64>,
    /// The body, exactly as posted.
    pub body: String,
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    account: String,
    affiliate: String,
    purpose: String,
    delivered_ms: u64,
    delete_after_ms: Option<u64>,
    nonce: String,
    ciphertext: String,
}

impl Sealed {
    fn aad(&self, id: &str) -> Vec<u8> {
        format!(
            "consent-relay vault v1\n{id}\n{}\n{}\n{}\n{}\n{:?}",
            self.account, self.affiliate, self.purpose, self.delivered_ms, self.delete_after_ms
        )
        .into_bytes()
    }
}

/// The encrypted bodies, keyed by webhook id, in the exporter's store.
#[derive(Clone)]
pub struct Vault {
    tree: sled::Tree,
    cipher: ChaCha20Poly1305,
}

impl Vault {
    /// The vault in `tree`, with the key in `key_path` (created, mode 0600, if missing).
    pub fn open(tree: sled::Tree, key_path: &Path) -> Result<Self, VaultError> {
        if !key_path.exists() {
            let key: [u8; 32] = rand::random();
            relay_quic::durable_file::create_secret(key_path, &key)?;
        }
        let key: [u8; 32] = std::fs::read(key_path)?
            .try_into()
            .map_err(|_| VaultError::Corrupt(format!("{} is not 32 bytes", key_path.display())))?;
        Ok(Self { tree, cipher: ChaCha20Poly1305::new(&key.into()) })
    }

    /// The vault in `tree` with the key in `key_path`, without creating anything: `None` if there is no key (this
    /// exporter never kept a body). For readers such as the auditor, which write nothing into the data dir.
    pub fn open_existing(tree: sled::Tree, key_path: &Path) -> Result<Option<Self>, VaultError> {
        if !key_path.exists() {
            return Ok(None);
        }
        Self::open(tree, key_path).map(Some)
    }

    /// Keeps `body`, delivered under `id` for `pair` at `delivered_ms`, until `delete_after_ms` (none: until the
    /// pair's withdrawal or the account's erasure). Not durable until the store's next flush.
    pub fn put(
        &self,
        id: &WebhookId,
        pair: &Pair,
        body: &str,
        delivered_ms: u64,
        delete_after_ms: Option<u64>,
    ) -> Result<(), VaultError> {
        let nonce: [u8; 12] = rand::random();
        let mut sealed = Sealed {
            account: pair.account.to_string(),
            affiliate: pair.affiliate.clone(),
            purpose: pair.purpose.as_str().into(),
            delivered_ms,
            delete_after_ms,
            nonce: hex::encode(nonce),
            ciphertext: String::new(),
        };
        let aad = sealed.aad(&id.to_string());
        let ciphertext = self
            .cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: body.as_bytes(), aad: &aad })
            .map_err(|_| VaultError::Corrupt("encryption failed".into()))?;
        sealed.ciphertext = hex::encode(ciphertext);
        let value = serde_json::to_vec(&sealed).map_err(|e| VaultError::Corrupt(e.to_string()))?;
        self.tree.insert(id.to_string(), value)?;
        Ok(())
    }

    fn open_record(&self, key: &[u8], value: &[u8]) -> Result<KeptBody, VaultError> {
        let id = String::from_utf8_lossy(key).into_owned();
        let sealed: Sealed = serde_json::from_slice(value).map_err(|e| VaultError::Corrupt(e.to_string()))?;
        let nonce: [u8; 12] = hex::decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| VaultError::Corrupt(format!("{id}: nonce")))?;
        let ciphertext = hex::decode(&sealed.ciphertext).map_err(|_| VaultError::Corrupt(format!("{id}: hex")))?;
        let aad = sealed.aad(&id);
        let body = self
            .cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: &ciphertext, aad: &aad })
            .map_err(|_| VaultError::Corrupt(format!("{id}: does not open under the vault key")))?;
        Ok(KeptBody {
            id,
            account: sealed.account,
            affiliate: sealed.affiliate,
            purpose: sealed.purpose,
            delivered_ms: sealed.delivered_ms,
            delete_after_ms: sealed.delete_after_ms,
            body: String::from_utf8(body).map_err(|_| VaultError::Corrupt("body is not UTF-8".into()))?,
        })
    }

    /// Every body delivered in `[from_ms, to_ms)`, opened, by webhook id.
    pub fn delivered_between(&self, from_ms: u64, to_ms: u64) -> Result<Vec<KeptBody>, VaultError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            let kept = self.open_record(&k, &v)?;
            if (from_ms..to_ms).contains(&kept.delivered_ms) {
                out.push(kept);
            }
        }
        Ok(out)
    }

    fn remove_where(&self, doomed: impl Fn(&Sealed) -> bool) -> Result<usize, VaultError> {
        let mut removed = 0;
        for item in self.tree.iter() {
            let (k, v) = item?;
            let sealed: Sealed = serde_json::from_slice(&v).map_err(|e| VaultError::Corrupt(e.to_string()))?;
            if doomed(&sealed) {
                self.tree.remove(k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes every body past its deadline at `now_ms`; how many.
    pub fn purge(&self, now_ms: u64) -> Result<usize, VaultError> {
        self.remove_where(|s| s.delete_after_ms.is_some_and(|d| d <= now_ms))
    }

    /// Deletes the bodies of `pair` kept until its withdrawal (at the withdrawal); how many.
    pub fn withdrawn(&self, pair: &Pair) -> Result<usize, VaultError> {
        let (account, purpose) = (pair.account.to_string(), pair.purpose.as_str());
        self.remove_where(|s| {
            s.delete_after_ms.is_none() && s.account == account && s.affiliate == pair.affiliate && s.purpose == purpose
        })
    }

    /// Deletes every body about `account` (erasure); how many.
    pub fn erase_account(&self, account: &AccountId) -> Result<usize, VaultError> {
        let account = account.to_string();
        self.remove_where(|s| s.account == account)
    }

    /// How many bodies are kept.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

/// The deadline of a body delivered at `delivered_ms` under a notice with `retention`: `None` for "until withdrawn".
pub fn deadline(delivered_ms: u64, retention: relay_proto::notice::Retention) -> Option<u64> {
    match retention {
        relay_proto::notice::Retention::Days(days) => {
            Some(delivered_ms.saturating_add(u64::from(days).saturating_mul(24 * 3600 * 1000)))
        }
        relay_proto::notice::Retention::UntilWithdrawn => None,
    }
}

/// The purpose of a kept body, parsed.
pub fn purpose_of(kept: &KeptBody) -> Option<Purpose> {
    Purpose::parse(&kept.purpose)
}

#[cfg(test)]
mod tests {
    use relay_proto::notice::Retention;

    use super::*;

    fn vault(dir: &Path) -> Vault {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        Vault::open(db.open_tree("bodies").expect("tree"), &dir.join("bodies.key")).expect("vault")
    }

    #[test]
    fn bodies_are_sealed_at_rest_and_open_only_as_stored() {
        let dir = tempfile::tempdir().expect("dir");
        let v = vault(dir.path());
        let pair = Pair::new(AccountId([1; 16]), "shieldco", Purpose::Security);
        let id = WebhookId::from_export_id([7; 16]);
        let body = r#"{"type":"user.metadata.exported","data":{"phone":"+33612345678"}}"#;
        v.put(&id, &pair, body, 1_000, deadline(1_000, Retention::Days(90))).expect("put");
        let raw = v.tree.get(id.to_string()).expect("read").expect("stored");
        assert!(!raw.windows(12).any(|w| w == b"+33612345678"), "the phone number is not stored in clear");
        let kept = v.delivered_between(0, 2_000).expect("open");
        assert_eq!(kept.len(), 1);
        assert_eq!((kept[0].body.as_str(), kept[0].affiliate.as_str()), (body, "shieldco"));
        assert!(v.delivered_between(1_001, 2_000).expect("open").is_empty(), "outside the period");

        // A record edited at rest (its affiliate, say) no longer opens.
        let mut sealed: Sealed = serde_json::from_slice(&raw).expect("json");
        sealed.affiliate = "adsco".into();
        v.tree.insert(id.to_string(), serde_json::to_vec(&sealed).expect("json")).expect("write");
        assert!(matches!(v.delivered_between(0, 2_000), Err(VaultError::Corrupt(_))));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("bodies.key")).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn bodies_leave_at_their_deadline_their_withdrawal_or_the_accounts_erasure() {
        let dir = tempfile::tempdir().expect("dir");
        let v = vault(dir.path());
        let (alice, bob) = (AccountId([1; 16]), AccountId([2; 16]));
        let sec = Pair::new(alice, "shieldco", Purpose::Security);
        let ads = Pair::new(alice, "adsco", Purpose::Advertising);
        let bobs = Pair::new(bob, "adsco", Purpose::Advertising);
        let day = 24 * 3600 * 1000;
        v.put(&WebhookId::from_export_id([1; 16]), &sec, "a", 0, deadline(0, Retention::Days(90))).expect("put");
        v.put(&WebhookId::from_export_id([2; 16]), &ads, "b", 0, deadline(0, Retention::UntilWithdrawn)).expect("put");
        v.put(&WebhookId::from_export_id([3; 16]), &bobs, "c", 0, None).expect("put");
        assert_eq!(v.purge(90 * day - 1).expect("purge"), 0);
        assert_eq!(v.purge(90 * day).expect("purge"), 1, "the security body at 90 days");
        assert_eq!(v.purge(u64::MAX).expect("purge"), 0, "until withdrawn: no deadline");
        assert_eq!(v.withdrawn(&ads).expect("withdrawn"), 1);
        assert_eq!(v.erase_account(&bob).expect("erase"), 1);
        assert!(v.is_empty());
    }
}
