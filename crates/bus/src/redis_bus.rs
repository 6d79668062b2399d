//! Streams on Redis (≥ 6.2, Streams with consumer groups). Ordinary commands share one
//! multiplexed, self-reconnecting connection; blocking reads each take a dedicated connection,
//! because a blocked command would hold up every other command pipelined behind it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{RedisError, Value};

use crate::registers::window_index;
use crate::{
    BusError, Entry, Fields, GroupInfo, PendingEntry, RateCounter, ReplayNamespace, ReplayRegistry,
    StreamInfo, Streams,
};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisBus {
    client: redis::Client,
    shared: ConnectionManager,
    idle_blocking: Mutex<Vec<MultiplexedConnection>>,
}

fn bus_error(error: RedisError) -> BusError {
    if error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
    {
        BusError::Unavailable(error.to_string())
    } else {
        BusError::Protocol(error.to_string())
    }
}

impl RedisBus {
    /// `XGROUP CREATE stream group <start> MKSTREAM`; an existing group is kept.
    async fn create_group(&self, stream: &str, group: &str, start: &str) -> Result<(), BusError> {
        let mut connection = self.shared.clone();
        let result: Result<Value, RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async(&mut connection)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            Err(error) => Err(bus_error(error)),
        }
    }

    /// Connects to `url` (`redis://…`). Fails if the server cannot be reached now; later
    /// outages are retried with backoff by the connection manager.
    pub async fn connect(url: &str) -> Result<RedisBus, BusError> {
        let client = redis::Client::open(url).map_err(bus_error)?;
        // One quick attempt first: at start an unreachable server is an error now, not after
        // the manager's reconnect backoff has run its course.
        let probe_config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)));
        let mut probe = client
            .get_multiplexed_async_connection_with_config(&probe_config)
            .await
            .map_err(bus_error)?;
        let _: Value = redis::cmd("PING")
            .query_async(&mut probe)
            .await
            .map_err(bus_error)?;
        // While Redis is down a command fails within a few hundred milliseconds instead of
        // riding out a long reconnect schedule: callers have somewhere better to go (the
        // evidence replay file, the outbox retry) and must not stall a request.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let shared = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(bus_error)?;
        Ok(RedisBus {
            client,
            shared,
            idle_blocking: Mutex::new(Vec::new()),
        })
    }

    async fn query(&self, command: &redis::Cmd) -> Result<Value, BusError> {
        let mut connection = self.shared.clone();
        command
            .query_async(&mut connection)
            .await
            .map_err(bus_error)
    }

    async fn blocking_connection(&self) -> Result<MultiplexedConnection, BusError> {
        let reused = self
            .idle_blocking
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        match reused {
            Some(connection) => Ok(connection),
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(None);
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(bus_error)
            }
        }
    }

    fn return_blocking_connection(&self, connection: MultiplexedConnection) {
        self.idle_blocking
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(connection);
    }

    async fn groups(&self, stream: &str) -> Result<Vec<HashMap<String, Value>>, BusError> {
        let reply = match self
            .query(redis::cmd("XINFO").arg("GROUPS").arg(stream))
            .await
        {
            Ok(reply) => reply,
            // XINFO on a missing key is an error; a missing stream simply has no groups.
            Err(BusError::Protocol(message)) if message.contains("no such key") => {
                return Ok(Vec::new());
            }
            Err(error) => return Err(error),
        };
        Ok(items(&reply).iter().map(pairs).collect())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(number) => Some(number.to_string()),
        _ => None,
    }
}

fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(number) => u64::try_from(*number).ok(),
        other => text(other).and_then(|text| text.parse().ok()),
    }
}

fn items(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// A flat `[key, value, key, value…]` reply (or a RESP3 map) as a map.
fn pairs(value: &Value) -> HashMap<String, Value> {
    match value {
        Value::Map(entries) => entries
            .iter()
            .filter_map(|(key, value)| text(key).map(|key| (key, value.clone())))
            .collect(),
        other => items(other)
            .chunks(2)
            .filter_map(|pair| match pair {
                [key, value] => text(key).map(|key| (key, value.clone())),
                _ => None,
            })
            .collect(),
    }
}

/// `[[id, [field, value, …]], …]`; deleted entries (nil bodies) are skipped.
fn entries(value: &Value, deliveries: impl Fn(&str) -> u64) -> Vec<Entry> {
    items(value)
        .iter()
        .filter_map(|item| match items(item) {
            [id, body] => {
                let id = text(id)?;
                let fields: Fields = items(body)
                    .chunks(2)
                    .filter_map(|pair| match pair {
                        [name, value] => Some((text(name)?, text(value)?)),
                        _ => None,
                    })
                    .collect();
                if matches!(body, Value::Nil) {
                    return None;
                }
                let deliveries = deliveries(&id);
                Some(Entry {
                    id,
                    fields,
                    deliveries,
                })
            }
            _ => None,
        })
        .collect()
}

/// `(ms, seq)` of an entry id, for ordering.
fn id_parts(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[async_trait::async_trait]
impl Streams for RedisBus {
    async fn append(&self, stream: &str, fields: &Fields) -> Result<String, BusError> {
        let mut command = redis::cmd("XADD");
        command.arg(stream).arg("*");
        for (name, value) in fields {
            command.arg(name).arg(value);
        }
        let reply = self.query(&command).await?;
        text(&reply).ok_or_else(|| BusError::Protocol("XADD returned no id".into()))
    }

    async fn append_many(&self, stream: &str, entries: &[Fields]) -> Result<Vec<String>, BusError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipeline = redis::pipe();
        // MULTI/EXEC: the batch lands whole or not at all.
        pipeline.atomic();
        for fields in entries {
            let command = pipeline.cmd("XADD").arg(stream).arg("*");
            for (name, value) in fields {
                command.arg(name).arg(value);
            }
        }
        let mut connection = self.shared.clone();
        let replies: Vec<Value> = pipeline
            .query_async(&mut connection)
            .await
            .map_err(bus_error)?;
        replies
            .iter()
            .map(|reply| {
                text(reply).ok_or_else(|| BusError::Protocol("XADD returned no id".into()))
            })
            .collect()
    }

    async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), BusError> {
        self.create_group(stream, group, "0").await
    }

    async fn ensure_group_at_end(&self, stream: &str, group: &str) -> Result<(), BusError> {
        self.create_group(stream, group, "$").await
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, BusError> {
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1));
        if !block.is_zero() {
            command
                .arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        command.arg("STREAMS").arg(stream).arg(">");

        let mut connection = self.blocking_connection().await?;
        let result = tokio::time::timeout(
            block + COMMAND_TIMEOUT,
            command.query_async::<Value>(&mut connection),
        )
        .await;
        let reply = match result {
            Ok(Ok(reply)) => {
                self.return_blocking_connection(connection);
                reply
            }
            Ok(Err(error)) if error.code() == Some("NOGROUP") => {
                self.return_blocking_connection(connection);
                return Err(BusError::NoGroup {
                    stream: stream.to_owned(),
                    group: group.to_owned(),
                });
            }
            // A failed or timed-out connection is dropped, not reused.
            Ok(Err(error)) => return Err(bus_error(error)),
            Err(_) => return Err(BusError::Unavailable("XREADGROUP timed out".into())),
        };
        let streams: Vec<&Value> = match &reply {
            Value::Map(entries) => entries.iter().map(|(_, value)| value).collect(),
            other => items(other)
                .iter()
                .filter_map(|item| match items(item) {
                    [_, body] => Some(body),
                    _ => None,
                })
                .collect(),
        };
        Ok(streams
            .into_iter()
            .flat_map(|body| entries(body, |_| 1))
            .collect())
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64, BusError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let reply = self
            .query(redis::cmd("XACK").arg(stream).arg(group).arg(ids))
            .await?;
        Ok(int(&reply).unwrap_or(0))
    }

    async fn pending(
        &self,
        stream: &str,
        group: &str,
        count: usize,
    ) -> Result<Vec<PendingEntry>, BusError> {
        let reply = self
            .query(
                redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(group)
                    .arg("-")
                    .arg("+")
                    .arg(count.max(1)),
            )
            .await?;
        Ok(items(&reply)
            .iter()
            .filter_map(|item| match items(item) {
                [id, consumer, idle, deliveries] => Some(PendingEntry {
                    id: text(id)?,
                    consumer: text(consumer)?,
                    idle: Duration::from_millis(int(idle)?),
                    deliveries: int(deliveries)?,
                }),
                _ => None,
            })
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
        let min_idle_ms = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let reply = self
            .query(
                redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(group)
                    .arg("IDLE")
                    .arg(min_idle_ms)
                    .arg("-")
                    .arg("+")
                    .arg(count.max(1)),
            )
            .await?;
        let previous: HashMap<String, u64> = items(&reply)
            .iter()
            .filter_map(|item| match items(item) {
                [id, _, _, deliveries] => Some((text(id)?, int(deliveries)?)),
                _ => None,
            })
            .collect();
        if previous.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&String> = previous.keys().collect();
        // XCLAIM re-checks the idle time, so two replicas cannot both claim one entry; it also
        // drops entries deleted from the stream from the pending list.
        let reply = self
            .query(
                redis::cmd("XCLAIM")
                    .arg(stream)
                    .arg(group)
                    .arg(consumer)
                    .arg(min_idle_ms)
                    .arg(&ids),
            )
            .await?;
        let mut claimed = entries(&reply, |id| previous.get(id).copied().unwrap_or(0) + 1);
        claimed.sort_by_key(|entry| id_parts(&entry.id));
        Ok(claimed)
    }

    async fn info(&self, stream: &str) -> Result<StreamInfo, BusError> {
        let length = int(&self.query(redis::cmd("XLEN").arg(stream)).await?).unwrap_or(0);
        let now = now_ms();
        let mut groups = Vec::new();
        for group in self.groups(stream).await? {
            let name = group.get("name").and_then(text).unwrap_or_default();
            let pending = group.get("pending").and_then(int).unwrap_or(0);
            let lag = match group.get("lag").and_then(int) {
                Some(lag) => lag,
                // Redis reports no lag after deletions; count what lies past the group's position.
                None => {
                    let last = group
                        .get("last-delivered-id")
                        .and_then(text)
                        .unwrap_or_else(|| "0-0".into());
                    let reply = self
                        .query(
                            redis::cmd("XRANGE")
                                .arg(stream)
                                .arg(format!("({last}"))
                                .arg("+"),
                        )
                        .await?;
                    items(&reply).len() as u64
                }
            };
            let oldest = self
                .query(
                    redis::cmd("XPENDING")
                        .arg(stream)
                        .arg(&name)
                        .arg("-")
                        .arg("+")
                        .arg(1),
                )
                .await?;
            let oldest_pending_age = items(&oldest)
                .first()
                .and_then(|item| items(item).first().and_then(text))
                .and_then(|id| id_parts(&id))
                .map(|(ms, _)| Duration::from_millis(now.saturating_sub(ms)));
            groups.push(GroupInfo {
                name,
                pending,
                lag,
                oldest_pending_age,
            });
        }
        groups.sort_by(|left, right| left.name.cmp(&right.name));
        Ok(StreamInfo { length, groups })
    }

    async fn range(
        &self,
        stream: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        if let Some(id) = after {
            crate::parse_entry_id(id)?;
        }
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let reply = self
            .query(
                redis::cmd("XRANGE")
                    .arg(stream)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count.max(1)),
            )
            .await?;
        Ok(entries(&reply, |_| 0))
    }

    async fn delete(&self, stream: &str, ids: &[String]) -> Result<u64, BusError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let reply = self.query(redis::cmd("XDEL").arg(stream).arg(ids)).await?;
        Ok(int(&reply).unwrap_or(0))
    }

    async fn trim_consumed(&self, stream: &str) -> Result<u64, BusError> {
        let groups = self.groups(stream).await?;
        if groups.is_empty() {
            return Ok(0);
        }
        // The lowest id any group still needs: its oldest pending entry, else the entry after
        // the last one it was given.
        let mut floor: Option<(u64, u64)> = None;
        for group in &groups {
            let name = group.get("name").and_then(text).unwrap_or_default();
            let oldest = self
                .query(
                    redis::cmd("XPENDING")
                        .arg(stream)
                        .arg(&name)
                        .arg("-")
                        .arg("+")
                        .arg(1),
                )
                .await?;
            let needed = match items(&oldest)
                .first()
                .and_then(|item| items(item).first().and_then(text))
            {
                Some(id) => id_parts(&id),
                None => group
                    .get("last-delivered-id")
                    .and_then(text)
                    .and_then(|id| id_parts(&id))
                    .map(|(ms, seq)| (ms, seq + 1)),
            };
            let needed = needed
                .ok_or_else(|| BusError::Protocol(format!("group `{name}` has no position")))?;
            floor = Some(floor.map_or(needed, |floor| floor.min(needed)));
        }
        let Some((ms, seq)) = floor else {
            return Ok(0);
        };
        let reply = self
            .query(
                redis::cmd("XTRIM")
                    .arg(stream)
                    .arg("MINID")
                    .arg(format!("{ms}-{seq}")),
            )
            .await?;
        Ok(int(&reply).unwrap_or(0))
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.query(&redis::cmd("PING")).await.map(|_| ())
    }
}

#[async_trait::async_trait]
impl ReplayRegistry for RedisBus {
    async fn claim_once(
        &self,
        namespace: ReplayNamespace,
        key: &str,
        ttl: Duration,
    ) -> Result<bool, BusError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let reply = self
            .query(
                redis::cmd("SET")
                    .arg(format!("caracal:replay:{}:{key}", namespace.as_str()))
                    .arg("1")
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms),
            )
            .await?;
        Ok(matches!(reply, Value::Okay))
    }

    async fn purge_expired(&self) -> Result<u64, BusError> {
        // Keys carry their own TTL in Redis.
        Ok(0)
    }
}

#[async_trait::async_trait]
impl RateCounter for RedisBus {
    async fn hit(&self, bucket: &str, window: Duration) -> Result<u64, BusError> {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let key = format!("caracal:rate:{bucket}:{}", window_index(now_ms(), window));
        let mut connection = self.shared.clone();
        // One round trip; the key outlives its window by one window, then expires.
        let (count, _): (u64, Value) = redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg(&key)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(window_ms.saturating_mul(2))
            .query_async(&mut connection)
            .await
            .map_err(bus_error)?;
        Ok(count)
    }
}
