//! Records the store reads and writes, shared by both backends.

use std::collections::BTreeMap;
use std::time::Duration;

use caracal_crypto::TokenDigest;

/// The KEK a deployment was initialised with: its id and check value, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekRecord {
    pub kek_id: String,
    pub kek_check: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenScope {
    Global,
    Zone(String),
}

#[derive(Debug, Clone)]
pub struct NewAdminToken {
    pub id: String,
    pub name: String,
    pub digest: TokenDigest,
    pub scope: TokenScope,
    /// Comma-separated capabilities (`read`, `write`, `approve`).
    pub capabilities: String,
    pub created_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenRecord {
    pub id: String,
    pub name: String,
    pub scope: TokenScope,
    pub capabilities: String,
    pub created_by: String,
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewZone {
    pub id: String,
    pub name: String,
    pub slug: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub created_at_ms: i64,
}

/// A message to publish once the transaction that wrote it commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    pub stream: String,
    pub fields: BTreeMap<String, String>,
    /// Lets consumers drop a message published twice (the dispatcher is at-least-once).
    pub dedupe_key: Option<String>,
}

/// An outbox row claimed by one dispatcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub stream: String,
    pub fields: BTreeMap<String, String>,
    pub dedupe_key: Option<String>,
    /// Failed publish attempts so far.
    pub attempts: u32,
}

/// What a failed publish did to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxFailure {
    /// It will be tried again after the backoff.
    Retrying,
    /// It reached the attempt bound and stays dead until an operator acts.
    Dead,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboxStats {
    pub pending: u64,
    pub dead: u64,
    /// Age of the oldest row still waiting to be published.
    pub oldest_pending_age: Option<Duration>,
}
