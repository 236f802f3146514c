"""One established session: both replication streams, acknowledgements and heartbeats.

After the handshake, global and zone run the same :class:`Replicator`; what differs
is given to it as two :class:`Direction` objects:

* **outbound**: this side's log, streamed to the peer. It resumes after the cursor
  the peer sent in the handshake when this log can (same epoch, not compacted,
  not ahead), and otherwise sends a *reset*: a consistent snapshot, chunked (the
  sessions of one store that reset at the same time share one snapshot:
  :class:`SharedSnapshots`). Each event is filtered and mapped for the peer
  (:mod:`kds.sync.rules`); events the peer does not get still move its cursor. At
  most ``window`` batches await an acknowledgement.
* **inbound**: the peer's log, applied to this side's store. Every resource is
  validated and checked against what this side lets the peer own; the valid ones
  are committed *together with the tracking cursor*, in one transaction, so a
  crash can neither lose nor repeat a batch; the refused ones are named in a NACK.
  A reset replaces exactly the resources the peer owns here.

Frames are checked by :class:`~kds.protocol.ProtocolChecker` before anything acts
on them: an undecodable or out-of-order frame ends the session with a Goodbye
naming the problem, and never reaches the store.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import attrs

from kds.errors import (
    CompactedError,
    ConfigError,
    ConflictError,
    EpochMismatchError,
    FrameTooLargeError,
    ProtocolError,
    SessionClosedError,
    ValidationError,
)
from kds.protocol import (
    Ack,
    Batch,
    Goodbye,
    GoodbyeCode,
    Nack,
    Ping,
    Pong,
    ProtocolChecker,
    Rejection,
    Reset,
    batch_frames,
    decode_frame,
    encode_frame,
    encode_reset,
    pack_resource,
    reset_frames,
)
from kds.resource import Resource
from kds.store import Cursor, Delete, Snapshot, Tracking, Upsert, Upserted
from kds.transport import DEFAULT_MAX_FRAME_SIZE

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence

    from kds.protocol import Frame
    from kds.resource import Catalog, ResourceKey
    from kds.store import Change, Event, Store
    from kds.transport import Session

__all__ = [
    "Direction",
    "Inbound",
    "Outbound",
    "Replicator",
    "SessionEnded",
    "StreamStats",
    "SyncOptions",
]

logger = logging.getLogger(__name__)

_READ_LIMIT: Final = 1000  # events read from the store per page
_CURSOR_LAG: Final = 10 * _READ_LIMIT
"""Events the peer's cursor may lag behind before a batch that only moves it goes at once.

Otherwise such a batch goes when a heartbeat is due (in the Ping's place): see
:meth:`Replicator._outbound_loop`."""
_CURSOR_EARLY: Final = 0.9
"""Fraction of the heartbeat interval after the peer's cursor last moved at which a
pending move is sent: no later than a Ping would be, so that it takes the Ping's place."""
_INBOX_FRAMES: Final = 16
"""Received frames decoded ahead of the one being applied.

Decoding the next frames while a commit runs in the store's thread keeps both
busy; the bound makes a peer that outpaces this store wait on the transport."""
_APPLY_ATTEMPTS: Final = 20  # tries to apply a batch whose resources are written locally meanwhile


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"sync option {name} must be a number > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class SyncOptions:
    """Timing and flow-control settings of both engines.

    Raises:
        ConfigError: a setting is out of range, naming it.
    """

    heartbeat_interval: float = 5.0
    """Seconds of silence after which a side sends a Ping (the global's value is used)."""
    heartbeat_timeout: float = 15.0
    """Seconds without any frame from the peer after which the session is ended."""
    handshake_timeout: float = 10.0
    """Seconds the zone waits for the Welcome, and the global for the Hello."""
    window: int = 8
    """Batches (and resets) a sender lets await acknowledgement before it waits."""
    reconnect_base: float = 0.5
    """Seconds before a zone's first reconnection attempt; doubles with each failure."""
    reconnect_max: float = 30.0
    """The longest a zone waits between reconnection attempts."""
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest frame this side accepts (announced in Hello/Welcome)."""
    insight_interval: float = 10.0
    """Seconds between the global's updates of a connected zone's ZoneInsight."""

    def __attrs_post_init__(self) -> None:
        for name in (
            "heartbeat_interval",
            "heartbeat_timeout",
            "handshake_timeout",
            "reconnect_base",
            "reconnect_max",
            "insight_interval",
        ):
            _positive(name, getattr(self, name))
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                "sync option heartbeat_timeout must be longer than heartbeat_interval "
                f"({self.heartbeat_timeout} <= {self.heartbeat_interval})"
            )
        window: object = self.window  # typed int, but settings may come from anywhere
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"sync option window must be an integer >= 1, got {self.window!r}")
        if self.max_frame_size < 1024:
            raise ConfigError(
                f"sync option max_frame_size must be at least 1024 bytes, got {self.max_frame_size}"
            )


class SessionEnded(Exception):
    """The session is over; *reason* says why, *code* is the Goodbye code if any.

    Attributes:
        reason: for the logs.
        code: a :class:`~kds.protocol.GoodbyeCode` value, when one was sent or received.
        by_peer: whether the peer (or the network) ended it.
    """

    def __init__(self, reason: str, *, code: str | None = None, by_peer: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.by_peer = by_peer


@attrs.define
class StreamStats:
    """Counters of one session (or, summed, of an engine), per resource type.

    Attributes:
        sent: events and snapshot resources sent, per type.
        acknowledged: of those, the ones the peer applied.
        rejected: of those, the ones the peer refused (NACKed).
        received: events and snapshot resources received, per type.
        refused: of those, the ones this side refused (and NACKed), per type.
        bytes_sent: frame bytes sent, every frame counted (heartbeats too).
        bytes_received: frame bytes received, every frame counted.
        resets_sent: snapshots sent (each counts once, whatever its chunks).
        resets_received: snapshots received and applied.
        batches_received: Batch frames received and applied.
    """

    sent: Counter[str] = attrs.Factory(Counter)
    acknowledged: Counter[str] = attrs.Factory(Counter)
    rejected: Counter[str] = attrs.Factory(Counter)
    received: Counter[str] = attrs.Factory(Counter)
    refused: Counter[str] = attrs.Factory(Counter)
    bytes_sent: int = 0
    bytes_received: int = 0
    resets_sent: int = 0
    resets_received: int = 0
    batches_received: int = 0

    def add(self, other: StreamStats) -> None:
        """Add *other*'s counts to these."""
        self.sent.update(other.sent)
        self.acknowledged.update(other.acknowledged)
        self.rejected.update(other.rejected)
        self.received.update(other.received)
        self.refused.update(other.refused)
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.resets_sent += other.resets_sent
        self.resets_received += other.resets_received
        self.batches_received += other.batches_received


class Outbound(Protocol):
    """How this side's log is offered to the peer."""

    def map_event(self, event: Event) -> Event | None:
        """The event as the peer gets it, or ``None`` when it gets nothing for it."""

    def map_snapshot(self, snapshot: SharedSnapshot) -> Iterable[Resource]:
        """The resources of a consistent snapshot the peer gets, mapped for it.

        May be lazy (a generator): the sender takes them one frame at a time.
        Copies that do not depend on the peer are best made with
        :meth:`SharedSnapshot.copy_of`, once for every session sending it.
        """

    def needs_reset(self, event: Event) -> bool:
        """Whether *event* changes what the peer should have beyond itself (filters moved)."""

    def ends_session(self, event: Event) -> str | None:
        """Why *event* ends the session (the peer was disabled), or ``None``."""

    def snapshot_ends_session(self, resources: Sequence[Resource]) -> str | None:
        """Why a snapshot of this side's store ends the session, or ``None``."""


class Inbound(Protocol):
    """How the peer's log is applied to this side's store."""

    @property
    def origin(self) -> str:
        """The tracking origin under which the peer's cursor is committed."""

    def accept(
        self, key: ResourceKey, labels: Mapping[str, str]
    ) -> tuple[ResourceKey, dict[str, str]]:
        """This side's key and labels for a resource the peer sent.

        Raises:
            ValidationError: the peer may not send it (wrong type, bad key).
        """

    @property
    def owned_labels(self) -> Mapping[str, str]:
        """The labels that mark a resource stored here as the peer's to change and delete.

        A resource is the peer's exactly when it carries all of them: received
        resources are stored with them (see :meth:`accept`), so a reset can list
        what the peer owns with one filtered query.
        """


@attrs.frozen
class Direction:
    """Both directions of a session, from this side's point of view.

    Attributes:
        outbound: what this side sends.
        inbound: how this side applies what it receives.
        peer_cursor: the peer's position in this side's log, from the handshake.
    """

    outbound: Outbound
    inbound: Inbound
    peer_cursor: Cursor | None


class _ResetNeeded(Exception):
    """The outbound stream must start over with a snapshot."""


@attrs.define
class _Pending:
    """A sent batch or snapshot awaiting its ACK/NACK, with what it carried per type."""

    revision: int
    types: Counter[str]


@attrs.define(eq=False)
class SharedSnapshot:
    """A snapshot the sessions of one store share, and what they make of it once for all.

    Each session maps the snapshot for its peer and encodes it. With the copies
    (:meth:`copy_of`) and the encoded rows (:meth:`packed`) kept here, made by the
    first session that needs each, the others only choose theirs and join bytes:
    100 zones cost the global about 30 times what one does, not 100 (and this
    costs about a third of the snapshot's memory more, while it is kept).

    Attributes:
        snapshot: the store's snapshot.
    """

    snapshot: Snapshot
    _users: int = attrs.field(default=0, init=False)
    _taken_at: float = attrs.field(factory=time.monotonic, init=False)
    _copies: dict[int, Resource] = attrs.field(factory=dict, init=False)
    # id() -> (resource, row): the resource is kept so that its id is not reused.
    _rows: dict[int, tuple[Resource, bytes]] = attrs.field(factory=dict, init=False)

    @property
    def cursor(self) -> Cursor:
        """Where the snapshot stands in the store's log."""
        return self.snapshot.cursor

    @property
    def resources(self) -> Sequence[Resource]:
        """The snapshot's resources, in key order."""
        return self.snapshot.resources

    def copy_of(self, index: int, make: Callable[[Resource], Resource]) -> Resource:
        """The copy *make* makes of resource *index*, made once for every session.

        *make* must make the same copy whoever calls it: the part of a mapping that
        does not depend on the peer (which resources it gets is the caller's).
        """
        copy = self._copies.get(index)
        if copy is None:
            copy = self._copies[index] = make(self.snapshot.resources[index])
        return copy

    def packed(self, resource: Resource) -> bytes:
        """*resource* encoded as a Reset frame's row, once for every session.

        Raises:
            ValueError: it cannot be encoded (see :func:`~kds.protocol.pack_resource`).
        """
        entry = self._rows.get(id(resource))
        if entry is None:
            entry = self._rows[id(resource)] = (resource, pack_resource(resource))
        return entry[1]


class SharedSnapshots:
    """Snapshots of one store, shared by the sessions that send one at about the same time.

    When every zone needs a snapshot at once -- the global's store restored from a
    backup (a new epoch), or compacted past their cursors -- sessions reading their
    own would each read, decode, map and encode the whole store, and hold it all
    at once: 100 zones and 100,000 resources would be 100 copies of about 190 MiB.
    A consistent snapshot at revision R is a correct start for any session whose
    stream continues with the events after R, so a session that needs one is given
    the current one when it can be (see :meth:`use`), and a new one is read
    otherwise; sessions that need one while it is being read wait for it.

    The current snapshot is let go when its last user has sent it and it is more
    than *keep_for* seconds old -- by :meth:`run`, which must then run in a task
    for as long as this is used. Keeping it a while serves zones that reconnect
    over the next seconds (as they do after a global restart, each after its own
    backoff) without reading the store again; they then catch up on the events
    since, as a resuming zone does.

    Args:
        store: the store the snapshots are of.
        keep_for: seconds a snapshot nobody uses is kept; 0 lets it go with its
            last user (no :meth:`run` needed).

    Attributes:
        taken: snapshots read from the store.
        shared: times a session was given a snapshot read before it asked.
    """

    def __init__(self, store: Store, *, keep_for: float = 0.0) -> None:
        self._store = store
        self._keep_for = keep_for
        self._lock = anyio.Lock()
        self._current: SharedSnapshot | None = None
        self._changed: anyio.Event | None = None  # created by run() while it waits
        self.taken = 0
        self.shared = 0

    @property
    def current(self) -> SharedSnapshot | None:
        """The snapshot in use or kept, if any: the one :meth:`use` may give next."""
        return self._current

    @contextlib.asynccontextmanager
    async def use(self, at_least: int = 0) -> AsyncIterator[SharedSnapshot]:
        """A consistent snapshot at revision *at_least* or later, held until the block ends.

        The current one is given when it is at *at_least* or later (a session that
        starts over because of the event at revision E must not be given a
        snapshot from before E: it would meet E again), the store's log still goes
        on from it (not compacted past it), and it is in use or at most *keep_for*
        seconds old.

        Raises:
            StoreError: reading the snapshot failed.
        """
        async with self._lock:
            shared = self._current
            if shared is None or not await self._usable(shared, at_least):
                shared = SharedSnapshot(await self._store.snapshot())
                self.taken += 1
                self._current = shared
            else:
                self.shared += 1
            shared._users += 1
        try:
            yield shared
        finally:
            shared._users -= 1
            if shared._users == 0 and self._current is shared:
                if self._expired(shared):
                    self._current = None
                elif self._changed is not None:
                    self._changed.set()  # run() lets it go when it expires

    async def run(self) -> None:
        """Let go of the current snapshot once unused and *keep_for* old; until cancelled."""
        while True:
            shared = self._current
            if shared is not None and not shared._users and self._expired(shared):
                self._current = None
                continue
            self._changed = anyio.Event()
            if shared is None or shared._users:
                await self._changed.wait()  # set when its last user lets go of one
            else:
                with anyio.move_on_after(shared._taken_at + self._keep_for - time.monotonic()):
                    await self._changed.wait()

    def _expired(self, shared: SharedSnapshot) -> bool:
        return time.monotonic() - shared._taken_at >= self._keep_for

    async def _usable(self, shared: SharedSnapshot, at_least: int) -> bool:
        if shared.cursor.revision < at_least:
            return False
        if not shared._users and self._expired(shared):
            return False
        try:
            await self._store.check_cursor(shared.cursor)
        except (EpochMismatchError, CompactedError):
            return False
        return True


class Replicator:
    """Runs both streams of one established session until it ends.

    Args:
        store: this side's store.
        session: the session, after the handshake.
        checker: the session's frame checker, which saw the handshake.
        direction: what flows each way.
        catalog: the types this side validates received resources against.
        options: timing and flow control (heartbeats as agreed in the handshake).
        max_frame_size: the largest frame the peer accepts.
        name: for logs (``"zone-1 <- global"``).
        snapshots: where resets get their snapshots; share one between the
            sessions of one store. Defaults to this session's own.
    """

    def __init__(
        self,
        store: Store,
        session: Session,
        checker: ProtocolChecker,
        direction: Direction,
        *,
        catalog: Catalog,
        options: SyncOptions,
        max_frame_size: int,
        name: str,
        snapshots: SharedSnapshots | None = None,
    ) -> None:
        self._store = store
        self._snapshots = snapshots if snapshots is not None else SharedSnapshots(store)
        self._session = session
        self._checker = checker
        self._direction = direction
        self._catalog = catalog
        self._options = options
        self._frame_limit = min(max_frame_size, session.max_frame_size)
        self._name = name
        # Taken for every frame; uncontended almost always, and _send checkpoints anyway.
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._acked: anyio.Event | None = None  # created by a sender waiting for the window
        self._pending: deque[_Pending] = deque()
        # time.monotonic() rather than anyio.current_time(): read for every frame, and
        # only ever compared with itself.
        self._last_sent = self._last_received = time.monotonic()
        self._batch_sent_at = self._last_sent  # the last Batch or Reset: the peer's cursor moved
        self._nonces = itertools.count(1)
        self._reset_chunks: list[Resource] = []
        self._peer_goodbye: Goodbye | None = None
        # Frames the receive loop decoded, for the apply loop, in order; a
        # SessionEnded last when the session closed under them.
        self._inbox_in, self._inbox_out = anyio.create_memory_object_stream[
            Batch | Reset | Goodbye | SessionEnded
        ](_INBOX_FRAMES)
        self.stats = StreamStats()

    # -- running ---------------------------------------------------------------------

    async def run(self) -> SessionEnded:
        """Replicate until the session ends; return why it ended.

        Raises:
            StoreError: this side's store failed (the session was ended with a
                Goodbye saying so first).
        """
        ended: list[SessionEnded] = []
        failures: list[Exception] = []

        async def guard(task: Any) -> None:
            try:
                await task()
            except SessionEnded as exc:
                ended.append(exc)
            except Exception as exc:  # a store failure, or a bug: reported below
                failures.append(exc)
            group.cancel_scope.cancel()

        async with self._inbox_in, self._inbox_out, anyio.create_task_group() as group:
            group.start_soon(guard, self._receive_loop)
            group.start_soon(guard, self._apply_loop)
            group.start_soon(guard, self._outbound_loop)
            group.start_soon(guard, self._heartbeat_loop)
        if failures:
            # Tell the peer before the session goes; it reconnects with backoff.
            error = failures[0]
            await self._goodbye(GoodbyeCode.INTERNAL_ERROR, f"{type(error).__name__}: {error}")
            raise error
        return ended[0] if ended else SessionEnded("session ended", by_peer=False)

    async def _send(self, frame: Frame, data: bytes | None = None) -> None:
        """Send *frame*, encoded as *data* when the caller encoded it."""
        if data is None:
            data = encode_frame(frame)
        async with self._send_lock:
            if self._checker.ended:
                goodbye = self._peer_goodbye
                if goodbye is not None:
                    # The peer's Goodbye arrived while earlier frames were applied.
                    raise _peer_ended(goodbye)
                # Another task ended the session (a Goodbye went out) meanwhile.
                raise SessionEnded("the session already ended", by_peer=False)
            self._checker.sent(frame)
            try:
                await self._session.send(data)
            except SessionClosedError as exc:
                raise SessionEnded(exc.reason, by_peer=exc.by_peer) from exc
            self._last_sent = time.monotonic()
            self.stats.bytes_sent += len(data)

    async def _goodbye(self, code: GoodbyeCode, reason: str) -> None:
        """Send a Goodbye (best effort) and close the session."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            with contextlib.suppress(Exception):
                await self._send(Goodbye(code=code.value, reason=reason))
            await self._session.aclose(reason)

    async def _fail(self, code: GoodbyeCode, reason: str) -> SessionEnded:
        logger.warning("%s: ending the session (%s): %s", self._name, code.value, reason)
        await self._goodbye(code, reason)
        return SessionEnded(reason, code=code.value, by_peer=False)

    # -- receiving -------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """Receive and check every frame; answer those about the session at once.

        Batches, resets and a Goodbye go to the apply loop, in order: the next
        frames are decoded while one is applied, and heartbeats and acknowledgements
        are handled even while a large snapshot is being committed.
        """
        while True:
            try:
                data = await self._session.receive()
            except SessionClosedError as exc:
                # What arrived before the end is still applied (and not sent again).
                await self._inbox_in.send(SessionEnded(exc.reason, by_peer=exc.by_peer))
                await anyio.sleep_forever()
            self._last_received = time.monotonic()
            self.stats.bytes_received += len(data)
            try:
                frame = decode_frame(data, catalog=self._catalog)
                self._checker.received(frame)
            except ProtocolError as exc:
                raise await self._fail(GoodbyeCode.PROTOCOL_ERROR, str(exc)) from exc
            if isinstance(frame, Goodbye):
                self._peer_goodbye = frame
            if isinstance(frame, Batch | Reset | Goodbye):
                await self._inbox_in.send(frame)
            elif isinstance(frame, Ack | Nack):
                self._acknowledged(frame)
            elif isinstance(frame, Ping):
                await self._send(Pong(nonce=frame.nonce))
            # Pong: its arrival already counted as a sign of life.

    async def _apply_loop(self) -> None:
        """Apply received batches and resets in order, until the session ends."""
        async for item in self._inbox_out:
            if isinstance(item, Batch):
                await self._apply_batch(item)
            elif isinstance(item, Reset):
                await self._apply_reset_chunk(item)
            elif isinstance(item, Goodbye):
                logger.info(
                    "%s: the peer ended the session (%s): %s", self._name, item.code, item.reason
                )
                raise _peer_ended(item)
            else:
                raise item

    def _acknowledged(self, frame: Ack | Nack) -> None:
        pending = self._pending.popleft()
        rejected: Counter[str] = Counter()
        if isinstance(frame, Nack):
            for rejection in frame.rejected:
                rejected[rejection.key.type] += 1
                logger.warning(
                    "%s: the peer refused %s: %s", self._name, rejection.key, rejection.reason
                )
        self.stats.rejected.update(rejected)
        self.stats.acknowledged.update(pending.types - rejected)
        if self._acked is not None:
            self._acked.set()
            self._acked = None

    def _accept(
        self, key: ResourceKey, labels: Mapping[str, str]
    ) -> tuple[ResourceKey, dict[str, str]] | str:
        """This side's key and labels for a received resource, or why it is refused.

        Only what this direction allows is decided here (types, authority); the
        resource itself is validated by the store's commit, once.
        """
        try:
            return self._direction.inbound.accept(key, labels)
        except ValidationError as exc:
            return f"invalid {exc.field}: {exc.reason}"
        except (TypeError, ValueError) as exc:
            return str(exc)

    async def _resolve(
        self, items: Sequence[tuple[ResourceKey, Mapping[str, str]]]
    ) -> list[tuple[ResourceKey, dict[str, str], int] | str]:
        """:meth:`_accept` each item, then refuse those whose key holds what the peer does not own.

        Each accepted item comes with the version stored at its key (0 for none):
        changes are committed expecting exactly that, so a local write between this
        read and the commit is never overwritten -- the batch is resolved again.
        One :meth:`~kds.Store.find_versions` for the whole list.
        """
        accepted = [self._accept(key, labels) for key, labels in items]
        keys = [result[0] for result in accepted if not isinstance(result, str)]
        # A batch that only moves the cursor reads nothing.
        existing = await self._store.find_versions(keys) if keys else {}
        owned = self._direction.inbound.owned_labels.items()
        resolved: list[tuple[ResourceKey, dict[str, str], int] | str] = []
        for result in accepted:
            if isinstance(result, str):
                resolved.append(result)
                continue
            key, labels = result
            stored = existing.get(key)
            if stored is not None and not all(stored.labels.get(k) == v for k, v in owned):
                resolved.append(f"{key} exists here and is not the sender's to change")
            else:
                resolved.append((key, labels, 0 if stored is None else stored.version))
        return resolved

    async def _apply_batch(self, frame: Batch) -> None:
        self.stats.received.update(event.key.type for event in frame.events)
        items = [(event.key, _labels_of(event)) for event in frame.events]
        for _ in range(_APPLY_ATTEMPTS):
            changes: list[Change] = []
            rejected: list[Rejection] = []
            sent_as: dict[ResourceKey, ResourceKey] = {}
            for event, resolved in zip(frame.events, await self._resolve(items), strict=True):
                if isinstance(resolved, str):
                    if isinstance(event, Upserted):
                        rejected.append(Rejection(event.key, resolved))
                    # A deletion of what the peer does not own here: nothing to do.
                    continue
                key, labels, version = resolved
                sent_as[key] = event.key
                if isinstance(event, Upserted):
                    change = Upsert(
                        key=key, labels=labels, spec=event.resource.spec, expected_version=version
                    )
                    changes.append(change)
                else:
                    # Version 0 expects nothing there: a no-op then, and a conflict
                    # (so a fresh read) if something was written locally meanwhile.
                    # Kept even then: it is the key's last change in this batch.
                    changes.append(Delete(key=key, expected_version=version))
            cursor = Cursor(frame.epoch, frame.revision)
            if await self._commit(changes, cursor, rejected, sent_as):
                break
        else:
            raise ConflictError(f"{self._name}: resources kept changing under a received batch")
        self.stats.batches_received += 1
        await self._acknowledge(frame.revision, rejected)

    async def _commit(
        self,
        changes: Sequence[Change],
        cursor: Cursor,
        rejected: list[Rejection],
        sent_as: Mapping[ResourceKey, ResourceKey],
    ) -> bool:
        """Apply *changes* with the tracking cursor, all or nothing; False to resolve again.

        A change the store refuses as invalid is taken out, reported in *rejected*
        (under the key the peer sent, from *sent_as*), and the rest committed. A
        resource changed since it was read (a local write) makes this return False
        with nothing written.
        """
        tracking = Tracking(self._direction.inbound.origin, cursor)
        remaining = _last_change_per_key(changes)
        while True:
            try:
                await self._store.commit(remaining, tracking=tracking)
            except ConflictError as exc:
                if exc.key is not None:
                    return False  # written locally meanwhile: read again
                # The cursor is already there: this very batch was applied (a retry
                # after an unknown outcome). Applying it again would repeat it.
                stored = await self._store.tracking(tracking.origin)
                if stored is None or stored.epoch != cursor.epoch:
                    raise
                if stored.revision < cursor.revision:
                    raise
                return True
            except ValidationError as exc:
                index = _failed_change(exc, len(remaining))
                if index is None:
                    raise
                refused = remaining.pop(index)
                field = exc.field.partition(".")[2] or "resource"
                reason = f"invalid {field}: {exc.reason}"
                rejected.append(Rejection(sent_as.get(refused.key, refused.key), reason))
                continue
            return True

    async def _acknowledge(self, revision: int, rejected: Sequence[Rejection]) -> None:
        if rejected:
            unique = _unique(rejected)
            self.stats.refused.update(rejection.key.type for rejection in unique)
            for rejection in unique:
                logger.warning("%s: refused %s: %s", self._name, rejection.key, rejection.reason)
            await self._send(Nack(revision=revision, rejected=tuple(unique)))
        else:
            await self._send(Ack(revision=revision))

    async def _apply_reset_chunk(self, frame: Reset) -> None:
        self._reset_chunks.extend(frame.resources)
        if not frame.final:
            return
        resources, self._reset_chunks = self._reset_chunks, []
        inbound = self._direction.inbound
        self.stats.received.update(resource.key.type for resource in resources)
        items = [(r.key, r.labels) for r in resources]
        for _ in range(_APPLY_ATTEMPTS):
            desired: dict[ResourceKey, Upsert] = {}
            rejected: list[Rejection] = []
            sent_as: dict[ResourceKey, ResourceKey] = {}
            for resource, resolved in zip(resources, await self._resolve(items), strict=True):
                if isinstance(resolved, str):
                    rejected.append(Rejection(resource.key, resolved))
                    continue
                key, labels, version = resolved
                sent_as[key] = resource.key
                desired[key] = Upsert(
                    key=key, labels=labels, spec=resource.spec, expected_version=version
                )
            # Replace exactly what the peer owns here: delete what it no longer has.
            changes: list[Change] = [
                Delete(key=resource.key, expected_version=resource.version)
                for resource in await self._store.list_resources(labels=inbound.owned_labels)
                if resource.key not in desired
            ]
            changes.extend(desired.values())
            cursor = Cursor(frame.epoch, frame.revision)
            if await self._commit(changes, cursor, rejected, sent_as):
                break
        else:
            raise ConflictError(f"{self._name}: resources kept changing under a snapshot")
        self.stats.resets_received += 1
        logger.info(
            "%s: applied a snapshot of %d resources at revision %d",
            self._name,
            len(desired),
            frame.revision,
        )
        await self._acknowledge(frame.revision, rejected)

    # -- sending ---------------------------------------------------------------------

    async def _outbound_loop(self) -> None:
        store = self._store
        outbound = self._direction.outbound
        position = await self._start()
        sent_position = position
        # Whether the last read reached the head: then wait for a commit rather than
        # read an empty page (with every session of a global doing so after each
        # change, those reads would cost more than the change).
        caught_up = False
        while True:
            if caught_up:
                if position > sent_position:
                    # Caught up after events the peer does not get: its cursor (what
                    # it resumes from) lags. Move it with one empty batch at most once
                    # per heartbeat interval (in an idle session, in the Ping's place)
                    # -- not after every such event. Each empty batch costs the peer a
                    # commit, and such events come from every side: a zone applying
                    # the global's batches logs copies it never sends back, and every
                    # ZoneInsight refresh on the global is an event no zone gets.
                    # Moved at once, a global with N zones would commit N cursors per
                    # change it sends. A lagging cursor only makes a reconnect re-read
                    # (and skip) those events.
                    interval = self._options.heartbeat_interval
                    due = self._batch_sent_at + _CURSOR_EARLY * interval
                    with anyio.move_on_after(max(0.0, due - time.monotonic())) as wait:
                        await store.wait_for_commit(position)
                    if wait.cancelled_caught:
                        await self._send_batches([], position)
                        sent_position = position
                        continue  # still caught up
                else:
                    await store.wait_for_commit(position)
                caught_up = False
            try:
                events = await store.read(position, limit=_READ_LIMIT)
            except CompactedError:
                position = sent_position = await self._send_reset()
                continue
            if not events:
                caught_up = True
                continue
            for event in events:
                reason = outbound.ends_session(event)
                if reason is not None:
                    raise await self._fail(GoodbyeCode.ZONE_DISABLED, reason)
            if any(outbound.needs_reset(event) for event in events):
                # From a snapshot that has these events: one from before them would
                # meet them again.
                position = sent_position = await self._send_reset(events[-1].revision)
                continue
            mapped = [m for m in map(outbound.map_event, events) if m is not None]
            position = events[-1].revision
            if mapped or position - sent_position >= _CURSOR_LAG:
                await self._send_batches(mapped, position)
                sent_position = position
            caught_up = len(events) < _READ_LIMIT

    async def _start(self) -> int:
        """Where the outbound stream starts: after the peer's cursor, or after a reset."""
        cursor = self._direction.peer_cursor
        if cursor is not None:
            try:
                await self._store.check_cursor(cursor)
            except (EpochMismatchError, CompactedError) as exc:
                logger.info(
                    "%s: cannot resume after %s (%s): sending a snapshot", self._name, cursor, exc
                )
            else:
                return cursor.revision
        return await self._send_reset()

    async def _wait_for_window(self) -> None:
        while len(self._pending) >= self._options.window:
            if self._acked is None:
                self._acked = anyio.Event()
            await self._acked.wait()

    async def _send_batches(self, events: Sequence[Event], revision: int) -> None:
        try:
            frames = batch_frames(
                self._store.epoch, events, max_frame_size=self._frame_limit, revision=revision
            )
        except FrameTooLargeError as exc:
            raise await self._fail(GoodbyeCode.INTERNAL_ERROR, str(exc)) from exc
        for frame in frames:
            await self._wait_for_window()
            types = Counter(event.key.type for event in frame.events)
            self._pending.append(_Pending(frame.revision, types))
            self.stats.sent.update(types)
            await self._send(frame)
            self._batch_sent_at = time.monotonic()

    async def _send_reset(self, at_least: int = 0) -> int:
        """Send a snapshot at revision *at_least* or later; return its revision."""
        outbound = self._direction.outbound
        async with self._snapshots.use(at_least) as shared:
            reason = outbound.snapshot_ends_session(shared.resources)
            if reason is not None:
                raise await self._fail(GoodbyeCode.ZONE_DISABLED, reason)
            revision = shared.cursor.revision
            # Mapped and framed a frame at a time: this session holds one frame of
            # its own, whatever the snapshot's size. The rows are encoded once, for
            # every session sharing the snapshot.
            frames = reset_frames(
                shared.cursor.epoch,
                revision,
                outbound.map_snapshot(shared),
                max_frame_size=self._frame_limit,
                packed=shared.packed,
            )
            await self._wait_for_window()
            # Filled in as frames go: no ACK can come before the final one.
            pending = _Pending(revision, Counter())
            self._pending.append(pending)
            try:
                for frame in frames:
                    types = Counter(resource.key.type for resource in frame.resources)
                    pending.types.update(types)
                    self.stats.sent.update(types)
                    await self._send(frame, encode_reset(frame, shared.packed))
            except FrameTooLargeError as exc:
                # The peer drops the chunks it got: it applies a snapshot only whole.
                raise await self._fail(GoodbyeCode.INTERNAL_ERROR, str(exc)) from exc
        self.stats.resets_sent += 1
        self._batch_sent_at = time.monotonic()
        return revision

    # -- heartbeats ------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self._options.heartbeat_interval
        timeout = self._options.heartbeat_timeout
        while True:
            now = time.monotonic()
            silent = now - self._last_received
            if silent > timeout:
                raise await self._fail(
                    GoodbyeCode.HEARTBEAT_TIMEOUT,
                    f"nothing received for {silent:.1f}s (timeout {timeout}s)",
                )
            if now - self._last_sent >= interval:
                await self._send(Ping(nonce=next(self._nonces)))
            wake = min(self._last_sent + interval, self._last_received + timeout)
            await anyio.sleep(max(0.0, wake - time.monotonic()) + 0.001)


def _peer_ended(goodbye: Goodbye) -> SessionEnded:
    return SessionEnded(goodbye.reason, code=goodbye.code, by_peer=True)


def _labels_of(event: Event) -> Mapping[str, str]:
    return event.resource.labels if isinstance(event, Upserted) else event.labels


_CHANGE_INDEX: Final = re.compile(r"changes\[(\d+)\]")


def _failed_change(error: ValidationError, count: int) -> int | None:
    """The index of the change *error* is about (``changes[3].spec``), if it names one."""
    match = _CHANGE_INDEX.match(error.field)
    if match is None:
        return None
    index = int(match.group(1))
    return index if index < count else None


def _last_change_per_key(changes: Iterable[Change]) -> list[Change]:
    """*changes* keeping, for each key, only its last change (where it was last)."""
    last: dict[ResourceKey, Change] = {}
    for change in changes:
        last.pop(change.key, None)
        last[change.key] = change
    return list(last.values())


def _unique(rejections: Iterable[Rejection]) -> list[Rejection]:
    seen: set[ResourceKey] = set()
    unique = []
    for rejection in rejections:
        if rejection.key not in seen:
            seen.add(rejection.key)
            unique.append(rejection)
    return unique
