//! Distributed mode: replicas of the same roles sharing PostgreSQL and Redis. PostgreSQL and
//! Redis are required; outside CI `CARACAL_TEST_SKIP_EXTERNAL=1` skips (refused with `CI=true`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use util::{
    Running, Schema, csrf_of, external_backends, form, free_ports, fresh_home, sign_in, wait_ready,
};

const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const REDIS_URL: &str = "redis://127.0.0.1:6379";

#[test]
fn two_replicas_share_postgres_and_redis() {
    if !external_backends() {
        return;
    }
    let schema = Schema::fresh();
    let stream_key = "5a".repeat(32);
    let args = || {
        let mut args = free_ports();
        args.extend(
            [
                "--store",
                POSTGRES_URL,
                "--store-schema",
                &schema.0,
                "--bus",
                REDIS_URL,
                "--stream-key",
                &stream_key,
                "serve",
                "api",
                "sts",
                "gateway",
                "console",
            ]
            .map(String::from),
        );
        args
    };

    let (_parent_a, home_a) = fresh_home();
    let first = Running::start(&home_a, &args());
    for role in ["api", "sts", "gateway", "console"] {
        let ready = wait_ready(first.address(role));
        assert_eq!(ready.status, 200, "replica a {role}: {}", ready.body);
        assert!(
            ready.body.contains(r#"{"name":"bus","ok":true"#),
            "{}",
            ready.body
        );
    }

    // Every replica holds the deployment's KEK; the operator copies it (README, "Distributed").
    let (_parent_b, home_b) = fresh_home();
    std::fs::create_dir(&home_b).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&home_b, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(home_a.join("kek"), home_b.join("kek")).unwrap();
    let second = Running::start(&home_b, &args());
    for role in ["api", "sts", "gateway", "console"] {
        let ready = wait_ready(second.address(role));
        assert_eq!(ready.status, 200, "replica b {role}: {}", ready.body);
    }
    assert!(
        !home_b.join("admin-token").exists(),
        "the deployment's bootstrap token is minted once"
    );

    // A console session signed in at one replica is served by the other, and signing out at
    // the other ends it at both.
    let token = std::fs::read_to_string(home_a.join("admin-token")).unwrap();
    let (console_a, console_b) = (first.address("console"), second.address("console"));
    let cookie = sign_in(console_a, &token);
    let page = util::request(console_b, "GET", "/zones", &[("cookie", &cookie)], "");
    assert_eq!(page.status, 200, "{}", page.body);
    let signed_out = form(
        console_b,
        "/sign-out",
        &cookie,
        &format!("csrf={}", csrf_of(&page.body)),
    );
    assert_eq!(signed_out.headers["location"], "/sign-in");
    let page = util::request(console_a, "GET", "/zones", &[("cookie", &cookie)], "");
    assert_eq!(
        (page.status, page.headers["location"].as_str()),
        (303, "/sign-in")
    );

    for replica in [first, second] {
        let (status, _, stderr) = replica.terminate();
        assert!(status.success(), "{stderr}");
    }
}

#[test]
fn a_replica_without_the_deployment_kek_refuses_to_start() {
    if !external_backends() {
        return;
    }
    let schema = Schema::fresh();
    let args = || {
        let mut args = free_ports();
        args.extend(
            [
                "--store",
                POSTGRES_URL,
                "--store-schema",
                &schema.0,
                "--bus",
                REDIS_URL,
                "serve",
                "sts",
            ]
            .map(String::from),
        );
        args
    };
    let (_parent_a, home_a) = fresh_home();
    let (status, _, _) = Running::start(&home_a, &args()).terminate();
    assert!(status.success());
    let (_parent_b, home_b) = fresh_home();
    let output = util::run(util::caracal(&home_b).args(args()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the KEK file is missing but the store was initialised with KEK"),
        "{stderr}"
    );
}

#[test]
fn the_backend_benchmark_runs_every_case() {
    if !external_backends() {
        return;
    }
    let (_parent, home) = fresh_home();
    let output = util::run(util::caracal(&home).args(["bench", "backends", "--quick"]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for case in [
        "stream append, 1 producer",
        "stream append, 32 producers",
        "stream append, batches of 100",
        "stream consume",
        "outbox drain",
        "each its own write",
        "AuthorityWriter",
        "AuthorityWriter over separate writes",
    ] {
        assert!(stdout.contains(case), "missing `{case}` in\n{stdout}");
    }
}

#[test]
fn the_coordinator_benchmark_runs_every_case() {
    if !external_backends() {
        return;
    }
    let (_parent, home) = fresh_home();
    let output = util::run(util::caracal(&home).args(["bench", "coordinator", "--quick"]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for case in [
        "sessions terminated",
        "edges revoked",
        "messages published",
        "commit + every message published, ms",
    ] {
        assert!(stdout.contains(case), "missing `{case}` in\n{stdout}");
    }
    // 1 + 10 + 100 sessions at --quick, each with its revoke message, plus the epoch.
    assert!(stdout.contains("111.0"), "{stdout}");
}

#[test]
fn the_revocation_benchmark_measures_both_replicas() {
    if !external_backends() {
        return;
    }
    let (_parent, home) = fresh_home();
    let output = util::run(util::caracal(&home).args(["bench", "revocation", "--quick"]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for row in ["gateway-a", "gateway-b", "both replicas"] {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(row))
            .unwrap_or_else(|| panic!("no `{row}` row in\n{stdout}"));
        let runs: usize = line
            .split_whitespace()
            .rev()
            .nth(3)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(runs, 3, "{line}");
    }
}
