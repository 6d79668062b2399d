//! The audit ledger's rows. The chain itself (hashes, MACs, sequence) is computed by the audit
//! pipeline; the store keeps rows idempotent on their event id and ordered per zone.

use std::collections::HashSet;

use crate::db::{Db, Dialect, Outcome, Row, Statement, params};
use crate::model::{
    AuditCheckpoint, AuditCut, AuditEvent, AuditFilter, DecisionCounts, TamperFinding,
};
use crate::store::{StoreError, all};

/// The row columns of `audit_events`, for `concat!`.
macro_rules! select_audit_events {
    () => {
        "SELECT id, zone_id, event_type, request_id, decision, policy_set_id, policy_set_version_id, manifest_sha, evaluation_status, determining_policies, diagnostics, metadata, occurred_at_ms, ingested_at_ms, chain_seq, content_sha256, prev_content_sha256, chain_mac, chain_key_id FROM audit_events"
    };
}

/// Builds the rows to append from the zone's head (sequence, content hash) and the ids among
/// the candidates that are already stored.
pub type ChainBuilder = Box<
    dyn FnOnce(Option<(i64, String)>, &HashSet<String>) -> Result<Vec<AuditEvent>, StoreError>
        + Send,
>;

/// One zone's part of [`Audit::append_audit_chains`].
pub struct ChainAppend {
    pub zone_id: String,
    pub candidate_ids: Vec<String>,
    pub build: ChainBuilder,
}

#[async_trait::async_trait]
pub trait Audit: Send + Sync {
    /// Inserts events in one transaction; an event id already stored is skipped (ingestion is
    /// at-least-once). Returns how many were new. A taken (zone, sequence) is a conflict.
    async fn insert_audit_events(&self, events: &[AuditEvent]) -> Result<u64, StoreError>;
    /// Events of the zone with a sequence above `after_seq`, in order, at most `limit`.
    async fn list_audit_events(
        &self,
        zone_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    /// The zone's last chain position: (sequence, content hash).
    async fn audit_head(&self, zone_id: &str) -> Result<Option<(i64, String)>, StoreError>;
    /// Appends to a zone's chain in one transaction serialised per zone: reads the head and
    /// which of `candidate_ids` are already stored, lets `build` make the new rows, inserts
    /// them. Returns how many rows were appended.
    async fn append_audit_chain(
        &self,
        zone_id: &str,
        candidate_ids: &[String],
        build: ChainBuilder,
    ) -> Result<u64, StoreError> {
        self.append_audit_chains(vec![ChainAppend {
            zone_id: zone_id.to_owned(),
            candidate_ids: candidate_ids.to_vec(),
            build,
        }])
        .await
    }
    /// [`Audit::append_audit_chain`] for several zones in one transaction (one commit).
    async fn append_audit_chains(&self, appends: Vec<ChainAppend>) -> Result<u64, StoreError>;
    /// Every row of the zone with a sequence in `from..=to`, in order.
    async fn audit_range(
        &self,
        zone_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    /// The zone's approval events (`step_up_issued`, `step_up_decided`, `step_up_consumed`)
    /// with a sequence in `after_seq + 1..=through_seq`, in order, at most `limit`.
    async fn approval_events(
        &self,
        zone_id: &str,
        after_seq: i64,
        through_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    /// The zones that have audit rows.
    async fn audit_zones(&self) -> Result<Vec<String>, StoreError>;

    /// Records findings; one already recorded (same zone, row and kind), acknowledged or not,
    /// is kept as it was. Returns, per finding, whether it is new.
    async fn record_tamper_findings(
        &self,
        findings: &[TamperFinding],
    ) -> Result<Vec<bool>, StoreError>;
    /// Findings no operator has acknowledged yet.
    async fn open_tamper_findings(&self) -> Result<Vec<TamperFinding>, StoreError>;
    /// Acknowledges every open finding; returns how many.
    async fn acknowledge_tamper_findings(&self, by: &str, reason: &str) -> Result<u64, StoreError>;

    /// The decisions of the zone's events that occurred at or after `since_ms`, counted over
    /// its newest `scan` events at most (a bounded read however long the ledger is).
    async fn recent_decisions(
        &self,
        zone_id: &str,
        since_ms: i64,
        scan: i64,
    ) -> Result<DecisionCounts, StoreError>;

    /// The zone's events matching `filter`, newest first, below `before_seq` if given, at most
    /// `limit`.
    async fn search_audit(
        &self,
        zone_id: &str,
        filter: &AuditFilter,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, StoreError>;

    /// The first and last sequence of the zone's events that occurred in `since_ms..until_ms`.
    async fn audit_seq_range(
        &self,
        zone_id: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Option<(i64, i64)>, StoreError>;

    /// The chain key ids, oldest first; the last is current. Adds `initial` when there are none.
    async fn audit_chain_key_ids(&self, initial: &str) -> Result<Vec<String>, StoreError>;
    /// Makes `id` the current chain key; an id used before is a [`StoreError::Conflict`].
    async fn add_audit_chain_key(&self, id: &str) -> Result<(), StoreError>;

    /// Stores a checkpoint; one for the same (zone, size) is kept as it was.
    async fn insert_audit_checkpoint(&self, checkpoint: &AuditCheckpoint)
    -> Result<(), StoreError>;
    /// The zone's checkpoint with the largest tree.
    async fn latest_audit_checkpoint(
        &self,
        zone_id: &str,
    ) -> Result<Option<AuditCheckpoint>, StoreError>;
    /// Publishes a checkpoint public key (hex); a key id already published keeps its key.
    async fn publish_checkpoint_key(
        &self,
        key_id: &str,
        public_key: &str,
    ) -> Result<(), StoreError>;
    /// Every published checkpoint key: (key id, public key hex).
    async fn checkpoint_keys(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// The zone's retention cut, if rows were dropped.
    async fn audit_cut(&self, zone_id: &str) -> Result<Option<AuditCut>, StoreError>;
    /// In one transaction: records `cut` (only if it moves the zone's cut forward) and drops
    /// the zone's rows up to `cut.cut_seq`. Returns how many rows were dropped.
    async fn cut_audit_chain(&self, cut: &AuditCut) -> Result<u64, StoreError>;
}

fn checkpoint(row: &Row) -> Result<AuditCheckpoint, StoreError> {
    Ok(AuditCheckpoint {
        zone_id: row.text(0)?,
        tree_size: row.int(1)?,
        root_hash: row.text(2)?,
        issued_at_ms: row.int(3)?,
        key_id: row.text(4)?,
        signature: row.text(5)?,
    })
}

fn cut(row: &Row) -> Result<AuditCut, StoreError> {
    Ok(AuditCut {
        zone_id: row.text(0)?,
        cut_seq: row.int(1)?,
        last_content_sha256: row.text(2)?,
        frontier: row.text(3)?,
        cut_at_ms: row.int(4)?,
        chain_key_id: row.text(5)?,
        cut_mac: row.text(6)?,
    })
}

fn finding(row: &Row) -> Result<TamperFinding, StoreError> {
    Ok(TamperFinding {
        zone_id: row.text(0)?,
        seq: row.int(1)?,
        kind: row.text(2)?,
        detail: row.text(3)?,
        found_at_ms: row.int(4)?,
        acknowledged_at_ms: row.opt_int(5)?,
        acknowledged_by: row.opt_text(6)?,
        ack_reason: row.opt_text(7)?,
    })
}

/// A chain hash as stored: 32 raw bytes (the model and everything above it speak hex).
fn hash_bytes(text: &str) -> Result<crate::db::Value, StoreError> {
    caracal_crypto::unhex32(text)
        .map(|bytes| crate::db::Value::Bytes(bytes.to_vec()))
        .ok_or_else(|| StoreError::Query(format!("`{text}` is not a lower-case hex SHA-256")))
}

/// The 19 values of an audit row, in column order.
fn row_params(e: &AuditEvent) -> Result<Vec<crate::db::Value>, StoreError> {
    Ok(params![
        e.id.as_str(),
        e.zone_id.as_str(),
        e.event_type.as_str(),
        e.request_id.as_str(),
        e.decision.as_str(),
        e.policy_set_id.clone(),
        e.policy_set_version_id.clone(),
        e.manifest_sha.clone(),
        e.evaluation_status.as_str(),
        e.determining_policies.as_str(),
        e.diagnostics.as_str(),
        e.metadata.as_str(),
        e.occurred_at_ms,
        e.ingested_at_ms,
        e.chain_seq,
        hash_bytes(&e.content_sha256)?,
        hash_bytes(&e.prev_content_sha256)?,
        hash_bytes(&e.chain_mac)?,
        e.chain_key_id.as_str(),
    ])
}

/// One row's insert.
fn insert_row(e: &AuditEvent) -> Result<Statement, StoreError> {
    Ok(Statement::new(
        "INSERT INTO audit_events (id, zone_id, event_type, request_id, decision, policy_set_id,
             policy_set_version_id, manifest_sha, evaluation_status, determining_policies, diagnostics,
             metadata, occurred_at_ms, ingested_at_ms, chain_seq, content_sha256, prev_content_sha256,
             chain_mac, chain_key_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        row_params(e)?,
    ))
}

/// One PostgreSQL statement inserting every row, passed as one JSON array.
fn insert_batch(rows: &[AuditEvent]) -> Result<Statement, StoreError> {
    let documents: Vec<serde_json::Value> = rows
        .iter()
        .map(|e| {
            for hash in [&e.content_sha256, &e.prev_content_sha256, &e.chain_mac] {
                hash_bytes(hash)?;
            }
            Ok(serde_json::json!({
                "id": e.id, "zone_id": e.zone_id, "event_type": e.event_type, "request_id": e.request_id,
                "decision": e.decision, "policy_set_id": e.policy_set_id,
                "policy_set_version_id": e.policy_set_version_id, "manifest_sha": e.manifest_sha,
                "evaluation_status": e.evaluation_status, "determining_policies": e.determining_policies,
                "diagnostics": e.diagnostics, "metadata": e.metadata, "occurred_at_ms": e.occurred_at_ms,
                "ingested_at_ms": e.ingested_at_ms, "chain_seq": e.chain_seq, "content_sha256": e.content_sha256,
                "prev_content_sha256": e.prev_content_sha256, "chain_mac": e.chain_mac,
                "chain_key_id": e.chain_key_id,
            }))
        })
        .collect::<Result<_, StoreError>>()?;
    let batch =
        serde_json::to_string(&documents).map_err(|error| StoreError::Query(error.to_string()))?;
    let sql = "INSERT INTO audit_events (id, zone_id, event_type, request_id, decision, policy_set_id,
                 policy_set_version_id, manifest_sha, evaluation_status, determining_policies, diagnostics,
                 metadata, occurred_at_ms, ingested_at_ms, chain_seq, content_sha256, prev_content_sha256,
                 chain_mac, chain_key_id)
             SELECT id, zone_id, event_type, request_id, decision, policy_set_id, policy_set_version_id,
                 manifest_sha, evaluation_status, determining_policies, diagnostics, metadata, occurred_at_ms,
                 ingested_at_ms, chain_seq, decode(content_sha256, 'hex'), decode(prev_content_sha256, 'hex'),
                 decode(chain_mac, 'hex'), chain_key_id
             FROM jsonb_to_recordset($1::text::jsonb) AS batch(id text, zone_id text, event_type text,
                 request_id text, decision text, policy_set_id text, policy_set_version_id text,
                 manifest_sha text, evaluation_status text, determining_policies text, diagnostics text,
                 metadata text, occurred_at_ms bigint, ingested_at_ms bigint, chain_seq bigint,
                 content_sha256 text, prev_content_sha256 text, chain_mac text, chain_key_id text)";
    Ok(Statement::new(sql, params![batch]))
}

fn event(row: &Row) -> Result<AuditEvent, StoreError> {
    Ok(AuditEvent {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        event_type: row.text(2)?,
        request_id: row.text(3)?,
        decision: row.text(4)?,
        policy_set_id: row.opt_text(5)?,
        policy_set_version_id: row.opt_text(6)?,
        manifest_sha: row.opt_text(7)?,
        evaluation_status: row.text(8)?,
        determining_policies: row.text(9)?,
        diagnostics: row.text(10)?,
        metadata: row.text(11)?,
        occurred_at_ms: row.int(12)?,
        ingested_at_ms: row.int(13)?,
        chain_seq: row.int(14)?,
        content_sha256: row.hex(15)?,
        prev_content_sha256: row.hex(16)?,
        chain_mac: row.hex(17)?,
        chain_key_id: row.text(18)?,
    })
}

#[async_trait::async_trait]
impl<D: Db> Audit for D {
    async fn insert_audit_events(&self, events: &[AuditEvent]) -> Result<u64, StoreError> {
        let statements = events
            .iter()
            .map(|e| {
                Ok(Statement::new(
                    "INSERT INTO audit_events (id, zone_id, event_type, request_id, decision, policy_set_id,
                         policy_set_version_id, manifest_sha, evaluation_status, determining_policies, diagnostics,
                         metadata, occurred_at_ms, ingested_at_ms, chain_seq, content_sha256, prev_content_sha256,
                         chain_mac, chain_key_id)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
                     ON CONFLICT (id) DO NOTHING",
                    row_params(e)?,
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        let outcomes = self.atomic(statements).await?;
        Ok(outcomes.iter().map(|outcome| outcome.changed).sum())
    }

    async fn list_audit_events(
        &self,
        zone_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        all(
            self,
            concat!(
                select_audit_events!(),
                " WHERE zone_id = $1 AND chain_seq > $2 ORDER BY chain_seq LIMIT CAST($3 AS BIGINT)"
            ),
            params![zone_id, after_seq, limit],
            event,
        )
        .await
    }

    async fn audit_head(&self, zone_id: &str) -> Result<Option<(i64, String)>, StoreError> {
        let rows = self
            .rows(
                "SELECT chain_seq, content_sha256 FROM audit_events WHERE zone_id = $1
                 ORDER BY chain_seq DESC LIMIT 1",
                params![zone_id],
            )
            .await?;
        rows.first()
            .map(|row| Ok((row.int(0)?, row.hex(1)?)))
            .transpose()
    }

    async fn append_audit_chains(&self, appends: Vec<ChainAppend>) -> Result<u64, StoreError> {
        let dialect = self.dialect();
        let mut appends = appends;
        // Zones in one order, so two ingestors locking several zones cannot deadlock.
        appends.sort_by(|a, b| a.zone_id.cmp(&b.zone_id));
        let mut first = Vec::with_capacity(3 * appends.len());
        let mut builders = Vec::with_capacity(appends.len());
        for append in appends {
            let zone_id = append.zone_id.as_str();
            // Two ingestors appending to one zone take turns; SQLite has a single writer anyway.
            if dialect == Dialect::Postgres {
                first.push(Statement::new(
                    "SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtext($1))) AS locked",
                    params![zone_id],
                ));
            }
            let head_index = first.len();
            first.push(Statement::new(
                "SELECT chain_seq, content_sha256 FROM audit_events WHERE zone_id = $1 ORDER BY chain_seq DESC LIMIT 1",
                params![zone_id],
            ));
            let ids = serde_json::to_string(&append.candidate_ids)
                .map_err(|error| StoreError::Query(error.to_string()))?;
            first.push(Statement::new(
                match dialect {
                    Dialect::Sqlite => "SELECT id FROM audit_events WHERE id IN (SELECT value FROM json_each($1))",
                    Dialect::Postgres => {
                        "SELECT id FROM audit_events WHERE id IN (SELECT jsonb_array_elements_text($1::text::jsonb))"
                    }
                },
                params![ids],
            ));
            builders.push((head_index, append.build));
        }
        let reads = first.len();
        let then = Box::new(move |outcomes: &[Outcome]| {
            let mut rows = Vec::new();
            for (head_index, build) in builders {
                let head = match outcomes
                    .get(head_index)
                    .and_then(|outcome| outcome.rows.first())
                {
                    Some(row) => Some((row.int(0)?, row.hex(1)?)),
                    None => None,
                };
                let mut existing = HashSet::new();
                for row in outcomes
                    .get(head_index + 1)
                    .map(|outcome| outcome.rows.as_slice())
                    .unwrap_or_default()
                {
                    existing.insert(row.text(0)?);
                }
                rows.extend(build(head, &existing)?);
            }
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            match dialect {
                // In-process SQLite runs prepared statements faster than it unpacks JSON.
                Dialect::Sqlite => rows.iter().map(insert_row).collect(),
                // A PostgreSQL round trip costs more than unpacking one JSON array.
                Dialect::Postgres => Ok(vec![insert_batch(&rows)?]),
            }
        });
        let outcomes = self.atomic_with(first, then).await?;
        Ok(outcomes
            .iter()
            .skip(reads)
            .map(|outcome| outcome.changed)
            .sum())
    }

    async fn audit_range(
        &self,
        zone_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        all(
            self,
            concat!(
                select_audit_events!(),
                " WHERE zone_id = $1 AND chain_seq >= $2 AND chain_seq <= $3 ORDER BY chain_seq"
            ),
            params![zone_id, from, to],
            event,
        )
        .await
    }

    async fn approval_events(
        &self,
        zone_id: &str,
        after_seq: i64,
        through_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        all(
            self,
            concat!(
                select_audit_events!(),
                " WHERE zone_id = $1 AND chain_seq > $2 AND chain_seq <= $3
                    AND event_type IN ('step_up_issued', 'step_up_decided', 'step_up_consumed')
                  ORDER BY chain_seq LIMIT CAST($4 AS BIGINT)"
            ),
            params![zone_id, after_seq, through_seq, limit],
            event,
        )
        .await
    }

    async fn audit_zones(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .rows(
                "SELECT DISTINCT zone_id FROM audit_events ORDER BY zone_id",
                params![],
            )
            .await?;
        rows.iter().map(|row| row.text(0)).collect()
    }

    async fn record_tamper_findings(
        &self,
        findings: &[TamperFinding],
    ) -> Result<Vec<bool>, StoreError> {
        let statements = findings
            .iter()
            .map(|f| {
                Statement::new(
                    "INSERT INTO audit_tamper_findings (zone_id, seq, kind, detail, found_at_ms)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (zone_id, seq, kind) DO NOTHING",
                    params![
                        f.zone_id.as_str(),
                        f.seq,
                        f.kind.as_str(),
                        f.detail.as_str(),
                        f.found_at_ms
                    ],
                )
            })
            .collect();
        let outcomes = self.atomic(statements).await?;
        Ok(outcomes.iter().map(|outcome| outcome.changed > 0).collect())
    }

    async fn open_tamper_findings(&self) -> Result<Vec<TamperFinding>, StoreError> {
        all(
            self,
            "SELECT zone_id, seq, kind, detail, found_at_ms, acknowledged_at_ms, acknowledged_by, ack_reason
             FROM audit_tamper_findings WHERE acknowledged_at_ms IS NULL ORDER BY found_at_ms, zone_id, seq",
            params![],
            finding,
        )
        .await
    }

    async fn acknowledge_tamper_findings(&self, by: &str, reason: &str) -> Result<u64, StoreError> {
        self.change(
            "UPDATE audit_tamper_findings SET acknowledged_at_ms = $1, acknowledged_by = $2, ack_reason = $3
             WHERE acknowledged_at_ms IS NULL",
            params![crate::store::now_ms(), by, reason],
        )
        .await
    }

    async fn insert_audit_checkpoint(&self, c: &AuditCheckpoint) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO audit_checkpoints (zone_id, tree_size, root_hash, issued_at_ms, key_id, signature)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (zone_id, tree_size) DO NOTHING",
            params![
                c.zone_id.as_str(),
                c.tree_size,
                c.root_hash.as_str(),
                c.issued_at_ms,
                c.key_id.as_str(),
                c.signature.as_str(),
            ],
        )
        .await
        .map(|_| ())
    }

    async fn latest_audit_checkpoint(
        &self,
        zone_id: &str,
    ) -> Result<Option<AuditCheckpoint>, StoreError> {
        let rows = self
            .rows(
                "SELECT zone_id, tree_size, root_hash, issued_at_ms, key_id, signature FROM audit_checkpoints
                 WHERE zone_id = $1 ORDER BY tree_size DESC LIMIT 1",
                params![zone_id],
            )
            .await?;
        rows.first().map(checkpoint).transpose()
    }

    async fn publish_checkpoint_key(
        &self,
        key_id: &str,
        public_key: &str,
    ) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO audit_checkpoint_keys (key_id, public_key, created_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (key_id) DO NOTHING",
            params![key_id, public_key, crate::store::now_ms()],
        )
        .await
        .map(|_| ())
    }

    async fn checkpoint_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self
            .rows("SELECT key_id, public_key FROM audit_checkpoint_keys ORDER BY created_at_ms, key_id", params![])
            .await?;
        rows.iter()
            .map(|row| Ok((row.text(0)?, row.text(1)?)))
            .collect()
    }

    async fn search_audit(
        &self,
        zone_id: &str,
        filter: &AuditFilter,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        // Metadata is canonical JSON (no whitespace), so a key-value pair is an exact substring.
        let needle = |key: &str, value: &Option<String>| {
            value
                .as_ref()
                .map(|value| format!("\"{key}\":{}", serde_json::Value::String(value.clone())))
        };
        let admin = filter.admin.as_ref();
        let sql = match self.dialect() {
            Dialect::Sqlite => {
                concat!(select_audit_events!(), " WHERE zone_id = $1
                   AND (CAST($2 AS BIGINT) IS NULL OR occurred_at_ms >= CAST($2 AS BIGINT))
                   AND (CAST($3 AS BIGINT) IS NULL OR occurred_at_ms < CAST($3 AS BIGINT))
                   AND (CAST($4 AS TEXT) IS NULL OR event_type IN (SELECT value FROM json_each($4)))
                   AND (CAST($5 AS TEXT) IS NULL OR decision = CAST($5 AS TEXT))
                   AND (CAST($6 AS TEXT) IS NULL OR request_id = CAST($6 AS TEXT))
                   AND (CAST($7 AS TEXT) IS NULL OR instr(metadata, $7) > 0 OR instr(metadata, $8) > 0)
                   AND (CAST($9 AS TEXT) IS NULL OR instr(metadata, $9) > 0)
                   AND (CAST($10 AS BIGINT) IS NULL OR chain_seq < CAST($10 AS BIGINT))
                   AND (CAST($12 AS TEXT) IS NULL OR substr(event_type, 1, 6) = CAST($12 AS TEXT))
                   AND (CAST($13 AS TEXT) IS NULL OR instr(metadata, $13) > 0)
                   AND (CAST($14 AS TEXT) IS NULL OR instr(metadata, $14) > 0)
                   AND (CAST($15 AS TEXT) IS NULL OR instr(metadata, $15) > 0)
                   AND (CAST($16 AS TEXT) IS NULL OR instr(metadata, $16) > 0)
                   AND (CAST($17 AS TEXT) IS NULL OR instr(metadata, $17) > 0)
                 ORDER BY chain_seq DESC LIMIT CAST($11 AS BIGINT)")
            }
            Dialect::Postgres => {
                concat!(
                    select_audit_events!(),
                    " WHERE zone_id = $1
                   AND (CAST($2 AS BIGINT) IS NULL OR occurred_at_ms >= CAST($2 AS BIGINT))
                   AND (CAST($3 AS BIGINT) IS NULL OR occurred_at_ms < CAST($3 AS BIGINT))
                   AND (CAST($4 AS TEXT) IS NULL
                        OR event_type IN (SELECT jsonb_array_elements_text(CAST($4 AS jsonb))))
                   AND (CAST($5 AS TEXT) IS NULL OR decision = CAST($5 AS TEXT))
                   AND (CAST($6 AS TEXT) IS NULL OR request_id = CAST($6 AS TEXT))
                   AND (CAST($7 AS TEXT) IS NULL OR strpos(metadata, CAST($7 AS TEXT)) > 0
                        OR strpos(metadata, CAST($8 AS TEXT)) > 0)
                   AND (CAST($9 AS TEXT) IS NULL OR strpos(metadata, CAST($9 AS TEXT)) > 0)
                   AND (CAST($10 AS BIGINT) IS NULL OR chain_seq < CAST($10 AS BIGINT))
                   AND (CAST($12 AS TEXT) IS NULL OR substr(event_type, 1, 6) = CAST($12 AS TEXT))
                   AND (CAST($13 AS TEXT) IS NULL OR strpos(metadata, CAST($13 AS TEXT)) > 0)
                   AND (CAST($14 AS TEXT) IS NULL OR strpos(metadata, CAST($14 AS TEXT)) > 0)
                   AND (CAST($15 AS TEXT) IS NULL OR strpos(metadata, CAST($15 AS TEXT)) > 0)
                   AND (CAST($16 AS TEXT) IS NULL OR strpos(metadata, CAST($16 AS TEXT)) > 0)
                   AND (CAST($17 AS TEXT) IS NULL OR strpos(metadata, CAST($17 AS TEXT)) > 0)
                 ORDER BY chain_seq DESC LIMIT CAST($11 AS BIGINT)"
                )
            }
        };
        all(
            self,
            sql,
            params![
                zone_id,
                filter.since_ms,
                filter.until_ms,
                (!filter.event_types.is_empty())
                    .then(|| serde_json::Value::from(filter.event_types.clone()).to_string()),
                filter.decision.clone(),
                filter.request_id.clone(),
                needle("agent_session_id", &filter.session_id),
                needle("session_id", &filter.session_id),
                needle("delegation_edge_id", &filter.edge_id),
                before_seq,
                limit,
                admin.map(|_| "admin.".to_owned()),
                needle("actor", &admin.and_then(|admin| admin.actor.clone())),
                needle(
                    "entity_type",
                    &admin.and_then(|admin| admin.entity_type.clone())
                ),
                needle(
                    "entity_id",
                    &admin.and_then(|admin| admin.entity_id.clone())
                ),
                needle("application_id", &filter.application_id),
                needle("session_id", &filter.authority_record_id),
            ],
            event,
        )
        .await
    }

    async fn audit_chain_key_ids(&self, initial: &str) -> Result<Vec<String>, StoreError> {
        let read = || {
            self.rows(
                "SELECT id FROM audit_chain_keys ORDER BY created_at_ms, id",
                params![],
            )
        };
        let mut rows = read().await?;
        // Only a deployment's very first read writes.
        if rows.is_empty() {
            self.change(
                "INSERT INTO audit_chain_keys (id, created_at_ms)
                 SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM audit_chain_keys)",
                params![initial, 0i64],
            )
            .await?;
            rows = read().await?;
        }
        rows.iter().map(|row| row.text(0)).collect()
    }

    async fn add_audit_chain_key(&self, id: &str) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO audit_chain_keys (id, created_at_ms) VALUES ($1, $2)",
            params![id, crate::store::now_ms()],
        )
        .await
        .map(|_| ())
    }

    async fn audit_cut(&self, zone_id: &str) -> Result<Option<AuditCut>, StoreError> {
        let rows = self
            .rows(
                "SELECT zone_id, cut_seq, last_content_sha256, frontier, cut_at_ms, chain_key_id, cut_mac
                 FROM audit_cuts WHERE zone_id = $1",
                params![zone_id],
            )
            .await?;
        rows.first().map(cut).transpose()
    }

    async fn cut_audit_chain(&self, c: &AuditCut) -> Result<u64, StoreError> {
        let outcomes = self
            .atomic(vec![
                Statement::new(
                    "INSERT INTO audit_cuts (zone_id, cut_seq, last_content_sha256, frontier, cut_at_ms, chain_key_id, cut_mac)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (zone_id) DO UPDATE SET cut_seq = excluded.cut_seq,
                         last_content_sha256 = excluded.last_content_sha256, frontier = excluded.frontier,
                         cut_at_ms = excluded.cut_at_ms, chain_key_id = excluded.chain_key_id,
                         cut_mac = excluded.cut_mac
                     WHERE audit_cuts.cut_seq < excluded.cut_seq",
                    params![
                        c.zone_id.as_str(),
                        c.cut_seq,
                        c.last_content_sha256.as_str(),
                        c.frontier.as_str(),
                        c.cut_at_ms,
                        c.chain_key_id.as_str(),
                        c.cut_mac.as_str(),
                    ],
                ),
                Statement::new(
                    "DELETE FROM audit_events WHERE zone_id = $1 AND chain_seq <= $2",
                    params![c.zone_id.as_str(), c.cut_seq],
                ),
            ])
            .await?;
        Ok(outcomes.get(1).map_or(0, |outcome| outcome.changed))
    }

    async fn recent_decisions(
        &self,
        zone_id: &str,
        since_ms: i64,
        scan: i64,
    ) -> Result<DecisionCounts, StoreError> {
        let rows = self
            .rows(
                "SELECT decision, CAST(CASE WHEN occurred_at_ms >= $2 THEN 1 ELSE 0 END AS BIGINT),
                        COUNT(*)
                 FROM (SELECT decision, occurred_at_ms FROM audit_events WHERE zone_id = $1
                       ORDER BY chain_seq DESC LIMIT CAST($3 AS BIGINT)) newest
                 GROUP BY 1, 2",
                params![zone_id, since_ms, scan],
            )
            .await?;
        let (mut counts, mut scanned, mut reached_before) = (DecisionCounts::default(), 0, false);
        for row in &rows {
            let count = row.int(2)?;
            scanned += count;
            if row.int(1)? == 1 {
                *counts.counts.entry(row.text(0)?).or_default() += count;
            } else {
                reached_before = true;
            }
        }
        counts.complete = reached_before || scanned < scan;
        Ok(counts)
    }

    async fn audit_seq_range(
        &self,
        zone_id: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let rows = self
            .rows(
                "SELECT MIN(chain_seq), MAX(chain_seq) FROM audit_events
                 WHERE zone_id = $1 AND occurred_at_ms >= $2 AND occurred_at_ms < $3",
                params![zone_id, since_ms, until_ms],
            )
            .await?;
        match rows.first() {
            Some(row) => Ok(row.opt_int(0)?.zip(row.opt_int(1)?)),
            None => Ok(None),
        }
    }
}
