//! The published admin client (`caracalai-admin` 1.0, Python) drives a running `caracal up`
//! unmodified: zones, applications (`ensure_application`), providers and resources
//! (`ensure_api_key_provider`, `ensure_resource`), grants (`ensure_grants`, activation status
//! polled until the STS loaded it, simulate), pagination and error codes.
//! The client is installed by `scripts/sdk-venv.sh` into `target/sdk-venv`.

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
fn the_published_admin_client_manages_zones_applications_providers_resources_and_grants() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let seen = running.run_sdk_client(
        "admin_client.py",
        &[
            ("CARACAL_API_URL", format!("http://{api}")),
            ("CARACAL_ADMIN_TOKEN", token.trim().to_owned()),
        ],
    );

    assert_eq!(seen["zone_slug"], "interop-zone");
    assert_eq!(seen["zone_listed"], true);
    assert_eq!(seen["zone_get"], "Interop Zone");
    assert_eq!(seen["zone_patched"], "Interop");
    assert_eq!(
        seen["dcr_status"],
        json!({"dcr_enabled": false, "live_dcr_applications": 0})
    );
    assert_eq!(seen["ensure_idempotent"], true);
    assert_eq!(seen["app_names"], json!(["billing-agent"]));
    assert_eq!(seen["app_traits"], json!(["tier:silver"]));
    assert_eq!(seen["rotated_prefix"], "cs_");
    assert_eq!(seen["app_count"], 4);
    assert_eq!(
        seen["errors"],
        json!({
            "unknown_field": [400, "invalid_body"],
            "duplicate_app": [409, "application_name_conflict"],
            "short_secret": [400, "invalid_body"],
            "missing_app": [404, "not_found"],
            "reveal": [404, "client_secret_not_stored"],
            "resource_without_provider": [400, "credential_provider_required"],
            "provider_in_use": [409, "provider_in_use"],
            "invalid_policy": [422, "invalid_rego"],
            "oauth_authorize": [400, "invalid_request"],
            "revoke_unknown_connection": [404, "not_found"],
            "issuer_not_https": [400, "invalid_body"],
            "grant_beyond_resource": [400, "invalid_body"],
            "workload_sets_path": [400, "invalid_body"],
        })
    );
    assert_eq!(
        seen["provider"],
        json!({"same": true, "config": {"header": "authorization"}, "secret_keys": ["api_key"],
               "listed_without_secret": true})
    );
    assert_eq!(
        seen["resource"],
        json!({"same": true, "scopes": ["crm:read"], "enforcement": "enforced"})
    );
    assert_eq!(
        seen["grants"],
        json!({"propagation": "loaded", "steady": true, "simulated": "allow"})
    );
    assert_eq!(seen["bad_token"], json!([401, "invalid_admin_token"]));
    assert_eq!(
        seen["issuers"],
        json!([["https://login.example.com", "caracal-2"]])
    );
    assert_eq!(seen["issuers_after_delete"], 0);
    assert_eq!(seen["grants_of_alice"], json!([["crm:read"]]));
    assert_eq!(seen["grant_after_revoke"], "revoked");
    assert_eq!(
        seen["workload"],
        json!({"secret_prefix": "ws_", "bindings": ["CRM_TOKEN"], "secret_hidden": true, "reveal_is_current": true})
    );
    assert_eq!(seen["workloads_after_delete"], 0);
    assert_eq!(
        seen["by_request"],
        json!({"events": ["admin.application.create"], "explained": "allow"})
    );
    assert_eq!(
        seen["connection"],
        json!({"stored": ["connected", true, false], "revoked": "revoked"})
    );
    assert_eq!(seen["authority_records"], json!([]));
    assert_eq!(seen["sessions"], json!([]));
    assert_eq!(
        seen["admin_audit"],
        json!({"actions": ["application.create", "application.rotate_secret", "application.update"], "actors": ["admin"], "entities": true}),
        "{seen}"
    );
    assert_eq!(
        seen["subject_revoke"]["revoked_records"], 0,
        "{}",
        seen["subject_revoke"]
    );
    assert_eq!(
        seen["after_delete"],
        json!(["worker-0", "worker-1", "worker-2"])
    );
    assert_eq!(seen["zone_after_delete"], false);
    assert_eq!(seen["dcr"], json!(["dcr", "cs_"]));
    assert_eq!(
        seen["dcr_status_after"],
        json!({"dcr_enabled": true, "live_dcr_applications": 1})
    );
    assert_eq!(seen["dcr_off"], json!([409, "dcr_shutdown_required"]));
    assert_eq!(seen["dcr_revoked"], false);
}
