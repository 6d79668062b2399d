//! The published `ControlClient` (`caracalai-admin` 1.0, Python) drives a running `caracal up`
//! with control invocations turned on, unmodified: one STS mint per call with a control key,
//! then `POST /v1/control/invoke` runs the command through the admin API's own routes. The
//! client is installed by `scripts/sdk-venv.sh` into `target/sdk-venv`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::process::Command;

use serde_json::{Value, json};
use util::{Running, free_ports, fresh_home, repo_root, sdk_python, wait_ready};

#[test]
fn the_published_control_client_runs_catalog_commands_with_one_mandate_each() {
    let python = sdk_python();
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.extend([
        "up".to_owned(),
        "--control-enabled".to_owned(),
        "true".to_owned(),
    ]);
    let running = Running::start(&home, &args);
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();

    let output = Command::new(python)
        .arg(repo_root().join("crates/caracal/tests/interop/control_client.py"))
        .env("CARACAL_API_URL", format!("http://{api}"))
        .env(
            "CARACAL_STS_URL",
            format!("http://{}", running.address("sts")),
        )
        .env("CARACAL_ADMIN_TOKEN", token.trim())
        .output()
        .expect("python runs");
    let (status, stdout, stderr) = (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    let (exit, _, server_log) = running.terminate();
    assert!(
        status.success(),
        "client failed:\n{stderr}\nserver:\n{server_log}"
    );
    assert!(exit.success(), "{server_log}");
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();

    assert_eq!(seen["created_name"], "reporting");
    assert_eq!(seen["listed"], json!(["automation", "reporting"]));
    assert_eq!(seen["got"], true);
    assert_eq!(seen["admin_sees"], "reporting");
    assert_eq!(
        seen["errors"],
        json!({
            "scope_not_held": ["token", 403, null, true],
            "scope_too_narrow": ["invoke", 403, "denied", true],
            "unsupported": ["invoke", 501, "unsupported", false],
            "missing_id": ["invoke", 400, "invalid", true],
            "not_found": ["invoke", 404, "not_found", true],
            "control_key_guarded": ["invoke", 403, "denied", true],
        })
    );
}
