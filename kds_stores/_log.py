"""The machinery shared by the stores that keep their log as rows of events.

SQLiteStore and PostgresStore store the same things the same way: a view table of
resources (labels and spec as the msgpack blobs :meth:`~kds.Store.commit`
encoded), an event table of one msgpack blob per event, and a tracking table. They
plan a commit in Python with the same rules as :class:`~kds.testing.MemoryStore`,
group concurrent commits into one transaction, decode events and resources with
the same hot loops, and wake followers the same way. Only talking to the database
differs; that is all each backend module holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
import types
from abc import abstractmethod
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar, cast

import anyio
import attrs
import msgpack

from kds.catalog import DEFAULT_CATALOG
from kds.errors import (
    ConfigError,
    NotFoundError,
    StoreClosedError,
    StoreError,
    StoreUnavailableError,
)
from kds.resource import Catalog, Resource, ResourceKey
from kds.store import (
    DEFAULT_READ_LIMIT,
    Cursor,
    Delete,
    Deleted,
    Event,
    Store,
    StoredVersion,
    Upserted,
    check_expected,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence

    from kds.store import PreparedChange, Tracking

MAX_BATCH_CHANGES: Final = 50_000  # changes per group-commit transaction (soft cap)
_RECENT_EVENTS: Final = 4 * DEFAULT_READ_LIMIT  # decoded events of the tail kept for readers

UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND: Final = timedelta(microseconds=1)

DbKey: TypeAlias = tuple[str, str, str]  # (type, mesh or '', name)
Row: TypeAlias = tuple[bytes, bytes, int, int]  # (labels, spec, version, created_at)
EventRow: TypeAlias = tuple[int, bytes]  # (revision, data): a row of `events`
ChangeRow: TypeAlias = tuple[Any, ...]  # a row inserted into `changes`, in column order

# An event's `data` is one msgpack array of eight elements:
#
#     [type, mesh, name, version, created_at, modified_at, labels, spec]
#
# mesh is nil for a global-scoped key; timestamps are integer microseconds UTC.
# A deletion has nil timestamps and a nil spec, and the deleted resource's labels.
# The writer builds it without encoding labels and spec again: it packs the six
# scalars as an array (a one-byte fixarray header, 0x90 | 6), swaps that header for
# one counting eight, and appends the labels and spec blobs that Store.commit
# encoded -- each a complete msgpack value, so the result is one valid array.
EVENT_SCALARS: Final = 6
EVENT_HEADER: Final = bytes((0x90 | (EVENT_SCALARS + 2),))  # fixarray, 8 elements
NIL: Final = b"\xc0"

_Setter: TypeAlias = "Callable[[Any, Any], None]"
_T = TypeVar("_T")

object_new: Final[Callable[[type[Any]], Any]] = object.__new__

unpackb: Final = msgpack.unpackb  # the same decoding as kds.store.unpack_mapping


class Page:
    """Caches shared by the rows of one page of listed resources.

    Decoding dominates reads, and rows of one page repeat themselves: the rows
    of one commit share their timestamps, and many resources carry the same
    labels. Each distinct value is decoded once per page. Labels are handed out as
    copies (they are flat str -> str maps, so a copy is as independent as a fresh
    decode): no two resources share a mutable mapping. Specs are nested, so a copy
    would cost as much as decoding; each is decoded on its own. (Events are decoded
    whole, labels included: see events_decoder.)
    """

    __slots__ = ("_labels", "_moments")

    def __init__(self) -> None:
        self._moments: dict[int, datetime] = {}
        self._labels: dict[bytes, dict[str, str]] = {}

    def moment(self, micros: int) -> datetime:
        moment = self._moments.get(micros)
        if moment is None:
            moment = self._moments[micros] = from_micros(micros)
        return moment

    def labels(self, blob: bytes) -> dict[str, str]:
        labels = self._labels.get(blob)
        if labels is None:
            decoded: dict[str, str] = unpackb(blob)
            self._labels[blob] = decoded
            return decoded
        return dict(labels)


def slot_setters(cls: type, names: tuple[str, ...]) -> tuple[_Setter, ...] | None:
    """The slot setters of attrs class *cls*, if filling them is all its __init__ does.

    That is: its fields are exactly *names*, in order, each a plain slot with no
    validator or converter, and there are no pre/post-init hooks or other slots
    (such as a cached hash). Otherwise ``None``, and callers use the constructor.
    """
    try:
        fields = attrs.fields(cls)
    except (TypeError, attrs.exceptions.NotAnAttrsClassError):
        return None
    if tuple(field.name for field in fields) != names:
        return None
    if any(field.validator is not None or field.converter is not None for field in fields):
        return None
    if hasattr(cls, "__attrs_pre_init__") or hasattr(cls, "__attrs_post_init__"):
        return None
    if set(getattr(cls, "__slots__", ())) - {*names, "__weakref__"}:
        return None
    descriptors = [vars(cls).get(name) for name in names]
    if not all(isinstance(d, types.MemberDescriptorType) for d in descriptors):
        return None
    return tuple(cast("types.MemberDescriptorType", d).__set__ for d in descriptors)


def builder(cls: type[_T], names: tuple[str, ...]) -> Callable[..., _T]:
    """A constructor of *cls* taking its fields *names* positionally.

    It fills the slots directly when :func:`slot_setters` allows, and is the
    class's own constructor otherwise.
    """
    setters = slot_setters(cls, names)
    if setters is None:
        return lambda *values: cls(**dict(zip(names, values, strict=True)))

    def build(*values: Any) -> _T:
        instance: _T = object_new(cls)
        for set_field, value in zip(setters, values, strict=True):
            set_field(instance, value)
        return instance

    return build


# Reads build hundreds of thousands of these frozen attrs objects. Their generated
# __init__ assigns each field through object.__setattr__ (to get past the frozen
# guard), a large share of a read's cost after decoding. When __init__ does
# nothing but that (checked by slot_setters at import), the builders below fill
# the slots directly and produce the very same objects (same class, equal, same
# hash); otherwise they are the ordinary constructors.
new_key: Final[Callable[[str, str | None, str], ResourceKey]] = builder(
    ResourceKey, ("type", "mesh", "name")
)
new_resource: Final[Callable[..., Resource]] = builder(
    Resource, ("key", "labels", "spec", "version", "created_at", "modified_at")
)
new_upserted: Final[Callable[[int, Resource], Upserted]] = builder(
    Upserted, ("revision", "resource")
)
new_deleted: Final[Callable[[int, ResourceKey, int, Mapping[str, str]], Deleted]] = builder(
    Deleted, ("revision", "key", "version", "labels")
)


def chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    """*items* in consecutive slices of at most *size* (for statements with many ``?``)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def to_micros(moment: datetime) -> int:
    return (moment - UNIX_EPOCH) // MICROSECOND


def from_micros(micros: int) -> datetime:
    return UNIX_EPOCH + timedelta(microseconds=micros)


def events_decoder() -> Callable[[Iterable[EventRow]], list[Event]]:
    """The hot loop of every follower: event rows to events.

    One msgpack call decodes a whole event (see EVENT_HEADER), so each event gets
    labels and spec of its own. The timestamps of one commit are shared by all its
    events and converted once per call. When the builders above can fill slots
    directly, the loop does that itself for upserts (saving three calls per event);
    otherwise it calls the builders, which are then the constructors.
    """
    key_setters = slot_setters(ResourceKey, ("type", "mesh", "name"))
    resource_setters = slot_setters(
        Resource, ("key", "labels", "spec", "version", "created_at", "modified_at")
    )
    upserted_setters = slot_setters(Upserted, ("revision", "resource"))
    if key_setters is None or resource_setters is None or upserted_setters is None:

        def decode_with_builders(rows: Iterable[EventRow]) -> list[Event]:
            page = Page()
            moment = page.moment
            events: list[Event] = []
            append = events.append
            for revision, data in rows:
                type_name, mesh, name, version, created, modified, labels, spec = unpackb(data)
                key = new_key(type_name, mesh, name)
                if spec is None:
                    append(new_deleted(revision, key, version, labels))
                    continue
                resource = new_resource(
                    key, labels, spec, version, moment(created), moment(modified)
                )
                append(new_upserted(revision, resource))
            return events

        return decode_with_builders

    set_type, set_mesh, set_name = key_setters
    set_key, set_labels, set_spec, set_version, set_created, set_modified = resource_setters
    set_revision, set_resource = upserted_setters
    new = object_new
    unpack = unpackb
    to_moment = from_micros
    deleted_event = new_deleted

    def decode(rows: Iterable[EventRow]) -> list[Event]:
        moments: dict[int, datetime] = {}
        events: list[Event] = []
        append = events.append
        for revision, data in rows:
            type_name, mesh, name, version, created, modified, labels, spec = unpack(data)
            key = new(ResourceKey)
            set_type(key, type_name)
            set_mesh(key, mesh)
            set_name(key, name)
            if spec is None:
                append(deleted_event(revision, key, version, labels))
                continue
            created_at = moments.get(created)
            if created_at is None:
                created_at = moments[created] = to_moment(created)
            modified_at = moments.get(modified)
            if modified_at is None:
                modified_at = moments[modified] = to_moment(modified)
            resource = new(Resource)
            set_key(resource, key)
            set_labels(resource, labels)
            set_spec(resource, spec)
            set_version(resource, version)
            set_created(resource, created_at)
            set_modified(resource, modified_at)
            event = new(Upserted)
            set_revision(event, revision)
            set_resource(event, resource)
            append(event)
        return events

    return decode


decode_events: Final = events_decoder()


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector while a page of events is built.

    A page allocates thousands of container objects (events, keys, resources and
    every dict and list of every spec), none of them garbage, and each 700
    allocations would otherwise start a collection that walks them again: a third
    of read time in the benchmark. Pausing for one page (bounded by the read
    limit) defers that work to a single collection afterwards, the remedy
    msgpack's documentation gives for bulk unpacking. A collector the application
    has disabled stays disabled.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def text_to_db(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def text_from_db(blob: bytes) -> str:
    return blob.decode("utf-8", "surrogatepass")


def cursor_from_db(epoch: bytes, revision: int | str) -> Cursor:
    return Cursor(text_from_db(epoch), int(revision))


def db_key(key: ResourceKey) -> DbKey | None:
    """The stored form of *key*, or ``None`` when no stored resource can have it."""
    type_name, mesh, name = key.type, key.mesh, key.name
    if mesh is None:
        mesh = ""
    elif mesh == "":
        return None  # '' stands for "no mesh" in the database
    if type(type_name) is not str or type(mesh) is not str or type(name) is not str:
        return None
    # Stored names are validated printable (ResourceKey.validate): a name with a
    # NUL or a lone surrogate, which a database may not even accept as text, cannot
    # match one.
    if not (type_name.isprintable() and name.isprintable() and (not mesh or mesh.isprintable())):
        return None
    return (type_name, mesh, name)


class RolledBackRequest(Exception):
    """A request's writes failed and were rolled back to its savepoint."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


class Commit:
    """One caller's commit() waiting for the writer task."""

    __slots__ = ("changes", "future", "keys", "tracking")

    def __init__(
        self,
        changes: Sequence[PreparedChange],
        keys: list[DbKey],
        tracking: Tracking | None,
        future: asyncio.Future[int],
    ) -> None:
        self.changes = changes
        self.keys = keys
        self.tracking = tracking
        self.future = future

    def resolve(self, revision: int) -> None:
        if not self.future.done():
            self.future.set_result(revision)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class RecentEvents:
    """The stretch of the log last read, decoded, for every reader of one store.

    A global serving many zones has a reader per zone following the same tail of
    its log: the first to read an event decodes it for all, the others are served
    from here without a query. Holds one contiguous run of revisions, at most
    *capacity* events; events never change once committed, so a run stays valid
    until compaction removes the beginning of the log (see :meth:`forget_through`).
    """

    __slots__ = ("_capacity", "_events", "_floor", "_low")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._events: list[Event] = []
        self._low = 0  # the run holds revisions _low + 1 .. _low + len(_events)
        # Compacted through here: never served again, even by a read that was in
        # flight during the compaction and adds what it read afterwards.
        self._floor = 0

    def get(self, after: int, limit: int, head: int) -> list[Event] | None:
        """Up to *limit* events after *after*, if held, none past *head*; else ``None``.

        *head* is a head known to be committed: the result may stop short of the
        real head (other writers), never go past what was committed.
        """
        start = after - self._low
        if start < 0 or start >= len(self._events) or after >= head or after < self._floor:
            return None
        return self._events[start : start + min(limit, head - after)]

    def add(self, after: int, events: list[Event]) -> None:
        """Remember *events*, read after *after*, if they are the log's next revisions."""
        if not events or events[0].revision != after + 1:
            return
        if events[-1].revision - after != len(events):
            return  # not contiguous (never, as revisions are dense): keep nothing
        held = self._events
        if held and after == self._low + len(held):
            held.extend(events)  # the run continues
        elif not (held and self._low <= after and events[-1].revision <= self._low + len(held)):
            self._events, self._low = list(events), after  # a new run (unless inside this one)
        excess = len(self._events) - self._capacity
        if excess > 0:
            del self._events[:excess]
            self._low += excess

    def forget_through(self, revision: int) -> None:
        """Never serve a read after a revision below *revision* again: compacted away."""
        self._floor = max(self._floor, revision)
        self._events, self._low = [], 0


class LogStore(Store):
    """A :class:`~kds.Store` whose backend holds the view, the log and tracking as rows.

    Subclasses connect to their database and implement the reads, compaction and
    :meth:`_apply_batch`, which writes one batch of queued commits in one
    transaction. This class queues :meth:`~kds.Store.commit` calls for a single
    writer task (group commit), plans each request against the rows the batch read
    (:meth:`_plan`), decodes rows, and wakes :meth:`wait_for_commit` when a head
    is seen to move.

    Args:
        catalog: the resource types this store accepts.
        poll_interval: seconds between checks for commits made elsewhere while
            :meth:`wait_for_commit` waits.

    Raises:
        ConfigError: *poll_interval* is not positive.
    """

    def __init__(self, *, catalog: Catalog = DEFAULT_CATALOG, poll_interval: float) -> None:
        super().__init__(catalog=catalog)
        if not poll_interval > 0:
            raise ConfigError(f"poll_interval must be > 0 seconds, got {poll_interval!r}")
        self._poll_interval = poll_interval
        self._open = False
        self._epoch = ""
        # The highest head this instance has seen committed; only ever a lower bound
        # of the real head (other processes may be ahead), used to wake waiters.
        self._known_head = 0
        # Decoded events of the tail, shared by the readers following it.
        self._recent = RecentEvents(_RECENT_EVENTS)
        # Held by the one reader that fetches the tail for the others (see _read_log).
        self._tail_lock = asyncio.Lock()
        self._changed: anyio.Event | None = None
        # When a waiter last polled the head for commits made elsewhere: one poll per
        # interval serves every waiter (see wait_for_commit).
        self._polled_at = -math.inf
        self._queue: deque[Commit] = deque()
        self._writer_task: asyncio.Task[None] | None = None
        self._write_lock: anyio.Lock | None = None
        # Packs the scalars of every event this instance writes; used only by the
        # writer task (see _plan).
        self._packer = msgpack.Packer(use_bin_type=True)

    @abstractmethod
    async def _apply_batch(self, batch: list[Commit]) -> None:
        """Write *batch* in one transaction; resolve or fail each request after it commits.

        A request whose own plan fails (conflict, not found) fails alone; an error
        raised out of here fails every request of the batch.
        """

    async def _stop_writer(self) -> None:
        """Refuse queued commits, let the batch in flight finish, and wait for the writer.

        Called by ``aclose`` after it marked the store closed (``_open = False``).
        """
        self._wake()  # waiters see the store closed and raise
        while self._queue:
            self._queue.popleft().fail(
                StoreClosedError(f"{self} was closed before this commit started")
            )
        # The writer finishes the batch it is applying (its callers get their real
        # outcome) and stops; a compaction in progress finishes too.
        if self._writer_task is not None:
            await asyncio.wait([self._writer_task])
            self._writer_task = None
        if self._write_lock is not None:
            async with self._write_lock:
                pass

    def _check_open(self) -> None:
        if not self._open:
            raise StoreClosedError(f"{self} is not open")

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _saw_head(self, head: int) -> None:
        """Record a head read from the database; wake waiters if it moved."""
        if head > self._known_head:
            self._known_head = head
            self._wake()

    async def _read_log(
        self, after: int, limit: int, fetch: Callable[[int, int], Awaitable[list[Event]]]
    ) -> list[Event]:
        """:meth:`~kds.Store.read` through the shared tail: *fetch* reads the database.

        A commit wakes every follower of the tail at once (a global's session per
        zone): each would miss the cache and query for the same events. The first
        to miss fetches them while the others wait, and they are served from the
        cache it filled. Readers further back have no one to share with and read
        at once.
        """
        recent = self._recent.get(after, limit, self._known_head)
        if recent is not None:
            return recent
        if after < self._known_head - limit:
            return await fetch(after, limit)
        async with self._tail_lock:
            recent = self._recent.get(after, limit, self._known_head)
            if recent is not None:
                return recent
            return await fetch(after, limit)

    @property
    def epoch(self) -> str:
        self._check_open()
        return self._epoch

    async def _commit_prepared(
        self, changes: Sequence[PreparedChange], tracking: Tracking | None
    ) -> int:
        self._check_open()
        keys: list[DbKey] = []
        for prepared in changes:
            key = prepared.change.key
            mesh = key.mesh
            keys.append((key.type, "" if mesh is None else mesh, key.name))
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append(Commit(changes, keys, tracking, future))
        if self._writer_task is None or self._writer_task.done():
            self._writer_task = asyncio.get_running_loop().create_task(
                self._write_loop(), name=f"{self} writer"
            )
        # Cancelling this await cancels the future: a request the writer has not
        # started yet is then dropped; one it has started commits or not as a whole.
        return await future

    async def _write_loop(self) -> None:
        """Apply queued commits, a batch per transaction, until the queue is empty.

        Requests that arrive while a batch is being written wait for the next
        batch: the busier the store, the more commits share one transaction and
        one fsync.
        """
        assert self._write_lock is not None  # noqa: S101 -- set whenever open
        while self._queue and self._open:
            batch: list[Commit] = []
            size = 0
            while self._queue and (not batch or size < MAX_BATCH_CHANGES):
                request = self._queue.popleft()
                if not request.future.done():  # its caller has given up
                    batch.append(request)
                    size += len(request.changes)
            if not batch:
                continue
            try:
                async with self._write_lock:
                    await self._apply_batch(batch)
            except BaseException as exc:
                # Never leave a caller hanging, whatever went wrong.
                if isinstance(exc, Exception):
                    for request in batch:
                        request.fail(self._batch_error(exc))
                    continue
                # The writer itself is being cancelled (the event loop is shutting
                # down): whatever it took or still holds has an unknown outcome.
                for request in [*batch, *self._queue]:
                    request.fail(StoreUnavailableError(f"{self}: the commit was interrupted"))
                self._queue.clear()
                raise

    def _batch_error(self, exc: Exception) -> StoreError:
        """A fresh error for each caller of a failed batch (tracebacks stay separate)."""
        fresh: StoreError
        if isinstance(exc, StoreUnavailableError):
            fresh = StoreUnavailableError(str(exc))
        elif isinstance(exc, StoreClosedError):
            fresh = StoreClosedError(str(exc))
        elif isinstance(exc, StoreError):
            fresh = StoreError(str(exc))
        else:
            fresh = StoreError(f"{self}: commit failed: {type(exc).__name__}: {exc}")
        fresh.__cause__ = exc
        return fresh

    def _plan(
        self,
        request: Commit,
        rows: Mapping[DbKey, Row | None],
        tracked: Mapping[str, Cursor],
        head: int,
        now: int,
    ) -> tuple[list[ChangeRow], dict[DbKey, Row | None], int]:
        """Apply *request* to the batch's view of the data, in Python.

        The same rules as :class:`~kds.testing.MemoryStore`, in the same order:
        tracking first, then each change against the state the earlier changes
        (of this request and of earlier requests in the batch) left.

        Returns:
            The rows to insert into ``changes``, the request's new row state per key
            (``None`` for deleted), and the revision of its last event (*head* if
            none).

        Raises:
            ConflictError: an expected version or the tracking cursor does not match.
            NotFoundError: a delete without ``missing_ok`` names a missing resource.
        """
        tracking = request.tracking
        if tracking is not None:
            error = self.tracking_conflict(tracking, tracked.get(tracking.origin))
            if error is not None:
                raise error
        local: dict[DbKey, Row | None] = {}
        changes: list[ChangeRow] = []
        append = changes.append
        # Each event's data (see EVENT_HEADER): the packed scalars without their own
        # array header, between the header for eight and the labels and spec blobs.
        pack = self._packer.pack
        join = b"".join
        header = EVENT_HEADER
        revision = head
        for prepared, key in zip(request.changes, request.keys, strict=True):
            change = prepared.change
            row = local[key] if key in local else rows.get(key)
            actual = 0 if row is None else row[2]
            expected = change.expected_version
            if expected is not None and expected != actual:
                check_expected(change.key, expected, actual)
            type_name, mesh, name = key
            if isinstance(change, Delete):
                if row is None:
                    if change.missing_ok or expected == 0:
                        continue
                    raise NotFoundError(change.key)
                local[key] = None
                revision += 1
                scalars = pack((type_name, mesh or None, name, actual, None, None))
                data = join((header, scalars[1:], row[0], NIL))
                append((revision, data, type_name, mesh, name, None, None, None, None, None))
                continue
            labels, spec = prepared.labels_blob, prepared.spec_blob
            if labels is None or spec is None:  # never: Store.commit encodes every upsert
                raise StoreError(f"{self}: an upsert arrived without its encoded form")
            if row is None:
                created = now
            elif row[0] == labels and row[1] == spec:
                continue  # byte-identical: no effect, no event
            else:
                created = row[3]
            version = actual + 1
            local[key] = (labels, spec, version, created)
            revision += 1
            scalars = pack((type_name, mesh or None, name, version, created, now))
            data = join((header, scalars[1:], labels, spec))
            append((revision, data, type_name, mesh, name, labels, spec, version, created, now))
        return changes, local, revision

    @staticmethod
    def _resources(rows: Iterable[tuple[Any, ...]]) -> list[Resource]:
        # The hot loop of every listing; see Page for the shortcuts.
        page = Page()
        moment, labels_of = page.moment, page.labels
        resources: list[Resource] = []
        append = resources.append
        for t, m, n, labels, spec, version, created, modified in rows:
            append(
                new_resource(
                    new_key(t, m or None, n),
                    labels_of(labels),
                    unpackb(spec),
                    version,
                    moment(created),
                    moment(modified),
                )
            )
        return resources

    @staticmethod
    def _versions(rows: Iterable[tuple[Any, ...]]) -> dict[ResourceKey, StoredVersion]:
        """Rows of (type, mesh, name, labels, version) by key: find_versions' result."""
        labels_of = Page().labels
        return {
            new_key(t, m or None, n): StoredVersion(version, labels_of(labels))
            for t, m, n, labels, version in rows
        }

    async def wait_for_commit(self, after: int) -> None:
        self._check_open()
        while self._known_head <= after:
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed
            # Commits through this instance set the event at once; the timeout is
            # only for commits by other processes or instances, found by polling the
            # head: once per interval for all waiters (a global has one per zone).
            due = self._polled_at + self._poll_interval
            with anyio.move_on_after(max(0.0, due - time.monotonic())):
                await changed.wait()
            self._check_open()
            if changed.is_set():
                continue
            now = time.monotonic()
            if now - self._polled_at < self._poll_interval:
                continue  # another waiter polled meanwhile (and woke us all if it moved)
            self._polled_at = now
            try:
                await self.head()  # wakes every waiter of this instance if it moved
            except StoreClosedError:
                raise
            except StoreError:
                return  # a spurious wake-up: the caller's next read reports the problem
