//! The roles as HTTP services, and the runtime that runs a set of them in one process.
//!
//! - [`router`]: builds one role's axum router. Every role shares the probes (`/health`,
//!   `/ready`, `/metrics`), the request-id layer and the JSON error shape; later roles add their
//!   own routes there.
//! - [`Stack`]: binds every chosen role's port (all or nothing), opens and bootstraps the data
//!   directory and store, serves, and drains on shutdown.
//! - [`Settings`]: the validated configuration the runtime needs; the CLI builds it.

mod admin;
pub mod api;
pub mod auth;
pub mod connections;
pub mod console;
pub mod constraints;
pub mod containment;
pub mod control;
pub mod coordinator;
mod error;
pub mod evidence;
pub mod gateway;
pub mod gateway_sts;
pub mod group_commit;
pub mod holds;
pub mod keys;
pub mod ledger;
pub mod mandate;
mod metrics;
pub mod notifier;
pub mod outbox;
pub mod peer_probe;
pub mod policy;
mod probes;
pub mod propagation;
pub mod provider_secrets;
pub mod recent_logs;
pub mod recovery;
mod request_id;
mod router;
mod serve;
mod settings;
pub mod singleton;
mod stack;
mod state;
pub mod sts;
#[cfg(test)]
mod test_support;
pub mod wire;

pub use error::ApiError;
pub use metrics::{OutboxMetrics, RoleMetrics};
pub use router::router;
pub use settings::{BusUrl, BusUrlError, SecretBytes, Settings};
pub use stack::{
    PREVIOUS_STREAM_KEY_FILE, REPLAY_DIR, RUN_FILE, RunFile, STREAM_KEY_FILE, Stack, StartError,
    decode_key_hex,
};
pub use state::{Bus, RoleState, Shared};
