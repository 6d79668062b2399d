//! The Console role against a running `caracal up`, over plain HTTP: sign-in with an admin
//! token, the security headers, hostile names rendered as text, a form without its CSRF token
//! refused, a read-only sign-in shown no change control and refused a forged one, sign-out, and
//! a revoked token's session ended.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::collections::BTreeMap;

use util::{
    Running, cookie_of, csrf_of, form, free_ports, fresh_home, json_of, request, sign_in,
    wait_ready,
};

#[test]
fn the_console_signs_in_escapes_everything_and_refuses_forged_changes() {
    let (_parent, home) = fresh_home();
    let (running, token) = util::up(&home);
    let (api, console) = (running.address("api"), running.address("console"));
    let bearer = format!("Bearer {}", token.trim());
    let auth = [("authorization", bearer.as_str())];
    let hostile = r#"<script>alert(1)</script> & "quoted" 'name'"#;
    let zone = request(
        api,
        "POST",
        "/v1/zones",
        &auth,
        &serde_json::json!({"name": hostile}).to_string(),
    );
    assert_eq!(zone.status, 201, "{}", zone.body);

    // Not signed in: every page leads to the sign-in form.
    let anonymous = request(console, "GET", "/zones", &[], "");
    assert_eq!(anonymous.status, 303);
    assert_eq!(anonymous.headers["location"], "/sign-in");
    let refused = form(console, "/sign-in", "", "token=cat_x&csrf=y");
    assert_eq!(refused.status, 403, "a sign-in without its form cookie");
    let page = request(console, "GET", "/sign-in", &[], "");
    let wrong = form(
        console,
        "/sign-in",
        &cookie_of(&page),
        &format!("token=cat_{}&csrf={}", "A".repeat(43), csrf_of(&page.body)),
    );
    assert_eq!(wrong.status, 401);

    let session = sign_in(console, &token);
    let zones = request(console, "GET", "/zones", &[("cookie", &session)], "");
    assert_eq!(zones.status, 200, "{}", zones.body);
    for (name, value) in [
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(zones.headers[name], value);
    }
    let csp = &zones.headers["content-security-policy"];
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("script-src"), "no script is allowed: {csp}");
    assert!(
        zones.body.contains(
            "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quoted&quot; &#39;name&#39;"
        ),
        "{}",
        zones.body
    );
    assert!(!zones.body.contains("<script>"), "{}", zones.body);
    assert!(
        zones.body.contains("action=\"/zones\""),
        "a writer sees the form"
    );

    // A change without the CSRF token, or with another one, changes nothing.
    let count = || {
        json_of(&request(api, "GET", "/v1/zones", &auth, ""))["items"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = count();
    for body in ["name=forged", "name=forged&csrf=not-the-token"] {
        let forged = form(console, "/zones", &session, body);
        assert_eq!(forged.status, 403, "{}", forged.body);
    }
    assert_eq!(count(), before);
    let created = form(
        console,
        "/zones",
        &session,
        &format!("name=from+the+console&csrf={}", csrf_of(&zones.body)),
    );
    assert_eq!(created.status, 200, "{}", created.body);
    assert!(created.body.contains("Zone from the console created."));
    assert_eq!(count(), before + 1);

    // The zone's page and its audit, the hostile name escaped in the title too.
    let zone_id = json_of(&zone)["id"].as_str().unwrap().to_owned();
    let page = request(
        console,
        "GET",
        &format!("/zones/{zone_id}"),
        &[("cookie", &session)],
        "",
    );
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("<title>Zone &lt;script&gt;"),
        "{}",
        page.body
    );
    for section in [
        "Applications",
        "Providers",
        "Resources",
        "Policy sets",
        "Sessions",
        "Pending approvals",
    ] {
        assert!(page.body.contains(section), "{section} missing");
    }
    let audit = request(
        console,
        "GET",
        &format!("/zones/{zone_id}/audit?decision=allow&event_type=admin.zone.create"),
        &[("cookie", &session)],
        "",
    );
    assert_eq!(audit.status, 200, "{}", audit.body);
    assert!(
        audit.body.contains("No open tamper finding"),
        "{}",
        audit.body
    );
    // The explain view of the zone's creation (its request id), once ingested.
    let request_id = zone.headers["x-request-id"].clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let explained = loop {
        let explained = request(
            console,
            "GET",
            &format!("/zones/{zone_id}/audit/explain?request_id={request_id}"),
            &[("cookie", &session)],
            "",
        );
        if explained.status == 200 || std::time::Instant::now() > deadline {
            break explained;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(explained.status, 200, "{}", explained.body);
    assert!(
        explained.body.contains("class=\"decision\">allow<"),
        "{}",
        explained.body
    );
    assert!(
        explained.body.contains("admin.zone.create"),
        "{}",
        explained.body
    );
    let timeline = request(
        console,
        "GET",
        &format!("/zones/{zone_id}/timeline?request={request_id}"),
        &[("cookie", &session)],
        "",
    );
    assert_eq!(timeline.status, 200, "{}", timeline.body);
    assert!(
        timeline.body.contains("admin.zone.create"),
        "{}",
        timeline.body
    );
    let elsewhere = request(
        console,
        "GET",
        "/zones/..%2F..%2Fv1",
        &[("cookie", &session)],
        "",
    );
    assert_eq!(elsewhere.status, 404, "{}", elsewhere.body);

    // Changes from the zone page: a rotated secret shown once (never cached), a rollback
    // without a last known good refused with the API's reason, an unknown hold not found.
    let app = json_of(&request(
        api,
        "POST",
        &format!("/v1/zones/{zone_id}/applications"),
        &auth,
        r#"{"name":"billing","registration_method":"managed"}"#,
    ));
    let set = json_of(&request(
        api,
        "POST",
        &format!("/v1/zones/{zone_id}/policy-sets"),
        &auth,
        r#"{"name":"main"}"#,
    ));
    let page = request(
        console,
        "GET",
        &format!("/zones/{zone_id}"),
        &[("cookie", &session)],
        "",
    );
    assert!(page.body.contains("Rotate secret"), "{}", page.body);
    let csrf = csrf_of(&page.body);
    let act = |body: String| form(console, &format!("/zones/{zone_id}/act"), &session, &body);
    let rotated = act(format!(
        "csrf={csrf}&action=rotate&id={}",
        app["id"].as_str().unwrap()
    ));
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    assert_eq!(rotated.headers["cache-control"], "no-store");
    assert!(
        rotated.body.contains("<code class=\"secret\">cs_"),
        "{}",
        rotated.body
    );
    let rollback = act(format!(
        "csrf={csrf}&action=rollback&id={}",
        set["id"].as_str().unwrap()
    ));
    assert_eq!(rollback.status, 409, "{}", rollback.body);
    assert!(
        rollback.body.contains("no earlier active version"),
        "{}",
        rollback.body
    );
    let unknown = act(format!(
        "csrf={csrf}&action=decide&id=no-such-hold&decision=approve"
    ));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    let forged = act(format!("action=rotate&id={}", app["id"].as_str().unwrap()));
    assert_eq!(forged.status, 403);

    // Incident: a freeze contained with a reason, shown, then released.
    let incident = request(console, "GET", "/incident", &[("cookie", &session)], "");
    assert_eq!(incident.status, 200);
    let csrf = csrf_of(&incident.body);
    let contained = form(
        console,
        "/incident",
        &session,
        &format!("csrf={csrf}&switch=freeze&reason=console+drill&action=contain"),
    );
    assert_eq!(contained.status, 200, "{}", contained.body);
    assert!(
        contained.body.contains("console drill"),
        "{}",
        contained.body
    );
    let frozen = request(api, "GET", "/v1/incident/containment", &auth, "");
    assert!(frozen.body.contains("freeze"), "{}", frozen.body);
    let released = form(
        console,
        "/incident",
        &session,
        &format!("csrf={csrf}&switch=freeze&reason=over&action=release"),
    );
    assert_eq!(released.status, 200, "{}", released.body);
    assert!(
        released.body.contains("Nothing") || released.body.contains("None."),
        "{}",
        released.body
    );

    // A read-only sign-in: no form, and a forged change is refused by the API's own rules.
    let reader = json_of(&request(
        api,
        "POST",
        "/v1/admin-tokens",
        &auth,
        r#"{"name":"auditor","scope":"global","capability":"read"}"#,
    ));
    let read_token = reader["token"].as_str().unwrap().to_owned();
    let read_session = sign_in(console, &read_token);
    let read_zones = request(console, "GET", "/zones", &[("cookie", &read_session)], "");
    assert_eq!(read_zones.status, 200);
    assert!(read_zones.body.contains("read only"));
    assert!(
        !read_zones.body.contains("action=\"/zones\""),
        "no change control"
    );
    let forged = form(
        console,
        "/zones",
        &read_session,
        &format!("name=by+a+reader&csrf={}", csrf_of(&read_zones.body)),
    );
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert!(
        forged.body.contains("admin_token_read_only"),
        "{}",
        forged.body
    );
    assert_eq!(count(), before + 1);

    // Revoking the reader's token ends its console session at the next page.
    let revoked = request(
        api,
        "DELETE",
        &format!("/v1/admin-tokens/{}", reader["id"].as_str().unwrap()),
        &auth,
        "",
    );
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    let after = request(
        console,
        "GET",
        "/overview",
        &[("cookie", &read_session)],
        "",
    );
    assert_eq!(after.status, 303);

    // Sign-out needs the CSRF token, then the session is gone.
    let overview = request(console, "GET", "/overview", &[("cookie", &session)], "");
    assert_eq!(overview.status, 200);
    // Every role of the process, probed, and the instantaneous alert rules judged.
    for role in ["api", "sts", "gateway", "audit", "coordinator", "console"] {
        assert!(
            overview.body.contains(&format!("<tr><td>{role}</td>")),
            "{role} missing: {}",
            overview.body
        );
    }
    assert!(!overview.body.contains("not ready"), "{}", overview.body);
    assert!(
        overview.body.contains("No instantaneous rule holds."),
        "{}",
        overview.body
    );
    assert!(
        overview.body.contains("CaracalAuditDLQGrowth"),
        "windowed rules named"
    );
    assert_eq!(form(console, "/sign-out", &session, "").status, 403);
    let out = form(
        console,
        "/sign-out",
        &session,
        &format!("csrf={}", csrf_of(&overview.body)),
    );
    assert_eq!(out.status, 303);
    let gone = request(console, "GET", "/overview", &[("cookie", &session)], "");
    assert_eq!(gone.status, 303);

    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// The sessions page draws the tree and the delegation edges; terminating previews its impact
/// (the subtree and the edges touching it) before the operator confirms with a reason.
#[test]
fn the_session_graph_shows_the_tree_and_terminate_and_revoke_preview_their_impact() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let (api, console) = (running.address("api"), running.address("console"));
    let (sts, coordinator) = (running.address("sts"), running.address("coordinator"));
    assert_eq!(wait_ready(api).status, 200);
    let zone = util::Provisioned::new(&home, api, &["resource://ledger"]);
    zone.policy_set(&[(1, "resource://ledger")]);
    let (root, child) = util::delegation(&zone, sts, coordinator, "read");
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let session = sign_in(console, &token);
    let page = request(
        console,
        "GET",
        &format!("/zones/{}/sessions", zone.id),
        &[("cookie", &session)],
        "",
    );
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("<svg"), "{}", page.body);
    let short = |id: &str| id.chars().take(18).collect::<String>();
    for id in [&root, &child] {
        assert!(page.body.contains(&short(id)), "{id} not drawn");
    }
    assert!(
        page.body.contains("read · hops"),
        "the edge's label: {}",
        page.body
    );
    assert!(
        !page.body.contains("style="),
        "no inline style (the CSP forbids it)"
    );

    let preview_path = format!("/zones/{}/sessions/{root}/terminate", zone.id);
    let preview = request(console, "GET", &preview_path, &[("cookie", &session)], "");
    assert_eq!(preview.status, 200, "{}", preview.body);
    assert!(
        preview
            .body
            .contains("Terminating ends 2 session(s) and revokes 1 delegation(s)"),
        "{}",
        preview.body
    );
    let done = form(
        console,
        &preview_path,
        &session,
        &format!("csrf={}&reason=runaway+agent", csrf_of(&preview.body)),
    );
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("2 session(s) ended."), "{}", done.body);
    let after = request(
        console,
        "GET",
        &format!("/zones/{}/sessions", zone.id),
        &[("cookie", &session)],
        "",
    );
    assert!(
        !after.body.contains("Terminate…"),
        "nothing live is left: {}",
        after.body
    );

    // Revoking the application: its live sessions, with their subtrees and delegations.
    let (second_root, _) = util::delegation(&zone, sts, coordinator, "read");
    let page = request(
        console,
        "GET",
        &format!("/zones/{}/sessions", zone.id),
        &[("cookie", &session)],
        "",
    );
    let revoke_path = format!("/zones/{}/applications/{}/revoke", zone.id, zone.app_id);
    assert!(page.body.contains(&revoke_path), "{}", page.body);
    let preview = request(console, "GET", &revoke_path, &[("cookie", &session)], "");
    assert_eq!(preview.status, 200, "{}", preview.body);
    assert!(
        preview.body.contains(&format!(
            "Revoking application {} ends 2 session(s), revokes 1 delegation(s)",
            zone.app_id
        )),
        "{}",
        preview.body
    );
    assert!(preview.body.contains(&second_root), "{}", preview.body);
    assert!(
        !preview.body.contains(&root),
        "already ended: {}",
        preview.body
    );
    let forged = form(console, &revoke_path, &session, "csrf=nope&reason=x");
    assert_eq!(forged.status, 403);
    let done = form(
        console,
        &revoke_path,
        &session,
        &format!("csrf={}&reason=compromised+app", csrf_of(&preview.body)),
    );
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(
        done.body
            .contains("2 session(s) ended, 1 delegation(s) and"),
        "{}",
        done.body
    );
    let after = request(
        console,
        "GET",
        &format!("/zones/{}/sessions", zone.id),
        &[("cookie", &session)],
        "",
    );
    assert!(!after.body.contains("revoke…"), "{}", after.body);
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// A policy set's page: its versions, a diff between two, a simulated request against one
/// (decision, reasons, determining policies), and an activation.
#[test]
fn a_policy_set_page_diffs_simulates_and_activates() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let (api, console) = (running.address("api"), running.address("console"));
    assert_eq!(wait_ready(api).status, 200);
    let zone = util::Provisioned::new(&home, api, &["resource://ledger", "resource://payroll"]);
    let first = zone.policy_set(&[(1, "resource://ledger")]);
    let second = zone.policy_set(&[(2, "resource://ledger"), (2, "resource://payroll")]);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let session = sign_in(console, &token);
    let set_id = zone.sets.rsplit('/').next().unwrap().to_owned();
    let path = format!("/zones/{}/policy-sets/{set_id}", zone.id);
    let page = request(
        console,
        "GET",
        &format!("{path}?from={first}&to={second}"),
        &[("cookie", &session)],
        "",
    );
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains(&first) && page.body.contains(&second));
    assert!(page.body.contains(">active<"), "{}", page.body);
    assert!(
        page.body.contains("class=\"added\">+ ") && page.body.contains("resource://payroll"),
        "{}",
        page.body
    );
    let csrf = csrf_of(&page.body);
    let simulated = form(
        console,
        &path,
        &session,
        &format!(
            "csrf={csrf}&action=simulate&version_id={first}&flow=mint&application_id={}&resource=resource%3A%2F%2Fpayroll&scopes=read&labels={}&edge_scopes=read",
            zone.app_id, zone.app_id
        ),
    );
    assert_eq!(simulated.status, 200, "{}", simulated.body);
    assert!(
        simulated.body.contains("class=\"decision\">deny<"),
        "version 1 does not grant payroll: {}",
        simulated.body
    );
    let allowed = form(
        console,
        &path,
        &session,
        &format!(
            "csrf={csrf}&action=simulate&version_id={second}&flow=mint&application_id={}&resource=resource%3A%2F%2Fpayroll&scopes=read&labels={}&edge_scopes=read",
            zone.app_id, zone.app_id
        ),
    );
    assert!(
        allowed.body.contains("class=\"decision\">allow<"),
        "{}",
        allowed.body
    );
    // A version with canary cases: one passes, one fails, and the page says so.
    let auth = [("authorization", zone.bearer.as_str())];
    let second_version = json_of(&request(
        api,
        "GET",
        &format!("{}/versions/{second}", zone.sets),
        &auth,
        "",
    ));
    let mint = |resource: &str| {
        serde_json::json!({"flow": "mint", "application_id": zone.app_id, "resource": resource,
            "scopes": ["read"], "labels": [zone.app_id], "edge_scopes": ["read"], "session": true})
    };
    let with_canaries = zone.post(
        &format!("{}/versions", zone.sets),
        serde_json::json!({"manifest": second_version["manifest"], "canaries": [
            {"name": "ledger allowed", "request": mint("resource://ledger"), "expect": "allow"},
            {"name": "payroll denied", "request": mint("resource://payroll"), "expect": "deny"},
        ]}),
    );
    let canaried = with_canaries["id"].as_str().unwrap();
    let ran = form(
        console,
        &path,
        &session,
        &format!("csrf={csrf}&action=canaries&version_id={canaried}"),
    );
    assert_eq!(ran.status, 200, "{}", ran.body);
    assert!(
        ran.body.contains("1 case(s) fail") && ran.body.contains("payroll denied"),
        "version 2 grants payroll, so its deny case fails: {}",
        ran.body
    );
    let activated = form(
        console,
        &path,
        &session,
        &format!("csrf={csrf}&action=activate&version_id={first}"),
    );
    assert_eq!(activated.status, 200, "{}", activated.body);
    assert!(activated.body.contains("accepted"), "{}", activated.body);
    zone.wait_loaded(&first);
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// One request a webhook receiver got: its headers (lower-cased names) and body.
type Webhook = (BTreeMap<String, String>, String);

/// A webhook receiver on loopback: answers every request 204 and hands each one over.
fn webhook_receiver() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<Webhook>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (sender, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = BTreeMap::new();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let Some((name, value)) = line.trim_end().split_once(':') else {
                    break;
                };
                headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
            }
            let length: usize = headers["content-length"].parse().unwrap();
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            stream
                .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                .unwrap();
            let _ = sender.send((headers, String::from_utf8(body).unwrap()));
        }
    });
    (address, received)
}

/// A scope the policy gates waits for a human: the STS holds the delegated mint, the console
/// shows the pending hold on the zone's page, an operator approves it with a reason, and the
/// agent's retry with the approval succeeds. A notification sink registered beforehand is sent
/// each step of the hold from the ledger, signed with its secret.
#[test]
fn an_operator_approves_a_held_mint_in_the_console_and_the_retry_succeeds() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let (api, console) = (running.address("api"), running.address("console"));
    let (sts, coordinator) = (running.address("sts"), running.address("coordinator"));
    assert_eq!(wait_ready(api).status, 200);
    let zone = util::Provisioned::new(&home, api, &["resource://ledger"]);
    let (hook, webhooks) = webhook_receiver();
    let sink = zone.post(
        &format!("/v1/zones/{}/notification-sinks", zone.id),
        serde_json::json!({"name": "approvals", "url": format!("http://{hook}/approvals")}),
    );
    let sink_secret = sink["secret"].as_str().unwrap().to_owned();
    zone.activate_document("gated", &zone.gated_document());
    let (_root, child, edge) = util::delegation_with_edge(&zone, sts, coordinator, "read");
    let mint = util::exchange_form(
        &zone,
        &format!("&scope=read&agent_session_id={child}&delegation_edge_id={edge}"),
    );
    let held = util::exchange(sts, &mint);
    assert_eq!(held.status, 401, "{}", held.body);
    let hold = json_of(&held)["approval_id"].as_str().unwrap().to_owned();

    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let session = sign_in(console, &token);
    let page = request(
        console,
        "GET",
        &format!("/zones/{}", zone.id),
        &[("cookie", &session)],
        "",
    );
    assert!(
        page.body.contains(&hold),
        "the hold is listed: {}",
        page.body
    );
    assert!(page.body.contains("value=\"approve\""), "{}", page.body);
    assert!(
        page.body.contains("Notification sinks")
            && page.body.contains(&format!("http://{hook}/approvals")),
        "the sink is listed: {}",
        page.body
    );
    let added = form(
        console,
        &format!("/zones/{}/act", zone.id),
        &session,
        &format!(
            "csrf={}&action=add-sink&id={}&name=pager&url=https%3A%2F%2Fhooks.example%2Fpager",
            csrf_of(&page.body),
            zone.id
        ),
    );
    assert_eq!(added.status, 200, "{}", added.body);
    assert!(
        added.body.contains("nsk_"),
        "the new sink's secret is shown once: {}",
        added.body
    );
    let refused = form(
        console,
        &format!("/zones/{}/act", zone.id),
        &session,
        &format!(
            "csrf={}&action=add-sink&id={}&name=metadata&url=http%3A%2F%2F169.254.169.254%2F",
            csrf_of(&page.body),
            zone.id
        ),
    );
    assert_eq!(refused.status, 400, "{}", refused.body);
    let approved = form(
        console,
        &format!("/zones/{}/act", zone.id),
        &session,
        &format!(
            "csrf={}&action=decide&id={hold}&decision=approve&reason=ticket+42",
            csrf_of(&page.body)
        ),
    );
    assert_eq!(approved.status, 200, "{}", approved.body);
    assert!(approved.body.contains("approved"), "{}", approved.body);

    let retried = util::exchange(sts, &format!("{mint}&approval_id={hold}"));
    assert_eq!(retried.status, 200, "{}", retried.body);

    // The sink hears each step once the ledger holds it: issued, decided, consumed.
    let mut steps = Vec::new();
    while steps.len() < 3 {
        let (headers, body) = webhooks
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("every step of the hold is sent within a minute");
        assert_eq!(
            headers["x-caracal-signature"],
            caracal_services::notifier::signature(
                sink_secret.as_bytes(),
                &headers["x-caracal-timestamp"],
                &body
            ),
            "signed with the sink's secret"
        );
        assert_eq!(headers["x-caracal-sink"], sink["id"].as_str().unwrap());
        let payload: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            payload["id"].as_str(),
            Some(headers["x-caracal-delivery"].as_str())
        );
        assert_eq!(payload["data"]["challenge_id"], hold.as_str());
        steps.push((
            payload["occurred_at"].as_str().unwrap().to_owned(),
            headers["x-caracal-event"].clone(),
        ));
    }
    steps.sort();
    let kinds: Vec<&str> = steps.iter().map(|(_, kind)| kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["step_up_issued", "step_up_decided", "step_up_consumed"]
    );
    // The API role counts them (each once its answer is in).
    let counted = (0..50).any(|_| {
        let metrics = util::get(api, "/metrics", &[]).body;
        if metrics.contains("caracal_api_notifications_delivered_total 3") {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        false
    });
    assert!(counted, "{}", util::get(api, "/metrics", &[]).body);
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// A local operator account: added with `caracal console add-user` (password hashed, the
/// account's token sealed), signs in with its email and password, acts with its capability,
/// and is disabled by revoking its token.
#[test]
fn a_local_account_signs_in_with_its_password_and_its_token_revocation_disables_it() {
    let (parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let (api, console) = (running.address("api"), running.address("console"));
    assert_eq!(wait_ready(api).status, 200);
    let password = parent.path().join("password");
    std::fs::write(&password, "correct horse battery staple\n").unwrap();
    let add = |email: &str, file: &std::path::Path| {
        util::caracal(&home)
            .args([
                "console",
                "add-user",
                email,
                "--capability",
                "read",
                "--password-file",
            ])
            .arg(file)
            .output()
            .unwrap()
    };
    let added = add("Ops@Example.com", &password);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let stdout = String::from_utf8_lossy(&added.stdout).into_owned();
    let token_id = stdout.split_whitespace().last().unwrap().to_owned();
    assert_eq!(
        add("ops@example.com", &password).status.code(),
        Some(1),
        "taken"
    );
    let short = parent.path().join("short");
    std::fs::write(&short, "too short").unwrap();
    let refused = add("other@example.com", &short);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("at least 12"));
    assert_eq!(add("not-an-email", &password).status.code(), Some(1));

    let attempt = |email: &str, secret: &str| {
        let page = request(console, "GET", "/sign-in", &[], "");
        form(
            console,
            "/sign-in",
            &cookie_of(&page),
            &format!(
                "email={email}&password={}&csrf={}",
                secret.replace(' ', "+"),
                csrf_of(&page.body)
            ),
        )
    };
    assert_eq!(
        attempt("ops%40example.com", "wrong password here").status,
        401
    );
    assert_eq!(
        attempt("nobody%40example.com", "correct horse battery staple").status,
        401
    );
    let signed = attempt("ops%40example.com", "correct horse battery staple");
    assert_eq!(signed.status, 303, "{}", signed.body);
    let session = cookie_of(&signed);
    let zones = request(console, "GET", "/zones", &[("cookie", &session)], "");
    assert_eq!(zones.status, 200);
    assert!(zones.body.contains("read only"), "{}", zones.body);

    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let bearer = format!("Bearer {}", token.trim());
    let revoked = request(
        api,
        "DELETE",
        &format!("/v1/admin-tokens/{token_id}"),
        &[("authorization", bearer.as_str())],
        "",
    );
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    let after = request(console, "GET", "/zones", &[("cookie", &session)], "");
    assert_eq!(after.status, 303, "signed out");
    assert_eq!(
        attempt("ops%40example.com", "correct horse battery staple").status,
        401,
        "a disabled account cannot sign in"
    );
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// The audit page shows the zone's latest signed checkpoint and downloads the export, which
/// `caracal audit verify` checks offline; before any checkpoint, the page says why there is none.
#[test]
fn the_audit_export_downloads_and_verifies_offline() {
    let (parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let (api, console) = (running.address("api"), running.address("console"));
    assert_eq!(wait_ready(api).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let bearer = format!("Bearer {}", token.trim());
    let auth = [("authorization", bearer.as_str())];
    let zone = json_of(&request(
        api,
        "POST",
        "/v1/zones",
        &auth,
        r#"{"name":"ledger"}"#,
    ));
    let zone_id = zone["id"].as_str().unwrap().to_owned();
    for n in 0..3 {
        let created = request(
            api,
            "POST",
            &format!("/v1/zones/{zone_id}/providers"),
            &auth,
            &format!(r#"{{"name":"p{n}","identifier":"provider://p{n}","kind":"none"}}"#),
        );
        assert_eq!(created.status, 201, "{}", created.body);
    }
    let reader = request(
        api,
        "POST",
        "/v1/admin-tokens",
        &auth,
        r#"{"name":"auditor","scope":"global","capability":"read"}"#,
    );
    assert_eq!(reader.status, 201, "{}", reader.body);
    let session = sign_in(console, &token);
    let before = request(
        console,
        "GET",
        &format!("/zones/{zone_id}/audit"),
        &[("cookie", &session)],
        "",
    );
    assert!(
        before.body.contains("no signed checkpoint yet"),
        "{}",
        before.body
    );
    // Every change ingested, then a restart: the full sweep at start signs a checkpoint.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while json_of(&request(
        api,
        "GET",
        &format!("/v1/zones/{zone_id}/audit"),
        &auth,
        "",
    ))["items"]
        .as_array()
        .unwrap()
        .len()
        < 4
    {
        assert!(std::time::Instant::now() < deadline, "ingestion");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // And the system zone's (the reader token's creation): a zone with nothing ingested when
    // the sweep at start runs gets no checkpoint until the next full sweep, minutes later.
    while json_of(&request(
        api,
        "GET",
        "/v1/zones/caracal.sys/admin-audit",
        &auth,
        "",
    ))["items"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "system zone ingestion"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
    let running = Running::start(&home, &args);
    let (api, console) = (running.address("api"), running.address("console"));
    assert_eq!(wait_ready(api).status, 200);
    // The session is the store's: it outlives the process that signed it in.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let page = loop {
        let page = request(
            console,
            "GET",
            &format!("/zones/{zone_id}/audit"),
            &[("cookie", &session)],
            "",
        );
        if page.body.contains("Latest checkpoint") || std::time::Instant::now() > deadline {
            break page;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    assert!(page.body.contains("Latest checkpoint"), "{}", page.body);
    let key_at = page.body.find("--public-key ").unwrap() + "--public-key ".len();
    let public_key = page.body[key_at..].split('<').next().unwrap().to_owned();
    let download = request(
        console,
        "GET",
        &format!("/zones/{zone_id}/audit/export"),
        &[("cookie", &session)],
        "",
    );
    assert_eq!(download.status, 200, "{}", download.body);
    assert!(
        download.headers["content-disposition"].starts_with("attachment;"),
        "{:?}",
        download.headers
    );
    // The system zone's ledger (the reader token minted above) too, over the API.
    let system = loop {
        let system = request(api, "GET", "/v1/zones/caracal.sys/audit/export", &auth, "");
        if system.status == 200 || std::time::Instant::now() > deadline {
            break system;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    assert_eq!(system.status, 200, "{}", system.body);
    for (name, export) in [
        ("export.jsonl", &download.body),
        ("system.jsonl", &system.body),
    ] {
        let file = parent.path().join(name);
        std::fs::write(&file, export).unwrap();
        let verified = util::caracal(&home)
            .args(["audit", "verify"])
            .arg(&file)
            .args(["--public-key", &public_key])
            .output()
            .unwrap();
        assert!(
            verified.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&verified.stdout),
            String::from_utf8_lossy(&verified.stderr)
        );
    }
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// Behind HTTPS the console's cookies carry `Secure` (`console.secure_cookies`); a value that
/// is not a boolean is refused before anything starts.
#[test]
fn secure_cookies_are_set_when_the_console_is_served_over_https() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.extend(["--console-secure-cookies", "true", "up"].map(String::from));
    let running = Running::start(&home, &args);
    let console = running.address("console");
    assert_eq!(wait_ready(running.address("api")).status, 200);
    let page = request(console, "GET", "/sign-in", &[], "");
    let cookie = &page.headers["set-cookie"];
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let (exit, _, _) = running.terminate();
    assert!(exit.success());

    let (_parent, other) = fresh_home();
    let refused = util::caracal(&other)
        .args(["--console-secure-cookies", "yes", "up"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("console.secure_cookies"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// The incident screen runs `validate` and shows each check (a containment left in force fails
/// it, its release passes it), and builds a signed evidence bundle whose download verifies
/// offline with `caracal incident verify-bundle`. A reader runs the checks but cannot build a
/// bundle; a forged request for one is refused by the API.
#[test]
fn the_incident_screen_validates_and_preserves_a_verifiable_bundle() {
    let (parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let (api, console) = (running.address("api"), running.address("console"));
    assert_eq!(wait_ready(api).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let bearer = format!("Bearer {}", token.trim());
    let auth = [("authorization", bearer.as_str())];
    let session = sign_in(console, &token);
    let page = request(console, "GET", "/incident", &[("cookie", &session)], "");
    assert_eq!(page.status, 200);
    let csrf = csrf_of(&page.body);
    assert!(page.body.contains("action=\"/incident/preserve\""));

    let contained = form(
        console,
        "/incident",
        &session,
        &format!("csrf={csrf}&switch=freeze&reason=drill&action=contain"),
    );
    assert_eq!(contained.status, 200, "{}", contained.body);
    let validated = form(
        console,
        "/incident/validate",
        &session,
        &format!("csrf={csrf}"),
    );
    assert_eq!(validated.status, 200, "{}", validated.body);
    assert!(
        validated.body.contains("Not recovered"),
        "{}",
        validated.body
    );
    assert!(
        validated
            .body
            .contains("no containment left in force</td><td class=\"bad\">FAIL"),
        "{}",
        validated.body
    );
    assert!(
        validated
            .body
            .contains("api ready</td><td class=\"good\">PASS")
    );
    let released = form(
        console,
        "/incident",
        &session,
        &format!("csrf={csrf}&switch=freeze&reason=drill+over&action=release"),
    );
    assert_eq!(released.status, 200, "{}", released.body);
    let validated = form(
        console,
        "/incident/validate",
        &session,
        &format!("csrf={csrf}"),
    );
    assert!(
        validated.body.contains("Recovered: every check passes"),
        "{}",
        validated.body
    );
    let forged = form(console, "/incident/validate", &session, "csrf=wrong");
    assert_eq!(forged.status, 403);

    // The bundle: built, downloaded, unpacked and verified offline.
    let built = form(
        console,
        "/incident/preserve",
        &session,
        &format!("csrf={csrf}&reason=drill+evidence"),
    );
    assert_eq!(built.status, 200, "{}", built.body);
    let link_at = built.body.find("href=\"/incident/bundles/").unwrap() + "href=\"".len();
    let link = built.body[link_at..].split('"').next().unwrap().to_owned();
    let name = link.rsplit('/').next().unwrap().to_owned();
    let download = request(console, "GET", &link, &[("cookie", &session)], "");
    assert_eq!(download.status, 200, "{}", download.body);
    assert_eq!(download.headers["content-type"], "application/x-tar");
    let archive = parent.path().join("bundle.tar");
    std::fs::write(&archive, &download.bytes).unwrap();
    let unpacked = parent.path().join("unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    let untar = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(untar.success());
    let verify = |dir: &std::path::Path| {
        util::caracal(&home)
            .args(["incident", "verify-bundle"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let verified = verify(&unpacked.join(&name));
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    // The verification is not a formality: a changed file is found.
    std::fs::write(unpacked.join(&name).join("containment.json"), "tampered").unwrap();
    assert!(!verify(&unpacked.join(&name)).status.success());
    // Both the build and the download are in the ledger.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let audit = json_of(&request(
            api,
            "GET",
            "/v1/zones/caracal.sys/admin-audit?entity_type=evidence_bundle",
            &auth,
            "",
        ));
        let text = audit.to_string();
        if text.contains("incident.preserve") && text.contains("incident.bundle_download") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{audit}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The same rows as CSV, for a spreadsheet or a SIEM.
    let csv = request(
        api,
        "GET",
        "/v1/zones/caracal.sys/admin-audit?entity_type=evidence_bundle&format=csv",
        &auth,
        "",
    );
    assert_eq!(csv.status, 200, "{}", csv.body);
    assert!(
        csv.body.starts_with(
            "chain_seq,id,occurred_at,action,actor_id,entity_type,entity_id,changed_fields,request_id\r\n"
        ),
        "{}",
        csv.body
    );
    assert!(csv.body.contains(",incident.preserve,"), "{}", csv.body);
    // The system zone's ledger is read like any zone's (its export is checked offline in
    // `the_audit_export_downloads_and_verifies_offline`), by a global token only.
    let zone = json_of(&request(
        api,
        "POST",
        "/v1/zones",
        &auth,
        r#"{"name":"elsewhere"}"#,
    ));
    let zone_reader = json_of(&request(
        api,
        "POST",
        "/v1/admin-tokens",
        &auth,
        &format!(
            r#"{{"name":"zone-reader","scope":"zone","zone_id":"{}","capability":"read"}}"#,
            zone["id"].as_str().unwrap()
        ),
    ));
    let zone_bearer = format!("Bearer {}", zone_reader["token"].as_str().unwrap());
    for path in [
        "/v1/zones/caracal.sys/audit/export",
        "/v1/zones/caracal.sys/audit/checkpoint",
        "/v1/zones/caracal.sys/admin-audit",
    ] {
        let refused = request(api, "GET", path, &[("authorization", &zone_bearer)], "");
        assert_eq!(refused.status, 403, "{path}: {}", refused.body);
    }

    // A reader runs the checks, is offered no bundle, and a forged build is refused.
    let reader = json_of(&request(
        api,
        "POST",
        "/v1/admin-tokens",
        &auth,
        r#"{"name":"auditor","scope":"global","capability":"read"}"#,
    ));
    let read_session = sign_in(console, reader["token"].as_str().unwrap());
    let read_page = request(
        console,
        "GET",
        "/incident",
        &[("cookie", &read_session)],
        "",
    );
    assert!(!read_page.body.contains("action=\"/incident/preserve\""));
    assert!(!read_page.body.contains("name=\"secret\""));
    let read_csrf = csrf_of(&read_page.body);
    let checks = form(
        console,
        "/incident/validate",
        &read_session,
        &format!("csrf={read_csrf}"),
    );
    assert!(checks.body.contains("Recovered"), "{}", checks.body);
    let forged = form(
        console,
        "/incident/preserve",
        &read_session,
        &format!("csrf={read_csrf}&reason=exfiltrate"),
    );
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert!(forged.body.contains("admin_token_read_only"));
    let stolen = request(console, "GET", &link, &[("cookie", &read_session)], "");
    assert_eq!(stolen.status, 403, "{}", stolen.body);
    // The API itself: bad names and bodies are 4xx with the error body.
    let missing = request(
        api,
        "GET",
        "/v1/incident/bundles/..%2Fadmin-token",
        &auth,
        "",
    );
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert_eq!(json_of(&missing)["error"], "not_found");
    let unknown = request(
        api,
        "POST",
        "/v1/incident/validate",
        &auth,
        r#"{"zoen":"x"}"#,
    );
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    let no_reason = request(api, "POST", "/v1/incident/bundles", &auth, "{}");
    assert_eq!(no_reason.status, 400, "{}", no_reason.body);
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// `peers` names roles of other processes: the overview probes them beside its own (ready,
/// then "no answer" once that process is gone) and `caracal status` reports them.
#[test]
fn the_overview_probes_the_roles_of_other_processes() {
    let (_other_parent, other_home) = fresh_home();
    let mut other_args = free_ports();
    other_args.push("up".to_owned());
    let other = Running::start(&other_home, &other_args);
    let other_sts = other.address("sts");
    assert_eq!(wait_ready(other_sts).status, 200);

    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.extend([
        "--peers".to_owned(),
        format!("sts={other_sts}"),
        "up".to_owned(),
    ]);
    let running = Running::start(&home, &args);
    let console = running.address("console");
    assert_eq!(wait_ready(running.address("api")).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let session = sign_in(console, &token);
    let row = format!("<td>sts</td><td>{other_sts}</td>");
    let overview = request(console, "GET", "/overview", &[("cookie", &session)], "");
    assert!(
        overview
            .body
            .contains(&format!("{row}<td><span class=\"good\">ready</span>")),
        "{}",
        overview.body
    );
    assert!(overview.body.contains("Freshness and backlogs"));

    let status = util::caracal(&home)
        .args(["--peers", &format!("sts={other_sts}"), "status", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&other_sts.to_string()), "{text}");

    let (exit, _, _) = other.terminate();
    assert!(exit.success());
    let overview = request(console, "GET", "/overview", &[("cookie", &session)], "");
    assert!(
        overview
            .body
            .contains(&format!("{row}<td><span class=\"bad\">no answer</span>")),
        "{}",
        overview.body
    );
    let (exit, _, _) = running.terminate();
    assert!(exit.success());

    let refused = util::caracal(&home)
        .args(["--peers", "stss=127.0.0.1:1", "config", "show"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("peers"));
}

/// The console's calls go through the API's own layers: they spend the signed-in token's
/// request budget, so a console session cannot exceed what the token may do over the API.
#[test]
fn console_calls_spend_the_tokens_api_request_budget() {
    let (_parent, home) = fresh_home();
    let (running, token) = util::up(&home);
    let (api, console) = (running.address("api"), running.address("console"));
    let bearer = format!("Bearer {}", token.trim());
    let reader = json_of(&request(
        api,
        "POST",
        "/v1/admin-tokens",
        &[("authorization", bearer.as_str())],
        r#"{"name":"budget","scope":"global","capability":"read"}"#,
    ));
    let read_token = reader["token"].as_str().unwrap().to_owned();
    let session = sign_in(console, &read_token);
    // Budgets are counted per minute: start early in one, so the count is not cut in two.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now % 60 > 40 {
        std::thread::sleep(std::time::Duration::from_secs(61 - now % 60));
    }
    let read_bearer = format!("Bearer {read_token}");
    // 599 over the API (the address's own budget of 600 includes the token's minting).
    for _ in 0..599 {
        let answer = request(
            api,
            "GET",
            "/v1/zones",
            &[("authorization", read_bearer.as_str())],
            "",
        );
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let page = request(console, "GET", "/zones", &[("cookie", &session)], "");
    assert!(!page.body.contains("rate_limited"), "{}", page.body);
    let page = request(console, "GET", "/zones", &[("cookie", &session)], "");
    assert!(page.body.contains("rate_limited"), "{}", page.body);
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// Every console form, posted garbage by a signed-in writer (with and without the session's
/// CSRF token, fields missing or doubled, bytes that are not UTF-8, hostile ids in the path):
/// never a server error, and the stack still serves afterwards.
#[test]
fn garbage_posted_to_every_console_form_is_refused_without_a_server_error() {
    let (_parent, home) = fresh_home();
    let (running, token) = util::up(&home);
    let console = running.address("console");
    let session = sign_in(console, &token);
    let page = request(console, "GET", "/zones", &[("cookie", &session)], "");
    let csrf = csrf_of(&page.body);
    let paths = [
        "/sign-in",
        "/zones",
        "/zones/z/act",
        "/zones/z/policy-sets/s",
        "/zones/z/sessions/s/terminate",
        "/zones/z/applications/a/revoke",
        "/zones/%3Cscript%3E/act",
        "/zones/..%2F..%2Fv1/applications/a/revoke",
        "/incident",
        "/incident/validate",
        "/incident/preserve",
        "/incident/tamper",
        "/incident/dlq",
    ];
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let fields = [
        "action",
        "reason",
        "switch",
        "name",
        "version_id",
        "zone",
        "app",
        "secret",
        "resource",
        "token",
        "email",
        "password",
        "csrf",
        "id",
        "overlap_seconds",
        "decision",
    ];
    for path in paths {
        for round in 0..25 {
            let mut body = if round % 3 == 0 {
                String::new()
            } else {
                format!("csrf={csrf}")
            };
            for _ in 0..(next() % 5) {
                let field = fields[(next() % fields.len() as u64) as usize];
                let value: String = (0..(next() % 40))
                    .map(|_| match next() % 6 {
                        0 => "%FF".to_owned(),
                        1 => "%00".to_owned(),
                        2 => "&".to_owned(),
                        3 => "=".to_owned(),
                        _ => char::from(b'a' + (next() % 26) as u8).to_string(),
                    })
                    .collect();
                body.push_str(&format!("&{field}={value}"));
            }
            let answer = form(console, path, &session, &body);
            assert!(
                answer.status < 500,
                "{path} {body}: {} {}",
                answer.status,
                answer.body
            );
        }
    }
    let still = request(console, "GET", "/overview", &[("cookie", &session)], "");
    assert_eq!(still.status, 200);
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

#[test]
fn the_secret_exposure_and_audit_rows_of_the_runbook_run_from_the_console() {
    let (_parent, home) = fresh_home();
    let (running, token) = util::up(&home);
    let (api, console, sts) = (
        running.address("api"),
        running.address("console"),
        running.address("sts"),
    );
    let bearer = format!("Bearer {}", token.trim());
    let zone = request(
        api,
        "POST",
        "/v1/zones",
        &[("authorization", bearer.as_str())],
        r#"{"name":"exposed"}"#,
    );
    assert_eq!(zone.status, 201, "{}", zone.body);
    let zone_id = json_of(&zone)["id"].as_str().unwrap().to_owned();
    let jwks_kids = || {
        let keys = request(
            sts,
            "GET",
            &format!("/.well-known/jwks.json?zone_id={zone_id}"),
            &[],
            "",
        );
        json_of(&keys)["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|key| key["kid"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let before = jwks_kids();
    assert_eq!(before.len(), 1);

    let session = sign_in(console, &token);
    let page = request(
        console,
        "GET",
        &format!("/zones/{zone_id}"),
        &[("cookie", &session)],
        "",
    );
    assert!(page.body.contains("Secret exposure"), "{}", page.body);
    let csrf = csrf_of(&page.body);
    let act = format!("/zones/{zone_id}/act");
    let rotated = form(
        console,
        &act,
        &session,
        &format!("csrf={csrf}&action=rotate-key&id={zone_id}&overlap_seconds=0&reason=leaked"),
    );
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    // The STS hears of the rotation through the outbox.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let after = loop {
        let kids = jwks_kids();
        if !kids.contains(&before[0]) || std::time::Instant::now() > deadline {
            break kids;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let new_kid = after
        .iter()
        .find(|kid| !before.contains(kid))
        .unwrap_or_else(|| panic!("a new key: {before:?} {after:?} {}", rotated.body));
    assert!(rotated.body.contains(new_kid.as_str()), "{}", rotated.body);
    assert!(
        !after.contains(&before[0]),
        "no overlap: the leaked key is gone at once"
    );
    let invalidated = form(
        console,
        &act,
        &session,
        &format!("csrf={csrf}&action=invalidate&id={zone_id}&reason=leaked"),
    );
    assert_eq!(invalidated.status, 200, "{}", invalidated.body);
    assert!(invalidated.body.contains("Every session of the zone ended"));
    // A zone's controls act on that zone only.
    let elsewhere = form(
        console,
        &act,
        &session,
        &format!("csrf={csrf}&action=invalidate&id=other-zone&reason=x"),
    );
    assert_eq!(elsewhere.status, 400, "{}", elsewhere.body);

    // The audit rows: findings and dead letters are shown, and their controls answer.
    let incident = request(console, "GET", "/incident", &[("cookie", &session)], "");
    assert!(
        incident.body.contains("Audit tamper findings"),
        "{}",
        incident.body
    );
    assert!(
        incident.body.contains("Audit dead letters"),
        "{}",
        incident.body
    );
    let acknowledged = form(
        console,
        "/incident/tamper",
        &session,
        &format!("csrf={csrf}&reason=checked"),
    );
    assert_eq!(acknowledged.status, 200, "{}", acknowledged.body);
    assert!(
        acknowledged.body.contains("0 tamper findings acknowledged"),
        "{}",
        acknowledged.body
    );
    let replayed = form(console, "/incident/dlq", &session, &format!("csrf={csrf}"));
    assert_eq!(replayed.status, 200, "{}", replayed.body);
    assert!(replayed.body.contains("0 replayed"), "{}", replayed.body);
}
