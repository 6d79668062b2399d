//! The system of record and the data directory it lives in.
//!
//! - [`Store`]: the interface every role uses — one trait per family of records
//!   ([`Deployment`], [`Directory`], [`Policies`], [`Runtime`], [`Audit`], [`Outbox`]) whose
//!   queries are written once over [`db::Db`], the small SQL surface both backends provide:
//!   [`SqliteStore`] (embedded, one file, concurrent writes run by a writer thread in shared
//!   transactions) and [`PgStore`] (PostgreSQL through a connection pool, with a statement
//!   timeout). One conformance suite (`tests/conformance.rs`) runs against both. Each backend
//!   tracks forward-only migrations in `schema_migrations` (DDL in `src/schema/`) and refuses a
//!   schema newer than it knows before writing anything.
//! - Writes that other roles must hear about carry [`OutboxMessage`]s, committed in the same
//!   transaction; a dispatcher publishes them later (at least once).
//! - [`DataDir`]: `$CARACAL_HOME`, created mode 0700, locked against a second process, holding
//!   the KEK file and the bootstrap admin-token file (both mode 0600).
//! - [`bootstrap`]: first start creates the KEK and the bootstrap admin token; later starts
//!   check that the KEK file belongs to the database and reuse both.

mod bootstrap;
mod data_dir;
pub mod db;
mod model;
mod postgres;
mod queries;
mod row_cache;
mod sqlite;
mod store;
mod url;

pub use bootstrap::{
    ADMIN_TOKEN_FILE, Bootstrap, BootstrapError, BootstrapToken, KEK_FILE, bootstrap,
};
pub use data_dir::{DataDir, DataDirError};
pub use model::{
    AdminFilter, AdminObject, AdminTokenRecord, Application, ApplicationChange, ApprovalHold,
    AuditCheckpoint, AuditCut, AuditEvent, AuditFilter, AuthorityRecord, ConsoleSession,
    ConsoleUser, Containment, DeadOutboxRow, DecisionCounts, DelegationContext, DelegationEdge,
    DeliveryOutcome, DeploymentSetting, IdempotencyReceipt, KekRecord, NewAdminToken, NewZone,
    NotificationDelivery, NotificationSink, OutboxFailure, OutboxMessage, OutboxRow, OutboxStats,
    PolicyBinding, PolicyHeader, PolicyLoad, PolicyVersion, Provider, ProviderConnection,
    RecordFilter, Resource, RevokedAnchors, SealedSecret, Session, SessionFilter, SigningKey,
    SubjectFilter, SubjectSummary, TamperFinding, TerminatedTree, TokenScope, Zone,
};
pub use postgres::{PgOptions, PgStore};
pub use queries::{ChainAppend, ChainBuilder};
pub use sqlite::SqliteStore;
pub use store::{
    Audit, Deployment, Directory, Notifications, Objects, Outbox, Policies, Runtime, Store,
    StoreError, now_ms,
};
pub use url::{StoreUrl, StoreUrlError, redact_url};

/// Brings every store trait into scope, for calling store methods on concrete stores.
pub mod prelude {
    pub use crate::{
        Audit as _, Deployment as _, Directory as _, Outbox as _, Policies as _, Runtime as _,
    };
}
