"""Replication converges whatever happens on the way: random writes interleaved with faults.

One GlobalEngine and two or three ZoneEngines run while a program
(:mod:`tests.property.replication_model`) writes on every plane, cuts sessions,
refuses connections, restarts engines, compacts logs and disables zones. Once
every zone is enabled and connections are accepted again, each plane must hold
exactly what the model says (key, labels and spec).

The same federation runs over every network of
:mod:`tests.property.replication_networks`: a MemoryTransport (on memory and on
SQLite stores); gRPC with TLS in one process, the zones dialling through a TCP
relay that cuts and refuses real connections; NATS in one process (one
nats-server for the module, a subject prefix per federation), the zones'
connections to NATS going through such a relay; and gRPC and NATS with each zone
in a process of its own, on a SQLite file this process writes and reads too,
where restarting a zone means killing its process.
"""

from __future__ import annotations

import contextlib
import itertools
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel
import attrs
import pytest
from hypothesis import given, settings

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
from kds.sync import GlobalEngine, SyncOptions, tracking_origin
from kds.sync.engines import GLOBAL_ORIGIN
from kds.sync.lifecycle import zone_key
from kds.testing import NatsServer, StoreFactory, StoreSpec
from tests.conftest import new_kube_store_spec
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
from tests.property.replication_networks import (
    NATS_NETWORKS,
    Network,
    NetworkName,
    Task,
    launch,
    open_network,
)

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator

    from anyio.abc import TaskGroup

    from kds.store import Store
    from kds.testing.kubeapi import KubeApiServer

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
behind without moving for this long is stuck, not slow. Zones whose engine first
needs a process to start get that process's start time on top
(:attr:`replication_networks.Zones.start_time`)."""

POLL: Final = 0.02

FAST: Final = SyncOptions(
    heartbeat_interval=0.1,
    heartbeat_timeout=0.6,
    handshake_timeout=2.0,
    reconnect_base=0.02,
    reconnect_max=0.2,
    insight_interval=0.2,
)

UNHURRIED: Final = SyncOptions(
    heartbeat_interval=0.5,
    heartbeat_timeout=5.0,
    handshake_timeout=10.0,
    reconnect_base=0.05,
    reconnect_max=0.5,
    insight_interval=60.0,
)
"""For stores that answer over HTTP (Kubernetes): reading a whole federation then takes
longer than FAST's insight interval, so zone insights would be rewritten during every
look and the federation would never be seen quiescent."""


# -- where federations run --------------------------------------------------------------


@attrs.frozen
class Layout:
    """One way of running federations: a network and the backend of every plane's store.

    Attributes:
        network: the network's name (see :data:`replication_networks.NETWORKS`).
        stores: new, empty stores for each plane of each example.
        work_dir: kept from one example to the next: the gRPC certificate, zone logs.
        nats_url: the module's NATS server, for the NATS networks.
        options: the engines' timings.
    """

    network: NetworkName
    stores: StoreFactory
    work_dir: Path
    nats_url: str | None = None
    options: SyncOptions = FAST


def _store_factory(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> StoreFactory:
    if backend == "kubernetes":
        # A namespace per plane in the session's API-server stand-in; the data lives
        # in the stand-in's process, so it survives a killed zone process.
        server: KubeApiServer = request.getfixturevalue("kube_api_server")

        async def kubernetes_spec() -> StoreSpec:
            return new_kube_store_spec(server)

        return StoreFactory("kubernetes", kubernetes_spec, durable=True)
    if backend == "memory":

        async def memory_spec() -> StoreSpec:
            return StoreSpec("memory")

        return StoreFactory("memory", memory_spec, durable=False)
    directory = tmp_path_factory.mktemp("replication")
    numbers = itertools.count()

    async def sqlite_spec() -> StoreSpec:
        path = directory / f"plane-{next(numbers)}.db"
        # Every commit in this process goes through the one store instance, which
        # wakes its waiters at once; a zone process notices the test's commits within
        # poll_interval. Durability across power loss is not what this test is about.
        kwargs = {"path": str(path), "poll_interval": 0.05, "synchronous": "normal"}
        return StoreSpec("sqlite", kwargs)

    return StoreFactory("sqlite", sqlite_spec, durable=True)


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    """One NATS server for every NATS federation of the module (each has its own prefix)."""
    with NatsServer() as server:
        yield server


def _layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    network, backend = request.param
    work_dir = tmp_path_factory.mktemp(network)
    nats_url = None
    if network in NATS_NETWORKS:
        # Started by the first NATS layout only: the others need no server.
        server: NatsServer = request.getfixturevalue("nats_server")
        nats_url = server.url
    stores = _store_factory(backend, tmp_path_factory, request)
    options = UNHURRIED if backend == "kubernetes" else FAST
    return Layout(network, stores, work_dir, nats_url, options)


# Zones in other processes need stores that outlive them: SQLite files, or the
# Kubernetes stand-in. Memory stores over gRPC or NATS cost little more than SQLite
# ones, and keep the network the only change from the memory transport runs.
IN_PROCESS: Final = [
    ("memory", "memory"),
    ("memory", "sqlite"),
    ("grpc", "memory"),
    ("grpc", "sqlite"),
    ("nats", "memory"),
    ("nats", "sqlite"),
]
ZONE_PROCESSES: Final = [
    ("grpc-zone-processes", "sqlite"),
    ("nats-zone-processes", "sqlite"),
]


# The Kubernetes store answers over HTTP, so its federations are an order of magnitude
# slower: a test of their own runs fewer examples (the memory network keeps every
# other fault in play; the zone processes add SIGKILLs in the middle of batches).
KUBERNETES: Final = [
    ("memory", "kubernetes"),
    # Kubernetes commits are not transactions: a zone killed mid-batch leaves part of
    # it applied, which the zone's next session must complete without repeating.
    ("grpc-zone-processes", "kubernetes"),
]


def _ids(param: tuple[str, str]) -> str:
    return "+".join(param)


@pytest.fixture(scope="module", params=IN_PROCESS, ids=_ids)
def layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """Every network whose engines all run in this process, with each store backend."""
    return _layout(request, tmp_path_factory)


@pytest.fixture(scope="module", params=ZONE_PROCESSES, ids=_ids)
def layout_with_zone_processes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Layout:
    """gRPC or NATS with every zone engine in a child process of its own, on SQLite files."""
    return _layout(request, tmp_path_factory)


@pytest.fixture(scope="module", params=KUBERNETES, ids=_ids)
def kubernetes_layout(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Layout:
    """Every plane on a Kubernetes store (the API-server stand-in): in this process, and
    with each zone in a child process of its own."""
    return _layout(request, tmp_path_factory)


@pytest.fixture(scope="module", params=IN_PROCESS + KUBERNETES + ZONE_PROCESSES, ids=_ids)
def any_layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """Every layout there is."""
    return _layout(request, tmp_path_factory)


# -- running a federation -------------------------------------------------------------


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
    """A global and its zones, each engine restartable, each store kept throughout.

    The global engine runs in this process, in *group*; the zone engines and the
    links between the planes are the *network*'s.
    """

    def __init__(
        self,
        group: TaskGroup,
        global_store: Store,
        zone_stores: dict[str, Store],
        network: Network,
        options: SyncOptions = FAST,
    ) -> None:
        self.group = group
        self.options = options
        self.global_store = global_store
        self.zone_stores = zone_stores
        self.network = network
        self.global_engine: GlobalEngine | None = None
        self._global_task: Task | None = None
        self.refusing = False

    async def start_global(self) -> None:
        links = self.network.links
        engine = GlobalEngine(self.global_store, links.global_transport(), options=self.options)
        self._global_task, address = await launch(self.group, engine.run, reports_start=True)
        self.global_engine = engine
        await links.serving(address)

    async def start(self) -> None:
        await self.start_global()
        for zone in self.zone_stores:
            await self.network.zones.start(zone)

    async def restart_global(self) -> None:
        assert self._global_task is not None
        await self._global_task.stop()
        await self.start_global()

    async def restart_zone(self, zone: str) -> None:
        await self.network.zones.stop(zone)
        await self.network.zones.start(zone)

    def accept(self) -> None:
        """Accept connections (again)."""
        self.network.links.accept()
        self.refusing = False

    async def await_sessions(self, zones: Collection[str]) -> None:
        """Wait until each of *zones* has a session open on the global."""
        with anyio.move_on_after(DEADLINE):
            while not self.network.zones.exited():
                if all(self.connected(zone) for zone in zones):
                    return
                # Polling: the engines offer no event for "connected".
                await anyio.sleep(POLL)
        missing = [zone for zone in zones if not self.connected(zone)]
        exited = self.network.zones.exited()
        verdict = f"the engine of {exited} exited" if exited else f"not within {DEADLINE}s"
        lines = [f"{missing} did not connect: {verdict}", *self.status()]
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
                await self.network.links.sever()
            case Refuse():
                self.network.links.refuse()
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
        """Each zone engine's state and the links', for failure messages."""
        lines = [f"  network: {self.network.name}"]
        for zone in self.zone_stores:
            state = self.network.zones.status(zone)
            lines.append(f"  {zone}: on_global={self.connected(zone)} {state}")
        return lines + self.network.links.status()


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
    quiescent and still disagrees for longer than :data:`GRACE`, when an enabled
    zone stays behind without moving for :data:`STALL` seconds, or when a zone's
    engine exited (a zone process that died).
    """
    fed.accept()
    enabled = model.enabled()
    # A zone that was just restarted may first need its process to start.
    stall = STALL + fed.network.zones.start_time
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
                elif not positions.caught_up(zone) and now - progress[zone][1] > stall:
                    stuck.append(zone)
            if stuck:
                verdict = f"{', '.join(stuck)} behind and not moving for {stall}s"
                break
            exited = fed.network.zones.exited()
            if exited:
                verdict = f"the engine of {', '.join(exited)} exited"
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


async def run_program(layout: Layout, program: Program) -> None:
    """Run *program* against a new federation laid out as *layout*, then check it converges."""
    model = Model(program.zones)
    stores = layout.stores
    async with contextlib.AsyncExitStack() as stack:
        global_store = await stack.enter_async_context(await stores.create())
        # Recipes kept: a zone in a process of its own opens its store from one.
        specs = {zone: await stores.new_spec() for zone in program.zones}
        zone_stores = {
            zone: await stack.enter_async_context(spec.create()) for zone, spec in specs.items()
        }
        async with (
            open_network(
                layout.network,
                stores=zone_stores,
                specs=specs,
                options=layout.options,
                work_dir=layout.work_dir,
                nats_url=layout.nats_url,
            ) as network,
            anyio.create_task_group() as group,
        ):
            fed = Federation(group, global_store, zone_stores, network, layout.options)
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
# milliseconds (more with SQLite stores than with memory ones, more over gRPC than
# in memory), so the active profile's number of examples is used as it is: the dev
# profile runs these four layouts in about half a minute on two cores when
# replication is correct, and the ci and nightly profiles scale it up. (A failure
# takes minutes: Hypothesis shrinks it.)
@given(program=programs())
async def test_replication_converges_under_random_writes_and_faults(
    layout: Layout, program: Program
) -> None:
    await run_program(layout, program)


ZONE_PROCESS_EXAMPLES: Final = max(5, settings().max_examples // 3)
"""Examples with zones in processes: a third of the active profile's, at least five.

Each example starts two or three processes (about half a second each, importing
gRPC; more on a loaded machine) and one more per zone restart, so it takes one to
three seconds: 8 examples under the dev profile (about 20 s on two cores), 66
under ci, 666 nightly. The in-process gRPC runs already play every network fault
with the profile's full count; these add real crashes and a store shared between
processes."""


@settings(max_examples=ZONE_PROCESS_EXAMPLES)
@given(program=programs())
async def test_replication_converges_with_each_zone_in_its_own_process(
    layout_with_zone_processes: Layout, program: Program
) -> None:
    await run_program(layout_with_zone_processes, program)


KUBERNETES_EXAMPLES: Final = max(3, settings().max_examples // 8)
"""Examples on Kubernetes stores: an eighth of the active profile's, at least three.

Reading a whole federation over HTTP makes each example take five to eight seconds:
3 examples per layout under the dev profile, 25 under ci, 250 nightly."""


@settings(max_examples=KUBERNETES_EXAMPLES)
@given(program=programs())
async def test_replication_converges_on_kubernetes_stores(
    kubernetes_layout: Layout, program: Program
) -> None:
    await run_program(kubernetes_layout, program)


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


async def test_a_fixed_program_with_every_fault_converges(any_layout: Layout) -> None:
    await run_program(any_layout, EXAMPLE)


def test_the_fixed_program_uses_every_operation() -> None:
    used = {type(op) for op in EXAMPLE.ops}
    assert used >= set(typing.get_args(Op)) - {Pause}
