"""The PostgreSQL rows of ``store_bench.py``: PostgresStore next to raw asyncpg.

See ``store_bench.py`` for what is measured. Every measurement gets a schema of
its own on one embedded server (fsync on), so none inherits another's data.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg
import attrs
from workload import baseline_rows

from kds.testing.postgres import PostgresServer
from kds_stores.postgres import PostgresSettings, PostgresStore, migrate_up

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from kds.store import Upsert

_schemas = itertools.count()
_FOLLOW_SAMPLES = 1_000
_PACE = 0.002  # seconds between follow-latency samples, so each is measured alone


async def _schema(base: PostgresSettings) -> PostgresSettings:
    settings = attrs.evolve(base, schema=f"bench_{next(_schemas)}", pool_size=16)
    await migrate_up(settings)
    return settings


def _split(items: Sequence[Any], parts: int, size: int) -> list[list[Sequence[Any]]]:
    """*items* dealt round-robin to *parts* writers, each as batches of *size*."""
    shares = [items[part::parts] for part in range(parts)]
    return [[share[i : i + size] for i in range(0, len(share), size)] for share in shares]


async def _store_commits(
    base: PostgresSettings, work: list[list[Sequence[Upsert]]], *, instances: bool
) -> float:
    """Seconds for the writers of *work* to commit their batches through PostgresStore."""
    settings = await _schema(base)
    async with contextlib.AsyncExitStack() as stack:
        count = len(work) if instances else 1
        stores = [
            await stack.enter_async_context(PostgresStore(settings, listen=False))
            for _ in range(count)
        ]

        async def write(store: PostgresStore, batches: list[Sequence[Upsert]]) -> None:
            for batch in batches:
                await store.commit(batch)

        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for number, batches in enumerate(work):
                group.start_soon(write, stores[number % count], batches)
        elapsed = time.perf_counter() - started
        expected = sum(len(batch) for batches in work for batch in batches)
        if await stores[0].head() != expected:
            raise SystemExit(f"PostgresStore head is {await stores[0].head()}, not {expected}")
    return elapsed


async def _create_plain_table(connection: asyncpg.Connection, table: str) -> None:
    """The baselines' table: the columns of kds_resources, keyed the same way."""
    await connection.execute(
        f"CREATE TABLE {table} (type text, mesh text, name text, labels bytea, "
        "spec bytea, version bigint, created_at bigint, modified_at bigint, "
        "PRIMARY KEY (type, mesh, name))"
    )


async def _baseline_commits(base: PostgresSettings, work: list[list[Sequence[Any]]]) -> float:
    """Seconds for raw asyncpg writers (a connection each) to executemany the same rows."""
    settings = await _schema(base)
    table = f'"{settings.schema}".plain'
    connections = [await asyncpg.connect(**settings._connect_kwargs()) for _ in work]
    try:
        await _create_plain_table(connections[0], table)
        insert = f"INSERT INTO {table} VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"

        async def write(connection: asyncpg.Connection, batches: list[Sequence[Any]]) -> None:
            for batch in batches:
                async with connection.transaction():
                    await connection.executemany(insert, batch)

        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for connection, batches in zip(connections, work, strict=True):
                group.start_soon(write, connection, batches)
        return time.perf_counter() - started
    finally:
        for connection in connections:
            await connection.close()


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))]
    return statistics.median(ordered), p99


async def _store_follow_latency(base: PostgresSettings, upserts: Sequence[Upsert]) -> list[float]:
    settings = await _schema(base)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    async with (
        PostgresStore(settings) as follower,
        PostgresStore(settings, listen=False) as writer,
    ):
        with anyio.fail_after(30):
            while not follower.listening:  # noqa: ASYNC110 -- a plain attribute
                await anyio.sleep(0.01)

        async def follow() -> None:
            async with contextlib.aclosing(follower.follow(0)) as events:
                async for event in events:
                    latencies.append(time.perf_counter() - sent[event.key.name])
                    if len(latencies) == len(upserts):
                        return

        async with anyio.create_task_group() as group:
            group.start_soon(follow)
            for upsert in upserts:
                sent[upsert.key.name] = time.perf_counter()
                await writer.commit([upsert])
                await anyio.sleep(_PACE)
    return latencies


async def _baseline_follow_latency(base: PostgresSettings, rows: Sequence[Any]) -> list[float]:
    settings = await _schema(base)
    table = f'"{settings.schema}".plain'
    listener = await asyncpg.connect(**settings._connect_kwargs())
    writer = await asyncpg.connect(**settings._connect_kwargs())
    latencies: list[float] = []
    received = anyio.Event()
    sent: dict[str, float] = {}

    def on_notify(_c: object, _pid: int, _channel: str, payload: object, /) -> None:
        latencies.append(time.perf_counter() - sent[str(payload)])
        if len(latencies) == len(rows):
            received.set()

    try:
        await _create_plain_table(writer, table)
        await listener.add_listener("bench", on_notify)
        insert = f"INSERT INTO {table} VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        for row in rows:
            sent[row[2]] = time.perf_counter()
            async with writer.transaction():
                await writer.execute(insert, *row)
                await writer.execute("SELECT pg_notify('bench', $1)", row[2])
            await anyio.sleep(_PACE)
        with anyio.fail_after(30):
            await received.wait()
    finally:
        await listener.close()
        await writer.close()
    return latencies


async def _run(make_upserts: Callable[[int], list[Upsert]], commits: int) -> None:
    with PostgresServer(durable=True) as server:
        base = PostgresSettings(
            host=server.host, port=server.port, user=server.user, db_name="postgres"
        )
        version = (await asyncpg.connect(**base._connect_kwargs())).get_server_version()
        print(
            f"PostgreSQL {version.major}.{version.minor} (embedded, fsync on): "
            f"Dataplane upserts, {commits:,} commits per row at batch 1, "
            f"{commits // 10:,} at batch 100"
        )
        print(f"{'measurement':<44} {'events/s':>10} {'asyncpg/s':>10} {'ratio':>6} {'target':>8}")
        results: dict[tuple[int, int, str], float] = {}
        for batch in (1, 100):
            count = commits if batch == 1 else commits // 10 * 100
            upserts = make_upserts(count)
            rows = baseline_rows(upserts)
            for writers in (1, 8):
                baseline = await _baseline_commits(base, _split(rows, writers, batch))
                shapes = (
                    [("one store", False)]
                    if writers == 1
                    else [
                        ("tasks, one store", False),
                        ("store instances", True),
                    ]
                )
                for shape, instances in shapes:
                    seconds = await _store_commits(
                        base, _split(upserts, writers, batch), instances=instances
                    )
                    rate, base_rate = count / seconds, count / baseline
                    results[(writers, batch, shape)] = rate
                    target = {1: 2_000, 100: 30_000}[batch] if writers == 8 else None
                    label = (
                        f"commit, {writers} writer{'s' * (writers > 1)} ({shape}), batch {batch}"
                    )
                    print(
                        f"{label:<44} {rate:>10,.0f} {base_rate:>10,.0f} "
                        f"{rate / base_rate:>6.2f} {f'{target:,}' if target else '':>8}"
                    )
        samples = make_upserts(_FOLLOW_SAMPLES)
        ours = _percentiles(await _store_follow_latency(base, samples))
        theirs = _percentiles(await _baseline_follow_latency(base, baseline_rows(samples)))
        print(
            f"\nfollow latency, commit() to follower, NOTIFY on ({_FOLLOW_SAMPLES} samples): "
            f"p50 {ours[0] * 1e3:.2f} ms, p99 {ours[1] * 1e3:.2f} ms (target p99 <= 20 ms); "
            f"raw asyncpg INSERT+NOTIFY to LISTEN: p50 {theirs[0] * 1e3:.2f} ms, "
            f"p99 {theirs[1] * 1e3:.2f} ms"
        )
        met = [
            ("8 writers, batch 1 >= 2,000/s", results[(8, 1, "tasks, one store")] >= 2_000),
            ("8 writers, batch 100 >= 30,000/s", results[(8, 100, "tasks, one store")] >= 30_000),
            ("follow p99 <= 20 ms", ours[1] <= 0.020),
        ]
        print("targets: " + "; ".join(f"{n}: {'met' if ok else 'not met'}" for n, ok in met))


def bench_postgres(make_upserts: Callable[[int], list[Upsert]], *, commits: int) -> None:
    """Run the PostgreSQL measurements and print their table."""
    anyio.run(_run, make_upserts, commits, backend="asyncio")
