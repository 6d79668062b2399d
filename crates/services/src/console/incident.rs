//! Incident containment: what is in force, contain and release with a reason.

use super::*;

pub(super) async fn incident(State(state): State<RoleState>, headers: HeaderMap) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
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
    if session.writer {
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
struct SwitchForm {
    csrf: String,
    switch: String,
    reason: String,
    action: String,
}

pub(super) async fn contain_or_release(
    State(state): State<RoleState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let form = serde_urlencoded::from_bytes::<SwitchForm>(&body).ok();
    let Some(form) = form.filter(|form| same(&form.csrf, &session.csrf)) else {
        return error_page(StatusCode::FORBIDDEN, Some(&session), "missing CSRF token");
    };
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
    let (status, answer) = admin(&state, &session, "POST", path, Some(switch)).await;
    if !status.is_success() {
        return error_page(status, Some(&session), &refusal(&answer));
    }
    let notice = format!(
        "<p class=\"good\">{} {}: done.</p>",
        escape(&form.action),
        escape(&form.switch)
    );
    incident_page(&state, &session, Some(notice)).await
}
