//! Running a set of roles in one process: bind everything first, then open the data, then
//! serve until told to stop, then drain.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use caracal_bus::signature::StreamKey;
use caracal_bus::{BusError, EmbeddedBus, Producer, RedisBus};
use caracal_core::Role;
use caracal_crypto::AdminToken;
use caracal_store::{
    Bootstrap, BootstrapError, BootstrapToken, DataDir, DataDirError, PgOptions, PgStore,
    SqliteStore, Store, StoreError, StoreUrl,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::evidence::{Evidence, EvidenceConfig, EvidenceTasks};
use crate::outbox::{Dispatcher, DispatcherConfig};
use crate::router::router;
use crate::settings::{BusUrl, SecretBytes, Settings};
use crate::state::{Bus, RoleState, Shared};

/// Where audit events wait (fsynced) while the bus is unavailable.
pub const REPLAY_DIR: &str = "audit-replay";

/// The stream-signing key file, used when no key is configured.
pub const STREAM_KEY_FILE: &str = "stream-key";
/// The key a `caracal incident rotate stream-key` replaced, accepted until it is deleted.
pub const PREVIOUS_STREAM_KEY_FILE: &str = "stream-key.previous";

/// Written to `$CARACAL_HOME` once every port is bound, removed on clean exit: tells
/// `caracal status` where the running roles listen (ports may have been chosen by the OS).
pub const RUN_FILE: &str = "run.json";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunFile {
    pub pid: u32,
    pub roles: Vec<RunFileRole>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunFileRole {
    pub role: String,
    pub address: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "the embedded bus needs the embedded store; with store `{store}` use a Redis bus \
         (--bus redis://…) so every replica sees every message"
    )]
    EmbeddedBusNeedsEmbeddedStore { store: String },
    #[error("bus `{url}`: {source}")]
    Bus { url: String, source: BusError },
    #[error("audit replay directory {0}")]
    Evidence(String),
    #[error("the STS could not start: {0}")]
    Sts(String),
    #[error("the Gateway could not start: {0}")]
    Gateway(String),
    #[error("stream key file {path}: {message}")]
    StreamKey { path: String, message: String },
    #[error("{role}: cannot listen on {address}: {source}")]
    Bind {
        role: Role,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("run file: {0}")]
    RunFile(String),
}

/// A started, not yet serving, set of roles.
pub struct Stack {
    evidence_tasks: EvidenceTasks,
    /// Unique per process across replicas: names this process in outbox claims and leases.
    instance: String,
    shared: Shared,
    stream_key: StreamKey,
    data_dir: DataDir,
    listeners: Vec<(Role, TcpListener)>,
    bootstrap: Bootstrap,
    shutdown_grace: Duration,
    audit_retention: Option<Duration>,
    audit_reclaim_idle: Duration,
    console_secure_cookies: bool,
    control_enabled: bool,
    peers: Vec<(Role, SocketAddr)>,
    issuer: String,
    coordinator_limits: crate::coordinator::Limits,
    gateway_config: crate::gateway::GatewayConfig,
    runtime_retention: Duration,
}

impl Stack {
    /// Binds every role's port (all or nothing), then opens the data directory and store and
    /// bootstraps the deployment. A failure leaves no listener open and no data changed beyond
    /// what a completed first start would have written.
    pub async fn start(settings: &Settings, roles: &[Role]) -> Result<Stack, StartError> {
        if let (StoreUrl::Postgres(_), BusUrl::Embedded) = (&settings.store, &settings.bus) {
            return Err(StartError::EmbeddedBusNeedsEmbeddedStore {
                store: settings.store.to_string(),
            });
        }

        let mut listeners = Vec::with_capacity(roles.len());
        for &role in roles {
            let address = SocketAddr::new(settings.bind, settings.port(role));
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| StartError::Bind {
                    role,
                    address,
                    source,
                })?;
            listeners.push((role, listener));
        }

        let data_dir = DataDir::open(&settings.home)?;
        let (store, embedded): (Arc<dyn Store>, Option<SqliteStore>) = match &settings.store {
            StoreUrl::Sqlite(path) => {
                let sqlite = SqliteStore::open(path)?;
                (Arc::new(sqlite.clone()), Some(sqlite))
            }
            StoreUrl::Postgres(url) => {
                let options = PgOptions {
                    pool_size: settings.store_pool_size,
                    statement_timeout: settings.store_statement_timeout,
                    schema: settings.store_schema.clone(),
                    ..PgOptions::default()
                };
                (Arc::new(PgStore::connect(url, &options).await?), None)
            }
        };
        let bus = match (&settings.bus, embedded) {
            (BusUrl::Redis(url), _) => Bus::redis(RedisBus::connect(url).await.map_err(
                |source| StartError::Bus {
                    url: settings.bus.to_string(),
                    source,
                },
            )?),
            (BusUrl::Embedded, Some(sqlite)) => Bus::embedded(EmbeddedBus::new(sqlite)),
            (BusUrl::Embedded, None) => {
                return Err(StartError::EmbeddedBusNeedsEmbeddedStore {
                    store: settings.store.to_string(),
                });
            }
        };
        let stream_key = stream_key(
            settings.stream_key.as_ref(),
            settings.stream_key_previous.as_ref(),
            &data_dir,
        )?;
        let bootstrap = caracal_store::bootstrap(&data_dir, store.as_ref()).await?;
        let replay_dir = data_dir.path().join(REPLAY_DIR);
        let mut evidence_config = EvidenceConfig::new(replay_dir.clone());
        if settings.bus == BusUrl::Embedded {
            // The stream and the ledger share one writer: the stream would only add writes.
            evidence_config.ledger = Some(crate::evidence::DirectLedger {
                store: Arc::clone(&store),
                kek: bootstrap.kek.clone(),
            });
        }
        let (evidence, evidence_tasks) = Evidence::start(
            Producer::new(Arc::clone(&bus.streams), stream_key.clone()),
            evidence_config,
        )
        .map_err(|error| StartError::Evidence(format!("{}: {error}", replay_dir.display())))?;
        Ok(Stack {
            evidence_tasks,
            instance: format!("{}-{}", std::process::id(), uuid::Uuid::now_v7().simple()),
            shared: {
                let mut shared =
                    Shared::new(store, bus, evidence, replay_dir, bootstrap.kek.clone());
                shared.metrics_bearer = settings.metrics_bearer_text();
                shared.audit_retention = settings.audit_retention;
                shared.mint_limit_ceiling = settings.mint_rate_limit_per_minute;
                shared.upstream_host_allowlist = settings.gateway.host_allowlist.clone();
                shared
            },
            stream_key,
            data_dir,
            listeners,
            bootstrap,
            shutdown_grace: settings.shutdown_grace,
            audit_retention: settings.audit_retention,
            audit_reclaim_idle: settings.audit_reclaim_idle,
            console_secure_cookies: settings.console_secure_cookies,
            control_enabled: settings.control_enabled,
            peers: settings.peers.clone(),
            issuer: settings.issuer_url.clone(),
            gateway_config: settings.gateway.clone(),
            runtime_retention: settings.coordinator_retention,
            coordinator_limits: crate::coordinator::Limits {
                max_depth: i64::try_from(settings.coordinator_max_depth).unwrap_or(i64::MAX),
                max_children: usize::try_from(settings.coordinator_max_children)
                    .unwrap_or(usize::MAX),
                sessions_per_zone: i64::try_from(settings.coordinator_sessions_per_zone)
                    .unwrap_or(i64::MAX),
                sessions_per_application: i64::try_from(
                    settings.coordinator_sessions_per_application,
                )
                .unwrap_or(i64::MAX),
                ..crate::coordinator::Limits::default()
            },
        })
    }

    /// Offers the binary's validate and preserve to the API and the console.
    pub fn set_operator_tools(&mut self, tools: Arc<dyn crate::recovery::OperatorTools>) {
        self.shared.operator_tools = Some(tools);
    }

    /// Where each role listens, in start order.
    pub fn addresses(&self) -> Vec<(Role, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(role, listener)| {
                listener.local_addr().ok().map(|address| (*role, address))
            })
            .collect()
    }

    /// The bootstrap admin token if this start minted it: the only moment it can be shown.
    pub fn minted_token(&self) -> Option<&AdminToken> {
        match &self.bootstrap.admin_token {
            BootstrapToken::Minted(token) => Some(token),
            BootstrapToken::Existing => None,
        }
    }

    pub fn kek_id(&self) -> &str {
        self.bootstrap.kek.key_id()
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.data_dir
    }

    /// Serves every role until `shutdown` completes, then drains: `/ready` turns 503
    /// `draining`, listeners stop accepting, in-flight requests finish (bounded by the grace
    /// period), and the run file is removed.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let run_file = RunFile {
            pid: std::process::id(),
            roles: self
                .addresses()
                .into_iter()
                .map(|(role, address)| RunFileRole {
                    role: role.name().to_owned(),
                    address,
                })
                .collect(),
        };
        let run_text = serde_json::to_string_pretty(&run_file)
            .map_err(|error| StartError::RunFile(error.to_string()))?;
        self.data_dir.write_private_file(RUN_FILE, &run_text)?;

        let (stop_sender, stop_receiver) = tokio::sync::watch::channel(false);
        let mut servers = tokio::task::JoinSet::new();
        // Each role has its own share, so a flood on one (the Gateway's port, say) leaves the
        // others, the admin API's revocation among them, their places.
        let open_files = crate::serve::raise_open_files_limit();
        let places_per_role = crate::serve::places_per_role(open_files, self.listeners.len());
        // Containment switches are in force before the first request is served.
        if let Err(error) = self
            .shared
            .containment
            .refresh(self.shared.store.as_ref())
            .await
        {
            tracing::warn!(%error, "containment switches could not be read at start");
        }
        servers.spawn(crate::containment::follow(
            self.shared.containment.clone(),
            Arc::clone(&self.shared.store),
            stop_receiver.clone(),
        ));
        let mut peers = self.addresses();
        peers.extend(self.peers.iter().copied());
        let peers = Arc::new(peers);
        let mut listeners = std::mem::take(&mut self.listeners);
        // The STS starts before the Gateway, which then exchanges with it in process.
        listeners.sort_by_key(|(role, _)| *role);
        let mut in_process_sts = None;
        for (role, listener) in listeners {
            if let Ok(address) = listener.local_addr() {
                tracing::info!(%role, %address, "serving");
            }
            let mut state = RoleState::new(role, self.shared.clone());
            if role == Role::Console {
                state.peers = Arc::clone(&peers);
                state.console = crate::console::Console::new(self.console_secure_cookies);
            }
            if role == Role::Api {
                let control =
                    crate::control::Control::new(self.control_enabled, self.issuer.clone());
                servers.spawn(crate::keys::follow_invalidations(
                    control.keys.clone(),
                    Arc::clone(&self.shared.bus.streams),
                    stop_receiver.clone(),
                ));
                state.control = Some(control);
                // The API role owns the outbox; it stops with the servers and leaves unsent
                // rows in place for the next start.
                let dispatcher = Dispatcher::new(
                    Arc::clone(&self.shared.store),
                    Producer::new(
                        Arc::clone(&self.shared.bus.streams),
                        self.stream_key.clone(),
                    ),
                    DispatcherConfig::new(format!("api-{}", self.instance)),
                    state.metrics.outbox.clone(),
                );
                servers.spawn(dispatcher.run(stop_receiver.clone()));
                let (store, replay, streams) = (
                    Arc::clone(&self.shared.store),
                    Arc::clone(&self.shared.bus.replay),
                    Arc::clone(&self.shared.bus.streams),
                );
                servers.spawn(crate::singleton::run_singleton(
                    Arc::clone(&self.shared.store),
                    "retention",
                    format!("api-{}", self.instance),
                    Duration::from_secs(60),
                    move || {
                        let (store, replay, streams) = (
                            Arc::clone(&store),
                            Arc::clone(&replay),
                            Arc::clone(&streams),
                        );
                        async move {
                            crate::singleton::retention(
                                store.as_ref(),
                                replay.as_ref(),
                                streams.as_ref(),
                            )
                            .await;
                        }
                    },
                    stop_receiver.clone(),
                ));
            }
            if role == Role::Api {
                let shared = self.shared.clone();
                let metrics = state.metrics.notifier.clone().unwrap_or_default();
                servers.spawn(crate::singleton::run_singleton(
                    Arc::clone(&self.shared.store),
                    "notifications",
                    format!("api-{}", self.instance),
                    crate::notifier::ROUND,
                    move || {
                        let (shared, metrics) = (shared.clone(), Arc::clone(&metrics));
                        async move { crate::notifier::run_once(&shared, &metrics).await }
                    },
                    stop_receiver.clone(),
                ));
            }
            if role == Role::Sts {
                self.start_sts(&mut state, &mut servers, &stop_receiver)
                    .await?;
                in_process_sts = state.sts.clone();
            }
            if role == Role::Gateway {
                // Stable across restarts of the same replica, distinct between replicas: its
                // revocation consumer group resumes where it stopped instead of piling up.
                let replica = format!(
                    "{}:{}",
                    host_name().unwrap_or_else(|| self.instance.clone()),
                    listener
                        .local_addr()
                        .map(|address| address.port())
                        .unwrap_or(0)
                );
                self.start_gateway(
                    &mut state,
                    in_process_sts.clone(),
                    replica,
                    &mut servers,
                    &stop_receiver,
                )
                .await?;
            }
            if role == Role::Coordinator {
                let coordinator =
                    crate::coordinator::start_state(self.issuer.clone(), self.coordinator_limits);
                servers.spawn(crate::keys::follow_invalidations(
                    coordinator.keys.clone(),
                    Arc::clone(&self.shared.bus.streams),
                    stop_receiver.clone(),
                ));
                state.coordinator = Some(coordinator);
                let (store, keep) = (Arc::clone(&self.shared.store), self.runtime_retention);
                servers.spawn(crate::singleton::run_singleton(
                    Arc::clone(&self.shared.store),
                    "runtime-retention",
                    format!("coordinator-{}", self.instance),
                    Duration::from_secs(3600),
                    move || {
                        let store = Arc::clone(&store);
                        async move { crate::coordinator::purge_ended(store.as_ref(), keep).await }
                    },
                    stop_receiver.clone(),
                ));
                let store = Arc::clone(&self.shared.store);
                servers.spawn(crate::singleton::run_singleton(
                    Arc::clone(&self.shared.store),
                    "session-sweep",
                    format!("coordinator-{}", self.instance),
                    Duration::from_secs(5),
                    move || {
                        let store = Arc::clone(&store);
                        async move { crate::coordinator::sweep_lapsed(store.as_ref()).await }
                    },
                    stop_receiver.clone(),
                ));
            }
            if role == Role::Audit {
                self.start_ledger(&state, &mut servers, &stop_receiver)
                    .await?;
            }
            let metrics = state.metrics.connections.clone();
            let app = router(state);
            let stop = stop_receiver.clone();
            let connections = Arc::new(tokio::sync::Semaphore::new(places_per_role));
            servers.spawn(async move {
                if let Err(error) =
                    crate::serve::serve_until_stopped(listener, app, connections, metrics, stop)
                        .await
                {
                    tracing::error!(%role, %error, "server stopped with an error");
                }
            });
        }

        shutdown.await;
        tracing::info!("shutdown requested: draining");
        self.shared.start_draining();
        let _ = stop_sender.send(true);
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            while servers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                grace_seconds = self.shutdown_grace.as_secs(),
                "in-flight requests did not finish within the grace period; cutting them off"
            );
            servers.abort_all();
        }
        // Invariant 5: every event a request recorded is on the bus or in a replay file.
        self.evidence_tasks.shutdown().await;
        let run_path = self.data_dir.path().join(RUN_FILE);
        if let Err(error) = std::fs::remove_file(&run_path) {
            tracing::warn!(%error, path = %run_path.display(), "could not remove the run file");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

impl Stack {
    /// The STS's state and background work: every live zone gets a signing key if it lacks
    /// one, each zone's active policy bundle is held in memory (and acknowledged in the
    /// store), and rotations elsewhere flush the key cache.
    async fn start_sts(
        &self,
        state: &mut RoleState,
        servers: &mut tokio::task::JoinSet<()>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), StartError> {
        let created = crate::keys::ensure_zone_keys(self.shared.store.as_ref(), &self.shared.kek)
            .await
            .map_err(|error| StartError::Sts(error.to_string()))?;
        if created > 0 {
            tracing::info!(
                zones = created,
                "created signing keys for zones that had none"
            );
        }
        let mut policies = crate::policy::PolicyCache::default();
        if let Some(metrics) = &state.metrics.sts {
            policies.load_failures = metrics.policy_load_failures.clone();
        }
        let mut core = crate::sts::Sts::start(
            self.issuer.clone(),
            policies.clone(),
            Arc::clone(&self.shared.store),
            &self.shared.kek,
        )
        .with_mint_limit(self.shared.mint_limit_ceiling)
        .with_provider_host_allowlist(self.gateway_config.host_allowlist.clone());
        if let Some(metrics) = &state.metrics.sts {
            core.connection_refresh_failures = metrics.connection_refresh_failures.clone();
        }
        let sts = Arc::new(core);
        servers.spawn(crate::policy::run_loader(
            policies.clone(),
            Arc::clone(&self.shared.store),
            Arc::clone(&self.shared.bus.streams),
            format!("sts-{}", self.instance),
            Duration::from_secs(30),
            stop.clone(),
        ));
        if let Err(error) = sts.refresh_mint_limit(&*self.shared.store).await {
            tracing::warn!(%error, "operator mint limit unreadable: the deployment's limit applies");
        }
        {
            let (sts, store, mut stop) = (
                Arc::clone(&sts),
                Arc::clone(&self.shared.store),
                stop.clone(),
            );
            servers.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(crate::sts::MINT_LIMIT_REFRESH) => {}
                    }
                    if let Err(error) = sts.refresh_mint_limit(&*store).await {
                        tracing::warn!(%error, "operator mint limit unreadable: the limit in force stays");
                    }
                }
            });
        }
        servers.spawn(crate::keys::follow_invalidations(
            sts.keys.clone(),
            Arc::clone(&self.shared.bus.streams),
            stop.clone(),
        ));
        if let Some(metrics) = state.metrics.sts.clone() {
            let mut stop = stop.clone();
            servers.spawn(async move {
                loop {
                    let age = policies.age_seconds(caracal_store::now_ms());
                    metrics.policy_bundle_age_seconds.set(age);
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            });
        }
        state.sts = Some(sts);
        Ok(())
    }

    /// The Gateway's state and background work: its revocation view (snapshot loop and stream
    /// consumer), its key cache following rotations, and its gauges.
    async fn start_gateway(
        &self,
        state: &mut RoleState,
        in_process_sts: Option<Arc<crate::sts::Sts>>,
        replica: String,
        servers: &mut tokio::task::JoinSet<()>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), StartError> {
        use crate::gateway::{Gateway, exchange, revocation};
        let config = self.gateway_config.clone();
        let issued = in_process_sts.as_ref().and_then(|sts| sts.keys.issued());
        let exchanger = match in_process_sts {
            Some(sts) => exchange::Exchanger::InProcess(sts),
            None => exchange::Exchanger::Remote(Box::new(
                exchange::RemoteSts::new(
                    &config.sts_url,
                    self.shared.kek.derive(crate::gateway_sts::KEY_LABEL),
                    config.sts_timeout,
                )
                .map_err(StartError::Gateway)?,
            )),
        };
        let metrics = state.metrics.gateway.clone().unwrap_or_default();
        let mut gateway =
            Gateway::new(config, exchanger, Arc::clone(&metrics)).map_err(StartError::Gateway)?;
        // The STS beside it signed the gateway mandates it is shown: they need no second ES256
        // verification (`keys::Issued`).
        if let Some(issued) = issued {
            gateway.keys = std::mem::take(&mut gateway.keys).sharing(issued);
        }
        let gateway = Arc::new(gateway);
        // The replica's group exists before the first snapshot is read, so a revocation
        // published in between is in the snapshot or read from the stream, never lost.
        match self
            .shared
            .bus
            .streams
            .ensure_group_at_end(
                caracal_bus::stream_names::SESSIONS_REVOKE,
                &revocation::group_name(&replica),
            )
            .await
        {
            Ok(()) => gateway.revocations.stream_followed(),
            Err(error) => {
                tracing::warn!(%error, "the revocation stream group could not be created yet; retrying in the consumer");
            }
        }
        // The first snapshot before serving: the Gateway is fresh from its first request (a
        // failure leaves it stale, refusing, until the loop's next attempt succeeds).
        if let Err(error) = gateway.revocations.reload(self.shared.store.as_ref()).await {
            tracing::warn!(%error, "the first revocation snapshot failed; the Gateway refuses until one loads");
        }
        servers.spawn(revocation::keep_confirmed(
            Arc::clone(&gateway.revocations),
            Arc::clone(&self.shared.store),
            Arc::clone(&metrics),
            revocation::SNAPSHOT_INTERVAL,
            stop.clone(),
        ));
        servers.spawn(revocation::follow_stream(
            Arc::clone(&gateway.revocations),
            Arc::clone(&self.shared.bus.streams),
            self.stream_key.clone(),
            replica,
            Arc::clone(&metrics),
            stop.clone(),
        ));
        servers.spawn(crate::keys::follow_invalidations(
            gateway.keys.clone(),
            Arc::clone(&self.shared.bus.streams),
            stop.clone(),
        ));
        let (observed, mut stop) = (Arc::clone(&gateway), stop.clone());
        servers.spawn(async move {
            loop {
                observed.metrics.observe(&observed);
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        state.gateway = Some(gateway);
        Ok(())
    }

    /// The Audit role's background work: ingestion, the tamper sweep (one replica at a time),
    /// and the stream gauges.
    async fn start_ledger(
        &self,
        state: &RoleState,
        servers: &mut tokio::task::JoinSet<()>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), StartError> {
        use crate::ledger::{self, ingest, sweep};
        let metrics = state.metrics.ledger.clone().unwrap_or_default();
        let streams = Arc::clone(&self.shared.bus.streams);
        let consumer = caracal_bus::Consumer::start(
            Arc::clone(&streams),
            self.stream_key.clone(),
            ingest::consumer_config(format!("audit-{}", self.instance), self.audit_reclaim_idle),
        )
        .await
        .map_err(|source| StartError::Bus {
            url: "audit stream".to_owned(),
            source,
        })?;
        let kek = &self.bootstrap.kek;
        let ingestor = ingest::Ingestor::new(
            Arc::clone(&self.shared.store),
            consumer,
            kek.clone(),
            Arc::clone(&metrics.ingest),
        );
        servers.spawn(ingestor.run(stop.clone()));

        let signer = ledger::checkpoint_signer(self.shared.store.as_ref(), kek)
            .await
            .map_err(|error| StartError::Evidence(error.to_string()))?;
        let mut sweeper = sweep::Sweeper::new(
            Arc::clone(&self.shared.store),
            kek.clone(),
            Arc::clone(&metrics.sweep),
        )
        .with_checkpoints(signer);
        if let Some(keep) = self.audit_retention {
            sweeper = sweeper.with_retention(keep);
        }
        let sweeper = Arc::new(sweeper);
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        servers.spawn(crate::singleton::run_singleton(
            Arc::clone(&self.shared.store),
            "audit-sweep",
            format!("audit-{}", self.instance),
            Duration::from_secs(10),
            move || {
                let (sweeper, runs) = (Arc::clone(&sweeper), Arc::clone(&runs));
                async move {
                    // Full at start (the first run) and every tenth minute; incremental between.
                    let run = runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let result = if run % 60 == 0 {
                        sweeper.full().await
                    } else {
                        sweeper.incremental().await
                    };
                    if let Err(error) = result {
                        tracing::warn!(%error, "audit sweep failed; it runs again next period");
                    }
                }
            },
            stop.clone(),
        ));

        let mut stopped = stop.clone();
        servers.spawn(async move {
            let dead = caracal_bus::dead_letter_stream(caracal_bus::stream_names::AUDIT_EVENTS);
            loop {
                if let Ok(info) = streams.info(caracal_bus::stream_names::AUDIT_EVENTS).await
                    && let Some(group) =
                        info.groups.iter().find(|group| group.name == ingest::GROUP)
                {
                    metrics
                        .consumer_lag
                        .set(i64::try_from(group.lag).unwrap_or(i64::MAX));
                }
                if let Ok(info) = streams.info(&dead).await {
                    metrics
                        .dlq_size
                        .set(i64::try_from(info.length).unwrap_or(i64::MAX));
                }
                tokio::select! {
                    _ = stopped.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
        Ok(())
    }
}

/// The key signing and verifying stream messages: the configured one (with the configured
/// previous one, during a rotation), else `$CARACAL_HOME/stream-key` with
/// `stream-key.previous` when a rotation left one.
fn stream_key(
    configured: Option<&SecretBytes>,
    configured_previous: Option<&SecretBytes>,
    data_dir: &DataDir,
) -> Result<StreamKey, StartError> {
    let (current, previous) = match configured {
        Some(key) => (key.0.clone(), configured_previous.map(|key| key.0.clone())),
        None => (
            load_or_create_stream_key(data_dir)?,
            match configured_previous {
                Some(key) => Some(key.0.clone()),
                None => load_previous_stream_key(data_dir)?,
            },
        ),
    };
    Ok(match previous {
        Some(previous) => StreamKey::new(&current).accepting_previous(&previous),
        None => StreamKey::new(&current),
    })
}

/// The stream key from `$CARACAL_HOME/stream-key` (hex), created on first start.
fn load_or_create_stream_key(data_dir: &DataDir) -> Result<Vec<u8>, StartError> {
    let path = data_dir.path().join(STREAM_KEY_FILE).display().to_string();
    let key_error = |message: String| StartError::StreamKey {
        path: path.clone(),
        message,
    };
    if let Some(text) = data_dir.read_file(STREAM_KEY_FILE)? {
        return decode_key_hex(text.trim())
            .ok_or_else(|| key_error("expected at least 64 hex characters".into()));
    }
    let key: [u8; 32] =
        caracal_crypto::random_bytes().map_err(|error| key_error(error.to_string()))?;
    data_dir.write_private_file(STREAM_KEY_FILE, &format!("{}\n", caracal_crypto::hex(&key)))?;
    Ok(key.to_vec())
}

/// The stream key a rotation replaced (`$CARACAL_HOME/stream-key.previous`), if any.
fn load_previous_stream_key(data_dir: &DataDir) -> Result<Option<Vec<u8>>, StartError> {
    let Some(text) = data_dir.read_file(PREVIOUS_STREAM_KEY_FILE)? else {
        return Ok(None);
    };
    decode_key_hex(text.trim())
        .map(Some)
        .ok_or_else(|| StartError::StreamKey {
            path: data_dir
                .path()
                .join(PREVIOUS_STREAM_KEY_FILE)
                .display()
                .to_string(),
            message: "expected at least 64 hex characters".into(),
        })
}

/// Hex text of at least 32 bytes, as accepted for a stream key.
pub fn decode_key_hex(text: &str) -> Option<Vec<u8>> {
    // Operators may paste upper-case hex; the key is the same bytes either way.
    caracal_crypto::unhex(&text.to_ascii_lowercase()).filter(|key| key.len() >= 32)
}

/// Serves `app` until `stop` turns true, then stops accepting and waits for the requests already
/// in flight to be answered.
/// This machine's name (`$HOSTNAME`, else `/etc/hostname`), if it has a usable one.
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| {
            !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_stream_key_signs_new_and_accepts_the_previous_one_until_it_is_deleted() {
        let parent = tempfile::tempdir().unwrap();
        let home = parent.path().join("home");
        let data_dir = DataDir::open(&home).unwrap();
        let fields: caracal_bus::Fields = [("zone_id".to_owned(), "z".to_owned())].into();
        let signed = |key: &StreamKey| {
            let mut signed = fields.clone();
            let signature = caracal_bus::signature::sign(key, "s", &fields);
            signed.insert(
                caracal_bus::signature::SIGNATURE_FIELD.to_owned(),
                signature,
            );
            signed
        };
        let first = stream_key(None, None, &data_dir).unwrap();
        let old = std::fs::read_to_string(home.join(STREAM_KEY_FILE)).unwrap();
        // What `caracal incident rotate stream-key` leaves behind.
        data_dir
            .write_private_file(PREVIOUS_STREAM_KEY_FILE, &old)
            .unwrap();
        data_dir
            .write_private_file(STREAM_KEY_FILE, &format!("{}\n", "ab".repeat(32)))
            .unwrap();
        let rotated = stream_key(None, None, &data_dir).unwrap();
        let verify = caracal_bus::signature::verify;
        assert!(
            verify(&rotated, "s", &signed(&first)).is_ok(),
            "the old key's messages"
        );
        assert!(verify(&rotated, "s", &signed(&rotated)).is_ok());
        assert!(
            verify(&first, "s", &signed(&rotated)).is_err(),
            "signed with the new key"
        );
        std::fs::remove_file(home.join(PREVIOUS_STREAM_KEY_FILE)).unwrap();
        let after = stream_key(None, None, &data_dir).unwrap();
        assert!(
            verify(&after, "s", &signed(&first)).is_err(),
            "the old key is gone"
        );
        data_dir
            .write_private_file(PREVIOUS_STREAM_KEY_FILE, "not hex")
            .unwrap();
        assert!(matches!(
            stream_key(None, None, &data_dir),
            Err(StartError::StreamKey { .. })
        ));
    }
}
