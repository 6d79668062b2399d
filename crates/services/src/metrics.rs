//! Per-role Prometheus registries. Each role owns one registry whose names start with
//! `caracal_<role>_`, so one process running six roles still serves six disjoint `/metrics`;
//! deployment-wide families served by one role (the outbox, from the API role) are named
//! `caracal_<name>`.
//! Labels come from closed sets: route templates, methods, status codes.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use caracal_core::Role;

/// The method label: the common methods by name, anything else as `OTHER`, so a client cannot
/// grow the label set.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route template (`/ready`), or `unmatched`: never the raw path.
    pub route: String,
    pub method: &'static str,
    pub status: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CheckLabels {
    pub check: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~1.6 s: the hot path is sub-millisecond, admin calls are slower.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

/// The API role's view of the outbox it dispatches.
#[derive(Default)]
pub struct OutboxMetrics {
    /// Rows that reached the attempt bound, ever.
    pub dead_total: Counter,
    /// Rows dead right now (any makes the API role not ready).
    pub dead_rows: Gauge,
    pub pending_rows: Gauge,
    pub pending_oldest_seconds: Gauge<f64, AtomicU64>,
}

impl OutboxMetrics {
    pub fn observe(&self, stats: &caracal_store::OutboxStats) {
        self.dead_rows
            .set(i64::try_from(stats.dead).unwrap_or(i64::MAX));
        self.pending_rows
            .set(i64::try_from(stats.pending).unwrap_or(i64::MAX));
        self.pending_oldest_seconds.set(
            stats
                .oldest_pending_age
                .map_or(0.0, |age| age.as_secs_f64()),
        );
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "outbox_dead",
            "Outbox rows that exhausted their publish attempts",
            self.dead_total.clone(),
        );
        registry.register(
            "outbox_dead_rows",
            "Outbox rows dead now",
            self.dead_rows.clone(),
        );
        registry.register(
            "outbox_pending_rows",
            "Outbox rows waiting to be published",
            self.pending_rows.clone(),
        );
        registry.register(
            "outbox_pending_oldest_seconds",
            "Age of the oldest outbox row waiting to be published",
            self.pending_oldest_seconds.clone(),
        );
    }
}

/// The API role's approval-webhook attempts.
#[derive(Default)]
pub struct NotifierMetrics {
    pub delivered: Counter,
    /// Attempts that failed and will be tried again.
    pub retried: Counter,
    /// Deliveries given up on after their last attempt.
    pub abandoned: Counter,
}

impl NotifierMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "notifications_delivered",
            "Approval webhook deliveries a sink accepted",
            self.delivered.clone(),
        );
        registry.register(
            "notification_retries",
            "Approval webhook attempts that failed and will be tried again",
            self.retried.clone(),
        );
        registry.register(
            "notifications_abandoned",
            "Approval webhook deliveries given up on after their last attempt",
            self.abandoned.clone(),
        );
    }
}

pub struct RoleMetrics {
    registry: Registry,
    /// Present on the API role, which runs the outbox dispatcher.
    pub outbox: Option<Arc<OutboxMetrics>>,
    /// Present on the API role, which sends approval webhooks.
    pub notifier: Option<Arc<NotifierMetrics>>,
    /// Present on the Audit role, which ingests and sweeps.
    pub ledger: Option<Arc<crate::ledger::LedgerMetrics>>,
    /// Present on the STS role.
    pub sts: Option<Arc<crate::sts::StsMetrics>>,
    /// Present on the Gateway role.
    pub gateway: Option<Arc<crate::gateway::GatewayMetrics>>,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub ready: Gauge,
    /// Share of the PostgreSQL pool in use, set at each scrape.
    pub store_pool_in_use_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Policy activations refused because a canary case disagreed (API role).
    pub policy_canary_failures: Counter,
    pub ready_check_failures: Family<CheckLabels, Counter>,
    /// Inbound connections this role holds now, and those closed for want of a place.
    pub(crate) connections: crate::serve::ConnectionMetrics,
}

impl RoleMetrics {
    pub fn new(role: Role, evidence: &crate::evidence::EvidenceMetrics) -> RoleMetrics {
        let mut root = Registry::with_prefix("caracal");
        // Deployment-wide families (the outbox) live at the root as `caracal_<name>`; the
        // role's own families under `caracal_<role>_<name>`.
        let outbox = (role == Role::Api).then(|| {
            let outbox = Arc::new(OutboxMetrics::default());
            outbox.register(&mut root);
            outbox
        });
        let registry = root.sub_registry_with_prefix(role.name());
        evidence.register(registry);
        let ledger = (role == Role::Audit).then(|| {
            // Direct appends (embedded) and the ingestor's count as one.
            let ledger = Arc::new(crate::ledger::LedgerMetrics {
                ingest: Arc::clone(&evidence.ingest),
                ..crate::ledger::LedgerMetrics::default()
            });
            ledger.register(registry);
            ledger
        });
        let sts = (role == Role::Sts).then(|| {
            let sts = Arc::new(crate::sts::StsMetrics::default());
            sts.register(registry);
            sts
        });
        let notifier = (role == Role::Api).then(|| {
            let notifier = Arc::new(NotifierMetrics::default());
            notifier.register(registry);
            notifier
        });
        let gateway = (role == Role::Gateway).then(|| {
            let gateway = Arc::new(crate::gateway::GatewayMetrics::default());
            gateway.register(registry);
            gateway
        });
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            http_requests.clone(),
        );
        let http_request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            http_request_duration.clone(),
        );
        let store_pool_in_use_ratio = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "store_pool_in_use_ratio",
            "Share of the PostgreSQL connection pool in use (0 on the embedded store)",
            store_pool_in_use_ratio.clone(),
        );
        let policy_canary_failures = Counter::default();
        if role == Role::Api {
            registry.register(
                "policy_canary_failures",
                "Policy activations refused because a canary case disagreed",
                policy_canary_failures.clone(),
            );
        }
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the last readiness evaluation passed, else 0",
            ready.clone(),
        );
        let ready_check_failures = Family::<CheckLabels, Counter>::default();
        registry.register(
            "ready_check_failures",
            "Readiness evaluations in which the named check failed",
            ready_check_failures.clone(),
        );
        let connections = crate::serve::ConnectionMetrics::default();
        registry.register(
            "http_connections_open",
            "Inbound connections this role holds now",
            connections.open.clone(),
        );
        registry.register(
            "http_connections_refused",
            "Inbound connections closed on accept because the role's share of the connection budget was taken",
            connections.refused.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        RoleMetrics {
            registry: root,
            outbox,
            notifier,
            ledger,
            sts,
            gateway,
            http_requests,
            http_request_duration,
            ready,
            store_pool_in_use_ratio,
            policy_canary_failures,
            ready_check_failures,
            connections,
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
