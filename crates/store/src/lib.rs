//! The system of record and the data directory it lives in.
//!
//! - [`DataDir`]: `$CARACAL_HOME`, created mode 0700, locked against a second process, holding
//!   the KEK file and the bootstrap admin-token file (both mode 0600).
//! - [`SqliteStore`]: the embedded store, one SQLite file with forward-only migrations tracked
//!   in `schema_migrations`. A database from a newer binary is refused before anything is
//!   written to it.
//! - [`StoreUrl`]: where the store lives, as the operator wrote it.
//!
//! [`bootstrap`] ties them together on every start: first start creates the KEK and the
//! bootstrap admin token; later starts check that the KEK file belongs to the database and
//! reuse both.

mod bootstrap;
mod data_dir;
mod sqlite;
mod url;

pub use bootstrap::{
    ADMIN_TOKEN_FILE, Bootstrap, BootstrapError, BootstrapToken, KEK_FILE, bootstrap,
};
pub use data_dir::{DataDir, DataDirError};
pub use sqlite::{SCHEMA_VERSION, SqliteStore, StoreError};
pub use url::{StoreUrl, StoreUrlError, redact_url};
