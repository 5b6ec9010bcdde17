//! The relay's copy of the exporter's Merkle export log, kept so that each user can fetch the entries that concern
//! them, with proofs, from the relay they already talk to.
//!
//! The relay is not trusted for any of it: the exporter signs every tree head with its log key, and a client checks
//! each entry's inclusion proof against a signed head and the consistency of that head with the one it saw before.
//! What the relay adds is the index by account, which only the exporter can supply (a leaf holds no account id).
//!
//! Layout of the `export_log` tree (keys start with a one-byte kind):
//! - `0` → the exporter's Ed25519 log key (32 bytes), pinned by the first publication.
//! - `1 ‖ index (BE)` → `account id (16) ‖ canonical leaf`.
//! - `2 ‖ account id ‖ index (BE)` → empty: the account's entries in log order.
//! - `3 ‖ size (BE)` → signed tree head: `timestamp_ms (8, BE) ‖ root (32) ‖ signature (64)`.
//! - `4 ‖ size (BE) ‖ witness key (32)` → a witness's cosignature of the head of that size: `timestamp_ms (8, BE) ‖
//!   signature (64)`. At most `relay_proto::witness::MAX_COSIGNATURES` witnesses per head; each cosignature is
//!   checked under the key it names (the relay knows no witness; clients check the keys they configured).
//!
//! Contract: a publication is all or nothing (one sled transaction) and only ever extends the log: it must start at
//! the current size, carry leaves that decode, and come with a head whose signature verifies under the pinned key and
//! whose root is the root over the log with the new leaves. A publication with no entries at the current size
//! re-publishes the latest head, adding the cosignatures it carries. The in-memory tree is updated only after the transaction
//! commits. The caller makes the write durable (group commit) before acknowledging it.

use std::sync::{Arc, Mutex, MutexGuard};

use ed25519_dalek::VerifyingKey;
use relay_proto::AccountId;
use relay_proto::merkle::{ExportLeaf, Hash, MerkleError, MerkleLog, SignedTreeHead, TreeHead, leaf_hash};
use relay_proto::witness::{Cosignature, MAX_COSIGNATURES, WitnessError};
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::backend::{BackendError, BoxFuture, ExportLogStore};

const KEY: u8 = 0;
const LEAF: u8 = 1;
const BY_ACCOUNT: u8 = 2;
const HEAD: u8 = 3;
const COSIGNATURE: u8 = 4;

/// Why a publication or a listing was refused, or the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportLogError {
    /// The store failed.
    #[error("export log store: {0}")]
    Store(#[from] BackendError),
    /// A stored value does not decode.
    #[error("export log store holds a corrupt value")]
    Corrupt,
    /// The publication carries a log key other than the one pinned by the first publication.
    #[error("log key differs from the one pinned at the first publication")]
    KeyChanged,
    /// The head does not match the size of the log once the entries are appended.
    #[error("head size {head} does not match the log size {size} after the entries")]
    HeadSize {
        /// Size claimed by the head.
        head: u64,
        /// Size after appending.
        size: u64,
    },
    /// A leaf, a head or a proof was refused.
    #[error(transparent)]
    Merkle(#[from] MerkleError),
    /// A cosignature does not verify under the witness key it names, or a head would carry too many.
    #[error("cosignature refused: {0}")]
    Cosignature(#[from] WitnessError),
    /// No published head has the size asked for.
    #[error("no tree head of size {0} was published")]
    NoSuchHead(u64),
}

impl From<sled::Error> for ExportLogError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.into())
    }
}

/// A page of the relay's copy of the whole log, as `ReadLog` returns it.
#[derive(Debug, Clone, Default)]
pub struct CopyPage {
    /// Number of entries held.
    pub size: u64,
    /// The pinned log key, if anything was ever published.
    pub log_key: Option<VerifyingKey>,
    /// The latest signed head, if anything was ever published.
    pub latest: Option<SignedTreeHead>,
    /// `(account, leaf)` of the entries from the start asked for, in order.
    pub entries: Vec<(AccountId, Vec<u8>)>,
    /// The published heads whose size is past the start and at most the start plus the entries returned.
    pub heads: Vec<SignedTreeHead>,
}

/// One page of an account's entries, with proofs against one head.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// The pinned log key, if anything was ever published.
    pub log_key: Option<VerifyingKey>,
    /// The head the proofs lead to.
    pub head: Option<SignedTreeHead>,
    /// `(index, leaf, audit path)` of the account's entries, oldest first.
    pub entries: Vec<(u64, Vec<u8>, Vec<Hash>)>,
    /// Where the next page starts, if `more`.
    pub next_index: u64,
    /// Whether the account has more entries below `head.size`.
    pub more: bool,
    /// Consistency proof from the size the client saw before to `head.size`.
    pub consistency: Vec<Hash>,
}

struct State {
    log: MerkleLog,
    key: Option<VerifyingKey>,
    latest: Option<u64>,
}

/// The export log tree and the Merkle tree over it (rebuilt at open from the stored leaves). Clones share both.
#[derive(Clone)]
pub struct SledExportLog {
    tree: sled::Tree,
    state: Arc<Mutex<State>>,
}

fn leaf_key(index: u64) -> [u8; 9] {
    let mut k = [LEAF; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn account_key(account: &AccountId, index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(BY_ACCOUNT);
    k.extend_from_slice(account.as_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn head_key(size: u64) -> [u8; 9] {
    let mut k = [HEAD; 9];
    k[1..].copy_from_slice(&size.to_be_bytes());
    k
}

fn cosignature_prefix(size: u64) -> [u8; 9] {
    let mut k = head_key(size);
    k[0] = COSIGNATURE;
    k
}

fn cosignature_key(size: u64, witness: &[u8; 32]) -> Vec<u8> {
    let mut k = cosignature_prefix(size).to_vec();
    k.extend_from_slice(witness);
    k
}

fn encode_head(h: &SignedTreeHead) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 32 + 64);
    v.extend_from_slice(&h.head.timestamp_ms.to_be_bytes());
    v.extend_from_slice(&h.head.root);
    v.extend_from_slice(&h.signature);
    v
}

fn decode_head(size: u64, v: &[u8]) -> Result<SignedTreeHead, ExportLogError> {
    if v.len() != 8 + 32 + 64 {
        return Err(ExportLogError::Corrupt);
    }
    let (ts, rest) = v.split_at(8);
    let (root, signature) = rest.split_at(32);
    let timestamp_ms = u64::from_be_bytes(ts.try_into().map_err(|_| ExportLogError::Corrupt)?);
    Ok(SignedTreeHead {
        head: TreeHead { size, root: root.try_into().map_err(|_| ExportLogError::Corrupt)?, timestamp_ms },
        signature: signature.try_into().map_err(|_| ExportLogError::Corrupt)?,
    })
}

impl SledExportLog {
    /// Opens the log over `tree`, rebuilding the Merkle tree from the stored leaves.
    pub(crate) fn open(tree: sled::Tree) -> Result<Self, ExportLogError> {
        let key = match tree.get([KEY])? {
            Some(v) => {
                let bytes: [u8; 32] = v.as_ref().try_into().map_err(|_| ExportLogError::Corrupt)?;
                Some(VerifyingKey::from_bytes(&bytes).map_err(|_| ExportLogError::Corrupt)?)
            }
            None => None,
        };
        let mut hashes = Vec::new();
        for item in tree.scan_prefix([LEAF]) {
            let (_, v) = item?;
            let leaf = v.get(16..).ok_or(ExportLogError::Corrupt)?;
            hashes.push(leaf_hash(leaf));
        }
        let log = MerkleLog::from_leaf_hashes(hashes);
        let latest = match tree.scan_prefix([HEAD]).next_back() {
            Some(item) => {
                let (k, _) = item?;
                Some(u64::from_be_bytes(k.get(1..9).and_then(|b| b.try_into().ok()).ok_or(ExportLogError::Corrupt)?))
            }
            None => None,
        };
        Ok(Self { tree, state: Arc::new(Mutex::new(State { log, key, latest })) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated: it is replaced only after commits.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn len_now(&self) -> u64 {
        self.state().log.len()
    }

    fn is_empty_now(&self) -> bool {
        self.len_now() == 0
    }

    fn publish_now(
        &self,
        first_index: u64,
        entries: &[(AccountId, Vec<u8>)],
        head: &SignedTreeHead,
        key: &VerifyingKey,
        cosignatures: &[Cosignature],
    ) -> Result<u64, ExportLogError> {
        let mut state = self.state();
        if state.key.is_some_and(|pinned| pinned != *key) {
            return Err(ExportLogError::KeyChanged);
        }
        if first_index != state.log.len() {
            return Ok(state.log.len());
        }
        head.verify(key)?;
        let mut log = state.log.clone();
        for (_, leaf) in entries {
            ExportLeaf::decode(leaf)?;
            log.append(leaf);
        }
        if head.head.size != log.len() {
            return Err(ExportLogError::HeadSize { head: head.head.size, size: log.len() });
        }
        if head.head.root != log.root() {
            return Err(MerkleError::RootMismatch.into());
        }
        for c in cosignatures {
            c.verify_self_named(key, &head.head)?;
        }
        let mut witnesses: std::collections::BTreeSet<[u8; 32]> =
            self.cosignatures_now(head.head.size)?.iter().map(|c| c.witness_key).collect();
        witnesses.extend(cosignatures.iter().map(|c| c.witness_key));
        if witnesses.len() > MAX_COSIGNATURES {
            return Err(WitnessError::TooMany(witnesses.len()).into());
        }
        let result = self.tree.transaction(|t| {
            if state.key.is_none() {
                t.insert(&[KEY][..], &key.to_bytes()[..])?;
            }
            for (offset, (account, leaf)) in (first_index..).zip(entries) {
                let mut v = Vec::with_capacity(16 + leaf.len());
                v.extend_from_slice(account.as_bytes());
                v.extend_from_slice(leaf);
                t.insert(&leaf_key(offset)[..], v)?;
                t.insert(account_key(account, offset), &[][..])?;
            }
            t.insert(&head_key(head.head.size)[..], encode_head(head))?;
            for c in cosignatures {
                let mut v = Vec::with_capacity(8 + 64);
                v.extend_from_slice(&c.timestamp_ms.to_be_bytes());
                v.extend_from_slice(&c.signature);
                t.insert(cosignature_key(head.head.size, &c.witness_key), v)?;
            }
            Ok::<_, ConflictableTransactionError<ExportLogError>>(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        }
        state.log = log;
        state.key = Some(*key);
        state.latest = Some(head.head.size);
        Ok(state.log.len())
    }

    fn cosignatures_now(&self, size: u64) -> Result<Vec<Cosignature>, ExportLogError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(cosignature_prefix(size)) {
            let (k, v) = item?;
            let (ts, signature) = v.split_at_checked(8).ok_or(ExportLogError::Corrupt)?;
            out.push(Cosignature {
                witness_key: k.get(9..).and_then(|w| w.try_into().ok()).ok_or(ExportLogError::Corrupt)?,
                timestamp_ms: u64::from_be_bytes(ts.try_into().map_err(|_| ExportLogError::Corrupt)?),
                signature: signature.try_into().map_err(|_| ExportLogError::Corrupt)?,
            });
        }
        Ok(out)
    }

    fn wire_head_now(&self, head: &SignedTreeHead) -> Result<relay_proto::wire::SignedTreeHead, ExportLogError> {
        Ok(relay_proto::witness::head_to_wire(head, &self.cosignatures_now(head.head.size)?))
    }

    fn copy_now(&self, start: u64, max_entries: usize, max_bytes: usize) -> Result<CopyPage, ExportLogError> {
        let state = self.state();
        let latest = match state.latest {
            Some(size) => match self.tree.get(head_key(size))? {
                Some(v) => Some(decode_head(size, &v)?),
                None => return Err(ExportLogError::Corrupt),
            },
            None => None,
        };
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        if start < state.log.len() {
            for item in self.tree.range(leaf_key(start)..leaf_key(state.log.len())).take(max_entries) {
                let (_, v) = item?;
                let (account, leaf) = v.split_at_checked(16).ok_or(ExportLogError::Corrupt)?;
                bytes = bytes.saturating_add(leaf.len());
                if !entries.is_empty() && bytes > max_bytes {
                    break;
                }
                entries.push((AccountId::from_slice(account).ok_or(ExportLogError::Corrupt)?, leaf.to_vec()));
            }
        }
        let mut heads = Vec::new();
        if !entries.is_empty() {
            let end = start.saturating_add(entries.len() as u64);
            for item in self.tree.range(head_key(start.saturating_add(1))..=head_key(end)) {
                let (k, v) = item?;
                let size =
                    u64::from_be_bytes(k.get(1..9).and_then(|b| b.try_into().ok()).ok_or(ExportLogError::Corrupt)?);
                heads.push(decode_head(size, &v)?);
            }
        }
        Ok(CopyPage { size: state.log.len(), log_key: state.key, latest, entries, heads })
    }

    fn list_now(
        &self,
        account: &AccountId,
        tree_size: u64,
        start_index: u64,
        since_size: u64,
        limit: usize,
    ) -> Result<Listing, ExportLogError> {
        let state = self.state();
        let size = match (tree_size, state.latest) {
            (0, None) => return Ok(Listing { log_key: state.key, ..Listing::default() }),
            (0, Some(latest)) => latest,
            (size, _) => size,
        };
        let head = match self.tree.get(head_key(size))? {
            Some(v) => decode_head(size, &v)?,
            None => return Err(ExportLogError::NoSuchHead(size)),
        };
        let consistency = if since_size == 0 { Vec::new() } else { state.log.consistency_proof(since_size, size)? };
        let mut entries = Vec::new();
        let mut next_index = start_index;
        let mut more = false;
        for item in self.tree.range(account_key(account, start_index)..account_key(account, size)) {
            let (k, _) = item?;
            let index =
                u64::from_be_bytes(k.get(17..25).and_then(|b| b.try_into().ok()).ok_or(ExportLogError::Corrupt)?);
            if entries.len() == limit {
                more = true;
                next_index = index;
                break;
            }
            let stored = self.tree.get(leaf_key(index))?.ok_or(ExportLogError::Corrupt)?;
            let leaf = stored.get(16..).ok_or(ExportLogError::Corrupt)?.to_vec();
            entries.push((index, leaf, state.log.inclusion_proof(index, size)?));
            next_index = index.checked_add(1).ok_or(ExportLogError::Corrupt)?;
        }
        Ok(Listing { log_key: state.key, head: Some(head), entries, next_index, more, consistency })
    }
}

impl ExportLogStore for SledExportLog {
    fn len(&self) -> BoxFuture<'_, u64> {
        Box::pin(std::future::ready(self.len_now()))
    }

    fn is_empty(&self) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(self.is_empty_now()))
    }

    fn publish<'a>(
        &'a self,
        first_index: u64,
        entries: &'a [(AccountId, Vec<u8>)],
        head: &'a SignedTreeHead,
        key: &'a VerifyingKey,
        cosignatures: &'a [Cosignature],
    ) -> BoxFuture<'a, Result<u64, ExportLogError>> {
        Box::pin(std::future::ready(self.publish_now(first_index, entries, head, key, cosignatures)))
    }

    fn cosignatures(&self, size: u64) -> BoxFuture<'_, Result<Vec<Cosignature>, ExportLogError>> {
        Box::pin(std::future::ready(self.cosignatures_now(size)))
    }

    fn wire_head<'a>(
        &'a self,
        head: &'a SignedTreeHead,
    ) -> BoxFuture<'a, Result<relay_proto::wire::SignedTreeHead, ExportLogError>> {
        Box::pin(std::future::ready(self.wire_head_now(head)))
    }

    fn copy(
        &self,
        start: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<CopyPage, ExportLogError>> {
        Box::pin(std::future::ready(self.copy_now(start, max_entries, max_bytes)))
    }

    fn list<'a>(
        &'a self,
        account: &'a AccountId,
        tree_size: u64,
        start_index: u64,
        since_size: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Listing, ExportLogError>> {
        Box::pin(std::future::ready(self.list_now(account, tree_size, start_index, since_size, limit)))
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;

    fn leaf(n: u8) -> Vec<u8> {
        ExportLeaf {
            kind: relay_proto::merkle::LeafKind::Export,
            notice_hash: Some([n; 32]),
            export_id: [n; 16],
            affiliate: "adsco".into(),
            purpose: "advertising".into(),
            fields: vec!["device_model".into()],
            payload_hash: [n; 32],
            consent_hash: [n; 32],
            time_ms: u64::from(n),
        }
        .encode()
        .expect("leaf")
    }

    /// The log as the relay holds it (behind its trait), and the database, to reopen it as a restart would.
    fn open() -> (crate::store::ExportLog, sled::Db) {
        let db = sled::Config::new().temporary(true).open().expect("db");
        (Arc::new(SledExportLog::open(db.open_tree("export_log").expect("tree")).expect("open")), db)
    }

    fn head_over(leaves: &[Vec<u8>], key: &SigningKey) -> SignedTreeHead {
        let mut log = MerkleLog::new();
        for l in leaves {
            log.append(l);
        }
        log.tree_head(7).sign(key)
    }

    /// Cosignatures come with a publication or a re-publication of the latest head (no entries), are checked under
    /// the key they name, bounded per head, and served with the head.
    #[tokio::test]
    async fn cosignatures_are_checked_kept_and_served_with_their_head() {
        let (log, _db) = open();
        let key = SigningKey::from_bytes(&[1; 32]);
        let alice = AccountId::from_identity_key(&[1; 32]);
        let leaves: Vec<_> = (0..2).map(leaf).collect();
        let entries: Vec<_> = leaves.iter().map(|l| (alice, l.clone())).collect();
        let head = head_over(&leaves, &key);
        let witness = |n: u8| Cosignature::sign(&SigningKey::from_bytes(&[n; 32]), &key.verifying_key(), &head.head, 9);
        assert_eq!(log.publish(0, &entries, &head, &key.verifying_key(), &[witness(10)]).await.expect("publish"), 2);
        // The witness that was down answers later: the head is re-published with its cosignature.
        assert_eq!(log.publish(2, &[], &head, &key.verifying_key(), &[witness(11)]).await.expect("republish"), 2);
        let served = log.wire_head(&head).await.expect("wire");
        let keys: Vec<_> = served.cosignatures.iter().map(|c| c.witness_key.to_vec()).collect();
        assert_eq!(keys, [witness(10).witness_key.to_vec(), witness(11).witness_key.to_vec()]);
        // One that does not verify under the key it names is refused, and nothing of that publication is kept.
        let mut forged = witness(12);
        forged.witness_key = witness(13).witness_key;
        assert!(matches!(
            log.publish(2, &[], &head, &key.verifying_key(), &[forged]).await,
            Err(ExportLogError::Cosignature(_))
        ));
        assert_eq!(log.cosignatures(2).await.expect("read").len(), 2);
        let many: Vec<_> = (20..40).map(witness).collect();
        assert!(log.publish(2, &[], &head, &key.verifying_key(), &many).await.is_err(), "bounded per head");
        assert_eq!(log.cosignatures(2).await.expect("read").len(), 2);
    }

    #[tokio::test]
    async fn publications_extend_the_log_and_each_account_sees_only_its_entries() {
        let (log, db) = open();
        let key = SigningKey::from_bytes(&[1; 32]);
        let (alice, bob) = (AccountId::from_identity_key(&[1; 32]), AccountId::from_identity_key(&[2; 32]));
        let leaves: Vec<_> = (0..5).map(leaf).collect();
        let first = [(alice, leaves[0].clone()), (bob, leaves[1].clone()), (alice, leaves[2].clone())];
        assert_eq!(
            log.publish(0, &first, &head_over(&leaves[..3], &key), &key.verifying_key(), &[]).await.expect("publish"),
            3
        );
        // A stale or future start writes nothing and reports the size.
        assert_eq!(
            log.publish(1, &first, &head_over(&leaves[..3], &key), &key.verifying_key(), &[]).await.expect("stale"),
            3
        );
        let second = [(alice, leaves[3].clone()), (bob, leaves[4].clone())];
        let head = head_over(&leaves, &key);
        assert_eq!(log.publish(3, &second, &head, &key.verifying_key(), &[]).await.expect("publish"), 5);

        let listing = log.list(&alice, 0, 0, 3, 100).await.expect("list");
        assert_eq!(listing.head, Some(head));
        let indices: Vec<_> = listing.entries.iter().map(|(i, _, _)| *i).collect();
        assert_eq!(indices, [0, 2, 3]);
        for (index, leaf, proof) in &listing.entries {
            relay_proto::merkle::verify_inclusion(&leaf_hash(leaf), *index, 5, proof, &head.head.root).expect("proof");
        }
        let old_root = head_over(&leaves[..3], &key).head.root;
        relay_proto::merkle::verify_consistency(3, 5, &old_root, &head.head.root, &listing.consistency).expect("cons");
        let bob_listing = log.list(&bob, 0, 0, 0, 100).await.expect("list");
        assert_eq!(bob_listing.entries.iter().map(|(i, _, _)| *i).collect::<Vec<_>>(), [1, 4]);

        // Pages, and the state survives a reopen.
        let page = log.list(&alice, 5, 0, 0, 2).await.expect("page");
        assert!(page.more);
        assert_eq!(page.next_index, 3);
        let reopened = SledExportLog::open(db.open_tree("export_log").expect("tree")).expect("reopen");
        assert_eq!(reopened.len().await, 5);
        assert_eq!(reopened.list(&alice, 5, 3, 0, 2).await.expect("page").entries.len(), 1);
        assert!(matches!(reopened.list(&alice, 4, 0, 0, 2).await, Err(ExportLogError::NoSuchHead(4))));
    }

    /// `ReadLog`'s pages: entries in order with the heads over them, bounded by count and bytes (never empty while
    /// an entry is asked for and there is one), and extreme starts list nothing.
    #[tokio::test]
    async fn the_copy_is_read_back_in_bounded_pages_with_its_heads() {
        let (log, _db) = open();
        let key = SigningKey::from_bytes(&[1; 32]);
        let alice = AccountId::from_identity_key(&[1; 32]);
        let leaves: Vec<_> = (0..5).map(leaf).collect();
        let entries: Vec<_> = leaves.iter().map(|l| (alice, l.clone())).collect();
        assert!(log.copy(0, 256, 1 << 20).await.expect("empty").latest.is_none());
        log.publish(0, &entries[..3], &head_over(&leaves[..3], &key), &key.verifying_key(), &[])
            .await
            .expect("publish");
        let last = head_over(&leaves, &key);
        log.publish(3, &entries[3..], &last, &key.verifying_key(), &[]).await.expect("publish");

        let all = log.copy(0, 256, 1 << 20).await.expect("copy");
        assert_eq!((all.size, all.latest, all.log_key), (5, Some(last), Some(key.verifying_key())));
        assert_eq!(all.entries, entries);
        assert_eq!(all.heads.iter().map(|h| h.head.size).collect::<Vec<_>>(), [3, 5]);
        let page = log.copy(1, 2, 1 << 20).await.expect("page");
        assert_eq!(page.entries, entries[1..3]);
        assert_eq!(page.heads.iter().map(|h| h.head.size).collect::<Vec<_>>(), [3]);
        let one = log.copy(0, 256, 1).await.expect("a byte bound");
        assert_eq!(one.entries.len(), 1, "at least one entry");
        let head_only = log.copy(0, 0, 1 << 20).await.expect("size only");
        assert!(head_only.entries.is_empty() && head_only.heads.is_empty());
        assert_eq!(head_only.latest, Some(last));
        for start in [5, u64::MAX] {
            let past = log.copy(start, 256, 1 << 20).await.expect("past the end");
            assert!(past.entries.is_empty() && past.heads.is_empty(), "{start}");
        }
    }

    /// `tree_size`, `start_index` and `since_size` come from the client: extreme values are refused or list
    /// nothing, and never panic.
    #[tokio::test]
    async fn listing_with_extreme_numbers_from_the_client_never_panics() {
        let (log, _db) = open();
        let key = SigningKey::from_bytes(&[1; 32]);
        let alice = AccountId::from_identity_key(&[1; 32]);
        let leaves: Vec<_> = (0..3).map(leaf).collect();
        let entries: Vec<_> = leaves.iter().map(|l| (alice, l.clone())).collect();
        log.publish(0, &entries, &head_over(&leaves, &key), &key.verifying_key(), &[]).await.expect("publish");
        for (tree_size, start, since) in [
            (0, u64::MAX, 0),
            (0, 4, 0),
            (0, 0, u64::MAX),
            (0, 0, 4),
            (u64::MAX, 0, 0),
            (3, u64::MAX, u64::MAX),
            (0, u64::MAX - 1, 3),
        ] {
            match log.list(&alice, tree_size, start, since, 100).await {
                Ok(listing) => assert!(listing.entries.is_empty(), "{tree_size} {start} {since}"),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        let all = log.list(&alice, 0, 0, 0, 100).await.expect("list");
        assert_eq!(all.entries.len(), 3);
        assert_eq!(all.next_index, 3);
    }

    #[tokio::test]
    async fn bad_publications_are_refused_and_change_nothing() {
        let (log, _db) = open();
        let key = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let alice = AccountId::from_identity_key(&[1; 32]);
        let leaves: Vec<_> = (0..2).map(leaf).collect();
        let entries = [(alice, leaves[0].clone()), (alice, leaves[1].clone())];
        let good = head_over(&leaves, &key);
        let mut bad_sig = good;
        bad_sig.signature[0] ^= 1;
        assert!(matches!(
            log.publish(0, &entries, &bad_sig, &key.verifying_key(), &[]).await,
            Err(ExportLogError::Merkle(MerkleError::BadSignature))
        ));
        let wrong_root = head_over(&leaves[..1], &key);
        assert!(log.publish(0, &entries, &wrong_root, &key.verifying_key(), &[]).await.is_err());
        let garbage = [(alice, vec![9, 9, 9])];
        assert!(log.publish(0, &garbage, &good, &key.verifying_key(), &[]).await.is_err());
        assert_eq!(log.len().await, 0);
        log.publish(0, &entries, &good, &key.verifying_key(), &[]).await.expect("publish");
        let more = [(alice, leaf(3))];
        let mut all = leaves.clone();
        all.push(leaf(3));
        assert!(matches!(
            log.publish(2, &more, &head_over(&all, &other), &other.verifying_key(), &[]).await,
            Err(ExportLogError::KeyChanged)
        ));
        assert_eq!(log.len().await, 2);
    }
}
