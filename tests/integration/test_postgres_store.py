"""PostgresStore against a real server: migrations, commit ordering, wake-ups, failures."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import asyncpg
import attrs
import pytest

from kds import ResourceKey, Upsert
from kds.errors import ConfigError, ConflictError, StoreUnavailableError
from kds.store import Cursor, Tracking, Upserted
from kds.testing.postgres import PostgresServer
from kds_stores.postgres import (
    LISTENER_APPLICATION_NAME,
    SCHEMA_VERSION,
    PostgresSettings,
    PostgresStore,
    migrate_up,
    schema_version,
)
from tests.conftest import new_postgres_schema

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.anyio

DEADLINE = 60.0  # seconds: the limit for anything these tests wait for


def _mesh(name: str, **spec: object) -> Upsert:
    return Upsert(key=ResourceKey("Mesh", None, name), spec=dict(spec))


async def _wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for *condition*, failing after the deadline (it has no event to wait on)."""
    with anyio.fail_after(DEADLINE):
        while not condition():  # noqa: ASYNC110 -- a plain attribute, polled with a deadline
            await anyio.sleep(0.01)
    assert condition(), what


# -- migrations ----------------------------------------------------------------------


async def test_opening_an_unmigrated_schema_names_the_command_to_run(postgres_server):
    settings = await new_postgres_schema(postgres_server, migrate=False)
    with pytest.raises(ConfigError, match=r"has no kds schema: run `kds-cp migrate up`"):
        await PostgresStore(settings).open()
    assert await schema_version(settings) == 0


async def test_opening_a_newer_schema_says_to_upgrade_kds(postgres_server):
    settings = await new_postgres_schema(postgres_server)
    connection = await asyncpg.connect(**settings._connect_kwargs())
    try:
        await connection.execute(
            f'INSERT INTO "{settings.schema}".kds_schema_migrations (version, description) '  # noqa: S608
            "VALUES ($1, 'from the future')",
            SCHEMA_VERSION + 1,
        )
    finally:
        await connection.close()
    with pytest.raises(ConfigError, match=r"understands only up to \d+: upgrade kds"):
        await PostgresStore(settings).open()
    with pytest.raises(ConfigError, match="upgrade kds"):
        await migrate_up(settings)


async def test_opening_an_older_schema_names_the_command_and_migrating_keeps_data(
    postgres_server,
):
    settings = await new_postgres_schema(postgres_server, migrate=False)
    await migrate_up(settings, to=1)
    with pytest.raises(ConfigError, match=r"schema version 1, this kds needs \d+: run `kds-cp"):
        await PostgresStore(settings).open()
    # Version 1 data, written as version 1 code would (the store needs 2 to open).
    connection = await asyncpg.connect(**settings._connect_kwargs())
    try:
        epoch = await connection.fetchval(f'SELECT epoch FROM "{settings.schema}".kds_meta')  # noqa: S608
    finally:
        await connection.close()
    applied = await migrate_up(settings)
    assert [m.version for m in applied] == list(range(2, SCHEMA_VERSION + 1))
    async with PostgresStore(settings) as store:
        assert store.epoch == epoch
        await store.commit([_mesh("after-upgrade")])
        assert await store.head() == 1


async def test_migrate_up_is_idempotent_and_keeps_data(postgres_server):
    settings = await new_postgres_schema(postgres_server, migrate=False)
    applied = await migrate_up(settings)
    assert [m.version for m in applied] == list(range(1, SCHEMA_VERSION + 1))
    async with PostgresStore(settings) as store:
        head = await store.commit([_mesh("kept")])
        epoch = store.epoch
    assert await migrate_up(settings) == []
    async with PostgresStore(settings) as store:
        assert store.epoch == epoch
        assert await store.head() == head
        assert (await store.get(ResourceKey("Mesh", None, "kept"))).version == 1


def _cli_env(settings: PostgresSettings) -> dict[str, str]:
    return {
        **os.environ,
        "KUMA_STORE_POSTGRES_HOST": settings.host,
        "KUMA_STORE_POSTGRES_PORT": str(settings.port),
        "KUMA_STORE_POSTGRES_USER": settings.user,
        "KUMA_STORE_POSTGRES_DB_NAME": settings.db_name,
        "KDS_STORE_POSTGRES_SCHEMA": settings.schema,
        "KUMA_STORE_POSTGRES_PASSWORD": settings.password,
    }


async def test_concurrent_migrate_up_from_several_processes_applies_each_migration_once(
    postgres_server,
):
    settings = await new_postgres_schema(postgres_server, migrate=False)
    command = [sys.executable, "-m", "kds", "migrate", "up"]
    env = _cli_env(settings)
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def run() -> None:
        results.append(await anyio.run_process(command, env=env, check=False))

    # Started together, so that they contend for the schema.
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(run)
    outputs = [(r.stdout.decode(), r.stderr.decode()) for r in results]
    assert [r.returncode for r in results] == [0] * 4, outputs
    applied = [out for out, _ in outputs if "applied" in out]
    assert len(applied) == 1, outputs  # exactly one process did the work
    assert sum("up to date" in out for out, _ in outputs) == 3, outputs
    assert await schema_version(settings) == SCHEMA_VERSION
    connection = await asyncpg.connect(**settings._connect_kwargs())
    try:
        versions = await connection.fetch(
            f'SELECT version FROM "{settings.schema}".kds_schema_migrations ORDER BY version'  # noqa: S608
        )
    finally:
        await connection.close()
    assert [row["version"] for row in versions] == list(range(1, SCHEMA_VERSION + 1))
    async with PostgresStore(settings) as store:
        assert await store.head() == 0


def test_migrate_command_reports_an_unreachable_server_and_fails():
    from kds.testing.postgres import free_port

    env = _cli_env(PostgresSettings(port=free_port(), user="postgres", password="pw-9f1c"))  # noqa: S106
    result = subprocess.run(
        [sys.executable, "-m", "kds", "migrate", "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 1
    assert "unreachable while migrating" in result.stderr
    assert "pw-9f1c" not in result.stderr + result.stdout


# -- ordering ------------------------------------------------------------------------

WRITER_STORES = 8
TASKS_PER_STORE = 2
COMMITS = 10_000


async def test_followers_see_every_commit_once_in_revision_order_with_held_transactions(
    postgres_server,
):
    """The Postgres trap: a slow transaction must never get a revision a reader passed.

    16 writers (two tasks on each of eight store instances, i.e. eight separate
    connections and writer loops) commit 10,000 changes in all; one commit in 30
    holds its transaction open for a while before COMMIT. A follower on another
    instance reads concurrently and must see revisions 1..10,000 exactly once, in
    order, and each writer's changes in the order it made them.
    """
    settings = await new_postgres_schema(postgres_server)
    rng = random.Random(7)

    async def hold() -> None:
        if rng.random() < 1 / 30:
            await anyio.sleep(rng.uniform(0.002, 0.02))  # a slow transaction, held open

    seen: list[Upserted] = []
    writers = WRITER_STORES * TASKS_PER_STORE
    per_writer = COMMITS // writers
    total = per_writer * writers
    async with contextlib.AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(PostgresStore(settings, listen=False))
            for _ in range(WRITER_STORES)
        ]
        for store in stores:
            store._before_commit = hold
        follower = await stack.enter_async_context(PostgresStore(settings, poll_interval=0.05))

        async def write(store: PostgresStore, writer: int) -> None:
            for number in range(per_writer):
                await store.commit([_mesh(f"writer-{writer}", n=number)])

        async def follow() -> None:
            async with contextlib.aclosing(follower.follow(0)) as events:
                async for event in events:
                    assert isinstance(event, Upserted)
                    seen.append(event)
                    if len(seen) == total:
                        return

        with anyio.fail_after(600):
            async with anyio.create_task_group() as group:
                group.start_soon(follow)
                for writer in range(writers):
                    group.start_soon(write, stores[writer % WRITER_STORES], writer)

    assert [event.revision for event in seen] == list(range(1, total + 1))
    for writer in range(writers):
        mine = [e.resource for e in seen if e.resource.key.name == f"writer-{writer}"]
        assert [r.spec["n"] for r in mine] == list(range(per_writer))
        assert [r.version for r in mine] == list(range(1, per_writer + 1))


async def test_compare_and_set_across_instances_loses_no_update(postgres_server):
    """Writers on separate instances increment one counter with expected versions.

    Commits planned on rows read without the lock must be refused (and replanned
    under the lock) whenever another instance wrote in between: if one slipped
    through on a stale read, two increments would share a version and one would be
    lost. Every successful increment must show up as its own version, in order.
    """
    settings = await new_postgres_schema(postgres_server)
    key = ResourceKey("Mesh", None, "counter")
    increments_each = 40
    async with contextlib.AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(PostgresStore(settings, listen=False)) for _ in range(4)
        ]
        await stores[0].commit([Upsert(key=key, spec={"n": 0})])
        conflicts = 0

        async def increment(store: PostgresStore) -> None:
            nonlocal conflicts
            done = 0
            while done < increments_each:
                current = await store.get(key)
                try:
                    await store.commit(
                        [
                            Upsert(
                                key=key,
                                spec={"n": current.spec["n"] + 1},
                                expected_version=current.version,
                            )
                        ]
                    )
                except ConflictError:
                    conflicts += 1
                    continue
                done += 1

        with anyio.fail_after(300):
            async with anyio.create_task_group() as group:
                for store in stores:
                    group.start_soon(increment, store)
        final = await stores[0].get(key)
        events = [e for e in await stores[0].read(0, limit=10_000) if isinstance(e, Upserted)]
    total = increments_each * len(stores)
    assert final.spec["n"] == total
    assert final.version == total + 1
    assert [e.resource.spec["n"] for e in events] == list(range(total + 1))
    assert conflicts > 0  # the writers really raced


# -- wake-ups ------------------------------------------------------------------------


async def _next_event(store: PostgresStore, after: int) -> Upserted:
    async with contextlib.aclosing(store.follow(after)) as events:
        async for event in events:
            assert isinstance(event, Upserted)
            return event
    raise AssertionError("follow() ended")


async def test_a_notification_wakes_a_follower_long_before_its_poll_interval(postgres_server):
    settings = await new_postgres_schema(postgres_server)
    async with (
        PostgresStore(settings, poll_interval=3600) as follower,
        PostgresStore(settings, listen=False) as writer,
    ):
        await _wait_until(lambda: follower.listening, "the follower listens")
        head = await follower.head()
        async with anyio.create_task_group() as group:
            received: list[Upserted] = []

            async def receive() -> None:
                received.append(await _next_event(follower, head))

            group.start_soon(receive)
            await writer.commit([_mesh("notified")])
            # Only a notification can deliver it: polling would take an hour.
            with anyio.fail_after(DEADLINE):
                await _wait_until(lambda: bool(received), "the follower got the event")
        assert received[0].resource.key.name == "notified"


async def test_polling_alone_delivers_commits_when_listening_is_off(postgres_server):
    settings = await new_postgres_schema(postgres_server)
    async with (
        PostgresStore(settings, poll_interval=0.05, listen=False) as follower,
        PostgresStore(settings, listen=False) as writer,
    ):
        assert not follower.listening
        revision = await writer.commit([_mesh("polled")])
        with anyio.fail_after(DEADLINE):
            event = await _next_event(follower, revision - 1)
        assert event.revision == revision


async def _terminate_listeners(settings: PostgresSettings) -> int:
    connection = await asyncpg.connect(**settings._connect_kwargs("kds-test-admin"))
    try:
        terminated: int = await connection.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            LISTENER_APPLICATION_NAME,
        )
    finally:
        await connection.close()
    return terminated


async def test_a_dropped_listen_connection_falls_back_to_polling_and_comes_back(
    postgres_server,
):
    settings = await new_postgres_schema(postgres_server)
    async with (
        PostgresStore(settings, poll_interval=0.2) as follower,
        PostgresStore(settings, listen=False) as writer,
    ):
        await _wait_until(lambda: follower.listening, "the follower listens")
        assert await _terminate_listeners(settings) >= 1
        # Whatever is committed now may find nobody listening: its notification is
        # lost, and the follower must still get it, by polling or after reconnecting.
        revision = await writer.commit([_mesh("after-the-drop")])
        with anyio.fail_after(DEADLINE):
            event = await _next_event(follower, revision - 1)
        assert event.resource.key.name == "after-the-drop"
        await _wait_until(lambda: follower.listening, "the follower listens again")
        # And notifications work again: a follower polling hourly is woken.
        slow = PostgresStore(settings, poll_interval=3600)
        async with slow:
            await _wait_until(lambda: slow.listening, "the slow follower listens")
            await _terminate_listeners(settings)
            await _wait_until(lambda: slow.listening, "the slow follower listens again")
            later = await writer.commit([_mesh("after-the-reconnect")])
            with anyio.fail_after(DEADLINE):
                event = await _next_event(slow, later - 1)
            assert event.revision == later


# -- failures ------------------------------------------------------------------------

RESTART_COMMITS = 300


async def test_server_restarts_during_commits_and_follow_lose_and_repeat_nothing(tmp_path):
    """Stop/start and kill -9 of the server mid-stream: callers see StoreUnavailableError.

    The writer retries each commit (its tracking cursor makes a retry of a commit
    that did land a ConflictError, so nothing applies twice); the follower
    resumes after the last revision it got. Afterwards the log holds each change
    exactly once and the follower saw exactly the log.
    """
    with PostgresServer(tmp_path) as server:
        settings = PostgresSettings(
            host=server.host,
            port=server.port,
            user=server.user,
            db_name="postgres",
            connect_timeout=2.0,
        )
        await migrate_up(settings)
        unavailable = {"writer": 0, "follower": 0}
        written: list[int] = []
        seen: list[Upserted] = []
        async with (
            PostgresStore(settings, poll_interval=0.05) as writer,
            PostgresStore(settings, poll_interval=0.05) as follower,
        ):

            async def write() -> None:
                for number in range(1, RESTART_COMMITS + 1):
                    while True:
                        try:
                            await writer.commit(
                                [_mesh(f"r{number}")],
                                tracking=Tracking("test", Cursor("source", number)),
                            )
                        except StoreUnavailableError:
                            unavailable["writer"] += 1
                            await anyio.sleep(0.05)  # back off while the server is away
                            continue
                        except ConflictError:
                            # An earlier attempt committed after all.
                            assert await writer.tracking("test") == Cursor("source", number)
                        break
                    written.append(number)

            async def follow() -> None:
                position = 0
                while len(seen) < RESTART_COMMITS:
                    try:
                        async with contextlib.aclosing(follower.follow(position)) as events:
                            async for event in events:
                                assert isinstance(event, Upserted)
                                seen.append(event)
                                position = event.revision
                                if len(seen) == RESTART_COMMITS:
                                    return
                    except StoreUnavailableError:
                        unavailable["follower"] += 1
                        await anyio.sleep(0.05)  # back off while the server is away

            with anyio.fail_after(300):
                async with anyio.create_task_group() as group:
                    group.start_soon(write)
                    group.start_soon(follow)
                    await _wait_until(lambda: len(written) >= 50, "50 commits")
                    await anyio.to_thread.run_sync(server.restart)
                    await _wait_until(lambda: len(written) >= 150, "150 commits")
                    await anyio.to_thread.run_sync(server.kill)
                    await anyio.to_thread.run_sync(server.start)

            assert unavailable["writer"] >= 1  # the restarts really hit the writer
            assert [event.revision for event in seen] == list(range(1, RESTART_COMMITS + 1))
            assert [e.resource.key.name for e in seen] == [
                f"r{n}" for n in range(1, RESTART_COMMITS + 1)
            ]
            assert await writer.head() == RESTART_COMMITS
            assert await writer.tracking("test") == Cursor("source", RESTART_COMMITS)


async def test_a_store_opened_while_the_server_is_down_fails_as_unavailable(tmp_path):
    with PostgresServer(tmp_path) as server:
        settings = PostgresSettings(
            host=server.host, port=server.port, user=server.user, db_name="postgres"
        )
        await migrate_up(settings)
        server.stop()
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            await PostgresStore(attrs.evolve(settings, connect_timeout=2.0)).open()
        server.start()
        async with PostgresStore(settings) as store:
            assert await store.head() == 0
