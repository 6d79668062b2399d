//! The audit ledger's rules, as pure functions: how an event is encoded and hashed, how rows
//! are chained per zone, how a Merkle tree over a zone's rows is built and proven, and how a
//! chain is verified. The ingestor, the sweep, `caracal audit export` and the offline
//! `caracal audit verify` all use these and nothing else, so they cannot disagree.
//!
//! - [`Event`]: the wire event (the reference's JSON keys) and its canonical form.
//! - [`chain`]: content hash, link MAC (with a key id per row), and [`chain::verify`], which
//!   reports every tamper finding with its [`chain::FindingKind`].
//! - [`merkle`]: RFC 6962 tree hashes, inclusion proofs, and signed checkpoints.
//! - [`bundle`]: export bundles and their offline verification with the public key alone.

pub mod bundle;
pub mod chain;
mod event;
pub mod merkle;

/// Lower-case hex.
pub(crate) fn caracal_hex(bytes: &[u8]) -> String {
    caracal_crypto::hex(bytes)
}

pub use event::{Content, Event, EventError, canonical_json};
