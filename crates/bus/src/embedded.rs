//! Streams in the embedded store: entries, groups and pending lists are SQLite rows (durable,
//! committed before `append` returns); blocked readers are woken in memory.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use caracal_store::{Deployment as _, SqliteStore};
use rusqlite::{OptionalExtension as _, params};
use tokio::sync::Notify;

use crate::registers::window_index;
use crate::{
    BusError, Entry, Fields, GroupInfo, PendingEntry, RateCounter, ReplayNamespace, ReplayRegistry,
    StreamInfo, Streams,
};

/// Counters kept in memory before stale windows are swept out.
const COUNTER_SWEEP_THRESHOLD: usize = 10_000;

pub struct EmbeddedBus {
    store: SqliteStore,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Rate counters live in memory: one process owns the embedded deployment, and losing the
    /// current window on restart only loosens a rate limit for one window.
    counters: Mutex<HashMap<String, (u64, u64)>>,
    /// The Gateway's one-shot `jti`s, claimed in memory (one process owns the deployment, and
    /// the Gateway's claim is on every governed call's path). They are lost with the process,
    /// so a claim is made only before `claimed_until`, an instant recorded durably in the
    /// store beforehand (`replay_memory`); the next process reads it as `forgotten_before` and
    /// its Gateway refuses every mandate issued before it
    /// (`ReplayRegistry::forgotten_before_ms`): no key claimed here can be claimed again,
    /// whatever the next process's clock says.
    gateway_jtis: Mutex<Remembered>,
    claimed_until: AtomicI64,
    forgotten_before: i64,
}

/// Claims kept in memory: each key as a 64-bit keyed hash, with its expiry, 16 bytes a claim
/// so a busy hour's mandates fit. Two keys with one hash can only refuse the second (fail
/// closed), never accept a replay.
struct Remembered {
    keys: HashMap<u64, i64>,
    hasher: std::collections::hash_map::RandomState,
    /// How many keys before the next sweep of expired ones.
    sweep_at: usize,
}

/// How far ahead a record of `claimed_until` reaches: one durable write a second at most.
const CLAIM_HORIZON_MS: i64 = 1_000;
const GATEWAY_JTI: ReplayNamespace = ReplayNamespace::GatewayJti;

impl EmbeddedBus {
    pub fn new(store: SqliteStore) -> EmbeddedBus {
        let (forgotten_before, remembered) = remembered_at_start(&store);
        EmbeddedBus {
            store,
            wakers: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
            gateway_jtis: Mutex::new(remembered),
            claimed_until: AtomicI64::new(forgotten_before),
            forgotten_before,
        }
    }

    /// Runs `delete_chunk` (at most [`TRIM_CHUNK`] rows) as writes of their own until one
    /// deletes fewer: one delete of everything would hold the store's writer for as long as it
    /// takes. The rows deleted in all.
    async fn delete_in_chunks(
        &self,
        delete_chunk: impl Fn(&mut rusqlite::Connection) -> Result<usize, rusqlite::Error>
        + Send
        + Sync
        + 'static,
    ) -> Result<u64, BusError> {
        let delete_chunk = Arc::new(delete_chunk);
        let mut total = 0;
        loop {
            let chunk = Arc::clone(&delete_chunk);
            let deleted = self.store.run(move |connection| chunk(connection)).await?;
            total += deleted as u64;
            if deleted < TRIM_CHUNK as usize {
                return Ok(total);
            }
        }
    }

    fn waker(&self, stream: &str) -> Arc<Notify> {
        let mut wakers = self
            .wakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(wakers.entry(stream.to_owned()).or_default())
    }

    /// Hands the group's next undelivered entries to `consumer`; `None` if the group is missing.
    async fn deliver(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Option<Vec<Entry>>, BusError> {
        let (stream, group, consumer) = (stream.to_owned(), group.to_owned(), consumer.to_owned());
        let limit = i64::try_from(count).unwrap_or(i64::MAX);
        let delivered = self
            .store
            .run(move |connection| {
                let last: Option<i64> = connection.prepare_cached("SELECT last_delivered FROM stream_groups WHERE stream = ?1 AND name = ?2")?.query_row(params![stream, group],
                        |row| row.get(0),
                    )
                    .optional()?;
                let Some(last) = last else {
                    return Ok(None);
                };
                let rows: Vec<(i64, i64, String)> = {
                    let mut statement = connection.prepare_cached(
                        "SELECT seq, appended_ms, fields FROM stream_entries
                         WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT CAST(?3 AS BIGINT)",
                    )?;
                    statement
                        .query_map(params![stream, last, limit], |row| {
                            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                        })?
                        .collect::<Result<_, _>>()?
                };
                let now = now_ms();
                for (seq, _, _) in &rows {
                    connection.prepare_cached("INSERT INTO stream_pending (stream, grp, seq, consumer, delivered_ms, deliveries)
                         VALUES (?1, ?2, ?3, ?4, ?5, 1)")?.execute(params![stream, group, seq, consumer, now],
                    )?;
                }
                if let Some((seq, _, _)) = rows.last() {
                    connection.prepare_cached("UPDATE stream_groups SET last_delivered = ?3 WHERE stream = ?1 AND name = ?2")?.execute(params![stream, group, seq],
                    )?;
                }
                Ok(Some(rows))
            })
            .await?;
        Ok(delivered.map(|rows| {
            rows.into_iter()
                .map(|(seq, appended_ms, fields)| entry(seq, appended_ms, &fields, 1))
                .collect()
        }))
    }
}

/// What the previous process left: its `claimed_until` (every key it claimed in memory was
/// issued before it), and the keys an earlier release claimed in the store, still unexpired.
/// A store that cannot be read leaves nothing to trust: everything issued until now is refused.
fn remembered_at_start(store: &SqliteStore) -> (i64, Remembered) {
    let now = now_ms();
    let read = store.run_blocking(|connection| {
        let until: Option<i64> = connection
            .query_row(
                "SELECT claimed_until_ms FROM replay_memory WHERE namespace = ?1",
                [GATEWAY_JTI.as_str()],
                |row| row.get(0),
            )
            .optional()?;
        let mut statement = connection.prepare(
            "SELECT key, expires_ms FROM replay_keys WHERE namespace = ?1 AND expires_ms > ?2",
        )?;
        let keys = statement
            .query_map(params![GATEWAY_JTI.as_str(), now], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok((until.unwrap_or(0), keys))
    });
    let (forgotten_before, stored) = read.unwrap_or_else(|error| {
        tracing::error!(%error, "the Gateway's replay memory could not be read: refusing every mandate issued before now");
        (now, Vec::new())
    });
    let hasher = std::collections::hash_map::RandomState::new();
    let keys: HashMap<u64, i64> = stored
        .iter()
        .map(|(key, expires)| (hasher.hash_one(key.as_str()), *expires))
        .collect();
    if forgotten_before > now {
        tracing::warn!(
            forgotten_before,
            now,
            "the clock is behind the previous process's replay claims: gateway mandates are refused until it catches up"
        );
    }
    let sweep_at = (keys.len() * 2).max(COUNTER_SWEEP_THRESHOLD);
    let remembered = Remembered {
        keys,
        hasher,
        sweep_at,
    };
    (forgotten_before, remembered)
}

impl EmbeddedBus {
    /// Claims a Gateway `jti` in memory, first recording durably that claims reach this far.
    async fn claim_in_memory(&self, key: &str, ttl: Duration) -> Result<bool, BusError> {
        let now = now_ms();
        if now >= self.claimed_until.load(Ordering::Acquire) {
            let until = now.saturating_add(CLAIM_HORIZON_MS);
            self.store
                .run(move |connection| {
                    connection
                        .prepare_cached(
                            "INSERT INTO replay_memory (namespace, claimed_until_ms) VALUES (?1, ?2)
                             ON CONFLICT (namespace) DO UPDATE
                             SET claimed_until_ms = MAX(claimed_until_ms, excluded.claimed_until_ms)",
                        )?
                        .execute(params![GATEWAY_JTI.as_str(), until])
                })
                .await?;
            self.claimed_until.fetch_max(until, Ordering::AcqRel);
        }
        let mut guard = self
            .gateway_jtis
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let remembered = &mut *guard;
        if remembered.keys.len() >= remembered.sweep_at {
            remembered.keys.retain(|_, expires| *expires > now);
            remembered.sweep_at = (remembered.keys.len() * 2).max(COUNTER_SWEEP_THRESHOLD);
        }
        let expires = remembered
            .keys
            .entry(remembered.hasher.hash_one(key))
            .or_insert(i64::MIN);
        if *expires > now {
            return Ok(false);
        }
        *expires = now.saturating_add(millis(ttl));
        Ok(true)
    }
}

#[async_trait::async_trait]
impl ReplayRegistry for EmbeddedBus {
    fn forgotten_before_ms(&self, namespace: ReplayNamespace) -> i64 {
        if namespace == GATEWAY_JTI {
            self.forgotten_before
        } else {
            0
        }
    }

    async fn claim_once(
        &self,
        namespace: ReplayNamespace,
        key: &str,
        ttl: Duration,
    ) -> Result<bool, BusError> {
        if namespace == GATEWAY_JTI {
            return self.claim_in_memory(key, ttl).await;
        }
        let key = key.to_owned();
        let claimed = self
            .store
            // Committed without waiting for the disk: a claim survives a process crash, and
            // only a power cut can lose the last ones, as with Redis's once-a-second AOF.
            .run_relaxed(move |connection| {
                let now = now_ms();
                // A key whose TTL has passed may be claimed again, as in Redis.
                connection
                    .prepare_cached(
                        "INSERT INTO replay_keys (namespace, key, expires_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (namespace, key) DO UPDATE SET expires_ms = excluded.expires_ms
                     WHERE replay_keys.expires_ms <= ?4",
                    )?
                    .execute(params![
                        namespace.as_str(),
                        key,
                        now.saturating_add(millis(ttl)),
                        now
                    ])
            })
            .await?;
        Ok(claimed == 1)
    }

    async fn purge_expired(&self) -> Result<u64, BusError> {
        // A busy minute expires a hundred thousand keys.
        let now = now_ms();
        self.delete_in_chunks(move |connection| {
            connection
                .prepare_cached(
                    "DELETE FROM replay_keys WHERE (namespace, key) IN
                     (SELECT namespace, key FROM replay_keys WHERE expires_ms <= ?1
                      ORDER BY expires_ms LIMIT CAST(?2 AS BIGINT))",
                )?
                .execute(params![now, TRIM_CHUNK])
        })
        .await
    }
}

#[async_trait::async_trait]
impl RateCounter for EmbeddedBus {
    async fn hit(&self, bucket: &str, window: Duration) -> Result<u64, BusError> {
        let current = window_index(u64::try_from(now_ms()).unwrap_or(0), window);
        let mut counters = self
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if counters.len() > COUNTER_SWEEP_THRESHOLD {
            counters.retain(|_, (index, _)| *index == current);
        }
        let counter = counters.entry(bucket.to_owned()).or_insert((current, 0));
        if counter.0 != current {
            *counter = (current, 0);
        }
        counter.1 += 1;
        Ok(counter.1)
    }
}

/// Stream entries (or expired replay keys) one trimming write deletes at most.
const TRIM_CHUNK: i64 = 2_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn entry_id(seq: i64, appended_ms: i64) -> String {
    format!("{appended_ms}-{seq}")
}

/// The sequence number inside an id; `None` for ids this backend never issued.
fn seq_of(id: &str) -> Option<i64> {
    id.split_once('-').and_then(|(_, seq)| seq.parse().ok())
}

/// A stored entry. One whose fields cannot be read is handed out with none, as Redis does with
/// fields it cannot parse: it then fails its signature check and is dead-lettered, instead of
/// failing every read of its batch for ever.
fn entry(seq: i64, appended_ms: i64, fields: &str, deliveries: u64) -> Entry {
    let fields: Fields = serde_json::from_str(fields).unwrap_or_else(|error| {
        tracing::error!(seq, %error, "unreadable stream entry");
        Fields::new()
    });
    Entry {
        id: entry_id(seq, appended_ms),
        fields,
        deliveries,
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn age(now: i64, then: i64) -> Duration {
    Duration::from_millis(u64::try_from(now.saturating_sub(then)).unwrap_or(0))
}

#[async_trait::async_trait]
impl Streams for EmbeddedBus {
    async fn append(&self, stream: &str, fields: &Fields) -> Result<String, BusError> {
        let mut ids = self
            .append_many(stream, std::slice::from_ref(fields))
            .await?;
        ids.pop()
            .ok_or_else(|| BusError::Protocol("append returned no id".into()))
    }

    async fn append_many(&self, stream: &str, entries: &[Fields]) -> Result<Vec<String>, BusError> {
        let texts = entries
            .iter()
            .map(|fields| {
                serde_json::to_string(fields).map_err(|error| BusError::Protocol(error.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let name = stream.to_owned();
        let ids = self
            .store
            // One job, so one commit (one fsync) for the whole batch; a failure keeps none.
            .run(move |connection| {
                let appended_ms = now_ms();
                let mut ids = Vec::with_capacity(texts.len());
                for text in texts {
                    let seq: i64 = connection.prepare_cached("INSERT INTO streams (name, last_seq) VALUES (?1, 1)
                         ON CONFLICT (name) DO UPDATE SET last_seq = last_seq + 1
                         RETURNING last_seq")?.query_row([&name],
                        |row| row.get(0),
                    )?;
                    connection.prepare_cached("INSERT INTO stream_entries (stream, seq, appended_ms, fields) VALUES (?1, ?2, ?3, ?4)")?.execute(params![name, seq, appended_ms, text],
                    )?;
                    ids.push(entry_id(seq, appended_ms));
                }
                Ok(ids)
            })
            .await?;
        self.waker(stream).notify_waiters();
        Ok(ids)
    }

    async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), BusError> {
        let (stream, group) = (stream.to_owned(), group.to_owned());
        self.store
            .run(move |connection| {
                connection.prepare_cached("INSERT INTO stream_groups (stream, name, last_delivered) VALUES (?1, ?2, 0)
                     ON CONFLICT (stream, name) DO NOTHING")?.execute(params![stream, group],
                )
            })
            .await?;
        Ok(())
    }

    async fn ensure_group_at_end(&self, stream: &str, group: &str) -> Result<(), BusError> {
        let (stream, group) = (stream.to_owned(), group.to_owned());
        self.store
            .run(move |connection| {
                connection
                    .prepare_cached(
                        "INSERT INTO stream_groups (stream, name, last_delivered)
                     VALUES (?1, ?2, COALESCE((SELECT last_seq FROM streams WHERE name = ?1), 0))
                     ON CONFLICT (stream, name) DO NOTHING",
                    )?
                    .execute(params![stream, group])
            })
            .await?;
        Ok(())
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, BusError> {
        let deadline = Instant::now() + block;
        let waker = self.waker(stream);
        loop {
            // Registered before looking, so an append between the look and the wait still wakes us.
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let entries = self
                .deliver(stream, group, consumer, count)
                .await?
                .ok_or_else(|| BusError::NoGroup {
                    stream: stream.to_owned(),
                    group: group.to_owned(),
                })?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if !entries.is_empty() || remaining.is_zero() {
                return Ok(entries);
            }
            let _ = tokio::time::timeout(remaining, notified).await;
        }
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64, BusError> {
        let seqs: Vec<i64> = ids.iter().filter_map(|id| seq_of(id)).collect();
        let (stream, group) = (stream.to_owned(), group.to_owned());
        let acknowledged = self
            .store
            .run(move |connection| {
                let mut acknowledged = 0;
                for seq in seqs {
                    acknowledged += connection.prepare_cached("DELETE FROM stream_pending WHERE stream = ?1 AND grp = ?2 AND seq = ?3")?.execute(params![stream, group, seq],
                    )?;
                }
                Ok(acknowledged)
            })
            .await?;
        Ok(acknowledged as u64)
    }

    async fn pending(
        &self,
        stream: &str,
        group: &str,
        count: usize,
    ) -> Result<Vec<PendingEntry>, BusError> {
        let (stream, group) = (stream.to_owned(), group.to_owned());
        let limit = i64::try_from(count).unwrap_or(i64::MAX);
        let rows: Vec<(i64, i64, String, i64, i64)> = self
            .store
            .run(move |connection| {
                let mut statement = connection.prepare_cached(
                    "SELECT p.seq, COALESCE(e.appended_ms, 0), p.consumer, p.delivered_ms, p.deliveries
                     FROM stream_pending p
                     LEFT JOIN stream_entries e ON e.stream = p.stream AND e.seq = p.seq
                     WHERE p.stream = ?1 AND p.grp = ?2 ORDER BY p.seq LIMIT CAST(?3 AS BIGINT)",
                )?;
                statement
                    .query_map(params![stream, group, limit], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
                    })?
                    .collect()
            })
            .await?;
        let now = now_ms();
        Ok(rows
            .into_iter()
            .map(
                |(seq, appended_ms, consumer, delivered_ms, deliveries)| PendingEntry {
                    id: entry_id(seq, appended_ms),
                    consumer,
                    idle: age(now, delivered_ms),
                    deliveries: u64::try_from(deliveries).unwrap_or(0),
                },
            )
            .collect())
    }

    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        let (stream, group, consumer) = (stream.to_owned(), group.to_owned(), consumer.to_owned());
        let limit = i64::try_from(count).unwrap_or(i64::MAX);
        let min_idle = millis(min_idle);
        let claimed: Vec<(i64, i64, String, i64)> = self
            .store
            .run(move |connection| {
                let now = now_ms();
                let idle: Vec<(i64, i64, Option<(i64, String)>)> = {
                    let mut statement = connection.prepare_cached(
                        "SELECT p.seq, p.deliveries, e.appended_ms, e.fields
                         FROM stream_pending p
                         LEFT JOIN stream_entries e ON e.stream = p.stream AND e.seq = p.seq
                         WHERE p.stream = ?1 AND p.grp = ?2 AND p.delivered_ms <= ?3
                         ORDER BY p.seq LIMIT CAST(?4 AS BIGINT)",
                    )?;
                    statement
                        .query_map(params![stream, group, now.saturating_sub(min_idle), limit], |row| {
                            let appended: Option<i64> = row.get(2)?;
                            let fields: Option<String> = row.get(3)?;
                            Ok((row.get(0)?, row.get(1)?, appended.zip(fields)))
                        })?
                        .collect::<Result<_, _>>()?
                };
                let mut claimed = Vec::with_capacity(idle.len());
                for (seq, deliveries, stored) in idle {
                    match stored {
                        Some((appended_ms, fields)) => {
                            connection.prepare_cached("UPDATE stream_pending SET consumer = ?4, delivered_ms = ?5, deliveries = deliveries + 1
                                 WHERE stream = ?1 AND grp = ?2 AND seq = ?3")?.execute(params![stream, group, seq, consumer, now],
                            )?;
                            claimed.push((seq, appended_ms, fields, deliveries + 1));
                        }
                        None => {
                            connection.prepare_cached("DELETE FROM stream_pending WHERE stream = ?1 AND grp = ?2 AND seq = ?3")?.execute(params![stream, group, seq],
                            )?;
                        }
                    }
                }
                Ok(claimed)
            })
            .await?;
        Ok(claimed
            .into_iter()
            .map(|(seq, appended_ms, fields, deliveries)| {
                entry(
                    seq,
                    appended_ms,
                    &fields,
                    u64::try_from(deliveries).unwrap_or(0),
                )
            })
            .collect())
    }

    async fn info(&self, stream: &str) -> Result<StreamInfo, BusError> {
        let stream = stream.to_owned();
        let (length, groups) = self
            .store
            .run(move |connection| {
                let length: i64 = connection.prepare_cached("SELECT COUNT(*) FROM stream_entries WHERE stream = ?1")?.query_row([&stream],
                    |row| row.get(0),
                )?;
                let mut statement = connection.prepare_cached(
                    "SELECT g.name,
                            (SELECT COUNT(*) FROM stream_pending p WHERE p.stream = g.stream AND p.grp = g.name),
                            (SELECT COUNT(*) FROM stream_entries e WHERE e.stream = g.stream AND e.seq > g.last_delivered),
                            (SELECT MIN(e.appended_ms) FROM stream_pending p
                               JOIN stream_entries e ON e.stream = p.stream AND e.seq = p.seq
                              WHERE p.stream = g.stream AND p.grp = g.name)
                     FROM stream_groups g WHERE g.stream = ?1 ORDER BY g.name",
                )?;
                let groups: Vec<(String, i64, i64, Option<i64>)> = statement
                    .query_map([&stream], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?
                    .collect::<Result<_, _>>()?;
                Ok((length, groups))
            })
            .await?;
        let now = now_ms();
        Ok(StreamInfo {
            length: u64::try_from(length).unwrap_or(0),
            groups: groups
                .into_iter()
                .map(|(name, pending, lag, oldest)| GroupInfo {
                    name,
                    pending: u64::try_from(pending).unwrap_or(0),
                    lag: u64::try_from(lag).unwrap_or(0),
                    oldest_pending_age: oldest.map(|appended_ms| age(now, appended_ms)),
                })
                .collect(),
        })
    }

    async fn range(
        &self,
        stream: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        let after = match after {
            Some(id) => i64::try_from(crate::parse_entry_id(id)?.1)
                .map_err(|_| BusError::InvalidEntryId(id.to_owned()))?,
            None => 0,
        };
        let (stream, limit) = (stream.to_owned(), i64::try_from(count).unwrap_or(i64::MAX));
        let rows: Vec<(i64, i64, String)> = self
            .store
            .run(move |connection| {
                let mut statement = connection.prepare_cached(
                    "SELECT seq, appended_ms, fields FROM stream_entries
                     WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT CAST(?3 AS BIGINT)",
                )?;
                statement
                    .query_map(params![stream, after, limit], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })?
                    .collect()
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, appended_ms, fields)| entry(seq, appended_ms, &fields, 0))
            .collect())
    }

    async fn delete(&self, stream: &str, ids: &[String]) -> Result<u64, BusError> {
        let seqs: Vec<i64> = ids.iter().filter_map(|id| seq_of(id)).collect();
        let stream = stream.to_owned();
        let deleted = self
            .store
            .run(move |connection| {
                let mut deleted = 0;
                for seq in seqs {
                    deleted += connection
                        .prepare_cached(
                            "DELETE FROM stream_entries WHERE stream = ?1 AND seq = ?2",
                        )?
                        .execute(params![stream, seq])?;
                }
                Ok(deleted)
            })
            .await?;
        Ok(deleted as u64)
    }

    async fn trim_consumed(&self, stream: &str) -> Result<u64, BusError> {
        // A minute of audit events is hundreds of thousands of rows.
        let stream = stream.to_owned();
        self.delete_in_chunks(move |connection| {
            // Per group, everything at or below this seq is delivered and acknowledged.
            let floor: Option<i64> = connection.prepare_cached("SELECT MIN(MIN(g.last_delivered,
                                COALESCE((SELECT MIN(p.seq) - 1 FROM stream_pending p
                                          WHERE p.stream = g.stream AND p.grp = g.name), g.last_delivered)))
                 FROM stream_groups g WHERE g.stream = ?1")?.query_row([&stream],
                |row| row.get(0),
            )?;
            let Some(floor) = floor else {
                return Ok(0);
            };
            connection
                .prepare_cached(
                    "DELETE FROM stream_entries WHERE stream = ?1 AND seq <= MIN(?2,
                     (SELECT MIN(seq) FROM stream_entries WHERE stream = ?1) + ?3 - 1)",
                )?
                .execute(params![stream, floor, TRIM_CHUNK])
        })
        .await
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(self.store.ping().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::StreamKey;
    use crate::{Consumer, ConsumerConfig, Producer};

    /// Gateway `jti`s are claimed in memory; the next process (a new bus on the same store)
    /// forgets them, so it names an instant before which every mandate is refused, at or after
    /// every claim made here, and keys an earlier release claimed in the store stay claimed.
    #[tokio::test]
    async fn gateway_claims_in_memory_leave_the_next_process_a_bound_to_refuse_before() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("bus.db")).unwrap();
        let bus = EmbeddedBus::new(store.clone());
        assert_eq!(
            bus.forgotten_before_ms(GATEWAY_JTI),
            0,
            "a new deployment forgot nothing"
        );
        let ttl = Duration::from_secs(60);
        let before = now_ms();
        assert!(bus.claim_once(GATEWAY_JTI, "a", ttl).await.unwrap());
        assert!(!bus.claim_once(GATEWAY_JTI, "a", ttl).await.unwrap());
        let last = now_ms();
        assert!(
            bus.claim_once(ReplayNamespace::Jti, "a", ttl)
                .await
                .unwrap()
        );
        drop(bus);

        // An earlier release's claim, in the store.
        store
            .run(move |connection| {
                connection.execute(
                    "INSERT INTO replay_keys (namespace, key, expires_ms) VALUES ('gateway_jti', 'old', ?1)",
                    [now_ms() + 60_000],
                )
            })
            .await
            .unwrap();
        let next = EmbeddedBus::new(store.clone());
        let bound = next.forgotten_before_ms(GATEWAY_JTI);
        assert!(bound > last && bound >= before, "{bound} vs {last}");
        assert_eq!(
            next.forgotten_before_ms(ReplayNamespace::Jti),
            0,
            "kept in the store"
        );
        assert!(
            !next
                .claim_once(ReplayNamespace::Jti, "a", ttl)
                .await
                .unwrap()
        );
        assert!(!next.claim_once(GATEWAY_JTI, "old", ttl).await.unwrap());
        assert!(next.claim_once(GATEWAY_JTI, "new", ttl).await.unwrap());
        // Claims go on past the first bound, each bound recorded before it is used.
        let until: i64 = store
            .run_blocking(|connection| {
                connection.query_row("SELECT claimed_until_ms FROM replay_memory", [], |row| {
                    row.get(0)
                })
            })
            .unwrap();
        assert!(until >= bound);
    }

    #[tokio::test]
    async fn expired_replay_keys_are_purged_in_chunks_and_live_ones_stay() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("bus.db")).unwrap();
        let bus = EmbeddedBus::new(store.clone());
        store
            .run(|connection| {
                let mut insert = connection.prepare(
                    "INSERT INTO replay_keys (namespace, key, expires_ms) VALUES ('jti', ?1, ?2)",
                )?;
                for n in 0..4_500 {
                    insert.execute(params![format!("old-{n}"), 1])?;
                }
                Ok(())
            })
            .await
            .unwrap();
        assert!(
            bus.claim_once(ReplayNamespace::Jti, "live", Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert_eq!(bus.purge_expired().await.unwrap(), 4_500);
        assert!(
            !bus.claim_once(ReplayNamespace::Jti, "live", Duration::from_secs(60))
                .await
                .unwrap(),
            "a live key survives the purge"
        );
        assert!(
            bus.claim_once(ReplayNamespace::Jti, "old-7", Duration::from_secs(60))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn an_unreadable_stored_entry_is_dead_lettered_not_wedging_its_group() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("bus.db")).unwrap();
        let bus = Arc::new(EmbeddedBus::new(store.clone()));
        let key = StreamKey::new(b"k");
        let producer = Producer::new(bus.clone(), key.clone());
        for n in 0..3 {
            let fields = Fields::from([("n".to_owned(), n.to_string())]);
            producer.publish("s", fields).await.unwrap();
        }
        store
            .run(|connection| {
                connection
                    .prepare_cached("UPDATE stream_entries SET fields = '{not json' WHERE seq = 2")?
                    .execute([])
            })
            .await
            .unwrap();
        let consumer = Consumer::start(
            bus.clone(),
            key,
            ConsumerConfig {
                stream: "s".into(),
                group: "g".into(),
                consumer: "c".into(),
                batch: 10,
                block: Duration::ZERO,
                reclaim_idle: Duration::from_secs(60),
                max_deliveries: 3,
                dedupe_window: 16,
            },
        )
        .await
        .unwrap();
        let delivered = consumer.poll().await.unwrap();
        let numbers: Vec<&str> = delivered
            .iter()
            .map(|entry| entry.fields["n"].as_str())
            .collect();
        assert_eq!(numbers, ["0", "2"]);
        let dead = bus
            .range(&crate::dead_letter_stream("s"), None, 10)
            .await
            .unwrap();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].fields["source_id"].ends_with("-2"), "{dead:?}");
        assert_eq!(dead[0].fields["payload"], "{}");
    }
}
