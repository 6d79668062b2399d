//! A delegation edge's narrowing constraints, one parser for the Coordinator (which creates
//! edges) and the STS (which mints along them), so both read every edge the same way.

use serde::Deserialize;

/// The longest delegation lineage, in edges.
pub const MAX_HOPS: u32 = 10;

/// A delegation edge's narrowing constraints. Unknown keys are refused: a constraint the STS
/// does not understand must not be silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub ttl_seconds: Option<u32>,
    #[serde(default)]
    pub max_depth: Option<u32>,
    #[serde(default)]
    pub max_hops: Option<u32>,
    /// Recorded by the Coordinator; parsed (so a malformed one refuses) but not acted on.
    #[serde(default)]
    #[allow(dead_code)]
    pub policy_approved: Option<bool>,
    /// RFC 3339.
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub broad_reason: Option<String>,
}

impl Constraints {
    pub fn parse(text: &str) -> Option<Constraints> {
        let constraints: Constraints = if text.trim().is_empty() {
            Constraints::default()
        } else {
            serde_json::from_str(text).ok()?
        };
        if let (Some(depth), Some(hops)) = (constraints.max_depth, constraints.max_hops)
            && depth != hops
        {
            return None;
        }
        if constraints.resources.len() > 64 || constraints.max_hops() > MAX_HOPS {
            return None;
        }
        Some(constraints)
    }

    /// The edge's hop budget: how many edges, this one included, a lineage may use from this
    /// edge down. One meaning for the Coordinator (a child's budget is at most its parent's
    /// minus one) and the STS (every edge on a path covers the edges below it), so every
    /// chain the Coordinator lets exist can mint and no other can.
    pub fn max_hops(&self) -> u32 {
        self.max_hops.or(self.max_depth).unwrap_or(1)
    }

    pub fn expires_at_ms(&self) -> Option<Option<i64>> {
        self.expires_at.as_deref().map(|text| {
            humantime::parse_rfc3339(text).ok().and_then(|time| {
                time.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .and_then(|since| i64::try_from(since.as_millis()).ok())
            })
        })
    }
}
