"""Drives a running Caracal's STS with the published SDK (caracalai-oauth, caracalai-identity,
caracalai-verify 1.0), unmodified. One phase per run (argv[1]); prints one JSON object.

- setup:  zone, application, resource and grants through caracalai-admin; a bootstrap
          (lifecycle) mint through ClientSecretExchanger, verified by caracalai_verify through
          the zone's JWKS; error mapping of a bad secret.
- mint:   a delegated mint (session + delegation, created by the test) -> use=gateway.
- verify: after a key rotation, a fresh verifier checks the mandate minted before it and a
          new one minted after it.
Any exception fails the run (non-zero exit), which fails the Rust test that started it.
"""
import asyncio
import base64
import json
import os
import sys
import time

from caracalai_admin import AdminClient, ResourceGrant, ensure_application, ensure_grants, ensure_resource
from caracalai_oauth import AccessDenied, ExchangeOptions, OAuthClient
from caracalai_oauth.exchanger import ClientCredentials, ClientSecretExchanger
from caracalai_revocation import InMemoryRevocationStore
from caracalai_verify import authenticate

STS = os.environ["CARACAL_STS_URL"]
phase = sys.argv[1]
state = json.loads(os.environ.get("CARACAL_TEST_STATE", "{}"))
seen = {}


def header(token):
    part = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def claims(token):
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def exchanger(zone_id, app_id, secret):
    creds = ClientCredentials(zone_id=zone_id, application_id=app_id, client_secret=secret)
    return ClientSecretExchanger(sts_url=STS, credentials=lambda: creds, resources=["resource://ledger"])


async def verify_session(token, zone_id):
    result = await authenticate(
        token, issuer=STS, audience=STS, required_scopes=["agent:lifecycle"],
        expected_zone_id=zone_id, revocations=InMemoryRevocationStore(), required_use="session",
    )
    if result.error is not None:
        return {"ok": False, "error": result.error.code}
    return {"ok": True, "use": result.principal.use, "sub": result.principal.sub}


if phase == "setup":
    admin = AdminClient(api_url=os.environ["CARACAL_API_URL"], admin_token=os.environ["CARACAL_ADMIN_TOKEN"])
    zone_id = admin.zones.create({"name": "STS Interop"})["id"]
    secret = "s" * 40
    app_id = ensure_application(admin, zone_id, name="agent", traits=[], client_secret=secret)
    provider = admin.providers.create(zone_id, {"name": "none", "kind": "none"})
    ensure_resource(
        admin, zone_id, name="Ledger", identifier="resource://ledger", scopes=["ledger:read"],
        upstream_url="http://127.0.0.1:9/api", credential_provider_id=provider["id"],
    )
    ensure_grants(admin, zone_id, grants=[
        ResourceGrant(application_id=app_id, resource_identifier="resource://ledger", scopes=["ledger:read"]),
    ])
    policy_set = next(s for s in admin.policy_sets.list(zone_id) if s["name"] == "application-grant-policy")
    deadline = time.monotonic() + 20
    while admin.policy_sets.activation_status(zone_id, policy_set["id"])["propagation_status"] != "loaded":
        if time.monotonic() > deadline:
            raise SystemExit("the STS never loaded the grants")
        time.sleep(0.1)

    lifecycle = exchanger(zone_id, app_id, secret).get_token()
    seen["bootstrap_claims"] = {k: claims(lifecycle).get(k) for k in ("use", "scope", "target", "sub_type")}
    seen["bootstrap_verified"] = asyncio.run(verify_session(lifecycle, zone_id))

    async def bad_secret():
        client = OAuthClient(STS, zone_id, app_id)
        try:
            await client.exchange("", "resource://ledger", ExchangeOptions(client_secret="x" * 40, scopes=["agent:lifecycle"]))
            return "no error"
        except AccessDenied as err:
            return [type(err).__name__, err.http_status]
        finally:
            await client.aclose()
    seen["bad_secret"] = asyncio.run(bad_secret())
    seen["state"] = {"zone_id": zone_id, "app_id": app_id, "secret": secret, "before": lifecycle}

elif phase == "mint":
    minted = exchanger(state["zone_id"], state["app_id"], state["secret"]).mint_mandate(
        resource="resource://ledger", scopes=["ledger:read"],
        session_id=state["session_id"], delegation_id=state["delegation_id"],
    )
    token = minted.token
    seen["delegated_expires_in"] = minted.expires_in_seconds
    got = claims(token)
    seen["delegated"] = {k: got.get(k) for k in ("use", "scope", "agent_session_id", "delegation_edge_id", "hop_count", "delegation_path")}
    seen["delegated_chain_apps"] = [hop["application_id"] for hop in got["delegation_chain"]]

elif phase == "verify":
    after = exchanger(state["zone_id"], state["app_id"], state["secret"]).get_token()
    seen["kids"] = [header(state["before"])["kid"], header(after)["kid"]]
    seen["before_verified"] = asyncio.run(verify_session(state["before"], state["zone_id"]))
    seen["after_verified"] = asyncio.run(verify_session(after, state["zone_id"]))

print(json.dumps(seen))
