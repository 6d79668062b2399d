//! Ingestion: the `audit-ingestor` consumer group reads `caracal.audit.events`, appends each
//! zone's events to its chain in one transaction, and acknowledges only what is durably stored
//! (or durably dead-lettered with its reason). Redelivered events are stored once.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use caracal_audit::Content;
use caracal_audit::Event;
use caracal_audit::chain::{ChainKey, content_hash, link_after};
use caracal_bus::{Consumer, Entry};
use caracal_crypto::Kek;
use caracal_store::{ChainAppend, ChainBuilder, Store, StoreError, now_ms};
use prometheus_client::metrics::counter::Counter;

use super::to_row;

pub const GROUP: &str = "audit-ingestor";

/// How the Audit role reads `caracal.audit.events` (the benchmark measures the same); an
/// unacknowledged event is delivered again after `reclaim_idle`.
pub fn consumer_config(consumer: String, reclaim_idle: Duration) -> caracal_bus::ConsumerConfig {
    caracal_bus::ConsumerConfig {
        stream: caracal_bus::stream_names::AUDIT_EVENTS.to_owned(),
        group: GROUP.to_owned(),
        consumer,
        // Two commits per batch whatever its size: larger batches ingest faster.
        batch: 2048,
        block: Duration::from_secs(1),
        reclaim_idle,
        max_deliveries: 8,
        dedupe_window: 100_000,
    }
}

#[derive(Debug, Default)]
pub struct IngestMetrics {
    pub ingested_total: Counter,
    pub dead_lettered_total: Counter,
}

pub struct Ingestor {
    store: Arc<dyn Store>,
    consumer: Consumer,
    kek: Kek,
    metrics: Arc<IngestMetrics>,
}

/// An event ready to be linked: its id, content and content hash, computed before the store
/// transaction so the transaction only links and inserts.
pub struct Prepared {
    pub content: Content,
    pub hash: [u8; 32],
}

impl Prepared {
    pub fn of(event: &Event) -> Prepared {
        Prepared::from_content(event.content())
    }

    pub fn from_content(content: Content) -> Prepared {
        let hash = content_hash(&content);
        Prepared { content, hash }
    }
}

/// A polled batch: its entries to store, by zone, and how many stream entries it took.
struct Batch {
    handled: usize,
    by_zone: BTreeMap<String, Vec<(Entry, Prepared)>>,
}

/// Links `events` after a zone's head, skipping ids already stored (or repeated in the batch).
pub fn chain_builder(key: ChainKey, events: Vec<Event>) -> ChainBuilder {
    prepared_chain_builder(key, Arc::new(events.iter().map(Prepared::of).collect()))
}

/// [`chain_builder`] for events already prepared.
pub fn prepared_chain_builder(key: ChainKey, events: Arc<Vec<Prepared>>) -> ChainBuilder {
    Box::new(
        move |head: Option<(i64, String)>, existing: &HashSet<String>| {
            let mut head = match head {
                Some((seq, hash)) => Some((
                    seq,
                    caracal_crypto::unhex32(&hash).ok_or_else(|| {
                        StoreError::Corrupt(format!("chain head {seq} has a malformed hash"))
                    })?,
                )),
                None => None,
            };
            let mut seen = HashSet::new();
            let ingested_at_ms = now_ms();
            let mut rows = Vec::with_capacity(events.len());
            for prepared in events.iter() {
                let id = &prepared.content.id;
                if existing.contains(id) || !seen.insert(id.clone()) {
                    continue;
                }
                let link = link_after(&key, head, &prepared.content.zone_id, &prepared.hash);
                head = Some((link.seq, prepared.hash));
                rows.push(to_row(&prepared.content, &link, ingested_at_ms));
            }
            Ok(rows)
        },
    )
}

/// One zone's events to link after its head, as `Store::append_audit_chains` takes them.
pub fn chain_append(key: &ChainKey, zone_id: String, events: Arc<Vec<Prepared>>) -> ChainAppend {
    ChainAppend {
        zone_id,
        candidate_ids: events
            .iter()
            .map(|event| event.content.id.clone())
            .collect(),
        build: prepared_chain_builder(key.clone(), events),
    }
}

/// Parses and prepares stream entries; an entry that cannot be ingested gets its dead-letter
/// reason instead. (Spreading this over threads measured no faster: the store is the limit.)
fn prepare_all(entries: &[Entry]) -> Vec<Result<Prepared, String>> {
    entries
        .iter()
        .map(|entry| {
            let data = entry
                .fields
                .get("data")
                .ok_or_else(|| "missing_data_field".to_owned())?;
            let content = Event::parse_content(data.as_bytes())
                .map_err(|error| format!("invalid_event: {error}"))?;
            Ok(Prepared::from_content(content))
        })
        .collect()
}

impl Ingestor {
    pub fn new(
        store: Arc<dyn Store>,
        consumer: Consumer,
        kek: Kek,
        metrics: Arc<IngestMetrics>,
    ) -> Ingestor {
        Ingestor {
            store,
            consumer,
            kek,
            metrics,
        }
    }

    /// Ingests one batch; returns how many entries it took off the stream. A store outage is
    /// an error and leaves the batch pending, to be delivered again.
    pub async fn ingest_once(&self) -> Result<usize, IngestError> {
        let batch = self.poll_batch().await?;
        self.store_batch(batch).await
    }

    /// Ingests batch after batch while `more(entries handled so far)` holds, reading the next
    /// batch while the current one is stored: the stream and the store are separate
    /// connections, so the two overlap. Stops early when a poll finds nothing. A batch it read
    /// is stored (or left pending on error) before it returns; batches are stored in order.
    pub async fn ingest_while(&self, more: impl Fn(usize) -> bool) -> Result<usize, IngestError> {
        let mut total = 0;
        let mut batch = self.poll_batch().await?;
        loop {
            if batch.handled == 0 {
                return Ok(total);
            }
            if !more(total + batch.handled) {
                return Ok(total + self.store_batch(batch).await?);
            }
            let (stored, next) = tokio::join!(self.store_batch(batch), self.poll_batch());
            total += stored?;
            batch = next?;
        }
    }

    /// Reads a batch and prepares it; entries that cannot be ingested are dead-lettered here.
    async fn poll_batch(&self) -> Result<Batch, IngestError> {
        let entries = self
            .consumer
            .poll()
            .await
            .map_err(|error| IngestError::Bus(error.to_string()))?;
        let handled = entries.len();
        let (entries, prepared) = tokio::task::spawn_blocking(move || {
            let prepared = prepare_all(&entries);
            (entries, prepared)
        })
        .await
        .map_err(|_| IngestError::Bus("preparation worker stopped".into()))?;
        let mut by_zone: BTreeMap<String, Vec<(Entry, Prepared)>> = BTreeMap::new();
        for (entry, prepared) in entries.into_iter().zip(prepared) {
            match prepared {
                Ok(prepared) => by_zone
                    .entry(prepared.content.zone_id.clone())
                    .or_default()
                    .push((entry, prepared)),
                Err(reason) => self.dead_letter(&entry, &reason).await?,
            }
        }
        Ok(Batch { handled, by_zone })
    }

    /// Appends a prepared batch to its zones' chains and acknowledges it; returns how many
    /// stream entries it took.
    async fn store_batch(&self, batch: Batch) -> Result<usize, IngestError> {
        let Batch { handled, by_zone } = batch;
        if by_zone.is_empty() {
            return Ok(handled);
        }
        // Read once per batch, so a key rotation applies from the next batch on every replica.
        let key = super::current_chain_key(self.store.as_ref(), &self.kek)
            .await
            .map_err(|error| IngestError::Store(error.to_string()))?;
        // Every zone of the batch in one transaction, then one acknowledgement: two commits
        // per batch, whatever the number of zones.
        let mut appends = Vec::with_capacity(by_zone.len());
        let mut zones = Vec::with_capacity(by_zone.len());
        for (zone_id, items) in by_zone {
            let (entries, events): (Vec<Entry>, Vec<Prepared>) = items.into_iter().unzip();
            let events = Arc::new(events);
            appends.push(chain_append(&key, zone_id.clone(), Arc::clone(&events)));
            zones.push((zone_id, entries, events));
        }
        match self.store.append_audit_chains(appends).await {
            Ok(appended) => {
                let entry_ids: Vec<String> = zones
                    .iter()
                    .flat_map(|(_, entries, _)| entries.iter().map(|entry| entry.id.clone()))
                    .collect();
                self.stored(appended, &entry_ids).await?;
            }
            // Invariant 1: not stored means not acknowledged; the entries come back.
            Err(StoreError::Unavailable(message)) => return Err(IngestError::Store(message)),
            // A rejection: zone by zone, so only the zone the store refuses is dead-lettered.
            Err(_) => {
                for (zone_id, entries, events) in zones {
                    self.append_zone(&key, &zone_id, entries, events).await?;
                }
            }
        }
        Ok(handled)
    }

    async fn append_zone(
        &self,
        key: &ChainKey,
        zone_id: &str,
        entries: Vec<Entry>,
        events: Arc<Vec<Prepared>>,
    ) -> Result<(), IngestError> {
        let ids: Vec<String> = events
            .iter()
            .map(|event| event.content.id.clone())
            .collect();
        let entry_ids: Vec<String> = entries.iter().map(|entry| entry.id.clone()).collect();
        let build = prepared_chain_builder(key.clone(), events);
        match self.store.append_audit_chain(zone_id, &ids, build).await {
            Ok(appended) => self.stored(appended, &entry_ids).await,
            Err(StoreError::Unavailable(message)) => Err(IngestError::Store(message)),
            Err(error) => {
                for entry in &entries {
                    self.dead_letter(entry, &format!("store_rejected: {error}"))
                        .await?;
                }
                Ok(())
            }
        }
    }

    /// Counts what was appended and acknowledges the entries it came from.
    async fn stored(&self, appended: u64, entry_ids: &[String]) -> Result<(), IngestError> {
        self.metrics.ingested_total.inc_by(appended);
        self.consumer
            .ack(entry_ids)
            .await
            .map_err(|error| IngestError::Bus(error.to_string()))?;
        Ok(())
    }

    async fn dead_letter(&self, entry: &Entry, reason: &str) -> Result<(), IngestError> {
        tracing::warn!(entry = %entry.id, reason, "audit event dead-lettered");
        self.consumer
            .dead_letter(entry, reason)
            .await
            .map_err(|error| IngestError::Bus(error.to_string()))?;
        self.metrics.dead_lettered_total.inc();
        Ok(())
    }

    /// Ingests until `stop`; outages are retried after a pause, nothing is acknowledged early.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let pause = match self.ingest_while(|_| !*stop.borrow()).await {
                Ok(_) => Duration::ZERO,
                Err(error) => {
                    tracing::warn!(%error, "audit ingestion paused");
                    Duration::from_secs(1)
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = stop.changed() => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("bus: {0}")]
    Bus(String),
    #[error("store: {0}")]
    Store(String),
}
