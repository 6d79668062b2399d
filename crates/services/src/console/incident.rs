//! Incident response: containment in force, contain and release with a reason, the recovery
//! checks of `validate` (with a zone's canaries for a writer) and signed evidence bundles to
//! build and download. All through the API's `/v1/incident/*` with the session's token.

use super::*;

pub(super) async fn incident(State(state): State<RoleState>, session: Session) -> Response {
    incident_page(&state, &session, None).await
}

pub(super) async fn incident_page(
    state: &RoleState,
    session: &Session,
    notice: Option<String>,
) -> Response {
    let (_, containment) = admin(state, session, "GET", "/v1/incident/containment", None).await;
    let mut body = notice.unwrap_or_default();
    body.push_str(&format!(
        "<section class=\"card\"><h2>In force</h2>{}</section>",
        table(
            &serde_json::json!({ "items": containment.get("switches").cloned().unwrap_or(Value::Null) }),
            &[("Switch", "/kind"), ("Zone", "/zone_id"), ("Reason", "/reason"), ("By", "/actor")],
        )
    ));
    let csrf = escape(&session.csrf);
    // The audit tamper and DLQ rows of the runbook: what was found, and its controls.
    let (_, findings) = admin(state, session, "GET", "/v1/audit/tamper", None).await;
    let acknowledge = if session.writer && has_items(&findings) {
        format!(
            "<form method=\"post\" action=\"/incident/tamper\" class=\"action\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"text\" name=\"reason\" placeholder=\"what was checked\" required> \
             <button>Acknowledge every finding</button></form>"
        )
    } else {
        String::new()
    };
    body.push_str(&format!(
        "<section class=\"card\"><h2>Audit tamper findings</h2>{}{acknowledge}</section>",
        table(
            &findings,
            &[
                ("Zone", "/zone_id"),
                ("Row", "/seq"),
                ("Kind", "/kind"),
                ("Detail", "/detail")
            ],
        )
    ));
    let (_, dead) = admin(state, session, "GET", "/v1/audit/dlq?limit=50", None).await;
    let replay = if session.writer && has_items(&dead) {
        format!(
            "<form method=\"post\" action=\"/incident/dlq\" class=\"action\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button>Replay the transient ones</button></form>"
        )
    } else {
        String::new()
    };
    body.push_str(&format!(
        "<section class=\"card\"><h2>Audit dead letters (oldest 50)</h2>{}{replay}</section>",
        table(
            &dead,
            &[
                ("Entry", "/id"),
                ("Reason", "/reason"),
                ("Deliveries", "/deliveries"),
                ("Replayable", "/replayable"),
                ("Zone", "/zone_id"),
            ],
        )
    ));
    let canary_fields = if session.writer {
        "<p>Canaries (optional; they act as an agent in the zone): \
         <label>zone <input type=\"text\" name=\"zone\"></label> \
         <label>application <input type=\"text\" name=\"app\"></label> \
         <label>secret <input type=\"password\" name=\"secret\" autocomplete=\"off\"></label> \
         <label>resource <input type=\"text\" name=\"resource\"></label></p>"
    } else {
        ""
    };
    body.push_str(&format!(
        "<form method=\"post\" action=\"/incident/validate\" class=\"card\"><h2>Validate recovery</h2>\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{canary_fields}\
         <p><button>Run the checks</button></p></form>"
    ));
    if session.writer {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/incident/preserve\" class=\"card\"><h2>Preserve evidence</h2>\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <p>A signed bundle of the audit exports, streams, database, configuration, logs and metrics.</p>\
             <p><label>Reason<br><input type=\"text\" name=\"reason\" required></label></p>\
             <p><button>Build the bundle</button></p></form>"
        ));
        body.push_str(&format!(
            "<form method=\"post\" action=\"/incident\" class=\"card\"><h2>Contain or release</h2>\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <p><label>Switch <select name=\"switch\"><option value=\"freeze\">freeze changes</option>\
             <option value=\"fail_closed\">fail closed (refuse protected traffic)</option></select></label></p>\
             <p><label>Reason<br><input type=\"text\" name=\"reason\" required></label></p>\
             <p><button name=\"action\" value=\"contain\">Contain</button> \
             <button name=\"action\" value=\"release\">Release</button></p></form>",
            escape(&session.csrf)
        ));
    }
    html(StatusCode::OK, layout("Incident", Some(session), &body))
}

#[derive(Deserialize)]
pub(super) struct SwitchForm {
    switch: String,
    reason: String,
    action: String,
}

pub(super) async fn contain_or_release(
    State(state): State<RoleState>,
    Posted(session, form): Posted<SwitchForm>,
) -> Response {
    let path = match form.action.as_str() {
        "contain" => "/v1/incident/contain",
        "release" => "/v1/incident/release",
        _ => return error_page(StatusCode::BAD_REQUEST, Some(&session), "unknown action"),
    };
    let switch = match form.switch.as_str() {
        "freeze" => serde_json::json!({ "freeze": true, "reason": form.reason }),
        "fail_closed" => serde_json::json!({ "fail_closed": true, "reason": form.reason }),
        _ => return error_page(StatusCode::BAD_REQUEST, Some(&session), "unknown switch"),
    };
    if let Err(refused) = succeeded(&state, &session, "POST", path, Some(switch)).await {
        return refused;
    }
    let notice = format!(
        "<p class=\"good\">{} {}: done.</p>",
        escape(&form.action),
        escape(&form.switch)
    );
    incident_page(&state, &session, Some(notice)).await
}

fn has_items(answer: &Value) -> bool {
    answer
        .get("items")
        .and_then(Value::as_array)
        .is_some_and(|items| !items.is_empty())
}

#[derive(Deserialize)]
pub(super) struct AcknowledgeForm {
    reason: String,
}

/// Acknowledges the audit tamper findings (what lets the Audit role be ready again).
pub(super) async fn acknowledge_tamper(
    State(state): State<RoleState>,
    Posted(session, form): Posted<AcknowledgeForm>,
) -> Response {
    let path = "/v1/audit/tamper/ack";
    let body = serde_json::json!({ "reason": form.reason });
    let answer = match succeeded(&state, &session, "POST", path, Some(body)).await {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let notice = format!(
        "<p class=\"good\">{} tamper findings acknowledged.</p>",
        answer
            .get("acknowledged")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    );
    incident_page(&state, &session, Some(notice)).await
}

/// Re-sends the dead letters whose failure was transient; the rest stay for a person to read.
pub(super) async fn replay_dead_letters(
    State(state): State<RoleState>,
    Posted(session, CsrfForm { .. }): Posted<CsrfForm>,
) -> Response {
    let answer = match succeeded(&state, &session, "POST", "/v1/audit/dlq/replay", None).await {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let count = |key: &str| answer.get(key).and_then(Value::as_u64).unwrap_or(0);
    let notice = format!(
        "<p class=\"good\">Dead letters: {} replayed, {} left (not transient), of {} read.</p>",
        count("replayed"),
        count("skipped"),
        count("scanned")
    );
    incident_page(&state, &session, Some(notice)).await
}

#[derive(Deserialize)]
pub(super) struct ValidateForm {
    #[serde(default)]
    zone: String,
    #[serde(default)]
    app: String,
    #[serde(default)]
    secret: String,
    #[serde(default)]
    resource: String,
}

/// Runs the recovery checks and shows each with what it saw.
pub(super) async fn validate(
    State(state): State<RoleState>,
    Posted(session, form): Posted<ValidateForm>,
) -> Response {
    let given = |value: &str| (!value.trim().is_empty()).then(|| value.trim().to_owned());
    let mut canary = serde_json::Map::new();
    for (field, value) in [
        ("zone", &form.zone),
        ("app", &form.app),
        ("secret", &form.secret),
        ("resource", &form.resource),
    ] {
        if let Some(value) = given(value) {
            canary.insert(field.to_owned(), Value::String(value));
        }
    }
    let answer = match succeeded(
        &state,
        &session,
        "POST",
        "/v1/incident/validate",
        Some(Value::Object(canary)),
    )
    .await
    {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let mut rows = String::from("<table><tr><th>Check</th><th>Result</th><th>Evidence</th></tr>");
    for check in answer
        .get("checks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let passed = check.get("ok") == Some(&Value::Bool(true));
        rows.push_str(&format!(
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            escape(text_of(check, "name")),
            if passed { "good" } else { "bad" },
            if passed { "PASS" } else { "FAIL" },
            escape(text_of(check, "evidence"))
        ));
    }
    rows.push_str("</table>");
    let verdict = if answer.get("ok") == Some(&Value::Bool(true)) {
        "<p class=\"good\">Recovered: every check passes.</p>"
    } else {
        "<p class=\"bad\">Not recovered.</p>"
    };
    let notice = format!("<section class=\"card\"><h2>Validation</h2>{verdict}{rows}</section>");
    incident_page(&state, &session, Some(notice)).await
}

#[derive(Deserialize)]
pub(super) struct PreserveForm {
    reason: String,
}

/// Builds a signed evidence bundle and offers its download.
pub(super) async fn preserve(
    State(state): State<RoleState>,
    Posted(session, form): Posted<PreserveForm>,
) -> Response {
    let answer = match succeeded(
        &state,
        &session,
        "POST",
        "/v1/incident/bundles",
        Some(serde_json::json!({ "reason": form.reason })),
    )
    .await
    {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let name = escape(text_of(&answer, "name"));
    let complete = answer.get("complete") == Some(&Value::Bool(true));
    let listed = |key: &str| -> String {
        answer
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(escape)
            .collect::<Vec<String>>()
            .join("; ")
    };
    let unverified = match listed("unverified") {
        zones if zones.is_empty() => zones,
        zones => format!(
            "<p class=\"bad\">Audit exports that do not verify (kept in the bundle): {zones}.</p>"
        ),
    };
    let notice = format!(
        "<section class=\"card\"><h2>Evidence bundle</h2><p class=\"{}\">{name}: {} files, signed by {}{}.</p>\
         {unverified}<p><a href=\"/incident/bundles/{name}\">Download {name}.tar</a> — check it offline with \
         <code>caracal incident verify-bundle DIR</code> after unpacking.</p></section>",
        if complete { "good" } else { "bad" },
        answer.get("files").and_then(Value::as_u64).unwrap_or(0),
        escape(text_of(&answer, "key_id")),
        if complete {
            String::new()
        } else {
            format!("; some parts failed: {}", listed("failed"))
        }
    );
    incident_page(&state, &session, Some(notice)).await
}

/// A bundle's tar archive, as the API hands it out.
pub(super) async fn bundle(
    State(state): State<RoleState>,
    session: Session,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    if !name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
    {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such bundle");
    }
    download(
        &state,
        &session,
        &format!("/v1/incident/bundles/{name}"),
        "application/x-tar",
        &format!("{name}.tar"),
    )
    .await
}
