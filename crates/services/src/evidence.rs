//! The audit evidence producer every role uses: a governed call is not reported successful
//! until its event is durably accepted (DESIGN.md invariant 5).
//!
//! Events queue in a bounded buffer and go to `caracal.audit.events` in batches. When the bus
//! refuses a batch, it is written to an fsynced replay file under `$CARACAL_HOME/audit-replay`
//! and re-sent when the bus is back (and on the next start). Only if that write fails too is
//! evidence lost: the process latches `audit_evidence_lost`, goes not ready and refuses protected
//! traffic until it is replaced. A full buffer slows callers down and, past a short wait, answers
//! "overloaded" (503 with `Retry-After`); nothing is ever dropped.
//!
//! Embedded deployments, where the stream and the ledger are one SQLite file with one writer,
//! append batches to their zone chains directly ([`DirectLedger`]): one write where the stream
//! takes four (the entry, its delivery, the chain rows, the acknowledgement). A batch the ledger
//! refuses (not merely unavailable) goes through the stream, whose ingestor dead-letters only
//! what the store refuses, with its reason.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use caracal_audit::{Content, Event};
use caracal_bus::{Fields, Producer, stream_names};
use caracal_store::{Store, StoreError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EvidenceError {
    /// Neither the bus nor the replay file took the event (latched).
    #[error("audit evidence could not be recorded")]
    Lost,
    /// The buffer stayed full for the whole wait: the caller should retry later.
    #[error("the audit pipeline is overloaded")]
    Overloaded,
    /// The producer has shut down.
    #[error("the audit producer has stopped")]
    Stopped,
}

#[derive(Debug, Clone)]
pub struct EvidenceConfig {
    pub replay_dir: PathBuf,
    /// Events buffered in memory before callers wait.
    pub capacity: usize,
    /// Events per append.
    pub batch: usize,
    /// How long a caller waits for room in a full buffer before "overloaded".
    pub enqueue_wait: Duration,
    /// How often replay files are re-sent.
    pub replay_interval: Duration,
    /// Append straight to the zone chains instead of the stream (embedded deployments).
    pub ledger: Option<DirectLedger>,
}

/// The ledger itself as the destination of evidence: the store and the key-encryption key the
/// chain key derives from.
#[derive(Clone)]
pub struct DirectLedger {
    pub store: Arc<dyn Store>,
    pub kek: caracal_crypto::Kek,
}

impl std::fmt::Debug for DirectLedger {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DirectLedger")
            .finish_non_exhaustive()
    }
}

impl DirectLedger {
    /// Links the events after their zones' heads in one transaction, skipping ids already
    /// stored (a batch sent again after a lost answer is stored once); returns how many rows
    /// it appended.
    async fn append(&self, events: Vec<Content>) -> Result<u64, StoreError> {
        // Read per batch, as the ingestor does, so a key rotation applies from the next batch.
        let key = crate::ledger::current_chain_key(self.store.as_ref(), &self.kek).await?;
        let mut by_zone: BTreeMap<String, Vec<crate::ledger::ingest::Prepared>> = BTreeMap::new();
        for content in events {
            by_zone
                .entry(content.zone_id.clone())
                .or_default()
                .push(crate::ledger::ingest::Prepared::from_content(content));
        }
        let appends = by_zone
            .into_iter()
            .map(|(zone_id, prepared)| {
                crate::ledger::ingest::chain_append(&key, zone_id, Arc::new(prepared))
            })
            .collect();
        self.store.append_audit_chains(appends).await
    }
}

impl EvidenceConfig {
    pub fn new(replay_dir: PathBuf) -> EvidenceConfig {
        EvidenceConfig {
            replay_dir,
            capacity: 10_000,
            batch: 512,
            enqueue_wait: Duration::from_millis(200),
            replay_interval: Duration::from_secs(1),
            ledger: None,
        }
    }
}

/// Counters shared by every role of the process; each role registers them under its prefix.
#[derive(Debug, Default)]
pub struct EvidenceMetrics {
    pub lost_total: Counter,
    pub spilled_total: Counter,
    pub replayed_total: Counter,
    pub overloaded_total: Counter,
    pub replay_files: Gauge,
    /// Seconds since the oldest waiting replay file was written (0 with none).
    pub replay_oldest_age_seconds: Gauge,
    /// Events appended to a zone chain, by the ingestor or directly; the Audit role reports it.
    pub ingest: Arc<crate::ledger::ingest::IngestMetrics>,
}

impl EvidenceMetrics {
    /// Registers the families as `caracal_<role>_audit_*` in a role's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "audit_evidence_lost",
            "Audit events neither the bus nor a replay file accepted",
            self.lost_total.clone(),
        );
        registry.register(
            "audit_spilled",
            "Audit events written to local replay files",
            self.spilled_total.clone(),
        );
        registry.register(
            "audit_replayed",
            "Audit events re-sent from replay files",
            self.replayed_total.clone(),
        );
        registry.register(
            "audit_overloaded",
            "Audit records refused because the buffer stayed full",
            self.overloaded_total.clone(),
        );
        registry.register(
            "audit_replay_files",
            "Replay files waiting to be re-sent",
            self.replay_files.clone(),
        );
        registry.register(
            "audit_replay_oldest_age_seconds",
            "Seconds since the oldest waiting replay file was written",
            self.replay_oldest_age_seconds.clone(),
        );
    }
}

struct Job {
    event: Event,
    done: oneshot::Sender<Result<(), EvidenceError>>,
}

/// An event the producer has taken but not yet made durable.
#[must_use = "an event is evidence only once it is durable"]
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Result<(), EvidenceError>>);

impl Pending {
    /// Waits until the event is durably accepted (or known lost).
    pub async fn durable(self) -> Result<(), EvidenceError> {
        self.0.await.unwrap_or(Err(EvidenceError::Stopped))
    }

    /// An event whose fate is already known.
    #[cfg(test)]
    pub(crate) fn settled(fate: Result<(), EvidenceError>) -> Pending {
        let (done, answer) = oneshot::channel();
        let _ = done.send(fate);
        Pending(answer)
    }
}

/// The handle roles record through. Cheap to clone.
#[derive(Clone)]
pub struct Evidence {
    sender: mpsc::Sender<Job>,
    producer: Producer,
    lost: Arc<AtomicBool>,
    metrics: Arc<EvidenceMetrics>,
    enqueue_wait: Duration,
}

/// The producer's background work; [`EvidenceTasks::shutdown`] flushes it.
pub struct EvidenceTasks {
    stop: watch::Sender<bool>,
    writer: tokio::task::JoinHandle<()>,
    replayer: tokio::task::JoinHandle<()>,
}

impl Evidence {
    /// Creates the replay directory (mode 0700) and starts the writer and the replayer. Replay
    /// files left by an earlier run are re-sent first.
    pub fn start(
        producer: Producer,
        config: EvidenceConfig,
    ) -> std::io::Result<(Evidence, EvidenceTasks)> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.replay_dir)?;
        let (sender, receiver) = mpsc::channel(config.capacity.max(1));
        let (stop, stopped) = watch::channel(false);
        let sink = Sink {
            producer: producer.clone(),
            ledger: config.ledger.clone(),
        };
        let lost = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(EvidenceMetrics::default());
        let spill = Spill {
            directory: config.replay_dir.clone(),
            counter: Arc::new(AtomicU64::new(0)),
        };
        let writer = tokio::spawn(write_loop(
            receiver,
            sink.clone(),
            spill.clone(),
            config.batch.max(1),
            Arc::clone(&lost),
            Arc::clone(&metrics),
            stopped.clone(),
        ));
        let replayer = tokio::spawn(replay_loop(
            sink,
            spill,
            config.batch.max(1),
            config.replay_interval,
            Watch {
                lost: Arc::clone(&lost),
                metrics: Arc::clone(&metrics),
            },
            stopped,
        ));
        Ok((
            Evidence {
                sender,
                producer,
                lost,
                metrics,
                enqueue_wait: config.enqueue_wait,
            },
            EvidenceTasks {
                stop,
                writer,
                replayer,
            },
        ))
    }

    /// Records `event`; returns once it is durably accepted.
    pub async fn record(&self, event: Event) -> Result<(), EvidenceError> {
        self.enqueue(event).await?.durable().await
    }

    /// Hands `event` to the producer and returns without waiting for the disk: for a step whose
    /// outcome is reported later, by a caller that waits for [`Pending::durable`] before it
    /// reports anything (the in-process re-exchange, whose call the Gateway reports).
    pub async fn enqueue(&self, event: Event) -> Result<Pending, EvidenceError> {
        if self.is_lost() {
            return Err(EvidenceError::Lost);
        }
        let (done, answer) = oneshot::channel();
        match tokio::time::timeout(self.enqueue_wait, self.sender.send(Job { event, done })).await {
            Err(_) => {
                self.metrics.overloaded_total.inc();
                Err(EvidenceError::Overloaded)
            }
            Ok(Err(_)) => Err(EvidenceError::Stopped),
            Ok(Ok(())) => Ok(Pending(answer)),
        }
    }

    /// The signing producer of the audit stream (for re-sending dead letters).
    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// Whether evidence has been lost (latched until the process is replaced).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub fn metrics(&self) -> Arc<EvidenceMetrics> {
        Arc::clone(&self.metrics)
    }
}

impl EvidenceTasks {
    /// Stops taking events, writes everything buffered (to the bus, else to replay files),
    /// makes a last attempt to re-send replay files, and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.writer.await;
        let _ = self.replayer.await;
    }
}

/// `event` as an outbox message on the audit stream: evidence that commits with the change it
/// describes (and, refused with it, never exists).
pub(crate) fn outbox_message(event: &Event) -> Option<caracal_store::OutboxMessage> {
    Some(caracal_store::OutboxMessage {
        stream: caracal_bus::stream_names::AUDIT_EVENTS.to_owned(),
        fields: message(event)?,
        dedupe_key: Some(event.id.clone()),
    })
}

pub(crate) fn message(event: &Event) -> Option<Fields> {
    let data = serde_json::to_string(event).ok()?;
    Some(Fields::from([
        ("id".to_owned(), event.id.clone()),
        ("zone_id".to_owned(), event.zone_id.clone()),
        ("data".to_owned(), data),
    ]))
}

#[derive(Clone)]
struct Spill {
    directory: PathBuf,
    counter: Arc<AtomicU64>,
}

impl Spill {
    /// Writes events as one NDJSON file: a temporary name, fsync, rename, fsync of the
    /// directory, so a replay never sees a partial file.
    fn write(&self, events: &[Event]) -> std::io::Result<()> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        let sequence = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{nanos:024}-{}-{sequence:06}.ndjson", std::process::id());
        let temporary = self.directory.join(format!(".{name}.tmp"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        for event in events {
            serde_json::to_writer(&mut file, event)?;
            file.write_all(b"\n")?;
        }
        file.sync_all()?;
        std::fs::rename(&temporary, self.directory.join(&name))?;
        std::fs::File::open(&self.directory)?.sync_all()
    }

    /// Replay files, oldest first.
    fn pending(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.directory)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.path())
                    .filter(|path| {
                        path.extension()
                            .is_some_and(|extension| extension == "ndjson")
                    })
                    .collect()
            })
            .unwrap_or_else(|error| {
                // Not fatal here: writing a new replay file fails loudly and latches.
                tracing::warn!(%error, directory = %self.directory.display(), "audit replay directory unreadable");
                Vec::new()
            });
        files.sort();
        files
    }
}

/// Where accepted events go: the audit stream, or first the ledger itself when configured.
#[derive(Clone)]
struct Sink {
    producer: Producer,
    ledger: Option<DirectLedger>,
}

/// Sends a batch on; `false` if it is not stored anywhere yet (the caller spills it).
async fn publish(sink: &Sink, metrics: &EvidenceMetrics, events: &[Event]) -> bool {
    if let Some(ledger) = &sink.ledger {
        // An event out of bounds takes the stream, whose ingestor dead-letters it with its reason.
        if let Ok(contents) = events.iter().map(Event::checked_content).collect() {
            match ledger.append(contents).await {
                Ok(appended) => {
                    metrics.ingest.ingested_total.inc_by(appended);
                    return true;
                }
                Err(StoreError::Unavailable(error)) => {
                    tracing::warn!(%error, "audit events could not reach the ledger");
                    return false;
                }
                Err(error) => {
                    tracing::warn!(%error, "the ledger refused a batch of audit events: it goes through the stream");
                }
            }
        }
    }
    // An event that cannot be encoded fails the batch (it is spilled), never silently dropped.
    let Some(messages) = events.iter().map(message).collect::<Option<Vec<Fields>>>() else {
        return false;
    };
    sink.producer
        .publish_many(stream_names::AUDIT_EVENTS, messages)
        .await
        .is_ok()
}

async fn write_batch(
    jobs: Vec<Job>,
    sink: &Sink,
    spill: &Spill,
    lost: &AtomicBool,
    metrics: &EvidenceMetrics,
) {
    let (events, answers): (Vec<Event>, Vec<oneshot::Sender<Result<(), EvidenceError>>>) =
        jobs.into_iter().map(|job| (job.event, job.done)).unzip();
    let outcome = if publish(sink, metrics, &events).await {
        Ok(())
    } else {
        let spill = spill.clone();
        let count = events.len() as u64;
        let written = tokio::task::spawn_blocking(move || spill.write(&events)).await;
        match written {
            Ok(Ok(())) => {
                metrics.spilled_total.inc_by(count);
                Ok(())
            }
            failed => {
                let error = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => "the replay writer stopped".to_owned(),
                };
                tracing::error!(%error, count, "audit evidence lost: the bus and the replay file both failed");
                lost.store(true, Ordering::SeqCst);
                metrics.lost_total.inc_by(count);
                Err(EvidenceError::Lost)
            }
        }
    };
    for answer in answers {
        let _ = answer.send(outcome);
    }
}

async fn write_loop(
    mut receiver: mpsc::Receiver<Job>,
    sink: Sink,
    spill: Spill,
    batch: usize,
    lost: Arc<AtomicBool>,
    metrics: Arc<EvidenceMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut jobs = Vec::with_capacity(batch);
    loop {
        let stopping = tokio::select! {
            received = receiver.recv_many(&mut jobs, batch) => {
                if received == 0 {
                    return;
                }
                false
            }
            changed = stop.changed() => changed.is_err() || *stop.borrow(),
        };
        if stopping {
            // Take nothing new; write what is already queued, then end.
            receiver.close();
            while receiver.recv_many(&mut jobs, batch).await > 0 {
                write_batch(std::mem::take(&mut jobs), &sink, &spill, &lost, &metrics).await;
            }
            return;
        }
        if !jobs.is_empty() {
            write_batch(std::mem::take(&mut jobs), &sink, &spill, &lost, &metrics).await;
        }
    }
}

/// Re-sends one replay file; `true` if it is out of the way afterwards. A file with a line that
/// cannot be read is corruption, not a transient failure: its readable events are sent, the
/// file is kept beside the others as `<name>.unreadable` for the operator, and evidence counts
/// as lost (latched), since what that line held can no longer reach the ledger.
async fn replay_file(sink: &Sink, path: &Path, batch: usize, watch: &Watch) -> bool {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(text) => text,
        Err(error) => {
            tracing::warn!(%error, file = %path.display(), "audit replay file unreadable for now");
            return false;
        }
    };
    let mut unreadable = 0_u64;
    let events: Vec<Event> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .filter_map(|line| match serde_json::from_str(line) {
            Ok(event) => Some(event),
            Err(error) => {
                tracing::error!(%error, file = %path.display(), "unreadable line in an audit replay file");
                unreadable += 1;
                None
            }
        })
        .collect();
    for chunk in events.chunks(batch) {
        if !publish(sink, &watch.metrics, chunk).await {
            return false;
        }
    }
    watch.metrics.replayed_total.inc_by(events.len() as u64);
    // A re-send after a crash between publish and removal is absorbed: ingestion is
    // idempotent on the event id.
    let removed = if unreadable == 0 {
        tokio::fs::remove_file(path).await
    } else {
        watch.lost.store(true, Ordering::SeqCst);
        watch.metrics.lost_total.inc_by(unreadable);
        tokio::fs::rename(path, path.with_extension("ndjson.unreadable")).await
    };
    if removed.is_err() {
        return false;
    }
    if let Some(directory) = path.parent() {
        let _ = std::fs::File::open(directory).and_then(|directory| directory.sync_all());
    }
    true
}

/// What the replayer reports to: the evidence-lost latch and the metrics.
struct Watch {
    lost: Arc<AtomicBool>,
    metrics: Arc<EvidenceMetrics>,
}

async fn replay_loop(
    sink: Sink,
    spill: Spill,
    batch: usize,
    interval: Duration,
    watch: Watch,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let files = spill.pending();
        for path in &files {
            if !replay_file(&sink, path, batch, &watch).await {
                break;
            }
        }
        let waiting = spill.pending();
        watch
            .metrics
            .replay_files
            .set(i64::try_from(waiting.len()).unwrap_or(i64::MAX));
        let oldest = waiting
            .iter()
            .filter_map(|path| {
                std::fs::metadata(path)
                    .and_then(|meta| meta.modified())
                    .ok()
            })
            .min()
            .and_then(|written| written.elapsed().ok())
            .map_or(0, |age| i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
        watch.metrics.replay_oldest_age_seconds.set(oldest);
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests;
