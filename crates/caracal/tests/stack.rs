//! `caracal up`: every role serves, first start bootstraps the data directory, SIGTERM stops
//! cleanly, and a second start reuses what the first created.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use util::{ROLES, Running, check_metrics, free_ports, fresh_home, get, mode, wait_ready};

fn up_args() -> Vec<String> {
    let mut args = free_ports();
    args.push("up".to_owned());
    args
}

#[test]
fn up_serves_every_role_bootstraps_once_and_stops_on_sigterm() {
    let (_parent, home) = fresh_home();
    let running = Running::start(&home, &up_args());
    assert_eq!(
        running.addresses.keys().cloned().collect::<Vec<_>>().len(),
        ROLES.len()
    );
    for role in ROLES {
        let address = running.address(role);
        assert!(address.ip().is_loopback(), "{role} bound to {address}");
        let ready = wait_ready(address);
        assert_eq!(ready.status, 200, "{role}: {}", ready.body);
        let body: serde_json::Value = serde_json::from_str(&ready.body).unwrap();
        assert_eq!(body["status"], "ready");
        assert_eq!(get(address, "/health", &[]).status, 200);
        let metrics = get(address, "/metrics", &[]);
        assert_eq!(metrics.status, 200);
        let own = format!("caracal_{role}_");
        // The API role also serves the deployment-wide outbox families.
        let prefixes: &[&str] = if role == "api" {
            &[&own, "caracal_outbox_"]
        } else {
            &[&own]
        };
        check_metrics(&metrics.body, prefixes);
        assert!(
            metrics
                .body
                .contains(&format!("caracal_{role}_http_requests_total")),
            "{role}"
        );
    }

    let api_metrics = get(running.address("api"), "/metrics", &[]).body;
    for name in [
        "caracal_outbox_pending_oldest_seconds",
        "caracal_outbox_dead_total",
    ] {
        assert!(
            api_metrics.contains(&format!("\n{name} ")),
            "missing {name}:\n{api_metrics}"
        );
    }

    // The STS says how old its policy bundles are (seconds since confirmed against the store).
    let sts_metrics = get(running.address("sts"), "/metrics", &[]).body;
    assert!(
        sts_metrics.contains("\ncaracal_sts_policy_bundle_age_seconds "),
        "missing the bundle age:\n{sts_metrics}"
    );

    assert_eq!(mode(&home), 0o700);
    assert_eq!(mode(&home.join("admin-token")), 0o600);
    assert_eq!(mode(&home.join("kek")), 0o600);
    assert_eq!(mode(&home.join("caracal.db")), 0o600);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let token = token.trim_end().to_owned();
    assert!(token.starts_with("cat_") && token.len() == 47, "{token}");

    let (status, stdout, stderr) = running.terminate();
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(
        stdout.contains(&token),
        "the first start prints the token once: {stdout}"
    );
    assert!(stderr.contains("draining"), "{stderr}");
    assert!(
        !home.join("run.json").exists(),
        "the run file is removed on clean exit"
    );
    let database = std::fs::read(home.join("caracal.db")).unwrap();
    assert!(
        !database
            .windows(token.len())
            .any(|window| window == token.as_bytes()),
        "the store holds the token only hashed"
    );

    let again = Running::start(&home, &up_args());
    assert_eq!(wait_ready(again.address("api")).status, 200);
    let (status, stdout, _) = again.terminate();
    assert!(status.success());
    assert!(
        !stdout.contains(&token),
        "a later start must not print the token: {stdout}"
    );
    assert!(stdout.contains("admin-token"), "{stdout}");
    let token_after = std::fs::read_to_string(home.join("admin-token")).unwrap();
    assert_eq!(
        token_after.trim_end(),
        token,
        "a later start reuses the token"
    );
}

#[test]
fn request_ids_are_echoed_and_written_in_log_lines() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.extend(["--log-format", "json", "--log", "debug", "serve", "gateway"].map(String::from));
    let running = Running::start(&home, &args);
    let address = running.address("gateway");
    // Every path but the probes is a governed call: without a bearer it is refused.
    let missing = get(
        address,
        "/no-such-route",
        &[("X-Request-Id", "trace-me-4711")],
    );
    assert_eq!(missing.status, 401);
    assert_eq!(missing.headers["x-request-id"], "trace-me-4711");
    let body: serde_json::Value = serde_json::from_str(&missing.body).unwrap();
    assert_eq!(body["error"], "invalid_token");
    assert_eq!(body["requestId"], "trace-me-4711");
    let generated = get(
        address,
        "/health",
        &[("X-Request-Id", "bad id with spaces")],
    );
    assert_eq!(generated.headers["x-request-id"].len(), 36);

    let (status, _, stderr) = running.terminate();
    assert!(status.success());
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let traced: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line["span"]["request_id"] == "trace-me-4711")
        .collect();
    assert!(
        !traced.is_empty(),
        "no log line carries the request id:\n{stderr}"
    );
    assert!(traced.iter().all(|line| line["span"]["role"] == "gateway"));
}

/// A Gateway on its own whose STS is not there: not ready (`sts_unreachable`) though its
/// revocation view is confirmed, and its metrics carry the freshness, propagation and circuit
/// gauges the alerts read.
#[test]
fn a_lone_gateway_without_its_sts_is_not_ready_and_exposes_its_alert_gauges() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.extend(
        [
            "--gateway-sts-url",
            "http://127.0.0.1:1",
            "serve",
            "gateway",
        ]
        .map(String::from),
    );
    let running = Running::start(&home, &args);
    let address = running.address("gateway");
    let ready = get(address, "/ready", &[]);
    assert_eq!(ready.status, 503, "{}", ready.body);
    let body: serde_json::Value = serde_json::from_str(&ready.body).unwrap();
    assert_eq!(body["reason"], "sts_unreachable", "{body}");
    let revocation = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == "revocation")
        .cloned()
        .unwrap();
    assert_eq!(revocation["ok"], true, "{body}");
    let metrics = get(address, "/metrics", &[]);
    assert_eq!(metrics.status, 200);
    for name in [
        "caracal_gateway_sts_circuit_state 0",
        "caracal_gateway_revocation_snapshot_age_seconds",
        "caracal_gateway_revocation_stream_age_seconds",
        "caracal_gateway_revocation_snapshot_fresh 1",
        "caracal_gateway_revocation_propagation_lag_seconds",
        "caracal_gateway_requests_total",
    ] {
        assert!(
            metrics.body.contains(name),
            "{name} missing:\n{}",
            metrics.body
        );
    }
    let (status, _, _) = running.terminate();
    assert!(status.success());
}

#[test]
fn serve_runs_only_the_chosen_roles() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.extend(["serve", "sts", "gateway", "sts"].map(String::from));
    let running = Running::start(&home, &args);
    assert_eq!(
        running.addresses.keys().collect::<Vec<_>>(),
        ["gateway", "sts"]
    );
    assert_eq!(wait_ready(running.address("sts")).status, 200);
    let (status, _, _) = running.terminate();
    assert!(status.success());
}

#[test]
fn the_sts_benchmark_runs_every_case() {
    let (_parent, home) = fresh_home();
    let output = util::run(util::caracal(&home).args(["bench", "sts", "--quick"]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for case in [
        "raw ES256 sign",
        "bootstrap mint (use=session)",
        "delegated mint (use=gateway)",
        "delegated mint, 128 in flight",
        "delegated at half peak (open loop)",
        "disk fdatasync",
    ] {
        assert!(stdout.contains(case), "missing `{case}` in\n{stdout}");
    }
}

#[test]
fn the_gateway_benchmark_runs_every_case() {
    let (_parent, home) = fresh_home();
    let output = util::run(util::caracal(&home).args(["bench", "gateway", "--quick"]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for case in [
        "direct upstream",
        "delegated mint alone",
        "governed (mint + gateway)",
    ] {
        assert!(stdout.contains(case), "missing `{case}` in\n{stdout}");
    }
}

#[test]
fn the_hot_path_benchmark_runs_every_case() {
    let (_parent, home) = fresh_home();
    let output = util::run(util::caracal(&home).args(["bench", "hotpath", "--quick"]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for case in [
        "policy decision (200 grants)",
        "ES256 sign",
        "ES256 verify",
        "revocation lookup (300k marks)",
    ] {
        assert!(stdout.contains(case), "missing `{case}` in\n{stdout}");
    }
}

/// nginx (and promtool) by the project's script, when missing.
fn install_nginx() {
    let installed = std::process::Command::new("bash")
        .arg(util::repo_root().join("scripts/install-deps.sh"))
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "installing nginx failed:\n{}",
        String::from_utf8_lossy(&installed.stderr)
    );
}

/// The processes whose parent is `pid`: (pid, command name).
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; the name may hold spaces, so split after its last `)`.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.get(1).and_then(|ppid| ppid.parse::<u32>().ok()) == Some(pid) {
            let child = stat[..open].trim().parse().unwrap();
            children.push((child, stat[open + 1..close].to_owned()));
        }
    }
    children
}

/// SIGTERM to a running `caracal bench` stops it with exit 1 and takes down the stack and
/// nginx it started: nothing is left running.
#[test]
fn an_interrupted_benchmark_stops_the_processes_it_started() {
    install_nginx();
    let (_parent, home) = fresh_home();
    let mut bench = util::caracal(&home)
        .args(["bench", "--requests", "10000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let started = loop {
        let children = children_of(bench.id());
        if children.iter().any(|(_, name)| name == "nginx")
            && children.iter().any(|(_, name)| name.starts_with("caracal"))
        {
            break children;
        }
        assert!(std::time::Instant::now() < deadline, "{children:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let killed = std::process::Command::new("kill")
        .arg(bench.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let status = bench.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(bench.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    for (pid, name) in started {
        let gone = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |stat| stat.contains(") Z "));
        assert!(gone, "{name} ({pid}) outlived the benchmark");
    }
}

/// `caracal bench --quick`: the stack, nginx (installed by the project's script) and the
/// loopback upstream measured in one run over HTTP; every case reported, the JSON results
/// written, and the audit check passing (every governed call's events stored, none lost).
#[test]
fn the_governed_benchmark_runs_beside_nginx_and_keeps_the_audit_lossless() {
    install_nginx();
    let (parent, home) = fresh_home();
    let out = parent.path().join("results.json");
    let output = util::run(
        util::caracal(&home)
            .args(["bench", "--quick", "--out"])
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let names: Vec<(&str, Option<u64>)> = results["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| (case["name"].as_str().unwrap(), case["connections"].as_u64()))
        .collect();
    assert_eq!(
        names,
        [
            ("direct upstream", Some(32)),
            ("direct upstream", Some(128)),
            ("through nginx", Some(32)),
            ("through nginx", Some(128)),
            ("governed, closed loop", Some(32)),
            ("governed, closed loop", Some(128)),
            ("governed, open loop ½ peak", None)
        ]
    );
    // Each case's peak is its best rate over the connection counts, and the ratios use them.
    let best = |name: &str| {
        results["cases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|case| case["name"] == name)
            .map(|case| case["rate"].as_f64().unwrap())
            .fold(0.0, f64::max)
    };
    assert_eq!(
        results["peaks"]["governed"].as_f64(),
        Some(best("governed, closed loop"))
    );
    assert_eq!(
        results["peaks"]["nginx"].as_f64(),
        Some(best("through nginx"))
    );
    let ratio = results["ratios"]["governed_over_nginx"].as_f64().unwrap();
    assert!((ratio - best("governed, closed loop") / best("through nginx")).abs() < 1e-9);
    for case in results["cases"].as_array().unwrap() {
        assert!(case["rate"].as_f64().unwrap() > 0.0, "{case}");
        assert!(case["p99_ms"].as_f64().unwrap() > 0.0, "{case}");
    }
    assert_eq!(results["audit"]["lossless"], true, "{results}");
    assert!(
        results["audit"]["events_per_governed_call"]
            .as_f64()
            .unwrap()
            >= 1.0
    );
    assert!(results["ratios"]["governed_over_nginx"].as_f64().unwrap() > 0.0);
    assert!(results["memory_kib"]["idle_rss"].as_u64().unwrap() > 0);
    // The disk's fsync latency, measured idle and beside the open loop.
    assert_eq!(results["fdatasync"]["idle"]["samples"], 100, "{results}");
    assert!(
        results["fdatasync"]["open_loop"]["samples"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        results["fdatasync"]["open_loop"]["p99_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(stdout.contains("governed / nginx"), "{stdout}");
    assert!(stdout.contains("disk fdatasync"), "{stdout}");
}
