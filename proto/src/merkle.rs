//! The verifiable export log: RFC 6962 Merkle hash trees (section 2.1), audit paths and consistency proofs, and the
//! RFC 9162 (section 2.1.3.2 and 2.1.4.2) algorithms that check them without the log.
//!
//! Every metadata export is appended to the log as one leaf; the relay publishes signed tree heads. A user can then
//! check that an export concerning them is in the log (inclusion proof) and an auditor can check that the log only
//! ever grew (consistency proof between two tree heads), both without trusting the relay.
//!
//! This module does no I/O and keeps no clock: leaf bytes, sizes and times go in, hashes, proofs and typed errors come
//! out. The verification functions take untrusted input: they never panic, reject a proof of the wrong length before
//! hashing anything, and do at most a few hundred hash computations whatever the sizes claimed.
//!
//! The log's leaves are [`ExportLeaf`] records: field names and hashes, never the exported data itself. Tree heads
//! are signed with Ed25519 over a domain-separated encoding ([`TreeHead::encode`]).
//!
//! A proof does not by itself bind the tree size: an audit path for leaf 0 of a 4-leaf tree also checks as an audit
//! path for leaf 0 of a 3-leaf tree with the same root, because a verifier cannot tell a leaf hash from a node hash in
//! the path. Sizes must therefore come from a signed tree head, which binds the size and the root together.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::auth::SIGNATURE_LEN;

/// Length of every hash in the tree (SHA-256).
pub const HASH_LEN: usize = 32;

/// A SHA-256 value: a leaf hash, an interior node hash or a tree root.
pub type Hash = [u8; HASH_LEN];

/// Why a proof, a tree head or an export leaf was rejected, or a log query could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MerkleError {
    /// The leaf index is not inside the tree.
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange {
        /// The index asked for.
        index: u64,
        /// The size of the tree.
        size: u64,
    },
    /// The log holds fewer leaves than the tree size asked for.
    #[error("tree size {size} exceeds the {len} leaves of the log")]
    SizeOutOfRange {
        /// The tree size asked for.
        size: u64,
        /// The number of leaves in the log.
        len: u64,
    },
    /// A consistency proof was asked for or presented with the old tree larger than the new one.
    #[error("old tree size {old} is larger than new tree size {new}")]
    BadSizes {
        /// The old tree size.
        old: u64,
        /// The new tree size.
        new: u64,
    },
    /// The proof does not have the number of hashes that the index and sizes call for.
    #[error("proof has {got} hashes where {expected} are needed")]
    WrongProofLength {
        /// The number of hashes the sizes call for.
        expected: usize,
        /// The number of hashes presented.
        got: usize,
    },
    /// The proof leads to a root other than the (new) root presented.
    #[error("proof does not lead to the root presented")]
    RootMismatch,
    /// The consistency proof leads to an old root other than the one presented.
    #[error("consistency proof does not lead to the old root presented")]
    OldRootMismatch,
    /// The tree head signature does not verify under the log's key.
    #[error("tree head signature does not verify")]
    BadSignature,
    /// An encoded export leaf ends before its last field.
    #[error("export leaf is truncated")]
    LeafTruncated,
    /// An encoded export leaf has bytes after its last field.
    #[error("export leaf has {extra} trailing bytes")]
    LeafTrailingBytes {
        /// How many bytes follow the last field.
        extra: usize,
    },
    /// An encoded export leaf starts with a version this code does not know.
    #[error("unsupported export leaf version {version}")]
    LeafVersion {
        /// The version byte found.
        version: u8,
    },
    /// An encoded export leaf names a kind this code does not know, or a version-1 leaf (which has no notice hash)
    /// is not an export.
    #[error("unsupported export leaf kind {kind}")]
    LeafKind {
        /// The kind byte found.
        kind: u8,
    },
    /// A string of an export leaf is longer than [`MAX_LEAF_STRING_LEN`].
    #[error("export leaf string of {len} bytes exceeds the maximum of {max} bytes")]
    LeafStringTooLong {
        /// The length of the string, in bytes.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
    /// An export leaf lists more than [`MAX_LEAF_FIELDS`] field names.
    #[error("export leaf lists {count} fields, more than the maximum of {max}")]
    LeafTooManyFields {
        /// The number of field names.
        count: usize,
        /// The maximum in force.
        max: usize,
    },
    /// A string of an encoded export leaf is not UTF-8.
    #[error("export leaf string is not UTF-8")]
    LeafNotUtf8,
    /// A tree head, hash or key received on the wire has the wrong length.
    #[error("{0} has the wrong length")]
    WrongLength(&'static str),
}

/// The RFC 6962 hash of a leaf: SHA-256(0x00 ‖ leaf).
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    Sha256::new().chain_update([0x00]).chain_update(leaf).finalize().into()
}

/// The RFC 6962 hash of an interior node: SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Sha256::new().chain_update([0x01]).chain_update(left).chain_update(right).finalize().into()
}

/// The root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two strictly smaller than `n`, where RFC 6962 splits a tree of `n` leaves. Requires `n >= 2`.
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// Walks RFC 6962 PATH(index, D[tree_size]) from the root down, calling `sibling(start, size)` for the subtree whose
/// root each level of the audit path needs. Requires `index < tree_size`. At most 127 steps: after the first one every
/// subtree size is a power of two and halves at each step.
fn audit_path_nodes(mut index: u64, tree_size: u64, mut sibling: impl FnMut(u64, u64)) {
    let (mut start, mut size) = (0, tree_size);
    while size > 1 {
        let k = split(size);
        if index < k {
            sibling(start + k, size - k);
            size = k;
        } else {
            sibling(start, k);
            start += k;
            index -= k;
            size -= k;
        }
    }
}

/// Walks RFC 6962 PROOF(old_size, D[new_size]) from the root down, calling `node(start, size)` for each subtree whose
/// root the proof carries. Requires `0 < old_size < new_size`.
fn consistency_nodes(old_size: u64, new_size: u64, mut node: impl FnMut(u64, u64)) {
    // `whole_old_tree` is SUBPROOF's `b`: while it holds, the subtree reached is the old tree itself, whose root the
    // verifier already has, so it is left out of the proof.
    let (mut start, mut size, mut m, mut whole_old_tree) = (0, new_size, old_size, true);
    while m != size {
        let k = split(size);
        if m <= k {
            node(start + k, size - k);
            size = k;
        } else {
            node(start, k);
            start += k;
            m -= k;
            size -= k;
            whole_old_tree = false;
        }
    }
    if !whole_old_tree {
        node(start, size);
    }
}

fn inclusion_proof_len(index: u64, tree_size: u64) -> usize {
    let mut len = 0;
    audit_path_nodes(index, tree_size, |_, _| len += 1);
    len
}

fn consistency_proof_len(old_size: u64, new_size: u64) -> usize {
    let mut len = 0;
    consistency_nodes(old_size, new_size, |_, _| len += 1);
    len
}

/// An in-memory, append-only Merkle log of leaf hashes.
///
/// Besides the leaf hashes it keeps the root of every complete, aligned power-of-two subtree (about one more hash per
/// leaf), so appending costs amortised O(1) hashes, and a root or a proof for any tree size costs O(log n) hashes.
/// A storage engine persists only the leaf hashes and rebuilds the rest with [`MerkleLog::from_leaf_hashes`].
#[derive(Clone, Default)]
pub struct MerkleLog {
    /// `levels[h][j]` is the root of the subtree over leaves `j·2^h .. (j+1)·2^h`; `levels[0]` holds the leaf hashes.
    /// Level `h` holds exactly `len >> h` nodes, so every complete, aligned subtree of the log is there.
    levels: Vec<Vec<Hash>>,
}

impl MerkleLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a log from its leaf hashes, in order, with O(n) hashing.
    pub fn from_leaf_hashes(leaf_hashes: impl IntoIterator<Item = Hash>) -> Self {
        let mut levels = vec![leaf_hashes.into_iter().collect::<Vec<_>>()];
        loop {
            let below = &levels[levels.len() - 1];
            if below.len() < 2 {
                break;
            }
            let above = below.chunks_exact(2).map(|pair| node_hash(&pair[0], &pair[1])).collect();
            levels.push(above);
        }
        Self { levels }
    }

    /// Appends a leaf (hashed with [`leaf_hash`]) and returns its index.
    pub fn append(&mut self, leaf: &[u8]) -> u64 {
        self.append_hash(leaf_hash(leaf))
    }

    /// Appends an already computed leaf hash and returns its index.
    pub fn append_hash(&mut self, leaf_hash: Hash) -> u64 {
        let index = self.len();
        let mut node = leaf_hash;
        let mut height = 0;
        loop {
            if self.levels.len() == height {
                self.levels.push(Vec::new());
            }
            let level = &mut self.levels[height];
            level.push(node);
            // An odd count means the new node has no sibling yet: nothing above it is complete.
            if level.len() % 2 == 1 {
                break;
            }
            node = node_hash(&level[level.len() - 2], &level[level.len() - 1]);
            height += 1;
        }
        index
    }

    /// The number of leaves.
    pub fn len(&self) -> u64 {
        self.levels.first().map_or(0, |leaves| leaves.len() as u64)
    }

    /// Whether the log has no leaves.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hash of leaf `index`, if the log has it.
    pub fn leaf_hash(&self, index: u64) -> Option<Hash> {
        let index = usize::try_from(index).ok()?;
        self.levels.first()?.get(index).copied()
    }

    /// The root of the whole log.
    pub fn root(&self) -> Hash {
        self.prefix_root(self.len())
    }

    /// The root of the tree over the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, MerkleError> {
        self.check_size(size)?;
        Ok(self.prefix_root(size))
    }

    /// The audit path (RFC 6962 PATH) of leaf `index` in the tree over the first `tree_size` leaves, from the leaf's
    /// sibling up to the child of the root.
    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<Hash>, MerkleError> {
        self.check_size(tree_size)?;
        if index >= tree_size {
            return Err(MerkleError::IndexOutOfRange { index, size: tree_size });
        }
        let mut proof = Vec::new();
        audit_path_nodes(index, tree_size, |start, size| proof.push(self.subtree_root(start, size)));
        proof.reverse();
        Ok(proof)
    }

    /// The consistency proof (RFC 6962 PROOF) that the tree over the first `old_size` leaves is a prefix of the tree
    /// over the first `new_size` leaves. Empty when `old_size` is 0 or equals `new_size`.
    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, MerkleError> {
        self.check_size(new_size)?;
        if old_size > new_size {
            return Err(MerkleError::BadSizes { old: old_size, new: new_size });
        }
        let mut proof = Vec::new();
        if old_size > 0 && old_size < new_size {
            consistency_nodes(old_size, new_size, |start, size| proof.push(self.subtree_root(start, size)));
            proof.reverse();
        }
        Ok(proof)
    }

    fn check_size(&self, size: u64) -> Result<(), MerkleError> {
        let len = self.len();
        if size > len {
            return Err(MerkleError::SizeOutOfRange { size, len });
        }
        Ok(())
    }

    /// Root of the first `size` leaves; requires `size <= len`.
    fn prefix_root(&self, size: u64) -> Hash {
        if size == 0 { empty_root() } else { self.subtree_root(0, size) }
    }

    /// RFC 6962 MTH(D[start..start + size]); requires `size >= 1` and `start + size <= len`.
    ///
    /// The subtrees the RFC recursion visits always start at a multiple of their size rounded up to a power of two, so
    /// a left child is always a cached complete subtree and only the right spine is hashed: O(log size) work.
    fn subtree_root(&self, start: u64, size: u64) -> Hash {
        if size.is_power_of_two() && start & (size - 1) == 0 {
            let height = size.trailing_zeros() as usize;
            // In range: the subtree lies within the log, and level `height` holds every complete aligned subtree.
            // `start >> height` fits in usize because it is below the length of a Vec.
            return self.levels[height][(start >> height) as usize];
        }
        let k = split(size);
        node_hash(&self.subtree_root(start, k), &self.subtree_root(start + k, size - k))
    }
}

impl MerkleLog {
    /// The head of the whole log, stamped with `timestamp_ms` (milliseconds since the Unix epoch), ready to sign.
    pub fn tree_head(&self, timestamp_ms: u64) -> TreeHead {
        TreeHead { size: self.len(), root: self.root(), timestamp_ms }
    }
}

impl fmt::Debug for MerkleLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MerkleLog").field("len", &self.len()).field("root", &hex::encode(self.root())).finish()
    }
}

/// Checks an audit path (RFC 9162 section 2.1.3.2): that the leaf with hash `leaf_hash` is at `index` in a tree of
/// `tree_size` leaves whose root is `root`.
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    if index >= tree_size {
        return Err(MerkleError::IndexOutOfRange { index, size: tree_size });
    }
    let expected = inclusion_proof_len(index, tree_size);
    if proof.len() != expected {
        return Err(MerkleError::WrongProofLength { expected, got: proof.len() });
    }
    let wrong_length = MerkleError::WrongProofLength { expected, got: proof.len() };
    let (mut f_n, mut s_n) = (index, tree_size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if s_n == 0 {
            return Err(wrong_length);
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            // Skip the levels where this node is the last one and has no right sibling.
            while f_n & 1 == 0 && f_n != 0 {
                f_n >>= 1;
                s_n >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(wrong_length);
    }
    if r != *root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

/// Checks a consistency proof (RFC 9162 section 2.1.4.2): that the tree of `old_size` leaves with root `old_root` is a
/// prefix of the tree of `new_size` leaves with root `new_root`.
///
/// Equal sizes need an empty proof and equal roots. The empty tree is a prefix of every tree: with `old_size` 0 the
/// proof must be empty and `old_root` must be [`empty_root`].
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if old_size > new_size {
        return Err(MerkleError::BadSizes { old: old_size, new: new_size });
    }
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return Err(MerkleError::WrongProofLength { expected: 0, got: proof.len() });
        }
        if old_size == 0 {
            return if *old_root == empty_root() { Ok(()) } else { Err(MerkleError::OldRootMismatch) };
        }
        return if old_root == new_root { Ok(()) } else { Err(MerkleError::RootMismatch) };
    }
    let expected = consistency_proof_len(old_size, new_size);
    if proof.len() != expected {
        return Err(MerkleError::WrongProofLength { expected, got: proof.len() });
    }
    let wrong_length = MerkleError::WrongProofLength { expected, got: proof.len() };
    // When the old tree is a complete power-of-two subtree the proof leaves its root out: it starts from `old_root`.
    let mut path = proof.iter();
    let seed = if old_size.is_power_of_two() {
        *old_root
    } else {
        match path.next() {
            Some(first) => *first,
            None => return Err(wrong_length),
        }
    };
    let (mut f_n, mut s_n) = (old_size - 1, new_size - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut f_r, mut s_r) = (seed, seed);
    for c in path {
        if s_n == 0 {
            return Err(wrong_length);
        }
        if f_n & 1 == 1 || f_n == s_n {
            f_r = node_hash(c, &f_r);
            s_r = node_hash(c, &s_r);
            while f_n & 1 == 0 && f_n != 0 {
                f_n >>= 1;
                s_n >>= 1;
            }
        } else {
            s_r = node_hash(&s_r, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(wrong_length);
    }
    if f_r != *old_root {
        return Err(MerkleError::OldRootMismatch);
    }
    if s_r != *new_root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

/// Domain-separation label that starts the signed encoding of a tree head.
pub const TREE_HEAD_LABEL: &[u8] = b"consent-relay tree head v1";

/// Length of the signed encoding of a tree head: label, size, timestamp, root.
pub const TREE_HEAD_LEN: usize = TREE_HEAD_LABEL.len() + 8 + 8 + HASH_LEN;

/// What the log commits to at one moment: its size and root, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeHead {
    /// Number of leaves.
    pub size: u64,
    /// Root of the tree over those leaves.
    pub root: Hash,
    /// When the head was made, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl TreeHead {
    /// The canonical bytes that are signed: [`TREE_HEAD_LABEL`] ‖ size (u64 BE) ‖ timestamp_ms (u64 BE) ‖ root. Every
    /// part has a fixed length, so no two heads share an encoding.
    pub fn encode(&self) -> [u8; TREE_HEAD_LEN] {
        let mut out = [0u8; TREE_HEAD_LEN];
        let (label, rest) = out.split_at_mut(TREE_HEAD_LABEL.len());
        label.copy_from_slice(TREE_HEAD_LABEL);
        let (size, rest) = rest.split_at_mut(8);
        size.copy_from_slice(&self.size.to_be_bytes());
        let (timestamp, root) = rest.split_at_mut(8);
        timestamp.copy_from_slice(&self.timestamp_ms.to_be_bytes());
        root.copy_from_slice(&self.root);
        out
    }

    /// Signs the head with the log's key.
    pub fn sign(&self, key: &SigningKey) -> SignedTreeHead {
        SignedTreeHead { head: *self, signature: key.sign(&self.encode()).to_bytes() }
    }
}

/// A tree head with the log's Ed25519 signature over [`TreeHead::encode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedTreeHead {
    /// The head signed.
    pub head: TreeHead,
    /// The Ed25519 signature.
    pub signature: [u8; SIGNATURE_LEN],
}

impl SignedTreeHead {
    /// Checks the signature with `verify_strict` (no small-order keys or malleable signatures).
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), MerkleError> {
        let signature = Signature::from_bytes(&self.signature);
        key.verify_strict(&self.head.encode(), &signature).map_err(|_| MerkleError::BadSignature)
    }
}

impl From<&SignedTreeHead> for crate::wire::SignedTreeHead {
    fn from(h: &SignedTreeHead) -> Self {
        Self {
            size: h.head.size,
            timestamp_ms: h.head.timestamp_ms,
            root: h.head.root.to_vec().into(),
            signature: h.signature.to_vec().into(),
            cosignatures: Vec::new(),
        }
    }
}

impl TryFrom<&crate::wire::SignedTreeHead> for SignedTreeHead {
    type Error = MerkleError;

    /// Checks lengths only; the signature is checked by [`SignedTreeHead::verify`].
    fn try_from(h: &crate::wire::SignedTreeHead) -> Result<Self, MerkleError> {
        let root = h.root.as_ref().try_into().map_err(|_| MerkleError::WrongLength("tree head root"))?;
        let signature = h.signature.as_ref().try_into().map_err(|_| MerkleError::WrongLength("tree head signature"))?;
        Ok(Self { head: TreeHead { size: h.size, root, timestamp_ms: h.timestamp_ms }, signature })
    }
}

/// A proof as sent on the wire: one 32-byte value per hash.
pub fn proof_to_wire(proof: &[Hash]) -> Vec<bytes::Bytes> {
    proof.iter().map(|h| bytes::Bytes::copy_from_slice(h)).collect()
}

/// A proof received on the wire; refused if any hash is not 32 bytes or it has more than 64 hashes (no tree this
/// size exists).
pub fn proof_from_wire(proof: &[bytes::Bytes]) -> Result<Vec<Hash>, MerkleError> {
    if proof.len() > 2 * 64 {
        return Err(MerkleError::WrongLength("proof"));
    }
    proof.iter().map(|h| h.as_ref().try_into().map_err(|_| MerkleError::WrongLength("proof hash"))).collect()
}

/// The log's public key as sent on the wire.
pub fn log_key_from_wire(key: &[u8]) -> Result<VerifyingKey, MerkleError> {
    let bytes: [u8; 32] = key.try_into().map_err(|_| MerkleError::WrongLength("log key"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| MerkleError::WrongLength("log key"))
}

/// The version byte that starts every encoded [`ExportLeaf`] written now.
pub const EXPORT_LEAF_VERSION: u8 = 2;

/// The version of the leaves written before leaves had a kind and a notice hash: still decoded (and re-encoded as
/// they were), so that logs written then still verify.
pub const EXPORT_LEAF_VERSION_1: u8 = 1;

/// What a leaf of the export log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LeafKind {
    /// Personal data sent to an affiliate (`user.metadata.exported`).
    Export,
    /// A `consent.withdrawn` notice: no personal data but the identifiers the affiliate already holds.
    WithdrawalNotice,
    /// An erasure notice (defined now, sent by a later version).
    ErasureNotice,
}

impl LeafKind {
    /// Its byte in the encoding.
    pub fn byte(self) -> u8 {
        match self {
            Self::Export => 0,
            Self::WithdrawalNotice => 1,
            Self::ErasureNotice => 2,
        }
    }

    /// The kind of byte `b`, if it is one.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Export),
            1 => Some(Self::WithdrawalNotice),
            2 => Some(Self::ErasureNotice),
            _ => None,
        }
    }

    /// Its name in JSON output: `export`, `withdrawal_notice`, `erasure_notice`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Export => "export",
            Self::WithdrawalNotice => "withdrawal_notice",
            Self::ErasureNotice => "erasure_notice",
        }
    }
}

/// Maximum length, in bytes, of each string of an [`ExportLeaf`] (affiliate, purpose, each field name).
pub const MAX_LEAF_STRING_LEN: usize = 256;

/// Maximum number of field names in an [`ExportLeaf`].
pub const MAX_LEAF_FIELDS: usize = 16;

/// The record the export log holds for one metadata export to an affiliate.
///
/// It holds **no personal data**: it names the fields that were exported (`"phone_number"`, `"device_model"`), never
/// their values, and refers to the exported payload and to the consent statement only by hash. The log is shown to
/// users and auditors, so nothing that identifies a person may go in a string. A hash of low-entropy data is no
/// protection either: anyone can hash every phone number. `payload_hash` must therefore be computed over the payload
/// as shipped (for instance the ciphertext sent to the affiliate) or over an encoding that includes a random salt,
/// never over a bare phone number or device string.
///
/// The encoding ([`ExportLeaf::encode`]) is canonical: a version byte, fixed-length fields as they are, each string
/// prefixed with its length (u16 BE), the field list with its count (u8); [`ExportLeaf::decode`] accepts exactly the
/// encodings `encode` produces. Version 2 adds the kind and the notice hash; a version-1 leaf decodes as an export
/// with no notice hash (`None`) and encodes back to its version-1 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportLeaf {
    /// What the leaf records.
    pub kind: LeafKind,
    /// Identifier of the export (random, chosen by the exporter).
    pub export_id: [u8; 16],
    /// Identifier of the affiliate that received the export.
    pub affiliate: String,
    /// The purpose the consent was given for, as named in the consent statement.
    pub purpose: String,
    /// Names of the metadata fields exported (never their values).
    pub fields: Vec<String>,
    /// SHA-256 of the payload as shipped, or of a salted encoding of it (see above).
    pub payload_hash: Hash,
    /// SHA-256 of the signed consent statement that allowed the export (for a notice: the withdrawal it tells of).
    pub consent_hash: Hash,
    /// The notice hash of the consent statement: for an export, the notice its grant signed; for a withdrawal
    /// notice, the notice the withdrawn grant signed (zeros if the exporter does not know it). `None` only for a
    /// version-1 leaf.
    pub notice_hash: Option<Hash>,
    /// When the export was made, in milliseconds since the Unix epoch.
    pub time_ms: u64,
}

impl ExportLeaf {
    /// Checks the limits that make a leaf encodable: at most [`MAX_LEAF_FIELDS`] field names and at most
    /// [`MAX_LEAF_STRING_LEN`] bytes per string.
    pub fn check(&self) -> Result<(), MerkleError> {
        if self.fields.len() > MAX_LEAF_FIELDS {
            return Err(MerkleError::LeafTooManyFields { count: self.fields.len(), max: MAX_LEAF_FIELDS });
        }
        for s in [&self.affiliate, &self.purpose].into_iter().chain(&self.fields) {
            if s.len() > MAX_LEAF_STRING_LEN {
                return Err(MerkleError::LeafStringTooLong { len: s.len(), max: MAX_LEAF_STRING_LEN });
            }
        }
        Ok(())
    }

    /// The canonical encoding: version (2) ‖ kind (u8) ‖ export_id ‖ affiliate ‖ purpose ‖ field count (u8) ‖ fields
    /// ‖ payload_hash ‖ consent_hash ‖ notice_hash ‖ time_ms (u64 BE), each string as its length (u16 BE) then its
    /// UTF-8 bytes; a leaf without a notice hash in version 1 (no kind, no notice hash). Fails if
    /// [`ExportLeaf::check`] does, or for a leaf without a notice hash that is not an export.
    pub fn encode(&self) -> Result<Vec<u8>, MerkleError> {
        self.check()?;
        let strings: usize =
            [&self.affiliate, &self.purpose].into_iter().chain(&self.fields).map(|s| 2 + s.len()).sum();
        let mut out = Vec::with_capacity(2 + 16 + strings + 1 + 3 * HASH_LEN + 8);
        match self.notice_hash {
            Some(_) => out.extend_from_slice(&[EXPORT_LEAF_VERSION, self.kind.byte()]),
            None if self.kind == LeafKind::Export => out.push(EXPORT_LEAF_VERSION_1),
            None => return Err(MerkleError::LeafKind { kind: self.kind.byte() }),
        }
        out.extend_from_slice(&self.export_id);
        put_str(&mut out, &self.affiliate);
        put_str(&mut out, &self.purpose);
        // At most MAX_LEAF_FIELDS, checked above.
        out.push(self.fields.len() as u8);
        for field in &self.fields {
            put_str(&mut out, field);
        }
        out.extend_from_slice(&self.payload_hash);
        out.extend_from_slice(&self.consent_hash);
        if let Some(notice_hash) = &self.notice_hash {
            out.extend_from_slice(notice_hash);
        }
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        Ok(out)
    }

    /// Decodes the canonical encoding, rejecting unknown versions, over-long strings, too many fields, invalid UTF-8,
    /// truncation and trailing bytes. Lengths are checked before anything is allocated.
    pub fn decode(bytes: &[u8]) -> Result<Self, MerkleError> {
        let mut r = Reader(bytes);
        let [version] = r.array()?;
        let kind = match version {
            EXPORT_LEAF_VERSION => {
                let [kind] = r.array()?;
                Some(LeafKind::from_byte(kind).ok_or(MerkleError::LeafKind { kind })?)
            }
            EXPORT_LEAF_VERSION_1 => None,
            version => return Err(MerkleError::LeafVersion { version }),
        };
        let export_id = r.array()?;
        let affiliate = r.string()?;
        let purpose = r.string()?;
        let [count] = r.array()?;
        let count = usize::from(count);
        if count > MAX_LEAF_FIELDS {
            return Err(MerkleError::LeafTooManyFields { count, max: MAX_LEAF_FIELDS });
        }
        let mut fields = Vec::with_capacity(count);
        for _ in 0..count {
            fields.push(r.string()?);
        }
        let payload_hash = r.array()?;
        let consent_hash = r.array()?;
        let notice_hash = match kind {
            Some(_) => Some(r.array()?),
            None => None,
        };
        let time_ms = u64::from_be_bytes(r.array()?);
        if !r.0.is_empty() {
            return Err(MerkleError::LeafTrailingBytes { extra: r.0.len() });
        }
        let kind = kind.unwrap_or(LeafKind::Export);
        Ok(Self { kind, export_id, affiliate, purpose, fields, payload_hash, consent_hash, notice_hash, time_ms })
    }

    /// The leaf hash under which the export is logged: [`leaf_hash`] of [`ExportLeaf::encode`].
    pub fn leaf_hash(&self) -> Result<Hash, MerkleError> {
        Ok(leaf_hash(&self.encode()?))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // At most MAX_LEAF_STRING_LEN bytes, checked by `ExportLeaf::check`.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The unread rest of an encoded export leaf.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MerkleError> {
        if self.0.len() < n {
            return Err(MerkleError::LeafTruncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MerkleError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn string(&mut self) -> Result<String, MerkleError> {
        let len = usize::from(u16::from_be_bytes(self.array()?));
        if len > MAX_LEAF_STRING_LEN {
            return Err(MerkleError::LeafStringTooLong { len, max: MAX_LEAF_STRING_LEN });
        }
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| MerkleError::LeafNotUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An independent, deliberately naive RFC 6962 implementation: slices, recursion, its own SHA-256 calls.

    fn ref_leaf(data: &[u8]) -> Hash {
        let mut input = vec![0x00];
        input.extend_from_slice(data);
        Sha256::digest(&input).into()
    }

    fn ref_node(left: &Hash, right: &Hash) -> Hash {
        let mut input = vec![0x01];
        input.extend_from_slice(left);
        input.extend_from_slice(right);
        Sha256::digest(&input).into()
    }

    fn ref_split(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    fn ref_mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => Sha256::digest(b"").into(),
            1 => d[0],
            n => {
                let k = ref_split(n);
                ref_node(&ref_mth(&d[..k]), &ref_mth(&d[k..]))
            }
        }
    }

    fn ref_path(m: usize, d: &[Hash]) -> Vec<Hash> {
        if d.len() <= 1 {
            return Vec::new();
        }
        let k = ref_split(d.len());
        let (mut path, sibling) =
            if m < k { (ref_path(m, &d[..k]), ref_mth(&d[k..])) } else { (ref_path(m - k, &d[k..]), ref_mth(&d[..k])) };
        path.push(sibling);
        path
    }

    fn ref_subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if b { Vec::new() } else { vec![ref_mth(d)] };
        }
        let k = ref_split(n);
        let (mut proof, node) = if m <= k {
            (ref_subproof(m, &d[..k], b), ref_mth(&d[k..]))
        } else {
            (ref_subproof(m - k, &d[k..], false), ref_mth(&d[..k]))
        };
        proof.push(node);
        proof
    }

    /// Which side each audit-path hash goes on, leaf upwards (`true`: the sibling is on the right). Two (index, size)
    /// pairs with the same sides make a verifier do exactly the same hashing.
    fn ref_path_sides(m: usize, n: usize) -> Vec<bool> {
        if n <= 1 {
            return Vec::new();
        }
        let k = ref_split(n);
        let mut sides = if m < k { ref_path_sides(m, k) } else { ref_path_sides(m - k, n - k) };
        sides.push(m < k);
        sides
    }

    /// The shape of PROOF(m, D[n]): whether the verifier starts from the old root itself, then the side of each proof
    /// hash, bottom up (`true`: on the right, so it only goes into the new root).
    fn ref_proof_shape(m: usize, n: usize, b: bool) -> (bool, Vec<bool>) {
        if m == n {
            return (b, Vec::new());
        }
        let k = ref_split(n);
        let (seed, mut sides) = if m <= k { ref_proof_shape(m, k, b) } else { ref_proof_shape(m - k, n - k, false) };
        sides.push(m <= k);
        (seed, sides)
    }

    fn h(s: &str) -> Hash {
        let mut out = [0u8; HASH_LEN];
        hex::decode_to_slice(s, &mut out).expect("test vector is 32 bytes of hex");
        out
    }

    fn test_leaves(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("export {i}").into_bytes()).collect()
    }

    fn log_of(leaves: &[Vec<u8>]) -> MerkleLog {
        let mut log = MerkleLog::new();
        for (i, leaf) in leaves.iter().enumerate() {
            assert_eq!(log.append(leaf), i as u64);
        }
        log
    }

    fn flip_bit(hash: &Hash, bit: usize) -> Hash {
        let mut out = *hash;
        out[bit / 8] ^= 1 << (bit % 8);
        out
    }

    const MAX_N: usize = 70;

    #[test]
    fn empty_tree_root_is_sha256_of_nothing() {
        let e3b0 = h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let log = MerkleLog::new();
        assert_eq!(empty_root(), e3b0);
        assert_eq!(log.root(), e3b0);
        assert_eq!(log.root_at(0), Ok(e3b0));
        assert_eq!(MerkleLog::from_leaf_hashes([]).root(), e3b0);
        assert!(log.is_empty());
        assert_eq!(log.root_at(1), Err(MerkleError::SizeOutOfRange { size: 1, len: 0 }));
        assert_eq!(log.inclusion_proof(0, 0), Err(MerkleError::IndexOutOfRange { index: 0, size: 0 }));
        assert_eq!(log.consistency_proof(0, 0), Ok(Vec::new()));
    }

    /// The eight-leaf test tree of the Certificate Transparency reference implementations (published as test data by
    /// transparency-dev/merkle and the CT C++/Go code). Sizes are tree sizes, indices 0-based.
    #[test]
    fn certificate_transparency_reference_vectors() {
        let leaves: Vec<Vec<u8>> =
            ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
                .iter()
                .map(|s| hex::decode(s).expect("hex"))
                .collect();
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ]
        .map(h);
        let log = log_of(&leaves);
        for (size, root) in (1..).zip(&roots) {
            assert_eq!(log.root_at(size).as_ref(), Ok(root), "root of size {size}");
        }
        assert_eq!(log.root(), roots[7]);
        // The root of one leaf is its leaf hash; of two, the node over both.
        assert_eq!(leaf_hash(b""), roots[0]);
        assert_eq!(node_hash(&leaf_hash(b""), &leaf_hash(&[0])), roots[1]);

        let inclusion: [(u64, u64, &[&str]); 5] = [
            (0, 1, &[]),
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (2, 3, &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (index, size, expected) in inclusion {
            let expected: Vec<Hash> = expected.iter().map(|s| h(s)).collect();
            assert_eq!(log.inclusion_proof(index, size), Ok(expected.clone()), "path of {index} in {size}");
            let root = &roots[size as usize - 1];
            let leaf = leaf_hash(&leaves[index as usize]);
            assert_eq!(verify_inclusion(&leaf, index, size, &expected, root), Ok(()));
        }

        let consistency: [(u64, u64, &[&str]); 5] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                2,
                8,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (old, new, expected) in consistency {
            let expected: Vec<Hash> = expected.iter().map(|s| h(s)).collect();
            assert_eq!(log.consistency_proof(old, new), Ok(expected.clone()), "proof {old} -> {new}");
            let (old_root, new_root) = (&roots[old as usize - 1], &roots[new as usize - 1]);
            assert_eq!(verify_consistency(old, new, old_root, new_root, &expected), Ok(()));
        }
    }

    #[test]
    fn roots_and_proofs_match_the_reference_recursion() {
        let leaves = test_leaves(MAX_N);
        let hashes: Vec<Hash> = leaves.iter().map(|l| ref_leaf(l)).collect();
        let mut log = MerkleLog::new();
        for n in 1..=MAX_N {
            log.append(&leaves[n - 1]);
            assert_eq!(log.leaf_hash(n as u64 - 1), Some(hashes[n - 1]));
            assert_eq!(log.root(), ref_mth(&hashes[..n]), "root of {n}");
        }
        assert_eq!(log.leaf_hash(MAX_N as u64), None);
        // The full log answers for every smaller tree size too.
        for n in 1..=MAX_N {
            let d = &hashes[..n];
            let size = n as u64;
            assert_eq!(log.root_at(size), Ok(ref_mth(d)), "root_at {n}");
            for i in 0..n {
                assert_eq!(log.inclusion_proof(i as u64, size), Ok(ref_path(i, d)), "path of {i} in {n}");
            }
            for m in 1..=n {
                assert_eq!(log.consistency_proof(m as u64, size), Ok(ref_subproof(m, d, true)), "proof {m} -> {n}");
            }
            assert_eq!(log.consistency_proof(0, size), Ok(Vec::new()));
        }
        let len = MAX_N as u64;
        assert_eq!(log.inclusion_proof(0, len + 1), Err(MerkleError::SizeOutOfRange { size: len + 1, len }));
        assert_eq!(log.inclusion_proof(len, len), Err(MerkleError::IndexOutOfRange { index: len, size: len }));
        assert_eq!(log.consistency_proof(1, len + 1), Err(MerkleError::SizeOutOfRange { size: len + 1, len }));
        assert_eq!(log.consistency_proof(5, 4), Err(MerkleError::BadSizes { old: 5, new: 4 }));
    }

    #[test]
    fn every_inclusion_proof_verifies_and_every_tampering_fails() {
        let leaves = test_leaves(MAX_N);
        let log = log_of(&leaves);
        let hashes: Vec<Hash> = leaves.iter().map(|l| leaf_hash(l)).collect();
        for n in 1..=MAX_N {
            let size = n as u64;
            let root = log.root_at(size).expect("size within the log");
            let other_root = log.root_at(size - 1).expect("size within the log");
            for (i, leaf) in hashes.iter().enumerate().take(n) {
                let index = i as u64;
                let proof = log.inclusion_proof(index, size).expect("index within the tree");
                assert_eq!(verify_inclusion(leaf, index, size, &proof, &root), Ok(()), "{i} in {n}");

                // Every proof hash tampered: every bit for small trees, one bit per hash (moving around) above.
                for (e, element) in proof.iter().enumerate() {
                    let bits: Vec<usize> = if n <= 16 { (0..256).collect() } else { vec![(i * 31 + e * 7 + n) % 256] };
                    for bit in bits {
                        let mut bad = proof.clone();
                        bad[e] = flip_bit(element, bit);
                        assert_eq!(verify_inclusion(leaf, index, size, &bad, &root), Err(MerkleError::RootMismatch));
                    }
                }
                // Another leaf, another index, out-of-range indices.
                assert!(verify_inclusion(&flip_bit(leaf, 0), index, size, &proof, &root).is_err());
                for j in (0..n).filter(|&j| j != i) {
                    assert!(verify_inclusion(leaf, j as u64, size, &proof, &root).is_err(), "{i} as {j} in {n}");
                }
                for j in [size, size + 1, u64::MAX] {
                    let err = Err(MerkleError::IndexOutOfRange { index: j, size });
                    assert_eq!(verify_inclusion(leaf, j, size, &proof, &root), err);
                }
                // Truncated and extended proofs.
                if let Some((_, shorter)) = proof.split_last() {
                    let err = Err(MerkleError::WrongProofLength { expected: proof.len(), got: proof.len() - 1 });
                    assert_eq!(verify_inclusion(leaf, index, size, shorter, &root), err);
                }
                let mut longer = proof.clone();
                longer.push(root);
                let err = Err(MerkleError::WrongProofLength { expected: proof.len(), got: proof.len() + 1 });
                assert_eq!(verify_inclusion(leaf, index, size, &longer, &root), err);
                // Another root.
                assert_eq!(verify_inclusion(leaf, index, size, &proof, &other_root), Err(MerkleError::RootMismatch));
                assert_eq!(
                    verify_inclusion(leaf, index, size, &proof, &flip_bit(&root, 255)),
                    Err(MerkleError::RootMismatch)
                );
                // Another tree size fails unless the audit path has exactly the same shape there (see the module
                // documentation: the signed tree head is what binds the size).
                let candidates = [size - 1, size + 1, size + 2, 2 * size, size.next_power_of_two(), 1 << 40, u64::MAX];
                for wrong in candidates.into_iter().filter(|&w| w > index && w != size) {
                    let same_shape = usize::try_from(wrong)
                        .is_ok_and(|w| w <= 1 << 20 && ref_path_sides(i, w) == ref_path_sides(i, n));
                    let verdict = verify_inclusion(leaf, index, wrong, &proof, &root);
                    assert_eq!(verdict.is_ok(), same_shape, "{i} in {n} claimed as size {wrong}: {verdict:?}");
                }
            }
        }
        // The documented case: leaf 0's path in a 4-leaf tree also checks for a 3-leaf tree with the same root.
        let proof = log.inclusion_proof(0, 4).expect("in range");
        let root4 = log.root_at(4).expect("in range");
        assert_eq!(verify_inclusion(&hashes[0], 0, 3, &proof, &root4), Ok(()));
    }

    #[test]
    fn every_consistency_proof_verifies_and_every_tampering_fails() {
        let log = log_of(&test_leaves(MAX_N));
        let roots: Vec<Hash> = (0..=MAX_N as u64).map(|n| log.root_at(n).expect("size within the log")).collect();
        for n in 1..=MAX_N {
            let new = n as u64;
            for m in 0..=n {
                let old = m as u64;
                let proof = log.consistency_proof(old, new).expect("sizes within the log");
                assert_eq!(verify_consistency(old, new, &roots[m], &roots[n], &proof), Ok(()), "{m} -> {n}");
                if m == 0 {
                    // Only the old root is checked: it must be the empty tree's.
                    let err = Err(MerkleError::OldRootMismatch);
                    assert_eq!(verify_consistency(0, new, &roots[n], &roots[n], &proof), err);
                    continue;
                }

                // Wrong roots: the other side's, a neighbour's, a flipped bit.
                if m != n {
                    assert!(verify_consistency(old, new, &roots[n], &roots[n], &proof).is_err());
                    assert!(verify_consistency(old, new, &roots[m], &roots[m], &proof).is_err());
                }
                assert!(verify_consistency(old, new, &roots[m], &flip_bit(&roots[n], 9), &proof).is_err());
                assert!(verify_consistency(old, new, &flip_bit(&roots[m], 9), &roots[n], &proof).is_err());
                if n < MAX_N {
                    assert!(verify_consistency(old, new, &roots[m], &roots[n + 1], &proof).is_err());
                }
                // Sizes the wrong way round.
                if m != n {
                    let err = Err(MerkleError::BadSizes { old: new, new: old });
                    assert_eq!(verify_consistency(new, old, &roots[n], &roots[m], &proof), err);
                }
                // Extended proofs; the degenerate sizes need an empty proof.
                let mut longer = proof.clone();
                longer.push(roots[n]);
                let err = Err(MerkleError::WrongProofLength { expected: proof.len(), got: proof.len() + 1 });
                assert_eq!(verify_consistency(old, new, &roots[m], &roots[n], &longer), err);
                if proof.is_empty() {
                    continue;
                }
                // Tampered hashes: every bit for small trees, one bit per hash (moving around) above.
                for (e, element) in proof.iter().enumerate() {
                    let bits: Vec<usize> = if n <= 16 { (0..256).collect() } else { vec![(m * 31 + e * 7 + n) % 256] };
                    for bit in bits {
                        let mut bad = proof.clone();
                        bad[e] = flip_bit(element, bit);
                        assert!(verify_consistency(old, new, &roots[m], &roots[n], &bad).is_err(), "{m} -> {n}");
                    }
                }
                let err = Err(MerkleError::WrongProofLength { expected: proof.len(), got: proof.len() - 1 });
                assert_eq!(verify_consistency(old, new, &roots[m], &roots[n], &proof[1..]), err);
                assert_eq!(verify_consistency(old, new, &roots[m], &roots[n], &proof[..proof.len() - 1]), err);
                // Other sizes fail unless the proof has exactly the same shape there, as for audit paths.
                let shape = ref_proof_shape(m, n, true);
                let claims = [(m - 1, n), (m + 1, n), (m, n - 1), (m, n + 1), (m, 2 * n), (m + 1, n + 1), (n, n)];
                for (wrong_m, wrong_n) in claims.into_iter().filter(|&c| c != (m, n)) {
                    let verdict = verify_consistency(wrong_m as u64, wrong_n as u64, &roots[m], &roots[n], &proof);
                    let accepted = 0 < wrong_m && wrong_m < wrong_n && ref_proof_shape(wrong_m, wrong_n, true) == shape;
                    assert_eq!(verdict.is_ok(), accepted, "{m} -> {n} claimed as {wrong_m} -> {wrong_n}: {verdict:?}");
                }
            }
        }
        // The degenerate cases.
        let e = empty_root();
        assert_eq!(verify_consistency(0, 0, &e, &e, &[]), Ok(()));
        assert_eq!(verify_consistency(0, 5, &e, &roots[5], &[]), Ok(()));
        assert_eq!(verify_consistency(0, 5, &roots[1], &roots[5], &[]), Err(MerkleError::OldRootMismatch));
        assert_eq!(verify_consistency(4, 4, &roots[4], &roots[5], &[]), Err(MerkleError::RootMismatch));
        let err = Err(MerkleError::WrongProofLength { expected: 0, got: 1 });
        assert_eq!(verify_consistency(4, 4, &roots[4], &roots[4], &[roots[4]]), err);
        assert_eq!(verify_consistency(0, 5, &e, &roots[5], &[e]), err);
        assert!(verify_consistency(u64::MAX - 1, u64::MAX, &roots[1], &roots[2], &[roots[3]; 3]).is_err());
    }

    #[test]
    fn rebuilt_log_has_the_same_roots_and_tampering_shows() {
        let leaves = test_leaves(MAX_N);
        let log = log_of(&leaves);
        let hashes: Vec<Hash> = leaves.iter().map(|l| leaf_hash(l)).collect();
        for n in 0..=MAX_N {
            let rebuilt = MerkleLog::from_leaf_hashes(hashes[..n].iter().copied());
            assert_eq!(rebuilt.len(), n as u64);
            assert_eq!(rebuilt.root(), log.root_at(n as u64).expect("in range"), "rebuilt {n}");
            for m in 0..=n as u64 {
                assert_eq!(rebuilt.root_at(m), log.root_at(m));
            }
            // Appending to a rebuilt log carries on exactly as the original.
            let mut grown = rebuilt;
            for (i, leaf) in leaves.iter().enumerate().skip(n) {
                assert_eq!(grown.append(leaf), i as u64);
            }
            assert_eq!(grown.root(), log.root());
        }

        let size = MAX_N as u64;
        let root = log.root();
        for victim in [0, 1, 31, 32, 33, MAX_N - 1] {
            let proof = log.inclusion_proof(victim as u64, size).expect("in range");
            let mut tampered = hashes.clone();
            tampered[victim] = leaf_hash(b"a different export");
            let forged = MerkleLog::from_leaf_hashes(tampered.iter().copied());
            assert_ne!(forged.root(), root, "tampering with leaf {victim} must change the root");
            // The genuine leaf's old proof no longer leads to the new root, nor the forged leaf's to the old one.
            let genuine = verify_inclusion(&hashes[victim], victim as u64, size, &proof, &forged.root());
            assert_eq!(genuine, Err(MerkleError::RootMismatch));
            let forged_leaf = verify_inclusion(&tampered[victim], victim as u64, size, &proof, &root);
            assert_eq!(forged_leaf, Err(MerkleError::RootMismatch));
            // And no consistency proof links the old head to the forged log.
            let bridge = forged.consistency_proof(size - 1, size).expect("in range");
            let old_root = log.root_at(size - 1).expect("in range");
            if victim < MAX_N - 1 {
                assert!(verify_consistency(size - 1, size, &old_root, &forged.root(), &bridge).is_err());
            }
        }
    }

    #[test]
    fn tree_head_encoding_is_fixed_and_canonical() {
        let head = TreeHead { size: 0x0102_0304_0506_0708, root: [0xaa; 32], timestamp_ms: 0x1112_1314_1516_1718 };
        let bytes = head.encode();
        assert_eq!(bytes.len(), 26 + 8 + 8 + 32);
        assert_eq!(&bytes[..26], b"consent-relay tree head v1");
        assert_eq!(&bytes[26..34], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&bytes[34..42], &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
        assert_eq!(&bytes[42..], &[0xaa; 32]);
    }

    #[test]
    fn signed_tree_heads_verify_and_bind_size_root_and_time() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let mut log = MerkleLog::new();
        for leaf in test_leaves(10) {
            log.append(&leaf);
        }
        let head = log.tree_head(1_700_000_000_000);
        assert_eq!(head, TreeHead { size: 10, root: log.root(), timestamp_ms: 1_700_000_000_000 });
        let signed = head.sign(&key);
        assert_eq!(signed.verify(&key.verifying_key()), Ok(()));
        // Ed25519 is deterministic: the same head signs the same way.
        assert_eq!(head.sign(&key), signed);

        assert_eq!(signed.verify(&other.verifying_key()), Err(MerkleError::BadSignature));
        assert_eq!(head.sign(&other).verify(&key.verifying_key()), Err(MerkleError::BadSignature));
        let altered = [
            TreeHead { size: 11, ..head },
            TreeHead { size: 9, ..head },
            TreeHead { root: log.root_at(9).expect("in range"), ..head },
            TreeHead { root: flip_bit(&head.root, 200), ..head },
            TreeHead { timestamp_ms: head.timestamp_ms + 1, ..head },
        ];
        for changed in altered {
            let forged = SignedTreeHead { head: changed, ..signed };
            assert_eq!(forged.verify(&key.verifying_key()), Err(MerkleError::BadSignature), "{changed:?}");
        }
        for bit in 0..SIGNATURE_LEN * 8 {
            let mut forged = signed;
            forged.signature[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(forged.verify(&key.verifying_key()), Err(MerkleError::BadSignature), "bit {bit}");
        }
    }

    fn sample_leaf() -> ExportLeaf {
        ExportLeaf {
            kind: LeafKind::Export,
            export_id: [0x42; 16],
            affiliate: "affiliate-7".into(),
            purpose: "fraud-prevention".into(),
            fields: vec!["phone_number".into(), "device_model".into(), "app_version".into()],
            payload_hash: [0x11; 32],
            consent_hash: [0x22; 32],
            notice_hash: Some([0x33; 32]),
            time_ms: 1_700_000_000_123,
        }
    }

    /// SplitMix64: a few lines of seeded randomness, no dependency.
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn export_leaf_round_trips_and_hashes_its_encoding() {
        let leaf = sample_leaf();
        let bytes = leaf.encode().expect("within limits");
        assert_eq!(bytes[..2], [EXPORT_LEAF_VERSION, 0]);
        assert_eq!(&bytes[2..18], &[0x42; 16]);
        assert_eq!(&bytes[18..20], &[0, 11]);
        assert_eq!(&bytes[bytes.len() - 40..bytes.len() - 8], &[0x33; 32]);
        assert_eq!(&bytes[bytes.len() - 8..], &1_700_000_000_123u64.to_be_bytes());
        let strings = 2 + 11 + 2 + 16 + (2 + 12) + (2 + 12) + (2 + 11);
        assert_eq!(bytes.len(), 2 + 16 + strings + 1 + 32 + 32 + 32 + 8);
        assert_eq!(ExportLeaf::decode(&bytes), Ok(leaf.clone()));
        assert_eq!(leaf.leaf_hash(), Ok(leaf_hash(&bytes)));

        // The limits themselves are allowed, and empty strings and lists too.
        let full = ExportLeaf {
            affiliate: "a".repeat(MAX_LEAF_STRING_LEN),
            purpose: String::new(),
            fields: vec!["é".repeat(MAX_LEAF_STRING_LEN / 2); MAX_LEAF_FIELDS],
            ..leaf.clone()
        };
        assert_eq!(ExportLeaf::decode(&full.encode().expect("at the limits")), Ok(full));
        let empty = ExportLeaf { fields: Vec::new(), ..leaf.clone() };
        assert_eq!(ExportLeaf::decode(&empty.encode().expect("within limits")), Ok(empty));

        // Unambiguous: moving a byte from one string to the next changes the encoding.
        let a = ExportLeaf { affiliate: "ab".into(), purpose: "c".into(), ..leaf.clone() };
        let b = ExportLeaf { affiliate: "a".into(), purpose: "bc".into(), ..leaf.clone() };
        assert_ne!(a.encode(), b.encode());
        let a = ExportLeaf { fields: vec!["ab".into()], ..leaf.clone() };
        let b = ExportLeaf { fields: vec!["a".into(), "b".into()], ..leaf.clone() };
        assert_ne!(a.leaf_hash(), b.leaf_hash());

        // Each kind has its own encoding.
        let notice = ExportLeaf { kind: LeafKind::WithdrawalNotice, fields: Vec::new(), ..leaf.clone() };
        let erasure = ExportLeaf { kind: LeafKind::ErasureNotice, ..notice.clone() };
        for l in [&notice, &erasure] {
            assert_eq!(ExportLeaf::decode(&l.encode().expect("encodes")).as_ref(), Ok(l));
        }
        assert_ne!(notice.encode(), erasure.encode());
    }

    /// Leaves written before version 2 (no kind, no notice hash) still decode, as exports, and encode back to the
    /// very same bytes, so the logs they are in still verify; a notice cannot be written that way.
    #[test]
    fn version_1_leaves_still_decode_and_keep_their_bytes() {
        let v1 = ExportLeaf { notice_hash: None, ..sample_leaf() };
        let bytes = v1.encode().expect("a version-1 export");
        assert_eq!(bytes[0], EXPORT_LEAF_VERSION_1);
        assert_eq!(&bytes[1..17], &[0x42; 16]);
        let strings = 2 + 11 + 2 + 16 + (2 + 12) + (2 + 12) + (2 + 11);
        assert_eq!(bytes.len(), 1 + 16 + strings + 1 + 32 + 32 + 8);
        let decoded = ExportLeaf::decode(&bytes).expect("decodes");
        assert_eq!((decoded.kind, decoded.notice_hash), (LeafKind::Export, None));
        assert_eq!(decoded.encode(), Ok(bytes));
        let notice = ExportLeaf { kind: LeafKind::WithdrawalNotice, ..v1 };
        assert_eq!(notice.encode(), Err(MerkleError::LeafKind { kind: 1 }));
        let mut unknown = sample_leaf().encode().expect("encodes");
        unknown[1] = 3;
        assert_eq!(ExportLeaf::decode(&unknown), Err(MerkleError::LeafKind { kind: 3 }));
    }

    #[test]
    fn export_leaf_limits_are_enforced_both_ways() {
        let leaf = sample_leaf();
        let long = "x".repeat(MAX_LEAF_STRING_LEN + 1);
        let too_long = MerkleError::LeafStringTooLong { len: MAX_LEAF_STRING_LEN + 1, max: MAX_LEAF_STRING_LEN };
        assert_eq!(ExportLeaf { affiliate: long.clone(), ..leaf.clone() }.encode(), Err(too_long.clone()));
        assert_eq!(ExportLeaf { purpose: long.clone(), ..leaf.clone() }.encode(), Err(too_long.clone()));
        assert_eq!(ExportLeaf { fields: vec![long], ..leaf.clone() }.leaf_hash(), Err(too_long.clone()));
        let many = ExportLeaf { fields: vec!["f".into(); MAX_LEAF_FIELDS + 1], ..leaf.clone() };
        let too_many = Err(MerkleError::LeafTooManyFields { count: MAX_LEAF_FIELDS + 1, max: MAX_LEAF_FIELDS });
        assert_eq!(many.encode(), too_many);

        // Hand-made encodings past the limits are refused too.
        let bytes = leaf.encode().expect("within limits");
        let mut long_affiliate = bytes[..18].to_vec();
        long_affiliate.extend_from_slice(&257u16.to_be_bytes());
        long_affiliate.extend_from_slice(&[b'x'; 257]);
        assert_eq!(ExportLeaf::decode(&long_affiliate), Err(too_long));
        let mut huge = bytes[..18].to_vec();
        huge.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(ExportLeaf::decode(&huge), Err(MerkleError::LeafStringTooLong { len: 65535, .. })));
        let count_at = 18 + 2 + 11 + 2 + 16;
        assert_eq!(bytes[count_at], 3);
        let mut seventeen = bytes.clone();
        seventeen[count_at] = 17;
        assert_eq!(ExportLeaf::decode(&seventeen), Err(MerkleError::LeafTooManyFields { count: 17, max: 16 }));

        let mut version = bytes.clone();
        version[0] = 3;
        assert_eq!(ExportLeaf::decode(&version), Err(MerkleError::LeafVersion { version: 3 }));
        let mut not_utf8 = bytes.clone();
        not_utf8[20] = 0xff;
        assert_eq!(ExportLeaf::decode(&not_utf8), Err(MerkleError::LeafNotUtf8));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(ExportLeaf::decode(&trailing), Err(MerkleError::LeafTrailingBytes { extra: 1 }));
        for len in 0..bytes.len() {
            assert_eq!(ExportLeaf::decode(&bytes[..len]), Err(MerkleError::LeafTruncated), "prefix of {len}");
        }
    }

    #[test]
    fn export_leaf_decoder_survives_random_and_mutated_input() {
        let mut rng = SplitMix(0x5eed_c0de);
        for _ in 0..20_000 {
            let len = rng.below(400);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert!(ExportLeaf::decode(&bytes).is_err(), "random {bytes:?}");
            // Even with the right version byte in front.
            if let Some(first) = bytes.first_mut() {
                *first = EXPORT_LEAF_VERSION;
                assert!(ExportLeaf::decode(&bytes).is_err(), "random {bytes:?}");
            }
        }
        // Mutated valid encodings: whatever decodes must re-encode to the very same bytes (one encoding per leaf).
        let valid = sample_leaf().encode().expect("within limits");
        let mut decoded = 0;
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                bytes.truncate(rng.below(bytes.len() + 1));
            }
            if let Ok(leaf) = ExportLeaf::decode(&bytes) {
                assert_eq!(leaf.encode().as_ref(), Ok(&bytes));
                decoded += 1;
            }
        }
        assert!(decoded > 0, "some mutations only touch hashes and must still decode");
    }

    #[test]
    fn a_large_log_stays_cheap() {
        const N: u64 = 200_000;
        let mut log = MerkleLog::new();
        for i in 0..N {
            log.append(&i.to_be_bytes());
        }
        let root = log.root();
        let index = 123_457;
        let proof = log.inclusion_proof(index, N).expect("in range");
        assert_eq!(proof.len(), 18);
        assert_eq!(verify_inclusion(&leaf_hash(&index.to_be_bytes()), index, N, &proof, &root), Ok(()));
        let old_root = log.root_at(150_001).expect("in range");
        let proof = log.consistency_proof(150_001, N).expect("in range");
        assert_eq!(verify_consistency(150_001, N, &old_root, &root, &proof), Ok(()));
        let rebuilt = MerkleLog::from_leaf_hashes((0..N).map(|i| log.leaf_hash(i).expect("in range")));
        assert_eq!(rebuilt.root(), root);
    }
}
