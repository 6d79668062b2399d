//! The system of record and the data directory it lives in.
//!
//! - [`Store`]: the interface every role uses, with two implementations that pass one
//!   conformance suite (`tests/conformance.rs`): [`SqliteStore`] (embedded, one file, blocking
//!   work on a worker thread) and [`PgStore`] (PostgreSQL through a connection pool, with a
//!   statement timeout). Each tracks forward-only migrations in `schema_migrations` and refuses
//!   a schema newer than it knows before writing anything.
//! - Writes that other roles must hear about carry [`OutboxMessage`]s, committed in the same
//!   transaction; a dispatcher publishes them later (at least once).
//! - [`DataDir`]: `$CARACAL_HOME`, created mode 0700, locked against a second process, holding
//!   the KEK file and the bootstrap admin-token file (both mode 0600).
//! - [`bootstrap`]: first start creates the KEK and the bootstrap admin token; later starts
//!   check that the KEK file belongs to the database and reuse both.

mod bootstrap;
mod data_dir;
mod model;
mod postgres;
mod sqlite;
mod store;
mod url;

pub use bootstrap::{
    ADMIN_TOKEN_FILE, Bootstrap, BootstrapError, BootstrapToken, KEK_FILE, bootstrap,
};
pub use data_dir::{DataDir, DataDirError};
pub use model::{
    AdminTokenRecord, KekRecord, NewAdminToken, NewZone, OutboxFailure, OutboxMessage, OutboxRow,
    OutboxStats, TokenScope, Zone,
};
pub use postgres::{PgOptions, PgStore};
pub use sqlite::SqliteStore;
pub use store::{Store, StoreError, now_ms};
pub use url::{StoreUrl, StoreUrlError, redact_url};
