//! A policy set: versions, a diff of two, a simulated request, activation.

use super::*;

/// The documents of a set version's manifest, in manifest order, each headed by its policy
/// version id: what a diff compares.
pub(super) async fn documents_of(
    state: &RoleState,
    session: &Session,
    zone_id: &str,
    manifest: &Value,
) -> String {
    let wanted: Vec<&str> = manifest
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|entry| entry.get("policy_version_id").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let (_, policies) = admin(
        state,
        session,
        "GET",
        &format!("/v1/zones/{zone_id}/policies?limit=500"),
        None,
    )
    .await;
    let mut contents: HashMap<String, String> = HashMap::new();
    for policy in policies
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let id = text_of(policy, "id");
        if !caracal_core::is_plain_id(id) {
            continue;
        }
        let (_, full) = admin(
            state,
            session,
            "GET",
            &format!("/v1/zones/{zone_id}/policies/{id}"),
            None,
        )
        .await;
        for version in full
            .get("versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            contents.insert(
                text_of(version, "id").to_owned(),
                text_of(version, "content").to_owned(),
            );
        }
    }
    wanted
        .iter()
        .map(|id| {
            format!(
                "# policy version {id}\n{}",
                contents.get(*id).map_or("(not found)", String::as_str)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A line diff (longest common subsequence): unchanged lines with two spaces, removed with
/// `- `, added with `+ `.
pub(super) fn line_diff(before: &str, after: &str) -> Vec<(char, String)> {
    let (a, b): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
    // Documents are small (a data document is at most 64 KiB); the table is bounded by that.
    let mut lengths = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            let value = if a.get(i) == b.get(j) {
                lengths
                    .get(i + 1)
                    .and_then(|row| row.get(j + 1))
                    .copied()
                    .unwrap_or(0)
                    + 1
            } else {
                let down = lengths
                    .get(i + 1)
                    .and_then(|row| row.get(j))
                    .copied()
                    .unwrap_or(0);
                let right = lengths
                    .get(i)
                    .and_then(|row| row.get(j + 1))
                    .copied()
                    .unwrap_or(0);
                down.max(right)
            };
            if let Some(cell) = lengths.get_mut(i).and_then(|row| row.get_mut(j)) {
                *cell = value;
            }
        }
    }
    let at = |i: usize, j: usize| {
        lengths
            .get(i)
            .and_then(|row| row.get(j))
            .copied()
            .unwrap_or(0)
    };
    let (mut i, mut j, mut lines) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(left), Some(right)) if left == right => {
                lines.push((' ', (*left).to_owned()));
                i += 1;
                j += 1;
            }
            (Some(left), Some(_)) if at(i + 1, j) >= at(i, j + 1) => {
                lines.push(('-', (*left).to_owned()));
                i += 1;
            }
            (Some(left), None) => {
                lines.push(('-', (*left).to_owned()));
                i += 1;
            }
            (_, Some(right)) => {
                lines.push(('+', (*right).to_owned()));
                j += 1;
            }
            (None, None) => break,
        }
    }
    lines
}

#[derive(Deserialize, Default)]
struct SetQuery {
    from: Option<String>,
    to: Option<String>,
}

pub(super) async fn policy_set_page(
    State(state): State<RoleState>,
    session: Session,
    axum::extract::Path((zone_id, set_id)): axum::extract::Path<(String, String)>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let query: SetQuery =
        serde_urlencoded::from_str(raw.as_deref().unwrap_or_default()).unwrap_or_default();
    policy_set_view(&state, &session, &zone_id, &set_id, &query, None).await
}

async fn policy_set_view(
    state: &RoleState,
    session: &Session,
    zone_id: &str,
    set_id: &str,
    query: &SetQuery,
    notice: Option<String>,
) -> Response {
    let (Some(zone_id), true) = (zone_path(zone_id), caracal_core::is_plain_id(set_id)) else {
        return error_page(StatusCode::NOT_FOUND, Some(session), "no such policy set");
    };
    let base = format!("/v1/zones/{zone_id}/policy-sets/{set_id}");
    let (status, set) = admin(state, session, "GET", &base, None).await;
    if !status.is_success() {
        return error_page(status, Some(session), &refusal(&set));
    }
    let (_, versions) = admin(
        state,
        session,
        "GET",
        &format!("{base}/versions?limit=500"),
        None,
    )
    .await;
    let versions = versions
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (active, good) = (
        text_of(&set, "active_version_id"),
        text_of(&set, "last_known_good_version_id"),
    );
    let mut body = notice.unwrap_or_default();
    body.push_str("<section class=\"card\"><h2>Versions</h2><table><tr><th>Version</th><th>Id</th><th>Manifest SHA-256</th><th>Canaries</th><th>State</th><th></th></tr>");
    for version in &versions {
        let id = text_of(version, "id");
        let state_label = match (id == active, id == good) {
            (true, _) => "active",
            (false, true) => "last known good",
            _ => "",
        };
        let canaries = version
            .get("canaries")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let run = if canaries > 0 {
            format!(
                "<form method=\"post\" class=\"action\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <input type=\"hidden\" name=\"action\" value=\"canaries\"><input type=\"hidden\" name=\"version_id\" value=\"{}\">\
                 <button>Run canaries</button></form>",
                escape(&session.csrf),
                escape(id)
            )
        } else {
            String::new()
        };
        let activate = if session.writer && id != active {
            format!(
                "<form method=\"post\" class=\"action\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <input type=\"hidden\" name=\"action\" value=\"activate\"><input type=\"hidden\" name=\"version_id\" value=\"{}\">\
                 <button>Activate</button></form>",
                escape(&session.csrf),
                escape(id)
            )
        } else {
            String::new()
        };
        body.push_str(&format!(
            "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{canaries}</td><td>{}</td><td>{run}{activate}</td></tr>",
            escape(&version.get("version").map_or_else(String::new, Value::to_string)),
            escape(id),
            escape(text_of(version, "manifest_sha256")),
            escape(state_label)
        ));
    }
    body.push_str("</table></section>");

    // Diff between two versions.
    let options = |selected: Option<&str>| {
        versions
            .iter()
            .map(|version| {
                let id = text_of(version, "id");
                format!(
                    "<option value=\"{}\"{}>{}</option>",
                    escape(id),
                    if selected == Some(id) {
                        " selected"
                    } else {
                        ""
                    },
                    escape(
                        &version
                            .get("version")
                            .map_or_else(String::new, Value::to_string)
                    )
                )
            })
            .collect::<String>()
    };
    body.push_str(&format!(
        "<section class=\"card\"><h2>Diff</h2><form method=\"get\"><label>From <select name=\"from\">{}</select></label> \
         <label>To <select name=\"to\">{}</select></label> <button>Compare</button></form>",
        options(query.from.as_deref()),
        options(query.to.as_deref())
    ));
    let manifest_of = |id: &str| {
        versions
            .iter()
            .find(|version| text_of(version, "id") == id)
            .and_then(|version| version.get("manifest").cloned())
    };
    if let (Some(from), Some(to)) = (
        query.from.as_deref().and_then(manifest_of),
        query.to.as_deref().and_then(manifest_of),
    ) {
        let before = documents_of(state, session, zone_id, &from).await;
        let after = documents_of(state, session, zone_id, &to).await;
        body.push_str("<pre class=\"diff\">");
        for (mark, line) in line_diff(&before, &after) {
            let class = match mark {
                '+' => "added",
                '-' => "removed",
                _ => "same",
            };
            body.push_str(&format!(
                "<span class=\"{class}\">{mark} {}</span>\n",
                escape(&line)
            ));
        }
        body.push_str("</pre>");
    }
    body.push_str("</section>");

    // Simulate a request against a version.
    body.push_str(&format!(
        "<form method=\"post\" class=\"card\"><h2>Simulate</h2>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"action\" value=\"simulate\">\
         <p><label>Version <select name=\"version_id\">{}</select></label> \
         <label>Flow <select name=\"flow\"><option>mint</option><option>bootstrap</option><option>use</option></select></label></p>\
         <p><label>Application <input type=\"text\" name=\"application_id\"></label> \
         <label>Resource <input type=\"text\" name=\"resource\"></label></p>\
         <p><label>Scopes <input type=\"text\" name=\"scopes\"></label> \
         <label>Labels <input type=\"text\" name=\"labels\"></label> \
         <label>Edge scopes <input type=\"text\" name=\"edge_scopes\"></label></p>\
         <p><button>Simulate</button></p></form>",
        escape(&session.csrf),
        options(Some(active))
    ));
    html(
        StatusCode::OK,
        layout(
            &format!("Policy set {}", text_of(&set, "name")),
            Some(session),
            &body,
        ),
    )
}

#[derive(Deserialize)]
pub(super) struct SetAction {
    action: String,
    version_id: String,
    #[serde(default)]
    flow: Option<String>,
    #[serde(default)]
    application_id: Option<String>,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    scopes: Option<String>,
    #[serde(default)]
    labels: Option<String>,
    #[serde(default)]
    edge_scopes: Option<String>,
}

pub(super) fn words(text: Option<&str>) -> Vec<String> {
    text.unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

pub(super) async fn policy_set_action(
    State(state): State<RoleState>,
    axum::extract::Path((zone_id, set_id)): axum::extract::Path<(String, String)>,
    Posted(session, form): Posted<SetAction>,
) -> Response {
    let plain = caracal_core::is_plain_id(&set_id) && caracal_core::is_plain_id(&form.version_id);
    let (Some(zone), true) = (zone_path(&zone_id), plain) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such policy set");
    };
    let base = format!("/v1/zones/{zone}/policy-sets/{set_id}");
    let notice = match form.action.as_str() {
        "activate" => {
            if let Err(refused) = succeeded(
                &state,
                &session,
                "POST",
                &format!("{base}/activate"),
                Some(serde_json::json!({ "version_id": form.version_id })),
            )
            .await
            {
                return refused;
            }
            format!(
                "<p class=\"good\">Activation of {} accepted; the STS loads it next.</p>",
                escape(&form.version_id)
            )
        }
        "canaries" => {
            // Each case of the version decided against it, as activation would.
            let (status, version) = admin(
                &state,
                &session,
                "GET",
                &format!("{base}/versions/{}", form.version_id),
                None,
            )
            .await;
            if !status.is_success() {
                return error_page(status, Some(&session), &refusal(&version));
            }
            let mut rows = String::new();
            let mut failed = 0;
            for case in version
                .get("canaries")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let (_, answer) = admin(
                    &state,
                    &session,
                    "POST",
                    &format!("{base}/simulate"),
                    Some(serde_json::json!({
                        "version_id": form.version_id,
                        "input": case.get("request").cloned().unwrap_or(Value::Null),
                    })),
                )
                .await;
                let decided = answer
                    .pointer("/result/decision")
                    .and_then(Value::as_str)
                    .unwrap_or("error");
                let expected = text_of(case, "expect");
                let passed = decided == expected;
                failed += usize::from(!passed);
                rows.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                    escape(text_of(case, "name")),
                    escape(expected),
                    escape(decided),
                    if passed { "good" } else { "bad" },
                    if passed { "pass" } else { "FAIL" }
                ));
            }
            format!(
                "<section class=\"card canaries\"><h2>Canaries of {}</h2><p>{}</p>\
                 <table><tr><th>Case</th><th>Expected</th><th>Decided</th><th></th></tr>{rows}</table></section>",
                escape(&form.version_id),
                if failed == 0 {
                    "<span class=\"good\">Every case passes.</span>".to_owned()
                } else {
                    format!(
                        "<span class=\"bad\">{failed} case(s) fail: activation would refuse this version.</span>"
                    )
                }
            )
        }
        "simulate" => {
            let input = serde_json::json!({
                "flow": form.flow.as_deref().unwrap_or("mint"),
                "application_id": form.application_id.as_deref().unwrap_or_default(),
                "resource": form.resource.as_deref().unwrap_or_default(),
                "scopes": words(form.scopes.as_deref()),
                "labels": words(form.labels.as_deref()),
                "edge_scopes": words(form.edge_scopes.as_deref()),
                "session": true,
            });
            let answer = match succeeded(
                &state,
                &session,
                "POST",
                &format!("{base}/simulate"),
                Some(serde_json::json!({ "version_id": form.version_id, "input": input })),
            )
            .await
            {
                Ok(answer) => answer,
                Err(refused) => return refused,
            };
            let result = answer.get("result").cloned().unwrap_or(Value::Null);
            let reasons: Vec<String> = result
                .get("diagnostics")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|reason| format!("{}: {}", text_of(reason, "code"), text_of(reason, "detail")))
                .collect();
            let determining: Vec<&str> = result
                .get("determining_policies")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|policy| text_of(policy, "policy"))
                .collect();
            format!(
                "<section class=\"card simulation\"><h2>Simulation</h2><p>Decision: <strong class=\"decision\">{}</strong></p>\
                 <p>Reasons: {}</p><p>Determining policies: {}</p></section>",
                escape(text_of(&result, "decision")),
                escape(&reasons.join("; ")),
                escape(&determining.join(", "))
            )
        }
        _ => return error_page(StatusCode::BAD_REQUEST, Some(&session), "unknown action"),
    };
    policy_set_view(
        &state,
        &session,
        zone,
        &set_id,
        &SetQuery::default(),
        Some(notice),
    )
    .await
}
