//! JSON shapes that leave the process: error bodies, readiness, the run file.
//! Changing one is a wire change.

use serde::{Deserialize, Serialize};

/// Every JSON error body: `{"error": code, "error_description": text}`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}

/// The body of `/ready`, both when ready (200) and not (503).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReadyBody {
    /// `ready` or `not_ready`.
    pub status: String,
    /// The first failed check's reason; absent when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub checks: Vec<CheckBody>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckBody {
    pub name: String,
    pub ok: bool,
    pub reason: Option<String>,
}

/// `GET /v1/audit/tamper`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TamperFindingsResponse {
    pub items: Vec<TamperFindingBody>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TamperFindingBody {
    pub zone_id: String,
    pub seq: i64,
    pub kind: String,
    pub detail: String,
    pub found_at_ms: i64,
}

/// `POST /v1/audit/tamper/ack`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AckTamperResponse {
    pub acknowledged: u64,
}
