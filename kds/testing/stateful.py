"""A Hypothesis state machine comparing a store with the reference :class:`MemoryStore`.

:class:`StoreModel` applies the same random operations to the store under test
and to a :class:`~kds.testing.memory.MemoryStore` (assumed correct): commits
whose expected versions are sometimes stale, tracking cursors that are
sometimes replayed, compactions, reads, follows, snapshots and, for durable
stores, reopens. After every step both must have the same view, the same log
(ignoring timestamps), the same head and horizon and the same tracking cursors.

Revisions are compared through a map from the reference's revisions to the
store's, built as events appear: the contract promises strictly increasing
revisions, not dense ones, so a backend may number its events differently.

Rules are synchronous (Hypothesis has no async state machines) and reach the
stores through an anyio blocking portal running its own asyncio loop, which is
why the store is created inside the machine through its factory.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import anyio
from anyio.from_thread import start_blocking_portal
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kds.errors import CompactedError, ConflictError, KdsError, NotFoundError
from kds.store import Change, Cursor, Event, Store, Tracking
from kds.testing import strategies
from kds.testing.checks import TIMEOUT, event_content, read_all, view_content
from kds.testing.memory import MemoryStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection

    from hypothesis import settings as Settings

    from kds.resource import Resource, ResourceKey
    from kds.testing.factory import StoreFactory

__all__ = ["StoreModel", "run_store_model"]

T = TypeVar("T")

_ORIGINS: Final = strategies.ORIGINS


def _fail(message: str) -> None:
    raise AssertionError(message)


def _equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}:\n  store:     {actual!r}\n  reference: {expected!r}")


async def _follow_until(
    store: Store, begin: int | Cursor, until: int, batch_size: int
) -> list[Event]:
    """Follow from *begin* until an event at or past *until*, within the deadline."""
    after = begin.revision if isinstance(begin, Cursor) else begin
    events: list[Event] = []
    if after >= until:
        return events
    followed = store.follow(begin, batch_size=batch_size)
    try:
        with anyio.fail_after(TIMEOUT):
            async for event in followed:
                events.append(event)
                if event.revision >= until:
                    break
    finally:
        aclose = getattr(followed, "aclose", None)
        if aclose is not None:
            await aclose()
    return events


class StoreModel(RuleBasedStateMachine):
    """Random operations on a store and on a MemoryStore must have the same outcomes.

    Run it with :func:`run_store_model`, or ``run_state_machine_as_test(lambda:
    StoreModel(factory))``. Each run opens a new store from *factory* on a
    blocking portal's event loop and closes both at teardown.

    Args:
        factory: makes the store under test; must not cache loop-bound objects.
    """

    def __init__(self, factory: StoreFactory) -> None:
        super().__init__()
        self.factory = factory
        self._stack = contextlib.ExitStack()
        try:
            self.portal = self._stack.enter_context(start_blocking_portal("asyncio"))
            self.spec = self.portal.call(factory.new_spec)
            self.store = self.spec.create()
            self.portal.call(self.store.open)
            self._stack.callback(lambda: self.portal.call(self.store.aclose))
            self.model = MemoryStore(catalog=self.store.catalog)
            self.portal.call(self.model.open)
            self._stack.callback(self.portal.call, self.model.aclose)
            self.epoch: str = self.portal.call(lambda: self.store.epoch)
        except BaseException:
            self._stack.close()
            raise
        # Reference revision -> store revision, for every event seen so far.
        self.revisions: dict[int, int] = {0: 0}

    def teardown(self) -> None:
        """Close both stores and stop the portal."""
        self._stack.close()

    # -- plumbing ----------------------------------------------------------------------

    def _run(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return self.portal.call(functools.partial(func, *args, **kwargs))

    def _outcome(
        self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T | Exception:
        try:
            return self._run(func, *args, **kwargs)
        except (KdsError, ValueError) as exc:
            return exc

    def _view(self) -> dict[ResourceKey, Resource]:
        return {r.key: r for r in self._run(self.model.list_resources)}

    def _map_new_events(self, model_after: int, store_after: int) -> None:
        """Pair the events both logs gained after the given heads, and extend the map."""
        model_events = self._run(read_all, self.model, model_after)
        store_events = self._run(read_all, self.store, store_after)
        _equal(
            [event_content(event, revision=False) for event in store_events],
            [event_content(event, revision=False) for event in model_events],
            "events of the commit",
        )
        for model_event, store_event in zip(model_events, store_events, strict=True):
            self.revisions[model_event.revision] = store_event.revision

    def _store_revision(self, model_revision: int) -> int:
        """The store revision for any reference revision up to and past the head."""
        head = max(self.revisions)
        if model_revision > head:
            return self.revisions[head] + (model_revision - head)
        return self.revisions[model_revision]

    def _sync_horizon(self) -> None:
        """Compact the reference to the store's horizon if the store compacted further.

        The contract lets a store's horizon pass the revision asked for; the
        reference then drops the same events.
        """
        horizon = self._run(self.store.horizon)
        covered = max(m for m, s in self.revisions.items() if s <= horizon)
        if covered > self._run(self.model.horizon):
            self._run(self.model.compact, covered)

    # -- rules ---------------------------------------------------------------------------

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        """Commit a batch that should succeed, maybe with a tracking cursor, to both stores."""
        batch = data.draw(strategies.consistent_batches(self._view(), rich=False), label="batch")
        tracking = data.draw(st.none() | strategies.trackings(), label="tracking")
        self._commit(batch, tracking)

    @rule(data=st.data())
    def commit_maybe_stale(self, data: st.DataObject) -> None:
        """Commit a batch whose expected versions are often wrong."""
        versions = {key: resource.version for key, resource in self._view().items()}
        batch = data.draw(
            strategies.batches(min_size=1, versions=versions, rich=False), label="batch"
        )
        tracking = data.draw(st.none() | strategies.trackings(), label="tracking")
        self._commit(batch, tracking)

    @rule(data=st.data())
    def commit_tracking_only(self, data: st.DataObject) -> None:
        """Move a tracking cursor without changes (often a refused replay)."""
        self._commit([], data.draw(strategies.trackings(), label="tracking"))

    def _commit(self, batch: list[Change], tracking: Tracking | None) -> None:
        model_head = self._run(self.model.head)
        store_head = self._run(self.store.head)
        tracking_refused = tracking is not None and (
            Store.tracking_conflict(tracking, self._run(self.model.tracking, tracking.origin))
            is not None
        )
        expected = self._outcome(self.model.commit, batch, tracking=tracking)
        actual = self._outcome(self.store.commit, batch, tracking=tracking)
        if isinstance(expected, Exception):
            allowed: set[type[Exception]] = {type(expected)}
            if tracking_refused:
                # Both the tracking cursor and a change may be wrong; the contract
                # does not say which error wins.
                allowed |= {ConflictError, NotFoundError}
            if not isinstance(actual, Exception) or type(actual) not in allowed:
                _fail(
                    f"commit({batch!r}, {tracking!r}): "
                    f"store gave {actual!r}, reference {expected!r}"
                )
            if isinstance(expected, ConflictError) and not tracking_refused:
                assert isinstance(actual, ConflictError)  # noqa: S101 -- checked above
                _equal(
                    (actual.key, actual.expected, actual.actual),
                    (expected.key, expected.expected, expected.actual),
                    "ConflictError (key, expected, actual)",
                )
            if isinstance(expected, NotFoundError) and isinstance(actual, NotFoundError):
                _equal(actual.key, expected.key, "NotFoundError.key")
            return
        if isinstance(actual, Exception):
            _fail(f"commit({batch!r}, {tracking!r}): store raised {actual!r}, reference {expected}")
        self._map_new_events(model_head, store_head)
        _equal(actual, self.revisions[expected], "revision returned by commit()")

    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        """Compact both through the same point; now and then out of range (ValueError)."""
        if data.draw(st.integers(0, 5), label="out of range") == 0:
            self._compact_out_of_range(data.draw(st.booleans(), label="past head"))
            return
        through = data.draw(st.integers(0, self._run(self.model.head)), label="through")
        self._run(self.store.compact, self.revisions[through])
        self._run(self.model.compact, through)
        self._sync_horizon()

    def _compact_out_of_range(self, past_head: bool) -> None:
        for target in (self.store, self.model):
            through = self._run(target.head) + 1 if past_head else -1
            outcome = self._outcome(target.compact, through)
            if not isinstance(outcome, ValueError):
                _fail(f"compact({through}) on {type(target).__name__} gave {outcome!r}")

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        """Pages of the log agree, and reads before the horizon raise CompactedError."""
        head = self._run(self.model.head)
        after = data.draw(st.integers(0, head + 2), label="after")
        limit = data.draw(st.integers(1, 5), label="limit")
        store_after = self._store_revision(after)
        actual = self._outcome(self.store.read, store_after, limit=limit)
        if store_after < self._run(self.store.horizon):
            if not isinstance(actual, CompactedError):
                _fail(f"read({store_after}) below the horizon gave {actual!r}")
            return
        expected = self._outcome(self.model.read, after, limit=limit)
        if isinstance(actual, Exception) or isinstance(expected, Exception):
            _fail(f"read({store_after}, limit={limit}): store {actual!r}, reference {expected!r}")
            return
        _equal(
            [event_content(event, revision=False) for event in actual],
            [event_content(event, revision=False) for event in expected],
            f"read({store_after}, limit={limit})",
        )
        _equal(
            [event.revision for event in actual],
            [self.revisions[event.revision] for event in expected],
            "revisions read",
        )

    @rule(data=st.data())
    def follow(self, data: st.DataObject) -> None:
        """Following from any readable point catches up with exactly the log."""
        horizon = self._run(self.model.horizon)
        head = self._run(self.model.head)
        after = data.draw(st.integers(horizon, head), label="after")
        store_after = self.revisions[after]
        begin: int | Cursor = (
            Cursor(self.epoch, store_after)
            if data.draw(st.booleans(), label="as cursor")
            else store_after
        )
        batch_size = data.draw(st.integers(1, 4), label="batch_size")
        actual = self._run(_follow_until, self.store, begin, self.revisions[head], batch_size)
        expected = self._run(read_all, self.model, after)
        _equal(
            [(self.revisions[e.revision], event_content(e, revision=False)) for e in expected],
            [(e.revision, event_content(e, revision=False)) for e in actual],
            f"follow({begin!r})",
        )

    @rule(
        type_name=st.none() | st.sampled_from(strategies.TYPES),
        mesh=st.none() | st.sampled_from(strategies.MESHES),
        labels=strategies.label_filters(),
        types=st.none() | st.frozensets(st.sampled_from([*strategies.TYPES, "Secret"])),
        key=strategies.resource_keys(),
    )
    def read_view(
        self,
        type_name: str | None,
        mesh: str | None,
        labels: dict[str, str] | None,
        types: Collection[str] | None,
        key: ResourceKey,
    ) -> None:
        """Filtered listings, snapshots and single-resource reads agree."""
        _equal(
            view_content(self._run(self.store.list_resources, type_name, mesh=mesh, labels=labels)),
            view_content(self._run(self.model.list_resources, type_name, mesh=mesh, labels=labels)),
            f"list_resources({type_name!r}, mesh={mesh!r}, labels={labels!r})",
        )
        self._check_snapshot(types)
        self._check_get(key)

    def _check_snapshot(self, types: Collection[str] | None) -> None:
        actual = self._run(self.store.snapshot, types)
        expected = self._run(self.model.snapshot, types)
        _equal(
            view_content(actual.resources), view_content(expected.resources), f"snapshot({types})"
        )
        _equal(
            actual.cursor,
            Cursor(self.epoch, self.revisions[expected.cursor.revision]),
            "snapshot cursor",
        )

    def _check_get(self, key: ResourceKey) -> None:
        actual = self._outcome(self.store.get, key)
        expected = self._outcome(self.model.get, key)
        if isinstance(expected, NotFoundError):
            if not isinstance(actual, NotFoundError) or actual.key != key:
                _fail(f"get({key}) of a missing key gave {actual!r}")
        elif isinstance(actual, Exception) or isinstance(expected, Exception):
            _fail(f"get({key}): store {actual!r}, reference {expected!r}")
        else:
            _equal(actual.content(), expected.content(), f"get({key})")
        found = self._run(self.store.find, key)
        _equal(
            None if found is None else found.content(),
            None if isinstance(expected, Exception) else expected.content(),
            f"find({key})",
        )

    @precondition(lambda self: self.factory.durable)
    @rule()
    def reopen(self) -> None:
        """Close the store and open its data again (durable stores only)."""
        self._run(self.store.aclose)
        self.store = self.spec.create()
        self._run(self.store.open)
        _equal(self.portal.call(lambda: self.store.epoch), self.epoch, "epoch after reopen")

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def same_state(self) -> None:
        """View, log, head, horizon, tracking cursors and epoch match the reference."""
        _equal(
            view_content(self._run(self.store.list_resources)),
            view_content(self._run(self.model.list_resources)),
            "view",
        )
        store_events = self._run(read_all, self.store)
        model_events = self._run(read_all, self.model)
        _equal(
            [(e.revision, event_content(e, revision=False)) for e in store_events],
            [(self.revisions[e.revision], event_content(e, revision=False)) for e in model_events],
            "log after the horizon",
        )
        store_head = self._run(self.store.head)
        _equal(store_head, self.revisions[self._run(self.model.head)], "head")
        horizon = self._run(self.store.horizon)
        if horizon > store_head:
            _fail(f"horizon {horizon} is past head {store_head}")
        _equal(
            max(m for m, s in self.revisions.items() if s <= horizon),
            self._run(self.model.horizon),
            f"reference revision at the store's horizon {horizon}",
        )
        for origin in _ORIGINS:
            _equal(
                self._run(self.store.tracking, origin),
                self._run(self.model.tracking, origin),
                f"tracking({origin!r})",
            )
        _equal(self.portal.call(lambda: self.store.epoch), self.epoch, "epoch")


def run_store_model(factory: StoreFactory, *, settings: Settings | None = None) -> None:
    """Run :class:`StoreModel` against the stores *factory* makes.

    Args:
        factory: makes the store under test.
        settings: Hypothesis settings (default: the current profile).

    Raises:
        AssertionError: the store disagreed with the reference (Hypothesis
            reports the shrunk sequence of steps).
    """
    # Hypothesis accepts any zero-argument callable here, though it annotates a class.
    make = cast("type[RuleBasedStateMachine]", lambda: StoreModel(factory))
    run_state_machine_as_test(make, settings=settings)
