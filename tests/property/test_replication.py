"""Replication converges whatever happens on the way: random writes interleaved with faults.

One GlobalEngine and two or three ZoneEngines run over a MemoryTransport while a
program (:mod:`tests.property.replication_model`) writes on every plane, cuts
sessions, refuses connections, restarts engines, compacts logs and disables
zones. Once every zone is enabled and connections are accepted again, each plane
must hold exactly what the model says (key, labels and spec), on memory and on
SQLite stores.
"""

from __future__ import annotations

import contextlib
import itertools
import typing
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel
import attrs
import pytest
from hypothesis import given

from kds.resource import (
    LABEL_KDS_SYNC,
    LABEL_ORIGIN,
    LABEL_POLICY_ROLE,
    LABEL_ZONE,
    ORIGIN_GLOBAL,
    ORIGIN_ZONE,
    ResourceKey,
)
from kds.store import Cursor, Delete, Upsert
from kds.sync import GlobalEngine, SyncOptions, ZoneEngine, tracking_origin
from kds.sync.engines import GLOBAL_ORIGIN
from kds.sync.lifecycle import zone_key
from kds.testing import MemoryTransport, StoreFactory, StoreSpec
from tests.property.replication_model import (
    Accept,
    AwaitSessions,
    CompactGlobal,
    CompactZone,
    DisableZone,
    EnableZone,
    GlobalDelete,
    GlobalUpsert,
    Model,
    Op,
    Pause,
    Program,
    Refuse,
    RestartGlobal,
    RestartZone,
    Settle,
    Sever,
    ZoneDelete,
    ZoneUpsert,
    authority_problems,
    comparable_global_view,
    describe_diff,
    expected_global_view,
    expected_zone_view,
    programs,
    view_of,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection

    from anyio.abc import TaskGroup, TaskStatus

    from kds.store import Store

pytestmark = pytest.mark.anyio

DEADLINE: Final = 30.0
"""Seconds the federation gets to converge (it usually takes well under one)."""

GRACE: Final = 1.0
"""Seconds a quiescent federation may keep disagreeing with the model before failing.

Quiescent means every enabled zone has applied the global's whole log and the
global every such zone's: nothing is left in flight that could still change the
compared state, so a disagreement then is final. Failing after a short grace
instead of the full deadline keeps Hypothesis' shrinking of a failure quick."""

STALL: Final = 5.0
"""Seconds an enabled zone may stay behind without its cursors moving before failing.

Reconnecting takes at most ``reconnect_max`` plus a handshake: a zone that stays
behind without moving for this long is stuck, not slow."""

POLL: Final = 0.02

FAST: Final = SyncOptions(
    heartbeat_interval=0.1,
    heartbeat_timeout=0.6,
    handshake_timeout=2.0,
    reconnect_base=0.02,
    reconnect_max=0.2,
    insight_interval=0.2,
)


@pytest.fixture(scope="module", params=["memory", "sqlite"])
def plane_stores(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> StoreFactory:
    """New, empty stores for each plane of each example, of one backend."""
    if request.param == "memory":

        async def memory_spec() -> StoreSpec:
            return StoreSpec("memory")

        return StoreFactory("memory", memory_spec, durable=False)
    directory = tmp_path_factory.mktemp("replication")
    numbers = itertools.count()

    async def sqlite_spec() -> StoreSpec:
        path = directory / f"plane-{next(numbers)}.db"
        # Every commit goes through the one store instance, which wakes its waiters at
        # once; durability across power loss is not what this test is about.
        kwargs = {"path": str(path), "poll_interval": 0.05, "synchronous": "normal"}
        return StoreSpec("sqlite", kwargs)

    return StoreFactory("sqlite", sqlite_spec, durable=True)


# -- running a federation -------------------------------------------------------------


@attrs.define
class _Task:
    """An engine's task: cancelled through *scope*; *done* once it has fully ended."""

    scope: anyio.CancelScope = attrs.Factory(anyio.CancelScope)
    done: anyio.Event = attrs.Factory(anyio.Event)

    async def stop(self) -> None:
        self.scope.cancel()
        with anyio.fail_after(DEADLINE):
            await self.done.wait()


@attrs.define
class _Positions:
    """Heads and tracking cursors of every plane, read together."""

    global_cursor: Cursor
    zone_cursors: dict[str, Cursor]
    zones_in_global: dict[str, Cursor | None]  # each zone's tracking of the global's log
    global_in_zones: dict[str, Cursor | None]  # the global's tracking of each zone's log

    def caught_up(self, zone: str) -> bool:
        """Whether *zone* applied the global's whole log and the global the zone's."""
        return (
            self.zones_in_global[zone] == self.global_cursor
            and self.global_in_zones[zone] == self.zone_cursors[zone]
        )


class Federation:
    """A global and its zones, each engine restartable, each store kept throughout."""

    def __init__(
        self,
        group: TaskGroup,
        global_store: Store,
        zone_stores: dict[str, Store],
    ) -> None:
        self.group = group
        self.global_store = global_store
        self.zone_stores = zone_stores
        self.transport = MemoryTransport()
        self.global_engine: GlobalEngine | None = None
        self.zone_engines: dict[str, ZoneEngine] = {}
        self._global_task: _Task | None = None
        self._zone_tasks: dict[str, _Task] = {}
        self.refusing = False

    async def _launch(self, run: Callable[..., Awaitable[None]], *, reports_start: bool) -> _Task:
        """Run *run* in the federation's task group until the returned task is stopped."""
        task = _Task()

        async def body(*, task_status: TaskStatus[None]) -> None:
            with task.scope:
                try:
                    if reports_start:
                        await run(task_status=task_status)
                    else:
                        task_status.started()
                        await run()
                finally:
                    task.done.set()

        await self.group.start(body)
        return task

    async def start_global(self) -> None:
        engine = GlobalEngine(self.global_store, self.transport, options=FAST)
        self._global_task = await self._launch(engine.run, reports_start=True)
        self.global_engine = engine

    async def start_zone(self, zone: str) -> None:
        engine = ZoneEngine(
            self.zone_stores[zone], self.transport.with_identity(zone), zone=zone, options=FAST
        )
        self._zone_tasks[zone] = await self._launch(engine.run, reports_start=False)
        self.zone_engines[zone] = engine

    async def start(self) -> None:
        await self.start_global()
        for zone in self.zone_stores:
            await self.start_zone(zone)

    async def restart_global(self) -> None:
        assert self._global_task is not None
        await self._global_task.stop()
        await self.start_global()

    async def restart_zone(self, zone: str) -> None:
        await self._zone_tasks[zone].stop()
        await self.start_zone(zone)

    def accept(self) -> None:
        """Accept connections (again)."""
        self.transport.accept_connections()
        self.refusing = False

    async def await_sessions(self, zones: Collection[str]) -> None:
        """Wait until each of *zones* has a session open on the global."""
        with anyio.move_on_after(DEADLINE):
            while True:
                if all(self.connected(zone) for zone in zones):
                    return
                # Polling: the engines offer no event for "connected".
                await anyio.sleep(POLL)
        missing = [zone for zone in zones if not self.connected(zone)]
        lines = [f"{missing} did not connect within {DEADLINE}s", *self.status()]
        raise AssertionError("\n".join(lines))

    async def apply(self, op: Op, *, enabled: Collection[str]) -> None:
        """Do *op* to the running federation, in which *enabled* zones may connect."""
        match op:
            case GlobalUpsert(key=key, labels=labels, spec=spec):
                await self.global_store.commit([Upsert(key=key, labels=labels, spec=spec)])
            case GlobalDelete(key=key):
                await self.global_store.commit([Delete(key=key, missing_ok=True)])
            case ZoneUpsert(zone=zone, key=key, labels=labels, spec=spec):
                await self.zone_stores[zone].commit([Upsert(key=key, labels=labels, spec=spec)])
            case ZoneDelete(zone=zone, key=key):
                await self.zone_stores[zone].commit([Delete(key=key, missing_ok=True)])
            case Pause(turns=turns):
                for _ in range(turns):
                    await anyio.lowlevel.checkpoint()
            case AwaitSessions():
                if not self.refusing:
                    await self.await_sessions(enabled)
            case Sever():
                self.transport.sever_all("network cut")
            case Refuse():
                self.transport.refuse_connections()
                self.refusing = True
            case Accept():
                self.accept()
            case RestartZone(zone=zone):
                await self.restart_zone(zone)
            case RestartGlobal():
                await self.restart_global()
            case CompactGlobal():
                await self.global_store.compact(await self.global_store.head())
            case CompactZone(zone=zone):
                store = self.zone_stores[zone]
                await store.compact(await store.head())
            case DisableZone(zone=zone):
                await self.set_enabled(zone, enabled=False)
            case EnableZone(zone=zone):
                await self.set_enabled(zone, enabled=True)
            case Settle():
                pass  # needs the model: see run_program

    async def set_enabled(self, zone: str, *, enabled: bool) -> None:
        """Enable or disable *zone* on the global, as an operator would."""
        await self.global_store.commit([Upsert(key=zone_key(zone), spec={"enabled": enabled})])

    # -- observing ------------------------------------------------------------------

    async def positions(self) -> _Positions:
        stores = self.zone_stores
        return _Positions(
            global_cursor=await self.global_store.cursor(),
            zone_cursors={zone: await store.cursor() for zone, store in stores.items()},
            zones_in_global={zone: await s.tracking(GLOBAL_ORIGIN) for zone, s in stores.items()},
            global_in_zones={
                zone: await self.global_store.tracking(tracking_origin(zone)) for zone in stores
            },
        )

    def connected(self, zone: str) -> bool:
        """Whether the global has a session of *zone* open."""
        return self.global_engine is not None and zone in self.global_engine.connected_zones

    def status(self) -> list[str]:
        """Each engine's connection state, for failure messages."""
        lines = []
        for zone, engine in self.zone_engines.items():
            lines.append(
                f"  {zone}: connected={engine.connected} sessions={engine.sessions} "
                f"last_error={engine.last_error!r} on_global={self.connected(zone)}"
            )
        return lines


async def problems_now(fed: Federation, model: Model) -> tuple[list[str], _Positions, bool]:
    """How the federation differs from *model* now, its positions, and whether it is quiescent.

    The stores are read between two readings of every head and tracking cursor; if
    those moved, the views may not belong together, and the answer is "not
    quiescent" whatever the differences.
    """
    before = await fed.positions()
    global_actual = view_of(await fed.global_store.list_resources())
    zones_actual = {
        zone: view_of(await store.list_resources()) for zone, store in fed.zone_stores.items()
    }
    after = await fed.positions()
    disabled = set(model.disabled)
    enabled = model.enabled()
    quiescent = before == after and all(after.caught_up(zone) for zone in enabled)

    problems: list[str] = []
    global_compared = comparable_global_view(global_actual, disabled)
    global_diff = describe_diff(expected_global_view(model), global_compared)
    global_diff += [f"  {line}" for line in authority_problems(global_compared, model)]
    if global_diff:
        problems += ["global:", *global_diff]
    for zone in enabled:
        expected = expected_zone_view(zone, model.zone_local[zone], global_actual, disabled)
        zone_diff = describe_diff(expected, zones_actual[zone])
        if zone_diff:
            problems += [f"{zone}:", *zone_diff]
    for zone in sorted(disabled):
        # Refused while disabled: its copies of the global's resources are as they were,
        # but its own resources must be untouched and its session gone.
        local = model.zone_local[zone]
        kept = {k: v for k, v in zones_actual[zone].items() if not _from_global(v)}
        zone_diff = describe_diff(local, kept)
        if fed.connected(zone):
            zone_diff.append("  still connected to the global although disabled")
        if zone_diff:
            problems += [f"{zone} (disabled):", *zone_diff]
    return problems, after, quiescent


def _from_global(value: tuple[dict[str, str], Any]) -> bool:
    return value[0].get(LABEL_ORIGIN) == ORIGIN_GLOBAL


async def settle(fed: Federation, model: Model, program: Program) -> None:
    """Accept connections and wait until the federation agrees with *model*.

    Fails with the differences when it does not by :data:`DEADLINE`, when it is
    quiescent and still disagrees for longer than :data:`GRACE`, or when an
    enabled zone stays behind without moving for :data:`STALL` seconds.
    """
    fed.accept()
    enabled = model.enabled()
    problems: list[str] = []
    verdict = f"not converged after {DEADLINE}s"
    disagreeing_since: float | None = None
    # Per enabled zone: its cursors (both ways) when last seen to move, and when.
    progress: dict[str, tuple[object, float]] = {}
    with anyio.move_on_after(DEADLINE):
        while True:
            problems, positions, quiescent = await problems_now(fed, model)
            now = anyio.current_time()
            if not problems:
                if quiescent:
                    return
                disagreeing_since = None
            elif quiescent:
                if disagreeing_since is None:
                    disagreeing_since = now
                elif now - disagreeing_since > GRACE:
                    verdict = f"quiescent, yet still different after {GRACE}s"
                    break
            stuck = []
            for zone in enabled:
                cursors = (positions.zones_in_global[zone], positions.global_in_zones[zone])
                if zone not in progress or progress[zone][0] != cursors:
                    progress[zone] = (cursors, now)
                elif not positions.caught_up(zone) and now - progress[zone][1] > STALL:
                    stuck.append(zone)
            if stuck:
                verdict = f"{', '.join(stuck)} behind and not moving for {STALL}s"
                break
            # Polling: the stores offer no event for "every plane caught up".
            await anyio.sleep(POLL)
    lines = [
        f"the federation did not converge ({verdict}; disabled: {sorted(model.disabled)})",
        *problems,
        "engines:",
        *fed.status(),
        f"positions: {await fed.positions()}",
        f"program: {program}",
    ]
    raise AssertionError("\n".join(lines))


async def run_program(stores: StoreFactory, program: Program) -> None:
    """Run *program* against a new federation, then check that it converges."""
    model = Model(program.zones)
    async with contextlib.AsyncExitStack() as stack:
        global_store = await stack.enter_async_context(await stores.create())
        zone_stores = {
            zone: await stack.enter_async_context(await stores.create()) for zone in program.zones
        }
        async with anyio.create_task_group() as group:
            fed = Federation(group, global_store, zone_stores)
            await fed.start()
            for op in program.ops:
                await fed.apply(op, enabled=model.enabled())
                model.apply(op)
                if isinstance(op, Settle):
                    await settle(fed, model, program)
            for zone in sorted(model.disabled):
                enable = EnableZone(zone)
                await fed.apply(enable, enabled=model.enabled())
                model.apply(enable)
            await settle(fed, model, program)
            group.cancel_scope.cancel()


# -- the tests ------------------------------------------------------------------------


# Each example runs a whole federation, yet only takes tens to hundreds of
# milliseconds (more with SQLite stores than with memory ones), so the active
# profile's number of examples is used as it is: the dev profile runs this file in
# about ten seconds on two cores when replication is correct, and the ci and
# nightly profiles scale it up. (A failure takes minutes: Hypothesis shrinks it.)
@given(program=programs())
async def test_replication_converges_under_random_writes_and_faults(
    plane_stores: StoreFactory, program: Program
) -> None:
    await run_program(plane_stores, program)


def _key(type_name: str, mesh: str | None, name: str) -> ResourceKey:
    return ResourceKey(type_name, mesh, name)


PRODUCER: Final = {LABEL_ORIGIN: ORIGIN_ZONE, LABEL_POLICY_ROLE: "producer"}
NOT_SYNCED: Final = {LABEL_KDS_SYNC: "disabled"}

# Every fault once, between writes that exercise each filter: a zone-local Secret
# that clashes with the global's, internal GlobalSecrets and Configs the global
# keeps, kds-sync: disabled on both sides, producer and consumer policies, a zone
# naming another zone as the origin of its resource.
EXAMPLE: Final = Program(
    zones=("zone-1", "zone-2", "zone-3"),
    ops=(
        GlobalUpsert(_key("Mesh", None, "default"), {}, {}),
        GlobalUpsert(_key("MeshTimeout", "default", "mt-a"), {}, {"note": "1"}),
        GlobalUpsert(_key("MeshTimeout", "default", "mt-b"), NOT_SYNCED, {}),
        GlobalUpsert(_key("Secret", "default", "shared"), {"kuma.io/origin": "global"}, {}),
        GlobalUpsert(_key("GlobalSecret", None, "inter-cp-ca"), {}, {"note": "1"}),
        GlobalUpsert(_key("GlobalSecret", None, "gs"), {}, {}),
        GlobalUpsert(_key("Config", None, "kuma-cluster-id"), {}, {"note": "1"}),
        GlobalUpsert(_key("Config", None, "other-config"), {}, {}),
        ZoneUpsert("zone-1", _key("Secret", "default", "shared"), {}, {"note": "local"}),
        ZoneUpsert("zone-1", _key("MeshService", "default", "svc"), {LABEL_ORIGIN: "zone"}, {}),
        ZoneUpsert("zone-2", _key("MeshTimeout", "default", "mt-z"), PRODUCER, {}),
        ZoneUpsert("zone-2", _key("MeshTimeout", "default", "mt-a"), {}, {}),
        ZoneUpsert("zone-3", _key("ZoneIngress", None, "zi"), {LABEL_ZONE: "zone-2"}, {}),
        ZoneUpsert("zone-3", _key("Dataplane", "default", "dp-1"), {}, {}),
        ZoneUpsert("zone-3", _key("Dataplane", "default", "dp-2"), NOT_SYNCED, {}),
        Settle(),
        Sever(),
        AwaitSessions(),
        GlobalUpsert(_key("MeshTimeout", "default", "mt-a"), {"team": "a"}, {"note": "2"}),
        ZoneUpsert("zone-1", _key("Secret", "default", "local-only"), {}, {}),
        Refuse(),
        ZoneDelete("zone-3", _key("Dataplane", "default", "dp-1")),
        GlobalDelete(_key("GlobalSecret", None, "gs")),
        GlobalUpsert(_key("Secret", "default", "shared"), {"team": "a"}, {"note": "2"}),
        Accept(),
        RestartZone("zone-2"),
        ZoneUpsert("zone-2", _key("MeshTimeout", "default", "mt-z"), PRODUCER, {"note": "2"}),
        RestartGlobal(),
        ZoneUpsert("zone-1", _key("MeshService", "default", "svc"), {}, {"note": "2"}),
        CompactGlobal(),
        CompactZone("zone-1"),
        Settle(),
        DisableZone("zone-2"),  # while connected and caught up
        Settle(),  # zone-2 refused, its producer policy gone from zone-1 and zone-3
        ZoneUpsert("zone-2", _key("Dataplane", "default", "dp-1"), {}, {}),
        Sever(),  # the others resume without a snapshot while zone-2 is disabled
        EnableZone("zone-2"),
    ),
)


async def test_a_fixed_program_with_every_fault_converges(plane_stores: StoreFactory) -> None:
    await run_program(plane_stores, EXAMPLE)


def test_the_fixed_program_uses_every_operation() -> None:
    used = {type(op) for op in EXAMPLE.ops}
    assert used >= set(typing.get_args(Op)) - {Pause}
