"""The Store contract: a durable, totally ordered event log plus the current view.

Every backend (memory, SQLite, Postgres, Kubernetes) implements :class:`Store` and
passes the conformance suite in ``tests/property`` (reusable from
:mod:`kds.testing`). Replication is built on exactly these promises:

* a commit is atomic: all of its changes and its tracking cursor, or nothing;
* every change that takes effect becomes one event with a *revision*; revisions
  are strictly increasing in commit order (not necessarily dense), so a follower
  that has seen revision *r* has seen every event numbered below *r*;
* a log has an *epoch*; a cursor ``(epoch, revision)`` is only meaningful in its
  own epoch;
* history may be compacted up to a *horizon*; the view is never compacted.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self

import attrs
import msgpack

from kds.catalog import DEFAULT_CATALOG
from kds.errors import (
    CompactedError,
    ConflictError,
    CursorAheadError,
    EpochMismatchError,
    ValidationError,
)
from kds.resource import Catalog, Resource, ResourceKey, validate_labels

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "MUST_NOT_EXIST",
    "Atomicity",
    "Change",
    "Cursor",
    "Delete",
    "Deleted",
    "Event",
    "PreparedChange",
    "Snapshot",
    "Store",
    "StoredVersion",
    "Tracking",
    "Upsert",
    "Upserted",
    "check_expected",
    "check_read_args",
    "matches",
    "unpack_mapping",
]

MUST_NOT_EXIST: Final = 0
"""An ``expected_version`` meaning "the resource must not exist yet".

Stored versions start at 1, so 0 can never match a stored resource."""

DEFAULT_READ_LIMIT: Final = 1000  # events per read() call


class Atomicity(enum.Enum):
    """What a store promises about a commit that fails part-way (a declared capability).

    The conformance suite checks each store against the promise it declares.
    """

    TRANSACTION = "transaction"
    """All of a commit's changes and its tracking cursor take effect, or none does
    (SQLite, PostgreSQL, memory)."""

    ORDERED_PREFIX = "ordered-prefix"
    """A commit refused at its start (validation, an expected version, the tracking
    rule, a missing resource) writes nothing, as with TRANSACTION. Past that, changes
    are written one at a time, in order, and the tracking cursor last; a commit
    interrupted half-way (a crash, a lost connection, a concurrent writer) leaves a
    prefix of its changes applied and the cursor unmoved. Replication stays
    exactly-once in effect: the cursor did not move, so the batch is applied again,
    and what was already applied is identical and writes nothing (Kubernetes, which
    has no multi-object transactions)."""


def _check_expected_version(value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValidationError("expected_version", f"must be an int or None, got {value!r}")
    if value is not None and value < 0:
        raise ValidationError("expected_version", f"must not be negative, got {value}")


@attrs.frozen(kw_only=True)
class Upsert:
    """Create or replace the resource at *key*.

    Attributes:
        key: the resource to write.
        labels: its labels (replaces all previous labels).
        spec: its spec (replaces the previous spec).
        expected_version: ``None`` writes unconditionally; :data:`MUST_NOT_EXIST`
            requires that the resource does not exist; ``n`` requires stored version ``n``.
    """

    key: ResourceKey
    labels: Mapping[str, str] = attrs.field(factory=dict)
    spec: Mapping[str, Any] = attrs.field(factory=dict)
    expected_version: int | None = None


@attrs.frozen(kw_only=True)
class Delete:
    """Delete the resource at *key*.

    Attributes:
        key: the resource to delete.
        expected_version: ``None`` deletes whatever version is stored; ``n`` requires
            stored version ``n``; :data:`MUST_NOT_EXIST` requires that it is already
            gone (a no-op then).
        missing_ok: when the resource does not exist, do nothing instead of raising
            :class:`~kds.errors.NotFoundError`.
    """

    key: ResourceKey
    expected_version: int | None = None
    missing_ok: bool = False


Change = Upsert | Delete
"""One element of a commit."""


@attrs.frozen(kw_only=True)
class Upserted:
    """Event: a resource was created or changed; *resource* is its new state."""

    revision: int
    resource: Resource

    @property
    def key(self) -> ResourceKey:
        """The key of the resource that changed."""
        return self.resource.key


@attrs.frozen(kw_only=True)
class Deleted:
    """Event: a resource was deleted.

    Attributes:
        revision: the event's position in the log.
        key: the deleted resource.
        version: the version it had when it was deleted.
        labels: the labels it had, so consumers can filter deletions as they filter
            upserts (by origin, zone, ...) without keeping a copy of the view.
    """

    revision: int
    key: ResourceKey
    version: int
    labels: Mapping[str, str]


Event = Upserted | Deleted
"""An entry of a store's log."""


@attrs.frozen(order=True)
class Cursor:
    """A position in one specific log: its epoch and a revision in it.

    Revision 0 is "before the first event".
    """

    epoch: str
    revision: int


@attrs.frozen
class Tracking:
    """A consumer's position in another store's log, committed with the changes it applied.

    Attributes:
        origin: names the log being consumed (for example ``"global"`` or a zone name).
        cursor: the position in that log up to which changes are now applied.
    """

    origin: str
    cursor: Cursor


@attrs.frozen(kw_only=True)
class Snapshot:
    """The view at one revision: exactly the resources that existed after it.

    Attributes:
        cursor: the store's epoch and the revision the view corresponds to.
        resources: the resources, sorted by key.
    """

    cursor: Cursor
    resources: Sequence[Resource]


@attrs.frozen
class StoredVersion:
    """What a conditional writer needs to know about a stored resource: no spec.

    Attributes:
        version: the stored version (an ``expected_version`` that matches it).
        labels: the stored labels (who the resource belongs to).
    """

    version: int
    labels: Mapping[str, str]


@attrs.frozen
class PreparedChange:
    """A validated change with its labels and spec already encoded.

    Backends receive these from :meth:`Store.commit`, so that validation and
    encoding are identical everywhere. An upsert whose encoded labels and spec are
    byte-identical to the stored ones changes nothing and emits no event.

    Attributes:
        change: the caller's change.
        labels_blob: msgpack of the labels (``None`` for deletes).
        spec_blob: msgpack of the spec (``None`` for deletes).
    """

    change: Change
    labels_blob: bytes | None
    spec_blob: bytes | None


_packers = threading.local()


def _pack(field: str, value: Mapping[str, Any], *, check_decodable: bool) -> bytes:
    # A Packer costs more to create than to use; one per thread (a store belongs to
    # one event loop, but different stores may run in different threads).
    packer: msgpack.Packer | None = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    try:
        blob: bytes = packer.pack(value)
        if check_decodable:
            # Some values encode but cannot be decoded again (a nested map with
            # integer keys): refuse them here instead of storing what no reader can
            # load. Labels are validated as str -> str, so they need no such check.
            unpack_mapping(blob)
    except (TypeError, ValueError, OverflowError) as exc:
        # A failed pack leaves partial output in the packer's buffer.
        packer.reset()
        raise ValidationError(field, f"cannot be encoded as msgpack: {exc}") from exc
    return blob


def unpack_mapping(blob: bytes) -> dict[str, Any]:
    """Decode labels or a spec written by :meth:`Store.commit` (backends use this)."""
    value: dict[str, Any] = msgpack.unpackb(blob, raw=False)
    return value


def check_expected(key: ResourceKey, expected: int | None, actual: int) -> None:
    """Raise :class:`ConflictError` unless *expected* allows stored version *actual*.

    *actual* is 0 when the resource does not exist. Shared by every backend so
    that conflicts read alike.
    """
    if expected is None or expected == actual:
        return
    if expected == 0:
        message = f"{key} already exists at version {actual}; expected it not to exist"
    elif actual == 0:
        message = f"{key} does not exist; expected version {expected}"
    else:
        message = f"{key} is at version {actual}; expected version {expected}"
    raise ConflictError(message, key=key, expected=expected, actual=actual)


def check_read_args(after: int, limit: int) -> None:
    """Raise :class:`ValueError` for a negative *after* or a *limit* below 1."""
    if after < 0:
        raise ValueError(f"after must be >= 0, got {after}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")


def matches(
    resource: Resource,
    type_name: str | None,
    mesh: str | None,
    labels: Mapping[str, str] | None,
) -> bool:
    """True when *resource* passes the filters of :meth:`Store.list_resources`."""
    key = resource.key
    if type_name is not None and key.type != type_name:
        return False
    if mesh is not None and key.mesh != mesh:
        return False
    return labels is None or all(resource.labels.get(k) == v for k, v in labels.items())


class Store(ABC):
    """Durable, totally ordered log of resource events plus the current view.

    Use a store as an async context manager (``async with SQLiteStore(path) as
    store``), or call :meth:`open` and :meth:`aclose`. Every method may raise
    :class:`~kds.errors.StoreClosedError` when the store is not open and
    :class:`~kds.errors.StoreUnavailableError` when the backend cannot be reached;
    after the latter, the operation may be retried.

    Cancellation: cancelling a read (``get``, ``list_resources``, ``snapshot``,
    ``read``, ``head``, ``horizon``, ``tracking``, ``wait_for_commit``) leaves the store
    unchanged and usable. Cancelling :meth:`commit` or :meth:`compact` leaves the
    operation either fully done or not done at all; see each method.

    Implementations must pass the conformance suite (:mod:`kds.testing`).
    Implementations override the abstract methods; :meth:`commit`, :meth:`follow`
    and :meth:`check_cursor` are shared so every backend validates and follows
    alike.

    Args:
        catalog: the resource types this store accepts.
    """

    atomicity: ClassVar[Atomicity] = Atomicity.TRANSACTION
    """What a commit that fails part-way leaves behind (see :class:`Atomicity`)."""

    def __init__(self, *, catalog: Catalog = DEFAULT_CATALOG) -> None:
        self.catalog = catalog

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- lifecycle -----------------------------------------------------------------

    @abstractmethod
    async def open(self) -> None:
        """Connect, create or migrate the schema, and load the epoch.

        A new, empty store gets a fresh random epoch. Opening an open store does
        nothing.

        Raises:
            StoreUnavailableError: the backend cannot be reached.
            ConfigError: the store's settings are wrong, or its schema is newer than
                this code understands.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Release every connection. Idempotent; never raises.

        Followers blocked in :meth:`follow` end with
        :class:`~kds.errors.StoreClosedError`.
        """

    @property
    @abstractmethod
    def epoch(self) -> str:
        """This log's identity: fixed for the life of the stored data.

        Raises:
            StoreClosedError: the store is not open.
        """

    # -- writes --------------------------------------------------------------------

    async def commit(self, changes: Sequence[Change], *, tracking: Tracking | None = None) -> int:
        """Atomically apply *changes* in order, and record *tracking*, or do nothing.

        Changes apply in sequence, so a later change of the same key sees the
        earlier one. Each change that takes effect bumps that resource's version
        and emits one event; revisions follow the order of *changes*. An upsert
        identical to the stored resource (same encoded labels and spec) and a
        ``missing_ok`` delete of a missing resource take no effect.

        Args:
            changes: upserts and deletes; may be empty when only *tracking* moves.
            tracking: a consumer cursor to record in the same transaction. It must
                be past the cursor stored for its origin if that has the same epoch.

        Returns:
            The revision of the last event written, or the current head when no
            change took effect.

        Raises:
            ValidationError: a change is malformed (unknown type, wrong scope, bad
                labels, a spec the type's validator refuses, or not msgpack-able).
                Nothing was written.
            ConflictError: an expected version did not match, or *tracking* is not
                past the stored cursor of its origin. Nothing was written.
            NotFoundError: a delete without ``missing_ok`` named a missing resource.
                Nothing was written.
            StoreUnavailableError: the outcome is unknown: the commit happened
                completely or not at all.

        Cancellation: like :class:`~kds.errors.StoreUnavailableError` -- the commit
        happened completely or not at all; read it back (or read the tracking
        cursor) to find out.
        """
        prepared = [self._prepare(index, change) for index, change in enumerate(changes)]
        if tracking is not None:
            self._check_tracking(tracking)
        return await self._commit_prepared(prepared, tracking)

    def _prepare(self, index: int, change: Change) -> PreparedChange:
        try:
            if isinstance(change, Upsert):
                resource_type = self.catalog.validate_key(change.key)
                validate_labels(change.labels)
                resource_type.validate_spec(change.spec)
                _check_expected_version(change.expected_version)
                return PreparedChange(
                    change,
                    _pack("labels", change.labels, check_decodable=False),
                    _pack("spec", change.spec, check_decodable=True),
                )
            if isinstance(change, Delete):
                self.catalog.validate_key(change.key)
                _check_expected_version(change.expected_version)
                return PreparedChange(change, None, None)
        except ValidationError as exc:
            raise ValidationError(f"changes[{index}].{exc.field}", exc.reason) from exc
        raise ValidationError(
            f"changes[{index}]", f"must be an Upsert or a Delete, got {type(change).__name__}"
        )

    @staticmethod
    def _check_tracking(tracking: Tracking) -> None:
        # Typed as str/int, but callers may pass anything: check what is really there.
        origin: object = tracking.origin
        epoch: object = tracking.cursor.epoch
        revision: object = tracking.cursor.revision
        if not isinstance(origin, str) or not origin:
            raise ValidationError("tracking.origin", "must be a non-empty string")
        if not isinstance(epoch, str) or not epoch:
            raise ValidationError("tracking.cursor.epoch", "must be a non-empty string")
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise ValidationError("tracking.cursor.revision", "must be an int >= 0")

    @staticmethod
    def tracking_conflict(tracking: Tracking, stored: Cursor | None) -> ConflictError | None:
        """Return the error for recording *tracking* over *stored*, or ``None`` if allowed.

        Backends call this inside their transaction so the rule is the same
        everywhere: within one epoch a tracking cursor only moves forward, so
        replaying an applied batch is refused instead of applied twice; a new
        epoch (the consumed log was replaced) may start anywhere.
        """
        if stored is None or stored.epoch != tracking.cursor.epoch:
            return None
        if tracking.cursor.revision > stored.revision:
            return None
        return ConflictError(
            f"tracking cursor for {tracking.origin!r} is already at revision "
            f"{stored.revision} of epoch {stored.epoch!r}; refusing to record "
            f"revision {tracking.cursor.revision} again"
        )

    @abstractmethod
    async def _commit_prepared(
        self, changes: Sequence[PreparedChange], tracking: Tracking | None
    ) -> int:
        """Apply validated *changes* atomically; see :meth:`commit`."""

    async def delete_labelled(self, labels: Mapping[str, str], *, attempts: int = 10) -> int:
        """Delete every resource that carries all of *labels*, in one commit.

        The cascade a zone's removal needs (``kuma.io/zone=<name>`` across every
        type): one transaction, one batch of delete events. Each delete expects the
        version just listed, so a resource changed meanwhile makes the commit fail
        as a whole and the listing is taken again, up to *attempts* times.

        Args:
            labels: the labels to match; at least one (an empty filter would match
                every resource).
            attempts: listings to try before giving up on a store that keeps changing.

        Returns:
            The revision of the last delete event, or the head when nothing matched.

        Raises:
            ValueError: *labels* is empty.
            ConflictError: the matching resources kept changing for *attempts* tries.
        """
        if not labels:
            raise ValueError("labels must not be empty: that would delete every resource")
        for _ in range(attempts):
            deletes = [
                Delete(key=resource.key, expected_version=resource.version)
                for resource in await self.list_resources(labels=labels)
            ]
            try:
                return await self.commit(deletes)
            except ConflictError:
                continue  # changed under us: list again
        raise ConflictError(
            f"{self}: resources labelled {dict(labels)!r} kept changing; "
            f"gave up after {attempts} attempts"
        )

    @abstractmethod
    async def compact(self, through: int) -> None:
        """Drop the events with revision <= *through*; the view is unchanged.

        Afterwards the horizon is at least *through*. Compacting below the current
        horizon does nothing.

        Raises:
            ValueError: *through* is negative or past the head.

        Cancellation: the compaction happened completely or not at all; either way
        the view and the events after the horizon are intact.
        """

    # -- reads ---------------------------------------------------------------------

    @abstractmethod
    async def head(self) -> int:
        """The revision of the last committed event (0 for a new store).

        Compaction never lowers it.
        """

    @abstractmethod
    async def horizon(self) -> int:
        """The lowest revision a reader may continue after (0 until compaction)."""

    async def cursor(self) -> Cursor:
        """The current head as a cursor of this store's epoch."""
        return Cursor(self.epoch, await self.head())

    @abstractmethod
    async def get(self, key: ResourceKey) -> Resource:
        """Return the stored resource at *key*.

        Raises:
            NotFoundError: there is none.
        """

    async def find(self, key: ResourceKey) -> Resource | None:
        """Return the stored resource at *key*, or ``None``."""
        with contextlib.suppress(LookupError):
            return await self.get(key)
        return None

    async def find_many(self, keys: Collection[ResourceKey]) -> dict[ResourceKey, Resource]:
        """Return the stored resources at *keys* (missing keys are absent from the result).

        All from one consistent read where the backend allows; backends override
        this default (one :meth:`find` per key) with a single query.
        """
        found: dict[ResourceKey, Resource] = {}
        for key in keys:
            resource = await self.find(key)
            if resource is not None:
                found[key] = resource
        return found

    async def find_versions(
        self, keys: Collection[ResourceKey]
    ) -> dict[ResourceKey, StoredVersion]:
        """Return the version and labels stored at *keys* (missing keys are absent).

        :meth:`find_many` without the specs, for callers that only check before a
        conditional write (replication resolves every received batch this way):
        backends override it with a query that neither reads nor decodes specs.
        """
        found = await self.find_many(keys)
        return {key: StoredVersion(r.version, r.labels) for key, r in found.items()}

    @abstractmethod
    async def list_resources(
        self,
        type_name: str | None = None,
        *,
        mesh: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Resource]:
        """Return the stored resources that match every filter given, sorted by key.

        Args:
            type_name: only resources of this type.
            mesh: only resources in this mesh.
            labels: only resources carrying all of these labels with these values.
        """

    @abstractmethod
    async def snapshot(self, types: Collection[str] | None = None) -> Snapshot:
        """Return the view (of *types*, or of all types) consistent with one revision.

        The snapshot's cursor revision is the head at the moment it was taken:
        replaying events after it onto the snapshot yields every later view.
        """

    @abstractmethod
    async def read(self, after: int, *, limit: int = DEFAULT_READ_LIMIT) -> list[Event]:
        """Return up to *limit* committed events with revision > *after*, in order.

        Returns an empty list when *after* is at or past the head.

        Raises:
            CompactedError: *after* is below the horizon.
            ValueError: *after* is negative or *limit* is below 1.
        """

    @abstractmethod
    async def tracking(self, origin: str) -> Cursor | None:
        """Return the tracking cursor last committed for *origin*, or ``None``."""

    @abstractmethod
    async def wait_for_commit(self, after: int) -> None:
        """Return soon after the head may have moved past *after*.

        Returns at once if it already has. May return early (a spurious wake-up
        costs one empty :meth:`read`), but never later than the backend's polling
        interval after a commit by another process.

        Raises:
            StoreClosedError: the store was closed while waiting.
        """

    async def check_cursor(self, cursor: Cursor) -> None:
        """Check that a reader may continue after *cursor* in this log.

        Raises:
            EpochMismatchError: *cursor* belongs to another log.
            CursorAheadError: *cursor* is ahead of this log's head (the data was
                restored from an older copy); a subclass of EpochMismatchError.
            CompactedError: *cursor* is below the horizon.
        """
        if cursor.epoch != self.epoch:
            raise EpochMismatchError(self.epoch, cursor.epoch)
        head = await self.head()
        if cursor.revision > head:
            raise CursorAheadError(self.epoch, cursor.revision, head)
        horizon = await self.horizon()
        if cursor.revision < horizon:
            raise CompactedError(cursor.revision, horizon)

    async def follow(
        self, after: int | Cursor, *, batch_size: int = DEFAULT_READ_LIMIT
    ) -> AsyncGenerator[Event, None]:
        """Yield every event after *after*, in order, then wait for and yield new ones.

        Catches up by reading the log, then tails it live; no event is missed or
        repeated across that switch. Never ends on its own: close the iterator
        (``contextlib.aclosing``) or cancel the task to stop.

        Raises:
            EpochMismatchError: *after* is a cursor from another log (see
                :meth:`check_cursor`).
            CompactedError: *after* is below the horizon, now or later (a slow
                follower can be overtaken by compaction).
            StoreClosedError: the store was closed.

        Cancellation: the events already yielded were delivered; resume after the
        last one's revision.
        """
        if isinstance(after, Cursor):
            await self.check_cursor(after)
            position = after.revision
        else:
            position = after
        while True:
            events = await self.read(position, limit=batch_size)
            for event in events:
                yield event
                position = event.revision
            if len(events) < batch_size:
                await self.wait_for_commit(position)
