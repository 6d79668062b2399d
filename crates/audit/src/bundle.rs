//! Export bundles: a zone's rows with a signed checkpoint and an inclusion proof per row, as
//! JSON lines, checkable offline with nothing but the checkpoint public key.
//!
//! Line 1 is the header, line 2 the checkpoint, then one line per row in sequence order. Every
//! hash is lower-case hex, and unknown fields are refused, so any change to a genuine bundle —
//! down to a single byte — fails verification.

use serde::{Deserialize, Serialize};

use crate::chain::content_hash;
use crate::merkle::{Checkpoint, Tree, leaf_hash, verify_checkpoint, verify_inclusion};
use crate::{Content, caracal_hex};

pub const FORMAT: &str = "caracal-audit-bundle-v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    zone_id: String,
    public_key: String,
    rows: u64,
}

/// One exported row: its hashed fields as stored, its chain columns and its proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRow {
    pub id: String,
    pub zone_id: String,
    pub event_type: String,
    pub request_id: String,
    pub decision: String,
    pub policy_set_id: String,
    pub policy_set_version_id: String,
    pub manifest_sha: String,
    pub evaluation_status: String,
    pub determining_policies: String,
    pub diagnostics: String,
    pub metadata: String,
    pub occurred_at_ms: i64,
    pub chain_seq: i64,
    pub content_sha256: String,
    /// The audit path from this row's leaf to the checkpoint root; it fixes the row's position,
    /// so order and contiguity need no separate link.
    pub proof: Vec<String>,
}

impl BundleRow {
    fn content(&self) -> Content {
        Content {
            id: self.id.clone(),
            zone_id: self.zone_id.clone(),
            event_type: self.event_type.clone(),
            request_id: self.request_id.clone(),
            decision: self.decision.clone(),
            policy_set_id: self.policy_set_id.clone(),
            policy_set_version_id: self.policy_set_version_id.clone(),
            manifest_sha: self.manifest_sha.clone(),
            evaluation_status: self.evaluation_status.clone(),
            determining_policies: self.determining_policies.clone(),
            diagnostics: self.diagnostics.clone(),
            metadata: self.metadata.clone(),
            occurred_at_ms: self.occurred_at_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("line {line}: {message}")]
    Malformed { line: usize, message: String },
    #[error("the bundle was exported for public key {found}, not the one given")]
    OtherKey { found: String },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("line {line} (row {seq}): {message}")]
    Row {
        line: usize,
        seq: i64,
        message: String,
    },
    #[error("cannot export: {0}")]
    Export(String),
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub zone_id: String,
    pub rows: u64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub tree_size: u64,
}

/// Builds a bundle of `rows` (a zone's consecutive rows, in order) proven against
/// `checkpoint`, whose tree is `tree` (the zone's leaf hashes, from its retention cut on).
pub fn export(
    rows: &[(Content, i64, String)],
    tree: &Tree<'_>,
    checkpoint: &Checkpoint,
    public_key: &str,
) -> Result<String, BundleError> {
    let export_error = |message: String| BundleError::Export(message);
    if tree.size() != checkpoint.tree_size {
        return Err(export_error(
            "the leaves do not match the checkpoint's tree size".into(),
        ));
    }
    let header = Header {
        format: FORMAT.to_owned(),
        zone_id: checkpoint.zone_id.clone(),
        public_key: public_key.to_owned(),
        rows: rows.len() as u64,
    };
    let mut text =
        serde_json::to_string(&header).map_err(|error| export_error(error.to_string()))?;
    text.push('\n');
    text.push_str(
        &serde_json::to_string(checkpoint).map_err(|error| export_error(error.to_string()))?,
    );
    text.push('\n');
    for (content, seq, content_sha256) in rows {
        let index = u64::try_from(*seq - 1)
            .map_err(|_| export_error(format!("row {seq} has no tree position")))?;
        let proof = tree
            .inclusion_proof(index)
            .ok_or_else(|| export_error(format!("row {seq} lies beyond the checkpoint")))?;
        let row = BundleRow {
            id: content.id.clone(),
            zone_id: content.zone_id.clone(),
            event_type: content.event_type.clone(),
            request_id: content.request_id.clone(),
            decision: content.decision.clone(),
            policy_set_id: content.policy_set_id.clone(),
            policy_set_version_id: content.policy_set_version_id.clone(),
            manifest_sha: content.manifest_sha.clone(),
            evaluation_status: content.evaluation_status.clone(),
            determining_policies: content.determining_policies.clone(),
            diagnostics: content.diagnostics.clone(),
            metadata: content.metadata.clone(),
            occurred_at_ms: content.occurred_at_ms,
            chain_seq: *seq,
            content_sha256: content_sha256.clone(),
            proof: proof.iter().map(|hash| caracal_hex(hash)).collect(),
        };
        text.push_str(
            &serde_json::to_string(&row).map_err(|error| export_error(error.to_string()))?,
        );
        text.push('\n');
    }
    Ok(text)
}

/// Verifies a bundle with the checkpoint public key (lower-case hex), and says exactly what
/// fails.
pub fn verify(text: &str, public_key: &str) -> Result<Verified, BundleError> {
    let malformed = |line: usize, message: String| BundleError::Malformed { line, message };
    if !text.ends_with('\n') {
        return Err(malformed(
            0,
            "the bundle does not end with a newline".into(),
        ));
    }
    let lines: Vec<&str> = text.trim_end_matches('\n').split('\n').collect();
    let header: Header = serde_json::from_str(lines.first().copied().unwrap_or_default())
        .map_err(|error| malformed(1, format!("header: {error}")))?;
    if header.format != FORMAT {
        return Err(malformed(1, format!("unknown format `{}`", header.format)));
    }
    if header.public_key != public_key {
        return Err(BundleError::OtherKey {
            found: header.public_key,
        });
    }
    let checkpoint: Checkpoint = serde_json::from_str(lines.get(1).copied().unwrap_or_default())
        .map_err(|error| malformed(2, format!("checkpoint: {error}")))?;
    if checkpoint.zone_id != header.zone_id {
        return Err(BundleError::Checkpoint("it names another zone".into()));
    }
    if caracal_crypto::unhex32(&checkpoint.root_hash).is_none()
        || checkpoint
            .signature
            .bytes()
            .any(|byte| byte.is_ascii_uppercase())
    {
        return Err(BundleError::Checkpoint("malformed hex".into()));
    }
    let tree_root = verify_checkpoint(&checkpoint, public_key)
        .map_err(|error| BundleError::Checkpoint(error.to_string()))?;
    let rows = lines.get(2..).unwrap_or_default();
    if rows.len() as u64 != header.rows {
        return Err(malformed(
            1,
            format!(
                "the header announces {} rows, the bundle has {}",
                header.rows,
                rows.len()
            ),
        ));
    }
    let mut previous: Option<i64> = None;
    let (mut first_seq, mut last_seq) = (0, 0);
    for (offset, line_text) in rows.iter().enumerate() {
        let line = offset + 3;
        let row: BundleRow =
            serde_json::from_str(line_text).map_err(|error| malformed(line, error.to_string()))?;
        let failed = |message: String| BundleError::Row {
            line,
            seq: row.chain_seq,
            message,
        };
        if row.zone_id != header.zone_id {
            return Err(failed("the row names another zone".into()));
        }
        let computed = content_hash(&row.content());
        if caracal_crypto::unhex32(&row.content_sha256) != Some(computed) {
            return Err(failed("the fields do not match the content hash".into()));
        }
        match previous {
            Some(seq) if row.chain_seq != seq + 1 => {
                return Err(failed(format!("expected row {}", seq + 1)));
            }
            Some(_) => {}
            None => first_seq = row.chain_seq,
        }
        let proof = row
            .proof
            .iter()
            .map(|text| caracal_crypto::unhex32(text))
            .collect::<Option<Vec<[u8; 32]>>>()
            .ok_or_else(|| failed("malformed proof".into()))?;
        let index =
            u64::try_from(row.chain_seq - 1).map_err(|_| failed("sequence below 1".into()))?;
        if !verify_inclusion(
            &leaf_hash(&computed),
            index,
            checkpoint.tree_size,
            &proof,
            &tree_root,
        ) {
            return Err(failed(
                "the inclusion proof does not lead to the signed root".into(),
            ));
        }
        previous = Some(row.chain_seq);
        last_seq = row.chain_seq;
    }
    Ok(Verified {
        zone_id: header.zone_id,
        rows: header.rows,
        first_seq,
        last_seq,
        tree_size: checkpoint.tree_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Event;
    use crate::chain::{ChainKey, next_link};
    use crate::merkle::CheckpointSigner;
    use crate::merkle::root;

    /// A genuine bundle of rows 3..=6 of an 8-row zone, and its public key.
    fn genuine() -> (String, String) {
        let key = ChainKey::new("chain-1", b"k");
        let mut head = None;
        let mut rows = Vec::new();
        let mut leaves = Vec::new();
        for n in 1..=8 {
            let event = Event {
                id: format!("ev-{n}"),
                zone_id: "zone-1".into(),
                event_type: "gateway.request".into(),
                request_id: format!("req-{n}"),
                decision: "allow".into(),
                policy_set_id: None,
                policy_set_version_id: None,
                manifest_sha: None,
                evaluation_status: "complete".into(),
                determining_policies_json: serde_json::json!([{"id": "p"}]),
                diagnostics_json: serde_json::json!([]),
                metadata_json: serde_json::json!({"n": n, "note": "a\"b"}),
                occurred_at_ms: 1_760_000_000_000 + n,
            };
            let content = event.content();
            let (link, hash) = next_link(&key, head, &content);
            head = Some((link.seq, hash));
            leaves.push(leaf_hash(&hash));
            rows.push((content, link.seq, link.content_sha256));
        }
        let (signer, _) = CheckpointSigner::generate("ckpt-1").unwrap();
        let checkpoint = signer.sign("zone-1", 8, &root(&leaves), 1_760_000_001_000);
        let bundle = export(
            &rows[2..6],
            &Tree::whole(&leaves),
            &checkpoint,
            &signer.public_key_hex(),
        )
        .unwrap();
        (bundle, signer.public_key_hex())
    }

    #[test]
    fn a_genuine_bundle_verifies_with_the_public_key_alone() {
        let (bundle, public_key) = genuine();
        let verified = verify(&bundle, &public_key).unwrap();
        assert_eq!(
            (
                verified.rows,
                verified.first_seq,
                verified.last_seq,
                verified.tree_size
            ),
            (4, 3, 6, 8)
        );
        let (_, stranger) = genuine();
        assert!(matches!(
            verify(&bundle, &stranger),
            Err(BundleError::OtherKey { .. })
        ));
    }

    #[test]
    fn every_single_byte_change_is_rejected() {
        let (bundle, public_key) = genuine();
        let bytes = bundle.as_bytes();
        for position in 0..bytes.len() {
            for replacement in [bytes[position] ^ 0x01, bytes[position] ^ 0x20, b'0', b'"'] {
                if replacement == bytes[position] {
                    continue;
                }
                let mut changed = bytes.to_vec();
                changed[position] = replacement;
                let Ok(text) = String::from_utf8(changed) else {
                    continue; // Not text: no verifier would even read it.
                };
                assert!(
                    verify(&text, &public_key).is_err(),
                    "changing byte {position} ({:?} -> {:?}) went unnoticed: …{}…",
                    bytes[position] as char,
                    replacement as char,
                    String::from_utf8_lossy(
                        &bytes[position.saturating_sub(40)..(position + 10).min(bytes.len())]
                    )
                );
            }
        }
    }

    #[test]
    fn failures_say_what_and_where() {
        let (bundle, public_key) = genuine();
        let edited = bundle.replacen("\"decision\":\"allow\"", "\"decision\":\"deny\"", 1);
        assert_eq!(
            verify(&edited, &public_key).unwrap_err().to_string(),
            "line 3 (row 3): the fields do not match the content hash"
        );
        let mut lines: Vec<&str> = bundle.lines().collect();
        lines.remove(3);
        let dropped = format!("{}\n", lines.join("\n"));
        assert!(
            verify(&dropped, &public_key)
                .unwrap_err()
                .to_string()
                .contains("announces 4 rows")
        );
    }
}
