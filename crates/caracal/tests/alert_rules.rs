//! The shipped alert rules (`deploy/prometheus/caracal-rules.yml`): `promtool` accepts them and
//! their unit tests (each alert made to fire) pass; every alert has a runbook that names our
//! commands; and every metric a rule reads is one a running `caracal up` exposes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::collections::BTreeSet;
use std::process::Command;

use util::{ROLES, Running, free_ports, fresh_home, get, repo_root, wait_ready};

fn rules_text() -> String {
    std::fs::read_to_string(repo_root().join("deploy/prometheus/caracal-rules.yml")).unwrap()
}

/// `(alert, expression)` of every rule, read line by line (the file's own layout).
fn rules() -> Vec<(String, String)> {
    let text = rules_text();
    let mut rules = Vec::new();
    let mut alert = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert: ") {
            alert = Some(name.to_owned());
        } else if let (Some(expr), Some(name)) = (line.strip_prefix("expr: "), alert.take()) {
            rules.push((name, serde_json::from_str::<String>(expr).unwrap()));
        }
    }
    rules
}

/// `promtool`, installed by the project's script when missing.
fn promtool() -> Command {
    let installed = Command::new("bash")
        .arg(repo_root().join("scripts/install-deps.sh"))
        .output()
        .expect("bash runs");
    assert!(
        installed.status.success(),
        "installing promtool failed:\n{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    let mut command = Command::new("promtool");
    command.current_dir(repo_root().join("deploy/prometheus"));
    command
}

#[test]
fn promtool_accepts_the_rules_and_every_alert_fires_in_its_unit_test() {
    let checked = promtool()
        .args(["check", "rules", "caracal-rules.yml"])
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let tested = promtool()
        .args(["test", "rules", "caracal-rules.test.yml"])
        .output()
        .unwrap();
    assert!(
        tested.status.success(),
        "{}{}",
        String::from_utf8_lossy(&tested.stdout),
        String::from_utf8_lossy(&tested.stderr)
    );
    // Every alert has a test case that makes it fire.
    let tests =
        std::fs::read_to_string(repo_root().join("deploy/prometheus/caracal-rules.test.yml"))
            .unwrap();
    for (alert, _) in rules() {
        assert!(
            tests.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - "
            )),
            "{alert} has no firing test case"
        );
    }
}

#[test]
fn every_alert_has_a_runbook_naming_our_commands_and_the_catalogue_is_complete() {
    let rules = rules();
    let names: BTreeSet<&str> = rules.iter().map(|(name, _)| name.as_str()).collect();
    for required in [
        "CaracalAuditTamperDetected",
        "CaracalGatewayRevocationSnapshotStale",
        "CaracalGatewayRevocationPropagationLag",
        "CaracalGatewaySTSCircuitOpen",
        "CaracalAuditDLQGrowth",
        "CaracalGatewayAuditReplayBacklogOld",
        "CaracalSTSPolicyBundleStale",
        "CaracalOutboxDeadMessages",
        "CaracalAuditEvidenceLost",
        "CaracalStorePoolSaturation",
        "CaracalReadinessFlapping",
    ] {
        assert!(names.contains(required), "{required} is missing");
    }
    let text = rules_text();
    for (alert, _) in &rules {
        assert!(
            text.contains(&format!("runbook_url: docs/runbooks/{alert}.md")),
            "{alert} has no runbook_url"
        );
        let path = repo_root().join(format!("docs/runbooks/{alert}.md"));
        let runbook = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("{} is missing", path.display()));
        assert!(
            runbook.starts_with(&format!("# {alert}")),
            "{alert}: the runbook's title"
        );
        assert!(
            runbook.contains("`caracal "),
            "{alert}: the runbook names no caracal command"
        );
    }
}

/// The metric names a running process exposes, from its sample lines.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The metric names an expression reads: literal names, and `caracal_[a-z]+_<suffix>`
/// patterns as (`caracal_`, `_<suffix>`).
fn referenced(expr: &str) -> Vec<(String, Option<String>)> {
    let word = |text: &str| {
        text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(text.len())
    };
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("caracal_") {
        let tail = &rest[at..];
        let end = word(tail);
        let name = &tail[..end];
        match tail[end..].strip_prefix("[a-z]+") {
            Some(after) => {
                let suffix = &after[..word(after)];
                names.push((name.to_owned(), Some(suffix.to_owned())));
                rest = &after[suffix.len()..];
            }
            None => {
                names.push((name.to_owned(), None));
                rest = &tail[end..];
            }
        }
    }
    names
}

#[test]
fn every_metric_a_rule_reads_is_exposed_by_a_running_stack() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let mut names = BTreeSet::new();
    for role in ROLES {
        let address = running.address(role);
        assert_eq!(wait_ready(address).status, 200, "{role}");
        names.extend(exposed(&get(address, "/metrics", &[]).body));
    }
    let (status, _, _) = running.terminate();
    assert!(status.success());
    for (alert, expr) in rules() {
        for (name, suffix) in referenced(&expr) {
            let found = match &suffix {
                None => names.contains(&name),
                Some(suffix) => names.iter().any(|exposed| {
                    exposed.starts_with(&name) && exposed.ends_with(suffix.as_str())
                }),
            };
            assert!(
                found,
                "{alert} reads `{name}…{}`, which no role exposes",
                suffix.clone().unwrap_or_default()
            );
        }
    }
}
