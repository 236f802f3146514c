"""SQLiteStore behaviour beyond the generic Store contract (covered by tests/property)."""

from __future__ import annotations

import contextlib
import gc
import sqlite3
from datetime import UTC, datetime

import anyio
import attrs
import msgpack
import pytest

from kds import (
    MUST_NOT_EXIST,
    Change,
    ConfigError,
    ConflictError,
    Cursor,
    Delete,
    Deleted,
    Event,
    NotFoundError,
    Resource,
    ResourceKey,
    StoreClosedError,
    StoreError,
    StoreUnavailableError,
    Tracking,
    Upsert,
    Upserted,
)
from kds_stores import _log as log_module
from kds_stores import sqlite as sqlite_module
from kds_stores.sqlite import SCHEMA_VERSION, SQLiteStore

pytestmark = pytest.mark.anyio

DEADLINE = 10  # seconds; generous, only to turn a hang into a failure


def dataplane(name: str, mesh: str = "default") -> ResourceKey:
    return ResourceKey("Dataplane", mesh, name)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "store.db"


@pytest.fixture
def batch_sizes(monkeypatch):
    """The number of commit() calls in each transaction the writer applies."""
    sizes: list[int] = []
    apply_batch = SQLiteStore._apply_batch

    async def recording(self, batch):
        sizes.append(len(batch))
        await apply_batch(self, batch)

    monkeypatch.setattr(SQLiteStore, "_apply_batch", recording)
    return sizes


async def test_data_survives_close_and_reopen(path):
    mesh = ResourceKey("Mesh", None, "default")
    async with SQLiteStore(path) as store:
        epoch = store.epoch
        await store.commit(
            [
                Upsert(key=mesh, labels={"kuma.io/origin": "global"}, spec={"mtls": {}}),
                Upsert(key=dataplane("a"), spec={"networking": {"address": "10.0.0.1"}}),
                Upsert(key=dataplane("b")),
            ],
            tracking=Tracking("zone-1", Cursor("their-epoch", 7)),
        )
        await store.commit([Delete(key=dataplane("b")), Upsert(key=mesh, labels={"x": "y"})])
        await store.compact(1)
        view = await store.snapshot()
        log = await store.read(1)

    async with SQLiteStore(path) as store:
        assert store.epoch == epoch
        assert await store.snapshot() == view
        assert await store.read(1) == log
        assert await store.head() == 5
        assert await store.horizon() == 1
        assert await store.tracking("zone-1") == Cursor("their-epoch", 7)
        # Timestamps come back exactly, as aware UTC datetimes.
        resource = await store.get(mesh)
        assert resource.created_at.tzinfo is UTC
        assert resource.modified_at >= resource.created_at
        # And the log continues where it stopped.
        assert await store.commit([Upsert(key=dataplane("c"))]) == 6


async def test_global_keys_are_one_row_each(path):
    # Global-scoped keys have no mesh. SQLite treats NULLs in a primary key as
    # distinct, so a naive layout would store the second upsert as a new row.
    key = ResourceKey("Mesh", None, "default")
    async with SQLiteStore(path) as store:
        await store.commit([Upsert(key=key)])
        await store.commit([Upsert(key=key, labels={"a": "b"})])
        assert [r.key for r in await store.list_resources()] == [key]
        assert (await store.get(key)).version == 2
        # '' stands for "no mesh" inside the database; it is not a mesh name.
        with pytest.raises(NotFoundError):
            await store.get(ResourceKey("Mesh", "", "default"))
        assert await store.list_resources(mesh="") == []


async def test_tracking_cursors_store_any_string_and_revision(path):
    tracking = Tracking("zone\udc80\x00", Cursor("epoch\ud800", 3**50))
    async with SQLiteStore(path) as store:
        await store.commit([], tracking=tracking)
    async with SQLiteStore(path) as store:
        assert await store.tracking(tracking.origin) == tracking.cursor


async def test_concurrent_opens_of_a_new_file_agree_on_one_schema_and_epoch(path):
    stores = [SQLiteStore(path) for _ in range(4)]
    async with contextlib.AsyncExitStack() as stack:
        async with anyio.create_task_group() as group:
            for store in stores:
                group.start_soon(stack.enter_async_context, store)
        assert len({store.epoch for store in stores}) == 1
        await stores[0].commit([Upsert(key=dataplane("a"))])
        assert await stores[3].head() == 1


async def test_a_newer_schema_version_is_refused(path):
    async with SQLiteStore(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.commit()
    store = SQLiteStore(path)
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade kds"):
        await store.open()
    with pytest.raises(StoreClosedError):
        await store.head()


async def test_a_database_that_is_not_a_kds_store_is_refused(path):
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE other (x)")
        db.commit()
    with pytest.raises(ConfigError, match="not a kds store"):
        await SQLiteStore(path).open()


async def test_a_file_that_is_not_a_database_is_refused(path):
    path.write_bytes(b"definitely not SQLite" * 100)
    with pytest.raises(ConfigError, match="cannot open"):
        await SQLiteStore(path).open()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"path": ":memory:"},
        {"path": ""},
        {"path": "x.db", "poll_interval": 0},
        {"path": "x.db", "busy_timeout": -1},
        {"path": "x.db", "synchronous": "off"},
    ],
)
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SQLiteStore(**kwargs)


async def test_concurrent_commits_each_get_their_own_outcome(path, batch_sizes):
    # Every commit below is queued in the same moment, so they share transactions.
    async with SQLiteStore(path) as store:
        await store.commit(
            [Upsert(key=dataplane("taken"))], tracking=Tracking("zone-1", Cursor("e", 5))
        )
        outcomes: dict[int, int | Exception] = {}

        async def commit(index: int) -> None:
            tracking = None
            changes: list[Change]
            if index % 4 == 1:  # conflict: must not exist, but does
                changes = [
                    Upsert(key=dataplane(f"n{index}")),
                    Upsert(key=dataplane("taken"), expected_version=MUST_NOT_EXIST),
                ]
            elif index % 4 == 2:  # not found
                changes = [Upsert(key=dataplane(f"n{index}")), Delete(key=dataplane("nope"))]
            elif index % 4 == 3:  # tracking conflict: not past the stored cursor
                changes = [Upsert(key=dataplane(f"n{index}"))]
                tracking = Tracking("zone-1", Cursor("e", 5))
            else:
                changes = [
                    Upsert(key=dataplane(f"n{index}")),
                    Upsert(key=dataplane(f"n{index}"), labels={"second": "write"}),
                ]
            try:
                outcomes[index] = await store.commit(changes, tracking=tracking)
            except (ConflictError, NotFoundError) as exc:
                outcomes[index] = exc

        async with anyio.create_task_group() as group:
            for index in range(40):
                group.start_soon(commit, index)
        assert max(batch_sizes) > 1  # they really were group-committed

        for index, outcome in outcomes.items():
            expected = {0: int, 1: ConflictError, 2: NotFoundError, 3: ConflictError}
            assert isinstance(outcome, expected[index % 4]), (index, outcome)
        # The successful commits wrote two events each, densely numbered after the
        # first commit's, and each caller got the revision of its own last event.
        events = await store.read(1)
        assert [event.revision for event in events] == list(range(2, 2 + 2 * 10))
        for index, outcome in outcomes.items():
            if isinstance(outcome, int):
                first, last = events[outcome - 3], events[outcome - 2]
                assert isinstance(first, Upserted)
                assert isinstance(last, Upserted)
                assert first.key == last.key == dataplane(f"n{index}")
                assert last.resource.version == 2
        names = sorted(r.key.name for r in await store.list_resources())
        assert names == sorted(["taken", *(f"n{i}" for i in range(0, 40, 4))])
        assert await store.head() == 21


async def test_a_request_that_fails_inside_sqlite_is_rolled_back_alone(path, batch_sizes):
    # A trigger refuses one particular view row, so the failure happens while
    # writing, after the request was planned and part of it was written: its
    # savepoint must undo it, and only it.
    async with SQLiteStore(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON resources WHEN NEW.name = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
        )
        db.commit()
    async with SQLiteStore(path) as store:
        results: dict[str, int | Exception] = {}

        async def commit(name: str, changes: list[Upsert]) -> None:
            try:
                results[name] = await store.commit(changes)
            except StoreError as exc:
                results[name] = exc

        async with anyio.create_task_group() as group:
            group.start_soon(commit, "before", [Upsert(key=dataplane("a"))])
            group.start_soon(
                commit, "poisoned", [Upsert(key=dataplane("b")), Upsert(key=dataplane("poison"))]
            )
            group.start_soon(commit, "after", [Upsert(key=dataplane("c"))])
        assert batch_sizes == [3]  # one transaction, three savepoints

        assert isinstance(results["poisoned"], StoreError)
        assert "poisoned row" in str(results["poisoned"])
        assert (results["before"], results["after"]) == (1, 2)
        assert [r.key.name for r in await store.list_resources()] == ["a", "c"]
        assert [e.revision for e in await store.read(0)] == [1, 2]

        # Alone, the same request fails as a whole and leaves nothing behind.
        with pytest.raises(StoreError, match="poisoned row"):
            await store.commit([Upsert(key=dataplane("d")), Upsert(key=dataplane("poison"))])
        assert await store.head() == 2
        assert await store.find(dataplane("d")) is None
        assert await store.commit([Upsert(key=dataplane("d"))]) == 3


async def test_a_second_instance_sees_commits_by_polling(path):
    async with (
        SQLiteStore(path, poll_interval=0.02) as follower,
        SQLiteStore(path, poll_interval=3600) as writer,
    ):
        seen: list[int] = []

        async def follow() -> None:
            async with contextlib.aclosing(follower.follow(0)) as events:
                async for event in events:
                    seen.append(event.revision)
                    if event.revision == 3:
                        return

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                group.start_soon(follow)
                await anyio.wait_all_tasks_blocked()
                for name in ("a", "b", "c"):
                    await writer.commit([Upsert(key=dataplane(name))])
        assert seen == [1, 2, 3]


async def test_commits_through_the_same_instance_wake_waiters_without_polling(path):
    # Polling once an hour: only the in-process wake-up can end the wait in time.
    async with SQLiteStore(path, poll_interval=3600) as store:
        woken = anyio.Event()

        async def wait() -> None:
            await store.wait_for_commit(0)
            woken.set()

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                assert not woken.is_set()
                await store.commit([Upsert(key=dataplane("a"))])
                await woken.wait()


async def test_followers_woken_by_a_commit_share_one_read_of_it(path, monkeypatch):
    # A global follows its log with one session per zone: a commit wakes them all at
    # once, and one query serves them all.
    fetches: list[int] = []
    fetch_events = SQLiteStore._fetch_events

    async def counting(self, after, limit):
        fetches.append(after)
        return await fetch_events(self, after, limit)

    monkeypatch.setattr(SQLiteStore, "_fetch_events", counting)
    async with SQLiteStore(path, poll_interval=3600) as store:
        head = await store.commit([Upsert(key=dataplane("a"))])
        pages: list[list[Event]] = []

        async def follower() -> None:
            await store.wait_for_commit(head)
            pages.append(await store.read(head))

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                for _ in range(50):
                    group.start_soon(follower)
                await anyio.wait_all_tasks_blocked()
                fetches.clear()
                await store.commit([Upsert(key=dataplane("b"))])
    assert len(pages) == 50
    assert all(page == pages[0] for page in pages)
    assert [event.key for event in pages[0]] == [dataplane("b")]
    assert fetches == [head]


async def test_waiters_share_one_poll_of_the_head(path, monkeypatch):
    # Commits by another instance are found by polling the head: once per interval
    # for all waiters, not once per waiter.
    polls: list[float] = []
    head_of = SQLiteStore.head

    async def counting(self):
        polls.append(anyio.current_time())
        return await head_of(self)

    interval = 0.05
    async with (
        SQLiteStore(path, poll_interval=interval) as follower,
        SQLiteStore(path, poll_interval=3600) as writer,
    ):
        head = await follower.head()
        monkeypatch.setattr(SQLiteStore, "head", counting)
        woken: list[int] = []

        async def waiter() -> None:
            await follower.wait_for_commit(head)
            woken.append(await follower.head())

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                started = anyio.current_time()
                for _ in range(50):
                    group.start_soon(waiter)
                # Not synchronisation: the waiters wait this long, and are counted.
                await anyio.sleep(10 * interval)
                waited = anyio.current_time() - started
                idle_polls = len(polls)
                revision = await writer.commit([Upsert(key=dataplane("a"))])
    assert woken == [revision] * 50
    assert 1 <= idle_polls <= 2 + waited / interval


async def test_closing_ends_waiters_with_store_closed(path):
    async with SQLiteStore(path, poll_interval=3600) as store:
        errors: list[Exception] = []

        async def wait() -> None:
            try:
                await store.wait_for_commit(0)
            except StoreClosedError as exc:
                errors.append(exc)

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                await store.aclose()
        assert len(errors) == 1


async def test_using_a_store_that_is_not_open_raises_store_closed(path):
    store = SQLiteStore(path)
    await store.aclose()  # closing a store that was never opened is fine

    async def every_operation() -> None:
        for operation in (
            lambda: store.commit([Upsert(key=dataplane("a"))]),
            lambda: store.compact(0),
            store.head,
            store.horizon,
            store.cursor,
            lambda: store.get(dataplane("a")),
            store.list_resources,
            store.snapshot,
            lambda: store.read(0),
            lambda: store.tracking("zone-1"),
            lambda: store.wait_for_commit(0),
        ):
            with pytest.raises(StoreClosedError):
                await operation()
        with pytest.raises(StoreClosedError):
            _ = store.epoch

    await every_operation()
    async with store:
        await store.commit([Upsert(key=dataplane("a"))])
    await every_operation()
    await store.aclose()  # idempotent
    async with store:  # and it can be opened again
        assert await store.head() == 1


async def test_a_locked_database_is_unavailable_then_recovers(path):
    async with SQLiteStore(path, busy_timeout=0.05) as store:
        await store.commit([Upsert(key=dataplane("a"))])
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreUnavailableError, match="locked"):
                await store.commit([Upsert(key=dataplane("b"))])
            with pytest.raises(StoreUnavailableError, match="locked"):
                await store.compact(1)
            # WAL: readers are not blocked by the writer's lock.
            assert [r.key.name for r in await store.list_resources()] == ["a"]
        finally:
            other.execute("ROLLBACK")
            other.close()
        # Nothing of the failed commit happened, and retrying works.
        assert await store.head() == 1
        assert await store.commit([Upsert(key=dataplane("b"))]) == 2


def test_fast_builders_make_the_same_objects_as_the_constructors():
    now = datetime.now(UTC)
    key = log_module.new_key("Dataplane", "default", "a")
    assert type(key) is ResourceKey
    assert key == ResourceKey("Dataplane", "default", "a")
    assert hash(key) == hash(ResourceKey("Dataplane", "default", "a"))
    resource = log_module.new_resource(key, {"a": "b"}, {"c": [1]}, 3, now, now)
    assert type(resource) is Resource
    assert resource == Resource(
        key=key, labels={"a": "b"}, spec={"c": [1]}, version=3, created_at=now, modified_at=now
    )
    assert log_module.new_upserted(4, resource) == Upserted(revision=4, resource=resource)
    assert log_module.new_deleted(5, key, 3, {"a": "b"}) == Deleted(
        revision=5, key=key, version=3, labels={"a": "b"}
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        key.name = "b"  # type: ignore[misc]  # frozen, as ever


def test_fast_builders_are_only_used_for_plain_attrs_classes():
    @attrs.frozen
    class Plain:
        a: int

    @attrs.frozen
    class Checked:
        a: int = attrs.field(validator=attrs.validators.instance_of(int))

    @attrs.frozen
    class Hooked:
        a: int

        def __attrs_post_init__(self) -> None:
            pass

    assert log_module.slot_setters(Plain, ("a",)) is not None
    assert log_module.slot_setters(Plain, ("b",)) is None
    assert log_module.slot_setters(Checked, ("a",)) is None
    assert log_module.slot_setters(Hooked, ("a",)) is None
    assert log_module.slot_setters(int, ("a",)) is None


async def test_listed_labels_are_not_shared_between_resources(path):
    # Reads decode each distinct labels blob once per page; the copies they hand
    # out must still be independent.
    async with SQLiteStore(path) as store:
        await store.commit([Upsert(key=dataplane(n), labels={"team": "x"}) for n in "abc"])
        first, second, _ = await store.list_resources()
        first.labels["team"] = "changed"  # type: ignore[index]  # it is a plain dict
        assert second.labels == {"team": "x"}
        assert (await store.get(dataplane("a"))).labels == {"team": "x"}


async def test_each_event_is_one_plain_msgpack_array(path):
    # The writer splices the encoded labels and spec after the packed scalars and
    # rewrites the array header: any msgpack reader must see one eight-element array.
    mesh = ResourceKey("Mesh", None, "default")
    origin, spec = {"kuma.io/origin": "global"}, {"networking": {"ports": [1, 2]}}
    async with SQLiteStore(path) as store:
        await store.commit(
            [
                Upsert(key=mesh, labels=origin, spec={"mtls": {}}),
                Upsert(key=dataplane("a"), spec=spec),
            ]
        )
        await store.commit([Upsert(key=dataplane("a"), labels={"v": "2"}), Delete(key=mesh)])
        events = await store.read(0)
    with contextlib.closing(sqlite3.connect(path)) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(events)")]
        rows = db.execute("SELECT revision, data FROM events ORDER BY revision").fetchall()
    assert columns == ["revision", "data"]

    def micros(moment: datetime) -> int:
        return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // log_module.MICROSECOND

    first, third = events[0], events[2]
    assert isinstance(first, Upserted)
    assert isinstance(third, Upserted)
    t1, t2 = micros(first.resource.created_at), micros(third.resource.modified_at)
    assert [(revision, msgpack.unpackb(data)) for revision, data in rows] == [
        (1, ["Mesh", None, "default", 1, t1, t1, origin, {"mtls": {}}]),
        (2, ["Dataplane", "default", "a", 1, t1, t1, {}, spec]),
        (3, ["Dataplane", "default", "a", 2, t1, t2, {"v": "2"}, {}]),
        (4, ["Mesh", None, "default", 1, None, None, origin, None]),
    ]


async def test_a_request_that_changes_a_key_several_times_leaves_its_final_state(path):
    # Every change is an event, applied to the view in order: the view ends at
    # each key's final state.
    async with SQLiteStore(path) as store:
        await store.commit([Upsert(key=dataplane("kept")), Upsert(key=dataplane("gone"))])
        revision = await store.commit(
            [
                Upsert(key=dataplane("kept"), labels={"v": "2"}),
                Delete(key=dataplane("kept")),
                Upsert(key=dataplane("kept"), labels={"v": "3"}),
                Delete(key=dataplane("gone")),
                Upsert(key=dataplane("gone"), labels={"v": "2"}),
                Delete(key=dataplane("gone")),
                Upsert(key=dataplane("new"), labels={"v": "1"}),
                Upsert(key=dataplane("new"), labels={"v": "2"}),
                Upsert(key=dataplane("brief")),
                Delete(key=dataplane("brief")),
            ]
        )
        assert revision == 12
        view = {r.key.name: (r.version, r.labels) for r in await store.list_resources()}
        assert view == {"kept": (1, {"v": "3"}), "new": (2, {"v": "2"})}
        events = await store.read(2)
        assert [(type(e).__name__, e.key.name) for e in events] == [
            ("Upserted", "kept"),
            ("Deleted", "kept"),
            ("Upserted", "kept"),
            ("Deleted", "gone"),
            ("Upserted", "gone"),
            ("Deleted", "gone"),
            ("Upserted", "new"),
            ("Upserted", "new"),
            ("Upserted", "brief"),
            ("Deleted", "brief"),
        ]
        # Recreating a key starts it afresh, as in every store.
        recreated = await store.get(dataplane("kept"))
        assert recreated.created_at == recreated.modified_at
        # And the next request builds on that state.
        await store.commit([Upsert(key=dataplane("new"), labels={"v": "3"})])
        assert (await store.get(dataplane("new"))).version == 3


async def test_read_labels_are_not_shared_between_events(path):
    async with SQLiteStore(path) as store:
        await store.commit([Upsert(key=dataplane(n), labels={"team": "x"}) for n in "ab"])
        await store.commit([Delete(key=dataplane("a")), Delete(key=dataplane("b"))])
        events = await store.read(0)
    labels = [e.resource.labels if isinstance(e, Upserted) else e.labels for e in events]
    assert labels == [{"team": "x"}] * 4
    assert len({id(mapping) for mapping in labels}) == 4


async def test_the_event_decoder_without_fast_builders_makes_the_same_events(path, monkeypatch):
    async with SQLiteStore(path) as store:
        await store.commit([Upsert(key=dataplane(n), labels={"n": n}) for n in "abc"])
        await store.commit([Delete(key=dataplane("b")), Upsert(key=dataplane("c"))])
        await store.commit([Upsert(key=ResourceKey("Mesh", None, "m"), spec={"x": [1]})])
        events = await store.read(0)
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT revision, data FROM events ORDER BY revision").fetchall()
    monkeypatch.setattr(log_module, "slot_setters", lambda cls, names: None)
    slow = log_module.events_decoder()
    assert slow is not log_module.decode_events
    assert slow(rows) == events == log_module.decode_events(rows)
    assert [type(e) for e in slow(rows)] == [type(e) for e in events]


async def test_statements_stay_under_sqlites_variable_limit(path, monkeypatch):
    # Pretend SQLite allows 7 parameters per statement: keys (3 each) are looked
    # up 2 per query, origins and types 7 per query, and nothing changes otherwise.
    monkeypatch.setattr(sqlite_module, "_variable_limit", lambda: 7)
    types = ["Dataplane", "Mesh", "MeshTimeout", "Zone"]
    async with SQLiteStore(path) as store:
        changes = [Upsert(key=dataplane(f"d{i}")) for i in range(9)]
        changes += [Upsert(key=ResourceKey("Mesh", None, f"m{i}")) for i in range(3)]
        await store.commit(changes, tracking=Tracking("zone-1", Cursor("e", 1)))
        changes = [Upsert(key=dataplane(f"d{i}"), labels={"v": "2"}) for i in range(12)]
        assert await store.commit(changes, tracking=Tracking("zone-1", Cursor("e", 2))) == 24
        assert (await store.get(dataplane("d8"))).version == 2
        assert (await store.get(dataplane("d11"))).version == 1
        snapshot = await store.snapshot([*types, *(f"T{i}" for i in range(10))])
        assert [r.key for r in snapshot.resources] == [
            r.key for r in (await store.snapshot()).resources
        ]
        assert len(snapshot.resources) == 15


async def test_a_cancelled_read_leaves_the_store_usable(path):
    async with SQLiteStore(path) as store:
        await store.commit([Upsert(key=dataplane(f"d{i}")) for i in range(100)])
        with anyio.fail_after(DEADLINE):
            for _ in range(5):
                async with anyio.create_task_group() as group:
                    group.start_soon(store.snapshot)
                    group.start_soon(store.read, 0)
                    await anyio.wait_all_tasks_blocked()
                    group.cancel_scope.cancel()
            # Had a read transaction been left open, these would see an old snapshot.
            revision = await store.commit([Upsert(key=dataplane("new"))])
            assert await store.head() == revision
            assert (await store.snapshot()).cursor.revision == revision
            assert (await store.read(revision - 1))[0].revision == revision


async def test_a_cancelled_commit_happened_completely_or_not_at_all(path):
    async with SQLiteStore(path) as store:
        with anyio.fail_after(DEADLINE):
            for round_ in range(5):
                changes = [Upsert(key=dataplane(f"r{round_}-{i}")) for i in range(50)]
                async with anyio.create_task_group() as group:
                    group.start_soon(store.commit, [Upsert(key=dataplane(f"other{round_}"))])
                    group.start_soon(store.commit, changes)
                    await anyio.wait_all_tasks_blocked()
                    group.cancel_scope.cancel()
                written = await store.list_resources()
                count = sum(r.key.name.startswith(f"r{round_}-") for r in written)
                assert count in (0, 50)
            # And the writer still works.
            head = await store.head()
            assert await store.commit([Upsert(key=dataplane("last"))]) == head + 1


async def test_a_path_that_cannot_be_opened_is_unavailable(tmp_path):
    store = SQLiteStore(tmp_path / "missing-directory" / "store.db")
    with pytest.raises(StoreUnavailableError, match="unable to open"):
        await store.open()
    await store.aclose()


async def test_reads_leave_the_garbage_collector_as_they_found_it(path):
    async with SQLiteStore(path) as store:
        await store.commit([Upsert(key=dataplane("a"))])
        assert gc.isenabled()
        assert len(await store.read(0)) == 1
        assert gc.isenabled()
        gc.disable()
        try:
            assert len(await store.read(0)) == 1
            assert not gc.isenabled()
        finally:
            gc.enable()
