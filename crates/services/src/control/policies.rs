//! `ensure` and `state` of policies and policy sets, on the admin API's policy routes.
//!
//! A policy is kept by `name`; its `content` is its latest version's, and a different content
//! adds a version. A policy set is kept by `name`; its manifest names the latest version of
//! each policy its spec lists by name, with the spec's canary cases (none when it gives none):
//! a difference adds a set version, and `active: true` makes the set the zone's active one (its
//! canaries run first). Descriptions are set at creation: the admin API changes neither, so a
//! different one is a 409 `conflict` rather than a silent skip.

use std::collections::HashSet;

use http::StatusCode;
use serde_json::{Map, Value, json};

use super::{
    AdminApi, Desired, Found, Listed, MAX_FLAG_ITEMS, Refusal, Refused, conflict, listed, named,
    plain_id, require_scope, truncated,
};
use crate::policy::Canary;
use crate::wire::MandateClaims;

const POLICY_FIELDS: [&str; 3] = ["name", "description", "content"];
const SET_FIELDS: [&str; 5] = ["name", "description", "policies", "canaries", "active"];

/// A spec of a policy kind holds only its fields, each of its type; other kinds' specs are the
/// admin routes' to judge.
pub(super) fn check_spec(kind: &str, spec: &Map<String, Value>) -> Result<(), String> {
    let fields: &[&str] = match kind {
        "policy" => &POLICY_FIELDS,
        "policy-set" => &SET_FIELDS,
        _ => return Ok(()),
    };
    if let Some(other) = spec.keys().find(|name| !fields.contains(&name.as_str())) {
        return Err(format!(
            "a {kind} spec holds {}, not `{}`",
            fields.join(", "),
            truncated(other)
        ));
    }
    if spec
        .get("description")
        .is_some_and(|text| !text.is_string())
    {
        return Err(format!("a {kind}'s `description` is a string"));
    }
    if kind == "policy" {
        return match spec.get("content") {
            Some(Value::String(_)) => Ok(()),
            _ => Err("a policy spec needs its `content` (a string)".to_owned()),
        };
    }
    let names = policy_names(spec);
    let listed = spec.get("policies").and_then(Value::as_array);
    if listed.is_none_or(|items| {
        items.is_empty() || items.len() > MAX_FLAG_ITEMS || names.len() != items.len()
    }) {
        return Err(format!(
            "a policy set's `policies` names 1 to {MAX_FLAG_ITEMS} policies, each once"
        ));
    }
    if let Some(canaries) = spec.get("canaries") {
        serde_json::from_value::<Vec<Canary>>(canaries.clone())
            .map_err(|error| format!("`canaries`: {error}"))?;
    }
    match spec.get("active") {
        None | Some(Value::Bool(true)) => Ok(()),
        Some(_) => Err(
            "`active` is `true` or left out: a set stops being active only when another is activated or it is archived"
                .to_owned(),
        ),
    }
}

/// The distinct non-empty policy names of a set's spec.
fn policy_names(spec: &Map<String, Value>) -> Vec<&str> {
    let mut seen = HashSet::new();
    spec.get("policies")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|name| !name.is_empty() && seen.insert(*name))
        .collect()
}

/// A policy set's spec reads the policies it names: that needs `control:policy:read` too.
pub(super) fn require_read_scopes(claims: &MandateClaims, kind: &str) -> Result<(), Refusal> {
    if kind == "policy-set" {
        require_scope(claims, "policy", "read")?;
    }
    Ok(())
}

/// A document's policy set comes after every policy of the document it names: its manifest
/// takes their versions as they stand when it is reached.
pub(super) fn check_order(objects: &[Desired]) -> Result<(), String> {
    for (n, set) in objects.iter().enumerate() {
        if set.kind != "policy-set" {
            continue;
        }
        let names = policy_names(&set.spec);
        if let Some(later) = objects.iter().skip(n).find(|policy| {
            policy.kind == "policy"
                && policy
                    .spec
                    .get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|name| names.contains(&name))
        }) {
            let name = later.spec.get("name").and_then(Value::as_str);
            return Err(format!(
                "object {n}: the policy set names policy `{}`, which the document lists after it",
                truncated(name.unwrap_or_default())
            ));
        }
    }
    Ok(())
}

/// The policy's collection beside a policy set's.
fn policies_collection(sets: &str) -> String {
    format!(
        "{}policies",
        sets.strip_suffix("policy-sets").unwrap_or(sets)
    )
}

/// The policy with its versions, and the latest of them.
async fn with_latest(api: &AdminApi<'_>, collection: &str, id: &str) -> Result<Value, Refused> {
    let mut policy = api
        .expect(http::Method::GET, &format!("{collection}/{id}"), None)
        .await?;
    let latest = policy
        .get("versions")
        .and_then(Value::as_array)
        .and_then(|versions| {
            versions
                .iter()
                .max_by_key(|version| version.get("version").and_then(Value::as_i64))
        })
        .cloned()
        .unwrap_or_default();
    if let Some(fields) = policy.as_object_mut() {
        fields.remove("versions");
        fields.insert("latest".to_owned(), latest);
    }
    Ok(policy)
}

/// A policy as `ensure` shows it: its header and its latest version's id, number and digest.
fn policy_view(policy: &Value) -> Value {
    let mut view = policy.clone();
    let latest = view
        .as_object_mut()
        .and_then(|fields| fields.remove("latest"))
        .unwrap_or_default();
    with_version(view, &latest)
}

/// `policy` showing `version`'s id, number and digest as its own.
fn with_version(mut policy: Value, version: &Value) -> Value {
    if let Some(fields) = policy.as_object_mut() {
        for name in ["version_id", "version", "content_sha256"] {
            fields.insert(
                name.to_owned(),
                version.get(name).cloned().unwrap_or_default(),
            );
        }
    }
    policy
}

/// The spec's `description` differs from the object's (an absent one never does).
fn description_differs(spec: &Map<String, Value>, object: &Value) -> bool {
    spec.get("description")
        .is_some_and(|wanted| object.get("description") != Some(wanted))
}

fn description_fixed(kind: &str) -> Refused {
    conflict(&format!(
        "a {kind}'s description is set when it is created; archive it and create it again to change it"
    ))
}

pub(super) async fn observe_policy(
    api: &AdminApi<'_>,
    desired: &Desired,
    header: Option<Value>,
) -> Result<Found, Refused> {
    let Some(header) = header else {
        return Ok(Found::default());
    };
    let id = plain_id(&header).ok_or((StatusCode::BAD_GATEWAY, Value::Null))?;
    let policy = with_latest(api, &desired.collection, id).await?;
    let mut fields = Vec::new();
    if description_differs(&desired.spec, &policy) {
        fields.push("description".to_owned());
    }
    if policy.pointer("/latest/content") != desired.spec.get("content") {
        fields.push("content".to_owned());
    }
    Ok(Found {
        object: Some(policy_view(&policy)),
        fields,
        ..Found::default()
    })
}

pub(super) async fn apply_policy(
    api: &AdminApi<'_>,
    desired: &Desired,
    found: Found,
) -> (StatusCode, Value) {
    let collection = &desired.collection;
    let Some(object) = found.object else {
        let body = Value::Object(desired.spec.clone());
        return match api
            .expect(http::Method::POST, collection, Some(&body))
            .await
        {
            Ok(mut created) => {
                if let Some(fields) = created.as_object_mut() {
                    fields.remove("versions");
                }
                (
                    StatusCode::OK,
                    json!({"action": "created", "object": created}),
                )
            }
            Err(refused) => refused,
        };
    };
    if found.fields.iter().any(|field| field == "description") {
        return description_fixed("policy");
    }
    let Some(id) = plain_id(&object) else {
        return (StatusCode::BAD_GATEWAY, Value::Null);
    };
    let body = json!({"content": desired.spec.get("content")});
    let path = format!("{collection}/{id}/versions");
    match api.expect(http::Method::POST, &path, Some(&body)).await {
        Ok(version) => (
            StatusCode::OK,
            json!({"action": "updated", "object": with_version(object, &version)}),
        ),
        Err(refused) => refused,
    }
}

/// The latest version of each policy `names` lists, in that order; none when one of them is
/// still `pending` in a plan. A name no live policy has is a 404.
async fn latest_versions(
    api: &AdminApi<'_>,
    collection: &str,
    names: &[&str],
    known: &mut Listed,
    pending: &HashSet<String>,
) -> Result<Option<Vec<String>>, Refused> {
    let mut versions = Vec::with_capacity(names.len());
    let mut unknown = false;
    for name in names {
        // The document creates or changes it first: its next version is not known yet.
        if pending.contains(*name) {
            unknown = true;
            continue;
        }
        let policies = listed(api, known, collection).await?;
        let spec: Map<String, Value> = [("name".to_owned(), json!(name))].into_iter().collect();
        let Some(policy) = named(policies, "name", &spec).cloned() else {
            return Err((
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "error_description": format!("policy `{}` not found", truncated(name))}),
            ));
        };
        let id = plain_id(&policy).ok_or((StatusCode::BAD_GATEWAY, Value::Null))?;
        let policy = with_latest(api, collection, id).await?;
        match policy.pointer("/latest/id").and_then(Value::as_str) {
            Some(version) => versions.push(version.to_owned()),
            None => return Err((StatusCode::BAD_GATEWAY, Value::Null)),
        }
    }
    Ok((!unknown).then_some(versions))
}

/// The spec's canary cases, none when it gives none.
fn desired_canaries(spec: &Map<String, Value>) -> Vec<Canary> {
    spec.get("canaries")
        .and_then(|canaries| serde_json::from_value(canaries.clone()).ok())
        .unwrap_or_default()
}

pub(super) async fn observe_set(
    api: &AdminApi<'_>,
    desired: &Desired,
    set: Option<Value>,
    known: &mut Listed,
    pending: &HashSet<String>,
) -> Result<Found, Refused> {
    let names = policy_names(&desired.spec);
    let policies = policies_collection(&desired.collection);
    let manifest = latest_versions(api, &policies, &names, known, pending).await?;
    let Some(set) = set else {
        return Ok(Found {
            manifest,
            ..Found::default()
        });
    };
    let id = plain_id(&set).ok_or((StatusCode::BAD_GATEWAY, Value::Null))?;
    let active = set
        .get("active_version_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let versions = super::list_all(
        api,
        &format!("{}/{id}/versions", desired.collection),
        super::ENSURE_PAGING,
    )
    .await?;
    // What the set holds now: its active version when the spec wants it active, else its
    // latest (a new version of a set left inactive is never activated, so comparing with the
    // active one would add a version at every run).
    let wanted_active = desired.spec.get("active") == Some(&json!(true));
    let current = match active.as_deref().filter(|_| wanted_active) {
        Some(active) => versions
            .iter()
            .find(|version| version.get("id").and_then(Value::as_str) == Some(active)),
        None => versions
            .iter()
            .max_by_key(|version| version.get("version").and_then(Value::as_i64)),
    };
    let held: Option<HashSet<&str>> = current.map(|version| {
        version
            .get("manifest")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.get("policy_version_id").and_then(Value::as_str))
            .collect()
    });
    let held_canaries: Vec<Canary> = current
        .and_then(|version| version.get("canaries"))
        .and_then(|canaries| serde_json::from_value(canaries.clone()).ok())
        .unwrap_or_default();
    let mut fields = Vec::new();
    if description_differs(&desired.spec, &set) {
        fields.push("description".to_owned());
    }
    let same_manifest = match (&manifest, &held) {
        (Some(wanted), Some(held)) => {
            wanted.len() == held.len() && wanted.iter().all(|id| held.contains(id.as_str()))
        }
        _ => false,
    };
    if !same_manifest {
        fields.push("policies".to_owned());
    }
    if current.is_some() && held_canaries != desired_canaries(&desired.spec) {
        fields.push("canaries".to_owned());
    }
    if wanted_active && active.is_none() {
        fields.push("active".to_owned());
    }
    let version_id = current
        .and_then(|version| version.get("id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Found {
        object: Some(set),
        fields,
        manifest,
        version_id,
    })
}

pub(super) async fn apply_set(
    api: &AdminApi<'_>,
    desired: &Desired,
    found: Found,
) -> (StatusCode, Value) {
    match apply_set_steps(api, desired, found).await {
        Ok(answer) => (StatusCode::OK, answer),
        Err(refused) => refused,
    }
}

async fn apply_set_steps(
    api: &AdminApi<'_>,
    desired: &Desired,
    found: Found,
) -> Result<Value, Refused> {
    let collection = &desired.collection;
    if found.fields.iter().any(|field| field == "description") {
        return Err(description_fixed("policy set"));
    }
    // In apply every policy before the set has been applied: its manifest is known.
    let manifest = found
        .manifest
        .ok_or((StatusCode::BAD_GATEWAY, Value::Null))?;
    let (action, id) = match &found.object {
        Some(set) => (
            "updated",
            plain_id(set)
                .ok_or((StatusCode::BAD_GATEWAY, Value::Null))?
                .to_owned(),
        ),
        None => {
            let body: Map<String, Value> = desired
                .spec
                .iter()
                .filter(|(field, _)| matches!(field.as_str(), "name" | "description"))
                .map(|(field, value)| (field.clone(), value.clone()))
                .collect();
            let body = Value::Object(body);
            let created = api
                .expect(http::Method::POST, collection, Some(&body))
                .await?;
            let id = plain_id(&created).ok_or((StatusCode::BAD_GATEWAY, Value::Null))?;
            ("created", id.to_owned())
        }
    };
    let changed = |field: &str| found.fields.iter().any(|held| held == field);
    let mut version_id = found.version_id.clone();
    let new_version = found.object.is_none() || changed("policies") || changed("canaries");
    if new_version {
        let manifest: Vec<Value> = manifest
            .iter()
            .map(|id| json!({"policy_version_id": id}))
            .collect();
        let body = json!({"manifest": manifest, "canaries": desired_canaries(&desired.spec)});
        let path = format!("{collection}/{id}/versions");
        let version = api.expect(http::Method::POST, &path, Some(&body)).await?;
        version_id = version.get("id").and_then(Value::as_str).map(str::to_owned);
    }
    let wanted_active = desired.spec.get("active") == Some(&json!(true));
    if wanted_active && (new_version || changed("active")) {
        let body = json!({"version_id": version_id});
        let path = format!("{collection}/{id}/activate");
        api.expect(http::Method::POST, &path, Some(&body)).await?;
    }
    let object = api
        .expect(http::Method::GET, &format!("{collection}/{id}"), None)
        .await?;
    Ok(json!({"action": action, "object": object}))
}
