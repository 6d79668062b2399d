//! A zone's sessions and delegations as a graph; terminating a session, or revoking everything
//! issued to an application, after an impact preview.

use super::*;

/// A zone's sessions (at most 500) and active delegation edges, through the admin API.
pub(super) async fn graph_of(
    state: &RoleState,
    session: &Session,
    zone_id: &str,
) -> Result<(Vec<Value>, Vec<Value>), Response> {
    let (status, sessions) = admin(
        state,
        session,
        "GET",
        &format!("/v1/zones/{zone_id}/sessions?limit=500"),
        None,
    )
    .await;
    let Some(sessions) = sessions.get("items").and_then(Value::as_array).cloned() else {
        return Err(error_page(status, Some(session), &refusal(&sessions)));
    };
    let (status, edges) = admin(
        state,
        session,
        "GET",
        &format!("/v1/zones/{zone_id}/delegations?status=active&limit=500"),
        None,
    )
    .await;
    let Some(edges) = edges.get("items").and_then(Value::as_array).cloned() else {
        return Err(error_page(status, Some(session), &refusal(&edges)));
    };
    Ok((sessions, edges))
}

/// The session tree (parent links, grey) and the delegation edges (blue, labelled with scopes,
/// hop budget and expiry) as SVG, drawn with presentation attributes only (no style: the CSP
/// allows none inline).
pub(super) fn graph_svg(sessions: &[Value], edges: &[Value]) -> String {
    // Depth-first order from the roots, so children sit under their parent.
    let ids: std::collections::HashSet<&str> = sessions
        .iter()
        .map(|s| text_of(s, "agent_session_id"))
        .collect();
    let mut order: Vec<(&Value, usize)> = Vec::new();
    let mut stack: Vec<(&Value, usize)> = sessions
        .iter()
        .filter(|s| {
            let parent = text_of(s, "parent_id");
            parent.is_empty() || !ids.contains(parent)
        })
        .map(|s| (s, 0))
        .rev()
        .collect();
    while let Some((node, depth)) = stack.pop() {
        if order.len() > sessions.len() {
            break;
        }
        order.push((node, depth));
        let id = text_of(node, "agent_session_id");
        for child in sessions
            .iter()
            .rev()
            .filter(|s| text_of(s, "parent_id") == id)
        {
            stack.push((child, depth + 1));
        }
    }
    let position: HashMap<&str, (usize, usize)> = order
        .iter()
        .enumerate()
        .map(|(row, (node, depth))| {
            (
                text_of(node, "agent_session_id"),
                (20 + depth * 240, 30 + row * 48),
            )
        })
        .collect();
    let height = 40 + order.len() * 48;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1100\" height=\"{height}\" role=\"img\" aria-label=\"sessions and delegations\">"
    );
    for (node, _) in &order {
        let parent = text_of(node, "parent_id");
        if let (Some((px, py)), Some((x, y))) = (
            position.get(parent),
            position.get(text_of(node, "agent_session_id")),
        ) {
            svg.push_str(&format!(
                "<line x1=\"{}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#9aa3ad\"/>",
                px + 10,
                py + 14,
                y + 14
            ));
        }
    }
    for edge in edges {
        let (Some((sx, sy)), Some((tx, ty))) = (
            position.get(text_of(edge, "source_session_id")),
            position.get(text_of(edge, "target_session_id")),
        ) else {
            continue;
        };
        let scopes: Vec<&str> = edge
            .get("scopes")
            .and_then(Value::as_array)
            .map(|scopes| scopes.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let hops = edge
            .get("max_hops")
            .map_or_else(|| "-".to_owned(), Value::to_string);
        let label = format!(
            "{} · hops {} · until {}",
            scopes.join(" "),
            hops,
            text_of(edge, "expires_at")
        );
        let (x1, y1, x2, y2) = (sx + 210, sy + 14, tx + 210, ty + 14);
        let bend = x1.max(x2) + 60;
        svg.push_str(&format!(
            "<path d=\"M {x1} {y1} C {bend} {y1}, {bend} {y2}, {x2} {y2}\" fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"2\"><title>{}</title></path>\
             <text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#1f6feb\" class=\"edge-label\">{}</text>",
            escape(&label),
            bend + 4,
            (y1 + y2) / 2,
            escape(&label)
        ));
    }
    for (node, _) in &order {
        let id = text_of(node, "agent_session_id");
        let Some((x, y)) = position.get(id) else {
            continue;
        };
        let status = text_of(node, "status");
        let fill = if status == "active" {
            "#e7f5ec"
        } else {
            "#f3f4f6"
        };
        let short: String = id.chars().take(18).collect();
        svg.push_str(&format!(
            "<rect x=\"{x}\" y=\"{y}\" width=\"210\" height=\"28\" rx=\"4\" fill=\"{fill}\" stroke=\"#6b7280\"><title>{}</title></rect>\
             <text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#1d232a\" class=\"session-node\">{} · {}</text>",
            escape(id),
            x + 6,
            y + 18,
            escape(&short),
            escape(status)
        ));
    }
    svg.push_str("</svg>");
    svg
}

pub(super) async fn sessions_page(
    State(state): State<RoleState>,
    session: Session,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
) -> Response {
    let Some(zone_id) = zone_path(&zone_id) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such zone");
    };
    let (sessions, edges) = match graph_of(&state, &session, zone_id).await {
        Ok(graph) => graph,
        Err(refused) => return refused,
    };
    let mut body = format!(
        "<section class=\"card\"><h2>Graph</h2>{}</section><section class=\"card\"><h2>Sessions</h2><table>\
         <tr><th>Session</th><th>Application</th><th>Parent</th><th>Status</th><th></th></tr>",
        graph_svg(&sessions, &edges)
    );
    for item in &sessions {
        let id = text_of(item, "agent_session_id");
        let live = matches!(text_of(item, "status"), "active" | "suspended");
        let terminate = if session.writer && live {
            format!(
                "<a href=\"/zones/{}/sessions/{}/terminate\">Terminate…</a>",
                escape(zone_id),
                escape(id)
            )
        } else {
            String::new()
        };
        let application = text_of(item, "application_id");
        let revoke = if session.writer && live {
            format!(
                " <a href=\"/zones/{}/applications/{}/revoke\">revoke…</a>",
                escape(zone_id),
                escape(application)
            )
        } else {
            String::new()
        };
        body.push_str(&format!(
            "<tr><td><code>{}</code></td><td>{}{revoke}</td><td>{}</td><td>{}</td><td>{terminate}</td></tr>",
            escape(id),
            escape(application),
            escape(text_of(item, "parent_id")),
            escape(text_of(item, "status"))
        ));
    }
    body.push_str("</table></section>");
    html(
        StatusCode::OK,
        layout("Sessions and delegations", Some(&session), &body),
    )
}

/// The sessions, their descendants, and the active edges touching any of them: what a
/// termination (or an application's revocation) ends.
pub(super) fn impact<'a>(
    roots: &[&'a str],
    sessions: &'a [Value],
    edges: &'a [Value],
) -> (Vec<&'a str>, Vec<&'a Value>) {
    let mut ended = roots.to_vec();
    let mut next = 0;
    while let Some(current) = ended.get(next).copied() {
        for child in sessions
            .iter()
            .filter(|s| text_of(s, "parent_id") == current)
        {
            let id = text_of(child, "agent_session_id");
            if !ended.contains(&id) {
                ended.push(id);
            }
        }
        next += 1;
    }
    let touched = edges
        .iter()
        .filter(|edge| {
            ended.contains(&text_of(edge, "source_session_id"))
                || ended.contains(&text_of(edge, "target_session_id"))
        })
        .collect();
    (ended, touched)
}

pub(super) async fn terminate_preview(
    State(state): State<RoleState>,
    session: Session,
    axum::extract::Path((zone_id, session_id)): axum::extract::Path<(String, String)>,
) -> Response {
    let (Some(zone_id), true) = (zone_path(&zone_id), caracal_core::is_plain_id(&session_id))
    else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such session");
    };
    let (sessions, edges) = match graph_of(&state, &session, zone_id).await {
        Ok(graph) => graph,
        Err(refused) => return refused,
    };
    if !sessions
        .iter()
        .any(|s| text_of(s, "agent_session_id") == session_id)
    {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such session");
    }
    let (ended, touched) = impact(&[session_id.as_str()], &sessions, &edges);
    let summary = format!(
        "Terminating ends {} session(s) and revokes {} delegation(s):",
        ended.len(),
        touched.len()
    );
    preview_page(
        &session,
        "Terminate a session",
        &summary,
        &ended,
        &touched,
        "Terminate",
    )
}

/// An impact preview: what ends, then (for a writer) the reason and the button that does it.
fn preview_page(
    session: &Session,
    title: &str,
    summary: &str,
    ended: &[&str],
    touched: &[&Value],
    button: &str,
) -> Response {
    let mut body = format!(
        "<section class=\"card\"><h2>Impact</h2><p class=\"impact\">{}</p><ul>",
        escape(summary)
    );
    for id in ended {
        body.push_str(&format!("<li>session <code>{}</code></li>", escape(id)));
    }
    for edge in touched {
        body.push_str(&format!(
            "<li>delegation <code>{}</code> ({} → {})</li>",
            escape(text_of(edge, "id")),
            escape(text_of(edge, "source_session_id")),
            escape(text_of(edge, "target_session_id"))
        ));
    }
    body.push_str("</ul></section>");
    if session.writer {
        body.push_str(&format!(
            "<form method=\"post\" class=\"card\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <p><label>Reason<br><input type=\"text\" name=\"reason\" required></label></p>\
             <p><button>{}</button></p></form>",
            escape(&session.csrf),
            escape(button)
        ));
    }
    html(StatusCode::OK, layout(title, Some(session), &body))
}

#[derive(Deserialize)]
pub(super) struct ReasonForm {
    reason: String,
}

pub(super) async fn terminate(
    State(state): State<RoleState>,
    axum::extract::Path((zone_id, session_id)): axum::extract::Path<(String, String)>,
    Posted(session, form): Posted<ReasonForm>,
) -> Response {
    let (Some(zone_id), true) = (zone_path(&zone_id), caracal_core::is_plain_id(&session_id))
    else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such session");
    };
    let answer = match succeeded(
        &state,
        &session,
        "POST",
        &format!("/v1/zones/{zone_id}/sessions/{session_id}/terminate"),
        Some(serde_json::json!({ "reason": form.reason })),
    )
    .await
    {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let ended = answer
        .get("terminated_sessions")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    html(
        StatusCode::OK,
        layout(
            "Terminated",
            Some(&session),
            &format!(
                "<p class=\"good\">{ended} session(s) ended.</p><p><a href=\"/zones/{}/sessions\">Back to the sessions</a></p>",
                escape(zone_id)
            ),
        ),
    )
}

/// What revoking an application ends: its live sessions with their subtrees and the
/// delegations touching them (and every authority record it holds as a subject).
pub(super) async fn revoke_preview(
    State(state): State<RoleState>,
    session: Session,
    axum::extract::Path((zone_id, application_id)): axum::extract::Path<(String, String)>,
) -> Response {
    let (Some(zone_id), true) = (
        zone_path(&zone_id),
        caracal_core::is_plain_id(&application_id),
    ) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such application");
    };
    let (sessions, edges) = match graph_of(&state, &session, zone_id).await {
        Ok(graph) => graph,
        Err(refused) => return refused,
    };
    let roots: Vec<&str> = sessions
        .iter()
        .filter(|s| {
            text_of(s, "application_id") == application_id
                && matches!(text_of(s, "status"), "active" | "suspended")
        })
        .map(|s| text_of(s, "agent_session_id"))
        .collect();
    let (ended, touched) = impact(&roots, &sessions, &edges);
    let summary = format!(
        "Revoking application {application_id} ends {} session(s), revokes {} delegation(s) and \
         every authority record it holds as a subject. Its secret is unchanged: rotate it too to \
         stop new mints.",
        ended.len(),
        touched.len()
    );
    preview_page(
        &session,
        "Revoke an application",
        &summary,
        &ended,
        &touched,
        "Revoke",
    )
}

pub(super) async fn revoke(
    State(state): State<RoleState>,
    axum::extract::Path((zone_id, application_id)): axum::extract::Path<(String, String)>,
    Posted(session, form): Posted<ReasonForm>,
) -> Response {
    let (Some(zone_id), true) = (
        zone_path(&zone_id),
        caracal_core::is_plain_id(&application_id),
    ) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such application");
    };
    let answer = match succeeded(
        &state,
        &session,
        "POST",
        &format!("/v1/zones/{zone_id}/applications/{application_id}/revoke"),
        Some(serde_json::json!({ "reason": form.reason })),
    )
    .await
    {
        Ok(answer) => answer,
        Err(refused) => return refused,
    };
    let count = |field: &str| {
        answer
            .get(field)
            .and_then(Value::as_array)
            .map_or(0, Vec::len)
    };
    html(
        StatusCode::OK,
        layout(
            "Revoked",
            Some(&session),
            &format!(
                "<p class=\"good\">{} session(s) ended, {} delegation(s) and {} authority record(s) revoked.</p>\
                 <p><a href=\"/zones/{}/sessions\">Back to the sessions</a></p>",
                count("terminated_sessions"),
                count("revoked_edges"),
                count("revoked_authority_records"),
                escape(zone_id)
            ),
        ),
    )
}
