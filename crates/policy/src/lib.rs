//! Policy: adopters write Rego *data documents* (only the rules `app_ids`, `grants`,
//! `confinement`, `restrict`, `risk`, `approval_tiers`); `regorus` checks and evaluates them
//! once, when a version is created or a bundle is loaded. Every decision is made here, by one
//! platform-owned contract in Rust (default deny, named deny reasons), shared by the API's
//! simulate and canaries and by the STS.

mod decide;
mod document;

pub use decide::{Decision, Flow, Reason, Request, Verdict, decide};
pub use document::{
    ALLOWED_RULES, ApprovalTier, Bundle, DataDocument, Diagnostic, MAX_DOCUMENT, MAX_NESTING,
    SCHEMA_VERSION, compile,
};

#[cfg(test)]
mod tests;
