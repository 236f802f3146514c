"""Benchmark replication: a global and zones in separate processes, over gRPC and over NATS.

Run it as a script (it is not a test)::

    python bench/sync_bench.py [--transport grpc|nats|both] [--resources 100000]
                               [--changes 50000] [--zones 10] [--quick]

Every control plane is its own process with its own SQLite store. The
benchmark process writes to the global's store file (the global notices other
writers by polling every few milliseconds: see :func:`run_global`) and follows
the zones' store files with plain ``sqlite3`` queries, so nothing it measures
goes through a test harness. The global listens with gRPC over loopback TLS, or
through one ``nats-server`` the benchmark starts (:class:`kds.testing.NatsServer`,
plain TCP on loopback); each transport gets a fresh set of stores. In order, it
measures:

1. the baselines: plain ``sqlite3`` inserting the same rows in batches, and the
   ``eventsourcing`` library's leader -> follower rate;
2. initial sync: *resources* resources on the global, one empty zone started --
   the time until it has applied them all;
3. sustained replication: *changes* changes committed on the global as fast as it
   takes them, in batches of 1,000 -- the rate at which the zone applies them,
   the CPU time each process spent per change (which, unlike the rate, holds up
   when the machine is busy with other work: it is shared), and the frames the
   zone received;
4. reconnect: the zone stopped, 10 resources changed, the zone restarted -- the
   bytes and events the new session received (resume, not resync);
5. propagation latency: the zone's store copied to *zones* zones (they resume
   from the same cursor), all connected; single changes, one at a time -- the
   time from commit to each zone having applied it, p50 and p99, and the CPU
   time each process spent per change;
6. the global's peak RSS (VmHWM) with *resources* resources and *zones* zones;
7. with NATS: raw nats-py publish -> subscribe through the same server
   (``nats_baseline.py``: one publisher, *zones* subscriber processes, messages
   of the sizes kds sent in 3 and 5), and kds's rate and latency against it.

``--quick`` runs every step with small sizes, for a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs
from nats_baseline import describe_rate, measure, percentile, process_cpu_seconds
from workload import baseline_rows

from kds import ResourceKey, Upsert
from kds.sync import GlobalEngine, SyncOptions, ZoneEngine
from kds.sync.engines import GLOBAL_ORIGIN, tracking_origin
from kds.sync.lifecycle import zone_key
from kds.testing import NatsServer
from kds_stores.sqlite import SQLiteStore
from kds_transports.grpc import GrpcTransport
from kds_transports.nats import NatsTransport

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from kds.transport import Transport

SPEC = {"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "Mesh"}, "default": {}}]}
OPTIONS = SyncOptions(heartbeat_interval=5.0, heartbeat_timeout=30.0, insight_interval=10.0)
POLL = 0.002  # seconds between the benchmark's looks at a store, and the global's
GLOBAL_READER_POLL: Final = 1.0  # seconds: each session's own polling (see run_global)
TRANSPORTS: Final = ("grpc", "nats")
STATS_INTERVAL: Final = 0.2  # seconds between a zone's writes of its counters

# What the issues ask of each transport; the other rows have one target for both.
SUSTAINED_TARGET: Final = {"grpc": ">= 50,000/s", "nats": ">= 30,000/s"}
LATENCY_TARGET: Final = "p99 <= 50 ms"

Row = tuple[str, str, str, str]
"""A report line: measurement, result, detail, target."""


def resource(number: int, generation: int = 0) -> Upsert:
    """A MeshTimeout on the global; *generation* changes its spec."""
    return Upsert(
        key=ResourceKey("MeshTimeout", "default", f"timeout-{number:07d}"),
        labels={"team": f"team-{number % 20}"},
        spec={**SPEC, "generation": generation},
    )


# -- the control planes (child processes) ---------------------------------------------


def server_transport(kind: str, directory: Path, nats_url: str | None) -> Transport:
    """The global's transport: gRPC with TLS on a free port, or the NATS server at *nats_url*."""
    if kind == "nats":
        if nats_url is None:
            raise SystemExit("--nats-url is needed with --transport nats")
        return NatsTransport.server(nats_url)
    return GrpcTransport.server("grpcs://127.0.0.1:0", work_dir=directory)


def client_transport(kind: str, directory: Path, address: str, zone: str) -> Transport:
    """A zone's transport to the global at *address* (a NATS server's, for NATS)."""
    if kind == "nats":
        return NatsTransport.client(address, zone=zone)
    return GrpcTransport.client(address, zone=zone, ca_file=directory / "kds-cp.crt")


async def run_global(directory: Path, kind: str, nats_url: str | None) -> None:
    """The global: its store and transport; prints its address when listening.

    The benchmark process commits to the global's store file, so the global
    learns of those commits by polling. ``SQLiteStore`` polls once per waiting
    reader -- one per zone session -- through its reader thread, so that with
    ten zones its 2 ms interval would cost 5,000 queries a second, most of a
    core, with nothing to read. Instead, one task here reads the head every
    :data:`POLL` seconds with a plain ``sqlite3`` query (microseconds) and, when
    it moved, asks the store (:meth:`~kds.Store.head`, which wakes every reader
    waiting for it); the readers' own polling is slow. In a deployment the
    global's writes go through its own API, in its own process, and wake its
    readers at once.
    """
    path = directory / "global.db"
    async with SQLiteStore(path, poll_interval=GLOBAL_READER_POLL) as store:
        transport = server_transport(kind, directory, nats_url)
        async with anyio.create_task_group() as group:

            async def watch_head() -> None:
                with contextlib.closing(sqlite3.connect(path)) as db:
                    seen = -1
                    while True:
                        head: int = db.execute("SELECT head FROM meta").fetchone()[0]
                        if head != seen:
                            seen = await store.head()
                        await anyio.sleep(POLL)

            group.start_soon(watch_head)
            address = await group.start(GlobalEngine(store, transport, options=OPTIONS).run)
            print(address, flush=True)
            await anyio.sleep_forever()


async def run_zone(directory: Path, zone: str, address: str, kind: str) -> None:
    """A zone: replicates until SIGTERM, writing its session counters to a file."""
    stats_file = directory / f"{zone}.stats.json"
    transport = client_transport(kind, directory, address, zone)
    async with SQLiteStore(directory / f"{zone}.db", poll_interval=0.05) as store:
        engine = ZoneEngine(store, transport, zone=zone, options=OPTIONS)

        written: dict[str, int] = {}

        def write_stats() -> None:
            stats = engine.current_stats
            data = {
                "events": sum(stats.received.values()),
                "resets": stats.resets_received,
                "bytes": stats.bytes_received,
                "batches": stats.batches_received,
            }
            if data != written:  # the benchmark's own cost, on the zone's CPU: kept low
                stats_file.write_text(json.dumps(data))
                written.update(data)

        async with anyio.create_task_group() as group:
            group.start_soon(engine.run)
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async with anyio.create_task_group() as inner:

                    async def keep_writing() -> None:
                        while True:
                            write_stats()
                            await anyio.sleep(STATS_INTERVAL)

                    inner.start_soon(keep_writing)
                    async for _ in signals:
                        break
                    inner.cancel_scope.cancel()
            write_stats()
            group.cancel_scope.cancel()


# -- the benchmark process ------------------------------------------------------------


class Plane:
    """A control plane child process."""

    def __init__(self, args: Sequence[str], log: Path) -> None:
        self.log = log.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 -- this script, this interpreter
            [sys.executable, __file__, *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def stop(self) -> None:
        """SIGTERM, and wait for it to finish (a zone writes its final counters)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far."""
        return process_cpu_seconds(self.process.pid)

    def peak_rss_mb(self) -> float:
        """VmHWM of the process, in MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024


def eventsourcing_rate(directory: Path, count: int) -> str:
    """The eventsourcing library's leader -> follower rate, or why it was not measured."""
    try:
        from eventsourcing_baseline import eventsourcing_follower_rate
    except ImportError:
        return "not measured: pip install -e '.[bench]'"
    return f"{eventsourcing_follower_rate(directory / 'eventsourcing', count):,.0f} events/s"


class Follower:
    """Reads how far a store has applied another's log: a zone's, the global's by default.

    A plain ``sqlite3`` query on the store's ``tracking`` table (its documented
    layout) every :data:`POLL` seconds: microseconds each, where a
    :class:`SQLiteStore` read costs a round trip through its reader thread -- the
    benchmark process shares the machine's two cores with everything it measures.
    """

    def __init__(self, path: Path, origin: str = GLOBAL_ORIGIN) -> None:
        self.path = path
        self.origin = origin.encode()
        self._db: sqlite3.Connection | None = None

    def applied(self) -> int:
        """The revision of the origin's log the store applied (0 before its first)."""
        if self._db is None:
            if not self.path.exists():
                return 0  # the zone has not created its store yet
            self._db = sqlite3.connect(self.path)
        try:
            row = self._db.execute(
                "SELECT revision FROM tracking WHERE origin = ?", (self.origin,)
            ).fetchone()
        except sqlite3.OperationalError:
            return 0  # the zone is still creating its tables
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        """Close the connection, if open."""
        if self._db is not None:
            self._db.close()
            self._db = None


@contextlib.contextmanager
def following(directory: Path, names: Sequence[str]) -> Iterator[list[Follower]]:
    """A :class:`Follower` of each named zone's store in *directory*, closed on exit."""
    followers = [Follower(directory / f"{name}.db") for name in names]
    try:
        yield followers
    finally:
        for follower in followers:
            follower.close()


async def wait_applied(followers: Sequence[Follower], revision: int, deadline: float) -> None:
    """Until every zone has applied the global's log up to *revision*."""
    with anyio.fail_after(deadline):
        for follower in followers:
            while True:
                if follower.applied() >= revision:
                    break
                await anyio.sleep(POLL)  # another process's progress: polled


async def applied_after(
    followers: Sequence[Follower], revision: int, started: float, deadline: float
) -> list[float]:
    """Seconds from *started* until each zone had applied *revision*, as first seen."""
    seen: dict[int, float] = {}
    with anyio.fail_after(deadline):
        while True:
            for index, follower in enumerate(followers):
                if index not in seen and follower.applied() >= revision:
                    seen[index] = time.perf_counter() - started
            if len(seen) == len(followers):
                return [seen[index] for index in range(len(followers))]
            await anyio.sleep(POLL)  # other processes' progress: polled


def zone_stats(directory: Path, zone: str) -> dict[str, Any]:
    """The session counters a stopped zone process last wrote (see :func:`wait_stats`)."""
    data: dict[str, Any] = json.loads((directory / f"{zone}.stats.json").read_text())
    return data


async def wait_stats(directory: Path, zone: str, events: int) -> dict[str, Any]:
    """A zone's counters once they count *events* events (they are written periodically)."""
    with anyio.fail_after(30 * STATS_INTERVAL):
        while True:
            # Missing, or caught while the zone rewrites it: read it again.
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                stats = zone_stats(directory, zone)
                if stats["events"] >= events:
                    return stats
            await anyio.sleep(STATS_INTERVAL / 4)  # another process's file: polled


def baseline_insert_rate(directory: Path, count: int) -> float:
    """Plain sqlite3: the same rows, batches of 1,000, WAL, synchronous=FULL."""
    upserts = [resource(number) for number in range(count)]
    rows = baseline_rows(upserts)
    db = sqlite3.connect(directory / "baseline.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute(
            "CREATE TABLE resources (type TEXT, mesh TEXT, name TEXT, labels BLOB, spec BLOB, "
            "version INTEGER, created_at INTEGER, modified_at INTEGER, "
            "PRIMARY KEY (type, mesh, name)) WITHOUT ROWID"
        )
        started = time.perf_counter()
        for start in range(0, len(rows), 1000):
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO resources VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows[start : start + 1000]
            )
            db.execute("COMMIT")
        return count / (time.perf_counter() - started)
    finally:
        db.close()


def copy_store(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite store (the backup API copies WAL content too)."""
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


@attrs.frozen(kw_only=True)
class Settings:
    """What one run measures: sizes, and the transports to measure them over."""

    resources: int
    changes: int
    zones: int
    samples: int
    transports: tuple[str, ...]
    raw_bytes: int  # bytes per subscriber the raw nats-py rate measurements send
    baseline_events: int  # events the eventsourcing baseline replicates


@attrs.define
class Outcome:
    """One transport's report lines, and the figures the raw comparison needs."""

    rows: list[Row] = attrs.Factory(list)
    sustained_rate: float = 0.0
    batch_size: float = 0.0  # average bytes of a sustained-phase Batch frame
    changes_per_batch: float = 0.0
    single_size: float = 0.0  # average bytes of a one-change Batch frame
    p50: float = 0.0  # seconds
    p99: float = 0.0  # seconds


async def bench_transport(
    directory: Path, kind: str, settings: Settings, nats: NatsServer | None
) -> Outcome:
    """Every measurement of one transport, with stores of its own in *directory*."""
    resources, changes, zones = settings.resources, settings.changes, settings.zones
    outcome = Outcome()
    report = outcome.rows
    # A process's CPU time: the NATS server's is part of the transport's cost.
    server_pid = None if nats is None else nats.pid

    def server_cpu() -> float:
        return 0.0 if server_pid is None else process_cpu_seconds(server_pid)

    names = [f"zone-{number}" for number in range(1, zones + 1)]
    async with SQLiteStore(directory / "global.db", poll_interval=POLL) as writer:
        for start in range(0, resources, 5000):
            await writer.commit([resource(n) for n in range(start, min(resources, start + 5000))])
        # The zones registered up front (as an operator may create Zone resources):
        # a zone's first connection creates its Zone otherwise, and a resumed
        # session meeting another zone's Zone change answers it with a snapshot --
        # the zones of step 5, connecting together, would each receive *resources*
        # resources before the first latency sample.
        await writer.commit([Upsert(key=zone_key(name), spec={"enabled": True}) for name in names])
        role = ["--dir", str(directory), "--transport", kind]
        if nats is not None:
            role += ["--nats-url", nats.url]
        global_plane = Plane(["--role", "global", *role], directory / "global.log")
        assert global_plane.process.stdout is not None  # noqa: S101 -- piped above
        address = global_plane.process.stdout.readline().strip()
        if not address:
            global_plane.stop()
            raise SystemExit(f"the global did not start; see {directory / 'global.log'}")
        zone_planes: dict[str, Plane] = {}

        def start_zone(zone: str) -> None:
            zone_planes[zone] = Plane(
                ["--role", "zone", *role, "--zone", zone, "--address", address],
                directory / f"{zone}.log",
            )

        try:
            # 2. initial sync into an empty zone
            zone_store = Follower(directory / "zone-1.db")
            head = await writer.head()
            global_cpu = global_plane.cpu_seconds()
            started = time.perf_counter()
            start_zone("zone-1")
            with contextlib.closing(zone_store):
                await wait_applied([zone_store], head, deadline=600)
                initial = time.perf_counter() - started
                global_cpu = global_plane.cpu_seconds() - global_cpu
                report.append(
                    (
                        f"initial sync of {resources:,} resources",
                        f"{initial:.2f} s",
                        f"{resources / initial:,.0f}/s",
                        "<= 3 s",
                    )
                )
                report.append(
                    (
                        "  CPU: zone (whole process) / global",
                        f"{zone_planes['zone-1'].cpu_seconds():.2f} s",
                        f"{global_cpu:.2f} s",
                        "",
                    )
                )
                before = await wait_stats(directory, "zone-1", resources)

                # 3. sustained replication
                zone_cpu = zone_planes["zone-1"].cpu_seconds()
                global_cpu = global_plane.cpu_seconds()
                nats_cpu = server_cpu()
                writer_cpu = time.process_time()
                started = time.perf_counter()
                for start in range(0, changes, 1000):
                    await writer.commit(
                        [
                            resource(n % resources, 1 + n // resources)
                            for n in range(start, start + 1000)
                        ]
                    )
                committed = time.perf_counter() - started
                await wait_applied([zone_store], await writer.head(), deadline=600)
                sustained = time.perf_counter() - started
                # CPU time per change: what each process costs, whatever else the
                # machine was doing meanwhile (wall-clock rates are not).
                zone_cpu = zone_planes["zone-1"].cpu_seconds() - zone_cpu
                global_cpu = global_plane.cpu_seconds() - global_cpu
                nats_cpu = server_cpu() - nats_cpu
                writer_cpu = time.process_time() - writer_cpu
                outcome.sustained_rate = changes / sustained
                report.append(
                    (
                        f"sustained global->zone, {changes:,} changes",
                        f"{changes / sustained:,.0f} changes/s",
                        f"global took them at {changes / committed:,.0f}/s",
                        SUSTAINED_TARGET[kind],
                    )
                )
                per_change = (
                    f"{global_cpu / changes * 1e6:,.0f} us / {writer_cpu / changes * 1e6:,.0f} us"
                )
                if nats is not None:
                    per_change += f" / {nats_cpu / changes * 1e6:,.1f} us"
                report.append(
                    (
                        "  CPU per change: zone / global / writer"
                        + (" / nats-server" if nats is not None else ""),
                        f"{zone_cpu / changes * 1e6:,.0f} us",
                        per_change,
                        "",
                    )
                )
                after = await wait_stats(directory, "zone-1", resources + changes)
                batches = max(1, after["batches"] - before["batches"])
                outcome.batch_size = (after["bytes"] - before["bytes"]) / batches
                outcome.changes_per_batch = (after["events"] - before["events"]) / batches
                report.append(
                    (
                        "  frames received by the zone",
                        f"{batches:,} batches",
                        f"{outcome.batch_size:,.0f} bytes, "
                        f"{outcome.changes_per_batch:,.0f} changes each",
                        "",
                    )
                )

            # 4. reconnect after missing 10 changes
            zone_planes.pop("zone-1").stop()
            await writer.commit([resource(n, 999) for n in range(10)])
            start_zone("zone-1")
            with following(directory, ["zone-1"]) as zone_stores:
                await wait_applied(zone_stores, await writer.head(), deadline=120)
            zone_planes.pop("zone-1").stop()
            resumed = zone_stats(directory, "zone-1")
            report.append(
                (
                    "reconnect after missing 10 changes",
                    f"{resumed['bytes']:,} bytes",
                    f"{resumed['events']} events, {resumed['resets']} resets",
                    "<= 20 KB, 0 re-sent",
                )
            )

            # 5. latency to many zones, each resuming from a copy of zone-1's store
            for name in names[1:]:
                copy_store(directory / "zone-1.db", directory / f"{name}.db")
            for name in names:
                (directory / f"{name}.stats.json").unlink(missing_ok=True)
                start_zone(name)
            with following(directory, names) as stores:
                await wait_applied(stores, await writer.head(), deadline=300)
                # And the global has each zone's first (empty) snapshot: new to it, each
                # zone sends one, which costs both sides a pass over every resource.
                published = [
                    Follower(directory / "global.db", tracking_origin(name)) for name in names
                ]
                try:
                    await wait_applied(published, 1, deadline=300)
                finally:
                    for follower in published:
                        follower.close()
                before = await wait_stats(directory, "zone-1", 0)
                zone_cpu = sum(zone_planes[name].cpu_seconds() for name in names)
                global_cpu = global_plane.cpu_seconds()
                nats_cpu = server_cpu()
                latencies: list[float] = []
                worst: list[float] = []
                for sample in range(settings.samples):
                    started = time.perf_counter()
                    revision = await writer.commit([resource(sample, 2000 + sample)])
                    seen = await applied_after(stores, revision, started, deadline=30)
                    latencies.extend(seen)
                    worst.append(max(seen))
                zone_cpu = sum(zone_planes[name].cpu_seconds() for name in names) - zone_cpu
                global_cpu = global_plane.cpu_seconds() - global_cpu
                nats_cpu = server_cpu() - nats_cpu
                outcome.p50 = statistics.median(latencies)
                outcome.p99 = percentile(latencies, 0.99)
                report.append(
                    (
                        f"propagation latency, {zones} zones, {settings.samples} changes",
                        f"p50 {outcome.p50 * 1e3:.1f} ms",
                        f"p99 {outcome.p99 * 1e3:.1f} ms (slowest zone p99 "
                        f"{percentile(worst, 0.99) * 1e3:.1f} ms)",
                        LATENCY_TARGET,
                    )
                )
                samples = settings.samples
                per_sample = f"{global_cpu / samples * 1e3:,.2f} ms"
                if nats is not None:
                    per_sample += f" / {nats_cpu / samples * 1e3:,.2f} ms"
                report.append(
                    (
                        "  CPU per change: each zone / global"
                        + (" / nats-server" if nats is not None else ""),
                        f"{zone_cpu / zones / samples * 1e3:,.2f} ms",
                        per_sample,
                        "",
                    )
                )
                after = await wait_stats(directory, "zone-1", before["events"] + settings.samples)
                batches = max(1, after["batches"] - before["batches"])
                outcome.single_size = (after["bytes"] - before["bytes"]) / batches
                # Any would have been sent meanwhile: the measurement would not be quiet.
                snapshots = 0
                for name in names:
                    snapshots += (await wait_stats(directory, name, 0))["resets"]
                report.append(("  snapshots the zones received", f"{snapshots}", "", "0"))
                # 6. the global's memory
                report.append(
                    (
                        f"global peak RSS, {resources:,} resources, {zones} zones",
                        f"{global_plane.peak_rss_mb():.0f} MiB",
                        "",
                        "",
                    )
                )
        finally:
            for plane in zone_planes.values():
                plane.stop()
            global_plane.stop()
    return outcome


async def raw_rows(nats: NatsServer, settings: Settings, kds: Outcome) -> list[Row]:
    """Raw nats-py through *nats*, with kds's message sizes; and kds as a share of it."""
    size = max(64, round(kds.batch_size))
    raw = await measure(
        nats.url,
        subscribers=settings.zones,
        size=size,
        count=max(100, settings.raw_bytes // size),
        latency_size=max(64, round(kds.single_size)),
        samples=settings.samples,
        server_pid=nats.pid,
    )
    rows: list[Row] = [
        (
            f"raw nats-py rate, 1 publisher, {rate.subscribers} subscriber(s)",
            f"{rate.messages_per_second:,.0f} msg/s",
            describe_rate(rate),
            "",
        )
        for rate in (raw.rate_one, raw.rate_all)
    ]
    latency = raw.latency
    rows.append(
        (
            f"raw nats-py latency, {latency.subscribers} subscribers, {latency.size:,} B",
            f"p50 {latency.p50 * 1e3:.2f} ms",
            f"p99 {latency.p99 * 1e3:.2f} ms (slowest subscriber p99 "
            f"{latency.slowest_p99 * 1e3:.2f} ms)",
            "",
        )
    )
    # At kds's frame size, raw NATS would carry this many changes per second.
    carried = raw.rate_one.messages_per_second * kds.changes_per_batch
    rows.append(
        (
            "kds over NATS / raw nats-py: sustained rate",
            f"{kds.sustained_rate / carried:.3f}",
            f"{kds.sustained_rate:,.0f} vs {carried:,.0f} changes/s "
            f"({kds.changes_per_batch:,.0f} changes per message)",
            "",
        )
    )
    rows.append(
        (
            "kds over NATS / raw nats-py: latency p50, p99",
            f"{kds.p50 / latency.p50:.1f}x, {kds.p99 / latency.p99:.1f}x",
            f"{kds.p50 * 1e3:.1f} / {latency.p50 * 1e3:.2f} ms, "
            f"{kds.p99 * 1e3:.1f} / {latency.p99 * 1e3:.2f} ms",
            "",
        )
    )
    return rows


def print_report(baselines: Sequence[Row], runs: dict[str, Outcome], raw: Sequence[Row]) -> None:
    """The report: baselines, then each measurement with one line per transport."""
    print(f"{'measurement':<56} {'via':<5} {'result':>18}  {'detail':<52} target")
    for name, result, detail, target in baselines:
        print(f"{name:<56} {'':<5} {result:>18}  {detail:<52} {target}")
    outcomes = list(runs.items())
    if outcomes:
        for index, (name, *_) in enumerate(outcomes[0][1].rows):
            for position, (kind, outcome) in enumerate(outcomes):
                _, result, detail, target = outcome.rows[index]
                label = name if position == 0 else ""
                print(f"{label:<56} {kind:<5} {result:>18}  {detail:<52} {target}")
    for name, result, detail, target in raw:
        print(f"{name:<56} {'nats':<5} {result:>18}  {detail:<52} {target}")


async def bench(directory: Path, settings: Settings) -> None:
    """Run every measurement in *directory* and print the report."""
    baselines: list[Row] = []
    base_rate = baseline_insert_rate(directory, min(settings.resources, 100_000))
    baselines.append(("sqlite3 batched insert (baseline)", f"{base_rate:,.0f} rows/s", "", ""))
    (directory / "eventsourcing").mkdir()
    baselines.append(
        (
            "eventsourcing leader->follower (baseline)",
            eventsourcing_rate(directory, settings.baseline_events),
            "same process, threads; one commit per event",
            "",
        )
    )
    runs: dict[str, Outcome] = {}
    raw: list[Row] = []
    for kind in settings.transports:
        (directory / kind).mkdir()
        if kind == "nats":
            (directory / "nats-server").mkdir()
            with NatsServer(directory / "nats-server") as nats:
                runs[kind] = await bench_transport(directory / kind, kind, settings, nats)
                raw = await raw_rows(nats, settings, runs[kind])
        else:
            runs[kind] = await bench_transport(directory / kind, kind, settings, None)
    print_report(baselines, runs, raw)


def main() -> None:
    """Run the benchmark, or one control plane of it (``--role``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=[*TRANSPORTS, "both"], default="both")
    parser.add_argument("--resources", type=int, help="default 100,000 (--quick: 10,000)")
    parser.add_argument("--changes", type=int, help="default 50,000 (--quick: 10,000)")
    parser.add_argument("--zones", type=int, help="default 10 (--quick: 3)")
    parser.add_argument("--samples", type=int, help="latency samples; default 200 (--quick: 50)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--role", choices=["global", "zone"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--zone", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--nats-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "global":
        anyio.run(run_global, Path(args.dir), args.transport, args.nats_url)
        return
    if args.role == "zone":
        anyio.run(run_zone, Path(args.dir), args.zone, args.address, args.transport)
        return
    quick = args.quick
    settings = Settings(
        resources=args.resources or (10_000 if quick else 100_000),
        changes=args.changes or (10_000 if quick else 50_000),
        zones=args.zones or (3 if quick else 10),
        samples=args.samples or (50 if quick else 200),
        transports=TRANSPORTS if args.transport == "both" else (args.transport,),
        raw_bytes=(16 if quick else 64) * 2**20,
        baseline_events=2_000 if quick else 20_000,
    )
    for name in ("resources", "changes", "zones", "samples"):
        if getattr(settings, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(settings, name)}")
    if settings.changes % 1000:
        parser.error(f"--changes must be a multiple of 1,000, got {settings.changes}")
    print(
        f"{settings.resources:,} resources, {settings.changes:,} changes, {settings.zones} zones, "
        f"{settings.samples} latency samples; separate processes, SQLite stores; "
        f"{' and '.join(settings.transports)} (gRPC over loopback TLS, NATS through one local "
        "nats-server)"
    )
    with tempfile.TemporaryDirectory(prefix="kds-sync-bench-") as directory:
        anyio.run(bench, Path(directory), settings)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
