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

/// A Redis database of its own for one drill, emptied first: drills run side by side, and
/// deployments sharing streams would read (and dead-letter) each other's messages.
fn redis_db(db: u8) -> String {
    use std::io::{Read as _, Write as _};
    let mut redis = std::net::TcpStream::connect(REDIS).unwrap();
    redis
        .write_all(format!("SELECT {db}\r\nFLUSHDB\r\n").as_bytes())
        .unwrap();
    let mut answer = [0u8; 10];
    redis.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"+OK\r\n+OK\r\n", "Redis answered {answer:?}");
    format!("/{db}")
}

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

/// Every port chosen by the OS, then one deployment's shared flags — PostgreSQL (at
/// `store_port`, a relay's or the server's) in `schema`, `bus`, the stream key — then `extra`.
fn distributed(store_port: u16, schema: &str, bus: &str, key: &str, extra: &[&str]) -> Vec<String> {
    let mut args = free_ports();
    args.extend(
        [
            "--store",
            &format!("postgres://postgres@127.0.0.1:{store_port}/test"),
            "--store-schema",
            schema,
            "--bus",
            bus,
            "--stream-key",
            key,
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    args
}

/// The home of another process of the same deployment: the first home's KEK copied in.
fn second_home(first: &Path) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    let (parent, home) = fresh_home();
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(first.join("kek"), home.join("kek")).unwrap();
    (parent, home)
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
            &format!("redis://127.0.0.1:{}{}", relay.port, redis_db(11)),
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

/// `validate` from outside the deployment: a fresh home, every role's address given, the
/// admin token of `token_home`.
fn validate_at(
    roles: &[(&str, SocketAddr)],
    token_home: &Path,
    zone: &Provisioned,
    secret: &Path,
) -> (bool, serde_json::Value) {
    let (_parent, home) = fresh_home();
    let mut command = caracal(&home);
    for (role, address) in roles {
        command.args(["--port", &format!("{role}={}", address.port())]);
    }
    let output = command
        .args(["incident", "validate", "--json", "--zone", &zone.id])
        .args(["--app", &zone.app_id, "--resource", "resource://ledger"])
        .arg("--secret-file")
        .arg(secret)
        .arg("--token-file")
        .arg(token_home.join("admin-token"))
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("validate printed no report: {}", text(&output)));
    (output.status.success(), report)
}

/// STS isolated from the Gateway: a Gateway replica of its own reaches the STS through a
/// relay that is cut. Its calls fail closed (`sts_unavailable`), three failures open the
/// circuit (the alert's gauge reads 1, `/ready` says `sts_unreachable`), and no governed call
/// gets through. With the link restored the half-open probe closes the circuit and `validate`
/// passes.
#[test]
fn sts_isolation_drill_opens_the_circuit_and_recovers() {
    if !external_backends() {
        return;
    }
    let schema = util::Schema::fresh();
    let stream_key = "5c".repeat(32);
    let bus = format!("redis://{REDIS}{}", redis_db(12));
    let shared = |extra: &[&str]| distributed(5432, &schema.0, &bus, &stream_key, extra);
    let (parent, home) = fresh_home();
    let control = Running::start(
        &home,
        &shared(&["serve", "api", "console", "sts", "coordinator", "audit"]),
    );
    let (api, sts) = (control.address("api"), control.address("sts"));
    assert_eq!(util::wait_ready(api).status, 200);
    assert_eq!(util::wait_ready(sts).status, 200);
    let relay = Relay::start(sts);
    let (_gateway_parent, gateway_home) = second_home(&home);
    let sts_url = format!("http://127.0.0.1:{}", relay.port);
    let edge = Running::start(
        &gateway_home,
        &shared(&["--gateway-sts-url", &sts_url, "serve", "gateway"]),
    );
    let gateway = edge.address("gateway");
    assert_eq!(util::wait_ready(gateway).status, 200);
    let roles: Vec<(&str, SocketAddr)> = ["api", "console", "sts", "coordinator", "audit"]
        .into_iter()
        .map(|role| (role, control.address(role)))
        .chain([("gateway", gateway)])
        .collect();
    let (zone, secret) = provisioned(&home, api, parent.path());
    let (ok, report) = validate_at(&roles, &home, &zone, &secret);
    assert!(ok, "the baseline must pass: {report}");

    relay.cut();
    // Three governed calls (the validate canaries) fail and open the circuit.
    let mut tries = 0;
    eventually(Duration::from_secs(30), "the circuit never opened", || {
        let (ok, report) = validate_at(&roles, &home, &zone, &secret);
        assert!(!ok, "validate passed with the STS cut away: {report}");
        let canary = check(&report, "canary call authorised by the Gateway");
        assert_eq!(canary["ok"], false, "a governed call got through: {report}");
        tries += 1;
        metric(gateway, "caracal_gateway_sts_circuit_state ").as_deref()
            == Some("caracal_gateway_sts_circuit_state 1")
    });
    assert!(tries >= 2, "the circuit opened after {tries} calls");
    let ready = get(gateway, "/ready", &[]);
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.body.contains("sts_unreachable"), "{}", ready.body);
    let opened = metric(gateway, "caracal_gateway_sts_circuit_opened_total ").unwrap();
    assert_ne!(opened, "caracal_gateway_sts_circuit_opened_total 0");

    relay.restore();
    eventually(
        Duration::from_secs(30),
        "the Gateway never became ready again",
        || get(gateway, "/ready", &[]).status == 200,
    );
    let mut last = serde_json::Value::Null;
    eventually(Duration::from_secs(40), "validate never passed", || {
        let (ok, report) = validate_at(&roles, &home, &zone, &secret);
        last = report;
        ok
    });
    assert_eq!(check(&last, "gateway STS circuit closed")["ok"], true);
    assert_eq!(
        check(&last, "terminated session refused at the Gateway")["ok"],
        true,
        "{last}"
    );
    for running in [edge, control] {
        let (exit, _, stderr) = running.terminate();
        assert!(exit.success(), "{stderr}");
    }
}

/// DLQ growth: the Audit role (a process of its own) loses its store behind a relay while the
/// rest of the stack keeps minting. Events it cannot store stay pending, come back every
/// second (`--audit-reclaim-idle-seconds 1`) and after eight deliveries are dead-lettered:
/// `caracal_audit_dlq_size` grows (the alert's input) and `caracal audit dlq` exits 1. With
/// the store back, `caracal audit dlq --replay` drains it, every dead-lettered event is found
/// in the ledger (nothing lost), and `validate` passes.
#[test]
fn dlq_growth_drill_dead_letters_then_drains_without_losing_evidence() {
    if !external_backends() {
        return;
    }
    let schema = util::Schema::fresh();
    let stream_key = "5d".repeat(32);
    let bus = format!("redis://{REDIS}{}", redis_db(13));
    let postgres = Relay::start("127.0.0.1:5432".parse().unwrap());
    let args = |store_port: u16, extra: &[&str]| {
        distributed(store_port, &schema.0, &bus, &stream_key, extra)
    };
    let (parent, home) = fresh_home();
    let control = Running::start(
        &home,
        &args(
            5432,
            &["serve", "api", "console", "sts", "coordinator", "gateway"],
        ),
    );
    let api = control.address("api");
    assert_eq!(util::wait_ready(api).status, 200);
    let (_audit_parent, audit_home) = second_home(&home);
    let ledger = Running::start(
        &audit_home,
        &args(
            postgres.port,
            &["--audit-reclaim-idle-seconds", "1", "serve", "audit"],
        ),
    );
    let audit = ledger.address("audit");
    assert_eq!(util::wait_ready(audit).status, 200);
    let roles: Vec<(&str, SocketAddr)> = ["api", "console", "sts", "coordinator", "gateway"]
        .into_iter()
        .map(|role| (role, control.address(role)))
        .chain([("audit", audit)])
        .collect();
    let (zone, secret) = provisioned(&home, api, parent.path());
    let (ok, report) = validate_at(&roles, &home, &zone, &secret);
    assert!(ok, "the baseline must pass: {report}");
    let dlq = |replay: bool| {
        let mut command = caracal(&home);
        command.args(["--port", &format!("api={}", api.port()), "audit", "dlq"]);
        if replay {
            command.arg("--replay");
        }
        command.output().unwrap()
    };
    assert!(dlq(false).status.success(), "{}", text(&dlq(false)));

    postgres.cut();
    eventually(
        Duration::from_secs(20),
        "the Audit role stayed ready",
        || get(audit, "/ready", &[]).status == 503,
    );
    // Governed traffic goes on (its evidence is on the stream); validate fails on the Audit.
    let (ok, report) = validate_at(&roles, &home, &zone, &secret);
    assert!(!ok, "validate passed with the ledger's store cut: {report}");
    assert_eq!(check(&report, "canary exchange allowed")["ok"], true);
    eventually(Duration::from_secs(60), "nothing was dead-lettered", || {
        metric(audit, "caracal_audit_dlq_size ")
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .is_some_and(|size| size > 0)
    });
    let listed = dlq(false);
    assert_eq!(listed.status.code(), Some(1), "{}", text(&listed));
    assert!(
        text(&listed).contains("max_deliveries_exceeded (replayable)"),
        "{}",
        text(&listed)
    );
    let auth = [("authorization", zone.bearer.as_str())];
    let dead = util::json_of(&get(api, "/v1/audit/dlq?limit=1000", &auth));
    let dead_ids: Vec<String> = dead["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["zone_id"] == zone.id.as_str())
        .filter_map(|item| item["event_id"].as_str().map(str::to_owned))
        .collect();
    assert!(!dead_ids.is_empty(), "{dead}");

    postgres.restore();
    eventually(
        Duration::from_secs(30),
        "the Audit role never recovered",
        || get(audit, "/ready", &[]).status == 200,
    );
    // Everything dead-lettered so far is re-sent; entries still pending drain on their own.
    let mut drained = text(&dlq(true));
    eventually(Duration::from_secs(60), "the DLQ never drained", || {
        let replayed = dlq(true);
        drained = text(&replayed);
        replayed.status.success()
    });
    assert!(drained.contains("0 audit dead letter(s)"), "{drained}");
    // Replayed events are ingested asynchronously: each must reach the zone's chain.
    let stored = || {
        let mut ids = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = util::json_of(&get(
                api,
                &format!("/v1/zones/{}/audit?limit=1000{cursor}", zone.id),
                &auth,
            ));
            ids.extend(
                page["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|item| item["id"].as_str().unwrap().to_owned()),
            );
            match page["next_cursor"].as_str() {
                Some(next) => cursor = format!("&cursor={next}"),
                None => return ids,
            }
        }
    };
    let mut missing = dead_ids.clone();
    eventually(
        Duration::from_secs(30),
        "dead-lettered evidence never reached the ledger",
        || {
            let stored = stored();
            missing.retain(|id| !stored.contains(id));
            missing.is_empty()
        },
    );
    let mut last = serde_json::Value::Null;
    eventually(Duration::from_secs(30), "validate never passed", || {
        let (ok, report) = validate_at(&roles, &home, &zone, &secret);
        last = report;
        ok
    });
    assert_eq!(check(&last, "audit DLQ drained")["ok"], true, "{last}");
    for running in [ledger, control] {
        let (exit, _, stderr) = running.terminate();
        assert!(exit.success(), "{stderr}");
    }
}
