//! Control-key mints: an application holding the `control:invoke` trait exchanges its secret
//! for a short `use=resource` mandate addressed to the control audience, scoped by its
//! `control:scope:<scope>` traits, no longer than its `control:max-ttl:<seconds>` trait and
//! not after its `control:expires:<RFC 3339>` trait. The zone's policy is not consulted (the
//! traits are the policy; the determining policy is `control-key`), and the control audience
//! cannot be reached any other way.

use caracal_audit::Event;
use caracal_store::{Application, now_ms};

use super::exchange::{Ask, DEFAULT_TTL, Issue, Issued, answer, commit, issue};
use super::{Sts, TokenError, form};
use crate::state::RoleState;
use crate::wire::TokenResponse;

/// The resource a control mandate is for.
pub const AUDIENCE: &str = "caracal-control";

fn trait_value<'a>(application: &'a Application, prefix: &str) -> impl Iterator<Item = &'a str> {
    application
        .traits
        .iter()
        .filter_map(move |value| value.strip_prefix(prefix))
}

/// Whether `application` is a control key (it holds `control:invoke`).
pub(crate) fn is_control_key(application: &Application) -> bool {
    application
        .traits
        .iter()
        .any(|value| value == "control:invoke")
}

/// Whether a control key is past its `control:expires:` trait at `now` (an unreadable expiry
/// counts as past).
pub(crate) fn key_expired(application: &Application, now: i64) -> bool {
    trait_value(application, "control:expires:")
        .next()
        .is_some_and(|expires| {
            humantime::parse_rfc3339(expires)
                .ok()
                .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                .is_none_or(|at| i64::try_from(at.as_millis()).unwrap_or(0) <= now)
        })
}

/// The scopes a control key's `control:scope:` traits grant.
pub(crate) fn key_scopes(application: &Application) -> impl Iterator<Item = &str> {
    trait_value(application, "control:scope:")
}

pub(super) async fn mint(
    state: &RoleState,
    sts: &Sts,
    request_id: &str,
    form: &form::TokenForm,
    ask: &Ask,
    application: &Application,
) -> Result<TokenResponse, TokenError> {
    let denied = TokenError::denied;
    if ask.resources.len() != 1 {
        return Err(denied("the control audience is minted alone"));
    }
    if !is_control_key(application) {
        return Err(denied("the control audience needs a control key"));
    }
    if form.subject_token.is_some()
        || form.agent_session_id.is_some()
        || form.delegation_edge_id.is_some()
    {
        return Err(denied(
            "a control mint carries no subject, session or delegation",
        ));
    }
    let allowed: Vec<&str> = key_scopes(application).collect();
    if ask.scopes.is_empty()
        || !ask
            .scopes
            .iter()
            .all(|scope| scope.starts_with("control:") && allowed.contains(&scope.as_str()))
    {
        return Err(denied("scope not granted to this control key"));
    }
    let now = now_ms();
    if key_expired(application, now) {
        return Err(denied("the control key has expired"));
    }
    let max_ttl = trait_value(application, "control:max-ttl:")
        .next()
        .and_then(|seconds| seconds.parse::<i64>().ok())
        .unwrap_or(DEFAULT_TTL);
    let ttl = ask.ttl.unwrap_or(DEFAULT_TTL).min(max_ttl);
    if ask.ttl.is_some_and(|asked| asked > max_ttl) {
        return Err(denied(
            "ttl_seconds exceeds the control key's control:max-ttl",
        ));
    }
    if ttl <= 0 {
        return Err(denied("the control key allows no lifetime"));
    }
    super::exchange::within_mint_limit(state, sts, &ask.zone_id, AUDIENCE, &application.id).await?;
    let Issued {
        token,
        record,
        scope,
    } = issue(
        state,
        sts,
        Issue {
            zone_id: &ask.zone_id,
            sid: uuid::Uuid::now_v7().to_string(),
            root_sid: None,
            parent_id: None,
            sub: &application.id,
            sub_type: "application",
            client_id: &application.id,
            aud: vec![AUDIENCE.to_owned()],
            use_: "resource",
            scope: Some(ask.scopes.join(" ")),
            target: vec![AUDIENCE.to_owned()],
            agent_session_id: None,
            delegation: None,
            ttl,
            now,
        },
    )
    .await?;
    commit(
        state,
        sts,
        record,
        vec![Event {
            id: uuid::Uuid::now_v7().to_string(),
            zone_id: ask.zone_id.clone(),
            event_type: "token_exchange".to_owned(),
            request_id: request_id.to_owned(),
            decision: "allow".to_owned(),
            policy_set_id: None,
            policy_set_version_id: None,
            manifest_sha: None,
            evaluation_status: "complete".to_owned(),
            determining_policies_json: serde_json::json!([{"policy": "control-key"}]),
            diagnostics_json: serde_json::json!([]),
            metadata_json: serde_json::json!({"application_id": application.id, "resource": AUDIENCE, "scopes": ask.scopes}),
            occurred_at_ms: now,
        }],
    )
    .await?;
    Ok(answer(token, ttl, scope, vec![AUDIENCE.to_owned()], None))
}
