"""Drives a running Caracal with the published admin client (caracalai-admin 1.0), unmodified.

Reads CARACAL_API_URL and CARACAL_ADMIN_TOKEN; prints one JSON object of what it observed.
Any exception fails the run (non-zero exit), which fails the Rust test that started it.
"""
import json
import os

import time

from caracalai_admin import (
    AdminApiError,
    AdminClient,
    ResourceGrant,
    ensure_api_key_provider,
    ensure_application,
    ensure_grants,
    ensure_resource,
)

client = AdminClient(api_url=os.environ["CARACAL_API_URL"], admin_token=os.environ["CARACAL_ADMIN_TOKEN"])
seen = {}

zone = client.zones.create({"name": "Interop Zone"})
zone_id = zone["id"]
seen["zone_slug"] = zone["slug"]
seen["zone_listed"] = any(z["id"] == zone_id for z in client.zones.list())
seen["zone_get"] = client.zones.get(zone_id)["name"]
seen["zone_patched"] = client.zones.patch(zone_id, {"name": "Interop"})["name"]
seen["dcr_status"] = client.zones.dcr_status(zone_id)

first = ensure_application(client, zone_id, name="billing-agent", traits=["tier:gold"], client_secret="a" * 40)
again = ensure_application(client, zone_id, name="billing-agent", traits=["tier:silver"], client_secret="b" * 40)
seen["ensure_idempotent"] = first == again
apps = client.applications.list(zone_id)
seen["app_names"] = sorted(app["name"] for app in apps)
seen["app_traits"] = client.applications.get(zone_id, first)["traits"]
rotated = client.applications.rotate_secret(zone_id, first)
seen["rotated_prefix"] = rotated["client_secret"][:3]

# More applications, listed through the client's draining list() (it follows next_cursor).
for n in range(3):
    client.applications.create(zone_id, {"name": f"worker-{n}", "registration_method": "managed"})
seen["app_count"] = len(client.applications.list(zone_id))

# An api_key provider and a resource bound to it, converged twice (the second run changes
# nothing but the provider's public placement).
provider_id = ensure_api_key_provider(
    client, zone_id, name="crm key", identifier="provider://crm",
    public_config={"header": "x-api-key"}, api_key="sk-" + "k" * 30,
)
again_provider = ensure_api_key_provider(
    client, zone_id, name="crm key", identifier="provider://crm",
    public_config={"header": "authorization"},
)
provider = client.providers.get(zone_id, provider_id)
seen["provider"] = {
    "same": provider_id == again_provider,
    "config": provider["config_json"],
    "secret_keys": provider["secret_config_keys"],
    "listed_without_secret": "sk-" not in json.dumps(client.providers.list(zone_id)),
}
operations = [{"method": "GET", "path": "/contacts", "scope": "crm:read"}]
resource = ensure_resource(
    client, zone_id, name="CRM", identifier="resource://crm", scopes=["crm:read", "crm:write"],
    upstream_url="http://127.0.0.1:9/api", credential_provider_id=provider_id, operations=operations,
)
steady = ensure_resource(
    client, zone_id, name="CRM", identifier="resource://crm", scopes=["crm:write", "crm:read"],
    upstream_url="http://127.0.0.1:9/api", credential_provider_id=provider_id, operations=operations,
)
drifted = ensure_resource(
    client, zone_id, name="CRM", identifier="resource://crm", scopes=["crm:read"],
    upstream_url="http://127.0.0.1:9/api", credential_provider_id=provider_id, operations=operations,
)
seen["resource"] = {
    "same": resource["id"] == steady["id"] == drifted["id"],
    "scopes": drifted["scopes"],
    "enforcement": drifted["operation_enforcement"],
}

# Grants: the client authors the data document, creates the policy and set, activates; the
# activation is then polled until an STS replica acknowledges it as loaded.
grants = [ResourceGrant(application_id=first, resource_identifier="resource://crm", scopes=["crm:read"])]
ensure_grants(client, zone_id, grants=grants)
policy_set = next(s for s in client.policy_sets.list(zone_id) if s["name"] == "application-grant-policy")
deadline = time.monotonic() + 20
status = client.policy_sets.activation_status(zone_id, policy_set["id"])
while status["propagation_status"] != "loaded" and time.monotonic() < deadline:
    time.sleep(0.1)
    status = client.policy_sets.activation_status(zone_id, policy_set["id"])
versions_before = len(client.policy_sets.list_versions(zone_id, policy_set["id"]))
ensure_grants(client, zone_id, grants=grants)  # steady state: nothing new
simulated = client.policy_sets.simulate(
    zone_id,
    policy_set["id"],
    status["version_id"],
    {"flow": "mint", "application_id": first, "resource": "resource://crm", "scopes": ["crm:read"],
     "labels": [first], "edge_scopes": ["crm:read"], "session": True},
)
seen["grants"] = {
    "propagation": status["propagation_status"],
    "steady": len(client.policy_sets.list_versions(zone_id, policy_set["id"])) == versions_before,
    "simulated": simulated["result"]["decision"],
}

# The read views and the subject kill switch, as the client calls them. Admin changes reach
# the ledger through the outbox, asynchronously.
seen["authority_records"] = client.authority_records.list(zone_id, {"kind": "application", "limit": 10})
seen["sessions"] = client.sessions.list(zone_id, {"status": "active", "lifecycle": "task"})
deadline = time.monotonic() + 20
while True:
    changes = client.admin_audit.list(zone_id, {"entity_type": "application"})
    actions = sorted({change["action"] for change in changes})
    if "application.create" in actions or time.monotonic() > deadline:
        break
    time.sleep(0.1)
seen["admin_audit"] = {
    "actions": actions,
    "actors": sorted({change["actor_id"].split(":")[0] for change in changes}),
    "entities": all(change["entity_type"] == "application" for change in changes),
}
# Subject issuers, delegated grants and workloads through the client's own calls.
issuer = client.subject_issuers.create(zone_id, {
    "issuer": "https://login.example.com", "jwks_url": "https://login.example.com/jwks", "audience": "caracal",
})
client.subject_issuers.patch(zone_id, issuer["id"], {"audience": "caracal-2"})
seen["issuers"] = [[i["issuer"], i["audience"]] for i in client.subject_issuers.list(zone_id)]
client.subject_issuers.delete(zone_id, issuer["id"])
seen["issuers_after_delete"] = len(client.subject_issuers.list(zone_id))
grant = client.grants.create(zone_id, {
    "application_id": first, "user_id": "alice", "resource_id": resource["id"], "scopes": ["crm:read"],
})
seen["grants_of_alice"] = [g["scopes"] for g in client.grants.list(zone_id, {"subject_id": "alice", "scopes": ["crm:read"]})]
client.grants.revoke(zone_id, grant["id"])
seen["grant_after_revoke"] = client.grants.get(zone_id, grant["id"])["status"]
workload = client.workloads.create(zone_id, {"name": "nightly"})
binding = {"env": "CRM_TOKEN", "resource": "resource://crm", "scopes": ["crm:read"]}
client.workloads.update(zone_id, workload["id"], {"bindings": [binding]})
stored = client.workloads.get(zone_id, workload["id"])
rotated_workload = client.workloads.rotate_secret(zone_id, workload["id"])
seen["workload"] = {
    "secret_prefix": workload["secret"][:3],
    "bindings": [b["env"] for b in stored["bindings"]],
    "secret_hidden": "secret" not in stored and "_secret_hash" not in json.dumps(client.workloads.list(zone_id)),
    "reveal_is_current": client.workloads.get_secret(zone_id, workload["id"])["secret"] == rotated_workload["secret"],
}
client.workloads.delete(zone_id, workload["id"])
seen["workloads_after_delete"] = len(client.workloads.list(zone_id))

request_id = next(change["request_id"] for change in changes if change["action"] == "application.create")
seen["by_request"] = {
    "events": [event["event_type"] for event in client.audit.by_request(zone_id, request_id)["items"]],
    "explained": client.audit.explain(zone_id, request_id)["final_decision"],
}
stored_connection = client.provider_connections.create(zone_id, {
    "provider_id": provider_id, "subject_id": "alice", "access_token": "at-" + "t" * 20,
    "refresh_token": "rt-" + "r" * 20, "expires_at": "2030-01-01T00:00:00Z",
})
revoked_connection = client.provider_connections.revoke(zone_id, {"provider_id": provider_id, "subject_id": "alice"})
seen["connection"] = {
    "stored": [stored_connection["status"], stored_connection["has_refresh_token"], "at-" in json.dumps(stored_connection)],
    "revoked": revoked_connection["status"],
}
killed = client.subjects.revoke(zone_id, {"subject_id": first, "reason": "interop"})
seen["subject_revoke"] = {key: killed[key] for key in ("subject_id", "revoked_records", "terminated_sessions")}

errors = {}
for label, call in {
    "unknown_field": lambda: client.zones.create({"name": "x", "colour": "red"}),
    "duplicate_app": lambda: client.applications.create(
        zone_id, {"name": "BILLING-AGENT", "registration_method": "managed"}
    ),
    "short_secret": lambda: client.applications.patch(zone_id, first, {"client_secret": "short"}),
    "missing_app": lambda: client.applications.get(zone_id, "no-such-app"),
    "reveal": lambda: client.applications.get_client_secret(zone_id, first),
    "resource_without_provider": lambda: client.resources.create(
        zone_id, {"name": "bare", "scopes": ["x:read"], "upstream_url": "http://127.0.0.1:9"}
    ),
    "provider_in_use": lambda: client.providers.delete(zone_id, provider_id),
    "invalid_policy": lambda: client.policies.create(zone_id, {"name": "bad", "content": "package x"}),
    "oauth_authorize": lambda: client.provider_connections.authorize_oauth(zone_id, {"provider_id": provider_id}),
    "revoke_unknown_connection": lambda: client.provider_connections.revoke(zone_id, {"provider_id": "nope"}),
    "issuer_not_https": lambda: client.subject_issuers.create(
        zone_id, {"issuer": "http://login.example.com", "jwks_url": "https://x.example/jwks", "audience": "a"}
    ),
    "grant_beyond_resource": lambda: client.grants.create(
        zone_id, {"application_id": first, "user_id": "bob", "resource_id": resource["id"], "scopes": ["crm:admin"]}
    ),
    "workload_sets_path": lambda: client.workloads.update(
        zone_id, client.workloads.create(zone_id, {"name": "bad"})["id"],
        {"bindings": [{"env": "LD_PRELOAD", "resource": "resource://crm"}]},
    ),
}.items():
    try:
        call()
        errors[label] = None
    except AdminApiError as error:
        errors[label] = [error.status, error.code]
seen["errors"] = errors

bad_token = AdminClient(api_url=os.environ["CARACAL_API_URL"], admin_token="cat_" + "A" * 43, retries=0)
try:
    bad_token.zones.list()
    seen["bad_token"] = None
except AdminApiError as error:
    seen["bad_token"] = [error.status, error.code]

client.applications.delete(zone_id, first)
seen["after_delete"] = sorted(app["name"] for app in client.applications.list(zone_id))

# Dynamic client registration: the zone opts in, a short-lived client is registered, and
# turning registration off with it live needs a shutdown choice.
client.zones.patch(zone_id, {"dcr_enabled": True})
registered = client.applications.dcr(zone_id, {"name": "ephemeral", "expires_in": 600})
seen["dcr"] = [registered["registration_method"], registered["client_secret"][:3]]
seen["dcr_status_after"] = client.zones.dcr_status(zone_id)
try:
    client.zones.patch(zone_id, {"dcr_enabled": False})
    seen["dcr_off"] = None
except AdminApiError as error:
    seen["dcr_off"] = [error.status, error.code]
seen["dcr_revoked"] = client.zones.patch(zone_id, {"dcr_enabled": False, "dcr_shutdown": "revoke_live"})["dcr_enabled"]
client.zones.delete(zone_id)
seen["zone_after_delete"] = any(z["id"] == zone_id for z in client.zones.list())

print(json.dumps(seen))
