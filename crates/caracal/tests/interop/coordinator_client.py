"""Drives a running Caracal's Coordinator and STS with the published main SDK (caracalai 1.0),
unmodified: a governed session started with an idempotency key, a sub-agent session, a
narrowed delegation to it, a mint the delegation allows and one wider that it does not, then
the operator's reads and changes through the published admin client's coordinator calls, the
sub-agent accepting its delegation (validated) and starting a session of its own that inherits
it, then the delegation revoked and the sub-agent's mint refused. Prints one JSON object.
Reads CARACAL_API_URL, CARACAL_ADMIN_TOKEN, CARACAL_STS_URL, CARACAL_COORDINATOR_URL.
"""
import asyncio
import base64
import dataclasses
import json
import os
import time

from caracalai import Caracal, DelegationConstraints
from caracalai_admin import AdminClient, ResourceGrant, ensure_application, ensure_grants, ensure_resource

STS = os.environ["CARACAL_STS_URL"]
COORDINATOR = os.environ["CARACAL_COORDINATOR_URL"]
seen = {}

admin = AdminClient(api_url=os.environ["CARACAL_API_URL"], admin_token=os.environ["CARACAL_ADMIN_TOKEN"])
zone_id = admin.zones.create({"name": "Coordinator Interop"})["id"]
secret = "c" * 40
app_id = ensure_application(admin, zone_id, name="orchestrator", traits=[], client_secret=secret)
provider = admin.providers.create(zone_id, {"name": "none", "kind": "none"})
ensure_resource(
    admin, zone_id, name="Ledger", identifier="resource://ledger", scopes=["ledger:read", "ledger:write"],
    upstream_url="http://127.0.0.1:9/api", credential_provider_id=provider["id"],
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
    coordinator_url=COORDINATOR, sts_url=STS, zone_id=zone_id, application_id=app_id,
    client_secret=secret, resources=["resource://ledger"],
)


def refused(call):
    try:
        call()
        return None
    except Exception as err:  # the SDK's typed errors carry .code
        return getattr(err, "code", None) or type(err).__name__


async def main():
    # A worker that outlives a block (a service session; a task parent cannot start one, so it
    # starts on its own): a handle, renewed by hand here.
    handle = await caracal.start_session(labels=[app_id], task="worker", heartbeat_interval=0)
    child = handle.context
    spare = await caracal.start_session(labels=[app_id], task="spare", heartbeat_interval=0)
    async with caracal.session(labels=[app_id], task="reconcile", idempotency_key="op-1") as parent:
        seen["parent_started"] = bool(parent.session_id)
        delegation = await caracal.delegate(
            to_session_id=child.session_id, scopes=["ledger:read"], ttl_seconds=300,
            resource_id="resource://ledger", constraints=DelegationConstraints(max_hops=2),
        )
        seen["delegation_scopes"] = list(delegation.scopes)
        bound = dataclasses.replace(child, delegation_id=delegation.delegation_id)
        minted = caracal.mint_mandate("resource://ledger", ["ledger:read"], ctx=bound)
        payload = minted.token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        seen["child_mint"] = {"use": claims["use"], "edge": claims.get("delegation_edge_id") == delegation.delegation_id}
        seen["wider_mint"] = refused(lambda: caracal.mint_mandate("resource://ledger", ["ledger:write"], ctx=bound))
        # The operator's view through the published admin client's coordinator calls, with an
        # admin token as its coordinator_token.
        operator = AdminClient(
            api_url=os.environ["CARACAL_API_URL"], admin_token=os.environ["CARACAL_ADMIN_TOKEN"],
            coordinator_url=COORDINATOR, coordinator_token=os.environ["CARACAL_ADMIN_TOKEN"],
        )
        async with caracal.session(labels=[app_id], task="step") as step:
            seen["operator"] = {
                "get": operator.sessions.get(zone_id, parent.session_id)["session_id"] == parent.session_id,
                "children": [c["session_id"] for c in operator.sessions.children(zone_id, parent.session_id)]
                == [step.session_id],
                "effective": [
                    d["id"]
                    for d in operator.sessions.effective_authority(zone_id, child.session_id)["inbound_delegations"]
                ] == [delegation.delegation_id],
                "active": [d["delegation_id"] for d in operator.delegations.active(zone_id)["items"]]
                == [delegation.delegation_id],
                "traverse": operator.delegations.traverse(zone_id, delegation.delegation_id)[0]["delegation_id"]
                == delegation.delegation_id,
                "impact": operator.delegations.impact(zone_id, delegation.delegation_id)["affected_sessions"]
                == [child.session_id],
                "suspend": operator.sessions.suspend(zone_id, step.session_id)["status"],
                "resume": operator.sessions.resume(zone_id, step.session_id)["status"],
            }
        # The sub-agent validates the delegation handed to it, then starts a session of its own,
        # which inherits it (the SDK's default authority) one hop further down, and mints with it.
        async with caracal.bind(child):
            async with caracal.accept_delegation(delegation.delegation_id, validate=True) as accepted:
                seen["accepted"] = accepted.delegation_id == delegation.delegation_id
                async with caracal.session(labels=[app_id], task="sub") as sub:
                    inherited = caracal.mint_mandate("resource://ledger", ["ledger:read"], ctx=sub)
                    payload = inherited.token.split(".")[1]
                    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
                    seen["inherited"] = {
                        "own_edge": sub.delegation_id not in (None, delegation.delegation_id),
                        "minted_along_it": claims.get("delegation_edge_id") == sub.delegation_id,
                    }
            try:
                async with caracal.accept_delegation("not-an-edge", validate=True):
                    seen["foreign_accepted"] = True
            except RuntimeError:
                seen["foreign_accepted"] = False
        # An operator ends a service session whoever holds its lease.
        operator.sessions.terminate(zone_id, spare.context.session_id)
        seen["operator"]["terminate"] = operator.sessions.get(zone_id, spare.context.session_id)["status"]
        consumer = revocations = None
        if os.environ.get("CARACAL_REDIS_URL"):
            # The resource-server side: the published Redis revocation consumer, on a group of
            # its own that starts at the stream's end (older runs' messages are not its own).
            import redis
            from caracalai_revocation_redis import RedisRevocationConsumer, RedisRevocationStore
            client = redis.Redis.from_url(os.environ["CARACAL_REDIS_URL"], decode_responses=True)
            group = f"interop-{child.session_id}"
            client.xgroup_create("caracal.sessions.revoke", group, id="$", mkstream=True)
            revocations = RedisRevocationStore(client)
            consumer = RedisRevocationConsumer(
                client, revocations, consumer="interop", group=group, block_ms=100,
                stream_hmac_key=bytes.fromhex(os.environ["CARACAL_STREAM_KEY_HEX"]),
            )
            seen["revoked_before"] = revocations.is_revoked(child.session_id)
        await caracal.revoke_delegation(delegation.delegation_id)
        if consumer is not None:
            deadline = time.monotonic() + 15
            while not revocations.is_revoked(child.session_id) and time.monotonic() < deadline:
                consumer.poll_once()
            seen["revoked_in_redis"] = {
                "session": revocations.is_revoked(child.session_id),
                "delegation": revocations.is_revoked(delegation.delegation_id),
            }
        seen["after_revoke"] = refused(lambda: caracal.mint_mandate("resource://ledger", ["ledger:read"], ctx=bound))
        await handle.aclose()
    return seen

asyncio.run(main())
print(json.dumps(seen))
