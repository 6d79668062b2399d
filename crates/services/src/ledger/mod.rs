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

/// The id of the chain key new rows are written under.
pub const CURRENT_CHAIN_KEY_ID: &str = "chain-1";

/// Chain keys are derived from the KEK by id, so every replica holding the deployment's KEK
/// can write and verify, and a row's stored key id is all it takes to find its key.
pub fn chain_key(kek: &Kek, id: &str) -> ChainKey {
    ChainKey::new(id, &kek.derive(&format!("audit-chain:{id}")))
}

/// Every chain key a verifier may meet, by id.
pub fn chain_keys(kek: &Kek) -> HashMap<String, ChainKey> {
    [CURRENT_CHAIN_KEY_ID]
        .into_iter()
        .map(|id| (id.to_owned(), chain_key(kek, id)))
        .collect()
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
    StoredRow {
        content: Content {
            id: row.id.clone(),
            zone_id: row.zone_id.clone(),
            event_type: row.event_type.clone(),
            request_id: row.request_id.clone(),
            decision: row.decision.clone(),
            policy_set_id: row.policy_set_id.clone().unwrap_or_default(),
            policy_set_version_id: row.policy_set_version_id.clone().unwrap_or_default(),
            manifest_sha: row.manifest_sha.clone().unwrap_or_default(),
            evaluation_status: row.evaluation_status.clone(),
            determining_policies: row.determining_policies.clone(),
            diagnostics: row.diagnostics.clone(),
            metadata: row.metadata.clone(),
            occurred_at_ms: row.occurred_at_ms,
        },
        link: Link {
            seq: row.chain_seq,
            content_sha256: row.content_sha256.clone(),
            prev_content_sha256: row.prev_content_sha256.clone(),
            chain_mac: row.chain_mac.clone(),
            chain_key_id: row.chain_key_id.clone(),
        },
    }
}
