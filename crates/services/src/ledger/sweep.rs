//! The tamper sweep: re-verifies every zone's chain (fully at start and periodically, and
//! incrementally in between), records each finding until an operator acknowledges it, counts
//! findings by kind, and keeps the highest sequence seen per zone so deleting the newest rows
//! is noticed. Runs on one replica at a time (a store lease).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use caracal_audit::chain::{Anchor, ChainKey, Finding, FindingKind, verify};
use caracal_audit::merkle::CheckpointSigner;
use caracal_store::{Store, StoreError, TamperFinding, now_ms};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::from_row;

/// Rows verified per store read.
const PAGE: i64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Debug, Default)]
pub struct SweepMetrics {
    /// New findings, by kind (`caracal_audit_tamper_detected_total{kind}`).
    pub tamper_detected: Family<KindLabel, Counter>,
    pub rows_checked: Counter,
    pub last_sweep_unix: Gauge,
    pub last_full_sweep_unix: Gauge,
}

#[derive(Default)]
struct Memory {
    /// The last verified row per zone: (sequence, content hash).
    verified: HashMap<String, (i64, [u8; 32])>,
    /// The highest sequence ever seen per zone.
    highest: HashMap<String, i64>,
}

pub struct Sweeper {
    store: Arc<dyn Store>,
    kek: caracal_crypto::Kek,
    /// Signs a checkpoint after each clean full sweep of a zone that grew.
    signer: Option<CheckpointSigner>,
    memory: Mutex<Memory>,
    metrics: Arc<SweepMetrics>,
}

/// A stored hash; a malformed one (reported by `verify`) stands as zeros.
fn decode(hex_text: &str) -> [u8; 32] {
    caracal_crypto::unhex32(hex_text).unwrap_or([0; 32])
}

impl Sweeper {
    pub fn new(
        store: Arc<dyn Store>,
        kek: caracal_crypto::Kek,
        metrics: Arc<SweepMetrics>,
    ) -> Sweeper {
        Sweeper {
            store,
            kek,
            signer: None,
            memory: Mutex::new(Memory::default()),
            metrics,
        }
    }

    /// Signs checkpoints with `signer` after clean full sweeps.
    pub fn with_checkpoints(mut self, signer: CheckpointSigner) -> Sweeper {
        self.signer = Some(signer);
        self
    }

    /// Verifies every zone from its first row.
    pub async fn full(&self) -> Result<Vec<Finding>, StoreError> {
        let findings = self.sweep(true).await?;
        self.metrics.last_full_sweep_unix.set(now_ms() / 1000);
        Ok(findings)
    }

    /// Verifies the rows added since the last sweep, and that no zone lost its newest rows.
    pub async fn incremental(&self) -> Result<Vec<Finding>, StoreError> {
        self.sweep(false).await
    }

    async fn sweep(&self, full: bool) -> Result<Vec<Finding>, StoreError> {
        let mut findings = Vec::new();
        let keys = super::all_chain_keys(self.store.as_ref(), &self.kek).await?;
        for zone_id in self.store.audit_zones().await? {
            findings.extend(self.sweep_zone(&zone_id, full, &keys).await?);
        }
        self.metrics.last_sweep_unix.set(now_ms() / 1000);
        Ok(findings)
    }

    async fn sweep_zone(
        &self,
        zone_id: &str,
        full: bool,
        keys: &HashMap<String, ChainKey>,
    ) -> Result<Vec<Finding>, StoreError> {
        let mut findings = Vec::new();
        let head = self
            .store
            .audit_head(zone_id)
            .await?
            .map_or(0, |(seq, _)| seq);
        let checkpoint = self.store.latest_audit_checkpoint(zone_id).await?;
        let checkpointed = checkpoint
            .as_ref()
            .map_or(0, |checkpoint| checkpoint.tree_size);
        if head < checkpointed {
            findings.push(Finding {
                kind: FindingKind::Truncated,
                zone_id: zone_id.to_owned(),
                seq: head,
                detail: format!(
                    "the chain ends at {head} but a signed checkpoint covers {checkpointed} rows"
                ),
            });
        }
        let (highest, verified) = {
            let memory = self
                .memory
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            (
                memory.highest.get(zone_id).copied().unwrap_or(0),
                memory.verified.get(zone_id).copied(),
            )
        };
        if head < highest {
            findings.push(Finding {
                kind: FindingKind::Truncated,
                zone_id: zone_id.to_owned(),
                seq: head,
                detail: format!("the chain ends at {head} but reached {highest} before"),
            });
        }
        let mut after = match verified {
            Some((seq, hash)) if !full && seq <= head => Some((seq, hash)),
            _ => None,
        };
        let mut from = after.map_or(1, |(seq, _)| seq + 1);
        // A full sweep from row 1 also gathers the leaves of the zone's Merkle tree.
        let mut leaves = Vec::new();
        while from <= head {
            let rows = self
                .store
                .audit_range(zone_id, from, (from + PAGE - 1).min(head))
                .await?;
            let Some(last) = rows.last() else {
                // A whole page is missing: the next row present reports the gap.
                from += PAGE;
                continue;
            };
            let last_position = (last.chain_seq, decode(&last.content_sha256));
            if full {
                leaves.extend(rows.iter().map(|row| decode(&row.content_sha256)));
            }
            let stored: Vec<_> = rows.iter().map(from_row).collect();
            findings.extend(verify(
                zone_id,
                &stored,
                keys,
                Anchor { after, at_least: 0 },
            ));
            self.metrics.rows_checked.inc_by(rows.len() as u64);
            after = Some(last_position);
            from = last_position.0 + 1;
        }
        let clean = findings.is_empty() && leaves.len() as i64 == head;
        if let (true, true, Some(signer)) = (full && clean, head > checkpointed, &self.signer) {
            let root = caracal_audit::bundle::tree_root(&leaves);
            let signed = signer.sign(zone_id, u64::try_from(head).unwrap_or(0), &root, now_ms());
            self.store
                .insert_audit_checkpoint(&caracal_store::AuditCheckpoint {
                    zone_id: signed.zone_id,
                    tree_size: head,
                    root_hash: signed.root_hash,
                    issued_at_ms: signed.issued_at_ms,
                    key_id: signed.key_id,
                    signature: signed.signature,
                })
                .await?;
        }
        // Findings are stored before the zone's progress moves on: if storing fails, the next
        // sweep checks these rows again rather than passing over what it found.
        self.record(&findings).await?;
        let mut memory = self
            .memory
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(position) = after {
            memory.verified.insert(zone_id.to_owned(), position);
        }
        let entry = memory.highest.entry(zone_id.to_owned()).or_insert(0);
        *entry = (*entry).max(head);
        Ok(findings)
    }

    /// Stores findings (kept until acknowledged) and counts the new ones by kind.
    async fn record(&self, findings: &[Finding]) -> Result<(), StoreError> {
        if findings.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let rows: Vec<TamperFinding> = findings
            .iter()
            .map(|finding| TamperFinding {
                zone_id: finding.zone_id.clone(),
                seq: finding.seq,
                kind: finding.kind.as_str().to_owned(),
                detail: finding.detail.clone(),
                found_at_ms: now,
                acknowledged_at_ms: None,
                acknowledged_by: None,
                ack_reason: None,
            })
            .collect();
        let new = self.store.record_tamper_findings(&rows).await?;
        for (row, new) in rows.iter().zip(new) {
            if new {
                tracing::error!(zone = %row.zone_id, seq = row.seq, kind = %row.kind, detail = %row.detail, "audit tamper detected");
                self.metrics
                    .tamper_detected
                    .get_or_create(&KindLabel {
                        kind: row.kind.clone(),
                    })
                    .inc();
            }
        }
        Ok(())
    }
}
