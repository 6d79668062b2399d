//! `caracal run` against a running `caracal up`: a workload's credentials reach the child and
//! nothing else of the caller's environment does; exit statuses and signals pass through; every
//! failure before the start is exit 1.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use util::{Provisioned, caracal, fresh_home, request, run, up};

/// The zone's workload, bound to an API key that may be injected (required) and to a bearer
/// token that may not (optional, warn); its id and secret.
fn workload(zone: &Provisioned) -> (String, String) {
    let base = format!("/v1/zones/{}", zone.id);
    let key = zone.post(
        &format!("{base}/providers"),
        json!({"name": "billing key", "kind": "api_key",
               "config_json": {"header": "x-api-key", "api_key": "sk-live-1", "allow_runtime_injection": true}}),
    );
    let token = zone.post(
        &format!("{base}/providers"),
        json!({"name": "notes token", "kind": "bearer_token", "config_json": {"bearer_token": "nt-1"}}),
    );
    for (identifier, provider) in [
        ("resource://billing-api", &key),
        ("resource://notes", &token),
    ] {
        zone.post(
            &format!("{base}/resources"),
            json!({"name": identifier, "identifier": identifier, "scopes": ["read"],
                   "upstream_url": "http://127.0.0.1:9/", "credential_provider_id": provider["id"]}),
        );
    }
    let created = zone.post(
        &format!("{base}/workloads"),
        json!({"name": "nightly-report"}),
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let bindings = json!({"bindings": [
        {"env": "BILLING_KEY", "resource": "resource://billing-api", "scopes": ["read"]},
        {"env": "NOTES_TOKEN", "resource": "resource://notes", "scopes": ["read"], "optional": true, "on_failure": "warn"},
    ]});
    let auth = [("authorization", zone.bearer.as_str())];
    let response = request(
        zone.api,
        "PUT",
        &format!("{base}/workloads/{id}"),
        &auth,
        &bindings.to_string(),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    (id, created["secret"].as_str().unwrap().to_owned())
}

#[test]
fn caracal_run_hands_the_child_its_credentials_and_nothing_else() {
    let (_parent, home) = fresh_home();
    let (running, _token) = up(&home);
    let zone = Provisioned::new(&home, running.address("api"), &["resource://ledger"]);
    zone.policy_set(&[(0, "resource://ledger")]);
    let (id, secret) = workload(&zone);
    let sts = format!("http://{}", running.address("sts"));
    let launcher = |secret: &str, program: &[&str]| {
        let mut command = caracal(&home);
        command
            .env("CARACAL_WORKLOAD_ID", &id)
            .env("CARACAL_WORKLOAD_SECRET", secret)
            .env("CARACAL_STS_URL", &sts)
            .env("CARACAL_ADMIN_TOKEN", "cat_must_not_leak")
            .env("AWS_SECRET_ACCESS_KEY", "must-not-leak")
            .env("LC_ALL", "C")
            .arg("run")
            .arg("--")
            .args(program);
        command
    };

    // The child sees its credential and the kept variables only; its exit code is ours.
    let script = r#"printf '%s|%s|%s|%s|%s' "$BILLING_KEY" "${NOTES_TOKEN-unset}" "${CARACAL_WORKLOAD_SECRET-unset}" "${AWS_SECRET_ACCESS_KEY-unset}" "$LC_ALL"; exit 7"#;
    let output = run(&mut launcher(&secret, &["sh", "-c", script]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "{stdout} {stderr}");
    assert_eq!(stdout, "sk-live-1|unset|unset|unset|C", "{stderr}");
    assert!(
        stderr.contains("optional credential skipped: NOTES_TOKEN"),
        "{stderr}"
    );

    // A child ended by a signal: 128 + N.
    let output = run(&mut launcher(&secret, &["sh", "-c", "kill -TERM $$"]));
    assert_eq!(output.status.code(), Some(143));

    // A signal to the launcher reaches the child.
    let mut child = launcher(&secret, &["sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "sleep ended by the forwarded SIGINT"
    );

    // Failures before the start: exit 1, the program never runs.
    let marker = home.join("ran");
    let touch = ["sh", "-c", "touch \"$0\"", marker.to_str().unwrap()];
    let output = run(&mut launcher("ws_wrong", &touch));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("access_denied"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut no_identity = caracal(&home);
    no_identity
        .env("CARACAL_STS_URL", &sts)
        .args(["run", "--"])
        .args(touch);
    let output = run(&mut no_identity);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("CARACAL_WORKLOAD_ID"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!marker.exists(), "nothing ran before the failures");

    // A program that cannot start: 127.
    let output = run(&mut launcher(&secret, &["/no/such/program"]));
    assert_eq!(output.status.code(), Some(127));
    running.terminate();
}
