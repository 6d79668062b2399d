//! The Audit role's ledger work: ingesting events from the stream into each zone's chain, and
//! sweeping the chains for tampering. The rules themselves are in `caracal-audit`.

use std::collections::HashMap;

use caracal_audit::Event;
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

/// The stored row for an event and its link.
pub fn to_row(event: &Event, link: &Link, ingested_at_ms: i64) -> AuditEvent {
    let [determining_policies, diagnostics, metadata] = event.canonical_documents();
    AuditEvent {
        id: event.id.clone(),
        zone_id: event.zone_id.clone(),
        event_type: event.event_type.clone(),
        request_id: event.request_id.clone(),
        decision: event.decision.clone(),
        policy_set_id: event.policy_set_id.clone(),
        policy_set_version_id: event.policy_set_version_id.clone(),
        manifest_sha: event.manifest_sha.clone(),
        evaluation_status: event.evaluation_status.clone(),
        determining_policies,
        diagnostics,
        metadata,
        occurred_at_ms: event.occurred_at_ms,
        ingested_at_ms,
        chain_seq: link.seq,
        content_sha256: link.content_sha256.clone(),
        prev_content_sha256: link.prev_content_sha256.clone(),
        chain_mac: link.chain_mac.clone(),
        chain_key_id: link.chain_key_id.clone(),
    }
}

/// The event and link as stored. A document that no longer parses becomes a JSON string of its
/// text, which cannot match the content hash: the sweep reports the row as edited.
pub fn from_row(row: &AuditEvent) -> StoredRow {
    let document = |text: &str| {
        serde_json::from_str(text)
            .unwrap_or_else(|_| serde_json::Value::String(format!("unparseable: {text}")))
    };
    StoredRow {
        event: Event {
            id: row.id.clone(),
            zone_id: row.zone_id.clone(),
            event_type: row.event_type.clone(),
            request_id: row.request_id.clone(),
            decision: row.decision.clone(),
            policy_set_id: row.policy_set_id.clone(),
            policy_set_version_id: row.policy_set_version_id.clone(),
            manifest_sha: row.manifest_sha.clone(),
            evaluation_status: row.evaluation_status.clone(),
            determining_policies_json: document(&row.determining_policies),
            diagnostics_json: document(&row.diagnostics),
            metadata_json: document(&row.metadata),
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
