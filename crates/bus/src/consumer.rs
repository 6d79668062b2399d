//! Producers sign what they append; consumers verify, reclaim what a crashed consumer left
//! pending, and dead-letter what they will not process, so nothing is lost or silently dropped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::signature::{SIGNATURE_FIELD, StreamKey, sign, verify};
use crate::{BusError, Entry, Fields, Streams, dead_letter_stream};

/// Appends signed messages.
#[derive(Clone)]
pub struct Producer {
    streams: Arc<dyn Streams>,
    key: StreamKey,
}

impl Producer {
    pub fn new(streams: Arc<dyn Streams>, key: StreamKey) -> Producer {
        Producer { streams, key }
    }

    /// Whether `fields` carry a genuine signature for `stream` under this producer's key; a
    /// message taken from one stream is only re-published if this holds.
    pub fn is_genuine(&self, stream: &str, fields: &Fields) -> bool {
        verify(&self.key, stream, fields).is_ok()
    }

    /// Signs `fields` (replacing any `_sig` they carry) and appends them to `stream`.
    pub async fn publish(&self, stream: &str, fields: Fields) -> Result<String, BusError> {
        self.streams
            .append(stream, &self.signed(stream, fields))
            .await
    }

    /// Signs and appends several messages to `stream` in one batch, in order.
    pub async fn publish_many(
        &self,
        stream: &str,
        messages: Vec<Fields>,
    ) -> Result<Vec<String>, BusError> {
        let signed: Vec<Fields> = messages
            .into_iter()
            .map(|fields| self.signed(stream, fields))
            .collect();
        self.streams.append_many(stream, &signed).await
    }

    fn signed(&self, stream: &str, mut fields: Fields) -> Fields {
        fields.remove(SIGNATURE_FIELD);
        let signature = sign(&self.key, stream, &fields);
        fields.insert(SIGNATURE_FIELD.to_owned(), signature);
        fields
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub stream: String,
    pub group: String,
    /// Unique per process within the group (e.g. role + replica id).
    pub consumer: String,
    pub batch: usize,
    /// How long a poll waits for new entries (zero: do not wait).
    pub block: Duration,
    /// Entries pending longer than this with any consumer are taken over.
    pub reclaim_idle: Duration,
    /// After this many deliveries an entry goes to the dead-letter stream.
    pub max_deliveries: u64,
    /// How many recent message keys are remembered to drop duplicates.
    pub dedupe_window: usize,
}

/// Counters a role exports as metrics.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub bad_signatures: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub reclaimed: AtomicU64,
    /// Messages acknowledged without being handed out because their key was already handled.
    pub duplicates: AtomicU64,
}

/// The keys of recently handled (acknowledged) messages, oldest evicted first, and the keys
/// of entries handed out but not yet acknowledged.
#[derive(Default)]
struct RecentKeys {
    order: VecDeque<String>,
    members: HashSet<String>,
    /// Entry id → (message key, the poll that handed it out).
    in_flight: HashMap<String, (String, u64)>,
    polls: u64,
}

/// An entry handed out this many polls ago and never acknowledged here (another consumer
/// reclaimed it, or its handler gave up) is forgotten, so the map cannot grow without bound.
const IN_FLIGHT_POLLS: u64 = 10_000;

impl RecentKeys {
    fn handled(&self, key: &str) -> bool {
        self.members.contains(key)
    }

    /// Counts a poll and forgets entries handed out [`IN_FLIGHT_POLLS`] polls ago and never
    /// acknowledged.
    fn start_poll(&mut self) {
        self.polls += 1;
        let oldest = self.polls.saturating_sub(IN_FLIGHT_POLLS);
        self.in_flight.retain(|_, (_, poll)| *poll >= oldest);
    }

    /// Remembers `key` as handled.
    fn insert(&mut self, key: String, capacity: usize) {
        if self.members.contains(&key) {
            return;
        }
        if self.order.len() >= capacity.max(1)
            && let Some(oldest) = self.order.pop_front()
        {
            self.members.remove(&oldest);
        }
        self.order.push_back(key.clone());
        self.members.insert(key);
    }
}

/// What identifies a message across redeliveries and re-publication: the producer's
/// `dedupe_key`, else its `outbox_id`, else the entry id.
fn message_key(entry: &Entry) -> String {
    if let Some(key) = entry.fields.get("dedupe_key") {
        return format!("k:{key}");
    }
    if let Some(id) = entry.fields.get("outbox_id") {
        return format!("o:{id}");
    }
    format!("e:{}", entry.id)
}

pub struct Consumer {
    streams: Arc<dyn Streams>,
    key: StreamKey,
    config: ConsumerConfig,
    stats: Arc<ConsumerStats>,
    recent: Mutex<RecentKeys>,
}

impl Consumer {
    /// Creates the group if needed (reading from the stream's beginning).
    pub async fn start(
        streams: Arc<dyn Streams>,
        key: StreamKey,
        config: ConsumerConfig,
    ) -> Result<Consumer, BusError> {
        streams.ensure_group(&config.stream, &config.group).await?;
        Ok(Consumer {
            streams,
            key,
            config,
            stats: Arc::new(ConsumerStats::default()),
            recent: Mutex::new(RecentKeys::default()),
        })
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// The next batch of entries with valid signatures: first entries other consumers left
    /// pending too long, then new ones. The caller processes them and then calls [`ack`];
    /// whatever it does not acknowledge is delivered again later. An entry whose message this
    /// consumer already acknowledged (a redelivery after a lost ack, or a message published
    /// twice) is acknowledged again and not handed out.
    ///
    /// [`ack`]: Consumer::ack
    pub async fn poll(&self) -> Result<Vec<Entry>, BusError> {
        let config = &self.config;
        let mut ready = Vec::new();
        let reclaimed = self
            .streams
            .claim_idle(
                &config.stream,
                &config.group,
                &config.consumer,
                config.reclaim_idle,
                config.batch,
            )
            .await?;
        self.stats
            .reclaimed
            .fetch_add(reclaimed.len() as u64, Ordering::Relaxed);
        for entry in reclaimed {
            // A forged entry is dead-lettered as forged, never under the replayable reason.
            if entry.deliveries > config.max_deliveries
                && verify(&self.key, &config.stream, &entry.fields).is_ok()
            {
                self.dead_letter(&entry, "max_deliveries_exceeded").await?;
            } else {
                ready.push(entry);
            }
        }
        let block = if ready.is_empty() {
            config.block
        } else {
            Duration::ZERO
        };
        ready.extend(
            self.streams
                .read_group(
                    &config.stream,
                    &config.group,
                    &config.consumer,
                    config.batch,
                    block,
                )
                .await?,
        );

        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .start_poll();
        let mut verified = Vec::with_capacity(ready.len());
        let mut duplicates = Vec::new();
        for entry in ready {
            match verify(&self.key, &config.stream, &entry.fields) {
                Ok(()) => {
                    let key = message_key(&entry);
                    let mut recent = self
                        .recent
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    if recent.handled(&key) {
                        duplicates.push(entry.id);
                    } else {
                        let poll = recent.polls;
                        recent.in_flight.insert(entry.id.clone(), (key, poll));
                        verified.push(entry);
                    }
                }
                Err(error) => {
                    self.stats.bad_signatures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(stream = %config.stream, id = %entry.id, reason = error.reason(), "dropping unsigned or forged stream message");
                    self.dead_letter(&entry, error.reason()).await?;
                }
            }
        }
        if !duplicates.is_empty() {
            self.stats
                .duplicates
                .fetch_add(duplicates.len() as u64, Ordering::Relaxed);
            self.ack(&duplicates).await?;
        }
        Ok(verified)
    }

    /// Acknowledges handled entries. Their messages count as handled from this moment, even if
    /// the acknowledgement itself fails and the entries come back.
    pub async fn ack(&self, ids: &[String]) -> Result<u64, BusError> {
        {
            let mut recent = self
                .recent
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for id in ids {
                if let Some((key, _)) = recent.in_flight.remove(id) {
                    recent.insert(key, self.config.dedupe_window);
                }
            }
        }
        self.streams
            .ack(&self.config.stream, &self.config.group, ids)
            .await
    }

    /// Moves `entry` to `<stream>.dead` with the reason and its fields as sorted compact JSON,
    /// then acknowledges it. The dead letter is appended first: a crash in between delivers the
    /// entry again rather than losing it.
    pub async fn dead_letter(&self, entry: &Entry, reason: &str) -> Result<(), BusError> {
        let payload = serde_json::to_string(&entry.fields)
            .map_err(|error| BusError::Protocol(error.to_string()))?;
        let mut fields = Fields::new();
        fields.insert("source_id".to_owned(), entry.id.clone());
        fields.insert("reason".to_owned(), reason.to_owned());
        fields.insert("payload".to_owned(), payload);
        fields.insert("deliveries".to_owned(), entry.deliveries.to_string());
        let dead = dead_letter_stream(&self.config.stream);
        let signature = sign(&self.key, &dead, &fields);
        fields.insert(SIGNATURE_FIELD.to_owned(), signature);
        self.streams.append(&dead, &fields).await?;
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        // Acknowledged but not handled: the message replayed from the dead letters must be
        // delivered, not dropped as a duplicate.
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .in_flight
            .remove(&entry.id);
        self.streams
            .ack(
                &self.config.stream,
                &self.config.group,
                std::slice::from_ref(&entry.id),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_never_acknowledged_here_are_forgotten_after_a_bound() {
        let mut recent = RecentKeys::default();
        recent.start_poll();
        recent
            .in_flight
            .insert("1-0".into(), ("k:a".into(), recent.polls));
        for _ in 0..IN_FLIGHT_POLLS {
            recent.start_poll();
        }
        assert!(
            recent.in_flight.contains_key("1-0"),
            "kept for the whole window"
        );
        recent.start_poll();
        assert!(recent.in_flight.is_empty(), "then forgotten");
    }
}
