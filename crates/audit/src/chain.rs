//! The per-zone chain: each row's content hash, its link to the previous row, and a keyed MAC
//! over the link; and the verification that finds every kind of tampering.
//!
//! The MAC key is named by an id stored on each row, so rotating the key leaves every older
//! row verifiable with the key it was written under.

use std::collections::HashMap;
use std::fmt;

use aws_lc_rs::hmac;
use caracal_crypto::{hex, sha256};

use crate::Content;

/// The previous hash of a zone's first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// A chain MAC key and its id.
#[derive(Clone)]
pub struct ChainKey {
    id: String,
    key: hmac::Key,
}

impl ChainKey {
    pub fn new(id: impl Into<String>, secret: &[u8]) -> ChainKey {
        ChainKey {
            id: id.into(),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainKey")
            .field("id", &self.id)
            .field("key", &"***")
            .finish()
    }
}

/// SHA-256 of the content bytes.
pub fn content_hash(content: &Content) -> [u8; 32] {
    sha256(&content.bytes())
}

fn link_bytes(zone_id: &str, seq: i64, content: &[u8; 32], previous: &[u8; 32]) -> Vec<u8> {
    let mut bytes = b"caracal-audit-link-v1\n".to_vec();
    bytes.extend_from_slice(
        &u32::try_from(zone_id.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    bytes.extend_from_slice(zone_id.as_bytes());
    bytes.extend_from_slice(&seq.to_be_bytes());
    bytes.extend_from_slice(content);
    bytes.extend_from_slice(previous);
    bytes
}

/// HMAC-SHA256 over (zone, sequence, content hash, previous hash).
pub fn link_mac(
    key: &ChainKey,
    zone_id: &str,
    seq: i64,
    content: &[u8; 32],
    previous: &[u8; 32],
) -> [u8; 32] {
    let tag = hmac::sign(&key.key, &link_bytes(zone_id, seq, content, previous));
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// A retention cut: rows `1..=seq` were dropped. The next row links to `last` (row `seq`'s
/// content hash) and `frontier` stands in for the dropped Merkle leaves
/// ([`crate::merkle::frontier_ranges`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub seq: i64,
    pub last: [u8; 32],
    pub frontier: Vec<[u8; 32]>,
}

/// HMAC-SHA256 over a zone's cut, so a forged cut (rows deleted with a made-up record) fails.
pub fn cut_mac(key: &ChainKey, zone_id: &str, cut: &Cut) -> [u8; 32] {
    let mut bytes = b"caracal-audit-cut-v1\n".to_vec();
    bytes.extend_from_slice(
        &u32::try_from(zone_id.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    bytes.extend_from_slice(zone_id.as_bytes());
    bytes.extend_from_slice(&cut.seq.to_be_bytes());
    bytes.extend_from_slice(&cut.last);
    for node in &cut.frontier {
        bytes.extend_from_slice(node);
    }
    let tag = hmac::sign(&key.key, &bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Whether `stored` (hex, as stored) is the cut's MAC under `key`.
pub fn cut_mac_matches(key: &ChainKey, zone_id: &str, cut: &Cut, stored: &str) -> bool {
    mac_matches(&cut_mac(key, zone_id, cut), stored)
}

/// Compares a computed MAC with a stored hex one in constant time.
fn mac_matches(expected: &[u8; 32], stored: &str) -> bool {
    caracal_crypto::unhex32(stored).is_some_and(|stored| {
        aws_lc_rs::constant_time::verify_slices_are_equal(expected, &stored).is_ok()
    })
}

/// The chain columns of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub seq: i64,
    pub content_sha256: String,
    pub prev_content_sha256: String,
    pub chain_mac: String,
    pub chain_key_id: String,
}

/// The link for `content` after `head` (the zone's last (sequence, content hash), if any),
/// and the content hash it links.
pub fn next_link(
    key: &ChainKey,
    head: Option<(i64, [u8; 32])>,
    content: &Content,
) -> (Link, [u8; 32]) {
    let hash = content_hash(content);
    (link_after(key, head, &content.zone_id, &hash), hash)
}

/// The link for a row whose content hash is already known.
pub fn link_after(
    key: &ChainKey,
    head: Option<(i64, [u8; 32])>,
    zone_id: &str,
    hash: &[u8; 32],
) -> Link {
    let (previous_seq, previous) = head.unwrap_or((0, GENESIS));
    let seq = previous_seq + 1;
    Link {
        seq,
        content_sha256: hex(hash),
        prev_content_sha256: hex(&previous),
        chain_mac: hex(&link_mac(key, zone_id, seq, hash, &previous)),
        chain_key_id: key.id.clone(),
    }
}

/// A stored row: its hashed fields as stored, and its chain columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    pub content: Content,
    pub link: Link,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FindingKind {
    /// A stored field no longer matches the stored content hash: the row was edited.
    ContentMismatch,
    /// The link MAC does not verify: the chain columns were rewritten or the row was forged
    /// (an inserted row cannot carry a valid MAC).
    MacFailure,
    /// The row names a MAC key id that is not known.
    UnknownKey,
    /// The row does not link to the row before it.
    ChainBreak,
    /// Sequence numbers skip: rows were deleted.
    SequenceGap,
    /// The row links to a row that now sits later in the chain: rows were reordered.
    Reordered,
    /// The chain ends before a point it is known to have reached (a checkpoint, or a head seen
    /// earlier): the newest rows were deleted.
    Truncated,
    /// The rows no longer hash to the root of the zone's latest signed checkpoint, or that
    /// checkpoint is older than the retention cut: rows or checkpoints were rewritten.
    CheckpointMismatch,
}

impl FindingKind {
    pub const ALL: [FindingKind; 8] = [
        FindingKind::ContentMismatch,
        FindingKind::MacFailure,
        FindingKind::UnknownKey,
        FindingKind::ChainBreak,
        FindingKind::SequenceGap,
        FindingKind::Reordered,
        FindingKind::Truncated,
        FindingKind::CheckpointMismatch,
    ];

    /// The metric label and the readiness detail.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::ContentMismatch => "content_mismatch",
            FindingKind::MacFailure => "mac_failure",
            FindingKind::UnknownKey => "unknown_key",
            FindingKind::ChainBreak => "chain_break",
            FindingKind::SequenceGap => "sequence_gap",
            FindingKind::Reordered => "reordered",
            FindingKind::Truncated => "truncated",
            FindingKind::CheckpointMismatch => "checkpoint_mismatch",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    pub zone_id: String,
    /// The row concerned (for a truncation, the last row present).
    pub seq: i64,
    pub detail: String,
}

/// What the verifier already trusts about a zone before the rows it is given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Anchor {
    /// The last verified row before these rows: (sequence, content hash). `None` means the rows
    /// start at the zone's first row.
    pub after: Option<(i64, [u8; 32])>,
    /// The chain is known to reach at least this sequence (a signed checkpoint's size, or the
    /// highest head seen before).
    pub at_least: i64,
}

/// Verifies one zone's rows, sorted by sequence, against `anchor`; returns every finding (an
/// empty list means the chain is intact).
pub fn verify(
    zone_id: &str,
    rows: &[StoredRow],
    keys: &HashMap<String, ChainKey>,
    anchor: Anchor,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut finding = |kind: FindingKind, seq: i64, detail: String| {
        findings.push(Finding {
            kind,
            zone_id: zone_id.to_owned(),
            seq,
            detail,
        });
    };
    // Where each content hash sits, to tell a reorder from a break; built only on a break.
    let mut later_hashes: Option<HashMap<&str, i64>> = None;
    let (mut previous_seq, mut previous_hash) = anchor.after.unwrap_or((0, GENESIS));
    for row in rows {
        let link = &row.link;
        let seq = link.seq;
        let stored_content = caracal_crypto::unhex32(&link.content_sha256);
        let stored_previous = caracal_crypto::unhex32(&link.prev_content_sha256);
        if row.content.zone_id != zone_id {
            finding(
                FindingKind::ContentMismatch,
                seq,
                format!("row names zone `{}`", row.content.zone_id),
            );
        }
        if stored_content != Some(content_hash(&row.content)) {
            finding(
                FindingKind::ContentMismatch,
                seq,
                format!("event `{}` differs from its content hash", row.content.id),
            );
        }
        match (
            keys.get(&link.chain_key_id),
            stored_content,
            stored_previous,
        ) {
            (None, ..) => finding(
                FindingKind::UnknownKey,
                seq,
                format!("MAC key `{}` is not known", link.chain_key_id),
            ),
            (Some(key), Some(content), Some(previous)) => {
                let expected = link_mac(key, zone_id, seq, &content, &previous);
                if !mac_matches(&expected, &link.chain_mac) {
                    finding(
                        FindingKind::MacFailure,
                        seq,
                        format!("event `{}`: link MAC does not verify", row.content.id),
                    );
                }
            }
            (Some(_), ..) => finding(
                FindingKind::MacFailure,
                seq,
                "malformed chain hashes".to_owned(),
            ),
        }
        let gap = seq != previous_seq + 1;
        if gap {
            finding(
                FindingKind::SequenceGap,
                seq,
                format!(
                    "sequence jumps from {previous_seq} to {seq}: {} row(s) missing",
                    seq - previous_seq - 1
                ),
            );
        } else if stored_previous != Some(previous_hash) {
            let later_hashes = later_hashes.get_or_insert_with(|| {
                rows.iter()
                    .map(|row| (row.link.content_sha256.as_str(), row.link.seq))
                    .collect()
            });
            match later_hashes.get(link.prev_content_sha256.as_str()) {
                Some(&later) if later > seq => finding(
                    FindingKind::Reordered,
                    seq,
                    format!("row {seq} links to row {later}, which now comes after it"),
                ),
                _ => finding(
                    FindingKind::ChainBreak,
                    seq,
                    format!("row {seq} does not link to row {previous_seq}"),
                ),
            }
        }
        previous_seq = seq;
        previous_hash = stored_content.unwrap_or(GENESIS);
    }
    if previous_seq < anchor.at_least {
        finding(
            FindingKind::Truncated,
            previous_seq,
            format!(
                "the chain ends at {previous_seq} but is known to reach {}",
                anchor.at_least
            ),
        );
    }
    findings
}

#[cfg(test)]
mod tests;
