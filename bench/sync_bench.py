"""Benchmark replication: a global and zones in separate processes, gRPC over loopback TLS.

Run it as a script (it is not a test)::

    python bench/sync_bench.py [--resources 100000] [--changes 50000] [--zones 10]

Every control plane is its own process with its own SQLite store; the benchmark
process writes to the global's store file (the global notices other writers by
polling every few milliseconds) and watches the zones' store files, so nothing it
measures goes through a test harness. In order, it measures:

1. the baseline: plain ``sqlite3`` inserting the same rows in batches;
2. initial sync: *resources* resources on the global, one empty zone started --
   the time until it has applied them all;
3. sustained replication: *changes* changes committed on the global as fast as it
   takes them, in batches of 1,000 -- the rate at which the zone applies them;
4. reconnect: the zone stopped, 10 resources changed, the zone restarted -- the
   bytes and events the new session received (resume, not resync);
5. propagation latency: the zone's store copied to *zones* zones (they resume
   from the same cursor), all connected; single changes, one at a time -- the
   time from commit to each zone having applied it, p50 and p99;
6. the global's peak RSS (VmHWM) with *resources* resources and *zones* zones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from workload import baseline_rows

from kds import ResourceKey, Upsert
from kds.sync import GlobalEngine, SyncOptions, ZoneEngine
from kds_stores.sqlite import SQLiteStore
from kds_transports.grpc import GrpcTransport

if TYPE_CHECKING:
    from collections.abc import Sequence

SPEC = {"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "Mesh"}, "default": {}}]}
OPTIONS = SyncOptions(heartbeat_interval=5.0, heartbeat_timeout=30.0, insight_interval=10.0)
POLL = 0.002  # seconds between the benchmark's looks at a store


def resource(number: int, generation: int = 0) -> Upsert:
    """A MeshTimeout on the global; *generation* changes its spec."""
    return Upsert(
        key=ResourceKey("MeshTimeout", "default", f"timeout-{number:07d}"),
        labels={"team": f"team-{number % 20}"},
        spec={**SPEC, "generation": generation},
    )


# -- the control planes (child processes) ---------------------------------------------


async def run_global(directory: Path) -> None:
    """The global: its store, TLS on a free port; prints its address when listening."""
    async with SQLiteStore(directory / "global.db", poll_interval=POLL) as store:
        transport = GrpcTransport.server("grpcs://127.0.0.1:0", work_dir=directory)
        async with anyio.create_task_group() as group:
            address = await group.start(GlobalEngine(store, transport, options=OPTIONS).run)
            print(address, flush=True)
            await anyio.sleep_forever()


async def run_zone(directory: Path, zone: str, address: str) -> None:
    """A zone: replicates until SIGTERM, writing its session counters to a file."""
    stats_file = directory / f"{zone}.stats.json"
    transport = GrpcTransport.client(address, zone=zone, ca_file=directory / "kds-cp.crt")
    async with SQLiteStore(directory / f"{zone}.db", poll_interval=0.05) as store:
        engine = ZoneEngine(store, transport, zone=zone, options=OPTIONS)

        def write_stats() -> None:
            stats = engine.current_stats
            data = {
                "events": sum(stats.received.values()),
                "resets": stats.resets_received,
                "bytes": stats.bytes_received,
            }
            stats_file.write_text(json.dumps(data))

        async with anyio.create_task_group() as group:
            group.start_soon(engine.run)
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async with anyio.create_task_group() as inner:

                    async def keep_writing() -> None:
                        while True:
                            write_stats()
                            await anyio.sleep(0.2)

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


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process *pid* (all its threads), from /proc."""
    # Fields after the command name (which may contain spaces, so split after ")").
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def eventsourcing_rate(directory: Path, count: int) -> str:
    """The eventsourcing library's leader -> follower rate, or why it was not measured."""
    try:
        from eventsourcing_baseline import eventsourcing_follower_rate
    except ImportError:
        return "not measured: pip install -e '.[bench]'"
    return f"{eventsourcing_follower_rate(directory / 'eventsourcing', count):,.0f} events/s"


async def wait_applied(stores: Sequence[SQLiteStore], revision: int, deadline: float) -> None:
    """Until every store's cursor in the global's log reaches *revision*."""
    with anyio.fail_after(deadline):
        for store in stores:
            while True:
                cursor = await store.tracking("global")
                if cursor is not None and cursor.revision >= revision:
                    break
                await anyio.sleep(POLL)  # another process's progress: polled


def zone_stats(directory: Path, zone: str) -> dict[str, Any]:
    """The session counters a zone process last wrote."""
    data: dict[str, Any] = json.loads((directory / f"{zone}.stats.json").read_text())
    return data


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


async def bench(directory: Path, resources: int, changes: int, zones: int) -> None:
    """Run every measurement in *directory* and print the report."""
    report: list[tuple[str, str, str, str]] = []
    base_rate = baseline_insert_rate(directory, min(resources, 100_000))
    report.append(("sqlite3 batched insert (baseline)", f"{base_rate:,.0f} rows/s", "", ""))
    (directory / "eventsourcing").mkdir()
    report.append(
        (
            "eventsourcing leader->follower (baseline)",
            eventsourcing_rate(directory, min(changes, 20_000)),
            "same process, threads; one commit per event",
            "",
        )
    )

    async with SQLiteStore(directory / "global.db", poll_interval=POLL) as writer:
        for start in range(0, resources, 5000):
            await writer.commit([resource(n) for n in range(start, min(resources, start + 5000))])
        global_plane = Plane(
            ["--role", "global", "--dir", str(directory)], directory / "global.log"
        )
        assert global_plane.process.stdout is not None  # noqa: S101 -- piped above
        address = global_plane.process.stdout.readline().strip()
        if not address:
            raise SystemExit(f"the global did not start; see {directory / 'global.log'}")
        zone_planes: dict[str, Plane] = {}

        def start_zone(zone: str) -> None:
            zone_planes[zone] = Plane(
                ["--role", "zone", "--dir", str(directory), "--zone", zone, "--address", address],
                directory / f"{zone}.log",
            )

        try:
            # 2. initial sync into an empty zone
            zone_store = SQLiteStore(directory / "zone-1.db", poll_interval=0.05)
            head = await writer.head()
            global_cpu = global_plane.cpu_seconds()
            started = time.perf_counter()
            start_zone("zone-1")
            await anyio.sleep(0.2)  # the zone creates its store file first
            async with zone_store:
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

                # 3. sustained replication
                zone_cpu = zone_planes["zone-1"].cpu_seconds()
                global_cpu = global_plane.cpu_seconds()
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
                writer_cpu = time.process_time() - writer_cpu
                report.append(
                    (
                        f"sustained global->zone, {changes:,} changes",
                        f"{changes / sustained:,.0f} changes/s",
                        f"{changes / sustained / base_rate:.2f} of baseline "
                        f"(global took them at {changes / committed:,.0f}/s)",
                        ">= 50,000/s",
                    )
                )
                report.append(
                    (
                        "  CPU per change: zone / global / writer",
                        f"{zone_cpu / changes * 1e6:,.0f} us",
                        f"{global_cpu / changes * 1e6:,.0f} us / "
                        f"{writer_cpu / changes * 1e6:,.0f} us (the writer is this process)",
                        "",
                    )
                )

            # 4. reconnect after missing 10 changes
            zone_planes.pop("zone-1").stop()
            await writer.commit([resource(n, 999) for n in range(10)])
            start_zone("zone-1")
            async with SQLiteStore(directory / "zone-1.db", poll_interval=0.05) as zone_store:
                await wait_applied([zone_store], await writer.head(), deadline=120)
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
            names = [f"zone-{number}" for number in range(1, zones + 1)]
            for name in names[1:]:
                copy_store(directory / "zone-1.db", directory / f"{name}.db")
            for name in names:
                start_zone(name)
            stores = [SQLiteStore(directory / f"{name}.db", poll_interval=0.05) for name in names]
            async with contextlib.AsyncExitStack() as stack:
                for store in stores:
                    await stack.enter_async_context(store)
                await wait_applied(stores, await writer.head(), deadline=300)
                latencies: list[float] = []
                worst: list[float] = []
                for sample in range(200):
                    started = time.perf_counter()
                    revision = await writer.commit([resource(sample, 2000 + sample)])
                    seen: list[float] = []
                    for store in stores:
                        await wait_applied([store], revision, deadline=30)
                        seen.append(time.perf_counter() - started)
                    latencies.extend(seen)
                    worst.append(max(seen))
                p50 = statistics.median(latencies) * 1e3
                p99 = sorted(latencies)[int(len(latencies) * 0.99)] * 1e3
                report.append(
                    (
                        f"propagation latency, {zones} zones, 200 changes",
                        f"p50 {p50:.1f} ms",
                        f"p99 {p99:.1f} ms (slowest zone p99 "
                        f"{sorted(worst)[int(len(worst) * 0.99)] * 1e3:.1f} ms)",
                        "p99 <= 50 ms",
                    )
                )
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

    print(f"{'measurement':<46} {'result':>18}  {'detail':<44} target")
    for name, result, detail, target in report:
        print(f"{name:<46} {result:>18}  {detail:<44} {target}")


def main() -> None:
    """Run the benchmark, or one control plane of it (``--role``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=50_000)
    parser.add_argument("--zones", type=int, default=10)
    parser.add_argument("--role", choices=["global", "zone"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--zone", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "global":
        anyio.run(run_global, Path(args.dir))
        return
    if args.role == "zone":
        anyio.run(run_zone, Path(args.dir), args.zone, args.address)
        return
    print(
        f"{args.resources:,} resources, {args.changes:,} changes, {args.zones} zones; "
        "separate processes, SQLite stores, gRPC over loopback TLS"
    )
    with tempfile.TemporaryDirectory(prefix="kds-sync-bench-") as directory:
        anyio.run(bench, Path(directory), args.resources, args.changes, args.zones)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
