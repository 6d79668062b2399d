//! The runbook's recovery checks, shared by `caracal incident validate`, the API's
//! `/v1/incident/validate` and the console: what one scrape of the roles' `/metrics` says about
//! freshness and backlogs, and the operator tools (validate with canaries, preserve) that live in
//! the binary's command-line crate and are handed to the stack when it starts.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One recovery check and what it saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub evidence: String,
}

/// The agent-side canaries of `validate`: a zone, an application with its current secret and a
/// resource; optionally an exposed old secret and an old signing key that must now be refused.
/// Every field absent: the health checks only.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub app: Option<String>,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default)]
    pub old_secret: Option<String>,
    #[serde(default)]
    pub old_kid: Option<String>,
}

/// An evidence bundle just written.
#[derive(Debug, Clone, Serialize)]
pub struct Preserved {
    /// Each part that could not be collected, with the reason (its `*error*` file holds the
    /// detail); none when the bundle is complete.
    pub failed: Vec<String>,
    /// Each zone whose audit export was kept but does not verify with a published key, with why
    /// (evidence of tampering or loss, which is what the bundle preserves).
    pub unverified: Vec<String>,
    pub files: usize,
    pub key_id: String,
}

impl Preserved {
    /// Every part was collected.
    pub fn complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// What the binary's operator tools offer the roles. `admin_token` is the caller's own token:
/// the checks read through the API with the caller's authority, never the deployment's.
#[async_trait::async_trait]
pub trait OperatorTools: Send + Sync {
    async fn validate(&self, admin_token: &str, canary: &Canary) -> Vec<Check>;
    /// Writes a signed evidence bundle into the empty directory `out`.
    async fn preserve(&self, out: &Path) -> Result<Preserved, String>;
}

/// Samples of a `/metrics` text by metric name, every label set kept apart.
pub fn samples(text: &str, into: &mut BTreeMap<String, Vec<f64>>) {
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let (Some(name), Ok(value)) = (series.split('{').next(), value.parse::<f64>()) {
            into.entry(name.to_owned()).or_default().push(value);
        }
    }
}

/// The backlog bounds: (check, metric, the most any label set may read).
const BOUNDS: [(&str, &str, f64); 6] = [
    ("outbox dead rows", "caracal_outbox_dead_rows", 0.0),
    (
        "outbox draining",
        "caracal_outbox_pending_oldest_seconds",
        300.0,
    ),
    ("audit DLQ drained", "caracal_audit_dlq_size", 0.0),
    (
        "audit ingestion caught up",
        "caracal_audit_consumer_lag",
        1000.0,
    ),
    (
        "gateway STS circuit closed",
        "caracal_gateway_sts_circuit_state",
        0.0,
    ),
    (
        "STS policy bundles fresh",
        "caracal_sts_policy_bundle_age_seconds",
        300.0,
    ),
];

/// Freshness and backlog checks over one scrape of every role: the outbox, the audit DLQ and
/// ingestion lag, the Gateway's STS circuit and revocation view, the STS's policy bundles, the
/// evidence replay files and lost evidence. A metric no scraped role exports is not checked.
pub fn backlog_checks(samples: &BTreeMap<String, Vec<f64>>) -> Vec<Check> {
    let most = |metric: &str| {
        samples
            .get(metric)
            .and_then(|values| values.iter().copied().reduce(f64::max))
    };
    let mut checks = Vec::new();
    for (name, metric, limit) in BOUNDS {
        if let Some(value) = most(metric) {
            checks.push(Check {
                name: name.to_owned(),
                ok: value <= limit,
                evidence: format!("{metric} = {value} (at most {limit})"),
            });
        }
    }
    if let Some(values) = samples.get("caracal_gateway_revocation_snapshot_fresh") {
        let fresh = values.iter().copied().fold(f64::INFINITY, f64::min);
        checks.push(Check {
            name: "gateway revocation view fresh".to_owned(),
            ok: fresh >= 1.0,
            evidence: format!(
                "caracal_gateway_revocation_snapshot_fresh = {fresh} (store age {} s, stream age {} s)",
                most("caracal_gateway_revocation_snapshot_age_seconds").unwrap_or(f64::NAN),
                most("caracal_gateway_revocation_stream_age_seconds").unwrap_or(f64::NAN)
            ),
        });
    }
    for (name, values) in samples.iter().filter(|(name, _)| {
        name.ends_with("_audit_replay_files") || name.ends_with("_audit_evidence_lost_total")
    }) {
        let value: f64 = values.iter().sum();
        checks.push(Check {
            name: format!("{name} is 0"),
            ok: value == 0.0,
            evidence: format!("{name} = {value}"),
        });
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlogs_are_judged_on_the_worst_label_set_and_freshness_on_the_stalest() {
        let mut scraped = BTreeMap::new();
        samples(
            "# HELP x\ncaracal_audit_dlq_size{zone=\"a\"} 0\ncaracal_audit_dlq_size{zone=\"b\"} 2\n\
             caracal_gateway_revocation_snapshot_fresh 1\ncaracal_gateway_revocation_snapshot_fresh 0\n\
             caracal_sts_audit_replay_files 0\n",
            &mut scraped,
        );
        let checks = backlog_checks(&scraped);
        let verdict = |name: &str| checks.iter().find(|check| check.name == name).map(|c| c.ok);
        assert_eq!(verdict("audit DLQ drained"), Some(false));
        assert_eq!(verdict("gateway revocation view fresh"), Some(false));
        assert_eq!(verdict("caracal_sts_audit_replay_files is 0"), Some(true));
        assert_eq!(
            verdict("outbox dead rows"),
            None,
            "not exported, not checked"
        );
    }
}
