"""Drives a running Caracal's Gateway with the published SDK (caracalai 1.0, caracalai-verify
1.0), unmodified: a governed session delegates `ledger:read` to a sub-agent, the sub-agent's
`Caracal.fetch` goes through the Gateway to a loopback upstream behind a `caracal_mandate`
provider, and the upstream checks the credential it receives with `caracalai_verify`. The
same call for an undeclared operation is refused; after the delegation is revoked, so is the
declared one. Prints one JSON object.
Reads CARACAL_API_URL, CARACAL_ADMIN_TOKEN, CARACAL_STS_URL, CARACAL_COORDINATOR_URL,
CARACAL_GATEWAY_URL.
"""
import asyncio
import dataclasses
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from caracalai import Caracal
from caracalai_admin import AdminClient, ResourceGrant, ensure_application, ensure_grants, ensure_resource
from caracalai_revocation import InMemoryRevocationStore
from caracalai_verify import authenticate

STS = os.environ["CARACAL_STS_URL"]
received = []


class Upstream(BaseHTTPRequestHandler):
    def do_GET(self):
        received.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
        body = json.dumps({"entries": [1, 2, 3]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
threading.Thread(target=server.serve_forever, daemon=True).start()
upstream = f"http://127.0.0.1:{server.server_address[1]}/api"

seen = {}
admin = AdminClient(api_url=os.environ["CARACAL_API_URL"], admin_token=os.environ["CARACAL_ADMIN_TOKEN"])
zone_id = admin.zones.create({"name": "Gateway Interop"})["id"]
secret = "g" * 40
app_id = ensure_application(admin, zone_id, name="agent", traits=[], client_secret=secret)
provider = admin.providers.create(zone_id, {"name": "mandate", "kind": "caracal_mandate"})
ensure_resource(
    admin, zone_id, name="Ledger", identifier="resource://ledger", scopes=["ledger:read", "ledger:write"],
    upstream_url=upstream, credential_provider_id=provider["id"],
    operations=[{"method": "GET", "path": "/entries", "scope": "ledger:read"}],
)
ensure_grants(admin, zone_id, grants=[
    ResourceGrant(application_id=app_id, resource_identifier="resource://ledger", scopes=["ledger:read", "ledger:write"]),
])
policy_set = next(s for s in admin.policy_sets.list(zone_id) if s["name"] == "application-grant-policy")
deadline = time.monotonic() + 20
while admin.policy_sets.activation_status(zone_id, policy_set["id"])["propagation_status"] != "loaded":
    if time.monotonic() > deadline:
        raise SystemExit("the STS never loaded the grants")
    time.sleep(0.1)

caracal = Caracal.from_client_secret(
    coordinator_url=os.environ["CARACAL_COORDINATOR_URL"], sts_url=STS,
    gateway_url=os.environ["CARACAL_GATEWAY_URL"], zone_id=zone_id, application_id=app_id,
    client_secret=secret, resources=["resource://ledger"],
)


async def verified(token):
    result = await authenticate(
        token, issuer=STS, audience="resource://ledger", required_scopes=["ledger:read"],
        expected_zone_id=zone_id, revocations=InMemoryRevocationStore(), required_use="resource",
    )
    if result.error is not None:
        return {"ok": False, "error": result.error.code}
    return {"ok": True, "use": result.principal.use}


async def main():
    handle = await caracal.start_session(labels=[app_id], task="worker", heartbeat_interval=0)
    child = handle.context
    async with caracal.session(labels=[app_id], task="reconcile"):
        delegation = await caracal.delegate(
            to_session_id=child.session_id, scopes=["ledger:read"], ttl_seconds=300,
            resource_id="resource://ledger",
        )
        bound = dataclasses.replace(child, delegation_id=delegation.delegation_id)
        response = await caracal.fetch("resource://ledger", "/entries", scopes=["ledger:read"], ctx=bound)
        seen["status"] = response.status_code
        seen["body"] = response.json()
        call = received[-1]
        seen["upstream_path"] = call["path"]
        bearer = call["headers"].get("authorization", "")
        seen["upstream_verified"] = await verified(bearer.removeprefix("Bearer "))
        seen["caracal_headers_upstream"] = sorted(h for h in call["headers"] if h.startswith("x-caracal-"))
        undeclared = await caracal.fetch("resource://ledger", "/admin", scopes=["ledger:read"], ctx=bound)
        seen["undeclared"] = [undeclared.status_code, undeclared.json().get("error")]
        await caracal.revoke_delegation(delegation.delegation_id)
        try:
            after = await caracal.fetch("resource://ledger", "/entries", scopes=["ledger:read"], ctx=bound)
            seen["after_revoke"] = [after.status_code, after.json().get("error")]
        except Exception as err:  # the mint itself is refused once the edge is revoked
            seen["after_revoke"] = ["mint_refused", getattr(err, "code", None) or type(err).__name__]
        seen["upstream_calls"] = len(received)
        await handle.aclose()
    await caracal.aclose()


asyncio.run(main())
print(json.dumps(seen))
