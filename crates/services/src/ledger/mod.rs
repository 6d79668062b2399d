//! The Audit role's ledger work: ingesting events from the stream into each zone's chain, and
//! sweeping the chains for tampering. The rules themselves are in `caracal-audit`.

use std::collections::HashMap;

use caracal_audit::Content;
use caracal_audit::chain::{ChainKey, Link, StoredRow};
use caracal_crypto::Kek;
use caracal_store::AuditEvent;

pub mod ingest;
pub mod sweep;

/// The Audit role's ledger metrics.
#[derive(Debug, Default)]
pub struct LedgerMetrics {
    pub ingest: std::sync::Arc<ingest::IngestMetrics>,
    pub sweep: std::sync::Arc<sweep::SweepMetrics>,
    /// Appended to `caracal.audit.events`, not yet read by the ingestor group.
    pub consumer_lag: prometheus_client::metrics::gauge::Gauge,
    /// Entries in the audit dead-letter stream.
    pub dlq_size: prometheus_client::metrics::gauge::Gauge,
}

impl LedgerMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "ingested",
            "Audit events appended to a zone chain",
            self.ingest.ingested_total.clone(),
        );
        registry.register(
            "ingest_dead_lettered",
            "Audit stream entries moved to the dead-letter stream",
            self.ingest.dead_lettered_total.clone(),
        );
        // Every kind starts at zero, so an alert's `increase()` sees the first finding.
        for kind in caracal_audit::chain::FindingKind::ALL {
            let _zero = self.sweep.tamper_detected.get_or_create(&sweep::KindLabel {
                kind: kind.as_str().to_owned(),
            });
        }
        registry.register(
            "tamper_detected",
            "Tamper findings of the sweep, by kind",
            self.sweep.tamper_detected.clone(),
        );
        registry.register(
            "tamper_rows_checked",
            "Audit rows verified by the sweep",
            self.sweep.rows_checked.clone(),
        );
        registry.register(
            "tamper_last_sweep_unix",
            "When the last sweep finished",
            self.sweep.last_sweep_unix.clone(),
        );
        registry.register(
            "tamper_last_full_sweep_unix",
            "When the last full sweep finished",
            self.sweep.last_full_sweep_unix.clone(),
        );
        registry.register(
            "retention_dropped",
            "Audit rows dropped by retention (a signed checkpoint and a cut record anchor them)",
            self.sweep.retention_dropped.clone(),
        );
        registry.register(
            "consumer_lag",
            "Audit events appended but not yet read by the ingestor",
            self.consumer_lag.clone(),
        );
        registry.register(
            "dlq_size",
            "Entries in the audit dead-letter stream",
            self.dlq_size.clone(),
        );
    }
}

/// The id of a deployment's first chain key; `caracal audit rotate-key` adds the next ones.
pub const INITIAL_CHAIN_KEY_ID: &str = "chain-1";

/// Chain keys are derived from the KEK by id, so every replica holding the deployment's KEK
/// can write and verify, and a row's stored key id is all it takes to find its key.
pub fn chain_key(kek: &Kek, id: &str) -> ChainKey {
    ChainKey::new(id, &kek.derive(&format!("audit-chain:{id}")))
}

/// The chain keys named by `ids`, by id.
pub fn chain_keys(kek: &Kek, ids: &[String]) -> HashMap<String, ChainKey> {
    ids.iter()
        .map(|id| (id.clone(), chain_key(kek, id)))
        .collect()
}

/// The key new rows are written under: the newest id.
pub async fn current_chain_key(
    store: &dyn caracal_store::Store,
    kek: &Kek,
) -> Result<ChainKey, caracal_store::StoreError> {
    let ids = store.audit_chain_key_ids(INITIAL_CHAIN_KEY_ID).await?;
    let current = ids.last().map_or(INITIAL_CHAIN_KEY_ID, String::as_str);
    Ok(chain_key(kek, current))
}

/// Every key stored rows may carry, by id.
pub async fn all_chain_keys(
    store: &dyn caracal_store::Store,
    kek: &Kek,
) -> Result<HashMap<String, ChainKey>, caracal_store::StoreError> {
    let ids = store.audit_chain_key_ids(INITIAL_CHAIN_KEY_ID).await?;
    Ok(chain_keys(kek, &ids))
}

/// The stored row for an event's content and its link.
pub fn to_row(content: &Content, link: &Link, ingested_at_ms: i64) -> AuditEvent {
    let optional = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    AuditEvent {
        id: content.id.clone(),
        zone_id: content.zone_id.clone(),
        event_type: content.event_type.clone(),
        request_id: content.request_id.clone(),
        decision: content.decision.clone(),
        policy_set_id: optional(&content.policy_set_id),
        policy_set_version_id: optional(&content.policy_set_version_id),
        manifest_sha: optional(&content.manifest_sha),
        evaluation_status: content.evaluation_status.clone(),
        determining_policies: content.determining_policies.clone(),
        diagnostics: content.diagnostics.clone(),
        metadata: content.metadata.clone(),
        occurred_at_ms: content.occurred_at_ms,
        ingested_at_ms,
        chain_seq: link.seq,
        content_sha256: link.content_sha256.clone(),
        prev_content_sha256: link.prev_content_sha256.clone(),
        chain_mac: link.chain_mac.clone(),
        chain_key_id: link.chain_key_id.clone(),
    }
}

/// A stored row as the chain sees it: its hashed fields exactly as stored (documents are not
/// parsed, so any rewrite of them shows), and its link.
pub fn from_row(row: &AuditEvent) -> StoredRow {
    into_stored(row.clone())
}

/// [`from_row`] without copying the row.
pub fn into_stored(row: AuditEvent) -> StoredRow {
    StoredRow {
        content: Content {
            id: row.id,
            zone_id: row.zone_id,
            event_type: row.event_type,
            request_id: row.request_id,
            decision: row.decision,
            policy_set_id: row.policy_set_id.unwrap_or_default(),
            policy_set_version_id: row.policy_set_version_id.unwrap_or_default(),
            manifest_sha: row.manifest_sha.unwrap_or_default(),
            evaluation_status: row.evaluation_status,
            determining_policies: row.determining_policies,
            diagnostics: row.diagnostics,
            metadata: row.metadata,
            occurred_at_ms: row.occurred_at_ms,
        },
        link: Link {
            seq: row.chain_seq,
            content_sha256: row.content_sha256,
            prev_content_sha256: row.prev_content_sha256,
            chain_mac: row.chain_mac,
            chain_key_id: row.chain_key_id,
        },
    }
}

/// A retention cut's frontier as stored (comma-separated hex nodes); `None` if malformed.
pub fn parse_frontier(text: &str) -> Option<Vec<[u8; 32]>> {
    text.split(',')
        .filter(|node| !node.is_empty())
        .map(caracal_crypto::unhex32)
        .collect()
}

/// The stored form of a frontier.
pub fn format_frontier(frontier: &[[u8; 32]]) -> String {
    frontier
        .iter()
        .map(|node| caracal_crypto::hex(node))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where deployment-wide secrets live in the store.
pub const SYSTEM_ZONE: &str = "caracal.sys";

/// The run-time setting holding an operator's audit retention, in days.
pub const RETENTION_SETTING: &str = "audit_retention_days";

/// The operator's retention in days, if one is set (`PUT /v1/audit-retention`).
pub async fn operator_retention_days(
    store: &dyn caracal_store::Store,
) -> Result<Option<u64>, caracal_store::StoreError> {
    Ok(store
        .get_setting(RETENTION_SETTING)
        .await?
        .and_then(|setting| setting.value.parse().ok()))
}

/// How long rows are kept: the deployment's `ceiling` (`audit.retention_days`; `None` keeps
/// everything), shortened by the operator's setting, never lengthened.
pub fn effective_retention(
    ceiling: Option<std::time::Duration>,
    operator_days: Option<u64>,
) -> Option<std::time::Duration> {
    let operator =
        operator_days.map(|days| std::time::Duration::from_secs(days.saturating_mul(86_400)));
    match (ceiling, operator) {
        (Some(ceiling), Some(operator)) => Some(ceiling.min(operator)),
        (ceiling, None) => ceiling,
        (None, operator) => operator,
    }
}
const CHECKPOINT_KEY_REF: &str = "audit-checkpoint-key";
const CHECKPOINT_KEY_PURPOSE: &str = "audit-checkpoint-signing-key";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Store(#[from] caracal_store::StoreError),
    #[error("checkpoint key: {0}")]
    Key(String),
}

/// The deployment's checkpoint signing key: loaded from the store (sealed under the KEK), or
/// created and stored on first use. Its public half is published in the store.
pub async fn checkpoint_signer(
    store: &dyn caracal_store::Store,
    kek: &Kek,
) -> Result<caracal_audit::merkle::CheckpointSigner, LedgerError> {
    use caracal_audit::merkle::CheckpointSigner;
    let key_error = |error: &dyn std::fmt::Display| LedgerError::Key(error.to_string());
    let pkcs8 = match store
        .get_sealed_secret(SYSTEM_ZONE, CHECKPOINT_KEY_REF)
        .await?
    {
        Some(secret) => kek
            .open(CHECKPOINT_KEY_PURPOSE, &secret.envelope)
            .map_err(|error| key_error(&error))?,
        None => {
            let (_, pkcs8) =
                CheckpointSigner::generate("new").map_err(|error| key_error(&error))?;
            let envelope = kek
                .seal(CHECKPOINT_KEY_PURPOSE, &pkcs8)
                .map_err(|error| key_error(&error))?;
            store
                .put_sealed_secret(
                    &caracal_store::SealedSecret {
                        zone_id: SYSTEM_ZONE.to_owned(),
                        secret_ref: CHECKPOINT_KEY_REF.to_owned(),
                        purpose: CHECKPOINT_KEY_PURPOSE.to_owned(),
                        kek_id: kek.key_id().to_owned(),
                        envelope,
                        version: 0,
                        updated_at_ms: 0,
                    },
                    &[],
                )
                .await?;
            pkcs8
        }
    };
    let unnamed =
        CheckpointSigner::from_pkcs8("unnamed", &pkcs8).map_err(|error| key_error(&error))?;
    let public_key = unnamed.public_key_hex();
    // The key id names the public key, so a verifier can tell keys apart at a glance.
    let key_id = format!("ckpt-{}", public_key.get(..16).unwrap_or_default());
    let signer =
        CheckpointSigner::from_pkcs8(key_id.clone(), &pkcs8).map_err(|error| key_error(&error))?;
    store.publish_checkpoint_key(&key_id, &public_key).await?;
    Ok(signer)
}

/// A bundle of a zone's rows `from..=to` (clipped to the latest checkpoint), proven against
/// that checkpoint: what `caracal audit export` writes and `caracal audit verify` checks.
pub async fn export_bundle(
    store: &dyn caracal_store::Store,
    zone_id: &str,
    from: i64,
    to: i64,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<String, LedgerError> {
    use caracal_audit::merkle::{Checkpoint, leaf_hash};
    let missing = |what: String| LedgerError::Key(what);
    let checkpoint = store
        .latest_audit_checkpoint(zone_id)
        .await?
        .ok_or_else(|| {
            missing(format!(
                "zone `{zone_id}` has no signed checkpoint yet (the sweep signs one)"
            ))
        })?;
    let public_key = store
        .checkpoint_keys()
        .await?
        .into_iter()
        .find(|(key_id, _)| *key_id == checkpoint.key_id)
        .map(|(_, public_key)| public_key)
        .ok_or_else(|| {
            missing(format!(
                "checkpoint key `{}` is not published",
                checkpoint.key_id
            ))
        })?;
    // Rows dropped by retention are stood in for by the cut's frontier (the sweep checks its MAC).
    let (cut, frontier) = match store.audit_cut(zone_id).await? {
        Some(cut) => {
            let frontier = parse_frontier(&cut.frontier).ok_or_else(|| {
                missing(format!(
                    "the retention cut of zone `{zone_id}` is malformed"
                ))
            })?;
            (cut.cut_seq, frontier)
        }
        None => (0, Vec::new()),
    };
    let mut leaves = Vec::new();
    let mut selected = Vec::new();
    let mut next = cut + 1;
    while next <= checkpoint.tree_size {
        let rows = store
            .audit_range(zone_id, next, (next + 9_999).min(checkpoint.tree_size))
            .await?;
        let Some(last) = rows.last() else {
            return Err(missing(format!(
                "row {next} of zone `{zone_id}` is missing: run the sweep"
            )));
        };
        next = last.chain_seq + 1;
        progress(
            u64::try_from(last.chain_seq).unwrap_or(0),
            u64::try_from(checkpoint.tree_size).unwrap_or(0),
        );
        for row in &rows {
            let stored = from_row(row);
            let hash = caracal_crypto::unhex32(&row.content_sha256)
                .ok_or_else(|| missing(format!("row {} has a malformed hash", row.chain_seq)))?;
            leaves.push(leaf_hash(&hash));
            if (from..=to).contains(&row.chain_seq) {
                selected.push((stored.content, row.chain_seq, row.content_sha256.clone()));
            }
        }
    }
    let tree = caracal_audit::merkle::Tree {
        cut: u64::try_from(cut).unwrap_or(0),
        frontier: &frontier,
        leaves: &leaves,
    };
    let checkpoint = Checkpoint {
        zone_id: checkpoint.zone_id,
        tree_size: u64::try_from(checkpoint.tree_size).unwrap_or(0),
        root_hash: checkpoint.root_hash,
        issued_at_ms: checkpoint.issued_at_ms,
        key_id: checkpoint.key_id,
        signature: checkpoint.signature,
    };
    caracal_audit::bundle::export(&selected, &tree, &checkpoint, &public_key)
        .map_err(|error| missing(error.to_string()))
}

#[cfg(test)]
#[test]
fn an_operator_shortens_the_retention_and_never_lengthens_it() {
    use std::time::Duration;
    let days = |n: u64| Duration::from_secs(n * 86_400);
    assert_eq!(effective_retention(Some(days(365)), None), Some(days(365)));
    assert_eq!(
        effective_retention(Some(days(365)), Some(30)),
        Some(days(30))
    );
    assert_eq!(
        effective_retention(Some(days(30)), Some(365)),
        Some(days(30))
    );
    assert_eq!(effective_retention(None, Some(7)), Some(days(7)));
    assert_eq!(effective_retention(None, None), None, "kept for ever");
}
