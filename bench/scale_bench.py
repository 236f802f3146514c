"""Benchmark kds at scale: one global and up to 100 zones, in separate processes.

Run it as a script (it is not a test)::

    python bench/scale_bench.py [--transport grpc|nats|both] [--quick] [--workers 4]
                                [--phases fanout,catchup,reconnect,resync,rss]

One **global** process (``--role global``: a :class:`~kds.sync.GlobalEngine` on
a :class:`~kds_stores.sqlite.SQLiteStore`) serves N **zones**, which run in a
few **worker** processes (``--role worker``): each zone has its own store and
its own :class:`~kds.sync.ZoneEngine`, hence its own transport session. The
transports are gRPC with TLS on loopback (the global's self-signed certificate
given to the zones as their CA file) and NATS, through one ``nats-server`` this
script starts (:class:`kds.testing.NatsServer`). Engines, stores and transports
run with their defaults, as ``kds-cp run`` uses them, but for the heartbeat
timeout (see :data:`OPTIONS`).

The children speak a line protocol: the coordinator (this process) writes one
command per line on a child's stdin and reads one reply line (``ok ...`` or
``error ...``); workers also print ``applied SEQ T...`` whenever all their
zones have applied probe SEQ. Every time is ``time.monotonic()``, which on
Linux is one clock for every process of the machine, so times taken in
different processes compare. Children are started in sessions of their own
(a Ctrl-C aimed at this script is not aimed at them), exit when their stdin
closes, and are killed by their pid when this script ends, however it ends.

What it measures, per transport:

1. **fan-out**: for N = 1, 10, 50, 100 zones (memory stores), single changes
   committed by the global process itself (a stdin command, so that no polling
   of its store by another process adds latency), one at a time (see
   :data:`PROBE_GAP`) -- the time from the commit's return until the last of
   the N zones has applied it, p50/p99/max. Each zone's worker follows the
   zone's store and notes when the change appears in it.
2. **cost per change**: over those changes, the global's CPU seconds (from
   /proc) and the frame bytes the zones received and sent, net of what the
   same N zones cost while idle (heartbeats, ZoneInsight refreshes: measured
   just before), against N; the per-zone constant is the least-squares slope.
   Measured again at the largest N with 10,000 resources on the global and in
   every zone: the cost must not grow with resources.
3. **catch-up**: one zone disconnected (the others stopped, so that only it
   replicates) while 50,000 changes are committed on the global, then
   reconnected -- the time until it has applied them all, and the rate.
4. **mass reconnect**: the largest N zones holding 10,000 resources each; the
   global killed with SIGKILL and started again on the same store, port and
   certificate -- the time until every zone is connected again (on both sides)
   and converged (its cursor in the global's log past the last change zones get),
   and a change committed then has reached every zone; and the bytes the zones
   received until converged (resume, not resync).
5. **mass resync**: the same zones, the global stopped and its log given a new
   epoch (as a store restored from a backup gets), then started again: every
   zone needs a snapshot at once. The time until each applied one and converged,
   the global's CPU (next to what one zone's sync cost it: the baseline, with
   nothing to share), its peak RSS, the bytes sent.
6. **global RSS** with 100,000 resources and the largest N zones connected and
   caught up, and its increment per zone.

Syncing 10,000 or 100,000 resources into 100 zones one by one would take far
too long on this machine: for 4 to 6, one SQLite zone syncs them for real and
its file is copied for the others (see :func:`prepare_copies`, which says why
the copies are zones of their own). Those stores are prepared over the first
transport and reused by the next.

``--quick`` runs every step with small sizes, for a smoke run of about a minute.
The report (a table, also printed) and the plots go to
``bench/results/<YYYY-MM-DD>/`` (``--output`` to choose).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol

import anyio
import anyio.to_thread
import attrs
from anyio.streams.buffered import BufferedByteReceiveStream
from nats_baseline import percentile, process_cpu_seconds
from sync_bench import SPEC, copy_store, resource

from kds import ResourceKey, Upsert
from kds.store import Cursor, Store, Tracking, Upserted
from kds.sync import GlobalEngine, SyncOptions, ZoneEngine
from kds.sync.engines import GLOBAL_ORIGIN, tracking_origin
from kds.sync.lifecycle import zone_key
from kds.sync.replication import StreamStats
from kds.testing import MemoryStore, NatsServer
from kds_stores.sqlite import SQLiteStore
from kds_transports.grpc import GrpcTransport
from kds_transports.nats import NatsTransport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence

    from anyio.abc import Process, TaskGroup, TaskStatus

    from kds.transport import Transport

TRANSPORTS: Final = ("grpc", "nats")
PHASES: Final = ("fanout", "catchup", "reconnect", "resync", "rss")
"""What `--phases` chooses from; reconnect and resync share one cluster of prepared zones."""
PROBE_KEY: Final = ResourceKey("MeshTimeout", "default", "scale-probe")
"""The resource each fan-out change upserts (its spec carries the change's number)."""
BATCH: Final = 1000  # changes per commit when the global loads or changes resources
MAX_LINE: Final = 1 << 20  # bytes: the longest protocol line a child may print

# Between one change's arrival everywhere and the next: a zone that applied a
# change tells the global its new cursor once its log has been quiet for 50 ms
# (the engine's cursor delay), and the global commits it -- part of what a single
# change costs, so it is counted, but a next change sent into it would measure
# how the two interfere. (Back to back, small N would skip those messages.)
PROBE_GAP: Final = 0.06  # seconds
PROBE_GAP_PER_ZONE: Final = 0.001  # seconds more per zone: the global takes their cursors
# The idle cost is measured before each set of changes, over at least IDLE_WINDOW
# seconds and up to a whole ZoneInsight refresh cycle (each connected zone's insight
# is rewritten every insight_interval seconds, and every write wakes every session):
# at 100 zones a few seconds may catch a burst of refreshes or none of them.
IDLE_WINDOW: Final = 3.0  # seconds, at least
IDLE_WINDOW_PER_ZONE: Final = 0.1  # seconds per zone, up to the insight interval
# The defaults but for the heartbeat timeout. 25 zones share each worker process
# here, on 2 cores: when all of them apply a snapshot at once (the mass resync), a
# worker does not run one zone's heartbeats for longer than the default 15 s, and
# either side would take the stall for a dead peer and start over. A zone with a
# process of its own stalls for about 2 s applying 100,000 resources.
OPTIONS: Final = SyncOptions(heartbeat_timeout=120.0)
SETTLE: Final = 1.0  # seconds to let connection-time writes (ZoneInsights) pass
POLL: Final = 0.05  # seconds between status rounds while waiting for convergence
CONVERGE_TIMEOUT: Final = 600.0  # seconds any wait for convergence may take
REPLY_TIMEOUT: Final = 120.0  # seconds a child may take to answer one command
PROBE_TIMEOUT: Final = 60.0  # seconds one change may take to reach every zone
STOP_TIMEOUT: Final = 10.0  # seconds a child may take to exit once its stdin closed

# What the issue asks (gRPC and NATS alike).
FANOUT_TARGET_MS: Final = 250.0  # p99 at the largest N
RECONNECT_TARGET_S: Final = 10.0
RECONNECT_BYTES_TARGET: Final = 1_000_000
RSS_PER_ZONE_TARGET_MB: Final = 20.0
LINEAR_FACTOR: Final = 1.5
"""How much the per-zone cost at the largest N may exceed the one at the second
smallest N (or the cost with resources the one without) and still count as
linear in N (and flat in resources): generous, because the machine is shared."""


class BenchError(Exception):
    """The benchmark cannot go on: a child failed, or something did not converge."""


# -- the children's side ----------------------------------------------------------------


def _reply(*fields: object) -> None:
    """One line to the coordinator."""
    print(*fields, flush=True)


async def _commands() -> AsyncIterator[list[str]]:
    """The coordinator's commands, one per line of stdin, until it closes stdin.

    Read in a worker thread, abandoned on cancellation: :func:`_child_main` ends
    the process with ``os._exit`` so that a thread still blocked in ``readline``
    does not keep it alive.
    """
    while True:
        line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return
        if line.strip():
            yield line.split()


async def _obey(handle: Callable[[list[str]], Awaitable[list[object]]]) -> None:
    """Answer each command with ``ok FIELDS...`` or ``error REASON``, until stdin closes."""
    async for command in _commands():
        try:
            fields = await handle(command)
        except Exception as exc:  # reported to the coordinator, which stops
            _reply("error", f"{type(exc).__name__}: {exc}")
        else:
            _reply("ok", *fields)


def _child_main(role: str, function: Callable[..., Any], *args: object) -> NoReturn:
    """Run a child's main coroutine; exit without waiting for the stdin thread."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    code = 0
    try:
        anyio.run(function, *args)
    except BaseException:
        logging.getLogger(__name__).exception("the %s process failed", role)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _GlobalCommands:
    """What the global process does on the coordinator's behalf."""

    def __init__(self, store: SQLiteStore, engine: GlobalEngine) -> None:
        self.store = store
        self.engine = engine
        # The revision of the last change this process committed: every change zones
        # get comes from here (the engine itself writes only Zones and ZoneInsights,
        # which zones do not get), so a zone whose cursor reached it has them all.
        self.written = 0

    async def _commit(self, changes: list[Upsert]) -> int:
        revision = await self.store.commit(changes)
        self.written = max(self.written, revision)
        return revision

    async def handle(self, command: list[str]) -> list[object]:
        """Run *command*; the reply's fields after ``ok``."""
        name, args = command[0], [int(arg) for arg in command[1:]]
        if name == "probe":
            # The change fan-out is measured from: committed by this process, so its
            # sessions are woken at once (as by a write through the global's API).
            (sequence,) = args
            revision = await self._commit([Upsert(key=PROBE_KEY, spec={**SPEC, "probe": sequence})])
            return [revision, repr(time.monotonic())]
        if name == "register":
            # Zones registered up front, as an operator may create them: otherwise a
            # zone's first connection creates its Zone, and a Zone change makes every
            # other connected zone's session start over with a snapshot.
            (count,) = args
            zones = [
                Upsert(key=zone_key(zone_name(n)), spec={"enabled": True})
                for n in count_from(1, count)
            ]
            return [await self._commit(zones)]
        if name == "load":
            start, count = args
            for first in range(start, start + count, BATCH):
                last = min(start + count, first + BATCH)
                await self._commit([resource(n) for n in range(first, last)])
            return [await self.store.head()]
        if name == "change":
            # COUNT changes of the first POOL resources, round-robin, from GENERATION on
            # (each generation differs from the stored spec: no change is a no-op).
            count, pool, generation = args
            started = time.monotonic()
            for first in range(0, count, BATCH):
                await self._commit(
                    [
                        resource(n % pool, generation + n // pool)
                        for n in range(first, min(count, first + BATCH))
                    ]
                )
            return [await self.store.head(), repr(time.monotonic() - started)]
        if name == "snapshots":
            return [self.engine.snapshots.taken]
        if name == "status":
            head = await self.store.head()
            return [head, len(self.engine.connected_zones), self.written, self.store.epoch]
        raise ValueError(f"unknown command {name!r}")


async def run_global(directory: Path, kind: str, listen: str) -> None:
    """The global: its store and engine; prints ``listening ADDRESS``, then obeys commands."""
    async with SQLiteStore(directory / "global.db") as store:
        transport: Transport
        if kind == "nats":
            transport = NatsTransport.server(listen)
        else:
            transport = GrpcTransport.server(listen, work_dir=directory)
        engine = GlobalEngine(store, transport, options=OPTIONS)
        commands = _GlobalCommands(store, engine)
        async with anyio.create_task_group() as group:
            address = await group.start(engine.run)
            _reply("listening", address)
            await _obey(commands.handle)
            group.cancel_scope.cancel()


@attrs.define
class _Zone:
    """A zone a worker hosts: its store (kept across restarts) and its running engine."""

    name: str
    store: Store | None = None  # a MemoryStore, kept open; SQLite stores live in the task
    engine: ZoneEngine | None = None
    scope: anyio.CancelScope | None = None
    stopped: anyio.Event | None = None
    totals: StreamStats = attrs.Factory(StreamStats)  # of engines that ran before


class _Worker:
    """A worker process: runs zones, reports their state and when they applied probes."""

    def __init__(self, directory: Path, kind: str, address: str, group: TaskGroup) -> None:
        self.directory = directory
        self.kind = kind
        self.address = address
        self.group = group
        self.zones: dict[str, _Zone] = {}
        self.watching: set[str] = set()  # zones whose stores are watched for probes
        self.pending: dict[int, list[float]] = {}  # probe -> when each watched zone had it

    def transport(self, zone: str) -> Transport:
        """The zone's own transport to the global."""
        if self.kind == "nats":
            return NatsTransport.client(self.address, zone=zone)
        return GrpcTransport.client(self.address, zone=zone, ca_file=self.directory / "kds-cp.crt")

    async def handle(self, command: list[str]) -> list[object]:
        """Run *command*; the reply's fields after ``ok``."""
        name = command[0]
        if name == "start":
            zone, store, watch = command[1:]
            if store not in ("memory", "sqlite"):
                raise ValueError(f"store must be memory or sqlite, got {store!r}")
            await self.group.start(self._run_zone, zone, store == "sqlite", watch == "watch")
            return []
        if name == "stop":
            for zone in command[1:]:
                record = self.zones[zone]
                if record.scope is not None and record.stopped is not None:
                    record.scope.cancel()
                    await record.stopped.wait()
            return []
        if name == "status":
            return [await self._status(record) for record in self.zones.values()]
        raise ValueError(f"unknown command {name!r}")

    async def _status(self, record: _Zone) -> str:
        stats = StreamStats()
        stats.add(record.totals)
        connected = False
        if record.engine is not None:
            stats.add(record.engine.current_stats)
            connected = record.engine.connected
        cursor = None
        if record.store is not None and record.engine is not None:
            cursor = await record.store.tracking(GLOBAL_ORIGIN)
        return ",".join(
            str(value)
            for value in (
                record.name,
                int(connected),
                0 if cursor is None else cursor.revision,
                stats.bytes_received,
                stats.bytes_sent,
                stats.resets_received,
                stats.resets_sent,
                stats.batches_received,
                "-" if cursor is None else cursor.epoch,
            )
        )

    async def _run_zone(
        self, zone: str, sqlite: bool, watch: bool, *, task_status: TaskStatus[None]
    ) -> None:
        record = self.zones.setdefault(zone, _Zone(zone))
        if record.scope is not None:
            raise ValueError(f"zone {zone!r} is already running")
        record.stopped = anyio.Event()
        async with contextlib.AsyncExitStack() as stack:
            if sqlite:
                store: Store = await stack.enter_async_context(
                    SQLiteStore(self.directory / f"{zone}.db")
                )
                record.store = store
            elif record.store is None:
                store = MemoryStore()
                await store.open()  # kept open: a restarted zone resumes from it
                record.store = store
            else:
                store = record.store
            engine = ZoneEngine(store, self.transport(zone), zone=zone, options=OPTIONS)
            with anyio.CancelScope() as scope:
                record.scope, record.engine = scope, engine
                task_status.started()
                try:
                    async with anyio.create_task_group() as group:
                        group.start_soon(engine.run)
                        if watch:
                            # Only when probes are sent: following a store costs its
                            # worker CPU for every event the zone applies.
                            group.start_soon(self._watch, zone, store)
                finally:
                    record.totals.add(engine.current_stats)
                    record.scope = record.engine = None
                    self.watching.discard(zone)
            if sqlite:
                record.store = None
        record.stopped.set()

    async def _watch(self, zone: str, store: Store) -> None:
        """Note when each probe appears in *zone*'s store; report when all zones have it."""
        self.watching.add(zone)
        head = await store.head()
        async with contextlib.aclosing(store.follow(head)) as events:
            async for event in events:
                if not isinstance(event, Upserted) or event.key.type != PROBE_KEY.type:
                    continue
                sequence = event.resource.spec.get("probe")
                if not isinstance(sequence, int):
                    continue
                seen = self.pending.setdefault(sequence, [])
                seen.append(time.monotonic())
                if len(seen) >= len(self.watching):
                    del self.pending[sequence]
                    _reply("applied", sequence, *(repr(when) for when in seen))


async def run_worker(directory: Path, kind: str, address: str) -> None:
    """A worker: hosts zones as the coordinator tells it, until its stdin closes."""
    async with anyio.create_task_group() as group:
        worker = _Worker(directory, kind, address, group)
        await _obey(worker.handle)
        group.cancel_scope.cancel()


# -- the coordinator: children, and the state of a cluster -------------------------------


def zone_name(number: int) -> str:
    """The name of zone *number* (from 1)."""
    return f"zone-{number}"


def count_from(first: int, count: int) -> range:
    """*count* numbers from *first*."""
    return range(first, first + count)


class Child:
    """A child process of this script, spoken to line by line.

    Args:
        name: for messages ("the global", "worker 2").
        process: the running child, its stdin and stdout piped.
        log: where its stderr goes.
        on_applied: called with the fields of each ``applied`` line it prints.
    """

    def __init__(
        self,
        name: str,
        process: Process,
        log: Path,
        on_applied: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.name = name
        self.process = process
        self.log = log
        self._on_applied = on_applied
        self._lines_in, self._lines = anyio.create_memory_object_stream[str | None](math.inf)
        self._lock = anyio.Lock()

    @classmethod
    async def start(
        cls,
        name: str,
        role: Sequence[str],
        log: Path,
        group: TaskGroup,
        on_applied: Callable[[list[str]], None] | None = None,
    ) -> Child:
        """Start this script as ``--role ...`` and read its lines in *group*."""
        with log.open("ab") as stderr:
            process = await anyio.open_process(
                [sys.executable, __file__, *role],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C aimed at the benchmark is not aimed at it
            )
        child = cls(name, process, log, on_applied)
        group.start_soon(child._read_lines)
        return child

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    async def _read_lines(self) -> None:
        assert self.process.stdout is not None  # noqa: S101 -- piped in start()
        stream = BufferedByteReceiveStream(self.process.stdout)
        try:
            while True:
                line = (await stream.receive_until(b"\n", MAX_LINE)).decode()
                if line.startswith("applied ") and self._on_applied is not None:
                    self._on_applied(line.split()[1:])
                else:
                    self._lines_in.send_nowait(line)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            self._lines_in.send_nowait(None)  # it exited: whoever waits learns so

    def _died(self) -> BenchError:
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        return BenchError(
            f"{self.name} (pid {self.pid}) exited with {self.process.returncode}; "
            f"the end of {self.log}:\n{tail}"
        )

    async def line(self, deadline: float = REPLY_TIMEOUT) -> list[str]:
        """The next line it prints (other than ``applied`` lines), as fields."""
        try:
            with anyio.fail_after(deadline):
                line = await self._lines.receive()
        except TimeoutError:
            raise BenchError(f"{self.name} did not answer within {deadline:.0f} s") from None
        if line is None:
            await self.process.wait()
            raise self._died()
        return line.split()

    async def request(self, *command: object, deadline: float = REPLY_TIMEOUT) -> list[str]:
        """Send one command; return the fields of its ``ok`` reply.

        Raises:
            BenchError: the child answered ``error`` or exited.
        """
        text = " ".join(str(part) for part in command)
        async with self._lock:
            assert self.process.stdin is not None  # noqa: S101 -- piped in start()
            try:
                await self.process.stdin.send(f"{text}\n".encode())
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                await self.process.wait()
                raise self._died() from exc
            fields = await self.line(deadline)
        if not fields or fields[0] != "ok":
            raise BenchError(f"{self.name}: {text!r} failed: {' '.join(fields)}")
        return fields[1:]

    def kill(self) -> None:
        """SIGKILL, by its pid, unless it already exited."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def stop(self) -> None:
        """Close its stdin (it exits), wait a little, then kill it."""
        if self.process.stdin is not None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self.process.stdin.aclose()
        with anyio.move_on_after(STOP_TIMEOUT):
            await self.process.wait()
        self.kill()
        await self.process.wait()

    def rss_mb(self, field: str = "VmRSS") -> float:
        """*field* (VmRSS, VmHWM) of its /proc status, in MiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith(f"{field}:"))
        return int(line.split()[1]) / 1024

    def cpu_seconds(self) -> float:
        """User plus system CPU seconds it has used."""
        return process_cpu_seconds(self.pid)


@attrs.frozen
class ZoneState:
    """One zone as its worker reports it."""

    connected: bool
    cursor: int  # its position in the global's log
    bytes_received: int
    bytes_sent: int
    resets: int  # snapshots received from the global
    resets_sent: int  # snapshots of its own log sent to the global
    batches: int
    epoch: str  # its cursor's: the global log's it follows ("-" before any)


@attrs.frozen
class ClusterState:
    """The global's head and sessions, and every zone's state, read in one round."""

    head: int
    sessions: int
    written: int  # the revision of the last change zones get (see _GlobalCommands.written)
    epoch: str  # the global's log's
    zones: dict[str, ZoneState]

    def caught_up(self, zone: ZoneState, written: int) -> bool:
        """Whether *zone* has the change at revision *written* of the global's log."""
        return zone.epoch == self.epoch and zone.cursor >= written

    def received(self) -> int:
        """Frame bytes the zones received, in total."""
        return sum(zone.bytes_received for zone in self.zones.values())

    def sent(self) -> int:
        """Frame bytes the zones sent, in total."""
        return sum(zone.bytes_sent for zone in self.zones.values())

    def resets(self) -> int:
        """Snapshots the zones received, in total."""
        return sum(zone.resets for zone in self.zones.values())

    def resets_sent(self) -> int:
        """Snapshots the zones sent the global (of their own logs), in total."""
        return sum(zone.resets_sent for zone in self.zones.values())

    def snapshots_since(self, before: ClusterState) -> tuple[int, str]:
        """Snapshots either way since *before*: their number, and a report phrase."""
        down = self.resets() - before.resets()
        up = self.resets_sent() - before.resets_sent()
        return down + up, f"snapshots: {down} to zones, {up} from zones"


class Probes:
    """The times at which zones applied each probe, as the workers report them."""

    def __init__(self) -> None:
        self._times: dict[int, list[float]] = {}
        self._changed = anyio.Event()

    def add(self, fields: list[str]) -> None:
        """An ``applied SEQ T...`` line's fields."""
        self._times.setdefault(int(fields[0]), []).extend(float(when) for when in fields[1:])
        self._changed.set()
        self._changed = anyio.Event()

    async def wait(self, sequence: int, zones: int) -> list[float]:
        """When each of *zones* zones applied probe *sequence*."""
        with anyio.fail_after(PROBE_TIMEOUT):
            while len(self._times.get(sequence, ())) < zones:
                await self._changed.wait()
        return self._times.pop(sequence)


class Cluster:
    """One global and its worker processes, for one transport, in one directory.

    Zone *n* runs in worker ``(n - 1) % workers``. Open one with
    :func:`open_cluster`, which kills every child it started on exit.

    Args:
        directory: the global's store, the zones' SQLite stores, the logs.
        kind: ``grpc`` or ``nats``.
        workers: worker processes to spread zones over.
        nats_url: the NATS server's, for ``nats``.
        group: where the children's output is read.
    """

    def __init__(
        self, directory: Path, kind: str, workers: int, nats_url: str | None, group: TaskGroup
    ) -> None:
        self.directory = directory
        self.kind = kind
        self.worker_count = workers
        self.group = group
        self.listen = nats_url if kind == "nats" and nats_url else "grpcs://127.0.0.1:0"
        self.address = ""  # what zones dial, once the global listens
        self.global_plane: Child | None = None
        self.workers: list[Child] = []
        self.running: set[str] = set()
        self.probes = Probes()
        self.children: list[Child] = []  # every child started, to kill on exit
        self.written = 0  # the last change committed by any global of this cluster

    async def kill_all(self) -> None:
        """SIGKILL every child still running, by its pid, and reap it."""
        for child in self.children:
            child.kill()
        for child in self.children:
            await child.process.wait()
        self.workers.clear()
        self.global_plane = None

    @property
    def global_child(self) -> Child:
        """The running global."""
        if self.global_plane is None:
            raise BenchError("the global is not running")
        return self.global_plane

    async def start_global(self) -> float:
        """Start the global (on the port it had, if it ran before); when it listened."""
        log = self.directory / "global.log"
        child = await Child.start(
            "the global",
            [
                "--role",
                "global",
                "--dir",
                str(self.directory),
                "--transport",
                self.kind,
                "--listen",
                self.listen,
            ],
            log,
            self.group,
        )
        self.children.append(child)
        self.global_plane = child
        fields = await child.line()
        if fields[:1] != ["listening"]:
            raise BenchError(f"the global did not start: {' '.join(fields)}; see {log}")
        listening = time.monotonic()
        self.address = fields[1]
        if self.kind == "grpc":
            self.listen = self.address  # a restart keeps the port zones dial
        return listening

    async def kill_global(self) -> None:
        """SIGKILL the global, by its pid, and wait for it to be gone."""
        child = self.global_child
        child.kill()
        await child.process.wait()
        self.global_plane = None

    async def stop_global(self) -> None:
        """Stop the global gracefully (its store is closed)."""
        await self.global_child.stop()
        self.global_plane = None

    async def start_workers(self) -> None:
        """Start the worker processes (the global must be listening)."""
        for index in range(self.worker_count):
            child = await Child.start(
                f"worker {index}",
                [
                    "--role",
                    "worker",
                    "--dir",
                    str(self.directory),
                    "--transport",
                    self.kind,
                    "--address",
                    self.address,
                ],
                self.directory / f"worker-{index}.log",
                self.group,
                self.probes.add,
            )
            self.children.append(child)
            self.workers.append(child)

    def worker(self, zone: str) -> Child:
        """The worker hosting *zone*."""
        number = int(zone.rpartition("-")[2])
        return self.workers[(number - 1) % len(self.workers)]

    def _by_worker(self, zones: Iterable[str]) -> dict[Child, list[str]]:
        placed: dict[Child, list[str]] = {}
        for zone in zones:
            placed.setdefault(self.worker(zone), []).append(zone)
        return placed

    async def start_zones(self, zones: Iterable[str], store: str, *, watch: bool) -> None:
        """Start *zones* with ``memory`` (kept across restarts) or ``sqlite`` stores.

        With *watch*, their workers report when they applied each probe.
        """
        for worker, names in self._by_worker(zones).items():
            for zone in names:
                await worker.request("start", zone, store, "watch" if watch else "quiet")
                self.running.add(zone)

    async def stop_zones(self, zones: Iterable[str]) -> None:
        """Stop *zones* (their sessions end with a Goodbye); memory stores are kept."""
        for worker, names in self._by_worker(zones).items():
            await worker.request("stop", *names)
            self.running.difference_update(names)

    async def state(self) -> ClusterState:
        """The global's head and session count, then every zone's state."""
        fields = await self.global_child.request("status")
        head, sessions, written = (int(field) for field in fields[:3])
        epoch = fields[3]
        zones: dict[str, ZoneState] = {}
        for worker in self.workers:
            for entry in await worker.request("status"):
                name, *values, cursor_epoch = entry.split(",")
                connected, cursor, received, sent, resets, resets_sent, batches = (
                    int(v) for v in values
                )
                zones[name] = ZoneState(
                    bool(connected),
                    cursor,
                    received,
                    sent,
                    resets,
                    resets_sent,
                    batches,
                    cursor_epoch,
                )
        return ClusterState(head, sessions, written, epoch, zones)

    async def converged(self, deadline: float = CONVERGE_TIMEOUT) -> ClusterState:
        """Wait until every running zone is connected on both sides and has every change.

        Converged means: the global has a session for each running zone, each zone's
        engine is connected, and each zone's cursor is in the global's log (its
        epoch) and has reached the last change the global process committed (a
        restarted global remembers none: the one before it counts). Not the global's
        head: ZoneInsight writes, which zones do not get, move it, and a zone's cursor
        passes such events only when its next heartbeat is due. Other processes'
        progress: polled.
        """
        state = None
        try:
            with anyio.fail_after(deadline):
                while True:
                    state = await self.state()
                    self.written = max(self.written, state.written)
                    running = [state.zones[zone] for zone in self.running]
                    if state.sessions == len(self.running) and all(
                        zone.connected and state.caught_up(zone, self.written) for zone in running
                    ):
                        return state
                    await anyio.sleep(POLL)
        except TimeoutError:
            raise BenchError(
                f"not converged after {deadline:.0f} s: "
                f"{_progress(state, self.running, self.written)}"
            ) from None

    async def cpu_and_bytes(self) -> Sample:
        """The global's CPU time and the zones' byte counters, now."""
        state = await self.state()
        return Sample(time.monotonic(), self.global_child.cpu_seconds(), state)


@contextlib.asynccontextmanager
async def open_cluster(
    directory: Path, kind: str, workers: int, nats_url: str | None
) -> AsyncIterator[Cluster]:
    """A :class:`Cluster`; on exit, however it comes, its children are killed by their pids.

    Nothing a cluster's children hold needs a graceful stop by then: SQLite stores
    survive SIGKILL by design, and zones that must close theirs were stopped.
    """
    async with anyio.create_task_group() as group:
        cluster = Cluster(directory, kind, workers, nats_url, group)
        try:
            yield cluster
        finally:
            with anyio.CancelScope(shield=True):
                await cluster.kill_all()
            group.cancel_scope.cancel()


def _progress(state: ClusterState | None, running: Iterable[str], written: int) -> str:
    if state is None:
        return "no status yet"
    zones = [state.zones[zone] for zone in running if zone in state.zones]
    connected = sum(zone.connected for zone in zones)
    caught_up = sum(state.caught_up(zone, written) for zone in zones)
    return (
        f"{state.sessions} sessions on the global, {connected} of {len(zones)} zones "
        f"connected, {caught_up} with the last change (revision {written})"
    )


@attrs.frozen
class Sample:
    """The global's CPU time and the zones' counters at one moment."""

    at: float
    cpu: float
    state: ClusterState


@attrs.frozen
class Rates:
    """Cost per second (idle) or per change, from two samples."""

    seconds: float
    cpu: float  # global CPU seconds
    received: float  # frame bytes the zones received
    sent: float  # frame bytes the zones sent

    @classmethod
    def between(cls, first: Sample, last: Sample) -> Rates:
        """What happened from *first* to *last* (totals)."""
        return cls(
            last.at - first.at,
            last.cpu - first.cpu,
            last.state.received() - first.state.received(),
            last.state.sent() - first.state.sent(),
        )

    def net_of(self, idle: Rates) -> Rates:
        """These totals less what *idle* costs over as many seconds."""
        share = self.seconds / idle.seconds if idle.seconds > 0 else 0.0
        return Rates(
            self.seconds,
            max(0.0, self.cpu - idle.cpu * share),
            max(0.0, self.received - idle.received * share),
            max(0.0, self.sent - idle.sent * share),
        )

    def per(self, count: float) -> Rates:
        """These totals divided by *count*."""
        return Rates(
            self.seconds / count, self.cpu / count, self.received / count, self.sent / count
        )


# -- the report --------------------------------------------------------------------------


@attrs.frozen
class Row:
    """A report line."""

    measurement: str
    transport: str
    result: str
    detail: str = ""
    target: str = ""
    verdict: str = ""  # PASS, MISS, or nothing where there is no target


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


@attrs.define
class FanOut:
    """One N's fan-out measurement."""

    zones: int
    latencies: list[float]  # seconds, commit to the last zone, one per change
    every: list[float]  # seconds, commit to each zone, every delivery
    gross: Rates  # per change
    net: Rates  # per change, less the idle cost
    idle: Rates  # per second


@attrs.define
class Report:
    """Everything measured so far, for the table, the markdown file and the plots."""

    settings: Settings
    rows: list[Row] = attrs.Factory(list)
    fanouts: dict[str, list[FanOut]] = attrs.Factory(dict)
    loaded: dict[str, FanOut] = attrs.Factory(dict)  # the fan-out with resources everywhere
    notes: list[str] = attrs.Factory(list)
    preparation: float = 0.0  # seconds spent preparing stores the next transport reuses
    # Resources -> the global's CPU seconds to sync them into one empty zone (a
    # snapshot sent to one session), measured while preparing the stores.
    one_zone_sync: dict[int, float] = attrs.Factory(dict)

    def add(self, *rows: Row) -> None:
        """Add rows (and show them under the progress bar)."""
        self.rows.extend(rows)


# -- the phases -------------------------------------------------------------------------


class ProgressBar(Protocol):
    """What is used of a tqdm bar."""

    def update(self, n: float = 1) -> bool | None:
        """Advance by *n* units."""

    def set_description(self, desc: str | None = None, refresh: bool | None = True) -> None:
        """Say which phase runs."""

    def close(self) -> None:
        """Stop drawing."""


async def measure_fanout(
    cluster: Cluster, zones: int, changes: int, first: int, bar: ProgressBar
) -> FanOut:
    """*changes* single changes, one at a time, to the *zones* running zones.

    Also the idle cost of those zones (see :data:`IDLE_WINDOW`), and the global's
    CPU time and the zones' bytes over the changes.
    """
    await anyio.sleep(SETTLE)
    await cluster.converged()
    before = await cluster.cpu_and_bytes()
    cycle = OPTIONS.insight_interval
    await anyio.sleep(min(cycle, max(IDLE_WINDOW, zones * IDLE_WINDOW_PER_ZONE)))
    start = await cluster.cpu_and_bytes()
    idle = Rates.between(before, start)
    latencies: list[float] = []
    every: list[float] = []
    for sequence in count_from(first, changes):
        reply = await cluster.global_child.request("probe", sequence)
        committed = float(reply[1])
        applied = await cluster.probes.wait(sequence, zones)
        every.extend(when - committed for when in applied)
        latencies.append(max(applied) - committed)
        bar.update()
        await anyio.sleep(PROBE_GAP + zones * PROBE_GAP_PER_ZONE)
    end = await cluster.cpu_and_bytes()
    total = Rates.between(start, end)
    return FanOut(
        zones,
        latencies,
        every,
        total.per(changes),
        total.net_of(idle).per(changes),
        idle.per(idle.seconds),
    )


def fanout_rows(kind: str, result: FanOut, target: bool, label: str = "") -> list[Row]:
    """The report lines of one fan-out measurement."""
    ms = [latency * 1e3 for latency in result.latencies]
    p99 = percentile(ms, 0.99)
    zones = result.zones
    suffix = f", {label}" if label else ""
    return [
        Row(
            f"fan-out to {zones} zone{'s' if zones > 1 else ''}, {len(ms)} changes{suffix}",
            kind,
            f"p99 {p99:,.1f} ms",
            f"p50 {statistics.median(ms):,.1f} ms, max {max(ms):,.1f} ms (each zone: p50 "
            f"{statistics.median(result.every) * 1e3:,.1f} ms)",
            f"p99 <= {FANOUT_TARGET_MS:.0f} ms" if target else "",
            verdict(p99 <= FANOUT_TARGET_MS) if target else "",
        ),
        Row(
            "  global CPU per change, net of idle",
            kind,
            f"{result.net.cpu * 1e3:,.2f} ms",
            f"{result.net.cpu / zones * 1e6:,.0f} us per zone; gross "
            f"{result.gross.cpu * 1e3:,.2f} ms; idle {result.idle.cpu * 100:,.1f}% of a core",
        ),
        Row(
            "  bytes per change, to / from the zones",
            kind,
            f"{result.net.received:,.0f} B",
            f"{result.net.received / zones:,.0f} / {result.net.sent / zones:,.0f} B per zone; "
            f"idle {result.idle.received / zones:,.0f} B/s per zone",
        ),
    ]


def linear_rows(kind: str, fanouts: Sequence[FanOut]) -> list[Row]:
    """The per-zone constants (least-squares slopes) and whether cost is linear in N."""
    if len(fanouts) < 2:
        return []
    counts = [float(f.zones) for f in fanouts]
    cpu = statistics.linear_regression(counts, [f.net.cpu for f in fanouts])
    received = statistics.linear_regression(counts, [f.net.received for f in fanouts])
    small, large = fanouts[1] if len(fanouts) > 2 else fanouts[0], fanouts[-1]
    ratio = (large.net.cpu / large.zones) / max(1e-9, small.net.cpu / small.zones)
    return [
        Row(
            "global CPU per change: per-zone constant",
            kind,
            f"{cpu.slope * 1e6:,.0f} us/zone",
            f"fit over N = {', '.join(str(f.zones) for f in fanouts)}: "
            f"{cpu.intercept * 1e3:,.2f} ms + N x {cpu.slope * 1e6:,.0f} us; per zone at "
            f"N={large.zones} / at N={small.zones}: {ratio:.2f}",
            f"linear in N (<= {LINEAR_FACTOR}x)",
            verdict(ratio <= LINEAR_FACTOR),
        ),
        Row(
            "bytes per change: per-zone constant",
            kind,
            f"{received.slope:,.0f} B/zone",
            f"fit: {received.intercept:,.0f} B + N x {received.slope:,.0f} B",
        ),
    ]


async def phase_fanout(
    cluster: Cluster, settings: Settings, report: Report, bar: ProgressBar
) -> None:
    """Fan-out latency and cost for each N, adding memory zones as N grows."""
    kind = cluster.kind
    results: list[FanOut] = []
    running = 0
    sequence = settings.sequence_base(kind)
    for zones in settings.zone_counts:
        bar.set_description(f"{kind}: fan-out, {zones} zones")
        added = (zone_name(n) for n in count_from(running + 1, zones - running))
        await cluster.start_zones(added, "memory", watch=True)
        running = zones
        result = await measure_fanout(cluster, zones, settings.probes, sequence, bar)
        sequence += settings.probes
        results.append(result)
        report.add(*fanout_rows(kind, result, target=zones == settings.zone_counts[-1]))
    report.fanouts[kind] = results
    report.add(*linear_rows(kind, results))


async def phase_catchup(
    cluster: Cluster, settings: Settings, report: Report, bar: ProgressBar
) -> None:
    """One zone away while *changes* changes are committed; the time it takes to catch up.

    The other zones are stopped first, so that only this one replicates what
    follows. It gets *resources* resources while connected, then is stopped, the
    global changes them *changes* times in all (batches of 1,000), and it is
    started again on the same store: it resumes from its cursor.
    """
    kind = cluster.kind
    zone = zone_name(1)
    bar.set_description(f"{kind}: catch-up of {settings.changes:,} changes")
    await cluster.stop_zones(sorted(cluster.running - {zone}))
    await cluster.global_child.request("load", 0, settings.resources)
    await cluster.converged()
    bar.update()
    await cluster.stop_zones([zone])
    head, committed = await cluster.global_child.request(
        "change", settings.changes, settings.resources, 1
    )
    earlier = await cluster.state()
    started = time.monotonic()
    await cluster.start_zones([zone], "memory", watch=False)
    state = await cluster.converged()
    elapsed = time.monotonic() - started
    bar.update()
    received = state.zones[zone].bytes_received - earlier.zones[zone].bytes_received
    resets, snapshots = state.snapshots_since(earlier)
    report.add(
        Row(
            f"catch-up: one zone back after {settings.changes:,} changes",
            kind,
            f"{settings.changes / elapsed:,.0f} changes/s",
            f"converged in {elapsed:,.2f} s, connection included (the global committed them at "
            f"{settings.changes / float(committed):,.0f}/s); {received / 1e6:,.1f} MB received, "
            f"{snapshots}; head {head}",
            "resume, no snapshot",
            verdict(resets == 0),
        )
    )


async def phase_reconnect(
    cluster: Cluster, settings: Settings, report: Report, bar: ProgressBar
) -> None:
    """Fan-out cost with resources; then SIGKILL the global, restart it, time the return.

    The zones hold *resources* resources each (SQLite stores prepared by
    :func:`prepare_copies`). The global is started again on the same store, port
    and certificate; the time runs from the moment it listens again until every
    zone is connected on both sides and converged (:meth:`Cluster.converged`), and
    a change committed then has reached every zone.
    """
    kind, zones = cluster.kind, len(cluster.running)
    bar.set_description(f"{kind}: fan-out, {zones} zones with {settings.resources:,} resources")
    first = settings.sequence_base(kind) + len(settings.zone_counts) * settings.probes
    result = await measure_fanout(cluster, zones, settings.cost_probes, first, bar)
    label = f"{settings.resources:,} resources, SQLite zones"
    note = (
        f"The fan-out rows with SQLite zones are there for the global's cost: their latencies "
        f"include every zone's fsync of each change, {zones} of them on one shared disk, which "
        "a deployment spreads over as many machines (the memory-zone rows measure the global)."
    )
    if note not in report.notes:
        report.notes.append(note)
    report.add(*fanout_rows(kind, result, target=False, label=label))
    report.loaded[kind] = result
    empty = report.fanouts[kind][-1] if report.fanouts.get(kind) else None
    if empty is not None and empty.zones == zones:
        ratio = result.net.cpu / max(1e-9, empty.net.cpu)
        report.add(
            Row(
                "  cost per change with / without resources",
                kind,
                f"CPU {ratio:.2f}x",
                f"bytes {result.net.received / max(1.0, empty.net.received):.2f}x (SQLite zones "
                "here, memory zones without resources)",
                f"flat in resources (<= {LINEAR_FACTOR}x)",
                verdict(ratio <= LINEAR_FACTOR),
            )
        )
    bar.set_description(f"{kind}: mass reconnect of {zones} zones")
    before = await cluster.converged()
    killed = time.monotonic()
    await cluster.kill_global()
    listening = await cluster.start_global()
    after = await cluster.converged()
    online = time.monotonic()
    # Replicating again, not only connected: a change made now reaches every zone.
    sequence = first + settings.cost_probes
    reply = await cluster.global_child.request("probe", sequence)
    applied = await cluster.probes.wait(sequence, zones)
    done = max(applied)
    bar.update()
    received = after.received() - before.received()
    resets, snapshots = after.snapshots_since(before)
    seconds = done - listening
    report.add(
        Row(
            f"mass reconnect: {zones} zones x {settings.resources:,} resources, global SIGKILLed",
            kind,
            f"{seconds:,.2f} s",
            f"from the restarted global listening until every zone was online and converged "
            f"({online - listening:,.2f} s) and a change made then had reached them all "
            f"({(done - float(reply[1])) * 1e3:,.0f} ms); {done - killed:,.2f} s from the kill",
            f"<= {RECONNECT_TARGET_S:.0f} s",
            verdict(seconds <= RECONNECT_TARGET_S),
        ),
        Row(
            "  bytes re-sent to the zones, in total",
            kind,
            f"{received:,} B",
            f"{received / zones:,.0f} B per zone, until converged; {snapshots}",
            f"<= {RECONNECT_BYTES_TARGET / 1e6:.0f} MB",
            verdict(received <= RECONNECT_BYTES_TARGET and resets == 0),
        ),
    )


async def phase_resync(
    cluster: Cluster, settings: Settings, report: Report, bar: ProgressBar
) -> None:
    """Every zone needs a snapshot at once: the global's store restored, under a new epoch.

    The zones hold *resources* resources each and are converged. The global is
    stopped, its log given a new epoch (``meta.epoch``, as a store restored from a
    backup or replaced gets one) and started again: no zone's cursor is valid in
    it, so each session starts with a snapshot. Measured from the restarted global
    listening until every zone applied its snapshot and converged: the time, the
    global's CPU (next to what syncing one empty zone cost it), its peak RSS over
    its RSS before the restart, the bytes sent.
    """
    kind, zones = cluster.kind, len(cluster.running)
    bar.set_description(f"{kind}: mass resync of {zones} zones")
    before = await cluster.converged()
    idle = cluster.global_child.rss_mb()
    await cluster.stop_global()
    with contextlib.closing(sqlite3.connect(cluster.directory / "global.db")) as db, db:
        db.execute("UPDATE meta SET epoch = ?", (uuid.uuid4().hex,))
    listening = await cluster.start_global()
    started = cluster.global_child.cpu_seconds()  # its start (imports, TLS) is not the resync
    after = await cluster.converged()  # on the new epoch: by a snapshot each
    seconds = time.monotonic() - listening
    cpu = cluster.global_child.cpu_seconds() - started
    peak = cluster.global_child.rss_mb("VmHWM")
    bar.update()
    received = after.received() - before.received()
    _, snapshots = after.snapshots_since(before)
    shared = int((await cluster.global_child.request("snapshots"))[0])
    # The baseline: one session's snapshot, when nothing is shared.
    single = report.one_zone_sync.get(settings.resources)
    one_zone = (
        "no one-zone sync measured in this run"
        if single is None
        else f"{cpu / (zones * single):.2f}x {zones} one-zone syncs ({single:,.2f} s each, "
        "measured while preparing the stores)"
    )
    report.add(
        Row(
            f"mass resync: {zones} zones x {settings.resources:,} resources, new global epoch",
            kind,
            f"{seconds:,.2f} s",
            f"from the restarted global listening until every zone applied a snapshot and "
            f"converged; {snapshots}; the global read {shared} from its store",
        ),
        Row(
            "  global CPU",
            kind,
            f"{cpu:,.1f} s",
            f"{cpu / zones * 1e3:,.0f} ms per zone; {one_zone}",
        ),
        Row(
            "  global peak RSS",
            kind,
            f"{peak:,.0f} MiB",
            f"{peak - idle:+,.0f} MiB over its {idle:,.0f} MiB before the restart "
            f"({(peak - idle) / zones:,.2f} MiB per zone)",
        ),
        Row(
            "  bytes sent to the zones, in total",
            kind,
            f"{received / 1e6:,.1f} MB",
            f"{received / zones / 1e6:,.2f} MB per zone",
        ),
    )


async def phase_rss(cluster: Cluster, settings: Settings, report: Report, bar: ProgressBar) -> None:
    """The global's RSS before any zone, and with every zone connected and caught up.

    The zones' SQLite stores hold *rss_resources* resources each (prepared by
    :func:`prepare_copies`); they resume, so the global sends no snapshot.
    """
    kind, zones = cluster.kind, settings.zone_counts[-1]
    bar.set_description(f"{kind}: global RSS, {zones} zones")
    await cluster.start_global()
    await anyio.sleep(SETTLE)
    alone = cluster.global_child.rss_mb()
    await cluster.start_workers()
    await cluster.start_zones((zone_name(n) for n in count_from(1, zones)), "sqlite", watch=False)
    state = await cluster.converged()
    await anyio.sleep(SETTLE)
    await cluster.converged()
    connected = cluster.global_child.rss_mb()
    peak = cluster.global_child.rss_mb("VmHWM")
    await cluster.stop_zones(sorted(cluster.running))
    bar.update()
    per_zone = (connected - alone) / zones
    report.add(
        Row(
            f"global RSS, {settings.rss_resources:,} resources, {zones} zones connected",
            kind,
            f"{connected:,.0f} MiB",
            f"{alone:,.0f} MiB before any zone; peak {peak:,.0f} MiB; snapshots: "
            f"{state.resets()} to zones, {state.resets_sent()} from zones",
        ),
        Row(
            "  RSS per connected zone",
            kind,
            f"{per_zone:,.2f} MiB",
            f"({connected:,.0f} - {alone:,.0f}) / {zones}",
            f"<= {RSS_PER_ZONE_TARGET_MB:.0f} MB",
            verdict(per_zone * 2**20 / 1e6 <= RSS_PER_ZONE_TARGET_MB),
        ),
    )


async def prepare_copies(
    directory: Path,
    kind: str,
    settings: Settings,
    resources: int,
    nats_url: str | None,
    bar: ProgressBar,
) -> tuple[str, float]:
    """A global store with *resources* resources and a caught-up SQLite store per zone.

    Syncing that many resources into each of the zones one by one would take far
    too long on this machine. Zone 1 syncs from the global for real; the other
    zones' stores are copies of its file, each made a zone of its own:

    * the copy gets a new epoch (``meta.epoch``, in the store's documented layout):
      a zone's log is its own, and two zones sharing an epoch would be one log to
      anyone comparing cursors;
    * the copy keeps zone 1's tracking cursor in the global's log -- exactly what the
      zone would hold had it synced itself, since the global sends every zone the
      same resources (none of them came from a zone);
    * the global records, as its cursor in each zone's log, that log's head (a
      copy's under its new epoch): what it records after a zone's first session, whose snapshot
      of the zone's own resources is empty. (Without it, each copy would send that
      snapshot on connecting, which costs the copy a pass over all its resources
      that a zone syncing for real pays on an empty store.)

    Zone 1's own log is compacted first (the copies are half the size). The copies
    then resume like zones that synced before, without any snapshot.
    Returns a note for the report saying how it went, and the global's CPU seconds
    for zone 1's sync.
    """
    bar.set_description(f"preparing {resources:,} resources in every zone")
    await anyio.Path(directory).mkdir(parents=True)
    zones = settings.zone_counts[-1]
    started = time.monotonic()
    async with open_cluster(directory, kind, 1, nats_url) as cluster:
        await cluster.start_global()
        await cluster.global_child.request("register", zones)
        await cluster.global_child.request("load", 0, resources)
        await cluster.start_workers()
        cpu = cluster.global_child.cpu_seconds()
        synced = time.monotonic()
        await cluster.start_zones([zone_name(1)], "sqlite", watch=False)
        await cluster.converged()
        synced = time.monotonic() - synced
        cpu = cluster.global_child.cpu_seconds() - cpu
        peak = cluster.global_child.rss_mb("VmHWM")
        await cluster.stop_zones([zone_name(1)])
        await cluster.stop_global()
    bar.update()
    source = directory / f"{zone_name(1)}.db"
    # The zone's own log (a copy of every resource it applied) is compacted before
    # copying: half the bytes to write 99 times. Its contents matter only to what the
    # zone sends the global, which resumes at its head; zones compact their logs too.
    heads: dict[str, Cursor] = {}
    async with SQLiteStore(source) as store:
        heads[zone_name(1)] = await store.cursor()
        await store.compact(heads[zone_name(1)].revision)
    with contextlib.closing(sqlite3.connect(source)) as db:
        db.execute("VACUUM")
    for number in count_from(2, zones - 1):
        zone = zone_name(number)
        target = directory / f"{zone}.db"
        copy_store(source, target)
        with contextlib.closing(sqlite3.connect(target)) as db, db:
            epoch = uuid.uuid4().hex
            db.execute("UPDATE meta SET epoch = ?", (epoch,))
            heads[zone] = Cursor(epoch, int(db.execute("SELECT head FROM meta").fetchone()[0]))
    async with SQLiteStore(directory / "global.db") as store:
        for zone, cursor in heads.items():
            # Zone 1 too: its last events (copies of the global's resources) may not
            # have moved the global's cursor yet, and a cursor below the compacted
            # horizon would make it send a snapshot of its own log.
            if await store.tracking(tracking_origin(zone)) != cursor:
                await store.commit([], tracking=Tracking(tracking_origin(zone), cursor))
    bar.update()
    size = source.stat().st_size / 2**20
    note = (
        f"{resources:,} resources in every zone: {zone_name(1)} (SQLite) synced them from the "
        f"global over {kind} in {synced:,.1f} s ({resources / synced:,.0f}/s; global CPU "
        f"{cpu:,.1f} s, peak RSS {peak:,.0f} MiB); the other {zones - 1} zones' stores are "
        f"copies of its {size:,.1f} MiB file (its own log compacted) with new epochs, the "
        f"global's cursor in each copy's log set to that log's head (see prepare_copies); "
        f"{time.monotonic() - started:,.0f} s in all."
    )
    return note, cpu


async def run_transport(
    directory: Path,
    kind: str,
    settings: Settings,
    report: Report,
    nats_url: str | None,
    bar: ProgressBar,
) -> None:
    """Every phase over one transport.

    Fan-out and catch-up run on a global of their own with memory zones. The
    reconnect, resync and RSS phases run on prepared stores (see
    :func:`prepare_copies`), made over the first transport and reused by the next:
    its zones resume from where the previous run left them (after a resync, in the
    global's new epoch). Only the phases in ``settings.phases`` run.
    """
    zones = settings.zone_counts[-1]
    phases = settings.phases
    if {"fanout", "catchup"} & phases:
        fanout = directory / kind
        await anyio.Path(fanout).mkdir(parents=True)
        async with open_cluster(fanout, kind, settings.workers, nats_url) as cluster:
            await cluster.start_global()
            await cluster.global_child.request("register", zones)
            await cluster.start_workers()
            if "fanout" in phases:
                await phase_fanout(cluster, settings, report, bar)
            if "catchup" in phases:
                await phase_catchup(cluster, settings, report, bar)

    async def prepared(name: str, resources: int) -> Path:
        """Stores with *resources* resources everywhere: made once, for every transport."""
        path = directory / name
        if not path.exists():
            started = time.monotonic()
            note, cpu = await prepare_copies(path, kind, settings, resources, nats_url, bar)
            report.notes.append(note)
            report.one_zone_sync[resources] = cpu
            report.preparation += time.monotonic() - started
        return path

    if {"reconnect", "resync"} & phases:
        reconnect = await prepared("reconnect", settings.resources)
        async with open_cluster(reconnect, kind, settings.workers, nats_url) as cluster:
            await cluster.start_global()
            await cluster.start_workers()
            await cluster.start_zones(
                (zone_name(n) for n in count_from(1, zones)), "sqlite", watch=True
            )
            if "reconnect" in phases:
                await phase_reconnect(cluster, settings, report, bar)
            if "resync" in phases:
                await phase_resync(cluster, settings, report, bar)
    if "rss" in phases:
        rss = await prepared("rss", settings.rss_resources)
        async with open_cluster(rss, kind, settings.workers, nats_url) as cluster:
            await phase_rss(cluster, settings, report, bar)


# -- output ------------------------------------------------------------------------------


def table(rows: Sequence[Row]) -> str:
    """The report as fixed-width text."""
    width = max([len(row.measurement) for row in rows] + [11])
    header = f"{'measurement':<{width}}  {'via':<4}  {'result':>18}  {'target':<24} {'':<4}  detail"
    lines = [header]
    lines.extend(
        f"{row.measurement:<{width}}  {row.transport:<4}  {row.result:>18}  "
        f"{row.target:<24} {row.verdict:<4}  {row.detail}"
        for row in rows
    )
    return "\n".join(lines)


def markdown(report: Report, wall: float, plots: Sequence[str], failure: str | None) -> str:
    """The report as a markdown document."""
    settings = report.settings
    lines = [
        f"# kds scale benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"`{' '.join(['python bench/scale_bench.py', *sys.argv[1:]])}`: wall time {wall:,.0f} s, "
        f"{os.cpu_count()} cores (shared), load average at the end "
        f"{', '.join(f'{load:.2f}' for load in os.getloadavg())}.",
        "",
        f"One global process (SQLite store) and up to {settings.zone_counts[-1]} zones in "
        f"{settings.workers} worker processes, each zone with its own store, engine and "
        "session; gRPC over loopback TLS, NATS through one local nats-server; engines, stores "
        "and transports with their defaults. Latencies run from the global's commit to the "
        "last zone's store holding the change (one clock, `time.monotonic()`). CPU is the "
        "global's, from /proc; bytes are frame bytes counted by the zones' engines (TLS and "
        "NATS framing excluded).",
        "",
    ]
    if failure is not None:
        lines += [f"**The run failed:** {failure}", ""]
    lines += [
        "| measurement | via | result | target | | detail |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report.rows:
        # Markdown drops leading spaces: the indentation of a sub-row is kept as such.
        name = row.measurement
        if name.startswith("  "):
            name = "&nbsp;&nbsp;" + name[2:]
        cells = (name, row.transport, row.result, row.target, row.verdict, row.detail)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {note}" for note in report.notes]
    lines.append("")
    lines += [f"![{plot}]({plot})" for plot in plots]
    return "\n".join(lines) + "\n"


def plot(report: Report, output: Path) -> list[str]:
    """(a) fan-out latency CDFs per N; (b) cost per change against N. File names written."""
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    from matplotlib import pyplot  # type: ignore[import-not-found,unused-ignore]

    written: list[str] = []
    if not report.fanouts:
        return written
    figure, axes = pyplot.subplots(figsize=(8, 5))
    styles = {"grpc": "-", "nats": "--"}
    for kind, results in report.fanouts.items():
        for index, result in enumerate(results):
            ordered = sorted(latency * 1e3 for latency in result.latencies)
            fractions = [(rank + 1) / len(ordered) for rank in range(len(ordered))]
            axes.step(
                ordered,
                fractions,
                styles.get(kind, "-"),
                color=f"C{index}",  # one colour per N, one line style per transport
                where="post",
                label=f"{kind}, N={result.zones}",
            )
    axes.axvline(
        FANOUT_TARGET_MS, color="grey", linestyle=":", label=f"target p99 {FANOUT_TARGET_MS:.0f} ms"
    )
    axes.set_xscale("log")
    axes.set_xlabel("fan-out latency: commit to the last of N zones (ms)")
    axes.set_ylabel("fraction of changes")
    axes.set_title("Fan-out latency CDF")
    axes.grid(visible=True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output / "fanout-latency.png", dpi=120)
    pyplot.close(figure)
    written.append("fanout-latency.png")

    figure, (cpu_axes, bytes_axes) = pyplot.subplots(1, 2, figsize=(11, 4.5))
    for index, (kind, results) in enumerate(report.fanouts.items()):
        counts = [result.zones for result in results]
        color = f"C{index}"  # one colour per transport
        cpu_axes.plot(counts, [r.net.cpu * 1e3 for r in results], "o-", color=color, label=kind)
        received = [r.net.received / 1e3 for r in results]
        sent = [r.net.sent / 1e3 for r in results]
        bytes_axes.plot(counts, received, "o-", color=color, label=f"{kind}, to the zones")
        bytes_axes.plot(counts, sent, "x:", color=color, label=f"{kind}, from the zones")
        loaded = report.loaded.get(kind)
        if loaded is not None:
            # The cost must not grow with resources: this point belongs on the line.
            resources = f"{report.settings.resources:,} resources"
            cpu_axes.plot(
                [loaded.zones],
                [loaded.net.cpu * 1e3],
                "s",
                color=color,
                fillstyle="none",
                markersize=10,
                label=f"{kind}, {resources} (SQLite zones)",
            )
            bytes_axes.plot(
                [loaded.zones],
                [loaded.net.received / 1e3],
                "s",
                color=color,
                fillstyle="none",
                markersize=10,
                label=f"{kind}, to the zones, {resources}",
            )
    cpu_axes.set_xlabel("zones (N)")
    cpu_axes.set_ylabel("global CPU per change (ms, net of idle)")
    cpu_axes.set_title("Global CPU per change")
    bytes_axes.set_xlabel("zones (N)")
    bytes_axes.set_ylabel("frame bytes per change (kB, net of idle)")
    bytes_axes.set_title("Bytes per change")
    for axes in (cpu_axes, bytes_axes):
        axes.grid(visible=True, alpha=0.3)
        axes.legend(fontsize="small")
        axes.set_xlim(left=0)
        axes.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(output / "cost-vs-zones.png", dpi=120)
    pyplot.close(figure)
    written.append("cost-vs-zones.png")
    return written


def write_results(report: Report, wall: float, failure: str | None) -> Path:
    """report.md, the plots and the raw numbers (results.json) in the output directory."""
    output = report.settings.output
    output.mkdir(parents=True, exist_ok=True)
    plots = plot(report, output)
    (output / "report.md").write_text(markdown(report, wall, plots, failure))
    raw = {
        "rows": [attrs.asdict(row) for row in report.rows],
        "fanout": {
            kind: [
                {
                    "zones": r.zones,
                    "latencies_s": r.latencies,
                    "cpu_per_change_s": r.net.cpu,
                    "bytes_to_zones_per_change": r.net.received,
                    "bytes_from_zones_per_change": r.net.sent,
                }
                for r in results
            ]
            for kind, results in report.fanouts.items()
        },
        "notes": report.notes,
        "wall_seconds": wall,
        "failure": failure,
    }
    (output / "results.json").write_text(json.dumps(raw, indent=1))
    return output


# -- the whole run ---------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Settings:
    """What one run measures."""

    zone_counts: tuple[int, ...]  # fan-out N, ascending; the last is used by every phase
    probes: int  # single changes per N
    cost_probes: int  # single changes again, with resources on the global
    resources: int  # on the global and in every zone, for the reconnect
    changes: int  # committed while one zone is away
    rss_resources: int  # on the global for the RSS measurement
    workers: int  # processes the zones are spread over
    transports: tuple[str, ...]
    phases: frozenset[str]  # of PHASES
    optional_nats: bool  # NATS only if the time budget allows
    budget: float  # seconds the whole run should take
    output: Path

    def sequence_base(self, kind: str) -> int:
        """Where *kind*'s probe numbers start.

        Stores reused by the next transport keep the last probe, and a change to
        the same value would be no change at all.
        """
        return 1 + TRANSPORTS.index(kind) * 1_000_000


def progress_bar(settings: Settings) -> ProgressBar:
    """A tqdm bar on stderr counting changes and phases."""
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as exc:
        raise SystemExit(
            "scale_bench.py draws a progress bar with tqdm: pip install -e '.[bench]'"
        ) from exc
    phases = settings.phases
    per_transport = (
        len(settings.zone_counts) * settings.probes * ("fanout" in phases)
        + settings.cost_probes * ("reconnect" in phases)
        + len(phases)
    )
    total = per_transport * len(settings.transports) + 4  # + preparing two sets of stores
    bar: ProgressBar = tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True)
    return bar


async def bench(directory: Path, settings: Settings, report: Report, bar: ProgressBar) -> None:
    """Every phase, per transport; NATS after gRPC only if the time budget allows."""
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        nats: NatsServer | None = None
        if "nats" in settings.transports:
            nats = stack.enter_context(NatsServer(directory / "nats-server"))
        for index, kind in enumerate(settings.transports):
            if index and settings.optional_nats:
                elapsed = time.monotonic() - started
                # The next run takes about as long as the first, less the preparation
                # of the stores it reuses.
                expected = elapsed - report.preparation
                if elapsed + expected > settings.budget:
                    report.notes.append(
                        f"{kind} not measured: the run so far took {elapsed:,.0f} s, and one "
                        f"over {kind} (about {expected:,.0f} s) would exceed the "
                        f"{settings.budget:,.0f} s budget; run `--transport {kind}` for it."
                    )
                    break
            url = None if nats is None else nats.url
            await run_transport(directory, kind, settings, report, url, bar)


async def main_async(settings: Settings) -> None:
    """Run the benchmark, write and print the report; children are killed however it ends.

    SIGTERM cancels the run as Ctrl-C does: every cluster kills its children on
    the way out, and the report holds what was measured until then.
    """
    report = Report(settings)
    bar = progress_bar(settings)
    started = time.monotonic()
    failure: str | None = None
    directory = Path(tempfile.mkdtemp(prefix="kds-scale-bench-"))
    terminated = False
    try:
        async with anyio.create_task_group() as group:

            async def stop_on_sigterm() -> None:
                nonlocal terminated
                with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        terminated = True
                        group.cancel_scope.cancel()
                        return

            group.start_soon(stop_on_sigterm)
            await bench(directory, settings, report, bar)
            group.cancel_scope.cancel()
        if terminated:
            failure = "terminated (SIGTERM)"
    except BenchError as exc:
        failure = str(exc)
    except BaseException:
        failure = "interrupted"
        raise
    finally:
        bar.close()
        wall = time.monotonic() - started
        output = write_results(report, wall, failure)
        print(table(report.rows))
        for note in report.notes:
            print(f"- {note}")
        print(f"wall time {wall:,.0f} s; report and plots in {output}")
        if failure is None:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print(f"stores and logs kept in {directory}", file=sys.stderr)
    if failure is not None:
        raise SystemExit(f"the benchmark failed: {failure}")


def _zone_counts(text: str) -> tuple[int, ...]:
    """``--zones``: ascending zone counts, comma-separated."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not counts or counts[0] < 1 or list(counts) != sorted(set(counts)):
        raise argparse.ArgumentTypeError(f"expected ascending zone counts >= 1, got {text!r}")
    return counts


def _phases(text: str) -> frozenset[str]:
    phases = frozenset(part.strip() for part in text.split(","))
    unknown = sorted(phases - set(PHASES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown phase {', '.join(unknown)}: choose from {', '.join(PHASES)}"
        )
    return phases


def main() -> None:
    """Run the benchmark, or one of its child processes (``--role``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--transport",
        choices=[*TRANSPORTS, "both"],
        help="default: gRPC, then NATS if the time budget allows",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    sizes = parser.add_argument_group("sizes (defaults; --quick makes them small)")
    sizes.add_argument("--zones", type=_zone_counts, help="fan-out zone counts: 1,10,50,100")
    sizes.add_argument("--probes", type=int, help="single changes per zone count: 200")
    sizes.add_argument("--resources", type=int, help="resources in every zone: 10,000")
    sizes.add_argument("--changes", type=int, help="changes a zone catches up: 50,000")
    sizes.add_argument("--rss-resources", type=int, help="resources for the RSS: 100,000")
    parser.add_argument("--workers", type=int, help="processes the zones run in: 4 (--quick: 2)")
    parser.add_argument(
        "--budget", type=float, help="seconds the default run may take: 600 (--quick: 90)"
    )
    parser.add_argument("--output", type=Path, help="default bench/results/<YYYY-MM-DD>")
    parser.add_argument(
        "--phases",
        type=_phases,
        help=f"the phases to run, of {','.join(PHASES)} (default: all)",
    )
    parser.add_argument("--role", choices=["global", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "global":
        _child_main("global", run_global, args.dir, args.transport, args.listen)
    if args.role == "worker":
        _child_main("worker", run_worker, args.dir, args.transport, args.address)
    for name in ("workers", "probes", "resources", "changes", "rss_resources"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    quick = args.quick
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    default_output = Path(__file__).parent / "results" / (f"{today}-quick" if quick else today)
    probes = args.probes or (20 if quick else 200)
    settings = Settings(
        zone_counts=args.zones or ((1, 5) if quick else (1, 10, 50, 100)),
        probes=probes,
        cost_probes=max(10, probes // 8),
        resources=args.resources or (500 if quick else 10_000),
        changes=args.changes or (2_000 if quick else 50_000),
        rss_resources=args.rss_resources or (2_000 if quick else 100_000),
        workers=args.workers or (2 if quick else 4),
        transports=TRANSPORTS if args.transport in (None, "both") else (args.transport,),
        phases=args.phases or frozenset(PHASES),
        optional_nats=args.transport is None,
        budget=args.budget or (90.0 if quick else 600.0),
        output=args.output or default_output,
    )
    anyio.run(main_async, settings)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)  # the report so far was written, and every child killed
