//! The audit ledger's rules, as pure functions: how an event is encoded and hashed, how rows
//! are chained per zone, how a Merkle tree over a zone's rows is built and proven, and how a
//! chain is verified. The ingestor, the sweep, `caracal audit export` and the offline
//! `caracal audit verify` all use these and nothing else, so they cannot disagree.
//!
//! - [`Event`]: the wire event (the reference's JSON keys) and its canonical form.
//! - [`chain`]: content hash, link MAC (with a key id per row), and [`chain::verify`], which
//!   reports every tamper finding with its [`chain::FindingKind`].
//! - [`merkle`]: RFC 6962 tree hashes, inclusion proofs, and signed checkpoints.

pub mod chain;
mod event;
pub mod merkle;

pub use event::{Content, Event, EventError, canonical_json};
