//! What agents do at run time: authority records, sessions, delegation edges and the zone graph
//! epoch, approval holds and idempotency receipts.

use crate::db::{Db, Dialect, Outcome, Row, Statement, Then, Value, params};
use crate::model::{
    ApprovalHold, AuthorityRecord, DelegationContext, DelegationEdge, IdempotencyReceipt,
    OutboxMessage, RevokedAnchors, Session, SubjectFilter, SubjectSummary, TerminatedTree,
};
use crate::store::{
    StoreError, all, count, enqueue, first_row, list_from_json, list_to_json, not_found, now_ms,
    one, with_outbox,
};
use crate::{RecordFilter, SessionFilter};

/// The retention cut of authority records: those expired before `$1` that no live session is
/// bound to, at most `$2`. Every status is named so that the search runs on
/// `authority_records_status_expiry` (the only index on expiry since migration 18).
pub(crate) const PURGE_AUTHORITY_RECORDS: &str = "DELETE FROM authority_records WHERE id IN (
     SELECT r.id FROM authority_records r
     WHERE r.status IN ('active', 'revoked', 'expired')
       AND r.expires_at_ms < $1
       AND NOT EXISTS (SELECT 1 FROM sessions s
                       WHERE s.authority_record_id = r.id
                         AND s.status IN ('active', 'suspended'))
     LIMIT CAST($2 AS BIGINT))";

/// The row columns of `sessions`, for `concat!`.
macro_rules! select_sessions {
    () => {
        "SELECT id, zone_id, application_id, parent_id, authority_record_id, status, lifecycle, depth, labels, metadata, ttl_seconds, lease_generation, heartbeat_deadline_ms, started_at_ms, last_active_ms, terminated_at_ms, termination_reason FROM sessions"
    };
}

/// The row columns of `delegation_edges`, for `concat!`.
macro_rules! select_delegation_edges {
    () => {
        "SELECT id, zone_id, source_session_id, target_session_id, issuer_application_id, receiver_application_id, parent_edge_id, resource_id, scopes, constraints, status, expires_at_ms, created_at_ms, revoked_at_ms FROM delegation_edges"
    };
}

/// The row columns of `approval_holds`, for `concat!`.
macro_rules! select_approval_holds {
    () => {
        "SELECT id, zone_id, session_id, principal_id, application_id, tier, approver_class, binding_hash, metadata, created_at_ms, expires_at_ms, decision, decided_at_ms, decision_reason, approver_id, consumed_at_ms, consumed_record_id FROM approval_holds"
    };
}

/// The row columns of `authority_records`, for `concat!`.
macro_rules! select_authority_records {
    () => {
        "SELECT id, zone_id, session_type, subject_id, parent_id, status, claims, expires_at_ms, authenticated_at_ms, created_at_ms, revoked_at_ms, revoked_reason FROM authority_records"
    };
}

#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    /// Inserts many records in one transaction (the STS group-commits its mints).
    async fn insert_authority_records(&self, records: &[AuthorityRecord])
    -> Result<(), StoreError>;
    /// Whether concurrent writes already share transactions (the embedded store's writer
    /// thread commits whatever is queued together), so a caller needs no batching of its own.
    fn groups_concurrent_writes(&self) -> bool;
    async fn get_authority_record(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<AuthorityRecord>, StoreError>;
    /// How many of the zone's records are active and unexpired at `now_ms`.
    async fn count_active_authority_records(
        &self,
        zone_id: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError>;
    /// The zone's subjects of authority records matching `filter`, each kind its own row,
    /// ordered by (subject id, kind), at most `limit`; counts as of `now_ms`.
    async fn page_subjects(
        &self,
        zone_id: &str,
        filter: &SubjectFilter,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<SubjectSummary>, StoreError>;
    async fn list_authority_records_of(
        &self,
        zone_id: &str,
        subject_id: &str,
    ) -> Result<Vec<AuthorityRecord>, StoreError>;
    /// At most `limit` of the zone's records matching `filter`, by id, after `after`.
    async fn page_authority_records(
        &self,
        zone_id: &str,
        filter: &RecordFilter,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuthorityRecord>, StoreError>;
    /// Revokes an active record; [`StoreError::NotFound`] if there is none.
    async fn revoke_authority_record(
        &self,
        zone_id: &str,
        id: &str,
        reason: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;

    /// Revokes every active authority record of the zone (a signing key was exposed: nothing
    /// minted under it may be used), with one `caracal.sessions.revoke` message per record in
    /// the same transaction (what `outbox` builds from the revoked records). Returns their ids.
    async fn revoke_zone_authority(
        &self,
        zone_id: &str,
        reason: &str,
        outbox: for<'t> fn(&'t TerminatedTree) -> Vec<OutboxMessage>,
    ) -> Result<Vec<String>, StoreError>;

    async fn create_session(
        &self,
        session: &Session,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        self.create_session_with_receipt(session, None, outbox, None)
            .await
    }
    /// Creates the session and, in the same transaction, the delegation edge it inherits (if
    /// any: the graph epoch is bumped and stamped into `outbox` as for
    /// [`create_delegation_edge`](Self::create_delegation_edge)) and the idempotency receipt
    /// that answers a retry; a live receipt for the same key is a conflict and creates nothing.
    async fn create_session_with_receipt(
        &self,
        session: &Session,
        inherited: Option<&DelegationEdge>,
        outbox: &[OutboxMessage],
        receipt: Option<&IdempotencyReceipt>,
    ) -> Result<(), StoreError>;
    async fn get_session(&self, zone_id: &str, id: &str) -> Result<Option<Session>, StoreError>;
    async fn list_sessions(&self, zone_id: &str) -> Result<Vec<Session>, StoreError>;
    /// At most `limit` of the zone's sessions matching `filter`, by id, after `after`.
    async fn page_sessions(
        &self,
        zone_id: &str,
        filter: &SessionFilter,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Session>, StoreError>;
    /// Active sessions of the zone, and of those, `application_id`'s.
    async fn count_active_sessions(
        &self,
        zone_id: &str,
        application_id: &str,
    ) -> Result<(i64, i64), StoreError>;
    async fn list_child_sessions(
        &self,
        zone_id: &str,
        parent_id: &str,
    ) -> Result<Vec<Session>, StoreError>;
    /// Moves a live session to `status` (`terminated` and `expired` are final and stamp the
    /// time and reason); a session already final is not found.
    async fn set_session_status(
        &self,
        zone_id: &str,
        id: &str,
        status: &str,
        reason: Option<&str>,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Terminates session `id` and its whole `parent_id` subtree, revokes every active edge
    /// whose source or target is in it, bumps the zone graph epoch, and enqueues what
    /// `outbox` builds from the result (stamped with the new epoch), all in one transaction.
    /// Sessions already final stay as they are; an unknown session is
    /// [`StoreError::NotFound`].
    async fn terminate_session_tree(
        &self,
        zone_id: &str,
        id: &str,
        reason: &str,
        outbox: for<'t> fn(&'t TerminatedTree) -> Vec<OutboxMessage>,
    ) -> Result<TerminatedTree, StoreError>;
    /// Sessions of every zone whose task TTL or service lease has run out while still active,
    /// as `(zone, id)`, at most `limit`: for the expiry sweeper, which reads across zones.
    async fn lapsed_sessions(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<(String, String)>, StoreError>;
    /// Every anchor a Gateway must refuse, across zones: revoked authority records that
    /// expire after `since_ms`, suspended sessions, sessions terminated or expired since
    /// `since_ms`, edges revoked since `since_ms`. The Gateway's revocation snapshot.
    async fn revoked_anchors(&self, since_ms: i64) -> Result<RevokedAnchors, StoreError>;
    /// Retention, across zones: deletes up to `limit` each of the sessions that ended, the
    /// edges that were revoked or expired, and the authority records that expired, before
    /// `before_ms` (a record stays while a live session is bound to it). Returns how many rows
    /// went.
    async fn purge_ended_runtime(&self, before_ms: i64, limit: i64) -> Result<u64, StoreError>;
    /// The subject kill switch: revokes every active authority record of `subject_id` in the
    /// zone, terminates every session bound to one of them (with subtrees) and revokes every
    /// edge touching those, in one transaction with what `outbox` builds.
    async fn revoke_subject(
        &self,
        zone_id: &str,
        subject_id: &str,
        reason: &str,
        outbox: for<'t> fn(&'t TerminatedTree) -> Vec<OutboxMessage>,
    ) -> Result<TerminatedTree, StoreError>;
    /// What terminating session `id` would take down (nothing changes).
    async fn session_tree_impact(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<TerminatedTree, StoreError>;
    /// What revoking edge `id` would take down (nothing changes).
    async fn delegation_tree_impact(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<TerminatedTree, StoreError>;
    /// Extends a live service session's lease to `deadline_ms` if `generation` is current;
    /// anything else (stale generation, lapsed, not a service) is [`StoreError::Conflict`].
    async fn heartbeat_session(
        &self,
        zone_id: &str,
        id: &str,
        generation: i64,
        deadline_ms: i64,
    ) -> Result<(), StoreError>;
    /// Takes a live service session's lease: the next generation, which fences the holder of
    /// the previous one. Returns it; a session that is not a live service is a conflict.
    async fn acquire_session_lease(
        &self,
        zone_id: &str,
        id: &str,
        deadline_ms: i64,
    ) -> Result<i64, StoreError>;
    /// Revokes edge `id` and every edge descending from it (`parent_edge_id`), terminates the
    /// sessions those edges target with their subtrees, revokes every other active edge
    /// touching those sessions, bumps the epoch and enqueues what `outbox` builds, in one
    /// transaction. An unknown edge is [`StoreError::NotFound`].
    async fn revoke_delegation_tree(
        &self,
        zone_id: &str,
        id: &str,
        reason: &str,
        outbox: for<'t> fn(&'t TerminatedTree) -> Vec<OutboxMessage>,
    ) -> Result<TerminatedTree, StoreError>;
    /// Renews an active session's lease if `generation` is still current; returns the new
    /// generation. A stale generation is a [`StoreError::Conflict`] (fencing).
    async fn renew_session_lease(
        &self,
        zone_id: &str,
        id: &str,
        generation: i64,
        deadline_ms: i64,
    ) -> Result<i64, StoreError>;

    /// Creates an edge and bumps the zone graph epoch in one transaction; every outbox message
    /// gets the new epoch in its `epoch` field. Returns the new epoch.
    async fn create_delegation_edge(
        &self,
        edge: &DelegationEdge,
        outbox: &[OutboxMessage],
    ) -> Result<i64, StoreError> {
        self.create_delegation_edge_with_receipt(edge, outbox, None)
            .await
    }
    /// Creates the edge and the idempotency receipt in one transaction, as
    /// [`create_session_with_receipt`](Self::create_session_with_receipt); returns the new
    /// graph epoch.
    async fn create_delegation_edge_with_receipt(
        &self,
        edge: &DelegationEdge,
        outbox: &[OutboxMessage],
        receipt: Option<&IdempotencyReceipt>,
    ) -> Result<i64, StoreError>;
    async fn get_delegation_edge(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<DelegationEdge>, StoreError>;
    /// The zone's edges among `ids`, in one read (unknown ids are left out; order by id).
    async fn get_delegation_edges(
        &self,
        zone_id: &str,
        ids: &[&str],
    ) -> Result<Vec<DelegationEdge>, StoreError>;
    async fn list_edges_from(
        &self,
        zone_id: &str,
        session_id: &str,
    ) -> Result<Vec<DelegationEdge>, StoreError>;
    async fn list_edges_to(
        &self,
        zone_id: &str,
        session_id: &str,
    ) -> Result<Vec<DelegationEdge>, StoreError>;
    /// At most `limit` of the zone's edges (of `status`, when given), by id, after `after`.
    async fn page_delegation_edges(
        &self,
        zone_id: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DelegationEdge>, StoreError>;
    /// Revokes the active edges among `ids` and bumps the epoch, stamping it into `outbox` as
    /// above. Returns (new epoch, edges revoked).
    async fn revoke_delegation_edges(
        &self,
        zone_id: &str,
        ids: &[String],
        outbox: &[OutboxMessage],
    ) -> Result<(i64, u64), StoreError>;
    /// The zone's graph epoch (0 before the first change).
    async fn zone_graph_epoch(&self, zone_id: &str) -> Result<i64, StoreError>;
    /// The edge `id` of `zone_id`, its source and target sessions and the zone graph epoch, in
    /// one read (one snapshot).
    async fn delegation_context(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<DelegationContext>, StoreError>;

    async fn create_approval_hold(
        &self,
        hold: &ApprovalHold,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn get_approval_hold(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<ApprovalHold>, StoreError>;
    async fn list_pending_approval_holds(
        &self,
        zone_id: &str,
    ) -> Result<Vec<ApprovalHold>, StoreError>;
    /// Every hold of the zone, decided or not, oldest first.
    async fn list_approval_holds(&self, zone_id: &str) -> Result<Vec<ApprovalHold>, StoreError>;
    /// A hold by id alone: the one read that does not name a zone. A hold id is a random
    /// 122-bit capability handed to the requester, who polls it without knowing more.
    async fn approval_hold_by_id(&self, id: &str) -> Result<Option<ApprovalHold>, StoreError>;
    /// Decides an undecided, unexpired hold; otherwise a [`StoreError::Conflict`].
    async fn decide_approval_hold(
        &self,
        zone_id: &str,
        id: &str,
        decision: &str,
        reason: &str,
        approver_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Consumes an approved hold once; a second use is a [`StoreError::Conflict`].
    /// Spends an approved, unexpired, unspent hold and creates the authority record of the mint
    /// it allows, in one transaction; a hold in any other state is a [`StoreError::Conflict`]
    /// and creates nothing.
    async fn consume_approval_hold(
        &self,
        zone_id: &str,
        id: &str,
        record: &AuthorityRecord,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;

    /// Stores a receipt; an existing live receipt for the same key is a conflict.
    async fn put_idempotency_receipt(&self, receipt: &IdempotencyReceipt)
    -> Result<(), StoreError>;
    /// The live receipt for the key, if any.
    async fn get_idempotency_receipt(
        &self,
        operation: &str,
        zone_id: &str,
        scope_id: &str,
        key_digest: &str,
    ) -> Result<Option<IdempotencyReceipt>, StoreError>;
    /// How many live receipts `scope_id` holds for `operation` in the zone.
    async fn count_idempotency_receipts(
        &self,
        operation: &str,
        zone_id: &str,
        scope_id: &str,
    ) -> Result<i64, StoreError>;
    /// Deletes expired receipts; returns how many.
    async fn purge_idempotency_receipts(&self) -> Result<u64, StoreError>;
}

fn conflict_state() -> StoreError {
    StoreError::Conflict("the record is not in a state that allows this change".into())
}

fn stale_lease() -> StoreError {
    StoreError::Conflict("stale lease generation".into())
}

fn authority(row: &Row) -> Result<AuthorityRecord, StoreError> {
    Ok(AuthorityRecord {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        session_type: row.text(2)?,
        subject_id: row.text(3)?,
        parent_id: row.opt_text(4)?,
        status: row.text(5)?,
        claims: row.text(6)?,
        expires_at_ms: row.int(7)?,
        authenticated_at_ms: row.int(8)?,
        created_at_ms: row.int(9)?,
        revoked_at_ms: row.opt_int(10)?,
        revoked_reason: row.opt_text(11)?,
    })
}

fn session(row: &Row) -> Result<Session, StoreError> {
    Ok(Session {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        application_id: row.text(2)?,
        parent_id: row.opt_text(3)?,
        authority_record_id: row.text(4)?,
        status: row.text(5)?,
        lifecycle: row.text(6)?,
        depth: row.int(7)?,
        labels: list_from_json(&row.text(8)?)?,
        metadata: row.text(9)?,
        ttl_seconds: row.opt_int(10)?,
        lease_generation: row.int(11)?,
        heartbeat_deadline_ms: row.opt_int(12)?,
        started_at_ms: row.int(13)?,
        last_active_ms: row.int(14)?,
        terminated_at_ms: row.opt_int(15)?,
        termination_reason: row.opt_text(16)?,
    })
}

fn edge(row: &Row) -> Result<DelegationEdge, StoreError> {
    Ok(DelegationEdge {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        source_session_id: row.text(2)?,
        target_session_id: row.text(3)?,
        issuer_application_id: row.text(4)?,
        receiver_application_id: row.text(5)?,
        parent_edge_id: row.opt_text(6)?,
        resource_id: row.opt_text(7)?,
        scopes: list_from_json(&row.text(8)?)?,
        constraints: row.text(9)?,
        status: row.text(10)?,
        expires_at_ms: row.opt_int(11)?,
        created_at_ms: row.int(12)?,
        revoked_at_ms: row.opt_int(13)?,
    })
}

fn hold(row: &Row) -> Result<ApprovalHold, StoreError> {
    Ok(ApprovalHold {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        session_id: row.text(2)?,
        principal_id: row.text(3)?,
        application_id: row.text(4)?,
        tier: row.text(5)?,
        approver_class: row.text(6)?,
        binding_hash: row.text(7)?,
        metadata: row.text(8)?,
        created_at_ms: row.int(9)?,
        expires_at_ms: row.int(10)?,
        decision: row.opt_text(11)?,
        decided_at_ms: row.opt_int(12)?,
        decision_reason: row.opt_text(13)?,
        approver_id: row.opt_text(14)?,
        consumed_at_ms: row.opt_int(15)?,
        consumed_record_id: row.opt_text(16)?,
    })
}

fn receipt(row: &Row) -> Result<IdempotencyReceipt, StoreError> {
    Ok(IdempotencyReceipt {
        operation: row.text(0)?,
        zone_id: row.text(1)?,
        scope_id: row.text(2)?,
        key_digest: row.text(3)?,
        request_digest: row.text(4)?,
        resource_type: row.text(5)?,
        resource_id: row.text(6)?,
        response_status: row.int(7)?,
        response_json: row.text(8)?,
        expires_at_ms: row.int(9)?,
    })
}

fn authority_inserts(records: &[AuthorityRecord]) -> Vec<Statement> {
    records
            .iter()
            .map(|record| {
                Statement::new(
                    "INSERT INTO authority_records (id, zone_id, session_type, subject_id, parent_id, status, claims,
                         expires_at_ms, authenticated_at_ms, created_at_ms, revoked_at_ms, revoked_reason)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                    params![
                        record.id.as_str(),
                        record.zone_id.as_str(),
                        record.session_type.as_str(),
                        record.subject_id.as_str(),
                        record.parent_id.clone(),
                        record.status.as_str(),
                        record.claims.as_str(),
                        record.expires_at_ms,
                        record.authenticated_at_ms,
                        record.created_at_ms,
                        record.revoked_at_ms,
                        record.revoked_reason.clone(),
                    ],
                )
            })
            .collect()
}

/// The sessions under session `$2` of zone `$1` (itself included), as `tree (id)`. The
/// recursive steps read `tree CROSS JOIN sessions`: SQLite then keeps the queue row outside
/// and looks children up by index; left to choose, it scans the zone's sessions for every row
/// (quadratic in the tree's size).
macro_rules! session_tree {
    () => {
        "WITH RECURSIVE tree (id) AS (
             SELECT id FROM sessions WHERE zone_id = $1 AND id = $2
             UNION SELECT s.id FROM tree t CROSS JOIN sessions s
                 WHERE s.zone_id = $1 AND s.parent_id = t.id)"
    };
}

/// The sessions reached by revoking edge `$2` of zone `$1`: the targets of the edge and of its
/// descendants (by `parent_edge_id`), and their subtrees, as `tree (id)`.
/// The sessions bound to an authority record of subject `$2` in zone `$1`, and their subtrees.
macro_rules! subject_tree {
    () => {
        "WITH RECURSIVE tree (id) AS (
             SELECT id FROM sessions WHERE zone_id = $1 AND authority_record_id IN
                 (SELECT id FROM authority_records WHERE zone_id = $1 AND subject_id = $2)
             UNION SELECT s.id FROM tree t CROSS JOIN sessions s
                 WHERE s.zone_id = $1 AND s.parent_id = t.id)"
    };
}

macro_rules! delegation_tree {
    () => {
        "WITH RECURSIVE down (id, target) AS (
             SELECT id, target_session_id FROM delegation_edges WHERE zone_id = $1 AND id = $2
             UNION SELECT e.id, e.target_session_id FROM down d CROSS JOIN delegation_edges e
                 WHERE e.zone_id = $1 AND e.parent_edge_id = d.id),
         tree (id) AS (
             SELECT target FROM down
             UNION SELECT s.id FROM tree t CROSS JOIN sessions s
                 WHERE s.zone_id = $1 AND s.parent_id = t.id)"
    };
}

/// A cascade over `tree`: the two updates, and the two reads that preview them.
struct CascadeSql {
    terminate: &'static str,
    revoke: &'static str,
    sessions: &'static str,
    edges: &'static str,
}

macro_rules! cascade_sql {
    ($tree:expr) => {
        CascadeSql {
            terminate: concat!(
                $tree,
                " UPDATE sessions SET status = 'terminated', terminated_at_ms = $3, termination_reason = $4
                 WHERE zone_id = $1 AND id IN (SELECT id FROM tree) AND status IN ('active', 'suspended')
                 RETURNING id, authority_record_id"
            ),
            revoke: concat!(
                $tree,
                " UPDATE delegation_edges SET status = 'revoked', revoked_at_ms = $3
                 WHERE zone_id = $1 AND status = 'active'
                   AND (source_session_id IN (SELECT id FROM tree) OR target_session_id IN (SELECT id FROM tree))
                 RETURNING id, target_session_id"
            ),
            sessions: concat!(
                $tree,
                " SELECT id, authority_record_id FROM sessions
                 WHERE zone_id = $1 AND id IN (SELECT id FROM tree) AND status IN ('active', 'suspended')"
            ),
            edges: concat!(
                $tree,
                " SELECT id, target_session_id FROM delegation_edges
                 WHERE zone_id = $1 AND status = 'active'
                   AND (source_session_id IN (SELECT id FROM tree) OR target_session_id IN (SELECT id FROM tree))"
            ),
        }
    };
}

/// Stores a receipt: an expired receipt for the same key is replaced; a live one is a
/// conflict (which fails the whole transaction it is part of).
fn receipt_insert(r: &IdempotencyReceipt) -> Statement {
    Statement::new(
        "INSERT INTO idempotency_receipts (operation, zone_id, scope_id, key_digest, request_digest,
             resource_type, resource_id, response_status, response_json, expires_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (operation, zone_id, scope_id, key_digest) DO UPDATE SET
             request_digest = excluded.request_digest, resource_type = excluded.resource_type,
             resource_id = excluded.resource_id, response_status = excluded.response_status,
             response_json = excluded.response_json, expires_at_ms = excluded.expires_at_ms
         WHERE idempotency_receipts.expires_at_ms <= $11",
        params![
            r.operation.as_str(),
            r.zone_id.as_str(),
            r.scope_id.as_str(),
            r.key_digest.as_str(),
            r.request_digest.as_str(),
            r.resource_type.as_str(),
            r.resource_id.as_str(),
            r.response_status,
            r.response_json.as_str(),
            r.expires_at_ms,
            now_ms(),
        ],
    )
    .must_change(|| StoreError::Conflict("a live receipt exists for this idempotency key".into()))
}

/// The first column of an outcome's rows (none for a missing outcome).
fn first_column(outcome: Option<&Outcome>) -> Result<Vec<String>, StoreError> {
    outcome
        .map(|outcome| outcome.rows.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|row| row.text(0))
        .collect()
}

fn pairs_of(rows: &[Row]) -> Result<Vec<(String, String)>, StoreError> {
    rows.iter()
        .map(|row| Ok((row.text(0)?, row.text(1)?)))
        .collect()
}

/// What a cascade would take down, read in one snapshot; the epoch is the current one.
async fn preview<D: Db + ?Sized>(
    db: &D,
    zone_id: &str,
    id: &str,
    exists: Statement,
    sql: CascadeSql,
) -> Result<TerminatedTree, StoreError> {
    let outcomes = db
        .atomic(vec![
            exists,
            Statement::new(sql.sessions, params![zone_id, id]),
            Statement::new(sql.edges, params![zone_id, id]),
            Statement::new(
                "SELECT COALESCE(MAX(epoch), 0) FROM zone_graph_epochs WHERE zone_id = $1",
                params![zone_id],
            ),
        ])
        .await?;
    let rows = |index: usize| {
        outcomes
            .get(index)
            .map(|outcome| outcome.rows.as_slice())
            .unwrap_or_default()
    };
    Ok(TerminatedTree {
        zone_id: zone_id.to_owned(),
        reason: String::new(),
        records: Vec::new(),
        sessions: pairs_of(rows(1))?,
        edges: pairs_of(rows(2))?,
        epoch: rows(3).first().map_or(Ok(0), |row| row.int(0))?,
    })
}

/// One cascade transaction: `exists` (refuses an unknown root), the live sessions of the tree
/// terminated, every active edge touching them revoked, the epoch bumped, and the outbox
/// built from the result.
#[allow(clippy::too_many_arguments)]
async fn cascade<D: Db + ?Sized>(
    db: &D,
    zone_id: &str,
    id: &str,
    reason: &str,
    exists: Statement,
    sql: CascadeSql,
    outbox: for<'t> fn(&'t TerminatedTree) -> Vec<OutboxMessage>,
    first_revokes_records: bool,
) -> Result<TerminatedTree, StoreError> {
    let now = now_ms();
    let sessions = Statement::new(sql.terminate, params![zone_id, id, now, reason]);
    let edges = Statement::new(sql.revoke, params![zone_id, id, now]);
    let result = std::sync::Arc::new(std::sync::Mutex::new(TerminatedTree::default()));
    let seen = std::sync::Arc::clone(&result);
    let (zone, why) = (zone_id.to_owned(), reason.to_owned());
    db.atomic_with(
        vec![exists, sessions, edges, bump_epoch(zone_id)],
        Box::new(move |outcomes: &[Outcome]| {
            let pairs = |index: usize| {
                pairs_of(
                    outcomes
                        .get(index)
                        .map(|outcome| outcome.rows.as_slice())
                        .unwrap_or_default(),
                )
            };
            let records = if first_revokes_records {
                first_column(outcomes.first())?
            } else {
                Vec::new()
            };
            let tree = TerminatedTree {
                zone_id: zone,
                reason: why,
                records,
                sessions: pairs(1)?,
                edges: pairs(2)?,
                epoch: epoch_of(outcomes, 3)?,
            };
            let messages = outbox(&tree);
            *seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = tree;
            Ok(enqueue(&messages, now_ms()))
        }),
    )
    .await?;
    let tree = std::mem::take(
        &mut *result
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    Ok(tree)
}

fn edge_insert(e: &DelegationEdge) -> Statement {
    Statement::new(
        "INSERT INTO delegation_edges (id, zone_id, source_session_id, target_session_id, issuer_application_id,
             receiver_application_id, parent_edge_id, resource_id, scopes, constraints, status, expires_at_ms,
             created_at_ms, revoked_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        params![
            e.id.as_str(),
            e.zone_id.as_str(),
            e.source_session_id.as_str(),
            e.target_session_id.as_str(),
            e.issuer_application_id.as_str(),
            e.receiver_application_id.as_str(),
            e.parent_edge_id.clone(),
            e.resource_id.clone(),
            list_to_json(&e.scopes),
            e.constraints.as_str(),
            e.status.as_str(),
            e.expires_at_ms,
            e.created_at_ms,
            e.revoked_at_ms,
        ],
    )
}

fn bump_epoch(zone_id: &str) -> Statement {
    Statement::new(
        "INSERT INTO zone_graph_epochs (zone_id, epoch) VALUES ($1, 1)
         ON CONFLICT (zone_id) DO UPDATE SET epoch = zone_graph_epochs.epoch + 1
         RETURNING epoch",
        params![zone_id],
    )
}

/// The second phase of an epoch-changing transaction: the outbox, stamped with the new epoch
/// returned by the statement at `epoch_index`.
fn stamped_outbox(outbox: &[OutboxMessage], epoch_index: usize) -> Then {
    let outbox = outbox.to_vec();
    Box::new(move |outcomes: &[Outcome]| {
        let epoch = outcomes
            .get(epoch_index)
            .and_then(|outcome| outcome.rows.first())
            .ok_or_else(|| StoreError::Corrupt("epoch bump returned nothing".into()))?
            .int(0)?;
        let stamped: Vec<OutboxMessage> = outbox
            .into_iter()
            .map(|mut message| {
                message.fields.insert("epoch".to_owned(), epoch.to_string());
                message
            })
            .collect();
        Ok(enqueue(&stamped, now_ms()))
    })
}

fn epoch_of(outcomes: &[Outcome], index: usize) -> Result<i64, StoreError> {
    outcomes
        .get(index)
        .and_then(|outcome| outcome.rows.first())
        .ok_or_else(|| StoreError::Corrupt("epoch bump returned nothing".into()))?
        .int(0)
}

#[async_trait::async_trait]
impl<D: Db> Runtime for D {
    async fn insert_authority_records(
        &self,
        records: &[AuthorityRecord],
    ) -> Result<(), StoreError> {
        self.atomic_unsynced(authority_inserts(records))
            .await
            .map(|_| ())
    }

    fn groups_concurrent_writes(&self) -> bool {
        self.dialect() == Dialect::Sqlite
    }

    async fn get_authority_record(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<AuthorityRecord>, StoreError> {
        one(
            self,
            concat!(
                select_authority_records!(),
                " WHERE zone_id = $1 AND id = $2"
            ),
            params![zone_id, id],
            authority,
        )
        .await
    }

    async fn count_active_authority_records(
        &self,
        zone_id: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        count(
            self,
            "SELECT COUNT(*) FROM authority_records
             WHERE status = 'active' AND expires_at_ms > $2 AND zone_id = $1",
            params![zone_id, now_ms],
        )
        .await
    }

    async fn page_subjects(
        &self,
        zone_id: &str,
        filter: &SubjectFilter,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<SubjectSummary>, StoreError> {
        let pattern = filter.search.as_deref().map(|search| {
            let escaped: String = search
                .to_lowercase()
                .chars()
                .flat_map(|c| match c {
                    '%' | '_' | '\\' => vec!['\\', c],
                    c => vec![c],
                })
                .collect();
            format!("%{escaped}%")
        });
        let (after_subject, after_kind) = filter.after.clone().unzip();
        let rows = self
            .rows(
                "SELECT subject_id, session_type,
                        CAST(SUM(CASE WHEN status = 'active' AND expires_at_ms > $2 THEN 1 ELSE 0 END) AS BIGINT),
                        CAST(SUM(CASE WHEN status = 'revoked' THEN 1 ELSE 0 END) AS BIGINT),
                        CAST(SUM(CASE WHEN status = 'expired'
                                        OR (status = 'active' AND expires_at_ms <= $2)
                                      THEN 1 ELSE 0 END) AS BIGINT),
                        MIN(created_at_ms), MAX(created_at_ms)
                 FROM authority_records
                 WHERE zone_id = $1
                   AND (CAST($3 AS TEXT) IS NULL OR subject_id = CAST($3 AS TEXT))
                   AND (CAST($4 AS TEXT) IS NULL OR session_type = CAST($4 AS TEXT))
                   AND (CAST($5 AS TEXT) IS NULL OR LOWER(subject_id) LIKE CAST($5 AS TEXT) ESCAPE '\\')
                   AND (CAST($6 AS TEXT) IS NULL OR subject_id > CAST($6 AS TEXT)
                        OR (subject_id = CAST($6 AS TEXT) AND session_type > CAST($7 AS TEXT)))
                 GROUP BY subject_id, session_type
                 ORDER BY subject_id, session_type LIMIT CAST($8 AS BIGINT)",
                params![
                    zone_id,
                    now_ms,
                    filter.subject_id.clone(),
                    filter.kind.clone(),
                    pattern,
                    after_subject,
                    after_kind,
                    limit,
                ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(SubjectSummary {
                    subject_id: row.text(0)?,
                    kind: row.text(1)?,
                    active: row.int(2)?,
                    revoked: row.int(3)?,
                    expired: row.int(4)?,
                    first_seen_ms: row.int(5)?,
                    last_seen_ms: row.int(6)?,
                })
            })
            .collect()
    }

    async fn list_authority_records_of(
        &self,
        zone_id: &str,
        subject_id: &str,
    ) -> Result<Vec<AuthorityRecord>, StoreError> {
        all(
            self,
            concat!(
                select_authority_records!(),
                " WHERE zone_id = $1 AND subject_id = $2 ORDER BY created_at_ms, id"
            ),
            params![zone_id, subject_id],
            authority,
        )
        .await
    }

    async fn page_authority_records(
        &self,
        zone_id: &str,
        filter: &RecordFilter,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuthorityRecord>, StoreError> {
        all(
            self,
            concat!(
                select_authority_records!(),
                " WHERE zone_id = $1
                   AND (CAST($2 AS TEXT) IS NULL OR id = CAST($2 AS TEXT))
                   AND (CAST($3 AS TEXT) IS NULL OR status = CAST($3 AS TEXT))
                   AND (CAST($4 AS TEXT) IS NULL OR subject_id = CAST($4 AS TEXT))
                   AND (CAST($5 AS TEXT) IS NULL OR session_type = CAST($5 AS TEXT))
                   AND (CAST($6 AS TEXT) IS NULL OR id > CAST($6 AS TEXT))
                 ORDER BY id LIMIT CAST($7 AS BIGINT)"
            ),
            params![
                zone_id,
                filter.id.clone(),
                filter.status.clone(),
                filter.subject_id.clone(),
                filter.kind.clone(),
                after.map(str::to_owned),
                limit,
            ],
            authority,
        )
        .await
    }

    async fn revoke_zone_authority(
        &self,
        zone_id: &str,
        reason: &str,
        outbox: for<'t> fn(&'t TerminatedTree) -> Vec<OutboxMessage>,
    ) -> Result<Vec<String>, StoreError> {
        let update = Statement::new(
            "UPDATE authority_records SET status = 'revoked', revoked_at_ms = $2, revoked_reason = $3
             WHERE zone_id = $1 AND status = 'active' RETURNING id",
            params![zone_id, now_ms(), reason],
        );
        let (zone, why) = (zone_id.to_owned(), reason.to_owned());
        let outcomes = self
            .atomic_with(
                vec![update],
                Box::new(move |outcomes: &[Outcome]| {
                    let tree = TerminatedTree {
                        zone_id: zone,
                        reason: why,
                        records: first_column(outcomes.first())?,
                        ..TerminatedTree::default()
                    };
                    Ok(enqueue(&outbox(&tree), now_ms()))
                }),
            )
            .await?;
        first_column(outcomes.first())
    }

    async fn revoke_authority_record(
        &self,
        zone_id: &str,
        id: &str,
        reason: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE authority_records SET status = 'revoked', revoked_at_ms = $3, revoked_reason = $4
             WHERE zone_id = $1 AND id = $2 AND status = 'active'",
            params![zone_id, id, now_ms(), reason],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn create_session_with_receipt(
        &self,
        s: &Session,
        inherited: Option<&DelegationEdge>,
        outbox: &[OutboxMessage],
        receipt: Option<&IdempotencyReceipt>,
    ) -> Result<(), StoreError> {
        let insert = Statement::new(
            "INSERT INTO sessions (id, zone_id, application_id, parent_id, authority_record_id, status, lifecycle,
                 depth, labels, metadata, ttl_seconds, lease_generation, heartbeat_deadline_ms, started_at_ms,
                 last_active_ms, terminated_at_ms, termination_reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            params![
                s.id.as_str(),
                s.zone_id.as_str(),
                s.application_id.as_str(),
                s.parent_id.clone(),
                s.authority_record_id.as_str(),
                s.status.as_str(),
                s.lifecycle.as_str(),
                s.depth,
                list_to_json(&s.labels),
                s.metadata.as_str(),
                s.ttl_seconds,
                s.lease_generation,
                s.heartbeat_deadline_ms,
                s.started_at_ms,
                s.last_active_ms,
                s.terminated_at_ms,
                s.termination_reason.clone(),
            ],
        );
        if let Some(edge) = inherited {
            let mut statements = vec![insert, edge_insert(edge), bump_epoch(&edge.zone_id)];
            statements.extend(receipt.map(receipt_insert));
            return self
                .atomic_with(statements, stamped_outbox(outbox, 2))
                .await
                .map(|_| ());
        }
        let mut statements = with_outbox(insert, outbox);
        statements.extend(receipt.map(receipt_insert));
        self.atomic(statements).await.map(|_| ())
    }

    async fn get_session(&self, zone_id: &str, id: &str) -> Result<Option<Session>, StoreError> {
        one(
            self,
            concat!(select_sessions!(), " WHERE zone_id = $1 AND id = $2"),
            params![zone_id, id],
            session,
        )
        .await
    }

    async fn count_active_sessions(
        &self,
        zone_id: &str,
        application_id: &str,
    ) -> Result<(i64, i64), StoreError> {
        let rows = self
            .rows(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN application_id = $2 THEN 1 ELSE 0 END), 0)
                 FROM sessions WHERE zone_id = $1 AND status = 'active'",
                params![zone_id, application_id],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("a count returned no row".into()))?;
        Ok((row.int(0)?, row.int(1)?))
    }

    async fn list_sessions(&self, zone_id: &str) -> Result<Vec<Session>, StoreError> {
        all(
            self,
            concat!(
                select_sessions!(),
                " WHERE zone_id = $1 ORDER BY started_at_ms, id"
            ),
            params![zone_id],
            session,
        )
        .await
    }

    async fn page_sessions(
        &self,
        zone_id: &str,
        filter: &SessionFilter,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Session>, StoreError> {
        // Labels are a canonical JSON array of strings: one label is an exact substring.
        let label = filter
            .label
            .as_ref()
            .map(|label| serde_json::Value::String(label.clone()).to_string());
        macro_rules! page_sessions_sql {
            ($contains:literal) => {
                concat!(
                    select_sessions!(),
                    " WHERE zone_id = $1
                       AND (CAST($2 AS TEXT) IS NULL OR status = CAST($2 AS TEXT))
                       AND (CAST($3 AS TEXT) IS NULL OR lifecycle = CAST($3 AS TEXT))
                       AND (CAST($4 AS TEXT) IS NULL OR application_id = CAST($4 AS TEXT))
                       AND (CAST($5 AS TEXT) IS NULL OR parent_id = CAST($5 AS TEXT))
                       AND (CAST($6 AS TEXT) IS NULL OR ",
                    $contains,
                    ")
                       AND (CAST($7 AS TEXT) IS NULL OR authority_record_id IN
                            (SELECT id FROM authority_records
                              WHERE zone_id = $1 AND subject_id = CAST($7 AS TEXT)))
                       AND (CAST($8 AS TEXT) IS NULL OR id > CAST($8 AS TEXT))
                     ORDER BY id LIMIT CAST($9 AS BIGINT)"
                )
            };
        }
        let sql = match self.dialect() {
            Dialect::Sqlite => page_sessions_sql!("instr(labels, CAST($6 AS TEXT)) > 0"),
            Dialect::Postgres => page_sessions_sql!("strpos(labels, CAST($6 AS TEXT)) > 0"),
        };
        all(
            self,
            sql,
            params![
                zone_id,
                filter.status.clone(),
                filter.lifecycle.clone(),
                filter.application_id.clone(),
                filter.parent_id.clone(),
                label,
                filter.subject_id.clone(),
                after.map(str::to_owned),
                limit,
            ],
            session,
        )
        .await
    }

    async fn list_child_sessions(
        &self,
        zone_id: &str,
        parent_id: &str,
    ) -> Result<Vec<Session>, StoreError> {
        all(
            self,
            concat!(
                select_sessions!(),
                " WHERE zone_id = $1 AND parent_id = $2 ORDER BY started_at_ms, id"
            ),
            params![zone_id, parent_id],
            session,
        )
        .await
    }

    async fn set_session_status(
        &self,
        zone_id: &str,
        id: &str,
        status: &str,
        reason: Option<&str>,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE sessions SET status = $3, last_active_ms = $4,
                 terminated_at_ms = CASE WHEN $3 IN ('terminated', 'expired') THEN $4 ELSE terminated_at_ms END,
                 termination_reason = CASE WHEN $3 IN ('terminated', 'expired') THEN $5 ELSE termination_reason END
             WHERE zone_id = $1 AND id = $2 AND status NOT IN ('terminated', 'expired')",
            params![zone_id, id, status, now_ms(), reason],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn terminate_session_tree(
        &self,
        zone_id: &str,
        id: &str,
        reason: &str,
        outbox: for<'t> fn(&'t TerminatedTree) -> Vec<OutboxMessage>,
    ) -> Result<TerminatedTree, StoreError> {
        // The sessions: `id` and its subtree.
        let sql = cascade_sql!(session_tree!());
        let exists = Statement::new(
            "SELECT id FROM sessions WHERE zone_id = $1 AND id = $2",
            params![zone_id, id],
        )
        .must_change(not_found);
        cascade(self, zone_id, id, reason, exists, sql, outbox, false).await
    }

    async fn revoke_delegation_tree(
        &self,
        zone_id: &str,
        id: &str,
        reason: &str,
        outbox: for<'t> fn(&'t TerminatedTree) -> Vec<OutboxMessage>,
    ) -> Result<TerminatedTree, StoreError> {
        // The sessions: the targets of the edge and its descendants, and their subtrees. The
        // edges touching them include the edge and its descendants.
        let sql = cascade_sql!(delegation_tree!());
        let exists = Statement::new(
            "SELECT id FROM delegation_edges WHERE zone_id = $1 AND id = $2",
            params![zone_id, id],
        )
        .must_change(not_found);
        cascade(self, zone_id, id, reason, exists, sql, outbox, false).await
    }

    async fn renew_session_lease(
        &self,
        zone_id: &str,
        id: &str,
        generation: i64,
        deadline_ms: i64,
    ) -> Result<i64, StoreError> {
        let update = Statement::new(
            "UPDATE sessions SET lease_generation = lease_generation + 1, heartbeat_deadline_ms = $4, last_active_ms = $5
             WHERE zone_id = $1 AND id = $2 AND lease_generation = $3 AND status = 'active'
             RETURNING lease_generation",
            params![zone_id, id, generation, deadline_ms, now_ms()],
        )
        .must_change(stale_lease);
        let outcomes = self.atomic(vec![update]).await?;
        first_row(&outcomes)?.int(0)
    }

    async fn revoke_subject(
        &self,
        zone_id: &str,
        subject_id: &str,
        reason: &str,
        outbox: for<'t> fn(&'t TerminatedTree) -> Vec<OutboxMessage>,
    ) -> Result<TerminatedTree, StoreError> {
        // The records first; the tree finds sessions by record whatever its status.
        let records = Statement::new(
            "UPDATE authority_records SET status = 'revoked', revoked_at_ms = $3, revoked_reason = $4
             WHERE zone_id = $1 AND subject_id = $2 AND status = 'active'
             RETURNING id",
            params![zone_id, subject_id, now_ms(), reason],
        );
        cascade(
            self,
            zone_id,
            subject_id,
            reason,
            records,
            cascade_sql!(subject_tree!()),
            outbox,
            true,
        )
        .await
    }

    async fn lapsed_sessions(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self
            .rows(
                "SELECT zone_id, id FROM sessions
                 WHERE status = 'active'
                   AND ((lifecycle = 'task' AND started_at_ms + ttl_seconds * 1000 <= $1)
                     OR (lifecycle = 'service' AND heartbeat_deadline_ms <= $1))
                 ORDER BY started_at_ms LIMIT CAST($2 AS BIGINT)",
                params![now_ms, limit],
            )
            .await?;
        pairs_of(&rows)
    }

    async fn revoked_anchors(&self, since_ms: i64) -> Result<RevokedAnchors, StoreError> {
        let outcomes = self
            .atomic(vec![
                Statement::new(
                    "SELECT id FROM authority_records WHERE status = 'revoked' AND expires_at_ms > $1",
                    params![since_ms],
                ),
                Statement::new(
                    "SELECT id FROM sessions WHERE status = 'suspended'
                        OR (status IN ('terminated', 'expired') AND terminated_at_ms > $1)",
                    params![since_ms],
                ),
                Statement::new(
                    "SELECT id FROM delegation_edges WHERE status = 'revoked' AND revoked_at_ms > $1",
                    params![since_ms],
                ),
            ])
            .await?;
        let ids = |index: usize| first_column(outcomes.get(index));
        Ok(RevokedAnchors {
            records: ids(0)?,
            sessions: ids(1)?,
            edges: ids(2)?,
        })
    }

    async fn purge_ended_runtime(&self, before_ms: i64, limit: i64) -> Result<u64, StoreError> {
        let outcomes = self
            .atomic(vec![
                Statement::new(
                    "DELETE FROM sessions WHERE id IN (
                         SELECT id FROM sessions
                         WHERE status IN ('terminated', 'expired') AND terminated_at_ms < $1
                         LIMIT CAST($2 AS BIGINT))",
                    params![before_ms, limit],
                ),
                Statement::new(
                    "DELETE FROM delegation_edges WHERE id IN (
                         SELECT id FROM delegation_edges
                         WHERE (status = 'revoked' AND revoked_at_ms < $1)
                            OR expires_at_ms < $1
                         LIMIT CAST($2 AS BIGINT))",
                    params![before_ms, limit],
                ),
                Statement::new(PURGE_AUTHORITY_RECORDS, params![before_ms, limit]),
            ])
            .await?;
        Ok(outcomes.iter().map(|outcome| outcome.changed).sum())
    }

    async fn session_tree_impact(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<TerminatedTree, StoreError> {
        let exists = Statement::new(
            "SELECT id FROM sessions WHERE zone_id = $1 AND id = $2",
            params![zone_id, id],
        )
        .must_change(not_found);
        preview(self, zone_id, id, exists, cascade_sql!(session_tree!())).await
    }

    async fn delegation_tree_impact(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<TerminatedTree, StoreError> {
        let exists = Statement::new(
            "SELECT id FROM delegation_edges WHERE zone_id = $1 AND id = $2",
            params![zone_id, id],
        )
        .must_change(not_found);
        preview(self, zone_id, id, exists, cascade_sql!(delegation_tree!())).await
    }

    async fn heartbeat_session(
        &self,
        zone_id: &str,
        id: &str,
        generation: i64,
        deadline_ms: i64,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        self.atomic(vec![
            Statement::new(
                "UPDATE sessions SET heartbeat_deadline_ms = $4, last_active_ms = $5
                 WHERE zone_id = $1 AND id = $2 AND lease_generation = $3 AND status = 'active'
                   AND lifecycle = 'service' AND heartbeat_deadline_ms > $5",
                params![zone_id, id, generation, deadline_ms, now],
            )
            .must_change(stale_lease),
        ])
        .await
        .map(|_| ())
    }

    async fn acquire_session_lease(
        &self,
        zone_id: &str,
        id: &str,
        deadline_ms: i64,
    ) -> Result<i64, StoreError> {
        let now = now_ms();
        let update = Statement::new(
            "UPDATE sessions SET lease_generation = lease_generation + 1, heartbeat_deadline_ms = $3,
                 last_active_ms = $4
             WHERE zone_id = $1 AND id = $2 AND status = 'active' AND lifecycle = 'service'
               AND heartbeat_deadline_ms > $4
             RETURNING lease_generation",
            params![zone_id, id, deadline_ms, now],
        )
        .must_change(stale_lease);
        let outcomes = self.atomic(vec![update]).await?;
        first_row(&outcomes)?.int(0)
    }

    async fn create_delegation_edge_with_receipt(
        &self,
        e: &DelegationEdge,
        outbox: &[OutboxMessage],
        receipt: Option<&IdempotencyReceipt>,
    ) -> Result<i64, StoreError> {
        let mut statements = vec![edge_insert(e), bump_epoch(&e.zone_id)];
        statements.extend(receipt.map(receipt_insert));
        let outcomes = self
            .atomic_with(statements, stamped_outbox(outbox, 1))
            .await?;
        epoch_of(&outcomes, 1)
    }

    async fn get_delegation_edge(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<DelegationEdge>, StoreError> {
        one(
            self,
            concat!(
                select_delegation_edges!(),
                " WHERE zone_id = $1 AND id = $2"
            ),
            params![zone_id, id],
            edge,
        )
        .await
    }

    async fn get_delegation_edges(
        &self,
        zone_id: &str,
        ids: &[&str],
    ) -> Result<Vec<DelegationEdge>, StoreError> {
        let ids =
            serde_json::to_string(ids).map_err(|error| StoreError::Query(error.to_string()))?;
        let sql = match self.dialect() {
            Dialect::Sqlite => concat!(
                select_delegation_edges!(),
                " WHERE zone_id = $1 AND id IN (SELECT value FROM json_each($2)) ORDER BY id"
            ),
            Dialect::Postgres => concat!(
                select_delegation_edges!(),
                " WHERE zone_id = $1 AND id IN (SELECT jsonb_array_elements_text($2::text::jsonb)) ORDER BY id"
            ),
        };
        all(self, sql, params![zone_id, ids], edge).await
    }

    async fn list_edges_from(
        &self,
        zone_id: &str,
        session_id: &str,
    ) -> Result<Vec<DelegationEdge>, StoreError> {
        all(
            self,
            concat!(
                select_delegation_edges!(),
                " WHERE zone_id = $1 AND source_session_id = $2 ORDER BY created_at_ms, id"
            ),
            params![zone_id, session_id],
            edge,
        )
        .await
    }

    async fn page_delegation_edges(
        &self,
        zone_id: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DelegationEdge>, StoreError> {
        all(
            self,
            concat!(
                select_delegation_edges!(),
                " WHERE zone_id = $1
                   AND (CAST($2 AS TEXT) IS NULL OR status = CAST($2 AS TEXT))
                   AND (CAST($3 AS TEXT) IS NULL OR id > CAST($3 AS TEXT))
                 ORDER BY id LIMIT CAST($4 AS BIGINT)"
            ),
            params![
                zone_id,
                status.map(str::to_owned),
                after.map(str::to_owned),
                limit
            ],
            edge,
        )
        .await
    }

    async fn list_edges_to(
        &self,
        zone_id: &str,
        session_id: &str,
    ) -> Result<Vec<DelegationEdge>, StoreError> {
        all(
            self,
            concat!(
                select_delegation_edges!(),
                " WHERE zone_id = $1 AND target_session_id = $2 ORDER BY created_at_ms, id"
            ),
            params![zone_id, session_id],
            edge,
        )
        .await
    }

    async fn revoke_delegation_edges(
        &self,
        zone_id: &str,
        ids: &[String],
        outbox: &[OutboxMessage],
    ) -> Result<(i64, u64), StoreError> {
        let now = now_ms();
        let mut first: Vec<Statement> = ids
            .iter()
            .map(|id| {
                Statement::new(
                    "UPDATE delegation_edges SET status = 'revoked', revoked_at_ms = $3
                     WHERE zone_id = $1 AND id = $2 AND status = 'active'",
                    params![zone_id, id.as_str(), now],
                )
            })
            .collect();
        let epoch_index = first.len();
        first.push(bump_epoch(zone_id));
        let outcomes = self
            .atomic_with(first, stamped_outbox(outbox, epoch_index))
            .await?;
        let revoked = outcomes
            .iter()
            .take(epoch_index)
            .map(|outcome| outcome.changed)
            .sum();
        Ok((epoch_of(&outcomes, epoch_index)?, revoked))
    }

    async fn delegation_context(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<DelegationContext>, StoreError> {
        const EDGE_COLUMNS: usize = 14;
        const SESSION_COLUMNS: usize = 17;
        let rows = self
            .remembered_rows(
                crate::db::TableGroup::Delegations,
                "SELECT e.id, e.zone_id, e.source_session_id, e.target_session_id, e.issuer_application_id,
                        e.receiver_application_id, e.parent_edge_id, e.resource_id, e.scopes, e.constraints,
                        e.status, e.expires_at_ms, e.created_at_ms, e.revoked_at_ms,
                        s.id, s.zone_id, s.application_id, s.parent_id, s.authority_record_id, s.status,
                        s.lifecycle, s.depth, s.labels, s.metadata, s.ttl_seconds, s.lease_generation,
                        s.heartbeat_deadline_ms, s.started_at_ms, s.last_active_ms, s.terminated_at_ms,
                        s.termination_reason,
                        t.id, t.zone_id, t.application_id, t.parent_id, t.authority_record_id, t.status,
                        t.lifecycle, t.depth, t.labels, t.metadata, t.ttl_seconds, t.lease_generation,
                        t.heartbeat_deadline_ms, t.started_at_ms, t.last_active_ms, t.terminated_at_ms,
                        t.termination_reason,
                        (SELECT g.epoch FROM zone_graph_epochs g WHERE g.zone_id = e.zone_id)
                 FROM delegation_edges e
                 LEFT JOIN sessions s ON s.zone_id = e.zone_id AND s.id = e.source_session_id
                 LEFT JOIN sessions t ON t.zone_id = e.zone_id AND t.id = e.target_session_id
                 WHERE e.zone_id = $1 AND e.id = $2",
                params![zone_id, id],
            )
            .await?;
        let Some(Row(mut values)) = rows.into_iter().next() else {
            return Ok(None);
        };
        if values.len() != EDGE_COLUMNS + 2 * SESSION_COLUMNS + 1 {
            return Err(StoreError::Corrupt(
                "delegation context has the wrong shape".into(),
            ));
        }
        let epoch_value = values.split_off(EDGE_COLUMNS + 2 * SESSION_COLUMNS);
        let target_values = values.split_off(EDGE_COLUMNS + SESSION_COLUMNS);
        let source_values = values.split_off(EDGE_COLUMNS);
        let joined = |values: Vec<Value>| -> Result<Option<Session>, StoreError> {
            if matches!(values.first(), None | Some(Value::Null)) {
                return Ok(None);
            }
            session(&Row(values)).map(Some)
        };
        let epoch = match epoch_value.first() {
            Some(Value::Int(epoch)) => *epoch,
            _ => 0,
        };
        Ok(Some(DelegationContext {
            edge: edge(&Row(values))?,
            source: joined(source_values)?,
            target: joined(target_values)?,
            epoch,
        }))
    }

    async fn zone_graph_epoch(&self, zone_id: &str) -> Result<i64, StoreError> {
        let rows = self
            .rows(
                "SELECT epoch FROM zone_graph_epochs WHERE zone_id = $1",
                params![zone_id],
            )
            .await?;
        rows.first().map_or(Ok(0), |row| row.int(0))
    }

    async fn create_approval_hold(
        &self,
        h: &ApprovalHold,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let insert = Statement::new(
            "INSERT INTO approval_holds (id, zone_id, session_id, principal_id, application_id, tier, approver_class,
                 binding_hash, metadata, created_at_ms, expires_at_ms, decision, decided_at_ms, decision_reason,
                 approver_id, consumed_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            params![
                h.id.as_str(),
                h.zone_id.as_str(),
                h.session_id.as_str(),
                h.principal_id.as_str(),
                h.application_id.as_str(),
                h.tier.as_str(),
                h.approver_class.as_str(),
                h.binding_hash.as_str(),
                h.metadata.as_str(),
                h.created_at_ms,
                h.expires_at_ms,
                h.decision.clone(),
                h.decided_at_ms,
                h.decision_reason.clone(),
                h.approver_id.clone(),
                h.consumed_at_ms,
            ],
        );
        self.atomic(with_outbox(insert, outbox)).await.map(|_| ())
    }

    async fn get_approval_hold(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<ApprovalHold>, StoreError> {
        one(
            self,
            concat!(select_approval_holds!(), " WHERE zone_id = $1 AND id = $2"),
            params![zone_id, id],
            hold,
        )
        .await
    }

    async fn approval_hold_by_id(&self, id: &str) -> Result<Option<ApprovalHold>, StoreError> {
        one(
            self,
            concat!(select_approval_holds!(), " WHERE id = $1"),
            params![id],
            hold,
        )
        .await
    }

    async fn list_approval_holds(&self, zone_id: &str) -> Result<Vec<ApprovalHold>, StoreError> {
        all(
            self,
            concat!(
                select_approval_holds!(),
                " WHERE zone_id = $1 ORDER BY created_at_ms, id"
            ),
            params![zone_id],
            hold,
        )
        .await
    }

    async fn list_pending_approval_holds(
        &self,
        zone_id: &str,
    ) -> Result<Vec<ApprovalHold>, StoreError> {
        all(
            self,
            concat!(
                select_approval_holds!(),
                " WHERE zone_id = $1 AND decision IS NULL AND expires_at_ms > $2
             ORDER BY created_at_ms, id"
            ),
            params![zone_id, now_ms()],
            hold,
        )
        .await
    }

    async fn decide_approval_hold(
        &self,
        zone_id: &str,
        id: &str,
        decision: &str,
        reason: &str,
        approver_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE approval_holds SET decision = $3, decided_at_ms = $4, decision_reason = $5, approver_id = $6
             WHERE zone_id = $1 AND id = $2 AND decision IS NULL AND expires_at_ms > $4",
            params![zone_id, id, decision, now_ms(), reason, approver_id],
        )
        .must_change(conflict_state);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn consume_approval_hold(
        &self,
        zone_id: &str,
        id: &str,
        record: &AuthorityRecord,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let mut statements = vec![
            Statement::new(
                "UPDATE approval_holds SET consumed_at_ms = $3, consumed_record_id = $4
                 WHERE zone_id = $1 AND id = $2 AND decision = 'approved' AND consumed_at_ms IS NULL
                   AND expires_at_ms > $3",
                params![zone_id, id, now, record.id.as_str()],
            )
            .must_change(conflict_state),
        ];
        statements.extend(authority_inserts(std::slice::from_ref(record)));
        statements.extend(crate::store::enqueue(outbox, now));
        self.atomic(statements).await.map(|_| ())
    }

    async fn put_idempotency_receipt(&self, r: &IdempotencyReceipt) -> Result<(), StoreError> {
        self.atomic(vec![receipt_insert(r)]).await.map(|_| ())
    }

    async fn get_idempotency_receipt(
        &self,
        operation: &str,
        zone_id: &str,
        scope_id: &str,
        key_digest: &str,
    ) -> Result<Option<IdempotencyReceipt>, StoreError> {
        one(
            self,
            "SELECT operation, zone_id, scope_id, key_digest, request_digest, resource_type, resource_id,
                    response_status, response_json, expires_at_ms
             FROM idempotency_receipts
             WHERE operation = $1 AND zone_id = $2 AND scope_id = $3 AND key_digest = $4 AND expires_at_ms > $5",
            params![operation, zone_id, scope_id, key_digest, now_ms()],
            receipt,
        )
        .await
    }

    async fn count_idempotency_receipts(
        &self,
        operation: &str,
        zone_id: &str,
        scope_id: &str,
    ) -> Result<i64, StoreError> {
        count(
            self,
            "SELECT COUNT(*) FROM idempotency_receipts
             WHERE operation = $1 AND zone_id = $2 AND scope_id = $3 AND expires_at_ms > $4",
            params![operation, zone_id, scope_id, now_ms()],
        )
        .await
    }

    async fn purge_idempotency_receipts(&self) -> Result<u64, StoreError> {
        self.change(
            "DELETE FROM idempotency_receipts WHERE expires_at_ms <= $1",
            params![now_ms()],
        )
        .await
    }
}
