//! `caracal status`: exit codes against a stopped and a running stack, table and JSON output.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::net::TcpListener;

use util::{ROLES, Running, caracal, free_ports, fresh_home, run};

/// Ports that nothing listens on: bound, read, released.
fn closed_ports() -> Vec<String> {
    let listeners: Vec<TcpListener> = ROLES
        .iter()
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ROLES
        .iter()
        .zip(&listeners)
        .flat_map(|(role, listener)| {
            [
                "--port".to_owned(),
                format!("{role}={}", listener.local_addr().unwrap().port()),
            ]
        })
        .collect()
}

#[test]
fn status_fails_against_a_stopped_stack_and_passes_against_a_running_one() {
    let (_parent, home) = fresh_home();
    let mut stopped = closed_ports();
    stopped.push("status".to_owned());
    let output = run(caracal(&home).args(&stopped));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("unreachable"), "{stdout}");
    assert_eq!(stdout.lines().count(), 1 + ROLES.len(), "{stdout}");

    let mut up = free_ports();
    up.push("up".to_owned());
    let running = Running::start(&home, &up);
    let output = run(caracal(&home).args(["status", "--ready", "--timeout", "20"]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    for role in ROLES {
        assert!(
            stdout.contains(&running.address(role).to_string()),
            "{role}: {stdout}"
        );
    }

    let output = run(caracal(&home).args(["status", "--json", "sts"]));
    assert_eq!(output.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report.as_array().unwrap().len(), 1);
    assert_eq!(report[0]["role"], "sts");
    assert_eq!(report[0]["ready"], true);
    assert_eq!(report[0]["live"], true);

    let (status, _, _) = running.terminate();
    assert!(status.success());
    let output = run(caracal(&home).args(&stopped));
    assert_eq!(output.status.code(), Some(1), "stopped again");
}

#[test]
fn config_show_names_sources_and_redacts_secrets() {
    let (_parent, home) = fresh_home();
    let output = run(caracal(&home)
        .args(["--bind", "127.0.0.1", "config", "show", "--json"])
        .env(
            "CARACAL_STORE_URL",
            "postgres://caracal:hunter2@db:5432/caracal",
        )
        .env("CARACAL_GATEWAY_PORT", "9081"));
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("hunter2"), "{stdout}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let row = |key: &str| rows.iter().find(|row| row["key"] == key).unwrap().clone();
    assert_eq!(
        row("store")["value"],
        "postgres://caracal:***@db:5432/caracal"
    );
    assert_eq!(row("store")["source"], "env CARACAL_STORE_URL");
    assert_eq!(row("bind")["source"], "flag --bind");
    assert_eq!(row("ports.gateway")["value"], "9081");
    assert_eq!(row("issuer_url")["value"], "http://127.0.0.1:8080");
    assert_eq!(row("issuer_url")["source"], "default");
    assert!(!home.exists(), "config show writes nothing");
}
