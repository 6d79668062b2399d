//! The decision contract: default deny, one named reason per refusal, and the policies that
//! determined an allow. The same function answers the STS, simulate and canary cases.

use serde::{Deserialize, Serialize};

use crate::document::Bundle;

/// Which exchange is being decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// Client-secret exchange for a session mandate (`agent:lifecycle` only).
    Bootstrap,
    /// Delegated mint for a session along a delegation edge.
    Mint,
    /// The Gateway presenting a delegation-bound mandate at a resource.
    Use,
    /// A launcher (`caracal run`) asking for a workload binding's credential; `application_id`
    /// is the workload's id.
    Workload,
}

/// What is asked. For `use`, `scopes` are the scopes the mandate carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub flow: Flow,
    pub application_id: String,
    pub resource: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Labels of the session the mandate is for (its roles).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Scopes of the delegation edge; absent when there is no delegation.
    #[serde(default)]
    pub edge_scopes: Option<Vec<String>>,
    #[serde(default)]
    pub session: bool,
    #[serde(default)]
    pub subject: bool,
    /// The presented mandate's `target` resources (`use`).
    #[serde(default)]
    pub target: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Determining {
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub code: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepUp {
    #[serde(rename = "type")]
    pub kind: String,
    pub tiers: Vec<String>,
}

/// The result: the shape audit events and simulate answers carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub decision: Verdict,
    pub evaluation_status: String,
    pub determining_policies: Vec<Determining>,
    pub diagnostics: Vec<Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_up_required: Option<StepUp>,
}

impl Decision {
    /// The deny reason, if denied.
    pub fn reason(&self) -> Option<&str> {
        (self.decision == Verdict::Deny)
            .then(|| self.diagnostics.first().map(|reason| reason.code.as_str()))
            .flatten()
    }
}

fn deny(code: &str, detail: impl Into<String>) -> Decision {
    Decision {
        decision: Verdict::Deny,
        evaluation_status: "complete".to_owned(),
        determining_policies: Vec::new(),
        diagnostics: vec![Reason {
            code: code.to_owned(),
            detail: detail.into(),
        }],
        step_up_required: None,
    }
}

fn allow(policy: String, step_up: Option<StepUp>) -> Decision {
    Decision {
        decision: Verdict::Allow,
        evaluation_status: "complete".to_owned(),
        determining_policies: vec![Determining { policy }],
        diagnostics: Vec::new(),
        step_up_required: step_up,
    }
}

fn subset(scopes: &[String], of: &[String]) -> bool {
    scopes.iter().all(|scope| of.contains(scope))
}

const LIFECYCLE: &str = "agent:lifecycle";

/// Decides `request` under `bundle` (the zone's active set version); no bundle denies all.
pub fn decide(bundle: Option<&Bundle>, request: &Request) -> Decision {
    let Some(bundle) = bundle else {
        return deny("no_active_policy_set", "the zone has no active policy set");
    };
    if !bundle.restrict.is_empty() {
        return deny("restriction_active", bundle.restrict.join(", "));
    }
    // The application's binding key: how the documents name it.
    let app_key = bundle
        .app_ids
        .iter()
        .find(|(_, id)| **id == request.application_id)
        .map(|(key, _)| key.as_str());
    match request.flow {
        Flow::Bootstrap => bootstrap(bundle, request, app_key),
        Flow::Mint => mint(bundle, request, app_key),
        Flow::Use => presented(bundle, request, app_key),
        Flow::Workload => workload(request),
    }
}

/// A workload's binding is the operator's grant; the policy may still restrict the zone, and a
/// workload never carries a subject, a session or a delegation.
fn workload(request: &Request) -> Decision {
    if request.subject || request.session || request.edge_scopes.is_some() {
        return deny(
            "no_rule_matched",
            "a workload credential has no subject, session or delegation",
        );
    }
    allow("caracal-workload-mint".to_owned(), None)
}

fn bootstrap(bundle: &Bundle, request: &Request, app_key: Option<&str>) -> Decision {
    let only_lifecycle = request.scopes.len() == 1 && request.scopes.iter().all(|s| s == LIFECYCLE);
    if !only_lifecycle || request.subject || request.edge_scopes.is_some() || request.session {
        return deny(
            "no_rule_matched",
            "a bootstrap exchange asks for exactly agent:lifecycle, with no subject, session or delegation",
        );
    }
    let owns_a_grant =
        app_key.is_some_and(|key| bundle.grants.values().any(|grant| grant.application == key));
    if owns_a_grant {
        allow("caracal-bootstrap".to_owned(), None)
    } else {
        deny(
            "resource_not_granted",
            "the application holds no grant in this zone",
        )
    }
}

fn mint(bundle: &Bundle, request: &Request, app_key: Option<&str>) -> Decision {
    let Some(edge_scopes) = &request.edge_scopes else {
        return deny("no_rule_matched", "a mint needs a delegation edge");
    };
    if !request.session || request.subject || request.scopes.is_empty() {
        return deny(
            "no_rule_matched",
            "a mint needs a session, at least one scope and no subject token",
        );
    }
    if request.scopes.iter().any(|scope| scope == LIFECYCLE) {
        return deny(
            "no_rule_matched",
            "agent:lifecycle is never minted for a resource",
        );
    }
    let Some((key, grant)) = owned_grant(bundle, request, app_key) else {
        return deny(
            "resource_not_granted",
            format!("`{}` is not granted to this application", request.resource),
        );
    };
    if !subset(&request.scopes, edge_scopes) {
        return deny(
            "delegation_scope_exceeded",
            "the requested scopes exceed the delegation edge's",
        );
    }
    for rule in &bundle.confinement {
        let confined = request
            .labels
            .iter()
            .any(|label| label.starts_with(&rule.label_prefix));
        if confined && !subset(&request.scopes, &rule.scopes) {
            return deny(
                "confinement_violation",
                format!(
                    "sessions labelled `{}*` are confined to {:?}",
                    rule.label_prefix, rule.scopes
                ),
            );
        }
    }
    if !role_grants(grant, &request.labels, &request.scopes) {
        return deny(
            "role_scope_mismatch",
            "no label of the session is a role granting every requested scope",
        );
    }
    let mut tiers: Vec<String> = bundle
        .risk
        .iter()
        .filter(|risk| request.scopes.contains(&risk.scope))
        .map(|risk| risk.tier.clone())
        .collect();
    tiers.sort();
    tiers.dedup();
    if let Some(tier) = tiers.iter().find(|tier| {
        !bundle
            .approval_tiers
            .iter()
            .any(|known| known.tier == **tier)
    }) {
        return deny(
            "malformed_approval_data",
            format!("risk tier `{tier}` has no approval_tiers entry"),
        );
    }
    let step_up = (!tiers.is_empty()).then(|| StepUp {
        kind: "human_approval".to_owned(),
        tiers,
    });
    allow(format!("caracal-{key}-mint"), step_up)
}

fn presented(bundle: &Bundle, request: &Request, app_key: Option<&str>) -> Decision {
    if request.edge_scopes.is_none() {
        return deny(
            "no_rule_matched",
            "only a delegation-bound mandate is presented",
        );
    }
    if !request.target.contains(&request.resource) {
        return deny(
            "mandate_target_mismatch",
            format!("the mandate does not target `{}`", request.resource),
        );
    }
    let Some((key, grant)) = owned_grant(bundle, request, app_key) else {
        return deny(
            "resource_not_granted",
            format!("`{}` is not granted to this application", request.resource),
        );
    };
    if !role_grants(grant, &request.labels, &request.scopes) {
        return deny(
            "role_scope_mismatch",
            "the mandate's scopes are no longer granted to the session's roles",
        );
    }
    allow(format!("caracal-{key}-use"), None)
}

/// The grant of the requested resource, if the caller owns it.
fn owned_grant<'a>(
    bundle: &'a Bundle,
    request: &Request,
    app_key: Option<&'a str>,
) -> Option<(&'a str, &'a crate::document::Grant)> {
    let key = app_key?;
    let grant = bundle.grants.get(&request.resource)?;
    (grant.application == key).then_some((key, grant))
}

fn role_grants(grant: &crate::document::Grant, labels: &[String], scopes: &[String]) -> bool {
    labels.iter().any(|label| {
        grant
            .roles
            .get(label)
            .is_some_and(|granted| subset(scopes, granted))
    })
}
