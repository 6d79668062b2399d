"""Drives a running Caracal's control invocations with the published ControlClient
(caracalai-admin 1.0), unmodified: a control key created through the AdminClient mints one
token per call at the STS and runs catalog commands at POST /v1/control/invoke.

Reads CARACAL_API_URL, CARACAL_STS_URL and CARACAL_ADMIN_TOKEN; prints one JSON object of what
it observed. Any unexpected exception fails the run, which fails the Rust test that started it.
"""
import json
import os

from caracalai_admin import AdminClient
from caracalai_admin.control import ControlClient, ControlClientError

api_url = os.environ["CARACAL_API_URL"]
admin = AdminClient(api_url=api_url, admin_token=os.environ["CARACAL_ADMIN_TOKEN"])
seen = {}

zone_id = admin.zones.create({"name": "Control Interop"})["id"]
key = admin.applications.create(zone_id, {
    "name": "automation",
    "registration_method": "managed",
    "traits": [
        "control:invoke",
        "control:scope:control:app:read",
        "control:scope:control:app:write",
        "control:scope:control:policy:read",
        "control:scope:control:policy:write",
        "control:scope:control:policy-set:write",
        "control:max-ttl:120",
    ],
})
control = ControlClient(
    sts_url=os.environ["CARACAL_STS_URL"],
    control_url=api_url,
    audience="caracal-control",
    application_id=key["id"],
    client_secret=key["client_secret"],
    authorized_by="interop@example.com",
    request_id="control-interop-1",
)

created = control.invoke(
    "app", "create", {"name": "reporting", "registration_method": "managed"}, ["control:app:write"]
)
seen["created_name"] = created["name"]
listed = control.invoke("app", "list", {"limit": 10}, ["control:app:read"])
seen["listed"] = sorted(app["name"] for app in listed["items"])
seen["got"] = control.invoke("app", "get", {"id": created["id"]}, ["control:app:read"])["id"] == created["id"]
# What the admin API holds is what the control command wrote.
seen["admin_sees"] = admin.applications.get(zone_id, created["id"])["name"]
# ensure: the same object found by its name, changed only where it differs.
ensured = [
    control.invoke("ensure", "application", spec, ["control:app:write"])
    for spec in (
        {"name": "reporting", "registration_method": "managed"},
        {"name": "reporting", "traits": ["batch"]},
    )
]
seen["ensured"] = [[result["action"], result["object"]["id"] == created["id"]] for result in ensured]
seen["ensured_traits"] = admin.applications.get(zone_id, created["id"])["traits"]
# state: a document of objects planned, applied, then verified in sync.
document = {"objects": [
    {"kind": "application", "spec": {"name": "reporting", "traits": ["batch"]}},
    {"kind": "application", "spec": {"name": "billing", "registration_method": "managed"}},
]}
planned = control.invoke("state", "plan", document, ["control:app:read"])
applied = control.invoke("state", "apply", document, ["control:app:write"])
verified = control.invoke("state", "verify", document, ["control:app:read"])
seen["state"] = [
    [o["action"] for o in planned["objects"]],
    [o["action"] for o in applied["objects"]],
    verified["in_sync"],
]

# ensure of a policy and of an active set naming it: the admin client sees the set active with
# a manifest of the policy's latest version.
content = (
    "# caracal:data-document\npackage caracal.authz\nimport rego.v1\n"
    'app_ids := {"reporting": "%s"}\n' % created["id"]
)
policy = control.invoke("ensure", "policy", {"name": "bindings", "content": content}, ["control:policy:write"])
set_scopes = ["control:policy-set:write", "control:policy:read"]
set_spec = {"name": "automation-set", "policies": ["bindings"], "active": True}
policy_set = control.invoke("ensure", "policy-set", set_spec, set_scopes)
again = control.invoke("ensure", "policy-set", set_spec, set_scopes)
held = admin.policy_sets.get(zone_id, policy_set["object"]["id"])
# The client unwraps the page's items.
version = admin.policy_sets.list_versions(zone_id, policy_set["object"]["id"])[0]
seen["policies"] = [
    policy["action"],
    policy_set["action"],
    again["action"],
    held["active_version_id"] == policy_set["object"]["active_version_id"],
    [entry["policy_version_id"] for entry in version["manifest"]] == [policy["object"]["version_id"]],
]


def failure(call):
    try:
        call()
    except ControlClientError as error:
        return [error.stage, error.status, error.code, error.definitive]
    return None


seen["errors"] = {
    # The key does not hold the scope: the STS refuses the mint.
    "scope_not_held": failure(lambda: control.invoke("app", "delete", {"id": created["id"]}, ["control:app:delete"])),
    # The mandate's scope does not cover the command.
    "scope_too_narrow": failure(lambda: control.invoke("app", "delete", {"id": created["id"]}, ["control:app:read"])),
    "unsupported": failure(lambda: control.invoke("zone", "delete", {}, ["control:app:read"])),
    "missing_id": failure(lambda: control.invoke("app", "get", {}, ["control:app:read"])),
    "not_found": failure(lambda: control.invoke("app", "get", {"id": "nope"}, ["control:app:read"])),
    "control_key_guarded": failure(lambda: control.invoke("app", "rotate-secret", {"id": key["id"]}, ["control:app:write"])),
}
print(json.dumps(seen))
