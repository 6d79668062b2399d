//! State shared by every role of a process, and the per-role state handed to its router.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use caracal_bus::{EmbeddedBus, RateCounter, RedisBus, ReplayRegistry, Streams};
use caracal_core::Role;
use caracal_store::Store;

use crate::evidence::Evidence;
use crate::metrics::RoleMetrics;

/// The bus as the roles see it: streams, replay registries and rate counters, all from one
/// backend.
#[derive(Clone)]
pub struct Bus {
    pub streams: Arc<dyn Streams>,
    pub replay: Arc<dyn ReplayRegistry>,
    pub rates: Arc<dyn RateCounter>,
}

impl Bus {
    pub fn embedded(bus: EmbeddedBus) -> Bus {
        let bus = Arc::new(bus);
        Bus {
            streams: bus.clone(),
            replay: bus.clone(),
            rates: bus,
        }
    }

    pub fn redis(bus: RedisBus) -> Bus {
        let bus = Arc::new(bus);
        Bus {
            streams: bus.clone(),
            replay: bus.clone(),
            rates: bus,
        }
    }
}

/// What all roles of one process share. A clone is one reference count (every request's
/// state holds one), and still a value: changing a clone copies its parts first.
#[derive(Clone)]
pub struct Shared(Arc<SharedParts>);

impl std::ops::Deref for Shared {
    type Target = SharedParts;

    fn deref(&self) -> &SharedParts {
        &self.0
    }
}

impl std::ops::DerefMut for Shared {
    fn deref_mut(&mut self) -> &mut SharedParts {
        Arc::make_mut(&mut self.0)
    }
}

#[derive(Clone)]
pub struct SharedParts {
    pub store: Arc<dyn Store>,
    pub bus: Bus,
    /// Where every role records audit evidence.
    pub evidence: Evidence,
    /// The evidence replay directory, probed by readiness.
    pub replay_dir: std::path::PathBuf,
    /// The deployment's key-encryption key: seals provider secrets.
    pub kek: caracal_crypto::Kek,
    /// Incident containment switches in force.
    pub containment: crate::containment::ContainmentView,
    /// The binary's validate and preserve, when the process was started by it.
    pub operator_tools: Option<Arc<dyn crate::recovery::OperatorTools>>,
    /// The bearer `GET /metrics` needs, when one is configured.
    pub metrics_bearer: Option<Arc<str>>,
    /// The deployment's audit retention (`audit.retention_days`; `None` keeps everything): an
    /// operator may shorten it at run time, never lengthen it.
    pub audit_retention: Option<std::time::Duration>,
    /// The deployment's mint limit per (zone, resource, application) and minute
    /// (`sts.mint_rate_limit_per_minute`): an operator may lower it at run time, never raise it.
    pub mint_limit_ceiling: u64,
    /// The Gateway's upstream host allowlist (`gateway.upstream_host_allowlist`; empty allows
    /// any host the address guard allows), which reachability tests keep to as well.
    pub upstream_host_allowlist: Vec<String>,
    draining: Arc<AtomicBool>,
}

impl Shared {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Bus,
        evidence: Evidence,
        replay_dir: std::path::PathBuf,
        kek: caracal_crypto::Kek,
    ) -> Shared {
        Shared(Arc::new(SharedParts {
            store,
            bus,
            evidence,
            replay_dir,
            kek,
            containment: crate::containment::ContainmentView::default(),
            operator_tools: None,
            metrics_bearer: None,
            audit_retention: None,
            mint_limit_ceiling: crate::sts::DEFAULT_MINT_LIMIT_PER_MINUTE,
            upstream_host_allowlist: Vec::new(),
            draining: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// Marks the process as shutting down: every `/ready` fails with `draining` from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// One role's view: the shared state plus its own metrics registry. Like [`Shared`], a
/// clone is one reference count, and changing a clone copies its parts first.
#[derive(Clone)]
pub struct RoleState(Arc<RoleParts>);

impl std::ops::Deref for RoleState {
    type Target = RoleParts;

    fn deref(&self) -> &RoleParts {
        &self.0
    }
}

impl std::ops::DerefMut for RoleState {
    fn deref_mut(&mut self) -> &mut RoleParts {
        Arc::make_mut(&mut self.0)
    }
}

#[derive(Clone)]
pub struct RoleParts {
    pub role: Role,
    pub shared: Shared,
    pub metrics: Arc<RoleMetrics>,
    /// Addresses locked out after too many failed admin authentications.
    pub lockouts: crate::auth::Lockouts,
    /// The STS's state, on the STS role.
    pub sts: Option<Arc<crate::sts::Sts>>,
    /// The Coordinator's state, on the Coordinator role.
    pub coordinator: Option<Arc<crate::coordinator::Coordinator>>,
    /// The API role's control invocations (`/v1/control/invoke`).
    pub control: Option<Arc<crate::control::Control>>,
    /// The Gateway's state, on the Gateway role.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    /// The Console role's cookie setting and in-process admin API.
    pub console: crate::console::Console,
    /// Every role this process serves and where: the console's overview probes them.
    pub peers: Arc<Vec<(Role, std::net::SocketAddr)>>,
}

impl RoleState {
    pub fn new(role: Role, shared: Shared) -> RoleState {
        RoleState(Arc::new(RoleParts {
            role,
            metrics: Arc::new(RoleMetrics::new(role, &shared.evidence.metrics())),
            lockouts: crate::auth::Lockouts::default(),
            sts: None,
            coordinator: None,
            control: None,
            gateway: None,
            console: crate::console::Console::default(),
            peers: Arc::default(),
            shared,
        }))
    }
}
