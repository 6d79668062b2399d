//! The tamper sweep: re-verifies every zone's chain (fully at start and periodically, and
//! incrementally in between), records each finding until an operator acknowledges it, counts
//! findings by kind, and keeps the highest sequence seen per zone so deleting the newest rows
//! is noticed. Runs on one replica at a time (a store lease).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use caracal_audit::chain::{
    Anchor, ChainKey, Cut, Finding, FindingKind, cut_mac, cut_mac_matches, verify,
};
use caracal_audit::merkle::{CheckpointSigner, Tree, leaf_hash};
use caracal_store::{Store, StoreError, TamperFinding, now_ms};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::into_stored;

/// Rows verified per store read: small enough that a page's read (on the runtime's thread
/// when a reader is free) stays a few milliseconds, so a sweep never stalls request handling
/// for long. (10,000-row pages held a worker for tens of milliseconds: the governed
/// benchmark's tail.)
const PAGE: i64 = 1_000;

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
    /// Rows dropped by retention (`caracal_audit_retention_dropped_total`).
    pub retention_dropped: Counter,
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
    /// Rows ingested longer ago than this are dropped once a checkpoint covers them.
    retention: Option<Duration>,
    memory: Mutex<Memory>,
    metrics: Arc<SweepMetrics>,
}

/// The stored cut, parsed, and what is wrong with it: a cut whose MAC fails stands for rows
/// deleted under a made-up record.
fn check_cut(
    zone_id: &str,
    stored: &caracal_store::AuditCut,
    keys: &HashMap<String, ChainKey>,
) -> (Cut, Option<(FindingKind, String)>) {
    let frontier = super::parse_frontier(&stored.frontier);
    let last = caracal_crypto::unhex32(&stored.last_content_sha256);
    let cut = Cut {
        seq: stored.cut_seq,
        last: last.unwrap_or([0; 32]),
        frontier: frontier.clone().unwrap_or_default(),
    };
    let problem = match keys.get(&stored.chain_key_id) {
        None => Some((
            FindingKind::UnknownKey,
            format!(
                "the retention cut names MAC key `{}`, which is not known",
                stored.chain_key_id
            ),
        )),
        Some(key) => {
            let genuine = last.is_some()
                && frontier.is_some()
                && cut_mac_matches(key, zone_id, &cut, &stored.cut_mac);
            (!genuine).then(|| {
                (
                    FindingKind::MacFailure,
                    format!(
                        "the retention cut through row {} does not verify",
                        stored.cut_seq
                    ),
                )
            })
        }
    };
    (cut, problem)
}

/// Whether the verified rows still hash to the latest signed checkpoint's root: `Some((row,
/// detail))` when they do not.
fn check_checkpoint(
    tree: &Tree<'_>,
    checkpoint: &caracal_store::AuditCheckpoint,
) -> Option<(i64, String)> {
    let size = u64::try_from(checkpoint.tree_size).unwrap_or(0);
    if size < tree.cut {
        return Some((
            checkpoint.tree_size,
            format!(
                "the latest signed checkpoint covers {size} rows but retention dropped rows up to {}",
                tree.cut
            ),
        ));
    }
    let covered = usize::try_from(size - tree.cut).ok()?;
    let prefix = Tree {
        leaves: tree.leaves.get(..covered)?,
        ..*tree
    };
    let expected = caracal_crypto::unhex32(&checkpoint.root_hash);
    (prefix.root().is_none() || prefix.root() != expected).then(|| {
        (
            checkpoint.tree_size,
            format!(
                "rows 1..={} no longer hash to the root of the signed checkpoint",
                checkpoint.tree_size
            ),
        )
    })
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
            retention: None,
            memory: Mutex::new(Memory::default()),
            metrics,
        }
    }

    /// Signs checkpoints with `signer` after clean full sweeps.
    pub fn with_checkpoints(mut self, signer: CheckpointSigner) -> Sweeper {
        self.signer = Some(signer);
        self
    }

    /// After each clean full sweep of a zone, drops its rows ingested more than `keep` ago
    /// that a signed checkpoint covers (the newest row always stays).
    pub fn with_retention(mut self, keep: Duration) -> Sweeper {
        self.retention = Some(keep);
        self
    }

    /// Verifies every zone from its first row (or its retention cut).
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
        let keys = Arc::new(super::all_chain_keys(self.store.as_ref(), &self.kek).await?);
        // Read at every sweep: an operator's change holds from the next full sweep. While a
        // freeze holds (an incident being investigated), nothing is dropped.
        let frozen = self
            .store
            .list_containment()
            .await?
            .iter()
            .any(|switch| switch.kind == crate::containment::FREEZE);
        let retention = if frozen {
            None
        } else {
            super::effective_retention(
                self.retention,
                super::operator_retention_days(self.store.as_ref()).await?,
            )
        };
        for zone_id in self.store.audit_zones().await? {
            findings.extend(self.sweep_zone(&zone_id, full, &keys, retention).await?);
        }
        self.metrics.last_sweep_unix.set(now_ms() / 1000);
        Ok(findings)
    }

    async fn sweep_zone(
        &self,
        zone_id: &str,
        full: bool,
        keys: &Arc<HashMap<String, ChainKey>>,
        retention: Option<Duration>,
    ) -> Result<Vec<Finding>, StoreError> {
        let mut findings = Vec::new();
        let finding = |kind: FindingKind, seq: i64, detail: String| Finding {
            kind,
            zone_id: zone_id.to_owned(),
            seq,
            detail,
        };
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
            findings.push(finding(
                FindingKind::Truncated,
                head,
                format!(
                    "the chain ends at {head} but a signed checkpoint covers {checkpointed} rows"
                ),
            ));
        }
        let cut = match self.store.audit_cut(zone_id).await? {
            Some(stored) => {
                let (cut, problem) = check_cut(zone_id, &stored, keys);
                if let Some((kind, detail)) = problem {
                    findings.push(finding(kind, cut.seq, detail));
                }
                Some(cut)
            }
            None => None,
        };
        let base = cut.as_ref().map(|cut| (cut.seq, cut.last));
        let cut_seq = base.map_or(0, |(seq, _)| seq);
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
            findings.push(finding(
                FindingKind::Truncated,
                head,
                format!("the chain ends at {head} but reached {highest} before"),
            ));
        }
        let mut after = match verified {
            Some((seq, hash)) if !full && (cut_seq..=head).contains(&seq) => Some((seq, hash)),
            _ => base,
        };
        let mut from = after.map_or(1, |(seq, _)| seq + 1);
        // A full sweep from the cut also gathers the content hashes of the zone's Merkle
        // leaves, and the last row old enough for retention to drop.
        let mut contents = Vec::new();
        let expired_before = retention.map(|keep| {
            now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX))
        });
        let mut expired = 0;
        // Each page is verified while the next one is read.
        let page = |from: i64| async move {
            if from > head {
                return Ok(None);
            }
            self.store
                .audit_range(zone_id, from, (from + PAGE - 1).min(head))
                .await
                .map(Some)
        };
        let mut rows = page(from).await?;
        while let Some(current) = rows.take() {
            let Some(last) = current.last() else {
                // A whole page is missing: the next row present reports the gap.
                from += PAGE;
                rows = page(from).await?;
                continue;
            };
            let last_position = (last.chain_seq, decode(&last.content_sha256));
            from = last_position.0 + 1;
            let verify_page = async {
                if full {
                    contents.extend(current.iter().map(|row| decode(&row.content_sha256)));
                    if let Some(before) = expired_before {
                        expired = current
                            .iter()
                            .filter(|row| row.ingested_at_ms < before)
                            .fold(expired, |expired, row| expired.max(row.chain_seq));
                    }
                }
                let stored: Vec<_> = current.into_iter().map(into_stored).collect();
                let checked = stored.len() as u64;
                // Hashing a page is CPU work: off the runtime's threads.
                let (zone, keys) = (zone_id.to_owned(), Arc::clone(keys));
                let found = tokio::task::spawn_blocking(move || {
                    verify(&zone, &stored, &keys, Anchor { after, at_least: 0 })
                })
                .await
                .map_err(|_| StoreError::Unavailable("the sweep's verifier stopped".into()))?;
                findings.extend(found);
                self.metrics.rows_checked.inc_by(checked);
                Ok::<(), StoreError>(())
            };
            let (next, verified) = tokio::join!(page(from), verify_page);
            verified?;
            rows = next?;
            after = Some(last_position);
        }
        let clean = findings.is_empty() && cut_seq + contents.len() as i64 == head;
        if full && clean {
            let leaves: Vec<[u8; 32]> = contents.iter().map(leaf_hash).collect();
            let frontier = cut.map(|cut| cut.frontier).unwrap_or_default();
            let tree = Tree {
                cut: u64::try_from(cut_seq).unwrap_or(0),
                frontier: &frontier,
                leaves: &leaves,
            };
            if let Some(checkpoint) = &checkpoint
                && let Some((seq, detail)) = check_checkpoint(&tree, checkpoint)
            {
                findings.push(finding(FindingKind::CheckpointMismatch, seq, detail));
            }
            if findings.is_empty() {
                let anchored = self
                    .sign_checkpoint(zone_id, &tree, head, checkpointed)
                    .await?;
                // A signed checkpoint anchors every cut, and the newest row always stays so
                // the chain goes on from it.
                let target = expired.min(anchored).min(head - 1);
                if target > cut_seq {
                    self.cut(zone_id, &tree, target, &contents).await?;
                }
            }
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

    /// Signs a checkpoint of the whole (verified) tree if it grew since the last one; returns
    /// the size the latest checkpoint covers.
    async fn sign_checkpoint(
        &self,
        zone_id: &str,
        tree: &Tree<'_>,
        head: i64,
        checkpointed: i64,
    ) -> Result<i64, StoreError> {
        let (Some(signer), true, Some(root)) = (&self.signer, head > checkpointed, tree.root())
        else {
            return Ok(checkpointed);
        };
        let signed = signer.sign(zone_id, tree.size(), &root, now_ms());
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
        Ok(head)
    }

    /// Drops the zone's rows up to `target` (verified, and covered by a signed checkpoint),
    /// leaving a MAC'd cut record the remaining chain and every later root are checked from.
    async fn cut(
        &self,
        zone_id: &str,
        tree: &Tree<'_>,
        target: i64,
        contents: &[[u8; 32]],
    ) -> Result<(), StoreError> {
        let (Some(frontier), Some(&last)) = (
            tree.frontier_at(u64::try_from(target).unwrap_or(0)),
            usize::try_from(target - 1)
                .ok()
                .and_then(|index| index.checked_sub(usize::try_from(tree.cut).unwrap_or(0)))
                .and_then(|index| contents.get(index)),
        ) else {
            return Ok(());
        };
        let key = super::current_chain_key(self.store.as_ref(), &self.kek).await?;
        let cut = Cut {
            seq: target,
            last,
            frontier,
        };
        let dropped = self
            .store
            .cut_audit_chain(&caracal_store::AuditCut {
                zone_id: zone_id.to_owned(),
                cut_seq: target,
                last_content_sha256: caracal_crypto::hex(&last),
                frontier: super::format_frontier(&cut.frontier),
                cut_at_ms: now_ms(),
                chain_key_id: key.id().to_owned(),
                cut_mac: caracal_crypto::hex(&cut_mac(&key, zone_id, &cut)),
            })
            .await?;
        self.metrics.retention_dropped.inc_by(dropped);
        tracing::info!(
            zone = zone_id,
            through = target,
            dropped,
            "audit retention dropped expired rows"
        );
        Ok(())
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
