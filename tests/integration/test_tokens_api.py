"""Zone tokens at work: the global admitting zones by token, the HTTP API, and kdsctl.

* A GlobalEngine with ``authenticate=zone_authenticator(store)`` and ZoneEngines over
  the memory transport (which authenticates nothing): the zone with a ``cp`` token
  for its name replicates, and receives the public key and the revocation list but
  never the private key; each zone with a bad token is refused with its reason,
  keeps retrying, and gets in once it has a good token.
* The token endpoints of an ApiServer over SQLite on 127.0.0.1: tokens, keys,
  revocations, every bad body a 400 naming the field, 405 on a zone, 403 for a
  remote client without the admin token.
* kdsctl's token commands against such a server.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import jwt
import pytest
from anyio.from_thread import start_blocking_portal
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kds import ResourceKey, Upsert
from kds.api import ApiServer
from kds.api.tokens import ZONE_REFUSAL
from kds.cli.ctl import ControlPlaneEntry, CtlConfig, main, save_ctl_config
from kds.sync import GlobalEngine, SyncOptions, ZoneEngine
from kds.sync.lifecycle import zone_key
from kds.testing import MemoryStore, MemoryTransport
from kds.tokens import (
    PUBLIC_KEY_PREFIX,
    REVOCATIONS_NAME,
    SIGNING_KEY_PREFIX,
    RevokedTokenError,
    TokenVerifier,
    UnknownSigningKeyError,
    issue_zone_token,
    remove_signing_key,
    revoke,
    rotate_signing_key,
    signing_key_serials,
    token_id,
    zone_authenticator,
)
from kds_stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from anyio.abc import TaskGroup
    from anyio.from_thread import BlockingPortal

    from kds.protocol import Hello
    from kds.store import Store
    from kds.transport import PeerInfo

pytestmark = pytest.mark.anyio

DEADLINE = 30.0  # seconds for a condition to come true; never a pause
FAST = SyncOptions(
    heartbeat_interval=0.1,
    heartbeat_timeout=0.6,
    handshake_timeout=2.0,
    reconnect_base=0.02,
    reconnect_max=0.2,
    insight_interval=0.2,
)
ADMIN_TOKEN = "s3cret-admin"  # noqa: S105 -- a test server's admin token


async def wait_for(condition: Callable[[], Any], what: str) -> None:
    """Wait until *condition()* (sync or async) is truthy, failing after the deadline."""
    with anyio.move_on_after(DEADLINE):
        while True:
            result = condition()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await anyio.sleep(0.02)  # polling a condition no event announces
    raise AssertionError(f"not within {DEADLINE}s: {what}")


async def signed_with_store_key(store: Store, **claims: Any) -> str:
    """A token signed with the global's own key 1: valid but for what *claims* say."""
    secret = await store.get(ResourceKey("GlobalSecret", None, f"{SIGNING_KEY_PREFIX}1"))
    key = serialization.load_pem_private_key(base64.b64decode(secret.spec["data"]), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    now = int(datetime.now(UTC).timestamp())
    payload = {"Kind": "zone", "Scope": ["cp"], "jti": "t-1", "iat": now, "nbf": now}
    payload.update(claims)
    return jwt.encode(payload, key, "RS256", {"kid": "1"})


def start_zone(
    group: TaskGroup, transport: MemoryTransport, zone: str, token: str | None, store: Store
) -> ZoneEngine:
    engine = ZoneEngine(store, transport, zone=zone, credentials=token, options=FAST)
    group.start_soon(engine.run)
    return engine


# -- the global admitting zones ---------------------------------------------------------


async def test_zones_replicate_only_with_a_cp_token_for_their_name():
    transport = MemoryTransport()  # authenticates nobody: the token is all there is
    global_store = MemoryStore()
    await global_store.open()
    await global_store.commit([Upsert(key=ResourceKey("Mesh", None, "default"), spec={})])
    good = await issue_zone_token(global_store, zone="zone-1", scopes=["cp"])
    revoked = await issue_zone_token(global_store, zone="z-revoked", scopes=["cp"])
    await revoke(global_store, [token_id(revoked)])
    expired_at = int((datetime.now(UTC) - timedelta(minutes=1)).timestamp())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header, payload, signature = good.split(".")
    tampered_claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    tampered_claims["Zone"] = "z-tampered"
    tampered = ".".join(
        [
            header,
            base64.urlsafe_b64encode(json.dumps(tampered_claims).encode()).rstrip(b"=").decode(),
            signature,
        ]
    )
    bad: dict[str, tuple[str | None, str]] = {
        "z-none": (None, "no zone token was given"),
        "z-expired": (
            await signed_with_store_key(global_store, Zone="z-expired", exp=expired_at),
            "zone token expired at",
        ),
        "z-revoked": (revoked, f"zone token was revoked (id {token_id(revoked)})"),
        "z-other": (good, "zone token is for zone 'zone-1', not 'z-other'"),
        "z-ingress": (
            await issue_zone_token(global_store, zone="z-ingress", scopes=["ingress", "egress"]),
            "zone token lacks scope 'cp' (it has: egress, ingress)",
        ),
        "z-malformed": ("not.a.token", "zone token is malformed"),
        "z-tampered": (tampered, "signature does not match signing key 1"),
        "z-unknown-key": (
            jwt.encode({"Zone": "z-unknown-key"}, stranger, "RS256", {"kid": "5"}),
            "signed with signing key 5, which this control plane does not have",
        ),
    }

    attempts: Counter[str] = Counter()
    checker = zone_authenticator(global_store, verifier=TokenVerifier(global_store, max_age=0))

    async def counting(hello: Hello, peer: PeerInfo) -> str:
        attempts[hello.zone] += 1
        return await checker(hello, peer)

    engine = GlobalEngine(global_store, transport, options=FAST, authenticate=counting)
    zone_store = MemoryStore()
    await zone_store.open()
    async with anyio.create_task_group() as group:
        await group.start(engine.run)
        zone_1 = start_zone(group, transport, "zone-1", good, zone_store)
        refused = {
            zone: start_zone(group, transport, zone, token, MemoryStore())
            for zone, (token, _) in bad.items()
        }
        for zone_engine in refused.values():
            await zone_engine.store.open()

        # The zone with a good token replicates, and gets what verifying takes.
        async def replicated() -> bool:
            names = {r.key.name for r in await zone_store.list_resources("GlobalSecret")}
            mesh = await zone_store.find(ResourceKey("Mesh", None, "default"))
            return mesh is not None and {f"{PUBLIC_KEY_PREFIX}1", REVOCATIONS_NAME} <= names

        await wait_for(replicated, "zone-1 receives the Mesh, the public key and revocations")
        assert zone_1.sessions >= 1
        assert not any(
            r.key.name.startswith(SIGNING_KEY_PREFIX)
            for r in await zone_store.list_resources("GlobalSecret")
        )
        with pytest.raises(RevokedTokenError):
            await TokenVerifier(zone_store).verify_zone_token(revoked, zone=None, scope="cp")

        # Each zone with a bad token is refused with its reason, and keeps retrying.
        await wait_for(lambda: all(attempts[zone] >= 3 for zone in bad), "every bad zone retries")
        for zone, (token, reason) in bad.items():
            zone_engine = refused[zone]
            assert zone_engine.sessions == 0, zone
            assert zone_engine.last_error is not None, zone
            assert zone_engine.last_error.startswith("the global refused this zone: "), zone
            assert reason in zone_engine.last_error, (zone, zone_engine.last_error)
            if token is not None:
                assert token not in zone_engine.last_error
            assert await global_store.find(zone_key(zone)) is None, zone
        # An attempt is counted before its check ends: the last refusals may still be under way.
        await wait_for(lambda: engine.refusals >= 3 * len(bad), "every attempt refused")

        # Given a good token, a refused zone gets in at its next attempt.
        fixed = refused["z-revoked"]
        fixed.credentials = await issue_zone_token(global_store, zone="z-revoked", scopes=["cp"])
        await wait_for(lambda: fixed.sessions >= 1, "z-revoked connects with its new token")
        assert await global_store.find(zone_key("z-revoked")) is not None
        group.cancel_scope.cancel()
    for store in (global_store, zone_store, *(e.store for e in refused.values())):
        await store.aclose()


async def test_a_zone_whose_key_was_removed_is_refused_at_its_next_connection():
    transport = MemoryTransport()
    global_store = MemoryStore()
    await global_store.open()
    token = await issue_zone_token(global_store, zone="zone-1", scopes=["cp"])
    engine = GlobalEngine(
        global_store,
        transport,
        options=FAST,
        authenticate=zone_authenticator(
            global_store, verifier=TokenVerifier(global_store, max_age=0)
        ),
    )
    async with anyio.create_task_group() as group:
        await group.start(engine.run)
        zone = start_zone(group, transport, "zone-1", token, MemoryStore())
        await zone.store.open()
        await wait_for(lambda: zone.connected, "zone-1 connects")
        # Rotate, drop key 1, and cut the session: the old token no longer opens one.
        await rotate_signing_key(global_store)
        await remove_signing_key(global_store, 1)
        assert await signing_key_serials(global_store) == [2]
        transport.sever_all("network cut")
        await wait_for(
            lambda: zone.last_error is not None and "signing key 1" in zone.last_error,
            "zone-1 is refused for its removed key",
        )
        with pytest.raises(UnknownSigningKeyError):
            await TokenVerifier(global_store).verify_zone_token(token, zone="zone-1", scope="cp")
        group.cancel_scope.cancel()
    await zone.store.aclose()
    await global_store.aclose()


# -- the HTTP API --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **options: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Store]]:
    options.setdefault("mode", "global")
    async with (
        SQLiteStore(tmp_path / f"{options['mode']}.db") as store,
        anyio.create_task_group() as group,
    ):
        url = await group.start(ApiServer(store, **options).serve, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=url, timeout=DEADLINE) as client:
            yield client, store
        group.cancel_scope.cancel()


def problem(response: httpx.Response, status: int, field: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "/std-errors"
    if field is not None:
        assert [p["field"] for p in body["invalid_parameters"]] == [field], body
    detail: str = body["detail"]
    return detail


async def test_tokens_keys_and_revocations_over_http(tmp_path):
    async with serving(tmp_path) as (client, store):
        verify = TokenVerifier(store, max_age=0)
        response = await client.post(
            "/tokens/zone", json={"zone": "zone-1", "scope": ["cp", "ingress"], "validFor": "1h"}
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        zone_token = response.text
        found = await verify.verify_zone_token(zone_token, zone="zone-1", scope="ingress")
        assert found.scopes == {"cp", "ingress"}
        assert found.expires_at - found.issued_at == timedelta(hours=1)

        response = await client.post("/tokens/dataplane", json={"mesh": "default", "name": "web"})
        assert response.status_code == 200, response.text
        dataplane = await verify.verify_dataplane_token(response.text, mesh="default", name="web")
        assert dataplane.expires_at - dataplane.issued_at == timedelta(hours=720)

        response = await client.post("/tokens/zone/signing-keys")
        assert (response.status_code, response.json()) == (201, {"serial": 2})
        detail = problem(await client.delete("/tokens/zone/signing-keys/7"), 404)
        assert detail == "there is no zone token signing key 7"
        problem(await client.delete("/tokens/zone/signing-keys/x"), 400, "serial")
        problem(await client.delete("/tokens/zone/signing-keys/0"), 400, "serial")
        response = await client.delete("/tokens/zone/signing-keys/1")
        assert (response.status_code, response.json()) == (200, {})
        detail = problem(await client.delete("/tokens/zone/signing-keys/2"), 409)
        assert "signing key 2 is the only zone token signing key" in detail
        with pytest.raises(UnknownSigningKeyError):
            await verify.verify_zone_token(zone_token, zone="zone-1", scope="cp")

        response = await client.post("/tokens/zone", json={"zone": "zone-1", "scope": ["cp"]})
        fresh = response.text
        response = await client.post(
            "/tokens/zone/revocations", json={"ids": [token_id(fresh), "other-id"]}
        )
        assert (response.status_code, response.json()) == (200, {})
        with pytest.raises(RevokedTokenError):
            await verify.verify_zone_token(fresh, zone="zone-1", scope="cp")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/tokens/zone", [], "body"),
        ("/tokens/zone", {"scope": ["cp"]}, "zone"),
        ("/tokens/zone", {"zone": "z"}, "scope"),
        ("/tokens/zone", {"zone": "z", "scope": "cp"}, "scope"),
        ("/tokens/zone", {"zone": "z", "scope": []}, "scope"),
        ("/tokens/zone", {"zone": "z", "scope": ["admin"]}, "scope"),
        ("/tokens/zone", {"zone": "a b", "scope": ["cp"]}, "zone"),
        ("/tokens/zone", {"zone": 7, "scope": ["cp"]}, "zone"),
        ("/tokens/zone", {"zone": "z", "scope": ["cp"], "validFor": "forever"}, "validFor"),
        ("/tokens/zone", {"zone": "z", "scope": ["cp"], "validFor": "0s"}, "validFor"),
        ("/tokens/zone", {"zone": "z", "scope": ["cp"], "validFor": "87601h"}, "validFor"),
        ("/tokens/zone", {"zone": "z", "scope": ["cp"], "validFor": 60}, "validFor"),
        ("/tokens/zone", {"zone": "z", "scope": ["cp"], "tags": {}}, "tags"),
        ("/tokens/dataplane", {}, "mesh"),
        ("/tokens/dataplane", {"mesh": "default", "name": ""}, "name"),
        ("/tokens/dataplane", {"mesh": "default", "type": "ingress"}, "type"),
        ("/tokens/zone/revocations", {"ids": "abc"}, "ids"),
        ("/tokens/zone/revocations", {"ids": []}, "ids"),
        ("/tokens/zone/revocations", {"ids": ["ok", "a,b"]}, "ids[1]"),
        ("/tokens/zone/revocations", {"ids": [1]}, "ids[0]"),
    ],
)
async def test_a_bad_body_is_a_400_naming_the_field(tmp_path, path, body, field):
    async with serving(tmp_path) as (client, store):
        problem(await client.post(path, json=body), 400, field)
        assert await store.list_resources("GlobalSecret") == []  # nothing was written


async def test_bodies_that_are_not_json_are_refused(tmp_path):
    async with serving(tmp_path) as (client, _):
        problem(await client.post("/tokens/zone", content=b""), 400, "body")
        problem(await client.post("/tokens/zone", content=b"{"), 400, "body")


async def test_a_zone_refuses_every_token_endpoint(tmp_path):
    async with serving(tmp_path, mode="zone", zone="zone-1") as (client, store):
        for method, path in [
            ("POST", "/tokens/zone"),
            ("POST", "/tokens/dataplane"),
            ("POST", "/tokens/zone/signing-keys"),
            ("DELETE", "/tokens/zone/signing-keys/1"),
            ("POST", "/tokens/zone/revocations"),
        ]:
            response = await client.request(method, path, json={"zone": "z", "scope": ["cp"]})
            assert problem(response, 405) == ZONE_REFUSAL
        assert await store.list_resources("GlobalSecret") == []


async def test_remote_clients_need_the_admin_token(tmp_path):
    async with serving(tmp_path, admin_token=ADMIN_TOKEN, is_local=lambda _peer: False) as (
        client,
        store,
    ):
        body = {"zone": "zone-1", "scope": ["cp"]}
        assert "Authorization: Bearer" in problem(await client.post("/tokens/zone", json=body), 403)
        assert await store.list_resources("GlobalSecret") == []
        response = await client.post(
            "/tokens/zone", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert response.status_code == 200, response.text


# -- kdsctl -------------------------------------------------------------------------------


class Plane:
    """A served API in a thread's event loop: its URL, and calls into its loop."""

    def __init__(self, portal: BlockingPortal, url: str, store: SQLiteStore) -> None:
        self.portal = portal
        self.url = url
        self.store = store

    def verifier(self) -> TokenVerifier:
        return TokenVerifier(self.store, max_age=0)


async def _serve(path, mode, stop, *, task_status):
    async with SQLiteStore(path) as store:
        options: dict[str, Any] = {"zone": "zone-1"} if mode == "zone" else {}
        server = ApiServer(store, mode=mode, **options)
        async with anyio.create_task_group() as group:
            url = await group.start(server.serve, "127.0.0.1", 0)
            task_status.started((url, store))
            await stop.wait()
            group.cancel_scope.cancel()


@contextlib.contextmanager
def running_plane(path: Path, mode: str = "global") -> Iterator[Plane]:
    with start_blocking_portal("asyncio") as portal:
        stop = portal.call(anyio.Event)
        future, (url, store) = portal.start_task(_serve, path, mode, stop)
        try:
            yield Plane(portal, url, store)
        finally:
            portal.call(stop.set)
            future.result(timeout=DEADLINE)


def kdsctl(config: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--config-file", str(config), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def configured(tmp_path: Path, plane: Plane) -> Path:
    path = tmp_path / "kdsctl.yaml"
    save_ctl_config(CtlConfig((ControlPlaneEntry("test", plane.url),), "test"), path)
    return path


def test_kdsctl_generates_rotates_removes_and_revokes(tmp_path):
    # kdsctl is synchronous: the server runs in its own thread's event loop.
    with running_plane(tmp_path / "global.db") as plane:
        config = configured(tmp_path, plane)
        verify = plane.verifier()

        result = kdsctl(config, "generate", "zone-token", "--zone", "zone-1", "--scope", "cp")
        assert result.exit_code == 0, result.output
        cp_token = result.stdout.strip()
        assert result.stdout == cp_token + "\n"
        claims = plane.portal.call(
            lambda: verify.verify_zone_token(cp_token, zone="zone-1", scope="cp")
        )
        assert claims.scopes == {"cp"}

        result = kdsctl(
            config,
            *("generate", "zone-token", "--zone", "zone-1"),
            *("--scope", "ingress", "--scope", "egress", "--valid-for", "30m"),
        )
        assert result.exit_code == 0, result.output
        claims = plane.portal.call(
            lambda: verify.verify_zone_token(result.stdout, zone="zone-1", scope="egress")
        )
        assert claims.scopes == {"ingress", "egress"}
        assert claims.expires_at - claims.issued_at == timedelta(minutes=30)

        result = kdsctl(config, "generate", "dataplane-token", "--mesh", "default")
        assert result.exit_code == 0, result.output
        dataplane = plane.portal.call(
            lambda: verify.verify_dataplane_token(result.stdout, mesh="default", name="any")
        )
        assert dataplane.name is None

        for args, message in [
            (("--zone", "zone-1", "--scope", "root"), "'root' is not one of"),
            (("--zone", "zone-1"), "Missing option '--scope'"),
            (("--zone", "zone-1", "--scope", "cp", "--valid-for", "0s"), "must be at least 1s"),
            (("--zone", "zone-1", "--scope", "cp", "--valid-for", "ever"), "is not a duration"),
        ]:
            result = kdsctl(config, "generate", "zone-token", *args)
            assert result.exit_code == 2, result.output
            assert message in result.stderr

        result = kdsctl(config, "rotate", "zone-token-signing-key")
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("created zone token signing key 2:")
        result = kdsctl(config, "remove", "zone-token-signing-key", "--serial", "1")
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("removed zone token signing key 1:")
        result = kdsctl(config, "remove", "zone-token-signing-key", "--serial", "2")
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: Conflict: signing key 2 is the only")

        result = kdsctl(config, "generate", "zone-token", "--zone", "zone-1", "--scope", "cp")
        token_file = tmp_path / "token"
        token_file.write_text(result.stdout)
        jti = token_id(result.stdout)
        result = kdsctl(
            config, "revoke", "zone-token", "--token-file", str(token_file), "--id", "x-1"
        )
        assert result.exit_code == 0, result.output
        assert result.stdout == f"revoked 2 zone token(s): x-1, {jti}\n"
        with pytest.raises(RevokedTokenError):
            plane.portal.call(
                lambda: verify.verify_zone_token(token_file.read_text(), zone=None, scope="cp")
            )

        result = kdsctl(config, "revoke", "zone-token")
        assert result.exit_code == 2
        assert "name the tokens to revoke with --id or --token-file" in result.stderr
        junk = tmp_path / "junk"
        junk.write_text("not a token\n")
        result = kdsctl(config, "revoke", "dataplane-token", "--token-file", str(junk))
        assert result.exit_code == 1
        assert result.stderr == (
            f"Error: {junk}: dataplane token is malformed: it has 1 dot-separated parts; "
            "a JWT has 3\n"
        )


def test_kdsctl_against_a_zone_says_to_ask_the_global(tmp_path):
    with running_plane(tmp_path / "zone.db", mode="zone") as plane:
        config = configured(tmp_path, plane)
        result = kdsctl(config, "generate", "zone-token", "--zone", "zone-1", "--scope", "cp")
        assert result.exit_code == 1
        assert result.stderr == f"Error: Method not allowed: {ZONE_REFUSAL}\n"
        names = plane.portal.call(plane.store.list_resources, "GlobalSecret")
        assert names == []
