//! Ingestion: the `audit-ingestor` consumer group reads `caracal.audit.events`, appends each
//! zone's events to its chain in one transaction, and acknowledges only what is durably stored
//! (or durably dead-lettered with its reason). Redelivered events are stored once.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use caracal_audit::Event;
use caracal_audit::chain::{ChainKey, next_link};
use caracal_bus::{Consumer, Entry};
use caracal_crypto::Kek;
use caracal_store::{ChainBuilder, Store, StoreError, now_ms};
use prometheus_client::metrics::counter::Counter;

use super::to_row;

pub const GROUP: &str = "audit-ingestor";

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

fn decode(hex_text: &str) -> Option<[u8; 32]> {
    let bytes: Option<Vec<u8>> = (0..hex_text.len())
        .step_by(2)
        .map(|index| {
            hex_text
                .get(index..index + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect();
    bytes?.try_into().ok()
}

/// Links `events` after a zone's head, skipping ids already stored (or repeated in the batch).
pub fn chain_builder(key: ChainKey, events: Vec<Event>) -> ChainBuilder {
    Box::new(
        move |head: Option<(i64, String)>, existing: &HashSet<String>| {
            let mut head = match head {
                Some((seq, hash)) => Some((
                    seq,
                    decode(&hash).ok_or_else(|| {
                        StoreError::Corrupt(format!("chain head {seq} has a malformed hash"))
                    })?,
                )),
                None => None,
            };
            let mut seen = HashSet::new();
            let ingested_at_ms = now_ms();
            let mut rows = Vec::new();
            for event in &events {
                if existing.contains(&event.id) || !seen.insert(event.id.clone()) {
                    continue;
                }
                let content = event.content();
                let (link, hash) = next_link(&key, head, &content);
                head = Some((link.seq, hash));
                rows.push(to_row(&content, &link, ingested_at_ms));
            }
            Ok(rows)
        },
    )
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
        let entries = self
            .consumer
            .poll()
            .await
            .map_err(|error| IngestError::Bus(error.to_string()))?;
        let handled = entries.len();
        let mut by_zone: BTreeMap<String, Vec<(Entry, Event)>> = BTreeMap::new();
        for entry in entries {
            let parsed = entry
                .fields
                .get("data")
                .ok_or_else(|| "missing_data_field".to_owned())
                .and_then(|data| {
                    Event::parse(data.as_bytes()).map_err(|error| format!("invalid_event: {error}"))
                });
            match parsed {
                Ok(event) => by_zone
                    .entry(event.zone_id.clone())
                    .or_default()
                    .push((entry, event)),
                Err(reason) => self.dead_letter(&entry, &reason).await?,
            }
        }
        for (zone_id, items) in by_zone {
            let ids: Vec<String> = items.iter().map(|(_, event)| event.id.clone()).collect();
            let events: Vec<Event> = items.iter().map(|(_, event)| event.clone()).collect();
            // Read per batch, so a key rotation applies from the next batch on every replica.
            let (key, _) = super::current_chain_keys(self.store.as_ref(), &self.kek)
                .await
                .map_err(|error| IngestError::Store(error.to_string()))?;
            let build = chain_builder(key, events);
            match self.store.append_audit_chain(&zone_id, &ids, build).await {
                Ok(appended) => {
                    self.metrics.ingested_total.inc_by(appended);
                    let entry_ids: Vec<String> =
                        items.iter().map(|(entry, _)| entry.id.clone()).collect();
                    self.consumer
                        .ack(&entry_ids)
                        .await
                        .map_err(|error| IngestError::Bus(error.to_string()))?;
                }
                // Invariant 1: not stored means not acknowledged; the entries come back.
                Err(StoreError::Unavailable(message)) => return Err(IngestError::Store(message)),
                Err(error) => {
                    for (entry, _) in &items {
                        self.dead_letter(entry, &format!("store_rejected: {error}"))
                            .await?;
                    }
                }
            }
        }
        Ok(handled)
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
            let pause = match self.ingest_once().await {
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
