"""Pytest-free conformance checks for :class:`~kds.store.Store` backends.

Each ``check_*`` function is a coroutine that takes a
:class:`~kds.testing.factory.StoreFactory`, opens the stores it needs through it,
exercises one promise of the Store contract and raises :class:`AssertionError`
(or the unexpected exception) when the store breaks it. Checks whose name does
not say otherwise take inputs drawn from :mod:`kds.testing.strategies`, so a
backend outside this repository can bind them to Hypothesis in a few lines
(with ``pytest.mark.anyio`` on the asyncio backend)::

    async def test_lifecycle(my_factory):
        await checks.check_lifecycle(my_factory)

    @given(setup=st.lists(strategies.batches(), max_size=4), key=strategies.resource_keys())
    async def test_not_found(my_factory, setup, key):
        await checks.check_not_found_writes_nothing(my_factory, setup, [], key)

``tests/property/test_store_conformance.py`` binds every check this way; the
factory fixture must be session-scoped and each example opens its own store.
Revisions are compared as the contract promises them: strictly increasing, not
necessarily dense.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import anyio.lowlevel
import attrs

from kds.errors import (
    CompactedError,
    ConflictError,
    EpochMismatchError,
    NotFoundError,
    StoreClosedError,
    ValidationError,
)
from kds.resource import Resource, ResourceKey
from kds.store import (
    MUST_NOT_EXIST,
    Change,
    Cursor,
    Delete,
    Deleted,
    Event,
    Store,
    Tracking,
    Upsert,
    Upserted,
    matches,
)
from kds.testing.memory import MemoryStore
from kds.testing.strategies import ORIGINS

if TYPE_CHECKING:
    from collections.abc import Collection

    from kds.testing.factory import StoreFactory
    from kds.testing.strategies import InvalidChange

__all__ = [
    "TIMEOUT",
    "ExpectedError",
    "StoreState",
    "apply_events",
    "capture",
    "check_commit_basics",
    "check_compaction",
    "check_compaction_overtakes_follower",
    "check_conflict_writes_nothing",
    "check_cursors",
    "check_delete_labelled",
    "check_follow_concurrent",
    "check_invalid_tracking_writes_nothing",
    "check_invalid_writes_nothing",
    "check_lifecycle",
    "check_not_found_writes_nothing",
    "check_reads",
    "check_reopen",
    "check_snapshot_consistency",
    "check_tracking",
    "check_tracking_basics",
    "event_content",
    "raises",
    "read_all",
    "view_content",
]

TIMEOUT: Final = 20.0  # seconds: the deadline for anything a check waits for

E = TypeVar("E", bound=BaseException)

ResourceContent = tuple[ResourceKey, Mapping[str, str], Mapping[str, Any], int]


# -- helpers ------------------------------------------------------------------------


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}:\n  got:      {actual!r}\n  expected: {expected!r}")


@contextlib.asynccontextmanager
async def _closing(events: AsyncIterator[Event]) -> AsyncIterator[AsyncIterator[Event]]:
    """Close the iterator :meth:`~kds.store.Store.follow` returned, whatever happens."""
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


@attrs.define
class ExpectedError:
    """What :func:`raises` caught; ``value`` is set once the block has raised."""

    value: Any = None


@contextlib.contextmanager
def raises(error: type[E], what: str) -> Iterator[ExpectedError]:
    """Fail unless the block raises *error*; like ``pytest.raises`` without pytest.

    Args:
        error: the exception class the block must raise.
        what: describes the operation, for the failure message.

    Yields:
        An :class:`ExpectedError` whose ``value`` is the caught exception.

    Raises:
        AssertionError: the block returned normally.
    """
    caught = ExpectedError()
    try:
        yield caught
    except error as exc:
        caught.value = exc
        return
    raise AssertionError(f"{what}: expected {error.__name__}, but nothing was raised")


def event_content(event: Event, *, revision: bool = True) -> tuple[Any, ...]:
    """An event without timestamps: what two stores holding the same log agree on.

    Args:
        event: the event.
        revision: include the revision (leave it out to compare logs of stores
            whose revisions differ).
    """
    rev: tuple[int, ...] = (event.revision,) if revision else ()
    if isinstance(event, Upserted):
        return ("upserted", *rev, *event.resource.content())
    return ("deleted", *rev, event.key, event.version, dict(event.labels))


def view_content(resources: Sequence[Resource]) -> list[ResourceContent]:
    """:meth:`~kds.resource.Resource.content` of each resource, in the given order."""
    return [resource.content() for resource in resources]


async def read_all(store: Store, after: int | None = None, *, limit: int = 100) -> list[Event]:
    """Read every event after *after* (default: the horizon) up to the head.

    Raises:
        AssertionError: a page was out of order or did not advance.
    """
    position = await store.horizon() if after is None else after
    events: list[Event] = []
    while True:
        page = await store.read(position, limit=limit)
        if not page:
            return events
        _check(len(page) <= limit, f"read(limit={limit}) returned {len(page)} events")
        for event in page:
            _check(
                event.revision > position,
                f"read returned revision {event.revision} after {position}: not increasing",
            )
            position = event.revision
        events.extend(page)


def apply_events(
    view: dict[ResourceKey, ResourceContent], events: Sequence[Event]
) -> dict[ResourceKey, ResourceContent]:
    """Replay *events* onto *view* (key to resource content) in place, and return it.

    Raises:
        AssertionError: an event does not follow from the view it applies to (an
            upsert that skips a version, a delete of a missing resource or of
            another version).
    """
    for event in events:
        if isinstance(event, Upserted):
            content = event.resource.content()
            previous = view.get(event.key)
            _equal(
                content[3],
                previous[3] + 1 if previous else 1,
                f"version in event {event.revision} for {event.key}",
            )
            view[event.key] = content
        else:
            previous = view.pop(event.key, None)
            _check(
                previous is not None,
                f"event {event.revision} deletes {event.key}, which did not exist",
            )
            assert previous is not None  # noqa: S101 -- narrowing only
            _equal(event.version, previous[3], f"version in delete event {event.revision}")
            _equal(
                dict(event.labels), dict(previous[1]), f"labels in delete event {event.revision}"
            )
    return view


@attrs.frozen
class StoreState:
    """Everything observable about a store, without timestamps: what "writes nothing" keeps.

    Attributes:
        head: :meth:`~kds.store.Store.head`.
        horizon: :meth:`~kds.store.Store.horizon`.
        view: content of every stored resource, sorted by key.
        events: content of every event after the horizon.
        tracking: the tracking cursor of each origin asked about.
    """

    head: int
    horizon: int
    view: list[ResourceContent]
    events: list[tuple[Any, ...]]
    tracking: dict[str, Cursor | None]


async def capture(store: Store, origins: Collection[str] = ORIGINS) -> StoreState:
    """Take a :class:`StoreState` of *store*, reading the tracking cursors of *origins*."""
    return StoreState(
        head=await store.head(),
        horizon=await store.horizon(),
        view=view_content(await store.list_resources()),
        events=[event_content(event) for event in await read_all(store)],
        tracking={origin: await store.tracking(origin) for origin in sorted(origins)},
    )


async def _commit_both(store: Store, model: MemoryStore, batch: Sequence[Change]) -> bool:
    """Commit *batch* to both; check they agree on success or error class; True on success."""
    outcomes: list[type[BaseException] | None] = []
    for target in (store, model):
        try:
            await target.commit(batch)
        except (ConflictError, NotFoundError) as exc:
            outcomes.append(type(exc))
        else:
            outcomes.append(None)
    _equal(outcomes[0], outcomes[1], f"outcome of {list(batch)!r} (store, reference)")
    return outcomes[0] is None


async def _setup(store: Store, model: MemoryStore, setup: Sequence[Sequence[Change]]) -> None:
    for batch in setup:
        await _commit_both(store, model, batch)
    _equal(
        view_content(await store.list_resources()),
        view_content(await model.list_resources()),
        "view after the setup batches (store vs reference)",
    )


def _check_unconditional(changes: Sequence[Change]) -> None:
    for change in changes:
        if change.expected_version is not None or (
            isinstance(change, Delete) and not change.missing_ok
        ):
            raise ValueError(f"the check needs changes that cannot fail, got {change!r}")


async def _version(store: Store, key: ResourceKey) -> int:
    resource = await store.find(key)
    return 0 if resource is None else resource.version


def _position(fraction: float, head: int) -> int:
    return min(head, max(0, round(fraction * head)))


async def _open_instances(
    factory: StoreFactory, stack: contextlib.AsyncExitStack, count: int
) -> list[Store]:
    """Open *count* handles on one new store: separate instances when durable."""
    spec = await factory.new_spec()
    first = await stack.enter_async_context(spec.create())
    if not factory.durable:
        return [first] * count
    return [first, *[await stack.enter_async_context(spec.create()) for _ in range(count - 1)]]


async def _write(store: Store, batches: Sequence[Sequence[Change]]) -> None:
    for batch in batches:
        # Concurrent writers may invalidate each other's expected versions.
        with contextlib.suppress(ConflictError, NotFoundError):
            await store.commit(batch)
        await anyio.lowlevel.checkpoint()


# -- lifecycle ----------------------------------------------------------------------


async def check_lifecycle(factory: StoreFactory) -> None:
    """Open, close and epoch rules, and the empty state of a new store.

    A store refuses use before :meth:`~kds.store.Store.open` and after
    :meth:`~kds.store.Store.aclose` with :class:`~kds.errors.StoreClosedError`;
    both are idempotent; a new store is empty at revision 0 with a non-empty epoch
    of its own; a follower blocked in :meth:`~kds.store.Store.follow` ends with
    StoreClosedError when the store closes; a durable store keeps its epoch and
    data across a reopen.
    """
    key = ResourceKey("Mesh", None, "lifecycle")
    spec = await factory.new_spec()
    store = spec.create()
    with raises(StoreClosedError, "head() before open()"):
        await store.head()
    with raises(StoreClosedError, "epoch before open()"):
        _ = store.epoch
    async with store, await factory.create() as other:
        await store.open()  # opening an open store does nothing
        epoch = store.epoch
        epoch_value: object = epoch  # a third-party store may return anything
        _check(
            isinstance(epoch_value, str) and bool(epoch_value),
            f"epoch must be a non-empty str: {epoch!r}",
        )
        _check(other.epoch != epoch, f"two new stores share the epoch {epoch!r}")
        _equal(await store.head(), 0, "head of a new store")
        _equal(await store.horizon(), 0, "horizon of a new store")
        _equal(await store.cursor(), Cursor(epoch, 0), "cursor() of a new store")
        _equal(await store.read(0), [], "read(0) of a new store")
        _equal(await store.list_resources(), [], "list_resources() of a new store")
        snapshot = await store.snapshot()
        _equal((snapshot.cursor, list(snapshot.resources)), (Cursor(epoch, 0), []), "snapshot")
        _equal(await store.tracking("global"), None, "tracking() of a new store")
        _equal(await store.find(key), None, "find() of a missing key")
        with raises(NotFoundError, "get() of a missing key") as info:
            await store.get(key)
        _equal(info.value.key, key, "NotFoundError.key")
        revision = await store.commit([Upsert(key=key, spec={"x": 1})])
    await store.aclose()  # idempotent
    closed_calls: list[tuple[str, Any]] = [
        ("head()", store.head),
        ("horizon()", store.horizon),
        ("get()", lambda: store.get(key)),
        ("list_resources()", store.list_resources),
        ("snapshot()", store.snapshot),
        ("read()", lambda: store.read(0)),
        ("tracking()", lambda: store.tracking("global")),
        ("commit()", lambda: store.commit([Upsert(key=key)])),
        ("compact()", lambda: store.compact(0)),
        ("wait_for_commit()", lambda: store.wait_for_commit(0)),
    ]
    for name, call in closed_calls:
        with raises(StoreClosedError, f"{name} after aclose()"):
            with anyio.fail_after(TIMEOUT):
                await call()
    with raises(StoreClosedError, "epoch after aclose()"):
        _ = store.epoch
    if factory.durable:
        async with spec.create() as reopened:
            _equal(reopened.epoch, epoch, "epoch after reopening a durable store")
            _equal(await reopened.head(), revision, "head after reopening")
            _equal((await reopened.get(key)).spec, {"x": 1}, "spec after reopening")
    await _check_close_ends_follower(factory)


async def _check_close_ends_follower(factory: StoreFactory) -> None:
    key = ResourceKey("Mesh", None, "follower")
    store = await factory.create()
    await store.open()
    try:
        send, receive = anyio.create_memory_object_stream[Event](math.inf)
        ended: list[BaseException] = []

        async def follow() -> None:
            try:
                async for event in store.follow(0):
                    send.send_nowait(event)
            except StoreClosedError as exc:
                ended.append(exc)

        with send, receive, anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await store.commit([Upsert(key=key, spec={"n": 1})])
                await receive.receive()
                await store.commit([Upsert(key=key, spec={"n": 2})])
                await receive.receive()
                # The follower is now reading or waiting after the head.
                await store.aclose()
        _equal(len(ended), 1, "followers ended by StoreClosedError when the store closed")
    finally:
        await store.aclose()


# -- commits ------------------------------------------------------------------------


async def check_commit_basics(factory: StoreFactory) -> None:
    """Versions, no-op changes, in-batch ordering, return values, events and timestamps.

    Versions start at 1 and grow by one per change; an identical upsert and a
    ``missing_ok`` (or ``MUST_NOT_EXIST``) delete of a missing key take no effect
    and return the head; a later change in a batch sees an earlier one; the
    return value is the revision of the batch's last event; each event carries the
    new state (timestamps included); ``created_at`` survives updates, all
    timestamps are UTC.
    """
    mesh = ResourceKey("Mesh", None, "basics")
    dataplane = ResourceKey("Dataplane", "default", "basics")
    missing = ResourceKey("Zone", None, "missing")
    async with await factory.create() as store:
        first = await store.commit(
            [Upsert(key=mesh, labels={"team": "a"}, spec={"x": 1}, expected_version=MUST_NOT_EXIST)]
        )
        _check(first > 0, f"the first commit returned revision {first}")
        _equal(await store.head(), first, "head after the first commit")
        created = await store.get(mesh)
        _equal(created.content(), (mesh, {"team": "a"}, {"x": 1}, 1), "the created resource")
        for stamp in (created.created_at, created.modified_at):
            _check(
                stamp.utcoffset() is not None and not stamp.utcoffset(),
                f"timestamps must be timezone-aware UTC, got {stamp!r}",
            )
        _check(created.modified_at >= created.created_at, "modified_at before created_at")
        events = await store.read(0)
        _equal(len(events), 1, "events after the first commit")
        _check(isinstance(events[0], Upserted), f"expected an Upserted event, got {events[0]!r}")
        _equal(events[0].revision, first, "revision of the first event")
        _equal(getattr(events[0], "resource", None), created, "the event's resource")

        same = await store.commit([Upsert(key=mesh, labels={"team": "a"}, spec={"x": 1})])
        _equal(same, first, "an identical upsert returns the head")
        _equal(await store.read(first), [], "events after an identical upsert")
        _equal((await store.get(mesh)).version, 1, "version after an identical upsert")

        last = await store.commit(
            [
                Upsert(key=mesh, spec={"x": 2}, expected_version=1),
                Upsert(key=dataplane, expected_version=MUST_NOT_EXIST),
                Upsert(key=dataplane, labels={"team": "b"}, expected_version=1),
            ]
        )
        events = await store.read(first)
        _equal(len(events), 3, "events of a three-change batch")
        revisions = [event.revision for event in events]
        _check(
            first < revisions[0] < revisions[1] < revisions[2],
            f"revisions must follow the order of the changes: {revisions}",
        )
        _equal(last, revisions[-1], "commit() returns the revision of its last event")
        updated = await store.get(mesh)
        _equal(updated.content(), (mesh, {}, {"x": 2}, 2), "the updated resource")
        _equal(updated.created_at, created.created_at, "created_at after an update")
        _check(updated.modified_at >= created.modified_at, "modified_at went backwards")
        _equal(getattr(events[0], "resource", None), updated, "the update event's resource")
        _equal(
            (await store.get(dataplane)).content(),
            (dataplane, {"team": "b"}, {}, 2),
            "a resource created and updated in one batch",
        )

        for noop in (
            Delete(key=missing, missing_ok=True),
            Delete(key=missing, expected_version=MUST_NOT_EXIST),
        ):
            _equal(await store.commit([noop]), last, f"{noop!r} returns the head")
        _equal(await store.commit([]), last, "an empty commit returns the head")
        _equal(await store.read(last), [], "events after commits that took no effect")

        deleted = await store.commit([Delete(key=dataplane, expected_version=2)])
        events = await store.read(last)
        _equal(
            [event_content(event) for event in events],
            [("deleted", deleted, dataplane, 2, {"team": "b"})],
            "the delete event",
        )
        _equal(await store.find(dataplane), None, "find() after the delete")
        await store.commit([Upsert(key=dataplane, expected_version=MUST_NOT_EXIST)])
        _equal((await store.get(dataplane)).version, 1, "version of a re-created resource")


async def check_conflict_writes_nothing(
    factory: StoreFactory,
    setup: Sequence[Sequence[Change]],
    prefix: Sequence[Change],
    stale_key: ResourceKey,
    *,
    delete: bool = False,
    wrong: int = 0,
    suffix: Sequence[Change] = (),
) -> None:
    """A stale expected version raises ConflictError and the whole commit writes nothing.

    After the *setup* batches (any outcome), commits *prefix* (changes that
    cannot fail), then a change of *stale_key* whose expected version is wrong,
    then *suffix*, with a tracking cursor. The commit must raise
    :class:`~kds.errors.ConflictError` naming the key and both versions, and
    leave the view, the log, the head and the tracking cursor as they were.

    Args:
        factory: makes the store under test.
        setup: batches committed first; conflicts among them are fine.
        prefix: unconditional changes before the stale one.
        stale_key: the key whose expectation fails.
        delete: make the stale change a delete instead of an upsert.
        wrong: picks which wrong version to expect (any int).
        suffix: unconditional changes after the stale one.
    """
    _check_unconditional([*prefix, *suffix])
    tracking = Tracking("conformance", Cursor("epoch-a", 1))
    async with await factory.create() as store, MemoryStore(catalog=store.catalog) as model:
        await _setup(store, model, setup)
        await model.commit(prefix)
        actual = await _version(model, stale_key)
        if actual:
            candidates = [MUST_NOT_EXIST, actual + 1, *([actual - 1] if actual > 1 else [])]
        else:
            candidates = [1, 2]
        expected = candidates[wrong % len(candidates)]
        stale: Change = (
            Delete(key=stale_key, expected_version=expected)
            if delete
            else Upsert(key=stale_key, spec={"stale": True}, expected_version=expected)
        )
        before = await capture(store, ["conformance"])
        with raises(ConflictError, "commit with a stale expected version") as info:
            await store.commit([*prefix, stale, *suffix], tracking=tracking)
        error = info.value
        _equal(
            (error.key, error.expected, error.actual),
            (stale_key, expected, actual),
            "ConflictError (key, expected, actual)",
        )
        _equal(await capture(store, ["conformance"]), before, "state after a conflict")


async def check_not_found_writes_nothing(
    factory: StoreFactory,
    setup: Sequence[Sequence[Change]],
    prefix: Sequence[Change],
    key: ResourceKey,
) -> None:
    """Deleting a missing key without ``missing_ok`` raises NotFoundError and writes nothing.

    The failing batch is *prefix*, a ``missing_ok`` delete of *key* and a plain
    delete of *key*: the second delete sees the first, so *key* is missing
    whether or not it existed. The error names *key*; view, log, head and the
    tracking cursor sent with the batch are unchanged.
    """
    _check_unconditional(prefix)
    tracking = Tracking("conformance", Cursor("epoch-a", 1))
    async with await factory.create() as store, MemoryStore(catalog=store.catalog) as model:
        await _setup(store, model, setup)
        before = await capture(store, ["conformance"])
        batch = [*prefix, Delete(key=key, missing_ok=True), Delete(key=key)]
        with raises(NotFoundError, "delete of a missing key") as info:
            await store.commit(batch, tracking=tracking)
        _equal(info.value.key, key, "NotFoundError.key")
        _equal(await capture(store, ["conformance"]), before, "state after NotFoundError")


async def check_invalid_writes_nothing(
    factory: StoreFactory,
    setup: Sequence[Sequence[Change]],
    valid: Sequence[Change],
    invalid: InvalidChange,
    position: int,
) -> None:
    """A malformed change raises ValidationError naming its field, and nothing is written.

    The batch is *valid* with *invalid* inserted at *position* (clamped), sent
    with a tracking cursor. Valid changes may conflict: validation comes first.
    """
    tracking = Tracking("conformance", Cursor("epoch-a", 1))
    async with await factory.create() as store, MemoryStore(catalog=store.catalog) as model:
        await _setup(store, model, setup)
        index = min(max(position, 0), len(valid))
        batch = [*valid[:index], invalid.change, *valid[index:]]
        before = await capture(store, ["conformance"])
        with raises(ValidationError, f"commit with {invalid.change!r}") as info:
            await store.commit(batch, tracking=tracking)
        field = f"changes[{index}]" + (f".{invalid.field}" if invalid.field else "")
        _equal(info.value.field, field, "ValidationError.field")
        _equal(await capture(store, ["conformance"]), before, "state after a ValidationError")


async def check_invalid_tracking_writes_nothing(
    factory: StoreFactory,
    changes: Sequence[Change],
    tracking: Tracking,
    field: str,
) -> None:
    """A malformed tracking cursor raises ValidationError naming *field*; nothing is written."""
    async with await factory.create() as store:
        before = await capture(store)
        with raises(ValidationError, f"commit with {tracking!r}") as info:
            await store.commit(changes, tracking=tracking)
        _equal(info.value.field, field, "ValidationError.field")
        _equal(await capture(store), before, "state after an invalid tracking cursor")


# -- follow -------------------------------------------------------------------------


async def check_follow_concurrent(
    factory: StoreFactory,
    setup: Sequence[Sequence[Change]],
    writers: Sequence[Sequence[Sequence[Change]]],
    *,
    start: float = 0.0,
    batch_size: int = 1000,
    use_cursor: bool = False,
) -> None:
    """follow() yields every later event exactly once, in order, while writers commit.

    After *setup*, a follower starts at a revision between 0 and the head (the
    fraction *start*), then one task per element of *writers* commits its batches
    (conflicts between writers are fine). For a durable store the follower and
    half of the writers use their own instances of the same store, so the
    follower also tails commits made through another connection. The follower
    must yield exactly the log after its start; the snapshot taken before the
    writers plus the events after it must rebuild the final view.

    Args:
        factory: makes the store under test.
        setup: batches committed before following.
        writers: each writer's batches.
        start: where to start following, as a fraction of the head after *setup*.
        batch_size: the follower's page size.
        use_cursor: pass a :class:`~kds.store.Cursor` instead of a revision.
    """
    async with contextlib.AsyncExitStack() as stack:
        main, other, follower_store = await _open_instances(factory, stack, 3)
        for batch in setup:
            with contextlib.suppress(ConflictError, NotFoundError):
                await main.commit(batch)
        snapshot = await main.snapshot()
        after = _position(start, snapshot.cursor.revision)
        begin: int | Cursor = Cursor(follower_store.epoch, after) if use_cursor else after
        send, receive = anyio.create_memory_object_stream[Event](math.inf)
        collected: list[Event] = []

        async def follow() -> None:
            async with _closing(follower_store.follow(begin, batch_size=batch_size)) as events:
                async for event in events:
                    send.send_nowait(event)

        with send, receive, anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                async with anyio.create_task_group() as writing:
                    for index, batches in enumerate(writers):
                        writing.start_soon(_write, (main, other)[index % 2], batches)
                final = await main.head()
                while (collected[-1].revision if collected else after) < final:
                    collected.append(await receive.receive())
                tg.cancel_scope.cancel()
        revisions = [event.revision for event in collected]
        _check(
            all(a < b for a, b in zip([after, *revisions], revisions, strict=False)),
            f"follow({after}) yielded revisions out of order or twice: {revisions}",
        )
        expected = await read_all(main, after)
        _equal(
            [event_content(event) for event in collected],
            [event_content(event) for event in expected],
            f"events followed after revision {after}",
        )
        view = {resource.key: resource.content() for resource in snapshot.resources}
        later = [event for event in expected if event.revision > snapshot.cursor.revision]
        _equal(
            sorted(apply_events(view, later).values()),
            view_content(await main.list_resources()),
            "snapshot plus the later events vs the final view",
        )


# -- compaction and cursors ---------------------------------------------------------


async def check_compaction(
    factory: StoreFactory, batches: Sequence[Sequence[Change]], through: float
) -> None:
    """Compaction drops history up to a horizon and nothing else.

    After *batches*, compacts through a revision between 0 and the head (the
    fraction *through*). Then: the horizon is at least that revision and at most
    the head; head and view are unchanged; the events after the horizon are
    exactly the ones that were there before; reading, following (by revision or
    cursor) and checking a cursor before the horizon raise
    :class:`~kds.errors.CompactedError`; compacting lower does nothing;
    compacting below 0 or past the head raises ValueError; new commits are
    readable from the horizon.
    """
    async with await factory.create() as store:
        for batch in batches:
            with contextlib.suppress(ConflictError, NotFoundError):
                await store.commit(batch)
        head = await store.head()
        view = view_content(await store.list_resources())
        events = await read_all(store, 0)
        target = _position(through, head)
        await store.compact(target)
        horizon = await store.horizon()
        _check(target <= horizon <= head, f"horizon {horizon} after compact({target}), head {head}")
        _equal(await store.head(), head, "head after compaction")
        _equal(view_content(await store.list_resources()), view, "view after compaction")
        _equal(
            [event_content(event) for event in await read_all(store, horizon)],
            [event_content(event) for event in events if event.revision > horizon],
            "events after the horizon",
        )
        epoch = store.epoch
        for after in sorted({0, target - 1, horizon - 1}):
            if not 0 <= after < horizon:
                continue
            with raises(CompactedError, f"read({after}) below horizon {horizon}") as info:
                await store.read(after)
            _equal((info.value.after, info.value.horizon), (after, horizon), "CompactedError")
            with raises(CompactedError, f"check_cursor at {after} below horizon {horizon}"):
                await store.check_cursor(Cursor(epoch, after))
            for begin in (after, Cursor(epoch, after)):
                with raises(CompactedError, f"follow({begin!r}) below horizon {horizon}"):
                    async with _closing(store.follow(begin)) as followed:
                        with anyio.fail_after(TIMEOUT):
                            await anext(followed)
        await store.check_cursor(Cursor(epoch, horizon))
        await store.compact(max(0, horizon - 1))
        _equal(await store.horizon(), horizon, "horizon after compacting below it")
        for bad in (-1, head + 1):
            with raises(ValueError, f"compact({bad}) with head {head}"):
                await store.compact(bad)
        _equal(await store.horizon(), horizon, "horizon after refused compactions")
        key = ResourceKey("Mesh", None, "after-compaction")
        revision = await store.commit([Upsert(key=key, spec={"n": head})])
        _equal(
            [(event.revision, event.key) for event in await read_all(store, horizon)][-1:],
            [(revision, key)],
            "a commit after compaction is readable from the horizon",
        )


async def check_compaction_overtakes_follower(factory: StoreFactory) -> None:
    """A follower behind a later compaction ends with CompactedError instead of skipping."""
    async with await factory.create() as store:
        for n in range(4):
            await store.commit([Upsert(key=ResourceKey("Mesh", None, f"m{n}"))])
        async with _closing(store.follow(0, batch_size=1)) as followed:
            with anyio.fail_after(TIMEOUT):
                first = await anext(followed)
                await store.compact(await store.head())
                with raises(CompactedError, "follow() overtaken by compaction"):
                    second = await anext(followed)
                    raise AssertionError(f"after {first!r}, follow() yielded {second!r}")


async def check_cursors(factory: StoreFactory) -> None:
    """Cursors are only trusted in their own log and never ahead of its head.

    A cursor of another store (another epoch) and a cursor past the head raise
    :class:`~kds.errors.EpochMismatchError` from
    :meth:`~kds.store.Store.check_cursor` and :meth:`~kds.store.Store.follow`;
    cursors from 0 to the head are accepted; ``cursor()`` is the head.
    """
    async with await factory.create() as store, await factory.create() as other:
        await other.commit([Upsert(key=ResourceKey("Mesh", None, "other"))])
        for n in range(3):
            await store.commit([Upsert(key=ResourceKey("Mesh", None, "mine"), spec={"n": n})])
        head = await store.head()
        epoch = store.epoch
        _equal(await store.cursor(), Cursor(epoch, head), "cursor()")
        foreign = Cursor(other.epoch, 0)
        with raises(EpochMismatchError, "check_cursor() of another store's cursor") as info:
            await store.check_cursor(foreign)
        _equal((info.value.expected, info.value.actual), (epoch, other.epoch), "mismatch epochs")
        for bad in (foreign, Cursor(other.epoch, head), Cursor(epoch, head + 1)):
            if bad.epoch == epoch:
                with raises(EpochMismatchError, f"check_cursor({bad!r}) past head {head}"):
                    await store.check_cursor(bad)
            with raises(EpochMismatchError, f"follow({bad!r}) with head {head}"):
                async with _closing(store.follow(bad)) as followed:
                    with anyio.fail_after(TIMEOUT):
                        await anext(followed)
        events = await read_all(store, 0)
        # Every revision that matters (revisions need not be small or dense).
        revisions = {0, head, *(e.revision for e in events), *(e.revision - 1 for e in events)}
        for revision in sorted(revisions):
            await store.check_cursor(Cursor(epoch, revision))
        async with _closing(store.follow(Cursor(epoch, 0))) as followed:
            with anyio.fail_after(TIMEOUT):
                got = [await anext(followed) for _ in events]
        _equal(got, events, "follow(Cursor(epoch, 0))")


# -- tracking -----------------------------------------------------------------------


async def check_delete_labelled(
    factory: StoreFactory, setup: Sequence[Sequence[Change]], labels: Mapping[str, str]
) -> None:
    """:meth:`~kds.store.Store.delete_labelled` removes exactly the matching resources at once.

    After arbitrary setup batches, deleting by *labels* leaves the view minus every
    resource carrying all of them, as one contiguous run of delete events (one
    commit) right after the old head, one per removed resource; with nothing to
    remove it returns the head and writes nothing. An empty filter is refused
    and changes nothing.
    """
    async with await factory.create() as store:
        model = MemoryStore()
        async with model:
            await _setup(store, model, setup)
        before = await capture(store)
        with raises(ValueError, "delete_labelled with no labels"):
            await store.delete_labelled({})
        _equal(await capture(store), before, "state after a refused delete_labelled({})")
        doomed = {
            resource.key
            for resource in await store.list_resources()
            if all(resource.labels.get(name) == value for name, value in labels.items())
        }
        revision = await store.delete_labelled(labels)
        events = await read_all(store, before.head)
        # One run of events right after the old head (revisions need not be dense).
        _equal(len(events), len(doomed), "delete events written by delete_labelled")
        _equal(
            revision,
            events[-1].revision if events else before.head,
            "revision returned by delete_labelled",
        )
        _check(all(isinstance(e, Deleted) for e in events), "delete_labelled wrote non-deletes")
        _equal({event.key for event in events}, doomed, "keys deleted")
        _equal(
            view_content(await store.list_resources()),
            [content for content in before.view if content[0] not in doomed],
            "view after delete_labelled",
        )


async def check_tracking_basics(factory: StoreFactory) -> None:
    """The tracking rules on fixed examples: forward only within an epoch, any new epoch.

    A replay (same revision) or a step back in the same epoch raises
    :class:`~kds.errors.ConflictError` and drops the batch's changes; a new
    epoch is accepted even at a lower revision; an origin with no cursor takes
    any revision, 0 included; a tracking-only commit emits no event; a batch
    whose change conflicts does not move the cursor.
    """
    first = ResourceKey("Mesh", None, "tracked-1")
    second = ResourceKey("Mesh", None, "tracked-2")
    async with await factory.create() as store:
        await store.commit([Upsert(key=first)], tracking=Tracking("o", Cursor("e1", 5)))
        _equal(await store.tracking("o"), Cursor("e1", 5), "tracking after the first commit")
        for revision in (5, 3, 0):
            before = await capture(store, ["o"])
            with raises(ConflictError, f"replaying revision {revision} of epoch e1 after 5"):
                await store.commit(
                    [Upsert(key=second)], tracking=Tracking("o", Cursor("e1", revision))
                )
            _equal(await capture(store, ["o"]), before, "state after a refused replay")
        head = await store.commit([Upsert(key=second)], tracking=Tracking("o", Cursor("e2", 1)))
        _equal(await store.tracking("o"), Cursor("e2", 1), "tracking after a new epoch")
        _equal((await store.get(second)).version, 1, "the change committed with the new epoch")
        other = await store.commit([], tracking=Tracking("p", Cursor("e1", 0)))
        _equal(other, head, "a tracking-only commit returns the head")
        _equal(await store.read(head), [], "events of a tracking-only commit")
        _equal(await store.tracking("p"), Cursor("e1", 0), "tracking of a second origin")
        _equal(await store.tracking("o"), Cursor("e2", 1), "the first origin's cursor")
        with raises(ConflictError, "a batch with a stale expected version"):
            await store.commit(
                [Upsert(key=first, expected_version=7)], tracking=Tracking("o", Cursor("e2", 2))
            )
        _equal(await store.tracking("o"), Cursor("e2", 1), "tracking after a refused batch")
        await store.commit(
            [Upsert(key=first, spec={"n": 1}, expected_version=1)],
            tracking=Tracking("o", Cursor("e2", 2)),
        )
        _equal(await store.tracking("o"), Cursor("e2", 2), "tracking after the retried batch")


async def check_tracking(
    factory: StoreFactory, steps: Sequence[tuple[Sequence[Change], Tracking]]
) -> None:
    """Tracking cursors move forward within an epoch and are recorded with their changes.

    Commits each ``(changes, tracking)`` step (changes that cannot fail). A
    cursor at or below the stored one of the same origin and epoch must raise
    :class:`~kds.errors.ConflictError` and write nothing, changes included; any
    other must be recorded (a new epoch may start anywhere) together with the
    changes, leaving other origins alone. A durable store keeps the cursors
    across a reopen.
    """
    origins = sorted({tracking.origin for _, tracking in steps} | {"unused"})
    stored: dict[str, Cursor | None] = dict.fromkeys(origins)
    spec = await factory.new_spec()
    async with spec.create() as store, MemoryStore(catalog=store.catalog) as model:
        for changes, tracking in steps:
            _check_unconditional(changes)
            before = await capture(store, origins)
            refused = Store.tracking_conflict(tracking, stored[tracking.origin]) is not None
            if refused:
                with raises(ConflictError, f"replaying {tracking!r} over {stored!r}") as info:
                    await store.commit(changes, tracking=tracking)
                _equal(info.value.key, None, "ConflictError.key of a tracking conflict")
                _equal(await capture(store, origins), before, "state after a tracking conflict")
                continue
            revision = await store.commit(changes, tracking=tracking)
            await model.commit(changes)
            stored[tracking.origin] = tracking.cursor
            after = await capture(store, origins)
            _equal(after.tracking, stored, "tracking cursors after a commit")
            _equal(after.view, view_content(await model.list_resources()), "view after commit")
            _equal(revision, after.head, "commit() returns the head")
            if after.head == before.head:
                _equal(after.events, before.events, "events of a commit with no effect")
        final = await capture(store, origins)
    if factory.durable:
        async with spec.create() as reopened:
            _equal(await capture(reopened, origins), final, "state after reopening")


# -- reads and snapshots ------------------------------------------------------------


async def check_reads(
    factory: StoreFactory,
    batches: Sequence[Sequence[Change]],
    keys: Sequence[ResourceKey],
    *,
    type_name: str | None = None,
    mesh: str | None = None,
    labels: Mapping[str, str] | None = None,
    after: float = 0.0,
    limit: int = 1000,
) -> None:
    """get, find, find_many, find_versions, list_resources, snapshot and read agree.

    After *batches*: ``list_resources`` with the given filters returns exactly the
    matching resources, sorted by key; ``get``/``find`` of each of *keys*, and
    ``find_many`` and ``find_versions`` of all of them, agree with the view; ``read(after,
    limit=limit)`` returns the first *limit* events after *after* (a fraction of
    the head); reading at or past the head
    returns nothing; bad ``after``/``limit`` raise ValueError;
    ``wait_for_commit`` below the head returns at once.
    """
    async with await factory.create() as store:
        for batch in batches:
            with contextlib.suppress(ConflictError, NotFoundError):
                await store.commit(batch)
        everything = await store.list_resources()
        _equal(
            [resource.key for resource in everything],
            sorted(resource.key for resource in everything),
            "list_resources() order",
        )
        snapshot = await store.snapshot()
        _equal(view_content(snapshot.resources), view_content(everything), "snapshot vs list")
        filtered = await store.list_resources(type_name, mesh=mesh, labels=labels)
        _equal(
            view_content(filtered),
            view_content([r for r in everything if matches(r, type_name, mesh, labels)]),
            f"list_resources({type_name!r}, mesh={mesh!r}, labels={labels!r})",
        )
        by_key = {resource.key: resource for resource in everything}
        # find_many of the given keys plus some that exist: exactly the stored ones.
        wanted = [*keys, *list(by_key)[:5]]
        many = await store.find_many(wanted)
        _equal(
            {key: resource.content() for key, resource in many.items()},
            {key: by_key[key].content() for key in wanted if key in by_key},
            f"find_many({wanted})",
        )
        _equal(await store.find_many([]), {}, "find_many([])")
        versions = await store.find_versions(wanted)
        _equal(
            {key: (stored.version, dict(stored.labels)) for key, stored in versions.items()},
            {
                key: (by_key[key].version, dict(by_key[key].labels))
                for key in wanted
                if key in by_key
            },
            f"find_versions({wanted})",
        )
        _equal(await store.find_versions([]), {}, "find_versions([])")
        for key in keys:
            found = await store.find(key)
            _equal(
                None if found is None else found.content(),
                by_key[key].content() if key in by_key else None,
                f"find({key})",
            )
            if key not in by_key:
                with raises(NotFoundError, f"get({key}) of a missing key"):
                    await store.get(key)
            else:
                _equal((await store.get(key)).content(), by_key[key].content(), f"get({key})")
        head = await store.head()
        position = _position(after, head)
        _equal(
            [event_content(event) for event in await store.read(position, limit=limit)],
            [event_content(event) for event in (await read_all(store, position))[:limit]],
            f"read({position}, limit={limit})",
        )
        for past in (head, head + 1, head + 10):
            _equal(await store.read(past), [], f"read({past}) at or past head {head}")
        with raises(ValueError, "read(-1)"):
            await store.read(-1)
        with raises(ValueError, "read(0, limit=0)"):
            await store.read(0, limit=0)
        if head:
            with anyio.fail_after(TIMEOUT):
                await store.wait_for_commit(head - 1)


async def check_snapshot_consistency(
    factory: StoreFactory,
    setup: Sequence[Sequence[Change]],
    writers: Sequence[Sequence[Sequence[Change]]],
    types: Collection[str] | None = None,
) -> None:
    """Every snapshot equals the log replayed up to its cursor, even while writers commit.

    Snapshots (of *types*, or all types) are taken repeatedly while the
    *writers* commit; for a durable store some come from another instance of
    the same store. Each must carry the store's epoch and list, sorted by key,
    exactly the resources that replaying the log up to its revision produces.
    """
    async with contextlib.AsyncExitStack() as stack:
        main, other = await _open_instances(factory, stack, 2)
        for batch in setup:
            with contextlib.suppress(ConflictError, NotFoundError):
                await main.commit(batch)
        snapshots = [await main.snapshot(types)]
        done = anyio.Event()

        async def watch() -> None:
            # One snapshot per turn, alternating instances; the writers run in between.
            while not done.is_set():
                snapshots.append(await (main, other)[len(snapshots) % 2].snapshot(types))
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                async with anyio.create_task_group() as writing:
                    for index, batches in enumerate(writers):
                        writing.start_soon(_write, (main, other)[index % 2], batches)
                done.set()
        snapshots.append(await other.snapshot(types))
        events = await read_all(main, 0)
        for snapshot in snapshots:
            _equal(snapshot.cursor.epoch, main.epoch, "snapshot epoch")
            keys = [resource.key for resource in snapshot.resources]
            _equal(keys, sorted(keys), "snapshot order")
            replayed = apply_events(
                {}, [event for event in events if event.revision <= snapshot.cursor.revision]
            )
            _equal(
                view_content(snapshot.resources),
                [
                    content
                    for key, content in sorted(replayed.items())
                    if types is None or key.type in types
                ],
                f"snapshot at revision {snapshot.cursor.revision} vs the replayed log",
            )


async def check_reopen(
    factory: StoreFactory,
    batches: Sequence[Sequence[Change]],
    through: float,
    tracking: Tracking,
) -> None:
    """A durable store keeps epoch, view, log, horizon and tracking across a reopen.

    Only for durable factories; a second instance opened while the first is
    still open sees the same state.

    Raises:
        ValueError: *factory* is not durable.
    """
    if not factory.durable:
        raise ValueError(f"{factory.name} is not durable: nothing survives a reopen")
    spec = await factory.new_spec()
    origins = [tracking.origin]
    async with spec.create() as store:
        for batch in batches:
            with contextlib.suppress(ConflictError, NotFoundError):
                await store.commit(batch)
        await store.commit([], tracking=tracking)
        await store.compact(_position(through, await store.head()))
        epoch = store.epoch
        state = await capture(store, origins)
        async with spec.create() as second:
            _equal(second.epoch, epoch, "epoch seen by a second instance")
            _equal(await capture(second, origins), state, "state seen by a second instance")
    async with spec.create() as reopened:
        _equal(reopened.epoch, epoch, "epoch after reopening")
        _equal(await capture(reopened, origins), state, "state after reopening")
