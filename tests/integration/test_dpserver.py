"""The dataplane server, served for real over HTTPS on 127.0.0.1, with ProxyAgents in-process.

Each test starts a :class:`DataplaneServer` of zone ``zone-1`` on a free port over a
SQLite store, with a real :class:`TokenVerifier` over tokens issued with
:mod:`kds.tokens` into that store, and talks to it with :class:`DataplaneClient`
and :class:`ProxyAgent`: registration, heartbeats, goodbye, expiry of silent
proxies, restarts superseding older subscriptions, every kind of refusal (each
with its reason), retries while the server is down, and fifty proxies in one
process.
"""

from __future__ import annotations

import logging
import ssl
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import httpx
import pytest

from kds import ResourceKey, Store, Upsert
from kds.dp import (
    ControlPlaneUnavailable,
    ControlPlaneUntrusted,
    DataplaneClient,
    ProxyAgent,
    ProxyRefused,
    SubscriptionEnded,
)
from kds.dpserver import DataplaneServer
from kds.errors import ConfigError
from kds.resource import LABEL_ORIGIN, LABEL_ZONE, ORIGIN_GLOBAL, ORIGIN_ZONE
from kds.sync.lifecycle import MAX_SUBSCRIPTIONS
from kds.testing._server import free_port
from kds.tokens import TokenVerifier, issue_dataplane_token, issue_zone_token, revoke, token_id
from kds_stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from kds.dp import ProxyType

pytestmark = pytest.mark.anyio

ZONE = "zone-1"
HOUR = timedelta(hours=1)
DEADLINE = 30.0  # seconds to wait for a condition; never a pause


def ingress(name: str = "ingress-01", **extra: Any) -> dict[str, Any]:
    return {
        "type": "ZoneIngress",
        "name": name,
        "networking": {
            "address": "127.0.0.1",
            "port": 10000,
            "advertisedAddress": "10.0.0.1",
            "advertisedPort": 10000,
        },
        **extra,
    }


def egress(name: str = "egress-01") -> dict[str, Any]:
    return {
        "type": "ZoneEgress",
        "name": name,
        "networking": {"address": "127.0.0.1", "port": 10002},
    }


def dataplane(name: str = "backend-1", mesh: str = "default") -> dict[str, Any]:
    return {
        "type": "Dataplane",
        "mesh": mesh,
        "name": name,
        "networking": {
            "address": "127.0.0.1",
            "inbound": [{"port": 8080, "tags": {"kuma.io/service": "backend"}}],
        },
    }


async def eventually(
    condition: Callable[[], Awaitable[object]], *, what: str, within: float = DEADLINE
) -> Any:
    """Poll *condition* until it returns something truthy; fail after *within* seconds."""
    try:
        with anyio.fail_after(within):
            while True:
                result = await condition()
                if result:
                    return result
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {within}s waiting for {what}") from None


@attrs.frozen
class Zone:
    """A served dataplane server: its store, the server, its URL and a trusting client."""

    store: Store
    server: DataplaneServer
    url: str
    ca_file: Path

    def client(self, **options: Any) -> DataplaneClient:
        return DataplaneClient(self.url, ca_file=self.ca_file, **options)

    async def insight(self, key: ResourceKey) -> Any:
        insight_type = {
            "ZoneIngress": "ZoneIngressInsight",
            "ZoneEgress": "ZoneEgressInsight",
            "Dataplane": "DataplaneInsight",
        }[key.type]
        return await self.store.find(ResourceKey(insight_type, key.mesh, key.name))

    async def online(self, key: ResourceKey) -> bool:
        return self.server.is_online(await self.insight(key))

    async def zone_token(self, *scopes: str, zone: str = ZONE) -> str:
        return await issue_zone_token(self.store, zone=zone, scopes=scopes, valid_for=HOUR)


@asynccontextmanager
async def open_store(tmp_path: Path) -> AsyncIterator[Store]:
    async with SQLiteStore(tmp_path / "zone.sqlite") as store:
        # The mesh the global sent this zone.
        await store.commit(
            [Upsert(key=ResourceKey("Mesh", None, "default"), labels={LABEL_ORIGIN: ORIGIN_GLOBAL})]
        )
        yield store


@asynccontextmanager
async def serving(
    store: Store, tmp_path: Path, *, port: int = 0, heartbeat_timeout: float = 30.0
) -> AsyncIterator[Zone]:
    server = DataplaneServer(
        store,
        zone=ZONE,
        verifier=TokenVerifier(store),
        work_dir=tmp_path / "work",
        heartbeat_timeout=heartbeat_timeout,
    )
    async with anyio.create_task_group() as group:
        url = await group.start(server.serve, "127.0.0.1", port)
        assert server.certificate_path is not None
        yield Zone(store, server, url, server.certificate_path)
        group.cancel_scope.cancel()


@asynccontextmanager
async def zone_plane(tmp_path: Path, *, heartbeat_timeout: float = 30.0) -> AsyncIterator[Zone]:
    async with (
        open_store(tmp_path) as store,
        serving(store, tmp_path, heartbeat_timeout=heartbeat_timeout) as zone,
    ):
        yield zone


# -- registration, heartbeats, goodbye ----------------------------------------------------


async def test_an_ingress_registers_heartbeats_and_goes_offline_after_goodbye(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        token = await zone.zone_token("ingress")
        agent = ProxyAgent(
            client, proxy_type="ingress", document=ingress(), token=token, heartbeat_interval=0.1
        )
        key = ResourceKey("ZoneIngress", None, "ingress-01")
        async with anyio.create_task_group() as group:
            subscription = await group.start(agent.run)
            proxy = await zone.store.get(key)
            assert proxy.labels == {LABEL_ORIGIN: ORIGIN_ZONE, LABEL_ZONE: ZONE}
            assert proxy.spec["zone"] == ZONE
            assert proxy.spec["networking"]["advertisedAddress"] == "10.0.0.1"
            first = (await zone.insight(key)).spec["subscriptions"][-1]["lastSeen"]
            await eventually(lambda: _heartbeats(agent, 3), what="three heartbeats")
            insight = await zone.insight(key)
            assert insight.labels == {LABEL_ORIGIN: ORIGIN_ZONE, LABEL_ZONE: ZONE}
            [current] = insight.spec["subscriptions"]
            assert current["id"] == subscription
            assert current["disconnectTime"] is None
            assert current["lastSeen"] > first
            assert current["version"] == {"kdsDp": {"version": "0.1.0"}}
            assert await zone.online(key)
            group.cancel_scope.cancel()
        # The goodbye was said on cancellation: offline at once, not after the timeout.
        [closed] = (await zone.insight(key)).spec["subscriptions"]
        assert closed["disconnectTime"] is not None
        assert not await zone.online(key)
        assert agent.subscription is None


async def _heartbeats(agent: ProxyAgent, count: int) -> bool:
    return agent.heartbeats >= count


async def test_an_egress_and_a_dataplane_register_with_their_tokens(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        egress_token = await zone.zone_token("egress")
        registration = await client.register("egress", egress(), egress_token)
        assert await zone.online(ResourceKey("ZoneEgress", None, "egress-01"))
        key = ResourceKey("ZoneEgress", None, "egress-01")
        await client.heartbeat("egress", key, registration.subscription, egress_token)
        dp_token = await issue_dataplane_token(
            zone.store, mesh="default", name="backend-1", valid_for=HOUR
        )
        await client.register("dataplane", dataplane(), dp_token)
        dp_key = ResourceKey("Dataplane", "default", "backend-1")
        assert await zone.online(dp_key)
        stored = await zone.store.get(dp_key)
        assert stored.labels[LABEL_ZONE] == ZONE
        assert "zone" not in stored.spec  # only zone proxies carry their zone in the spec
        assert registration.heartbeat_interval == pytest.approx(10.0)


async def test_a_restarted_proxy_supersedes_its_older_subscription(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        token = await zone.zone_token("ingress")
        key = ResourceKey("ZoneIngress", None, "ingress-01")
        old = await client.register("ingress", ingress(), token)
        new = await client.register("ingress", ingress(), token)
        older, newer = (await zone.insight(key)).spec["subscriptions"]
        assert (older["id"], newer["id"]) == (old.subscription, new.subscription)
        assert older["disconnectTime"] is not None
        assert newer["disconnectTime"] is None
        assert await zone.online(key)
        # The old process, if it still ran, learns it was superseded and does not fight back.
        with pytest.raises(ProxyRefused, match="superseded by a newer registration") as refused:
            await client.heartbeat("ingress", key, old.subscription, token)
        assert refused.value.status == 409
        await client.heartbeat("ingress", key, new.subscription, token)


async def test_an_insight_keeps_the_newest_subscriptions(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        token = await zone.zone_token("ingress")
        ids = [(await client.register("ingress", ingress(), token)).subscription for _ in range(12)]
        insight = await zone.insight(ResourceKey("ZoneIngress", None, "ingress-01"))
        subscriptions = insight.spec["subscriptions"]
        assert len(subscriptions) == MAX_SUBSCRIPTIONS
        assert [s["id"] for s in subscriptions] == ids[-MAX_SUBSCRIPTIONS:]
        assert [s["disconnectTime"] is None for s in subscriptions] == [False] * 9 + [True]
        # The oldest ones are forgotten: a heartbeat naming one must register again.
        key = ResourceKey("ZoneIngress", None, "ingress-01")
        with pytest.raises(SubscriptionEnded, match="no subscription"):
            await client.heartbeat("ingress", key, ids[0], token)


async def test_a_silent_proxy_goes_offline_after_the_heartbeat_timeout(tmp_path):
    async with zone_plane(tmp_path, heartbeat_timeout=0.5) as zone, zone.client() as client:
        token = await zone.zone_token("ingress")
        key = ResourceKey("ZoneIngress", None, "ingress-01")
        registration = await client.register("ingress", ingress(), token)

        async def closed() -> bool:
            insight = await zone.insight(key)
            return insight.spec["subscriptions"][-1]["disconnectTime"] is not None

        # The server closes the subscription itself: offline for any reader's liveness.
        await eventually(closed, what="the silent subscription to be closed")
        assert not await zone.online(key)
        with pytest.raises(SubscriptionEnded, match="expired"):
            await client.heartbeat("ingress", key, registration.subscription, token)


async def test_an_agent_registers_again_when_its_subscription_expired(tmp_path):
    async with zone_plane(tmp_path, heartbeat_timeout=0.3) as zone, zone.client() as client:
        token = await zone.zone_token("ingress")
        # Heartbeats slower than the timeout: the server closes the subscription in between.
        agent = ProxyAgent(
            client, proxy_type="ingress", document=ingress(), token=token, heartbeat_interval=1.0
        )
        async with anyio.create_task_group() as group:
            first = await group.start(agent.run)

            async def registered_twice() -> bool:
                return agent.registrations >= 2

            await eventually(registered_twice, what="a second registration")
            assert agent.subscription != first
            group.cancel_scope.cancel()


async def test_a_registration_keeps_the_services_the_control_plane_advertises(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        token = await zone.zone_token("ingress")
        key = ResourceKey("ZoneIngress", None, "ingress-01")
        await client.register("ingress", ingress(), token)
        proxy = await zone.store.get(key)
        services = [{"tags": {"kuma.io/service": "backend"}, "instances": 1, "mesh": "default"}]
        await zone.store.commit(
            [
                Upsert(
                    key=key,
                    labels=proxy.labels,
                    spec={**proxy.spec, "availableServices": services},
                    expected_version=proxy.version,
                )
            ]
        )
        await client.register("ingress", ingress(), token)  # kds-dp restarted
        assert (await zone.store.get(key)).spec["availableServices"] == services


async def test_goodbye_and_heartbeat_of_an_unknown_proxy(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        token = await zone.zone_token("ingress")
        key = ResourceKey("ZoneIngress", None, "never-registered")
        with pytest.raises(SubscriptionEnded, match="is not registered with zone 'zone-1'"):
            await client.heartbeat("ingress", key, "0" * 32, token)
        with pytest.raises(SubscriptionEnded):
            await client.goodbye("ingress", key, "0" * 32, token)


# -- refusals ------------------------------------------------------------------------------


async def test_tokens_that_do_not_allow_the_proxy_are_refused_with_the_reason(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        egress_only = await zone.zone_token("egress")
        cp_only = await zone.zone_token("cp")
        other_zone = await zone.zone_token("ingress", zone="zone-2")
        other_mesh = await issue_dataplane_token(zone.store, mesh="payments", valid_for=HOUR)
        other_name = await issue_dataplane_token(
            zone.store, mesh="default", name="frontend-1", valid_for=HOUR
        )
        revoked = await zone.zone_token("ingress")
        await revoke(zone.store, [token_id(revoked)])
        cases: list[tuple[ProxyType, dict[str, Any], str, int, str]] = [
            ("ingress", ingress(), egress_only, 403, "lacks scope 'ingress' (it has: egress)"),
            ("ingress", ingress(), cp_only, 403, "lacks scope 'ingress' (it has: cp)"),
            ("egress", egress(), await zone.zone_token("ingress"), 403, "lacks scope 'egress'"),
            ("ingress", ingress(), other_zone, 403, "is for zone 'zone-2', not 'zone-1'"),
            ("ingress", ingress(), revoked, 401, "was revoked"),
            ("ingress", ingress(), "not-a-token", 401, "malformed"),
            ("ingress", ingress(), "", 401, "no zone token was given"),
            ("dataplane", dataplane(), other_mesh, 403, "is for mesh 'payments', not 'default'"),
            ("dataplane", dataplane(), other_name, 403, "is for dataplane 'frontend-1'"),
            ("dataplane", dataplane(), egress_only, 403, "a dataplane token is required"),
        ]
        for proxy_type, document, token, status, reason in cases:
            with pytest.raises(ProxyRefused) as refused:
                await client.register(proxy_type, document, token)
            assert refused.value.status == status, (proxy_type, reason, refused.value)
            assert reason in refused.value.reason
            assert token not in refused.value.reason or not token
        assert await zone.store.list_resources("ZoneIngress") == []
        assert await zone.store.list_resources("Dataplane") == []


async def test_a_running_proxy_whose_token_is_revoked_is_refused(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        token = await zone.zone_token("ingress")
        agent = ProxyAgent(
            client, proxy_type="ingress", document=ingress(), token=token, heartbeat_interval=0.05
        )

        async def revoke_once_registered() -> None:
            await eventually(lambda: _heartbeats(agent, 1), what="a heartbeat")
            await revoke(zone.store, [token_id(token)])

        async with anyio.create_task_group() as group:
            group.start_soon(revoke_once_registered)
            with pytest.raises(ProxyRefused, match="zone token was revoked") as refused:
                await agent.run()
        assert refused.value.status == 401


async def test_resources_the_server_refuses_name_the_field(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        token = await zone.zone_token("ingress", "egress")
        cases: list[tuple[ProxyType, dict[str, Any], str]] = [
            (
                "ingress",
                ingress(labels={"kuma.io/zone": "zone-2"}),
                "resource.labels[\"kuma.io/zone\"]: names zone 'zone-2'",
            ),
            ("ingress", ingress(zone="zone-2"), "resource.zone: names zone 'zone-2'"),
            ("ingress", egress(), "resource.type: must be ZoneIngress"),
            ("egress", ingress(), "resource.type: must be ZoneEgress"),
            (
                "ingress",
                {**ingress(), "networking": {"address": "127.0.0.1"}},
                "resource.networking.port: is required",
            ),
            (
                "ingress",
                {**ingress(), "networking": {"address": "127.0.0.1", "port": 70000}},
                "resource.networking.port: must be between 1 and 65535",
            ),
            ("ingress", {**ingress(), "netwroking": {}}, "did you mean 'networking'?"),
            ("ingress", {**ingress(), "mesh": "default"}, "resource.mesh: must not be set"),
            (
                "ingress",
                ingress(labels={"kuma.io/origin": "global"}),
                "must be 'zone': a proxy belongs to its zone",
            ),
        ]
        for proxy_type, document, reason in cases:
            with pytest.raises(ProxyRefused) as refused:
                await client.register(proxy_type, document, token)
            assert refused.value.status == 400
            assert reason in refused.value.reason, refused.value.reason
        assert await zone.store.list_resources("ZoneIngress") == []


async def test_malformed_requests_are_refused(tmp_path):
    async with (
        zone_plane(tmp_path) as zone,
        httpx.AsyncClient(
            base_url=zone.url, verify=ssl.create_default_context(cafile=zone.ca_file)
        ) as http,
    ):
        cases = [
            ("/v1/proxies", b"[1]", "body: must be a JSON object"),
            ("/v1/proxies", b"{", "body: is not valid JSON"),
            ("/v1/proxies", b'{"a": 1, "a": 2}', "appears twice"),
            ("/v1/proxies", b'{"proxyType": "sidecar"}', "proxyType: must be one of"),
            ("/v1/proxies", b'{"proxyType": "ingress", "x": 1}', "x: unknown field"),
            (
                "/v1/proxies/heartbeat",
                b'{"proxyType": "dataplane", "name": "a", "subscription": "s"}',
                "mesh: is required",
            ),
            (
                "/v1/proxies/heartbeat",
                b'{"proxyType": "ingress", "subscription": "s"}',
                "name: is required",
            ),
        ]
        for path, body, reason in cases:
            response = await http.post(path, content=body)
            assert response.status_code == 400, (body, response.text)
            assert reason in response.json()["detail"]
        assert (await http.get("/v1/proxies")).status_code == 405
        assert (await http.get("/nowhere")).status_code == 404
        index = (await http.get("/")).json()
        assert index["zone"] == ZONE
        assert index["service"] == "dataplane-server"


async def test_a_dataplane_of_a_mesh_the_zone_does_not_have_yet_is_retried(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        token = await issue_dataplane_token(zone.store, mesh="payments", valid_for=HOUR)
        with pytest.raises(ControlPlaneUnavailable, match="mesh 'payments' does not exist"):
            await client.register("dataplane", dataplane(mesh="payments"), token)


async def test_a_zone_without_signing_keys_yet_asks_proxies_to_retry(tmp_path):
    (tmp_path / "global").mkdir()
    async with open_store(tmp_path / "global") as global_store:
        token = await issue_zone_token(global_store, zone=ZONE, scopes=["ingress"])
    # This zone has not received the global's public keys: not a refusal, a "later".
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        with pytest.raises(ControlPlaneUnavailable, match="has not received the token signing"):
            await client.register("ingress", ingress(), token)


async def test_a_copy_from_the_global_cannot_be_taken_over(tmp_path):
    async with zone_plane(tmp_path) as zone, zone.client() as client:
        key = ResourceKey("ZoneIngress", None, "ingress-01")
        await zone.store.commit(
            [
                Upsert(
                    key=key,
                    labels={LABEL_ORIGIN: ORIGIN_GLOBAL, LABEL_ZONE: "zone-2"},
                    spec={"networking": ingress()["networking"]},
                )
            ]
        )
        with pytest.raises(ProxyRefused, match="copy from the global control plane") as refused:
            await client.register("ingress", ingress(), await zone.zone_token("ingress"))
        assert refused.value.status == 409


# -- TLS and retries -----------------------------------------------------------------------


async def test_a_client_that_does_not_trust_the_certificate_is_not_retried(tmp_path):
    async with zone_plane(tmp_path) as zone:
        token = await zone.zone_token("ingress")
        async with DataplaneClient(zone.url) as untrusting:
            agent = ProxyAgent(untrusting, proxy_type="ingress", document=ingress(), token=token)
            with pytest.raises(ControlPlaneUntrusted, match="self-signed certificate"):
                await agent.run()


async def test_a_client_of_an_unusable_ca_file_says_which(tmp_path):
    missing = tmp_path / "missing.crt"
    with pytest.raises(ConfigError, match=f"CA certificate file {missing}: cannot read it"):
        DataplaneClient("https://127.0.0.1:5678", ca_file=missing)
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        DataplaneClient("https://127.0.0.1:5678", ca_file=garbage)
    with pytest.raises(ValueError, match="must be the https:// URL"):
        DataplaneClient("http://127.0.0.1:5678")


async def test_an_agent_retries_with_backoff_until_the_server_is_up(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="kds.dp")
    port = free_port()
    async with open_store(tmp_path) as store:
        token = await issue_zone_token(store, zone=ZONE, scopes=["ingress"], valid_for=HOUR)
        # The certificate exists before the server listens: the client can trust it now.
        DataplaneServer(
            store, zone=ZONE, verifier=TokenVerifier(store), work_dir=tmp_path / "work"
        ).ssl_context()
        client = DataplaneClient(f"https://127.0.0.1:{port}", ca_file=tmp_path / "work/kds-cp.crt")
        agent = ProxyAgent(
            client,
            proxy_type="ingress",
            document=ingress(),
            token=token,
            retry_base=0.05,
            retry_max=0.2,
        )
        async with client, anyio.create_task_group() as group:
            group.start_soon(agent.run)

            async def retried() -> bool:
                return len(_retries(caplog)) >= 3

            await eventually(retried, what="three logged retries")
            async with serving(store, tmp_path, port=port) as zone:
                key = ResourceKey("ZoneIngress", None, "ingress-01")
                await eventually(lambda: zone.online(key), what="the ingress to register")
                group.cancel_scope.cancel()
    retries = _retries(caplog)
    assert "connection refused" in retries[0]
    # One line per attempt, numbered.
    assert [f"(attempt {n})" in line for n, line in enumerate(retries[:3], 1)] == [True] * 3


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]


async def test_a_configured_certificate_that_does_not_match_its_key_is_named(tmp_path):
    async with open_store(tmp_path) as store:
        first = DataplaneServer(store, zone=ZONE, verifier=TokenVerifier(store), work_dir=tmp_path)
        first.ssl_context()
        other = tmp_path / "other"
        DataplaneServer(
            store, zone=ZONE, verifier=TokenVerifier(store), work_dir=other
        ).ssl_context()
        mismatched = DataplaneServer(
            store,
            zone=ZONE,
            verifier=TokenVerifier(store),
            work_dir=tmp_path,
            cert_file=tmp_path / "kds-cp.crt",
            key_file=other / "kds-cp.key",
        )
        with pytest.raises(ConfigError, match="does not belong to the certificate"):
            mismatched.ssl_context()


# -- many proxies in one process ---------------------------------------------------------


async def test_fifty_proxies_in_one_process_register_and_heartbeat(tmp_path):
    count = 50
    async with zone_plane(tmp_path) as zone, zone.client(max_connections=20) as client:
        token = await issue_dataplane_token(zone.store, mesh="default", valid_for=HOUR)
        agents = [
            ProxyAgent(
                client,
                proxy_type="dataplane",
                document=dataplane(f"backend-{index}"),
                token=token,
                heartbeat_interval=0.5,
            )
            for index in range(count)
        ]
        started = datetime.now(UTC)
        async with anyio.create_task_group() as group:
            for agent in agents:
                group.start_soon(agent.run)

            async def all_heartbeating() -> bool:
                return all(agent.heartbeats >= 2 for agent in agents)

            await eventually(all_heartbeating, what="every proxy to heartbeat twice")
            insights = await zone.store.list_resources("DataplaneInsight", mesh="default")
            assert len(insights) == count
            assert all(zone.server.is_online(insight) for insight in insights)
            assert all(
                datetime.fromisoformat(i.spec["subscriptions"][-1]["lastSeen"]) > started
                for i in insights
            )
            group.cancel_scope.cancel()
        # Every one said goodbye.
        insights = await zone.store.list_resources("DataplaneInsight", mesh="default")
        assert not any(zone.server.is_online(insight) for insight in insights)
        assert all(agent.registrations == 1 for agent in agents)
