//! Test doubles shared by the unit tests of this crate.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use caracal_bus::{BusError, EmbeddedBus, Entry, PendingEntry, StreamInfo, Streams};
use caracal_core::Role;
use caracal_store::SqliteStore;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use crate::evidence::{Evidence, EvidenceConfig, EvidenceTasks};
use crate::state::{Bus, RoleState, Shared};

/// A bus whose appends always fail, as Redis does while it is down.
pub struct DownBus;

#[async_trait::async_trait]
impl caracal_bus::RateCounter for DownBus {
    async fn hit(&self, _: &str, _: Duration) -> Result<u64, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
}

#[async_trait::async_trait]
impl caracal_bus::ReplayRegistry for DownBus {
    async fn claim_once(
        &self,
        _: caracal_bus::ReplayNamespace,
        _: &str,
        _: Duration,
    ) -> Result<bool, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn purge_expired(&self) -> Result<u64, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
}

#[async_trait::async_trait]
impl Streams for DownBus {
    async fn append(&self, _: &str, _: &caracal_bus::Fields) -> Result<String, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn append_many(
        &self,
        _: &str,
        _: &[caracal_bus::Fields],
    ) -> Result<Vec<String>, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn ensure_group(&self, _: &str, _: &str) -> Result<(), BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn ensure_group_at_end(&self, _: &str, _: &str) -> Result<(), BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn read_group(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: usize,
        _: Duration,
    ) -> Result<Vec<Entry>, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn ack(&self, _: &str, _: &str, _: &[String]) -> Result<u64, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn pending(&self, _: &str, _: &str, _: usize) -> Result<Vec<PendingEntry>, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn claim_idle(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: Duration,
        _: usize,
    ) -> Result<Vec<Entry>, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn info(&self, _: &str) -> Result<StreamInfo, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn range(&self, _: &str, _: Option<&str>, _: usize) -> Result<Vec<Entry>, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn delete(&self, _: &str, _: &[String]) -> Result<u64, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn trim_consumed(&self, _: &str) -> Result<u64, BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
    async fn ping(&self) -> Result<(), BusError> {
        Err(BusError::Unavailable("connection refused".into()))
    }
}

/// What a test must keep alive: the data directory and the evidence producer's tasks.
pub(crate) type Keep = (tempfile::TempDir, EvidenceTasks);

/// The shared state of a process over `store` and `bus`, with an evidence producer.
pub(crate) fn shared_with_bus(
    directory: tempfile::TempDir,
    store: SqliteStore,
    bus: Bus,
) -> (Keep, Shared) {
    shared_with_store(directory, Arc::new(store), bus)
}

/// [`shared_with_bus`] over any store.
pub(crate) fn shared_with_store(
    directory: tempfile::TempDir,
    store: Arc<dyn caracal_store::Store>,
    bus: Bus,
) -> (Keep, Shared) {
    let replay_dir = directory.path().join("audit-replay");
    let producer = caracal_bus::Producer::new(
        Arc::clone(&bus.streams),
        caracal_bus::signature::StreamKey::new(b"k"),
    );
    let (evidence, tasks) =
        Evidence::start(producer, EvidenceConfig::new(replay_dir.clone())).unwrap();
    (
        (directory, tasks),
        Shared::new(
            store,
            bus,
            evidence,
            replay_dir,
            caracal_crypto::Kek::generate().unwrap(),
        ),
    )
}

pub(crate) fn role_state(role: Role) -> (Keep, RoleState) {
    let directory = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
    let bus = Bus::embedded(EmbeddedBus::new(store.clone()));
    let (keep, shared) = shared_with_bus(directory, store, bus);
    (keep, RoleState::new(role, shared))
}

pub(crate) async fn token(
    shared: &Shared,
    capabilities: &str,
    scope: caracal_store::TokenScope,
) -> String {
    let token = caracal_crypto::AdminToken::generate().unwrap();
    shared
        .store
        .insert_admin_token(
            &caracal_store::NewAdminToken {
                id: format!("tok_{}", uuid::Uuid::now_v7().simple()),
                name: "test".into(),
                digest: token.digest(),
                scope,
                capabilities: capabilities.into(),
                created_by: "test".into(),
            },
            &[],
        )
        .await
        .unwrap();
    token.expose().to_owned()
}

pub(crate) async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let authorization = bearer.map(|bearer| format!("Bearer {bearer}"));
    let headers: Vec<(&str, &str)> = authorization
        .as_deref()
        .map(|value| ("authorization", value))
        .into_iter()
        .collect();
    call_with(app, method, path, &headers, body).await
}

/// [`call`] with any headers.
pub(crate) async fn call_with(
    app: &axum::Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// A store that works until `down` is set, then answers every statement as unavailable, as a
/// database that went away does.
pub struct SwitchableStore {
    pub inner: SqliteStore,
    pub down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl caracal_store::db::Db for SwitchableStore {
    fn dialect(&self) -> caracal_store::db::Dialect {
        caracal_store::db::Db::dialect(&self.inner)
    }

    async fn atomic_with(
        &self,
        first: Vec<caracal_store::db::Statement>,
        then: caracal_store::db::Then,
    ) -> Result<Vec<caracal_store::db::Outcome>, caracal_store::StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(caracal_store::StoreError::Unavailable(
                "connection refused".into(),
            ));
        }
        caracal_store::db::Db::atomic_with(&self.inner, first, then).await
    }
}

/// The shared state of a process over a fresh [`SwitchableStore`] (and an embedded bus on the
/// same file, which stays up when the store goes down).
pub(crate) fn switchable_shared() -> (Keep, Arc<SwitchableStore>, Shared) {
    let directory = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&directory.path().join("store.db")).unwrap();
    let store = Arc::new(SwitchableStore {
        inner: sqlite.clone(),
        down: false.into(),
    });
    let bus = Bus::embedded(EmbeddedBus::new(sqlite));
    let (keep, shared) = shared_with_store(directory, store.clone(), bus);
    (keep, store, shared)
}

/// Evidence whose bus and replay directory both refuse: it latches lost on the first event
/// (recorded here), as after a real double failure. Keep the directory and tasks alive.
pub(crate) async fn lost_evidence() -> (
    crate::evidence::Evidence,
    (tempfile::TempDir, crate::evidence::EvidenceTasks),
) {
    let directory = tempfile::tempdir().unwrap();
    let replay = directory.path().join("replay");
    let (evidence, tasks) = crate::evidence::Evidence::start(
        caracal_bus::Producer::new(
            std::sync::Arc::new(DownBus),
            caracal_bus::signature::StreamKey::new(b"k"),
        ),
        crate::evidence::EvidenceConfig::new(replay.clone()),
    )
    .unwrap();
    // The replay directory becomes unusable too.
    std::fs::remove_dir_all(&replay).unwrap();
    std::fs::write(&replay, "not a directory").unwrap();
    let probe = caracal_audit::Event {
        id: "probe".into(),
        zone_id: "z".into(),
        event_type: "probe".into(),
        request_id: "r".into(),
        decision: "allow".into(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "complete".into(),
        determining_policies_json: serde_json::json!([]),
        diagnostics_json: serde_json::json!([]),
        metadata_json: serde_json::json!({}),
        occurred_at_ms: 0,
    };
    assert!(evidence.record(probe).await.is_err());
    assert!(evidence.is_lost());
    (evidence, (directory, tasks))
}

/// A lifecycle mandate's claims (zone `z`, application `app`), to vary in a test.
pub(crate) fn claims() -> crate::wire::MandateClaims {
    crate::wire::MandateClaims {
        iss: "http://sts".into(),
        sub: "app".into(),
        aud: vec!["http://sts".into()],
        exp: 2_000,
        iat: 1_000,
        jti: "j".into(),
        zone_id: "z".into(),
        client_id: "app".into(),
        sid: "s".into(),
        root_sid: "s".into(),
        use_: "session".into(),
        sub_type: "application".into(),
        scope: Some("agent:lifecycle".into()),
        target: None,
        agent_session_id: None,
        delegation_edge_id: None,
        source_session_id: None,
        target_session_id: None,
        delegation_path: None,
        delegation_chain: None,
        hop_count: None,
        delegation_graph_epoch: None,
    }
}

/// The audit events waiting in the outbox (claimed, so each is seen once), as JSON.
pub(crate) async fn outbox_events(store: &dyn caracal_store::Store) -> Vec<serde_json::Value> {
    store
        .claim_outbox("test", 1000, Duration::from_secs(60))
        .await
        .unwrap()
        .iter()
        .filter_map(|row| serde_json::from_str(row.fields.get("data")?).ok())
        .collect()
}

/// The audit events recorded on the evidence stream so far, as JSON.
pub(crate) async fn stream_events(shared: &Shared) -> Vec<serde_json::Value> {
    shared
        .bus
        .streams
        .range(caracal_bus::stream_names::AUDIT_EVENTS, None, 100_000)
        .await
        .unwrap()
        .iter()
        .filter_map(|entry| serde_json::from_str(entry.fields.get("data")?).ok())
        .collect()
}

/// Waits, if need be, until at least `needed_secs` remain of the current minute of the clock:
/// the rate counters' budgets are fixed minutes, so a test counting up to a budget must not be
/// cut in two by a minute that ends half-way.
pub(crate) async fn budget_minute_ahead(needed_secs: u64) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let left_ms = u64::try_from(60_000 - now_ms % 60_000).unwrap();
    if left_ms < needed_secs * 1000 {
        tokio::time::sleep(Duration::from_millis(left_ms + 10)).await;
    }
}
