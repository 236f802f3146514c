"""The insight reconcilers over SQLite stores, and ``kdsctl inspect services`` over the API.

Each test waits for what it expects by following the store's log (every change a
reconciler makes is a commit) or polling the API, always under a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal
from click.testing import CliRunner

from kds import Delete, ResourceKey, Upsert, Upserted
from kds.api import ApiServer
from kds.cli.ctl import ControlPlaneEntry, CtlConfig, main, save_ctl_config
from kds.insights import (
    AvailableServices,
    ServiceInsights,
    service_insight_name,
    service_insight_spec,
)
from kds.resource import hashed_name
from kds.sync.rules import zone_to_global
from kds.testing.checks import read_all
from kds_stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path

    from kds import Store

pytestmark = pytest.mark.anyio

TIMEOUT = 30  # seconds; a deadline for what is awaited, never a pause
INTERVAL = 0.05  # the reconcilers' debounce in these tests


# -- helpers -------------------------------------------------------------------------------------


async def until(store: Store, condition: Callable[[], Awaitable[bool]]) -> None:
    """Return once *condition* holds, checking it after each commit to *store*."""
    with anyio.fail_after(TIMEOUT):
        head = await store.head()
        if await condition():
            return
        async with contextlib.aclosing(store.follow(head)) as events:
            async for _ in events:
                if await condition():
                    return


async def services_of(store: Store, mesh: str = "default") -> dict[str, Any] | None:
    found = await store.find(ResourceKey("ServiceInsight", mesh, service_insight_name(mesh)))
    return None if found is None else dict(found.spec["services"])


def has_services(store: Store, expected: dict[str, Any] | None, mesh: str = "default"):
    async def check() -> bool:
        return await services_of(store, mesh) == expected

    return check


def subscription(seen: datetime, *, disconnected: bool = False) -> dict[str, Any]:
    return {
        "id": "sub-1",
        "connectTime": seen.isoformat(),
        "lastSeen": seen.isoformat(),
        "disconnectTime": seen.isoformat() if disconnected else None,
    }


def on_global(
    type_name: str, mesh: str, name: str, zone: str
) -> tuple[ResourceKey, dict[str, str]]:
    """The key and labels of a zone's resource as the global holds it (hash-suffix name)."""
    copy = zone_to_global(ResourceKey(type_name, mesh, name), {}, zone)
    return copy.key, dict(copy.labels)


def dataplane(
    name: str, service: str, *, zone: str, mesh: str = "default", online: bool = True
) -> list[Upsert]:
    """A zone's Dataplane and its DataplaneInsight, as replicated to the global."""
    key, labels = on_global("Dataplane", mesh, name, zone)
    spec = {
        "networking": {
            "address": "10.0.0.1",
            "inbound": [{"port": 8080, "tags": {"kuma.io/service": service}}],
        }
    }
    insight_key, insight_labels = on_global("DataplaneInsight", mesh, name, zone)
    seen = datetime.now(UTC)
    insight = {"subscriptions": [subscription(seen, disconnected=not online)]}
    return [
        Upsert(key=key, labels=labels, spec=spec),
        Upsert(key=insight_key, labels=insight_labels, spec=insight),
    ]


def removed(name: str, *, zone: str, mesh: str = "default") -> list[Delete]:
    return [
        Delete(key=on_global(type_name, mesh, name, zone)[0])
        for type_name in ("Dataplane", "DataplaneInsight")
    ]


def service(status: str, online: int, total: int, zones: list[str]) -> dict[str, Any]:
    return {
        "status": status,
        "dataplanes": {"total": total, "online": online, "offline": total - online},
        "serviceType": "internal",
        "zones": zones,
    }


MESH = Upsert(key=ResourceKey("Mesh", None, "default"))


async def open_store(path: Path) -> SQLiteStore:
    store = SQLiteStore(path, poll_interval=0.05, synchronous="normal")
    await store.open()
    return store


# -- ServiceInsights ---------------------------------------------------------------------------


async def test_service_insight_follows_dataplanes_and_their_insights(tmp_path):
    store = await open_store(tmp_path / "global.sqlite")
    async with contextlib.aclosing(store), anyio.create_task_group() as group:
        await group.start(ServiceInsights(store, liveness=3600.0, interval=INTERVAL).run)

        await store.commit([MESH])
        await until(store, has_services(store, {}))

        await store.commit(
            [
                *dataplane("be-1", "backend", zone="zone-1"),
                *dataplane("be-2", "backend", zone="zone-2"),
                *dataplane("web-1", "web", zone="zone-1", online=False),
            ]
        )
        expected = {
            "backend": service("online", 2, 2, ["zone-1", "zone-2"]),
            "web": service("offline", 0, 1, ["zone-1"]),
        }
        await until(store, has_services(store, expected))

        # zone-2's dataplane says goodbye; zone-1's is removed with its insight.
        await store.commit(
            [
                *dataplane("be-2", "backend", zone="zone-2", online=False),
                *removed("web-1", zone="zone-1"),
            ]
        )
        expected = {"backend": service("partially_degraded", 1, 2, ["zone-1", "zone-2"])}
        await until(store, has_services(store, expected))

        # A mesh without a Mesh resource still gets a ServiceInsight while it has dataplanes.
        await store.commit(dataplane("x-1", "x", zone="zone-3", mesh="orphan"))
        expected_orphan = {"x": service("online", 1, 1, ["zone-3"])}
        await until(store, has_services(store, expected_orphan, "orphan"))

        # Gone with the last of them, as the other mesh's is gone with its Mesh.
        await store.commit(
            [
                Delete(key=MESH.key),
                *removed("be-1", zone="zone-1"),
                *removed("be-2", zone="zone-2"),
                *removed("x-1", zone="zone-3", mesh="orphan"),
            ]
        )
        await until(store, has_services(store, None))
        await until(store, has_services(store, None, "orphan"))
        group.cancel_scope.cancel()


async def test_a_dataplane_that_stops_heartbeating_turns_offline_without_a_commit(tmp_path):
    store = await open_store(tmp_path / "global.sqlite")
    async with contextlib.aclosing(store), anyio.create_task_group() as group:
        await group.start(ServiceInsights(store, liveness=1.0, interval=INTERVAL).run)
        await store.commit([MESH])
        online = {"backend": service("online", 1, 1, ["zone-1"])}
        offline = {"backend": service("offline", 0, 1, ["zone-1"])}

        async def heartbeat(*, task_status=anyio.TASK_STATUS_IGNORED):
            # The proxy refreshes lastSeen until it is stopped (a slow machine may
            # need several beats before the reconciler sees it online).
            task_status.started()
            while True:
                await store.commit(dataplane("be-1", "backend", zone="zone-1"))
                await anyio.sleep(0.2)

        async with anyio.create_task_group() as beats:
            await beats.start(heartbeat)
            await until(store, has_services(store, online))
            beats.cancel_scope.cancel()
        head = await store.head()
        await until(store, has_services(store, offline))
        # Nothing but the reconciler's own write happened since the heartbeats stopped.
        assert {event.key.type for event in await store.read(head)} <= {"ServiceInsight"}
        group.cancel_scope.cancel()


async def test_two_reconcilers_on_one_store_agree_and_do_not_flap(tmp_path):
    path = tmp_path / "global.sqlite"
    first, second = await open_store(path), await open_store(path)
    steps: list[tuple[list[Any], dict[str, Any]]] = [
        ([MESH], {}),
        (
            [*dataplane("a", "backend", zone="zone-1"), *dataplane("b", "backend", zone="zone-2")],
            {"backend": service("online", 2, 2, ["zone-1", "zone-2"])},
        ),
        (
            dataplane("b", "backend", zone="zone-2", online=False),
            {"backend": service("partially_degraded", 1, 2, ["zone-1", "zone-2"])},
        ),
        (
            [*dataplane("c", "web", zone="zone-2"), *removed("a", zone="zone-1")],
            {
                "backend": service("offline", 0, 1, ["zone-2"]),
                "web": service("online", 1, 1, ["zone-2"]),
            },
        ),
    ]
    async with (
        contextlib.aclosing(first),
        contextlib.aclosing(second),
        anyio.create_task_group() as group,
    ):
        await group.start(ServiceInsights(first, liveness=3600.0, interval=INTERVAL).run)
        await group.start(ServiceInsights(second, liveness=3600.0, interval=INTERVAL).run)
        for number, (changes, expected) in enumerate(steps):
            # Commits that change no ServiceInsight (heartbeats, other types), then the
            # step, alternately through each store.
            writer = (first, second)[number % 2]
            for beat in range(3):
                zone = Upsert(key=ResourceKey("Zone", None, "zone-1"), labels={"beat": f"{beat}"})
                heartbeat = dataplane("a", "backend", zone="zone-1") if number == 2 else []
                await writer.commit([zone, *heartbeat])
            await writer.commit(changes)
            await until(first, has_services(first, expected))
            await until(second, has_services(second, expected))
        group.cancel_scope.cancel()

    async with SQLiteStore(path) as store:
        key = ResourceKey("ServiceInsight", "default", service_insight_name("default"))
        written = [
            dict(event.resource.spec["services"])
            for event in await read_all(store, 0)
            if event.key == key and isinstance(event, Upserted)
        ]
    # Exactly one write per step, in order: neither undid the other's.
    assert written == [expected for _, expected in steps]


def replay_specs(events: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    """The mesh "default"'s ServiceInsight spec computed from the view after each event."""
    view: dict[ResourceKey, Any] = {}
    specs = []
    for event in events:
        if isinstance(event, Upserted):
            view[event.key] = event.resource
        else:
            view.pop(event.key, None)
        of_type = lambda name: [  # noqa: E731
            r for k, r in view.items() if k.type == name and k.mesh == "default"
        ]
        spec = service_insight_spec(
            of_type("Dataplane"), of_type("DataplaneInsight"), now=datetime.now(UTC), liveness=3600
        )
        specs.append((event.revision, spec))
    return specs


@pytest.mark.parametrize("seed", [1, 2])
async def test_two_reconcilers_never_write_from_older_inputs_than_the_last_write(tmp_path, seed):
    # Changes arrive through both stores without waiting: every write must reflect
    # the inputs of a view at least as new as the one the previous write came from,
    # whichever reconciler made either (otherwise a reconciler undid the other's).
    rnd = random.Random(seed)
    path = tmp_path / "global.sqlite"
    first, second = await open_store(path), await open_store(path)
    async with (
        contextlib.aclosing(first),
        contextlib.aclosing(second),
        anyio.create_task_group() as group,
    ):
        await group.start(ServiceInsights(first, liveness=3600.0, interval=0.01).run)
        await group.start(ServiceInsights(second, liveness=3600.0, interval=0.01).run)
        await first.commit([MESH])
        zones: dict[str, str] = {}
        for _ in range(40):
            name, writer = f"dp-{rnd.randrange(5)}", rnd.choice([first, second])
            if name in zones and rnd.random() < 0.3:
                await writer.commit(removed(name, zone=zones.pop(name)))
            else:
                zone = zones.setdefault(name, rnd.choice(["zone-1", "zone-2"]))
                online = rnd.random() < 0.6
                await writer.commit(
                    dataplane(name, rnd.choice(["a", "b"]), zone=zone, online=online)
                )
            if rnd.random() < 0.3:
                await anyio.sleep(rnd.random() * 0.05)  # varies the interleaving
        final = replay_specs(await read_all(first, 0))[-1][1]["services"]
        await until(first, has_services(first, final))
        await until(second, has_services(second, final))
        group.cancel_scope.cancel()

    async with SQLiteStore(path) as store:
        events = await read_all(store, 0)
    key = ResourceKey("ServiceInsight", "default", service_insight_name("default"))
    computed = replay_specs(events)
    previous = 0
    for event in events:
        if event.key == key and isinstance(event, Upserted):
            views = [spec for revision, spec in computed if previous <= revision < event.revision]
            assert dict(event.resource.spec) in views, f"a stale write at {event.revision}"
            previous = event.revision


async def test_reconciler_recovers_when_compaction_overtakes_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kds.insights")
    store = await open_store(tmp_path / "global.sqlite")
    gate = anyio.Event()
    gate.set()
    gates = [gate]
    read = store.read

    async def gated_read(after: int, **kwargs: Any):
        # Holds the reconciler's reads while the log is compacted past it.
        await gates[0].wait()
        return await read(after, **kwargs)

    store.read = gated_read  # type: ignore[method-assign]
    async with contextlib.aclosing(store), anyio.create_task_group() as group:
        await group.start(ServiceInsights(store, liveness=3600.0, interval=INTERVAL).run)
        await store.commit([MESH])
        with anyio.fail_after(TIMEOUT):
            while await services_of(store) != {}:
                await store.wait_for_commit(await store.head())
        gates[0] = anyio.Event()  # closed
        await store.commit(dataplane("a", "backend", zone="zone-1"))
        await store.compact(await store.head())
        gates[0].set()
        store.read = read  # type: ignore[method-assign]
        await until(store, has_services(store, {"backend": service("online", 1, 1, ["zone-1"])}))
        group.cancel_scope.cancel()
    assert any("recomputing from a snapshot" in r.getMessage() for r in caplog.records)


# -- AvailableServices ---------------------------------------------------------------------------


async def test_available_services_of_the_zones_own_ingresses(tmp_path):
    store = await open_store(tmp_path / "zone.sqlite")
    local = {"kuma.io/origin": "zone", "kuma.io/zone": "zone-1"}
    ingress = ResourceKey("ZoneIngress", None, "ingress-1")
    registered = {"networking": {"address": "10.0.0.9", "port": 10001}}
    # Another zone's ingress, as the global sends it: never touched here.
    foreign = ResourceKey("ZoneIngress", None, hashed_name("", "ingress-1", "zone-2"))
    foreign_labels = {"kuma.io/origin": "global", "kuma.io/zone": "zone-2"}

    def dp(name: str, mesh: str, tags: dict[str, str]) -> Upsert:
        inbound = [{"port": 8080, "tags": tags}]
        return Upsert(
            key=ResourceKey("Dataplane", mesh, name),
            labels=local,
            spec={"networking": {"address": "10.0.0.1", "inbound": inbound}},
        )

    async def available() -> object:
        return (await store.get(ingress)).spec.get("availableServices")

    def available_is(expected: object):
        async def check() -> bool:
            return await available() == expected

        return check

    v1 = {"kuma.io/service": "backend", "version": "v1"}
    async with contextlib.aclosing(store), anyio.create_task_group() as group:
        await store.commit(
            [
                Upsert(
                    key=ResourceKey("Mesh", None, "secure"), spec={"mtls": {"enabledBackend": "ca"}}
                ),
                Upsert(key=ResourceKey("Mesh", None, "plain")),
                Upsert(key=ingress, labels=local, spec=registered),
                Upsert(key=foreign, labels=foreign_labels, spec={"availableServices": []}),
                dp("a", "secure", v1),
                dp("b", "secure", v1),
                dp("c", "plain", {"kuma.io/service": "web"}),
            ]
        )
        await group.start(AvailableServices(store, interval=INTERVAL).run)
        entry = {"tags": v1, "instances": 2, "mesh": "secure"}
        await until(store, available_is([entry]))
        assert (await store.get(ingress)).spec["networking"] == registered["networking"]

        # Registered again (the proxy restarted): the list is put back.
        await store.commit([Upsert(key=ingress, labels=local, spec=registered)])
        await until(store, available_is([entry]))

        # mTLS on in "plain": its services are offered too; off in "secure": not any more.
        await store.commit(
            [
                Upsert(
                    key=ResourceKey("Mesh", None, "plain"), spec={"mtls": {"enabledBackend": "ca"}}
                ),
                Upsert(key=ResourceKey("Mesh", None, "secure")),
            ]
        )
        web = {"tags": {"kuma.io/service": "web"}, "instances": 1, "mesh": "plain"}
        await until(store, available_is([web]))
        group.cancel_scope.cancel()
        assert (await store.get(foreign)).spec == {"availableServices": []}
        assert (await store.get(foreign)).version == 1


# -- kdsctl inspect services ---------------------------------------------------------------------


async def _serve(path, mode, stop, *, task_status):
    async with SQLiteStore(path, synchronous="normal") as store:
        options: dict[str, Any] = {"zone": "zone-1"} if mode == "zone" else {}
        server = ApiServer(store, mode=mode, liveness=3600.0, **options)
        async with anyio.create_task_group() as group:
            url = await group.start(server.serve, "127.0.0.1", 0)
            if mode == "global":
                await group.start(ServiceInsights(store, liveness=3600.0, interval=INTERVAL).run)
            task_status.started((url, store))
            await stop.wait()
            group.cancel_scope.cancel()


@contextlib.contextmanager
def plane(tmp_path: Path, mode: str = "global") -> Iterator[tuple[Any, str, SQLiteStore]]:
    with start_blocking_portal("asyncio") as portal:
        stop = portal.call(anyio.Event)
        future, (url, store) = portal.start_task(_serve, tmp_path / f"{mode}.sqlite", mode, stop)
        try:
            yield portal, url, store
        finally:
            portal.call(stop.set)
            future.result(timeout=TIMEOUT)


def kdsctl(tmp_path: Path, url: str, *args: str):
    config = tmp_path / "kdsctl" / "config"
    save_ctl_config(CtlConfig((ControlPlaneEntry("test", url),), "test"), config)
    result = CliRunner().invoke(main, ["--config-file", str(config), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_inspect_services_shows_status_and_warns_about_cross_zone_without_mtls(tmp_path):
    with plane(tmp_path) as (portal, url, store):
        portal.call(
            store.commit,
            [
                MESH,
                Upsert(
                    key=ResourceKey("Mesh", None, "secure"), spec={"mtls": {"enabledBackend": "ca"}}
                ),
                *dataplane("be-1", "backend", zone="zone-1"),
                *dataplane("web-1", "web", zone="zone-1"),
                *dataplane("web-2", "web", zone="zone-2", online=False),
                *dataplane("db-1", "db", zone="zone-2", online=False),
                *dataplane("pay-1", "payments", zone="zone-1", mesh="secure"),
                *dataplane("pay-2", "payments", zone="zone-2", mesh="secure"),
            ],
        )

        async def ready() -> bool:
            return len(await services_of(store) or {}) == 3

        portal.call(until, store, ready)
        portal.call(until, store, lambda: _has_insight(store, "secure"))

        result = kdsctl(tmp_path, url, "inspect", "services", "-m", "default")
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [
            "SERVICE   STATUS               DATAPLANES",
            "backend   Online               1/1",
            "db        Offline              0/1",
            "web       Partially degraded   1/2",
        ]
        assert result.stderr.splitlines() == [
            'WARNING: mesh "default" has dataplanes in zones zone-1, zone-2 but mTLS is '
            "disabled; cross-zone traffic needs mTLS"
        ]

        # Without -m, the default mesh, as kumactl does.
        default = kdsctl(tmp_path, url, "inspect", "services")
        assert (
            default.stdout == kdsctl(tmp_path, url, "inspect", "services", "-m", "default").stdout
        )

        # Every mesh: a MESH column first; the mesh with mTLS gets no warning.
        result = kdsctl(tmp_path, url, "inspect", "services", "--all-meshes")
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["MESH", "SERVICE", "STATUS", "DATAPLANES"]
        assert [line.split()[:2] for line in lines[1:]] == [
            ["default", "backend"],
            ["default", "db"],
            ["default", "web"],
            ["secure", "payments"],
        ]
        assert lines[-1].split() == ["secure", "payments", "Online", "2/2"]
        assert len(result.stderr.splitlines()) == 1
        assert 'mesh "default"' in result.stderr

        result = kdsctl(tmp_path, url, "inspect", "services", "-m", "secure", "-o", "json")
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        listed = json.loads(result.stdout)
        assert listed["total"] == 1
        assert listed["items"][0]["name"] == "all-services-secure"
        assert listed["items"][0]["services"]["payments"]["zones"] == ["zone-1", "zone-2"]

        result = kdsctl(tmp_path, url, "inspect", "services", "-m", "nope")
        assert result.exit_code == 1
        assert result.stderr == 'Error: Mesh "nope" not found\n'

        insight = httpx.get(f"{url}/global-insight").json()
        assert insight["meshes"] == {"total": 2, "withoutMtlsAcrossZones": ["default"]}


async def _has_insight(store: Store, mesh: str) -> bool:
    return await services_of(store, mesh) is not None


def test_inspect_services_on_a_zone_reads_the_globals_copy(tmp_path):
    with plane(tmp_path, "zone") as (portal, url, store):
        # What a zone holds: its own dataplane, and the global's ServiceInsight copy.
        copy = ResourceKey(
            "ServiceInsight", "default", hashed_name("default", "all-services-default")
        )
        spec = {"services": {"backend": service("partially_degraded", 1, 2, ["zone-1", "zone-2"])}}
        labels = {"kuma.io/origin": "global", "kuma.io/display-name": "all-services-default"}
        portal.call(
            store.commit,
            [MESH, Upsert(key=copy, labels=labels, spec=spec)],
        )
        result = kdsctl(tmp_path, url, "inspect", "services", "-m", "default")
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[1].split() == ["backend", "Partially", "degraded", "1/2"]
        assert "zones zone-1, zone-2 but mTLS is disabled" in result.stderr

        # A mesh without a ServiceInsight yet: just the header.
        portal.call(store.commit, [Upsert(key=ResourceKey("Mesh", None, "new"))])
        result = kdsctl(tmp_path, url, "inspect", "services", "-m", "new")
        assert result.exit_code == 0, result.output
        assert result.stdout == "SERVICE   STATUS   DATAPLANES\n"
        assert result.stderr == ""
