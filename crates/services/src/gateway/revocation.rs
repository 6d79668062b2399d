//! The Gateway's view of what is revoked: authority records, sessions and delegation edges,
//! held in memory and fed two ways. `caracal.sessions.revoke` marks anchors within moments of
//! a revocation; a full snapshot from the store every 30 s catches whatever the stream missed
//! and drops resumed suspensions. A view that has not been confirmed against the store, or
//! whose stream has not been read, within the freshness window refuses everything (fail
//! closed): with the bus down a revocation would wait for the next snapshot unseen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use caracal_bus::signature::StreamKey;
use caracal_bus::{ConsumerConfig, Entry, Streams, stream_names::SESSIONS_REVOKE};
use caracal_store::{RevokedAnchors, Store, now_ms};

/// How long a mark is kept: far longer than any mandate lives.
const MARK_TTL_MS: i64 = 24 * 3600 * 1000;
/// How often the snapshot is reloaded.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(30);

/// A mandate's revocation anchors; an absent or empty one never matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Anchors {
    pub sid: String,
    pub root_sid: String,
    pub agent_session_id: Option<String>,
    pub delegation_edge_id: Option<String>,
}

#[derive(Default)]
struct Marks {
    records: HashMap<String, i64>,
    sessions: HashMap<String, i64>,
    edges: HashMap<String, i64>,
}

impl Marks {
    fn len(&self) -> usize {
        self.records.len() + self.sessions.len() + self.edges.len()
    }
}

/// The in-memory view one Gateway replica checks every request against.
#[derive(Default)]
pub struct RevocationView {
    marks: RwLock<Marks>,
    /// Bumped by every stream mark, so a snapshot applied concurrently keeps them.
    generation: AtomicU64,
    /// When the store last confirmed the view (ms); 0 before the first snapshot.
    confirmed_ms: AtomicI64,
    /// When `caracal.sessions.revoke` was last read successfully (ms); 0 before the first read.
    followed_ms: AtomicI64,
    /// Age of the last applied stream message when it was applied (ms).
    last_lag_ms: AtomicI64,
}

fn live(map: &HashMap<String, i64>, id: &str, now: i64) -> bool {
    !id.is_empty() && map.get(id).is_some_and(|until| *until > now)
}

impl RevocationView {
    pub fn is_revoked(&self, anchors: &Anchors) -> bool {
        let now = now_ms();
        let marks = self
            .marks
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        live(&marks.records, &anchors.sid, now)
            || live(&marks.records, &anchors.root_sid, now)
            || anchors
                .agent_session_id
                .as_deref()
                .is_some_and(|id| live(&marks.sessions, id, now))
            || anchors
                .delegation_edge_id
                .as_deref()
                .is_some_and(|id| live(&marks.edges, id, now))
    }

    /// Seconds since the store last confirmed the view; `None` before the first snapshot.
    pub fn age_seconds(&self, now: i64) -> Option<i64> {
        match self.confirmed_ms.load(Ordering::Acquire) {
            0 => None,
            at => Some((now - at).max(0) / 1000),
        }
    }

    /// Seconds since the stream was last read; `None` before the first read.
    pub fn stream_age_seconds(&self, now: i64) -> Option<i64> {
        match self.followed_ms.load(Ordering::Acquire) {
            0 => None,
            at => Some((now - at).max(0) / 1000),
        }
    }

    /// Records a successful read of `caracal.sessions.revoke` (messages or none).
    pub fn stream_followed(&self) {
        self.followed_ms.store(now_ms(), Ordering::Release);
    }

    /// Confirmed against the store and its stream read, both within `window` (never before
    /// the first snapshot and the first read).
    pub fn is_fresh(&self, window: Duration, now: i64) -> bool {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        [&self.confirmed_ms, &self.followed_ms]
            .iter()
            .all(|at| match at.load(Ordering::Acquire) {
                0 => false,
                at => now - at <= window_ms,
            })
    }

    pub fn propagation_lag_seconds(&self) -> f64 {
        self.last_lag_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    pub fn active(&self) -> usize {
        self.marks
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// The generation to pass to [`apply_snapshot`](Self::apply_snapshot) for a snapshot read
    /// from now on.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Replaces the view with `snapshot`, read after [`generation`](Self::generation) returned
    /// `read_at`. Marks the stream applied meanwhile are kept: the snapshot may predate them.
    pub fn apply_snapshot(&self, snapshot: RevokedAnchors, read_at: u64) {
        let now = now_ms();
        let until = now + MARK_TTL_MS;
        let to_map = |ids: Vec<String>| ids.into_iter().map(|id| (id, until)).collect();
        let mut fresh = Marks {
            records: to_map(snapshot.records),
            sessions: to_map(snapshot.sessions),
            edges: to_map(snapshot.edges),
        };
        let mut marks = self
            .marks
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.generation.load(Ordering::Acquire) != read_at {
            for (old, new) in [
                (&marks.records, &mut fresh.records),
                (&marks.sessions, &mut fresh.sessions),
                (&marks.edges, &mut fresh.edges),
            ] {
                for (id, until) in old {
                    if *until > now {
                        new.entry(id.clone()).or_insert(*until);
                    }
                }
            }
        }
        *marks = fresh;
        drop(marks);
        self.confirmed_ms.store(now, Ordering::Release);
    }

    /// Applies one `caracal.sessions.revoke` message; `false` if it names no anchor.
    pub fn apply_message(&self, entry: &Entry) -> bool {
        let field = |name: &str| {
            entry
                .fields
                .get(name)
                .map(String::as_str)
                .filter(|value| !value.is_empty())
        };
        let records = [field("session_id"), field("sid"), field("root_sid")];
        let session = field("agent_session_id");
        let edge = field("delegation_edge_id").or_else(|| field("edge_id"));
        if records.iter().all(Option::is_none) && session.is_none() && edge.is_none() {
            return false;
        }
        let now = now_ms();
        let until = now + MARK_TTL_MS;
        {
            let mut marks = self
                .marks
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for id in records.into_iter().flatten() {
                marks.records.insert(id.to_owned(), until);
            }
            if let Some(id) = session {
                marks.sessions.insert(id.to_owned(), until);
            }
            if let Some(id) = edge {
                marks.edges.insert(id.to_owned(), until);
            }
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        if let Ok((sent_ms, _)) = caracal_bus::parse_entry_id(&entry.id) {
            let lag = now - i64::try_from(sent_ms).unwrap_or(now);
            self.last_lag_ms.store(lag.max(0), Ordering::Relaxed);
        }
        true
    }

    /// Loads one snapshot from the store.
    pub async fn reload(&self, store: &dyn Store) -> Result<usize, caracal_store::StoreError> {
        let read_at = self.generation();
        let snapshot = store.revoked_anchors(now_ms() - MARK_TTL_MS).await?;
        let count = snapshot.records.len() + snapshot.sessions.len() + snapshot.edges.len();
        self.apply_snapshot(snapshot, read_at);
        Ok(count)
    }
}

/// Reloads the snapshot now and every [`SNAPSHOT_INTERVAL`] until `stop`.
pub async fn keep_confirmed(
    view: Arc<RevocationView>,
    store: Arc<dyn Store>,
    metrics: Arc<super::GatewayMetrics>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match view.reload(store.as_ref()).await {
            Ok(_) => {
                metrics.revocation_reloads.inc();
            }
            Err(error) => {
                metrics.revocation_reload_errors.inc();
                tracing::warn!(%error, "revocation snapshot reload failed; the view ages toward stale");
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// The consumer group of one Gateway replica on `caracal.sessions.revoke`.
pub fn group_name(replica: &str) -> String {
    format!("gateway-revocation:{replica}")
}

/// Applies `caracal.sessions.revoke` with this replica's own consumer group, so every replica
/// sees every message. A message naming no anchor stays pending and is dead-lettered after
/// five deliveries; forged ones are dead-lettered by the consumer.
pub async fn follow_stream(
    view: Arc<RevocationView>,
    streams: Arc<dyn Streams>,
    key: StreamKey,
    replica: String,
    metrics: Arc<super::GatewayMetrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let config = ConsumerConfig {
        stream: SESSIONS_REVOKE.to_owned(),
        group: group_name(&replica),
        consumer: format!("gateway-{replica}"),
        batch: 50,
        block: Duration::from_millis(500),
        reclaim_idle: Duration::from_secs(30),
        max_deliveries: 5,
        dedupe_window: 4096,
    };
    let consumer = loop {
        // The group starts at the stream's end: the snapshot covers everything before it.
        let started = match streams
            .ensure_group_at_end(&config.stream, &config.group)
            .await
        {
            Ok(()) => {
                caracal_bus::Consumer::start(Arc::clone(&streams), key.clone(), config.clone())
                    .await
            }
            Err(error) => Err(error),
        };
        match started {
            Ok(consumer) => {
                view.stream_followed();
                break consumer;
            }
            Err(error) => {
                tracing::warn!(%error, "revocation stream unavailable; retrying");
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        if *stop.borrow() {
            return;
        }
        let polled = tokio::select! {
            _ = stop.changed() => return,
            polled = consumer.poll() => polled,
        };
        match polled {
            Ok(entries) => {
                view.stream_followed();
                let applied: Vec<String> = entries
                    .iter()
                    .filter(|entry| view.apply_message(entry))
                    .map(|entry| entry.id.clone())
                    .collect();
                metrics.revocation_messages.inc_by(applied.len() as u64);
                if !applied.is_empty()
                    && let Err(error) = consumer.ack(&applied).await
                {
                    tracing::warn!(%error, "revocation acks failed; the messages come back");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "revocation stream read failed; retrying");
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
