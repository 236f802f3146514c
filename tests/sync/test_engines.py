"""GlobalEngine and ZoneEngine over the memory transport: authority, faults, resume, lifecycle."""

from __future__ import annotations

import contextlib
import functools
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import pytest

from kds import ResourceKey, Upsert
from kds.catalog import DEFAULT_CATALOG
from kds.errors import SessionClosedError
from kds.protocol import (
    SUPPORTED_VERSIONS,
    Ack,
    Batch,
    Goodbye,
    Hello,
    Ping,
    Pong,
    Reject,
    Reset,
    Welcome,
    decode_frame,
    encode_frame,
    pack_resource,
)
from kds.resource import Resource, ResourceType, Scope, SyncFlag, hashed_name
from kds.store import Delete, Upserted
from kds.sync import GlobalEngine, SharedSnapshots, SyncOptions, ZoneEngine, engines, lifecycle
from kds.sync.engines import GLOBAL_ORIGIN, tracking_origin
from kds.sync.lifecycle import insight_key, zone_key
from kds.testing import MemoryStore, MemoryTransport
from kds.testing.checks import capture

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from kds.resource import Catalog
    from kds.store import Change, Store, Tracking
    from kds.transport import Session

pytestmark = pytest.mark.anyio

DEADLINE = 30.0
FAST = SyncOptions(
    heartbeat_interval=0.1,
    heartbeat_timeout=0.6,
    handshake_timeout=2.0,
    reconnect_base=0.02,
    reconnect_max=0.2,
    insight_interval=0.2,
)


def mesh_timeout(name: str, *, mesh: str = "default", **labels: str) -> Upsert:
    return Upsert(key=ResourceKey("MeshTimeout", mesh, name), labels=labels, spec={})


def zone_resource(type_name: str, name: str, mesh: str | None = None, **spec: Any) -> Upsert:
    return Upsert(
        key=ResourceKey(type_name, mesh, name), labels={"kuma.io/origin": "zone"}, spec=spec
    )


async def wait_for(condition: Callable[[], Any], what: str) -> None:
    """Wait until *condition()* (sync or async) is truthy, failing after the deadline."""
    with anyio.fail_after(DEADLINE):
        while True:
            result = condition()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await anyio.sleep(0.01)  # polling a condition with no event to wait on
    raise AssertionError(what)


async def store_with(*changes: Upsert, catalog: Catalog = DEFAULT_CATALOG) -> MemoryStore:
    store = MemoryStore(catalog=catalog)
    await store.open()
    if changes:
        await store.commit(list(changes))
    return store


@contextlib.asynccontextmanager
async def running_global(
    store: Store, transport: MemoryTransport, *, options: SyncOptions = FAST, **kwargs: Any
) -> AsyncIterator[GlobalEngine]:
    engine = GlobalEngine(store, transport, options=options, **kwargs)
    async with anyio.create_task_group() as group:
        await group.start(engine.run)
        yield engine
        group.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def running_zone(
    store: Store,
    transport: MemoryTransport,
    zone: str,
    *,
    options: SyncOptions = FAST,
    **kwargs: Any,
) -> AsyncIterator[ZoneEngine]:
    engine = ZoneEngine(store, transport.with_identity(zone), zone=zone, options=options, **kwargs)
    async with anyio.create_task_group() as group:
        group.start_soon(engine.run)
        yield engine
        group.cancel_scope.cancel()


async def names(store: Store, type_name: str) -> set[str]:
    return {r.key.name for r in await store.list_resources(type_name)}


async def names_include(store: Store, name: str) -> bool:
    return name in await names(store, "MeshTimeout")


def record_commits(
    monkeypatch: pytest.MonkeyPatch, store: MemoryStore
) -> list[tuple[list[ResourceKey], str | None]]:
    """What each later commit to *store* carries: its keys and its tracking origin."""
    commits: list[tuple[list[ResourceKey], str | None]] = []
    commit = MemoryStore.commit

    async def recording(
        self: MemoryStore, changes: Sequence[Change], *, tracking: Tracking | None = None
    ) -> int:
        if self is store:
            origin = None if tracking is None else tracking.origin
            commits.append(([change.key for change in changes], origin))
        return await commit(self, changes, tracking=tracking)

    monkeypatch.setattr(MemoryStore, "commit", recording)
    return commits


# -- authority ----------------------------------------------------------------------


async def test_a_zone_cannot_claim_another_zones_name():
    transport = MemoryTransport()
    global_store = await store_with()
    async with running_global(global_store, transport) as engine:
        # Authenticated by the transport as zone-2, claiming zone-1.
        liar = ZoneEngine(
            await store_with(), transport.with_identity("zone-2"), zone="zone-1", options=FAST
        )
        async with anyio.create_task_group() as group:
            group.start_soon(liar.run)
            await wait_for(lambda: engine.refusals >= 1, "the claim is refused")
            group.cancel_scope.cancel()
    assert liar.sessions == 0
    assert liar.last_error is not None
    assert "authenticated as zone 'zone-2'" in liar.last_error
    assert await global_store.find(zone_key("zone-1")) is None


async def test_a_lying_zone_only_ever_writes_its_own_copies():
    """zone-2 labels its resources as zone-1's and as the global's, and sends a Mesh."""
    transport = MemoryTransport()
    global_store = await store_with(
        Upsert(key=ResourceKey("Mesh", None, "default"), spec={}),
        # A global resource named exactly as zone-2's copy of "svc" would be.
        Upsert(
            key=ResourceKey("MeshService", "default", hashed_name("default", "svc", "zone-2")),
            spec={"ports": []},
        ),
    )
    zone1 = await store_with(zone_resource("ZoneIngress", "zi-1"))
    zone2 = await store_with(
        Upsert(
            key=ResourceKey("ZoneIngress", None, "zi-1"),
            labels={"kuma.io/origin": "zone", "kuma.io/zone": "zone-1"},
            spec={"zone": "zone-1"},
        ),
        Upsert(
            key=ResourceKey("Dataplane", "default", "dp"),
            labels={"kuma.io/zone": "zone-1"},  # no origin: local, but claims zone-1
            spec={},
        ),
        zone_resource("MeshService", "svc", "default"),
    )
    zi1_on_global = hashed_name("", "zi-1", "zone-1")
    async with running_global(global_store, transport) as engine:
        async with running_zone(zone1, transport, "zone-1"):
            await wait_for(
                lambda: global_store.find(ResourceKey("ZoneIngress", None, zi1_on_global)),
                "zone-1's ingress on the global",
            )
        before = await global_store.get(ResourceKey("ZoneIngress", None, zi1_on_global))
        async with running_zone(zone2, transport, "zone-2") as liar:
            dp_key = ResourceKey("Dataplane", "default", hashed_name("default", "dp", "zone-2"))
            await wait_for(lambda: global_store.find(dp_key), "zone-2's Dataplane")
            await wait_for(lambda: liar.current_stats.rejected["MeshService"] == 1, "a NACK")
            # It deletes its "zone-1" ingress: only its own copy may go.
            await zone2.commit([Delete(key=ResourceKey("ZoneIngress", None, "zi-1"))])
            zi1_as_zone2 = ResourceKey("ZoneIngress", None, hashed_name("", "zi-1", "zone-2"))
            await wait_for(
                lambda: _missing(global_store, zi1_as_zone2), "zone-2's ingress copy deleted"
            )
    dataplane = await global_store.get(dp_key)
    assert dataplane.labels["kuma.io/zone"] == "zone-2"
    assert dataplane.labels["kuma.io/origin"] == "zone"
    # zone-1's copy is untouched, and so is the global's own MeshService.
    assert await global_store.get(ResourceKey("ZoneIngress", None, zi1_on_global)) == before
    service = await global_store.get(
        ResourceKey("MeshService", "default", hashed_name("default", "svc", "zone-2"))
    )
    assert "kuma.io/origin" not in service.labels
    assert service.spec == {"ports": []}
    assert engine.stats.refused["MeshService"] == 1


async def _missing(store: Store, key: ResourceKey) -> bool:
    return await store.find(key) is None


async def test_a_zone_sending_a_type_it_does_not_own_is_refused_per_resource():
    """Over a raw session: a Mesh in a zone's batch is NACKed, the rest applied."""
    transport = MemoryTransport()
    global_store = await store_with()
    async with running_global(global_store, transport):
        session = await transport.with_identity("zone-1").connect()
        async with session:
            welcome = await handshake(session, "zone-1")
            assert welcome.cursor is None
            mesh = Upserted(revision=1, resource=resource("Mesh", None, "sneaky"))
            dataplane = Upserted(revision=2, resource=resource("Dataplane", "default", "dp"))
            await send_frame(
                session, Reset(epoch="zone-log", revision=0, index=0, resources=(), final=True)
            )
            await send_frame(session, Batch(epoch="zone-log", events=(mesh, dataplane), revision=2))
            answers = await receive_until(
                session, lambda f: f.kind in ("ack", "nack") and f.revision == 2
            )
    nack = answers[-1]
    assert nack.kind == "nack"
    assert [r.key for r in nack.rejected] == [mesh.key]
    assert "zones do not send 'Mesh'" in nack.rejected[0].reason
    assert await global_store.find(ResourceKey("Mesh", None, "sneaky")) is None
    assert await global_store.find(
        ResourceKey("Dataplane", "default", hashed_name("default", "dp", "zone-1"))
    )


# -- raw sessions ---------------------------------------------------------------------


def resource(type_name: str, mesh: str | None, name: str, **labels: str) -> Resource:
    now = datetime.now(UTC)
    return Resource(
        key=ResourceKey(type_name, mesh, name),
        labels=labels,
        spec={},
        version=1,
        created_at=now,
        modified_at=now,
    )


async def send_frame(session: Session, frame: Any) -> None:
    await session.send(encode_frame(frame))


async def receive_until(session: Session, done: Callable[[Any], bool]) -> list[Any]:
    """Frames from the global until one satisfies *done*, answering its Pings."""
    frames = []
    with anyio.fail_after(DEADLINE):
        while True:
            frame = decode_frame(await session.receive())
            frames.append(frame)
            if isinstance(frame, Ping):
                await send_frame(session, Pong(nonce=frame.nonce))
            if done(frame):
                return frames


async def drain(session: Session) -> list[Any]:
    """Every frame until the session ends (which it must before the deadline)."""
    frames: list[Any] = []
    with anyio.fail_after(DEADLINE):
        while True:
            try:
                data = await session.receive()
            except SessionClosedError:
                return frames
            frames.append(decode_frame(data))


async def handshake(session: Session, zone: str) -> Welcome:
    hello = Hello(
        protocol_versions=SUPPORTED_VERSIONS,
        zone=zone,
        credentials=None,
        features=frozenset(),
        cursor=None,
        max_frame_size=1 << 20,
        types=frozenset(DEFAULT_CATALOG.names()),
        instance_id="raw",
        software_version="test",
    )
    await send_frame(session, hello)
    frames = await receive_until(session, lambda f: isinstance(f, Welcome | Reject))
    welcome = frames[-1]
    assert isinstance(welcome, Welcome), welcome
    return welcome


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"\xc1 not msgpack", id="undecodable"),
        pytest.param(
            encode_frame(Batch(epoch="e", events=(), revision=3)), id="batch-before-reset"
        ),
        pytest.param(
            encode_frame(
                Welcome(
                    protocol_version=1,
                    features=frozenset(),
                    instance_id="x",
                    cursor=None,
                    max_frame_size=1024,
                    types=frozenset(),
                    heartbeat_interval=1.0,
                    software_version="x",
                )
            ),
            id="welcome-from-a-zone",
        ),
    ],
)
async def test_a_bad_frame_ends_the_session_with_a_goodbye_and_changes_nothing(bad: bytes):
    transport = MemoryTransport()
    global_store = await store_with(Upsert(key=ResourceKey("Mesh", None, "default"), spec={}))
    async with running_global(global_store, transport):
        session = await transport.with_identity("zone-1").connect()
        async with session:
            await handshake(session, "zone-1")
            # Let the initial snapshot arrive and be acknowledged first.
            chunks = await receive_until(session, lambda f: isinstance(f, Reset) and f.final)
            await send_frame(session, Ack(revision=chunks[-1].revision))
            before = await capture(global_store)
            await session.send(bad)
            frames = await receive_until(session, lambda f: isinstance(f, Goodbye))
            await drain(session)  # and then the session ends
    assert frames[-1].code == "protocol-error"
    after = await capture(global_store)
    # Only the zone's own bookkeeping (its ZoneInsight) may have moved.
    assert [c for c in after.view if c[0].type != "ZoneInsight"] == [
        c for c in before.view if c[0].type != "ZoneInsight"
    ]
    assert [e for e in after.events if e[2].type != "ZoneInsight"] == [
        e for e in before.events if e[2].type != "ZoneInsight"
    ]


async def test_a_silent_global_is_detected_and_the_zone_reconnects():
    transport = MemoryTransport()
    hellos = 0

    async def silent_global(session: Session) -> None:
        nonlocal hellos
        frame = decode_frame(await session.receive())
        assert isinstance(frame, Hello)
        hellos += 1
        welcome = Welcome(
            protocol_version=1,
            features=frozenset(),
            instance_id="silent",
            cursor=None,
            max_frame_size=1 << 20,
            types=frozenset(DEFAULT_CATALOG.names()),
            heartbeat_interval=0.1,
            software_version="test",
        )
        await session.send(encode_frame(welcome))
        await anyio.sleep_forever()  # never answers a Ping again

    zone_store = await store_with()
    async with anyio.create_task_group() as group:
        await group.start(transport.serve, silent_global)
        async with running_zone(zone_store, transport, "zone-1") as zone:
            await wait_for(lambda: hellos >= 2, "a second session after the timeout")
            assert zone.sessions >= 1
            assert zone.last_error is not None
        group.cancel_scope.cancel()


async def test_a_silent_zone_is_detected_by_the_global():
    transport = MemoryTransport()
    global_store = await store_with()
    async with running_global(global_store, transport) as engine:
        session = await transport.with_identity("zone-1").connect()
        async with session:
            await handshake(session, "zone-1")
            # Say nothing more, answer nothing.
            frames = await drain(session)
        goodbyes = [f for f in frames if isinstance(f, Goodbye)]
        assert goodbyes
        assert goodbyes[0].code == "heartbeat-timeout"
        await wait_for(lambda: not engine.connected_zones, "the zone is gone")


# -- resume and reset ---------------------------------------------------------------

RESOURCES = 10_000
MISSED = 10


async def test_resume_sends_only_what_was_missed_and_compaction_forces_one_reset():
    transport = MemoryTransport()
    global_store = await store_with(
        Upsert(key=ResourceKey("Mesh", None, "default"), spec={}),
        *(mesh_timeout(f"timeout-{i:05d}") for i in range(RESOURCES)),
    )
    zone_store = await store_with()
    expected_names = {hashed_name("default", f"timeout-{i:05d}") for i in range(RESOURCES)}

    async def converged() -> bool:
        return await names(zone_store, "MeshTimeout") == expected_names

    async with running_global(global_store, transport):
        async with running_zone(zone_store, transport, "zone-1") as zone:
            await wait_for(converged, "the first sync")
        first = zone.stats
        assert first.resets_received == 1

        # Offline while MISSED resources change; then a reconnect.
        await global_store.commit(
            [mesh_timeout(f"timeout-{i:05d}", team=f"t{i}") for i in range(MISSED)]
        )

        async def labelled() -> bool:
            found = await zone_store.list_resources("MeshTimeout", labels={"team": "t0"})
            return len(found) == 1

        async with running_zone(zone_store, transport, "zone-1") as zone:
            await wait_for(labelled, "the missed changes")
            await wait_for(lambda: zone.connected, "connected")
        resumed = zone.stats
        assert resumed.resets_received == 0
        assert sum(resumed.received.values()) <= MISSED

        # Offline while history is compacted away: the next session needs a reset.
        await global_store.commit(
            [Delete(key=ResourceKey("MeshTimeout", "default", "timeout-00000"))]
        )
        await global_store.compact(await global_store.head())
        expected_names.discard(hashed_name("default", "timeout-00000"))
        async with running_zone(zone_store, transport, "zone-1") as zone:
            await wait_for(converged, "convergence after the reset")
        reset = zone.stats
    assert reset.resets_received == 1
    assert sum(reset.received.values()) == RESOURCES - 1 + 1  # the timeouts and the Mesh
    # Resuming costs what was missed, not what exists.
    assert resumed.bytes_received < reset.bytes_received / 100


async def test_a_zone_moves_the_globals_cursor_once_per_heartbeat_not_per_change(monkeypatch):
    # Every batch a zone applies logs copies it never sends back, so its cursor in
    # the global lags after each; a move costs the global a commit. With N zones,
    # one move per change would be N global commits per change.
    options = attrs.evolve(
        FAST, heartbeat_interval=2.0, heartbeat_timeout=10.0, insight_interval=60.0
    )
    transport = MemoryTransport()
    global_store = await store_with()
    commits = record_commits(monkeypatch, global_store)
    zone_store = await store_with()
    origin = tracking_origin("zone-1")
    async with (
        running_global(global_store, transport, options=options),
        running_zone(zone_store, transport, "zone-1", options=options) as zone,
    ):
        await wait_for(lambda: zone.connected, "connected")
        commits.clear()
        started = time.monotonic()
        for number in range(10):
            await global_store.commit([mesh_timeout(f"t{number}")])
            copy = hashed_name("default", f"t{number}")
            await wait_for(
                functools.partial(names_include, zone_store, copy), f"t{number} in the zone"
            )
            # Workload shape, not synchronisation: the zone's log falls quiet after each
            # change, which is when the engines used to move the cursor at once.
            await anyio.sleep(0.1)
        elapsed = time.monotonic() - started
        moves = [keys for keys, tracked in commits if tracked == origin]
        assert len(moves) <= 1 + elapsed / (0.9 * options.heartbeat_interval), moves

        # It still moves, within a heartbeat interval: a reconnect resumes from here.
        async def moved() -> bool:
            return await global_store.tracking(origin) == await zone_store.cursor()

        await wait_for(moved, "the global's cursor in the zone's log at its head")
        assert await zone_store.tracking(GLOBAL_ORIGIN) == await global_store.cursor()


async def test_the_global_refreshes_every_connected_zones_insight_in_one_commit(monkeypatch):
    # One commit per zone would wake every zone's session once per zone per interval.
    transport = MemoryTransport()
    global_store = await store_with()
    commits = record_commits(monkeypatch, global_store)
    zones = ("zone-1", "zone-2", "zone-3")
    insights = {insight_key(zone) for zone in zones}
    async with (
        running_global(global_store, transport) as engine,
        contextlib.AsyncExitStack() as stack,
    ):
        for zone in zones:
            await stack.enter_async_context(running_zone(await store_with(), transport, zone))
        await wait_for(lambda: len(engine.connected_zones) == len(zones), "all connected")
        commits.clear()

        def refreshed_together() -> int:
            return sum(insights <= set(keys) for keys, _ in commits)

        await wait_for(lambda: refreshed_together() >= 3, "three refreshes of all insights")
    for zone in zones:
        insight = await global_store.get(insight_key(zone))
        assert insight.spec["subscriptions"][-1]["lastSeen"] is not None


# -- lifecycle ------------------------------------------------------------------------


async def test_zone_is_created_online_then_offline_with_its_subscriptions():
    transport = MemoryTransport()
    global_store = await store_with()
    liveness = FAST.insight_interval * 3
    async with running_global(global_store, transport):
        async with running_zone(await store_with(), transport, "zone-1"):

            async def online() -> bool:
                insight = await global_store.find(insight_key("zone-1"))
                return lifecycle.is_online(insight, now=datetime.now(UTC), liveness=liveness)

            await wait_for(online, "zone-1 online")
            zone = await global_store.get(zone_key("zone-1"))
            assert zone.spec == {"enabled": True}

        async def offline() -> bool:
            return not await online()

        # The global notices the session end on its own time.
        await wait_for(offline, "zone-1 offline")
        insight = await global_store.get(insight_key("zone-1"))
        (subscription,) = insight.spec["subscriptions"]
        assert subscription["disconnectTime"] is not None
        assert subscription["globalInstanceId"].startswith("global-")
        async with running_zone(await store_with(), transport, "zone-1"):
            await wait_for(online, "zone-1 online again")
        await wait_for(offline, "zone-1 offline again")
    insight = await global_store.get(insight_key("zone-1"))
    assert len(insight.spec["subscriptions"]) == 2
    assert all(s["disconnectTime"] is not None for s in insight.spec["subscriptions"])


def test_a_subscription_left_open_by_a_crashed_global_goes_offline():
    now = datetime.now(UTC)
    stale = (now - timedelta(seconds=60)).isoformat()
    insight = resource("ZoneInsight", None, "zone-1")
    insight = Resource(
        key=insight.key,
        labels={},
        spec={"subscriptions": [{"connectTime": stale, "lastSeen": stale, "disconnectTime": None}]},
        version=1,
        created_at=now,
        modified_at=now,
    )
    assert lifecycle.is_online(insight, now=now - timedelta(seconds=55), liveness=30)
    assert not lifecycle.is_online(insight, now=now, liveness=30)


async def test_disabling_a_zone_ends_its_session_and_removes_its_ingress_elsewhere():
    transport = MemoryTransport()
    global_store = await store_with()
    zone1 = await store_with(zone_resource("ZoneIngress", "zi-1"))
    zone2 = await store_with()
    copy = hashed_name("", "zi-1", "zone-1")
    async with (
        running_global(global_store, transport) as engine,
        running_zone(zone1, transport, "zone-1") as first,
        running_zone(zone2, transport, "zone-2"),
    ):
        await wait_for(lambda: _has(zone2, "ZoneIngress", copy), "zone-2 sees zi-1")
        await global_store.commit([Upsert(key=zone_key("zone-1"), spec={"enabled": False})])
        await wait_for(lambda: _lacks(zone2, "ZoneIngress", copy), "zi-1 gone from zone-2")
        await wait_for(lambda: "zone-1" not in engine.connected_zones, "zone-1 disconnected")
        await wait_for(lambda: engine.refusals >= 1, "zone-1 refused while disabled")
        assert first.last_error is not None
        assert "disabled" in first.last_error
        await global_store.commit([Upsert(key=zone_key("zone-1"), spec={"enabled": True})])
        await wait_for(lambda: "zone-1" in engine.connected_zones, "zone-1 back")
        await wait_for(lambda: _has(zone2, "ZoneIngress", copy), "zi-1 back in zone-2")
        # Enabled again, zone-1 resumed from its cursors: no snapshot either way
        # beyond its very first session's.
        assert first.current_stats.resets_received == 1
        assert first.current_stats.resets_sent <= 1


async def _has(store: Store, type_name: str, name: str) -> bool:
    return name in await names(store, type_name)


async def _lacks(store: Store, type_name: str, name: str) -> bool:
    return name not in await names(store, type_name)


# -- faults ---------------------------------------------------------------------------


async def test_network_cuts_and_an_unreachable_global_lose_nothing():
    transport = MemoryTransport()
    global_store = await store_with(Upsert(key=ResourceKey("Mesh", None, "default"), spec={}))
    zone_store = await store_with()
    async with (
        running_global(global_store, transport),
        running_zone(zone_store, transport, "zone-1") as zone,
    ):
        await wait_for(lambda: _has(zone_store, "Mesh", "default"), "first sync")
        for round_number in range(5):
            await global_store.commit([mesh_timeout(f"t{round_number}")])
            await zone_store.commit([zone_resource("Dataplane", f"dp{round_number}", "default")])
            transport.sever_all("network cut")
        transport.refuse_connections()
        # The zone keeps working locally while the global is unreachable.
        await zone_store.commit([zone_resource("Dataplane", "offline", "default")])
        await wait_for(lambda: zone.last_error is not None, "the zone noticed")
        transport.accept_connections()
        expected_timeouts = {hashed_name("default", f"t{n}") for n in range(5)}
        expected_dataplanes = {
            hashed_name("default", name, "zone-1")
            for name in [*(f"dp{n}" for n in range(5)), "offline"]
        }

        async def converged() -> bool:
            return (
                await names(zone_store, "MeshTimeout") == expected_timeouts
                and await names(global_store, "Dataplane") == expected_dataplanes
            )

        await wait_for(converged, "convergence after the cuts")
    stats = zone.stats
    assert stats.resets_received == 1  # only the very first session needed a snapshot


async def test_a_rejected_resource_is_sent_again_when_it_changes():
    strict = DEFAULT_CATALOG.with_types(
        ResourceType(
            name="Workload",
            scope=Scope.MESH,
            flags=SyncFlag.ZONE_TO_GLOBAL,
            validator=_needs_owner,
        )
    )
    lax = DEFAULT_CATALOG.with_types(
        ResourceType(name="Workload", scope=Scope.MESH, flags=SyncFlag.ZONE_TO_GLOBAL)
    )
    transport = MemoryTransport()
    global_store = await store_with(catalog=strict)
    zone_store = await store_with(zone_resource("Workload", "w", "default"), catalog=lax)
    copy = ResourceKey("Workload", "default", hashed_name("default", "w", "zone-1"))
    async with (
        running_global(global_store, transport) as engine,
        running_zone(zone_store, transport, "zone-1") as zone,
    ):
        await wait_for(lambda: zone.current_stats.rejected["Workload"] == 1, "a NACK")
        assert await global_store.find(copy) is None
        await zone_store.commit([zone_resource("Workload", "w", "default", owner="me")])
        await wait_for(lambda: global_store.find(copy), "the fixed resource arrives")
    assert engine.stats.refused["Workload"] == 1


def _needs_owner(spec: Any) -> None:
    from kds.errors import ValidationError

    if "owner" not in spec:
        raise ValidationError("spec.owner", "is required")


async def test_a_zone_that_stops_acknowledging_gets_at_most_a_window_of_batches():
    transport = MemoryTransport()
    global_store = await store_with(Upsert(key=ResourceKey("Mesh", None, "default"), spec={}))
    async with running_global(global_store, transport):
        session = await transport.with_identity("zone-1").connect()
        async with session:
            await handshake(session, "zone-1")
            reset = await receive_until(session, lambda f: isinstance(f, Reset) and f.final)
            # The snapshot awaits its ACK; now many changes, one commit each.
            for number in range(3 * FAST.window):
                await global_store.commit([mesh_timeout(f"t{number}")])
            unacked: list[Any] = [reset[-1]]
            # Watch for a while (many heartbeat intervals): answer Pings, ACK nothing.
            with anyio.move_on_after(20 * FAST.heartbeat_interval):
                while True:
                    frame = decode_frame(await session.receive())
                    if isinstance(frame, Ping):
                        await send_frame(session, Pong(nonce=frame.nonce))
                    elif isinstance(frame, Batch):
                        unacked.append(frame)
            assert len(unacked) == FAST.window
            # Acknowledging lets the rest through.
            for frame in unacked:
                await send_frame(session, Ack(revision=frame.revision))
            last = await global_store.head()
            # (A batch that only moves the cursor may come later, past newer events.)
            await receive_until(session, lambda f: isinstance(f, Batch) and f.revision >= last)


def test_reconnect_backoff_grows_to_its_cap_with_jitter():
    options = SyncOptions(reconnect_base=0.5, reconnect_max=8.0)
    engine = ZoneEngine(MemoryStore(), MemoryTransport(), zone="zone-1", options=options)
    for failures, full in [(0, 0.5), (1, 1.0), (2, 2.0), (4, 8.0), (10, 8.0), (1000, 8.0)]:
        delays = [engine._backoff(failures) for _ in range(200)]
        assert all(full / 2 <= delay <= full for delay in delays), (failures, min(delays))
        assert len(set(delays)) > 100  # jittered: zones do not retry in step


async def test_a_zone_disabled_while_another_was_offline_is_removed_on_resume():
    transport = MemoryTransport()
    global_store = await store_with()
    zone1 = await store_with()
    zone3 = await store_with(zone_resource("ZoneIngress", "zi-3"))
    copy = hashed_name("", "zi-3", "zone-3")
    async with running_global(global_store, transport) as engine:
        async with (
            running_zone(zone1, transport, "zone-1"),
            running_zone(zone3, transport, "zone-3"),
        ):
            await wait_for(lambda: _has(zone1, "ZoneIngress", copy), "zone-1 sees zi-3")
        await wait_for(lambda: not engine.connected_zones, "both gone")
        # While zone-1 is away, zone-3 is disabled.
        await global_store.commit([Upsert(key=zone_key("zone-3"), spec={"enabled": False})])
        async with running_zone(zone1, transport, "zone-1") as zone:
            await wait_for(lambda: _lacks(zone1, "ZoneIngress", copy), "zi-3 removed")
            await wait_for(lambda: zone.current_stats.resets_received == 1, "by a snapshot")


async def test_a_zone_gets_only_the_types_it_knows():
    # An older zone that does not know a type the global has.
    zone_catalog = _catalog_without(DEFAULT_CATALOG, "MeshTimeout")
    transport = MemoryTransport()
    global_store = await store_with(
        Upsert(key=ResourceKey("Mesh", None, "default"), spec={}), mesh_timeout("t")
    )
    zone_store = await store_with(catalog=zone_catalog)
    async with (
        running_global(global_store, transport),
        running_zone(zone_store, transport, "zone-1", catalog=zone_catalog) as zone,
    ):
        await wait_for(lambda: _has(zone_store, "Mesh", "default"), "the mesh arrives")
        await global_store.commit(
            [mesh_timeout("t2"), Upsert(key=ResourceKey("Mesh", None, "m2"), spec={})]
        )
        await wait_for(lambda: _has(zone_store, "Mesh", "m2"), "later changes arrive")
        assert zone.sessions == 1  # no frame it cannot read ever ended its session


def _catalog_without(catalog: Catalog, name: str) -> Catalog:
    from kds.resource import Catalog as CatalogClass

    return CatalogClass.of(t for t in catalog if t.name != name)


# -- snapshots shared between sessions --------------------------------------------


async def test_zones_resetting_at_once_share_one_snapshot_and_each_gets_all_of_it(monkeypatch):
    # Kept for the whole test, however slow the machine: the late zone below must
    # find it (expiry has a test of its own).
    monkeypatch.setattr(engines, "SNAPSHOT_KEEP", 600.0)
    transport = MemoryTransport()
    global_store = await store_with(
        Upsert(key=ResourceKey("Mesh", None, "default"), spec={}),
        *(mesh_timeout(f"timeout-{i:03d}") for i in range(300)),
    )
    expected = {hashed_name("default", f"timeout-{i:03d}") for i in range(300)}
    zone_stores = {f"zone-{n}": await store_with() for n in range(1, 6)}

    async def everywhere(name: str) -> bool:
        for store in zone_stores.values():
            if not await _has(store, "MeshTimeout", name):
                return False
        return True

    async with (
        running_global(global_store, transport) as engine,
        contextlib.AsyncExitStack() as zones,
    ):
        # A snapshot still being sent (as by a slow zone's session) when every zone,
        # with an empty store, needs one: each gets that one, none is read again.
        async with engine.snapshots.use() as held:
            for zone, store in zone_stores.items():
                await zones.enter_async_context(running_zone(store, transport, zone))
            for store in zone_stores.values():
                has_all = functools.partial(_names_include, store, "MeshTimeout", expected)
                await wait_for(has_all, "the snapshot")
            # Each zone's first session shared it (a session that ended and resumed
            # on a slow machine shares it again: at least one per zone).
            assert engine.snapshots.taken == 1
            assert engine.snapshots.shared >= len(zone_stores)
            # A change made after it reaches them as events after its revision.
            await global_store.commit([mesh_timeout("later")])
            await wait_for(lambda: everywhere(hashed_name("default", "later")), "the change")
        assert held.cursor.revision < await global_store.head()

        # Nobody holds it any more, but it is kept a while: a zone needing one now
        # gets it too, and the change made since as an event after it.
        assert engine.snapshots.current is not None
        late = await store_with()
        async with running_zone(late, transport, "zone-9") as late_zone:
            later = hashed_name("default", "later")
            await wait_for(lambda: _has(late, "MeshTimeout", later), "the late zone's snapshot")
            assert late_zone.current_stats.resets_received == 1
    assert engine.snapshots.taken == 1
    assert engine.snapshots.shared >= len(zone_stores) + 1


async def test_a_snapshot_nobody_uses_is_let_go_once_it_is_old():
    store = await store_with(mesh_timeout("a"))
    keep = 1.0  # long enough that two statements in a row never take it
    snapshots = SharedSnapshots(store, keep_for=keep)

    def kept() -> object:
        return snapshots.current

    async with anyio.create_task_group() as group:
        group.start_soon(snapshots.run)
        async with snapshots.use() as first:
            assert kept() is first
        # Unused but young: kept, and given to the next session...
        assert kept() is first
        async with snapshots.use() as again:
            assert again is first
        # ...until it is old.
        await wait_for(lambda: kept() is None, "the kept snapshot let go")
        async with snapshots.use() as second:
            assert second is not first
        group.cancel_scope.cancel()
    assert (snapshots.taken, snapshots.shared) == (2, 1)


async def test_a_shared_snapshot_is_not_given_to_a_session_that_needs_a_later_one():
    store = await store_with(mesh_timeout("a"))
    snapshots = SharedSnapshots(store)
    async with snapshots.use() as first:
        async with snapshots.use(at_least=first.cursor.revision) as same:
            assert same is first
        # After a change that made a session start over, it needs one that has it.
        revision = await store.commit([mesh_timeout("b")])
        async with snapshots.use(at_least=revision) as newer:
            assert newer.cursor.revision == revision
            async with snapshots.use() as again:
                assert again is newer  # the newer one is the one shared now
            # Compacted past the one in use: the log no longer goes on from it.
            await store.commit([mesh_timeout("c")])
            await store.compact(await store.head())
            async with snapshots.use() as after_compaction:
                assert after_compaction.cursor.revision == await store.head()
    assert (snapshots.taken, snapshots.shared) == (3, 2)


async def test_a_snapshot_is_let_go_with_its_last_user():
    store = await store_with(mesh_timeout("a"))
    snapshots = SharedSnapshots(store)  # keep_for 0: every snapshot is old at once
    async with snapshots.use() as first, snapshots.use() as second:
        assert second is first
        assert snapshots.current is first  # in use: kept however old
    async with snapshots.use() as third:
        assert third is not first
    assert (snapshots.taken, snapshots.shared) == (2, 1)


async def test_sessions_sharing_a_snapshot_share_its_copies_and_encoded_rows():
    store = await store_with(mesh_timeout("a"), mesh_timeout("b"))
    snapshots = SharedSnapshots(store)
    made: list[ResourceKey] = []

    def make(resource: Resource) -> Resource:
        made.append(resource.key)
        return attrs.evolve(resource, labels={"copy": "yes"})

    async with snapshots.use() as one, snapshots.use() as two:
        copies = [one.copy_of(index, make) for index in range(2)]
        for index, copy in enumerate(copies):
            assert two.copy_of(index, make) is copy
        assert made == [resource.key for resource in one.resources]
        row = one.packed(copies[0])
        assert row == pack_resource(copies[0])
        assert two.packed(copies[0]) is row


async def _names_include(store: Store, type_name: str, expected: set[str]) -> bool:
    return await names(store, type_name) >= expected
