//! Control-key mints: an application holding the `control:invoke` trait exchanges its secret
//! for a short `use=resource` mandate addressed to the control audience, scoped by its
//! `control:scope:<scope>` traits, no longer than its `control:max-ttl:<seconds>` trait and
//! not after its `control:expires:<RFC 3339>` trait. The zone's policy is not consulted (the
//! traits are the policy; the determining policy is `control-key`), and the control audience
//! cannot be reached any other way.

use caracal_audit::Event;
use caracal_store::{Application, AuthorityRecord, now_ms};

use super::exchange::{ACCESS_TOKEN, Ask, DEFAULT_TTL, record_all};
use super::{Sts, TokenError, form};
use crate::state::RoleState;
use crate::wire::{MandateClaims, TokenResponse};

/// The resource a control mandate is for.
pub const AUDIENCE: &str = "caracal-control";

fn trait_value<'a>(application: &'a Application, prefix: &str) -> impl Iterator<Item = &'a str> {
    application
        .traits
        .iter()
        .filter_map(move |value| value.strip_prefix(prefix))
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
    if !application
        .traits
        .iter()
        .any(|value| value == "control:invoke")
    {
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
    let allowed: Vec<&str> = trait_value(application, "control:scope:").collect();
    if ask.scopes.is_empty()
        || !ask
            .scopes
            .iter()
            .all(|scope| scope.starts_with("control:") && allowed.contains(&scope.as_str()))
    {
        return Err(denied("scope not granted to this control key"));
    }
    let now = now_ms();
    if let Some(expires) = trait_value(application, "control:expires:").next() {
        let expired = humantime::parse_rfc3339(expires)
            .ok()
            .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
            .is_none_or(|at| i64::try_from(at.as_millis()).unwrap_or(0) <= now);
        if expired {
            return Err(denied("the control key has expired"));
        }
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
    let store = state.shared.store.as_ref();
    let keys = sts
        .keys
        .zone(store, &state.shared.kek, &ask.zone_id)
        .await?;
    let sid = uuid::Uuid::now_v7().to_string();
    let jti = uuid::Uuid::now_v7().to_string();
    let iat = now / 1000;
    let claims = MandateClaims {
        iss: sts.issuer.clone(),
        sub: application.id.clone(),
        aud: vec![AUDIENCE.to_owned()],
        exp: iat + ttl,
        iat,
        jti: jti.clone(),
        zone_id: ask.zone_id.clone(),
        client_id: application.id.clone(),
        sid: sid.clone(),
        root_sid: sid.clone(),
        use_: "resource".to_owned(),
        sub_type: "application".to_owned(),
        scope: Some(ask.scopes.join(" ")),
        target: Some(vec![AUDIENCE.to_owned()]),
        agent_session_id: None,
        delegation_edge_id: None,
        source_session_id: None,
        target_session_id: None,
        delegation_path: None,
        delegation_chain: None,
        hop_count: None,
        delegation_graph_epoch: None,
    };
    let token = crate::mandate::sign(&keys.header, &keys.signer, &claims).map_err(|error| {
        tracing::error!(%error, "mandate signing failed");
        TokenError::internal()
    })?;
    sts.authority
        .write(AuthorityRecord {
            id: sid,
            zone_id: ask.zone_id.clone(),
            session_type: "application".to_owned(),
            subject_id: application.id.clone(),
            parent_id: None,
            status: "active".to_owned(),
            claims: serde_json::json!({"jti": jti, "client_id": application.id, "use": "resource"})
                .to_string(),
            expires_at_ms: now + ttl * 1000,
            authenticated_at_ms: now,
            created_at_ms: now,
            revoked_at_ms: None,
            revoked_reason: None,
        })
        .await?;
    record_all(
        state,
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
    Ok(TokenResponse {
        access_token: token,
        token_type: "Bearer".to_owned(),
        expires_in: ttl,
        scope: claims.scope,
        issued_token_type: ACCESS_TOKEN.to_owned(),
        target_resources: Some(vec![AUDIENCE.to_owned()]),
        upstreams: None,
    })
}
