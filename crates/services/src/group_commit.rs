//! Group commit for authority records: many concurrent mints share one transaction, so a
//! mint waits for one durable commit instead of queueing behind every other mint's commit.
//! A caller is answered only after its record is committed (or known to have failed). A store
//! that groups concurrent writes itself (the embedded one) is written directly: a task of our
//! own in front of its writer thread would only add two wake-ups to every mint.

use std::sync::Arc;

use caracal_store::{AuthorityRecord, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<Result<(), StoreError>>;

/// Writes authority records: directly, or through the committing task. Cheap to clone.
#[derive(Clone)]
pub enum AuthorityWriter {
    Direct(Arc<dyn Store>),
    Grouped(mpsc::Sender<(AuthorityRecord, Reply)>),
}

impl AuthorityWriter {
    /// The writer `store` needs: direct when it groups concurrent writes itself, else
    /// [`AuthorityWriter::grouped`].
    pub fn start(store: Arc<dyn Store>, max_batch: usize) -> AuthorityWriter {
        if store.groups_concurrent_writes() {
            AuthorityWriter::Direct(store)
        } else {
            AuthorityWriter::grouped(store, max_batch).0
        }
    }

    /// Starts the committing task; it ends when every writer is dropped.
    pub fn grouped(
        store: Arc<dyn Store>,
        max_batch: usize,
    ) -> (AuthorityWriter, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(max_batch.max(1) * 4);
        let task = tokio::spawn(commit_loop(store, receiver, max_batch.max(1)));
        (AuthorityWriter::Grouped(sender), task)
    }

    /// Writes `record`; returns once it is committed.
    pub async fn write(&self, record: AuthorityRecord) -> Result<(), StoreError> {
        match self {
            AuthorityWriter::Direct(store) => {
                store
                    .insert_authority_records(std::slice::from_ref(&record))
                    .await
            }
            AuthorityWriter::Grouped(sender) => {
                let stopped = || StoreError::Unavailable("authority writer stopped".into());
                let (reply, answer) = oneshot::channel();
                sender.send((record, reply)).await.map_err(|_| stopped())?;
                answer.await.map_err(|_| stopped())?
            }
        }
    }
}

async fn commit_loop(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<(AuthorityRecord, Reply)>,
    max_batch: usize,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while receiver.recv_many(&mut batch, max_batch).await > 0 {
        let (records, replies): (Vec<AuthorityRecord>, Vec<Reply>) = batch.drain(..).unzip();
        match store.insert_authority_records(&records).await {
            Ok(()) => {
                for reply in replies {
                    let _ = reply.send(Ok(()));
                }
            }
            // One bad record (a duplicate id) must not fail its neighbours: retry one by one.
            Err(StoreError::Conflict(_)) if records.len() > 1 => {
                for (record, reply) in records.into_iter().zip(replies) {
                    let _ = reply.send(
                        store
                            .insert_authority_records(std::slice::from_ref(&record))
                            .await,
                    );
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use caracal_store::SqliteStore;
    use caracal_store::prelude::*;

    use super::*;

    fn record(id: &str) -> AuthorityRecord {
        AuthorityRecord {
            id: id.to_owned(),
            zone_id: "zone-1".into(),
            session_type: "application".into(),
            subject_id: "app".into(),
            parent_id: None,
            status: "active".into(),
            claims: "{}".into(),
            expires_at_ms: 1,
            authenticated_at_ms: 1,
            created_at_ms: 1,
            revoked_at_ms: None,
            revoked_reason: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_commit_and_a_bad_record_fails_alone() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        let direct = AuthorityWriter::start(Arc::new(store.clone()), 64);
        assert!(matches!(direct, AuthorityWriter::Direct(_)));
        concurrent_writes(&store, direct, "direct").await;
        let (grouped, task) = AuthorityWriter::grouped(Arc::new(store.clone()), 64);
        concurrent_writes(&store, grouped, "grouped").await;
        task.await.unwrap();
    }

    /// 200 concurrent writes of zone `zone`, one of them an id already taken.
    async fn concurrent_writes(store: &SqliteStore, writer: AuthorityWriter, zone: &'static str) {
        let record = move |id: &str| AuthorityRecord {
            zone_id: zone.to_owned(),
            ..record(&format!("{zone}-{id}"))
        };
        writer.write(record("taken")).await.unwrap();
        let writes: Vec<_> = (0..200)
            .map(|n| {
                let writer = writer.clone();
                let id = if n == 100 {
                    "taken".to_owned()
                } else {
                    format!("ar-{n}")
                };
                tokio::spawn(async move { (n, writer.write(record(&id)).await) })
            })
            .collect();
        for write in writes {
            let (n, result) = write.await.unwrap();
            if n == 100 {
                assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");
            } else {
                result.unwrap();
            }
        }
        assert_eq!(
            store
                .list_authority_records_of(zone, "app")
                .await
                .unwrap()
                .len(),
            200
        );
    }
}
