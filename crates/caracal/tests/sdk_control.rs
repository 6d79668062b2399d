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

use serde_json::json;
use util::{Running, free_ports, fresh_home, wait_ready};

#[test]
fn the_published_control_client_runs_catalog_commands_with_one_mandate_each() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.extend(["up", "--control-enabled", "true"].map(String::from));
    let running = Running::start(&home, &args);
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let sts = running.address("sts");
    let seen = running.run_sdk_client(
        "control_client.py",
        &[
            ("CARACAL_API_URL", format!("http://{api}")),
            ("CARACAL_STS_URL", format!("http://{sts}")),
            ("CARACAL_ADMIN_TOKEN", token.trim().to_owned()),
        ],
    );

    assert_eq!(seen["created_name"], "reporting");
    assert_eq!(seen["listed"], json!(["automation", "reporting"]));
    assert_eq!(seen["got"], true);
    assert_eq!(seen["admin_sees"], "reporting");
    assert_eq!(
        seen["ensured"],
        json!([["unchanged", true], ["updated", true]])
    );
    assert_eq!(seen["ensured_traits"], json!(["batch"]));
    assert_eq!(
        seen["state"],
        json!([["unchanged", "create"], ["unchanged", "created"], true])
    );
    assert_eq!(
        seen["policies"],
        json!(["created", "created", "unchanged", true, true])
    );
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
