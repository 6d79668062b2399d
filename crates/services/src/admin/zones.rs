//! `/v1/zones`: create, list, read, rename and archive zones.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::get;
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{NewZone, Zone};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use super::{
    Change, evidence, invalid_body, json, list_query, live_zone, new_id, on_conflict, page,
    slug_of, timestamp, valid_name,
};
use crate::auth::{Access, authenticate};
use crate::error::ApiError;
use crate::ledger::SYSTEM_ZONE;
use crate::state::RoleState;
use crate::wire::{DcrStatusBody, Page, ZoneBody};

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/zones", get(list).post(create))
        .route(
            "/v1/zones/{zone_id}",
            get(read).patch(update).delete(archive),
        )
        .route("/v1/zones/{zone_id}/dcr-status", get(dcr_status))
}

/// Slugs a caller may not take: the reserved system zone's namespace.
const RESERVED_SLUG_PREFIX: &str = "caracal-sys";
const MAX_SLUG: usize = 63;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateZone {
    name: String,
    slug: Option<String>,
    dcr_enabled: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateZone {
    name: Option<String>,
    slug: Option<String>,
    dcr_enabled: Option<bool>,
    /// Turning registration off while registered applications live: `keep_live` lets them run
    /// out, `revoke_live` archives them and revokes everything they hold.
    dcr_shutdown: Option<String>,
}

fn body(zone: Zone) -> ZoneBody {
    ZoneBody {
        id: zone.id,
        name: zone.name,
        slug: zone.slug,
        dcr_enabled: zone.dcr_enabled,
        created_at: timestamp(zone.created_at_ms),
        archived_at: zone.archived_at_ms.map(timestamp),
    }
}

fn valid_slug(slug: &str) -> Result<String, ApiError> {
    let well_formed = !slug.is_empty()
        && slug.len() <= MAX_SLUG
        && slug
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
    if !well_formed {
        return Err(invalid_body(
            "slug",
            &format!("must be 1 to {MAX_SLUG} characters of a-z, 0-9 and -"),
        ));
    }
    if slug.starts_with(RESERVED_SLUG_PREFIX) {
        return Err(invalid_body("slug", "is reserved for the system zone"));
    }
    Ok(slug.to_owned())
}

/// A zone slug from its name; never in the reserved namespace.
fn zone_slug(name: &str) -> String {
    let slug = slug_of(name, MAX_SLUG - 4, "zone");
    if slug.starts_with(RESERVED_SLUG_PREFIX) {
        format!("zone-{slug}").chars().take(MAX_SLUG - 4).collect()
    } else {
        slug
    }
}

fn slug_conflict(slug: &str) -> ApiError {
    ApiError::with_description(
        ErrorCode::ZoneSlugConflict,
        format!("slug `{slug}` is taken"),
    )
}

async fn list(
    State(state): State<RoleState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<ZoneBody>>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    let own_zone = super::token_zone(&caller);
    caller.require(Access::Read, own_zone)?;
    let query = list_query(raw.as_deref())?;
    if query.status.is_some() {
        return Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            "zones have no `status` filter",
        ));
    }
    let zones: Vec<Zone> = state
        .shared
        .store
        .list_zones()
        .await?
        .into_iter()
        .filter(|zone| zone.archived_at_ms.is_none() && zone.id != SYSTEM_ZONE)
        .filter(|zone| own_zone.is_none_or(|own| own == zone.id))
        .collect();
    Ok(Json(page(
        zones,
        |zone| (zone.created_at_ms, zone.id.clone()),
        &query,
        body,
    )?))
}

async fn create(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    raw: Bytes,
) -> Result<(StatusCode, Json<ZoneBody>), ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let request: CreateZone = json(&raw)?;
    let name = valid_name(&request.name)?;
    let slug = match &request.slug {
        Some(slug) => valid_slug(slug)?,
        None => free_slug(&state, &zone_slug(&name)).await?,
    };
    let id = new_id();
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &id,
            action: "zone.create",
            entity_type: "zone",
            entity_id: &id,
            fields: if request.dcr_enabled.is_some() {
                vec!["name", "slug", "dcr_enabled"]
            } else {
                vec!["name", "slug"]
            },
        },
    )?;
    // The zone's first signing key is created with it, so its JWKS never 404s.
    let key = crate::keys::new_zone_key(&state.shared.kek, &id).map_err(|error| {
        tracing::error!(%error, "could not create a zone signing key");
        ApiError::new(ErrorCode::InternalError)
    })?;
    let zone = state
        .shared
        .store
        .create_zone_with_key(
            &NewZone {
                id,
                name,
                slug: slug.clone(),
            },
            request.dcr_enabled.unwrap_or(false),
            &key,
            &[evidence],
        )
        .await
        .map_err(on_conflict(slug_conflict(&slug)))?;
    Ok((StatusCode::CREATED, Json(body(zone))))
}

/// The zone's dynamically registered applications that are still live.
async fn live_dcr_applications(
    state: &RoleState,
    zone_id: &str,
) -> Result<Vec<caracal_store::Application>, ApiError> {
    let now = caracal_store::now_ms();
    Ok(state
        .shared
        .store
        .list_applications(zone_id)
        .await?
        .into_iter()
        .filter(|app| app.registration_method == "dcr" && app.active(now))
        .collect())
}

/// `base`, or `base-2`, `base-3`, … whichever no zone has yet.
async fn free_slug(state: &RoleState, base: &str) -> Result<String, ApiError> {
    let taken: std::collections::HashSet<String> = state
        .shared
        .store
        .list_zones()
        .await?
        .into_iter()
        .map(|zone| zone.slug)
        .collect();
    let candidate = (1..)
        .map(|n| {
            if n == 1 {
                base.to_owned()
            } else {
                format!("{base}-{n}")
            }
        })
        .find(|slug| !taken.contains(slug))
        .unwrap_or_else(|| base.to_owned());
    Ok(candidate)
}

async fn read(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
) -> Result<Json<ZoneBody>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    Ok(Json(body(
        live_zone(&state, &caller, &zone_id, Access::Read).await?,
    )))
}

async fn dcr_status(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
) -> Result<Json<DcrStatusBody>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    let zone = live_zone(&state, &caller, &zone_id, Access::Read).await?;
    let live = state
        .shared
        .store
        .count_live_dcr_applications(&zone_id, caracal_store::now_ms())
        .await?;
    Ok(Json(DcrStatusBody {
        dcr_enabled: zone.dcr_enabled,
        live_dcr_applications: u64::try_from(live).unwrap_or_default(),
    }))
}

async fn update(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<Json<ZoneBody>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    let zone = live_zone(&state, &caller, &zone_id, Access::Write).await?;
    let request: UpdateZone = json(&raw)?;
    let name = match &request.name {
        Some(name) => valid_name(name)?,
        None => zone.name,
    };
    let slug = match &request.slug {
        Some(slug) => valid_slug(slug)?,
        None => zone.slug,
    };
    let mut fields = Vec::new();
    if request.name.is_some() {
        fields.push("name");
    }
    if request.slug.is_some() {
        fields.push("slug");
    }
    let dcr_enabled = request.dcr_enabled.unwrap_or(zone.dcr_enabled);
    if request.dcr_enabled.is_some() {
        fields.push("dcr_enabled");
    }
    if let Some(shutdown) = &request.dcr_shutdown
        && !["keep_live", "revoke_live"].contains(&shutdown.as_str())
    {
        return Err(invalid_body(
            "dcr_shutdown",
            "must be `keep_live` or `revoke_live`",
        ));
    }
    // Turning registration off without saying what becomes of the live registered clients is
    // refused while any is live, checked in the change's own transaction: a client registered
    // just before it is counted, one just after it is refused registration.
    let now = caracal_store::now_ms();
    let refuse_live_dcr_at =
        (zone.dcr_enabled && !dcr_enabled && request.dcr_shutdown.is_none()).then_some(now);
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "zone.update",
            entity_type: "zone",
            entity_id: &zone_id,
            fields,
        },
    )?;
    let updated = state
        .shared
        .store
        .update_zone(
            &zone_id,
            &name,
            &slug,
            dcr_enabled,
            refuse_live_dcr_at,
            &[evidence],
        )
        .await;
    let zone = match updated {
        Err(caracal_store::StoreError::LimitReached(_)) => {
            let live = state
                .shared
                .store
                .count_live_dcr_applications(&zone_id, now)
                .await?;
            return Err(ApiError::with_description(
                ErrorCode::DcrShutdownRequired,
                format!(
                    "{live} registered application(s) are live: say `dcr_shutdown`: `keep_live` or `revoke_live`"
                ),
            )
            .with_details(serde_json::json!({"live_dcr_applications": live})));
        }
        updated => updated.map_err(on_conflict(slug_conflict(&slug)))?,
    };
    // Revoked after the zone stops accepting registration (a registration checks that in its
    // own statement), so no client registered meanwhile is left live. Not gated on the zone's
    // earlier state: a shutdown that failed halfway is finished by asking again.
    if !dcr_enabled && request.dcr_shutdown.as_deref() == Some("revoke_live") {
        for app in live_dcr_applications(&state, &zone_id).await? {
            revoke_registered(&state, &caller, request_id.as_deref(), &app).await?;
        }
    }
    Ok(Json(body(zone)))
}

/// DCR shutdown with `revoke_live`: the application archived, then every authority record it
/// holds revoked with its sessions, subtrees and edges (as the subject kill switch does).
async fn revoke_registered(
    state: &RoleState,
    caller: &crate::auth::AdminCaller,
    request_id: Option<&RequestId>,
    app: &caracal_store::Application,
) -> Result<(), ApiError> {
    let evidence = evidence(
        caller,
        request_id,
        Change {
            zone_id: &app.zone_id,
            action: "application.archive",
            entity_type: "application",
            entity_id: &app.id,
            fields: vec!["archived_at", "dcr_shutdown"],
        },
    )?;
    let store = state.shared.store.as_ref();
    store
        .archive_application(&app.zone_id, &app.id, &[evidence])
        .await?;
    store
        .revoke_subject(
            &app.zone_id,
            &app.id,
            "dcr_shutdown",
            crate::propagation::revocations,
        )
        .await?;
    Ok(())
}

async fn archive(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "zone.archive",
            entity_type: "zone",
            entity_id: &zone_id,
            fields: vec![],
        },
    )?;
    state
        .shared
        .store
        .archive_zone(&zone_id, &[evidence])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
