//! The overview and the zone screens: zones, a zone with its change controls, its audit,
//! a request explained, its timeline.

use super::*;

pub(super) async fn overview(State(state): State<RoleState>, session: Session) -> Response {
    let mut body = health::section(&state).await;
    let (status, containment) =
        admin(&state, &session, "GET", "/v1/incident/containment", None).await;
    body.push_str("<section class=\"card\"><h2>Containment</h2>");
    match containment.get("switches").and_then(Value::as_array) {
        Some(switches) if switches.is_empty() => {
            body.push_str("<p class=\"good\">Nothing contained.</p>");
        }
        Some(switches) => {
            body.push_str("<table><tr><th>Switch</th><th>Zone</th><th>Reason</th><th>By</th></tr>");
            for switch in switches {
                let field =
                    |name: &str| escape(switch.get(name).and_then(Value::as_str).unwrap_or(""));
                body.push_str(&format!(
                    "<tr><td class=\"bad\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    field("kind"),
                    field("zone_id"),
                    field("reason"),
                    field("actor")
                ));
            }
            body.push_str("</table>");
        }
        None => body.push_str(&format!(
            "<p>Not shown: {} ({})</p>",
            escape(&refusal(&containment)),
            status.as_u16()
        )),
    }
    body.push_str("</section>");
    let (_, tamper) = admin(&state, &session, "GET", "/v1/audit/tamper", None).await;
    let findings = tamper.get("items").and_then(Value::as_array).map(Vec::len);
    body.push_str(&format!(
        "<section class=\"card\"><h2>Audit</h2><p>{}</p></section>",
        match findings {
            Some(0) => "<span class=\"good\">No open tamper finding.</span>".to_owned(),
            Some(n) => format!("<span class=\"bad\">{n} open tamper finding(s).</span>"),
            None => escape(&refusal(&tamper)),
        }
    ));
    let (_, zones) = admin(&state, &session, "GET", "/v1/zones?limit=500", None).await;
    let count = zones
        .get("items")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    body.push_str(&format!(
        "<section class=\"card\"><h2>Zones</h2><p>{count} zone(s). <a href=\"/zones\">See them</a>.</p></section>"
    ));
    html(StatusCode::OK, layout("Overview", Some(&session), &body))
}

pub(super) async fn zones(State(state): State<RoleState>, session: Session) -> Response {
    zones_page(&state, &session, None).await
}

pub(super) async fn zones_page(
    state: &RoleState,
    session: &Session,
    notice: Option<String>,
) -> Response {
    let (status, zones) = admin(state, session, "GET", "/v1/zones?limit=500", None).await;
    let mut body = notice.unwrap_or_default();
    match zones.get("items").and_then(Value::as_array) {
        Some(items) => {
            body.push_str("<table><tr><th>Name</th><th>Slug</th><th>Id</th><th>Created</th></tr>");
            for zone in items {
                let field =
                    |name: &str| escape(zone.get(name).and_then(Value::as_str).unwrap_or(""));
                body.push_str(&format!(
                    "<tr><td class=\"zone-name\"><a href=\"/zones/{}\">{}</a></td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                    field("id"),
                    field("name"),
                    field("slug"),
                    field("id"),
                    field("created_at")
                ));
            }
            body.push_str("</table>");
        }
        None => {
            return error_page(status, Some(session), &refusal(&zones));
        }
    }
    // A read-only sign-in sees no mutating control (and the API refuses one anyway).
    if session.writer {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/zones\" class=\"card\"><h2>New zone</h2>\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <p><label>Name<br><input type=\"text\" name=\"name\" required></label></p>\
             <p><button>Create</button></p></form>",
            escape(&session.csrf)
        ));
    }
    html(StatusCode::OK, layout("Zones", Some(session), &body))
}

#[derive(Deserialize)]
pub(super) struct ZoneForm {
    name: String,
}

pub(super) async fn create_zone(
    State(state): State<RoleState>,
    Posted(session, form): Posted<ZoneForm>,
) -> Response {
    let answer = match succeeded(
        &state,
        &session,
        "POST",
        "/v1/zones",
        Some(serde_json::json!({ "name": form.name })),
    )
    .await
    {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let notice = format!(
        "<p class=\"good\">Zone {} created.</p>",
        escape(answer.get("name").and_then(Value::as_str).unwrap_or(""))
    );
    zones_page(&state, &session, Some(notice)).await
}

pub(super) async fn zone(
    State(state): State<RoleState>,
    session: Session,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
) -> Response {
    let Some(zone_id) = zone_path(&zone_id) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such zone");
    };
    let base = format!("/v1/zones/{zone_id}");
    let (status, zone) = admin(&state, &session, "GET", &base, None).await;
    if !status.is_success() {
        return error_page(status, Some(&session), &refusal(&zone));
    }
    let name = zone.get("name").and_then(Value::as_str).unwrap_or("");
    let mut body = format!(
        "<p><code>{}</code> · <a href=\"/zones/{}/audit\">Audit</a> · \
         <a href=\"/zones/{}/timeline\">Timeline</a> · \
         <a href=\"/zones/{}/sessions\">Sessions and delegations</a></p>",
        escape(zone_id),
        escape(zone_id),
        escape(zone_id),
        escape(zone_id)
    );
    let sections: [(&str, String, Columns<'_>); 7] = [
        (
            "Applications",
            format!("{base}/applications?limit=500"),
            &[
                ("Name", "/name"),
                ("Id", "/id"),
                ("Traits", "/traits"),
                ("Created", "/created_at"),
            ],
        ),
        (
            "Providers (secrets are never shown)",
            format!("{base}/providers?limit=500"),
            &[
                ("Name", "/name"),
                ("Identifier", "/identifier"),
                ("Kind", "/kind"),
                ("Secret keys", "/secret_config_keys"),
            ],
        ),
        (
            "Resources",
            format!("{base}/resources?limit=500"),
            &[
                ("Identifier", "/identifier"),
                ("Upstream", "/upstream_url"),
                ("Scopes", "/scopes"),
                ("Operations", "/operation_enforcement"),
            ],
        ),
        (
            "Policy sets",
            format!("{base}/policy-sets?limit=500"),
            &[
                ("Name", "/name"),
                ("Id", "/id"),
                ("Active version", "/active_version_id"),
                ("Last known good", "/last_known_good_version_id"),
            ],
        ),
        (
            "Sessions",
            format!("{base}/sessions?limit=100"),
            &[
                ("Session", "/agent_session_id"),
                ("Application", "/application_id"),
                ("Parent", "/parent_id"),
                ("Status", "/status"),
                ("Labels", "/labels"),
                ("Subject", "/subject_id"),
            ],
        ),
        (
            "Pending approvals",
            format!("{base}/approvals?state=pending"),
            &[
                ("Hold", "/id"),
                ("Principal", "/principal_id"),
                ("Application", "/application_id"),
                ("Tier", "/tier"),
                ("Expires", "/expires_at"),
            ],
        ),
        (
            "Notification sinks",
            format!("{base}/notification-sinks?limit=500"),
            &[
                ("Name", "/name"),
                ("URL", "/url"),
                ("Events", "/event_types"),
                ("Active", "/active"),
                ("Failures in a row", "/consecutive_failures"),
                ("Last error", "/last_error"),
            ],
        ),
    ];
    for (title, path, columns) in sections {
        let (_, answer) = admin(&state, &session, "GET", &path, None).await;
        body.push_str(&format!(
            "<section class=\"card\"><h2>{}</h2>{}{}</section>",
            escape(title),
            table(&answer, columns),
            if session.writer {
                actions(title, zone_id, &session.csrf, &answer)
            } else {
                String::new()
            }
        ));
    }
    if session.writer {
        body.push_str(&new_sink(zone_id, &session.csrf));
        body.push_str(&secret_exposure(zone_id, &session.csrf));
    }
    html(
        StatusCode::OK,
        layout(&format!("Zone {name}"), Some(&session), &body),
    )
}

#[derive(Deserialize, Default)]
struct AuditFilter {
    decision: Option<String>,
    event_type: Option<String>,
}

pub(super) async fn audit(
    State(state): State<RoleState>,
    session: Session,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let Some(zone_id) = zone_path(&zone_id) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such zone");
    };
    let filter: AuditFilter =
        serde_urlencoded::from_str(raw.as_deref().unwrap_or_default()).unwrap_or_default();
    let mut query = vec![("limit", "100".to_owned())];
    let decision = filter
        .decision
        .filter(|decision| matches!(decision.as_str(), "allow" | "deny"));
    if let Some(decision) = &decision {
        query.push(("decision", decision.clone()));
    }
    let event_type = filter
        .event_type
        .filter(|kind| !kind.is_empty() && kind.len() <= 100);
    if let Some(kind) = &event_type {
        query.push(("event_type", kind.clone()));
    }
    let path = format!(
        "/v1/zones/{zone_id}/audit?{}",
        serde_urlencoded::to_string(&query).unwrap_or_default()
    );
    let (_, events) = admin(&state, &session, "GET", &path, None).await;
    let (_, checkpoint) = admin(
        &state,
        &session,
        "GET",
        &format!("/v1/zones/{zone_id}/audit/checkpoint"),
        None,
    )
    .await;
    let checkpoint = match checkpoint.get("tree_size") {
        Some(size) => format!(
            "<p>Latest checkpoint: {} rows, root <code>{}</code>, key <code>{}</code>, signed {}. \
             <a href=\"/zones/{}/audit/export\">Download the export</a> (verify offline with \
             <code>caracal audit verify FILE --public-key {}</code>).</p>",
            escape(&size.to_string()),
            escape(text_of(&checkpoint, "root_hash")),
            escape(text_of(&checkpoint, "key_id")),
            escape(text_of(&checkpoint, "issued_at")),
            escape(zone_id),
            escape(text_of(&checkpoint, "public_key"))
        ),
        None => format!("<p>{}</p>", escape(&refusal(&checkpoint))),
    };
    let (_, tamper) = admin(&state, &session, "GET", "/v1/audit/tamper", None).await;
    let findings = tamper
        .get("items")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let chain = if findings == 0 {
        "<span class=\"good\">No open tamper finding: the last sweeps verified the chains.</span>"
            .to_owned()
    } else {
        format!("<span class=\"bad\">{findings} open tamper finding(s).</span>")
    };
    let body = format!(
        "<section class=\"card\"><p>{chain}</p>{checkpoint}\
         <form method=\"get\"><label>Decision <select name=\"decision\">\
         <option value=\"\">any</option><option{}>allow</option><option{}>deny</option></select></label> \
         <label>Event type <input type=\"text\" name=\"event_type\" value=\"{}\"></label> \
         <button>Filter</button></form>\
         <form method=\"get\" action=\"/zones/{}/audit/explain\"><label>Explain request \
         <input type=\"text\" name=\"request_id\"></label> <button>Explain</button></form></section>{}",
        if decision.as_deref() == Some("allow") {
            " selected"
        } else {
            ""
        },
        if decision.as_deref() == Some("deny") {
            " selected"
        } else {
            ""
        },
        escape(event_type.as_deref().unwrap_or("")),
        escape(zone_id),
        table(
            &events,
            &[
                ("When", "/occurred_at_ms"),
                ("Event", "/event_type"),
                ("Decision", "/decision"),
                ("Request", "/request_id"),
                ("Policy set version", "/policy_set_version_id")
            ],
        )
    );
    html(StatusCode::OK, layout("Audit", Some(&session), &body))
}

/// The change controls of a zone page's section, one form per item: rotate an application's
/// secret, roll a policy set back to its last known good version, decide a pending approval.
pub(super) fn actions(section: &str, zone_id: &str, csrf: &str, answer: &Value) -> String {
    let (action, label, reason): (&str, &str, bool) = match section {
        "Applications" => ("rotate", "Rotate secret", false),
        "Policy sets" => ("rollback", "Roll back to last known good", false),
        "Pending approvals" => ("decide", "", true),
        "Notification sinks" => ("rotate-sink", "Rotate signing secret", false),
        _ => return String::new(),
    };
    let items = answer
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut forms = String::new();
    for item in items {
        let id = item.get("id").and_then(Value::as_str).unwrap_or("");
        let name = item.get("name").and_then(Value::as_str).unwrap_or(id);
        let buttons = if reason {
            "<input type=\"text\" name=\"reason\" placeholder=\"reason\"> \
             <button name=\"decision\" value=\"approve\">Approve</button> \
             <button name=\"decision\" value=\"reject\">Reject</button>"
                .to_owned()
        } else {
            format!("<button>{}</button>", escape(label))
        };
        if section == "Policy sets" {
            forms.push_str(&format!(
                "<p><a href=\"/zones/{}/policy-sets/{}\">{}: versions, diff, simulate</a></p>",
                escape(zone_id),
                escape(id),
                escape(name)
            ));
        }
        forms.push_str(&format!(
            "<form method=\"post\" action=\"/zones/{}/act\" class=\"action\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <input type=\"hidden\" name=\"action\" value=\"{action}\">\
             <input type=\"hidden\" name=\"id\" value=\"{}\">{} {buttons}</form>",
            escape(zone_id),
            escape(csrf),
            escape(id),
            escape(name),
        ));
    }
    forms
}

/// A new approval webhook: its name and URL (every approval event type).
fn new_sink(zone_id: &str, csrf: &str) -> String {
    format!(
        "<section class=\"card\"><h2>New notification sink</h2>\
         <form method=\"post\" action=\"/zones/{}/act\" class=\"action\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <input type=\"hidden\" name=\"action\" value=\"add-sink\">\
         <input type=\"hidden\" name=\"id\" value=\"{}\">\
         <input type=\"text\" name=\"name\" placeholder=\"name\" required> \
         <input type=\"url\" name=\"url\" placeholder=\"https://…\" required> \
         <button>Add sink</button></form></section>",
        escape(zone_id),
        escape(csrf),
        escape(zone_id),
    )
}

/// The secret-exposure runbook's zone controls: a new signing key (the old one verifying for
/// the overlap given, none by default, as a leak needs), and every session ended.
fn secret_exposure(zone_id: &str, csrf: &str) -> String {
    let form = |action: &str, fields: &str, button: &str| {
        format!(
            "<form method=\"post\" action=\"/zones/{}/act\" class=\"action\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <input type=\"hidden\" name=\"action\" value=\"{action}\">\
             <input type=\"hidden\" name=\"id\" value=\"{}\">{fields} \
             <input type=\"text\" name=\"reason\" placeholder=\"reason\" required> \
             <button>{button}</button></form>",
            escape(zone_id),
            escape(csrf),
            escape(zone_id),
        )
    };
    format!(
        "<section class=\"card\"><h2>Secret exposure</h2>{}{}</section>",
        form(
            "rotate-key",
            "<label>old key verifies for <input type=\"number\" name=\"overlap_seconds\" \
             min=\"0\" max=\"604800\" value=\"0\"> s</label>",
            "Rotate the signing key",
        ),
        form(
            "invalidate",
            "",
            "End every session and revoke every authority record"
        ),
    )
}

#[derive(Deserialize)]
pub(super) struct ActForm {
    action: String,
    id: String,
    #[serde(default)]
    decision: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    overlap_seconds: Option<u64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

pub(super) async fn act(
    State(state): State<RoleState>,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
    Posted(session, form): Posted<ActForm>,
) -> Response {
    let (Some(zone_id), true) = (zone_path(&zone_id), caracal_core::is_plain_id(&form.id)) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such object");
    };
    let id = &form.id;
    let (path, payload) = match (form.action.as_str(), form.decision.as_deref()) {
        ("rotate", _) => (
            format!("/v1/zones/{zone_id}/applications/{id}/rotate-secret"),
            serde_json::json!({}),
        ),
        ("rollback", _) => (
            format!("/v1/zones/{zone_id}/policy-sets/{id}/rollback"),
            serde_json::json!({}),
        ),
        ("decide", Some(decision @ ("approve" | "reject"))) => (
            format!("/v1/zones/{zone_id}/approvals/{id}/{decision}"),
            serde_json::json!({ "reason": form.reason.filter(|reason| !reason.is_empty()) }),
        ),
        ("rotate-key", _) if id == zone_id => (
            format!("/v1/zones/{zone_id}/signing-keys/rotate"),
            serde_json::json!({
                "overlap_seconds": form.overlap_seconds.unwrap_or(0),
                "reason": form.reason,
            }),
        ),
        ("rotate-sink", _) => (
            format!("/v1/zones/{zone_id}/notification-sinks/{id}/rotate-secret"),
            serde_json::json!({}),
        ),
        ("add-sink", _) if id == zone_id => (
            format!("/v1/zones/{zone_id}/notification-sinks"),
            serde_json::json!({ "name": form.name.unwrap_or_default(), "url": form.url.unwrap_or_default() }),
        ),
        ("invalidate", _) if id == zone_id => (
            format!("/v1/zones/{zone_id}/invalidate-sessions"),
            serde_json::json!({ "reason": form.reason.unwrap_or_default() }),
        ),
        _ => return error_page(StatusCode::BAD_REQUEST, Some(&session), "unknown action"),
    };
    let answer = match succeeded(&state, &session, "POST", &path, Some(payload)).await {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let done = match form.action.as_str() {
        // Shown once, on a page that is never cached.
        "rotate" => format!(
            "<p class=\"good\">New client secret (shown once; store it now):</p><p><code class=\"secret\">{}</code></p>",
            escape(
                answer
                    .get("client_secret")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            )
        ),
        "rotate-sink" | "add-sink" => format!(
            "<p class=\"good\">The sink's signing secret (shown once; store it now):</p><p><code class=\"secret\">{}</code></p>",
            escape(answer.get("secret").and_then(Value::as_str).unwrap_or(""))
        ),
        "rotate-key" => format!(
            "<p class=\"good\">New signing key {} signs from now on.</p>",
            escape(answer.get("kid").and_then(Value::as_str).unwrap_or(""))
        ),
        "invalidate" => "<p class=\"good\">Every session of the zone ended and every authority record revoked.</p>".to_owned(),
        "rollback" => format!(
            "<p class=\"good\">Rolled back: version {} is active again.</p>",
            escape(
                answer
                    .get("version_id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            )
        ),
        _ => format!(
            "<p class=\"good\">Approval {} {}.</p>",
            escape(id),
            escape(
                answer
                    .get("state")
                    .and_then(Value::as_str)
                    .unwrap_or("decided")
            )
        ),
    };
    html(
        StatusCode::OK,
        layout(
            "Done",
            Some(&session),
            &format!(
                "{done}<p><a href=\"/zones/{}\">Back to the zone</a></p>",
                escape(zone_id)
            ),
        ),
    )
}

#[derive(Deserialize, Default)]
struct ExplainQuery {
    request_id: Option<String>,
}

/// One request's events and each deny rebuilt (policy input, decision, reasons), from
/// `…/audit/by-request/{id}/explain`. `/zones/{zone}/audit/explain?request_id=` is the form's.
pub(super) async fn explain(
    State(state): State<RoleState>,
    session: Session,
    axum::extract::Path((zone_id, request_id)): axum::extract::Path<(String, String)>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let request_id = if request_id == "explain" {
        serde_urlencoded::from_str::<ExplainQuery>(raw.as_deref().unwrap_or_default())
            .unwrap_or_default()
            .request_id
            .unwrap_or_default()
    } else {
        request_id
    };
    let (Some(zone_id), true) = (zone_path(&zone_id), caracal_core::is_plain_id(&request_id))
    else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such request");
    };
    let answer = match succeeded(
        &state,
        &session,
        "GET",
        &format!("/v1/zones/{zone_id}/audit/by-request/{request_id}/explain"),
        None,
    )
    .await
    {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let mut body = format!(
        "<section class=\"card\"><p>Final decision: <strong class=\"decision\">{}</strong></p></section>",
        escape(text_of(&answer, "final_decision"))
    );
    body.push_str(&format!(
        "<section class=\"card\"><h2>Events</h2>{}</section>",
        table(
            &serde_json::json!({ "items": answer.get("events").cloned().unwrap_or(Value::Null) }),
            &[
                ("Event", "/event_type"),
                ("Decision", "/decision"),
                ("Policy set version", "/policy_set_version_id"),
                ("Diagnostics", "/diagnostics_json")
            ],
        )
    ));
    for denied in answer
        .get("denied")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let pretty = |pointer: &str| {
            denied
                .pointer(pointer)
                .map(|value| serde_json::to_string_pretty(value).unwrap_or_default())
                .unwrap_or_default()
        };
        body.push_str(&format!(
            "<section class=\"card\"><h2>Deny {}</h2><p>Rebuilt under version <code>{}</code>; matches the record: {}</p>\
             <h3>Policy input</h3><pre>{}</pre><h3>Decision</h3><pre>{}</pre></section>",
            escape(text_of(denied, "event_id")),
            escape(text_of(denied, "policy_set_version_id")),
            escape(&pretty("/matches_record")),
            escape(&pretty("/policy_input")),
            escape(&pretty("/rebuilt"))
        ));
    }
    html(
        StatusCode::OK,
        layout("Explain a request", Some(&session), &body),
    )
}

#[derive(Deserialize, Default)]
struct TimelineQuery {
    session: Option<String>,
    request: Option<String>,
}

/// A zone's events oldest first (the newest 500), optionally of one session or one request:
/// `caracal incident timeline` in the browser.
pub(super) async fn timeline(
    State(state): State<RoleState>,
    session: Session,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let Some(zone_id) = zone_path(&zone_id) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such zone");
    };
    let filter: TimelineQuery =
        serde_urlencoded::from_str(raw.as_deref().unwrap_or_default()).unwrap_or_default();
    let plain = |value: Option<String>| value.filter(|id| caracal_core::is_plain_id(id));
    let (by_session, by_request) = (plain(filter.session), plain(filter.request));
    let mut query = vec![("limit", "500".to_owned())];
    if let Some(id) = &by_session {
        query.push(("session_id", id.clone()));
    }
    if let Some(id) = &by_request {
        query.push(("request_id", id.clone()));
    }
    let path = format!(
        "/v1/zones/{zone_id}/audit?{}",
        serde_urlencoded::to_string(&query).unwrap_or_default()
    );
    let (status, mut events) = admin(&state, &session, "GET", &path, None).await;
    if !status.is_success() {
        return error_page(status, Some(&session), &refusal(&events));
    }
    if let Some(items) = events.get_mut("items").and_then(Value::as_array_mut) {
        items.reverse();
    }
    let body = format!(
        "<section class=\"card\"><form method=\"get\"><label>Session <input type=\"text\" name=\"session\" value=\"{}\"></label> \
         <label>Request <input type=\"text\" name=\"request\" value=\"{}\"></label> <button>Show</button></form></section>{}",
        escape(by_session.as_deref().unwrap_or("")),
        escape(by_request.as_deref().unwrap_or("")),
        table(
            &events,
            &[
                ("Seq", "/chain_seq"),
                ("When (ms)", "/occurred_at_ms"),
                ("Event", "/event_type"),
                ("Decision", "/decision"),
                ("Request", "/request_id"),
                ("Actor", "/metadata_json/actor")
            ],
        )
    );
    html(StatusCode::OK, layout("Timeline", Some(&session), &body))
}

/// The zone's audit export (rows, checkpoint, proofs) as a download.
pub(super) async fn export(
    State(state): State<RoleState>,
    session: Session,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
) -> Response {
    let Some(zone_id) = zone_path(&zone_id) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such zone");
    };
    download(
        &state,
        &session,
        &format!("/v1/zones/{zone_id}/audit/export"),
        "application/x-ndjson",
        &format!("caracal-audit-{zone_id}.jsonl"),
    )
    .await
}
