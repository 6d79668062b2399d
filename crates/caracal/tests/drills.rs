//! Outage drills on a running stack: a dependency is cut away behind a TCP relay (a network
//! partition, as the runbook's drills inject it), the affected role must fail closed and say
//! so through readiness and the alert's metric, and once the dependency is back `caracal
//! incident validate` must pass with canaries through the STS and the Gateway. Each drill
//! asserts that no protected call succeeded while it should have failed. Redis (and for some,
//! PostgreSQL) are required; outside CI `CARACAL_TEST_SKIP_EXTERNAL=1` skips, refused with
//! `CI=true`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use util::{Provisioned, Relay, Running, caracal, external_backends, free_ports, fresh_home, get};

const REDIS: &str = "127.0.0.1:6379";

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Polls `what` every 250 ms until it holds; panics with `why` after `limit`.
fn eventually(limit: Duration, why: &str, mut what: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !what() {
        assert!(Instant::now() < deadline, "{why}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `caracal incident validate --json` with the zone's canaries; the parsed report and whether
/// it exited 0.
fn validate(home: &Path, zone: &Provisioned, secret: &Path) -> (bool, serde_json::Value) {
    let output = caracal(home)
        .args(["incident", "validate", "--json", "--zone", &zone.id])
        .args(["--app", &zone.app_id, "--resource", "resource://ledger"])
        .arg("--secret-file")
        .arg(secret)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("validate printed no report: {}", text(&output)));
    (output.status.success(), report)
}

fn check<'r>(report: &'r serde_json::Value, name: &str) -> &'r serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == name)
        .unwrap_or_else(|| panic!("no check `{name}`: {report}"))
}

fn metric(address: SocketAddr, line_start: &str) -> Option<String> {
    get(address, "/metrics", &[])
        .body
        .lines()
        .find(|line| line.starts_with(line_start))
        .map(str::to_owned)
}

/// A provisioned zone whose canaries pass, and the file holding its application's secret.
fn provisioned(home: &Path, api: SocketAddr, parent: &Path) -> (Provisioned, PathBuf) {
    let zone = Provisioned::new(home, api, &["resource://ledger"]);
    zone.policy_set(&[(1, "resource://ledger")]);
    let secret = parent.join("secret");
    std::fs::write(&secret, &zone.secret).unwrap();
    (zone, secret)
}

/// Revocation stale: the bus is cut away from a running stack. Within the freshness window
/// the Gateway refuses every call with 503 `revocation_snapshot_stale`, is not ready, and the
/// alert's gauge reads 0; `validate` fails and its Gateway canary is refused. With the bus
/// back the view is fresh again and `validate` passes.
#[test]
fn revocation_stale_drill_fails_closed_while_the_bus_is_cut() {
    if !external_backends() {
        return;
    }
    let relay = Relay::start(REDIS.parse().unwrap());
    let (parent, home) = fresh_home();
    let mut args = free_ports();
    args.extend(
        [
            "--bus",
            &format!("redis://127.0.0.1:{}", relay.port),
            "--stream-key",
            &"5b".repeat(32),
            "--gateway-revocation-freshness-seconds",
            "31",
            "up",
        ]
        .map(String::from),
    );
    let running = Running::start(&home, &args);
    let (api, gateway) = (running.address("api"), running.address("gateway"));
    assert_eq!(util::wait_ready(api).status, 200);
    assert_eq!(util::wait_ready(gateway).status, 200);
    let (zone, secret) = provisioned(&home, api, parent.path());
    let (ok, report) = validate(&home, &zone, &secret);
    assert!(ok, "the baseline must pass: {report}");

    relay.cut();
    let cut = Instant::now();
    eventually(
        Duration::from_secs(60),
        "the Gateway never went stale",
        || {
            let ready = get(gateway, "/ready", &[]);
            ready.status == 503 && ready.body.contains("revocation_snapshot_stale")
        },
    );
    assert!(
        cut.elapsed() >= Duration::from_secs(25),
        "stale after {:?}: sooner than the window allows",
        cut.elapsed()
    );
    eventually(
        Duration::from_secs(5),
        "the alert's gauge never dropped",
        || {
            metric(gateway, "caracal_gateway_revocation_snapshot_fresh ").as_deref()
                == Some("caracal_gateway_revocation_snapshot_fresh 0")
        },
    );
    let refused = util::request(
        gateway,
        "GET",
        "/entries",
        &[
            ("authorization", "Bearer x.y.z"),
            ("x-caracal-resource", "resource://ledger"),
        ],
        "",
    );
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.body.contains("revocation_snapshot_stale"));
    let (ok, report) = validate(&home, &zone, &secret);
    assert!(!ok, "validate must fail while the bus is cut: {report}");
    assert_eq!(check(&report, "gateway revocation view fresh")["ok"], false);
    if let Some(canary) = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == "canary call authorised by the Gateway")
    {
        assert_eq!(canary["ok"], false, "a governed call got through: {report}");
    }

    relay.restore();
    eventually(
        Duration::from_secs(30),
        "the Gateway never recovered",
        || get(gateway, "/ready", &[]).status == 200,
    );
    let mut last = serde_json::Value::Null;
    eventually(Duration::from_secs(30), "validate never passed", || {
        let (ok, report) = validate(&home, &zone, &secret);
        last = report;
        ok
    });
    for name in [
        "gateway revocation view fresh",
        "canary call authorised by the Gateway",
        "terminated session refused at the Gateway",
    ] {
        assert_eq!(check(&last, name)["ok"], true, "{name}: {last}");
    }
    let (exit, _, stderr) = running.terminate();
    assert!(exit.success(), "{stderr}");
}
