//! Everything that crosses between roles and replicas without being the system of record.
//!
//! - [`Streams`]: append-only streams with consumer groups, the transport of revocations,
//!   invalidations and audit events.
//! - [`ReplayRegistry`] (single-use JTIs and gateway nonces) and [`RateCounter`] (fixed-window
//!   rate limits).
//!
//! Two backends implement all three with the same semantics, checked by one conformance suite
//! (`tests/conformance.rs`): [`EmbeddedBus`] (rows in the SQLite store, wake-ups and counters in
//! memory) and [`RedisBus`] (Redis Streams, `SET NX PX`, `INCR`).
//! - [`signature`]: the `_sig` HMAC every message carries, in the reference's format.
//! - [`Producer`] and [`Consumer`]: signing on the way in; on the way out, signature checks,
//!   reclaim of entries another consumer left pending, and the dead-letter stream
//!   (`<stream>.dead`) after a bounded number of deliveries.
//!
//! Entries are never trimmed while a group still has to read or acknowledge them.

mod consumer;
mod embedded;
mod redis_bus;
mod registers;
pub mod signature;
pub mod stream_names;

use std::collections::BTreeMap;
use std::time::Duration;

pub use consumer::{Consumer, ConsumerConfig, ConsumerStats, Producer};
pub use embedded::EmbeddedBus;
pub use redis_bus::RedisBus;
pub use registers::{RateCounter, ReplayNamespace, ReplayRegistry};

/// The fields of one message. Values are strings; the map keeps them sorted by name, which is
/// also the order the signature covers.
pub type Fields = BTreeMap<String, String>;

/// One entry read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub fields: Fields,
    /// How many times this entry has been handed to a consumer of the group, this time included.
    pub deliveries: u64,
}

/// An entry delivered to a consumer and not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEntry {
    pub id: String,
    pub consumer: String,
    pub idle: Duration,
    pub deliveries: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    /// Delivered, not acknowledged.
    pub pending: u64,
    /// Appended, not yet delivered to this group.
    pub lag: u64,
    /// Age (since append) of the oldest pending entry.
    pub oldest_pending_age: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub length: u64,
    pub groups: Vec<GroupInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("bus protocol error: {0}")]
    Protocol(String),
    #[error("`{0}` is not a stream entry id")]
    InvalidEntryId(String),
    #[error("consumer group `{group}` does not exist on stream `{stream}`")]
    NoGroup { stream: String, group: String },
    #[error(transparent)]
    Store(#[from] caracal_store::StoreError),
}

/// Checks a caller-supplied entry id has the one shape both backends use, `<ms>-<seq>` in
/// decimal digits, so a bad id is the caller's error on every backend, never a backend failure.
pub fn parse_entry_id(id: &str) -> Result<(u64, u64), BusError> {
    let number = |digits: &str| {
        (!digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())
            .flatten()
    };
    id.split_once('-')
        .and_then(|(ms, seq)| Some((number(ms)?, number(seq)?)))
        .ok_or_else(|| BusError::InvalidEntryId(id.to_owned()))
}

/// Streams with consumer groups, in the semantics of Redis Streams.
#[async_trait::async_trait]
pub trait Streams: Send + Sync {
    /// Appends an entry and returns its id. Ids grow within a stream.
    async fn append(&self, stream: &str, fields: &Fields) -> Result<String, BusError>;

    /// Appends entries in order, all or none where the backend allows (one transaction on
    /// SQLite; one pipelined round trip on Redis), and returns their ids.
    async fn append_many(&self, stream: &str, entries: &[Fields]) -> Result<Vec<String>, BusError>;

    /// Creates `group` reading `stream` from its beginning; an existing group is kept as is.
    async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), BusError>;

    /// Creates `group` reading only what is appended from now on (for a reader that loads the
    /// past another way); an existing group is kept as is.
    async fn ensure_group_at_end(&self, stream: &str, group: &str) -> Result<(), BusError>;

    /// Delivers up to `count` entries the group has not seen yet to `consumer`, waiting up to
    /// `block` for the first one. Delivered entries stay pending until acknowledged.
    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, BusError>;

    /// Acknowledges entries; returns how many were pending.
    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64, BusError>;

    /// Up to `count` pending entries of the group, oldest first.
    async fn pending(
        &self,
        stream: &str,
        group: &str,
        count: usize,
    ) -> Result<Vec<PendingEntry>, BusError>;

    /// Moves up to `count` entries pending for at least `min_idle` (with any consumer) to
    /// `consumer` and returns them with their delivery count raised by one. Entries deleted
    /// from the stream meanwhile are dropped from the pending list.
    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, BusError>;

    async fn info(&self, stream: &str) -> Result<StreamInfo, BusError>;

    /// Up to `count` entries after `after` (from the start if `None`), oldest first, without
    /// delivering them to any group. `deliveries` is 0.
    async fn range(
        &self,
        stream: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<Entry>, BusError>;

    /// Deletes entries by id (an operator action, e.g. after a dead letter is replayed);
    /// returns how many existed.
    async fn delete(&self, stream: &str, ids: &[String]) -> Result<u64, BusError>;

    /// Deletes entries that every group has both read and acknowledged; returns how many.
    /// A stream with no group keeps everything.
    async fn trim_consumed(&self, stream: &str) -> Result<u64, BusError>;

    /// A round trip to the backend: the readiness probe.
    async fn ping(&self) -> Result<(), BusError>;
}

/// `<stream>.dead`: where a consumer moves entries it will not process.
pub fn dead_letter_stream(stream: &str) -> String {
    format!("{stream}.dead")
}

/// The id of the last entry of `stream`, for a reader that follows it from its end (`None`:
/// empty, or unreadable now — the reader then starts from the beginning of what it can read).
pub async fn last_entry_id(streams: &dyn Streams, stream: &str) -> Option<String> {
    let mut last: Option<String> = None;
    while let Ok(entries) = streams.range(stream, last.as_deref(), 1024).await {
        match entries.last() {
            Some(entry) => last = Some(entry.id.clone()),
            None => break,
        }
    }
    last
}
