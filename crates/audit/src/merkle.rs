//! RFC 6962 Merkle trees over a zone's content hashes, inclusion proofs, and signed
//! checkpoints (tree size + root), so a third party holding only the public key can check an
//! export offline.

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use caracal_crypto::{hex, sha256};
use serde::{Deserialize, Serialize};

/// The leaf hash of a row: SHA-256(0x00 ‖ content hash).
pub fn leaf_hash(content: &[u8; 32]) -> [u8; 32] {
    let mut bytes = [0u8; 33];
    bytes[1..].copy_from_slice(content);
    sha256(&bytes)
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut bytes = [0u8; 65];
    bytes[0] = 1;
    bytes[1..33].copy_from_slice(left);
    bytes[33..].copy_from_slice(right);
    sha256(&bytes)
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The Merkle tree hash of the leaves (RFC 6962 §2.1); the empty tree hashes the empty string.
pub fn root(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves {
        [] => sha256(b""),
        [leaf] => *leaf,
        _ => {
            let (left, right) = leaves.split_at(split(leaves.len() as u64) as usize);
            node_hash(&root(left), &root(right))
        }
    }
}

/// The audit path of leaf `index` (RFC 6962 §2.1.1), or `None` if it is out of range.
pub fn inclusion_proof(leaves: &[[u8; 32]], index: usize) -> Option<Vec<[u8; 32]>> {
    Tree::whole(leaves).inclusion_proof(u64::try_from(index).ok()?)
}

/// The perfect subtrees that tile the first `cut` leaves, largest (leftmost) first: the
/// leaves' compact range. Their roots stand in for leaves that retention dropped.
pub fn frontier_ranges(cut: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut start = 0;
    (0..u64::BITS).rev().filter_map(move |bit| {
        let width = 1u64 << bit;
        (cut & width != 0).then(|| {
            let range = (start, start + width);
            start += width;
            range
        })
    })
}

/// A zone's Merkle tree whose first `cut` leaves may have been dropped: `frontier` holds the
/// roots of [`frontier_ranges`]`(cut)` and `leaves` the leaf hashes from index `cut` on. Every
/// root, proof and later frontier of the whole tree can still be computed from these.
#[derive(Debug, Clone, Copy)]
pub struct Tree<'a> {
    pub cut: u64,
    pub frontier: &'a [[u8; 32]],
    pub leaves: &'a [[u8; 32]],
}

impl<'a> Tree<'a> {
    /// A tree with every leaf present.
    pub fn whole(leaves: &'a [[u8; 32]]) -> Tree<'a> {
        Tree {
            cut: 0,
            frontier: &[],
            leaves,
        }
    }

    pub fn size(&self) -> u64 {
        self.cut + self.leaves.len() as u64
    }

    /// The tree's root, or `None` when the frontier does not match the cut.
    pub fn root(&self) -> Option<[u8; 32]> {
        if self.size() == 0 {
            return Some(sha256(b""));
        }
        self.hash(0, self.size())
    }

    /// The audit path of leaf `index` (a leaf still present), siblings from the leaf up.
    pub fn inclusion_proof(&self, index: u64) -> Option<Vec<[u8; 32]>> {
        if index < self.cut || index >= self.size() {
            return None;
        }
        let (mut lo, mut hi) = (0, self.size());
        let mut siblings = Vec::new();
        while hi - lo > 1 {
            let middle = lo + split(hi - lo);
            if index < middle {
                siblings.push(self.hash(middle, hi)?);
                hi = middle;
            } else {
                siblings.push(self.hash(lo, middle)?);
                lo = middle;
            }
        }
        siblings.reverse();
        Some(siblings)
    }

    /// The frontier that stands in for the first `cut` leaves (`self.cut ≤ cut ≤ size`).
    pub fn frontier_at(&self, cut: u64) -> Option<Vec<[u8; 32]>> {
        if cut < self.cut || cut > self.size() {
            return None;
        }
        frontier_ranges(cut)
            .map(|(lo, hi)| self.hash(lo, hi))
            .collect()
    }

    /// The Merkle tree hash of leaves `lo..hi`, a node of this tree.
    fn hash(&self, lo: u64, hi: u64) -> Option<[u8; 32]> {
        if lo >= self.cut {
            let start = usize::try_from(lo - self.cut).ok()?;
            let end = usize::try_from(hi - self.cut).ok()?;
            return Some(root(self.leaves.get(start..end)?));
        }
        if hi <= self.cut {
            // A node wholly among the dropped leaves: a frontier node, or a union of several.
            if let Some(position) = frontier_ranges(self.cut).position(|range| range == (lo, hi)) {
                return self.frontier.get(position).copied();
            }
            if hi - lo == 1 {
                return None;
            }
        }
        let middle = lo + split(hi - lo);
        Some(node_hash(&self.hash(lo, middle)?, &self.hash(middle, hi)?))
    }
}

/// Checks an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &[u8; 32],
    index: u64,
    tree_size: u64,
    proof: &[[u8; 32]],
    expected_root: &[u8; 32],
) -> bool {
    if index >= tree_size {
        return false;
    }
    let (mut fn_, mut sn) = (index, tree_size - 1);
    let mut hash = *leaf;
    for sibling in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            hash = node_hash(sibling, &hash);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            hash = node_hash(&hash, sibling);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && hash == *expected_root
}

/// A signed statement that a zone's chain had `tree_size` rows with this root at `issued_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub zone_id: String,
    pub tree_size: u64,
    pub root_hash: String,
    pub issued_at_ms: i64,
    pub key_id: String,
    pub signature: String,
}

fn checkpoint_bytes(
    key_id: &str,
    zone_id: &str,
    tree_size: u64,
    root: &[u8; 32],
    issued_at_ms: i64,
) -> Vec<u8> {
    let mut bytes = b"caracal-audit-checkpoint-v1\n".to_vec();
    for text in [key_id, zone_id] {
        bytes.extend_from_slice(&u32::try_from(text.len()).unwrap_or(u32::MAX).to_be_bytes());
        bytes.extend_from_slice(text.as_bytes());
    }
    bytes.extend_from_slice(&tree_size.to_be_bytes());
    bytes.extend_from_slice(root);
    bytes.extend_from_slice(&issued_at_ms.to_be_bytes());
    bytes
}

/// The deployment's checkpoint signing key (Ed25519). Its public half is published.
pub struct CheckpointSigner {
    key_id: String,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("the checkpoint signing key is malformed")]
    BadKey,
    #[error("the checkpoint signature does not verify")]
    BadSignature,
    #[error("the checkpoint is malformed")]
    Malformed,
}

impl CheckpointSigner {
    /// A new key; `pkcs8` is what to store (sealed) to load it again.
    pub fn generate(
        key_id: impl Into<String>,
    ) -> Result<(CheckpointSigner, Vec<u8>), CheckpointError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|_| CheckpointError::BadKey)?;
        let bytes = pkcs8.as_ref().to_vec();
        Ok((CheckpointSigner::from_pkcs8(key_id, &bytes)?, bytes))
    }

    pub fn from_pkcs8(
        key_id: impl Into<String>,
        pkcs8: &[u8],
    ) -> Result<CheckpointSigner, CheckpointError> {
        Ok(CheckpointSigner {
            key_id: key_id.into(),
            pair: Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| CheckpointError::BadKey)?,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The 32-byte public key, hex: what a verifier needs.
    pub fn public_key_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }

    pub fn sign(
        &self,
        zone_id: &str,
        tree_size: u64,
        root: &[u8; 32],
        issued_at_ms: i64,
    ) -> Checkpoint {
        let signature = self.pair.sign(&checkpoint_bytes(
            &self.key_id,
            zone_id,
            tree_size,
            root,
            issued_at_ms,
        ));
        Checkpoint {
            zone_id: zone_id.to_owned(),
            tree_size,
            root_hash: hex(root),
            issued_at_ms,
            key_id: self.key_id.clone(),
            signature: hex(signature.as_ref()),
        }
    }
}

/// What an evidence manifest's signature covers: a domain tag, so a manifest signature can
/// never pass for a checkpoint signature or the reverse, then the manifest's SHA-256.
fn manifest_bytes(digest: &[u8; 32]) -> Vec<u8> {
    let mut bytes = b"caracal-evidence-manifest-v1\n".to_vec();
    bytes.extend_from_slice(digest);
    bytes
}

impl CheckpointSigner {
    /// Signs an evidence bundle's manifest (by its SHA-256); the signature in hex.
    pub fn sign_manifest(&self, digest: &[u8; 32]) -> String {
        hex(self.pair.sign(&manifest_bytes(digest)).as_ref())
    }
}

/// Checks an evidence manifest's signature with the published public key (hex).
pub fn verify_manifest(
    digest: &[u8; 32],
    signature_hex: &str,
    public_key_hex: &str,
) -> Result<(), CheckpointError> {
    let public_key = caracal_crypto::unhex(public_key_hex).ok_or(CheckpointError::BadKey)?;
    let signature = caracal_crypto::unhex(signature_hex).ok_or(CheckpointError::Malformed)?;
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, public_key)
        .verify(&manifest_bytes(digest), &signature)
        .map_err(|_| CheckpointError::BadSignature)
}

/// Checks a checkpoint's signature with the published public key (hex); returns its root.
pub fn verify_checkpoint(
    checkpoint: &Checkpoint,
    public_key_hex: &str,
) -> Result<[u8; 32], CheckpointError> {
    let public_key = caracal_crypto::unhex(public_key_hex).ok_or(CheckpointError::BadKey)?;
    let root: [u8; 32] = caracal_crypto::unhex(&checkpoint.root_hash)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(CheckpointError::Malformed)?;
    let signature_bytes =
        caracal_crypto::unhex(&checkpoint.signature).ok_or(CheckpointError::Malformed)?;
    let message = checkpoint_bytes(
        &checkpoint.key_id,
        &checkpoint.zone_id,
        checkpoint.tree_size,
        &root,
        checkpoint.issued_at_ms,
    );
    UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(&message, &signature_bytes)
        .map_err(|_| CheckpointError::BadSignature)?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| leaf_hash(&sha256(&i.to_be_bytes())))
            .collect()
    }

    #[test]
    fn a_manifest_signature_verifies_only_for_its_digest_and_key_and_never_as_a_checkpoint() {
        let (signer, _) = CheckpointSigner::generate("k").unwrap();
        let (other, _) = CheckpointSigner::generate("o").unwrap();
        let digest = sha256(b"manifest");
        let signature = signer.sign_manifest(&digest);
        assert_eq!(
            verify_manifest(&digest, &signature, &signer.public_key_hex()),
            Ok(())
        );
        assert_eq!(
            verify_manifest(&sha256(b"other"), &signature, &signer.public_key_hex()),
            Err(CheckpointError::BadSignature)
        );
        assert_eq!(
            verify_manifest(&digest, &signature, &other.public_key_hex()),
            Err(CheckpointError::BadSignature)
        );
        let checkpoint = signer.sign("z", 1, &digest, 0);
        assert!(verify_manifest(&digest, &checkpoint.signature, &signer.public_key_hex()).is_err());
    }

    #[test]
    fn small_trees_hash_as_rfc_6962_defines() {
        let l = leaves(3);
        assert_eq!(root(&[]), sha256(b""));
        assert_eq!(root(&l[..1]), l[0]);
        assert_eq!(root(&l[..2]), node_hash(&l[0], &l[1]));
        assert_eq!(root(&l), node_hash(&node_hash(&l[0], &l[1]), &l[2]));
    }

    #[test]
    fn every_inclusion_proof_verifies_and_no_wrong_one_does() {
        for size in 1..=33 {
            let l = leaves(size);
            let tree_root = root(&l);
            for index in 0..size {
                let proof = inclusion_proof(&l, index).unwrap();
                assert!(
                    verify_inclusion(&l[index], index as u64, size as u64, &proof, &tree_root),
                    "{size}/{index}"
                );
                let other = (index + 1) % size;
                if other != index {
                    assert!(
                        !verify_inclusion(&l[other], index as u64, size as u64, &proof, &tree_root),
                        "{size}/{index}"
                    );
                }
                // The tree size itself is bound by the signed checkpoint, not by the proof.
                if let Some(first) = proof.first() {
                    let mut tampered = proof.clone();
                    tampered[0] = sha256(first);
                    assert!(!verify_inclusion(
                        &l[index],
                        index as u64,
                        size as u64,
                        &tampered,
                        &tree_root
                    ));
                }
            }
            assert_eq!(inclusion_proof(&l, size), None);
        }
    }

    #[test]
    fn checkpoints_verify_only_unaltered_with_the_right_key() {
        let (signer, pkcs8) = CheckpointSigner::generate("ckpt-1").unwrap();
        let reloaded = CheckpointSigner::from_pkcs8("ckpt-1", &pkcs8).unwrap();
        assert_eq!(reloaded.public_key_hex(), signer.public_key_hex());
        let tree_root = root(&leaves(5));
        let checkpoint = signer.sign("zone-1", 5, &tree_root, 1_760_000_000_000);
        assert_eq!(
            verify_checkpoint(&checkpoint, &signer.public_key_hex()),
            Ok(tree_root)
        );
        let mut altered = checkpoint.clone();
        altered.tree_size = 4;
        assert_eq!(
            verify_checkpoint(&altered, &signer.public_key_hex()),
            Err(CheckpointError::BadSignature)
        );
        let (stranger, _) = CheckpointSigner::generate("ckpt-2").unwrap();
        assert_eq!(
            verify_checkpoint(&checkpoint, &stranger.public_key_hex()),
            Err(CheckpointError::BadSignature)
        );
    }

    #[test]
    fn a_pruned_tree_keeps_every_root_and_proof_of_the_whole_one() {
        for size in 1..=40u64 {
            let l = leaves(size as usize);
            let whole = Tree::whole(&l);
            for cut in 0..=size {
                let frontier = whole.frontier_at(cut).unwrap();
                assert_eq!(frontier.len(), cut.count_ones() as usize);
                let pruned = Tree {
                    cut,
                    frontier: &frontier,
                    leaves: &l[cut as usize..],
                };
                assert_eq!(pruned.root(), Some(root(&l)), "{size}/{cut}");
                for index in 0..size {
                    let expected =
                        (index >= cut).then(|| inclusion_proof(&l, index as usize).unwrap());
                    assert_eq!(
                        pruned.inclusion_proof(index),
                        expected,
                        "{size}/{cut}/{index}"
                    );
                }
                // A later cut's frontier follows from an earlier one.
                for later in cut..=size {
                    assert_eq!(pruned.frontier_at(later), whole.frontier_at(later));
                }
                if cut > 0 {
                    let mut forged = frontier.clone();
                    forged[0] = sha256(&forged[0]);
                    let forged_tree = Tree {
                        frontier: &forged,
                        ..pruned
                    };
                    assert_ne!(forged_tree.root(), Some(root(&l)));
                    let short = Tree {
                        frontier: &frontier[1..],
                        ..pruned
                    };
                    assert_eq!(short.root(), None);
                }
            }
        }
    }
}
