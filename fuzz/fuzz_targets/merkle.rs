//! The export log's Merkle proofs, export leaves and signed tree heads (`relay_proto::merkle`).
//!
//! Three parts, every input runs all of them:
//! 1. Untrusted verification: `verify_inclusion` and `verify_consistency` with arbitrary indices, sizes (up to
//!    `u64::MAX`), roots and proofs must not panic and must stay cheap. The proof is also given the exact length the
//!    sizes call for (learnt from the `WrongProofLength` error), so the hashing loops run on huge sizes too, and a
//!    proof of the right length must never be refused as having the wrong length.
//! 2. `ExportLeaf::decode` of arbitrary bytes: whatever decodes re-encodes to the same bytes; `SignedTreeHead::verify`
//!    with an arbitrary key and signature, and (for a quarter of the inputs) with a genuine signature, which must
//!    verify, and fail with one bit flipped.
//! 3. Differential: a `MerkleLog` of N ≤ 64 leaves, built by appending and rebuilt from its leaf hashes (same roots);
//!    inclusion and consistency proofs for input-chosen indices and sizes verify, and flipping one byte of a proof,
//!    the leaf hash or a root makes verification fail.
#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use ed25519_dalek::{SigningKey, VerifyingKey};
use libfuzzer_sys::fuzz_target;
use relay_proto::merkle::{
    ExportLeaf, Hash, MerkleError, MerkleLog, SignedTreeHead, TreeHead, leaf_hash, verify_consistency, verify_inclusion,
};

fn flip(h: &Hash, byte: u8, bit: u8) -> Hash {
    let mut h = *h;
    h[usize::from(byte) % h.len()] ^= 1 << (bit % 8);
    h
}

/// A proof of `len` hashes made from `pool` (cycled; all zero when the pool is empty).
fn proof_of(len: usize, pool: &[Hash]) -> Vec<Hash> {
    (0..len).map(|i| if pool.is_empty() { [0; 32] } else { pool[i % pool.len()] }).collect()
}

fn untrusted(u: &mut Unstructured) -> Result<()> {
    let (index, size, old, new) = (u64::arbitrary(u)?, u64::arbitrary(u)?, u64::arbitrary(u)?, u64::arbitrary(u)?);
    let (leaf, root, old_root) = (Hash::arbitrary(u)?, Hash::arbitrary(u)?, Hash::arbitrary(u)?);
    let pool: Vec<Hash> = (0..u.int_in_range(0..=8u8)?).map(|_| Hash::arbitrary(u)).collect::<Result<_>>()?;

    let _ = verify_inclusion(&leaf, index, size, &pool, &root);
    match verify_inclusion(&leaf, index, size, &[], &root) {
        Err(MerkleError::WrongProofLength { expected, got: 0 }) => {
            assert!(expected <= 64, "an audit path has at most 64 hashes, not {expected}");
            let proof = proof_of(expected, &pool);
            let verdict = verify_inclusion(&leaf, index, size, &proof, &root);
            assert!(!matches!(verdict, Err(MerkleError::WrongProofLength { .. })), "{verdict:?}");
        }
        Err(MerkleError::IndexOutOfRange { .. }) => assert!(index >= size),
        Err(MerkleError::RootMismatch) | Ok(()) => assert!(size == 1 && index == 0),
        other => panic!("verify_inclusion: {other:?}"),
    }

    let _ = verify_consistency(old, new, &old_root, &root, &pool);
    match verify_consistency(old, new, &old_root, &root, &[]) {
        Err(MerkleError::WrongProofLength { expected, got: 0 }) => {
            assert!(expected <= 128, "a consistency proof has at most 128 hashes, not {expected}");
            let proof = proof_of(expected, &pool);
            let verdict = verify_consistency(old, new, &old_root, &root, &proof);
            assert!(!matches!(verdict, Err(MerkleError::WrongProofLength { .. })), "{verdict:?}");
        }
        Err(MerkleError::BadSizes { .. }) => assert!(old > new),
        Ok(()) | Err(MerkleError::RootMismatch | MerkleError::OldRootMismatch) => assert!(old == 0 || old == new),
        other => panic!("verify_consistency: {other:?}"),
    }
    Ok(())
}

fn leaves_and_heads(u: &mut Unstructured) -> Result<()> {
    let bytes: Vec<u8> = Vec::arbitrary(u)?;
    if let Ok(leaf) = ExportLeaf::decode(&bytes) {
        assert_eq!(leaf.encode().as_ref(), Ok(&bytes), "canonical: a decoded leaf re-encodes to its bytes");
        assert_eq!(leaf.leaf_hash(), Ok(leaf_hash(&bytes)));
    }

    let head = TreeHead { size: u64::arbitrary(u)?, root: Hash::arbitrary(u)?, timestamp_ms: u64::arbitrary(u)? };
    let key = <[u8; 32]>::arbitrary(u)?;
    let signature = <[u8; 64]>::arbitrary(u)?;
    if let Ok(vk) = VerifyingKey::from_bytes(&key) {
        let _ = SignedTreeHead { head, signature }.verify(&vk);
    }
    // Signing costs more than everything else here: a genuine signature for one input in four keeps the rate up.
    if key[0] & 3 != 0 {
        return Ok(());
    }
    let signer = SigningKey::from_bytes(&key);
    let signed = head.sign(&signer);
    assert_eq!(signed.verify(&signer.verifying_key()), Ok(()));
    let bit = usize::from(u16::arbitrary(u)?) % (64 * 8);
    let mut forged = signed;
    forged.signature[bit / 8] ^= 1 << (bit % 8);
    assert_eq!(forged.verify(&signer.verifying_key()), Err(MerkleError::BadSignature));
    Ok(())
}

fn differential(u: &mut Unstructured) -> Result<()> {
    let n = u.int_in_range(1..=64u64)?;
    let seed = u8::arbitrary(u)?;
    let mut log = MerkleLog::new();
    for i in 0..n {
        assert_eq!(log.append(&[seed, i as u8]), i);
    }
    let rebuilt = MerkleLog::from_leaf_hashes((0..n).map(|i| log.leaf_hash(i).expect("in range")));
    assert_eq!(rebuilt.root(), log.root());

    // Inclusion.
    let size = u.int_in_range(1..=n)?;
    let index = u.int_in_range(0..=size - 1)?;
    let root = log.root_at(size).expect("in range");
    assert_eq!(rebuilt.root_at(size), Ok(root));
    let leaf = log.leaf_hash(index).expect("in range");
    let proof = log.inclusion_proof(index, size).expect("in range");
    assert_eq!(verify_inclusion(&leaf, index, size, &proof, &root), Ok(()));
    let (byte, bit) = (u8::arbitrary(u)?, u8::arbitrary(u)?);
    if !proof.is_empty() {
        let mut bad = proof.clone();
        let at = usize::from(byte) % bad.len();
        bad[at] = flip(&bad[at], bit, byte);
        assert!(verify_inclusion(&leaf, index, size, &bad, &root).is_err(), "flipped proof hash {at}");
    }
    assert!(verify_inclusion(&flip(&leaf, byte, bit), index, size, &proof, &root).is_err());
    assert!(verify_inclusion(&leaf, index, size, &proof, &flip(&root, byte, bit)).is_err());
    assert_eq!(log.inclusion_proof(size, size), Err(MerkleError::IndexOutOfRange { index: size, size }));

    // Consistency.
    let new = u.int_in_range(0..=n)?;
    let old = u.int_in_range(0..=new)?;
    let (old_root, new_root) = (log.root_at(old).expect("in range"), log.root_at(new).expect("in range"));
    let proof = log.consistency_proof(old, new).expect("in range");
    assert_eq!(rebuilt.consistency_proof(old, new).as_ref(), Ok(&proof));
    assert_eq!(verify_consistency(old, new, &old_root, &new_root, &proof), Ok(()));
    if !proof.is_empty() {
        let mut bad = proof.clone();
        let at = usize::from(bit) % bad.len();
        bad[at] = flip(&bad[at], byte, bit);
        assert!(verify_consistency(old, new, &old_root, &new_root, &bad).is_err(), "flipped proof hash {at}");
    }
    assert!(verify_consistency(old, new, &flip(&old_root, byte, bit), &new_root, &proof).is_err());
    if old > 0 {
        assert!(verify_consistency(old, new, &old_root, &flip(&new_root, byte, bit), &proof).is_err());
    }
    if old < new {
        assert!(log.consistency_proof(new, old).is_err());
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = untrusted(&mut u);
    let _ = leaves_and_heads(&mut u);
    let _ = differential(&mut u);
});
