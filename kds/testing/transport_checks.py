"""Pytest-free conformance checks for :class:`~kds.transport.Transport` backends.

A backend describes how to build its transports with a :class:`TransportFactory`;
each ``check_*`` coroutine takes one, opens the listeners and sessions it needs
through it, exercises one promise of the Transport contract and raises
:class:`AssertionError` (or the unexpected exception) when the transport breaks
it. Checks that take frames accept any frames within the factory's limit (and
reasons, any text), so a backend outside this repository can bind them to
Hypothesis in a few lines (with ``pytest.mark.anyio`` on the asyncio backend)::

    @pytest.fixture(scope="session")
    def my_factory() -> TransportFactory:
        return TransportFactory(name="mine", max_frame_size=2**15, open_transports=...)

    @given(up=st.lists(st.binary()), down=st.lists(st.binary()))
    async def test_order(my_factory, up, down):
        await transport_checks.check_frames_arrive_in_order(my_factory, up, down)

``tests/property/test_transport_conformance.py`` binds every check this way. Two
checks need a way to break a connection, which not every backend has:
:func:`check_severed_session_is_detected` needs :attr:`TransportFactory.sever`
(cutting a session inside the process) and
:func:`check_killed_peer_process_is_detected` needs
:attr:`TransportFactory.open_peer_process` (a peer in a child process, killed
with SIGKILL). They do not apply to a factory without the recipe and are not run
for it.

A factory builds no loop-bound objects until a check opens something, so one
factory serves every test and every Hypothesis example; each example opens its
own listener.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Final, Literal

import anyio
import attrs

from kds.errors import ConnectError, FrameTooLargeError, SessionClosedError
from kds.testing.checks import _check, _equal  # the same assertion helpers
from kds.testing.transport import DEFAULT_BUFFER_SIZE, MemorySession, MemoryTransport
from kds.transport import DEFAULT_MAX_FRAME_SIZE, PeerInfo, Session, SessionHandler, Transport

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream

__all__ = [
    "SIDES",
    "TIMEOUT",
    "PeerProcess",
    "Serving",
    "Side",
    "TransportFactory",
    "TransportPair",
    "check_cancelled_receive_loses_no_frame",
    "check_close_delivers_frames_then_reason",
    "check_close_wakes_blocked_calls",
    "check_concurrent_senders_keep_their_order",
    "check_frames_arrive_in_order",
    "check_killed_peer_process_is_detected",
    "check_oversized_frame_is_refused",
    "check_serve_and_connect",
    "check_sessions_stay_isolated",
    "check_severed_session_is_detected",
    "memory_transport_factory",
    "serve",
]

TIMEOUT: Final = 20.0  # seconds: the deadline for anything a check waits for

Side = Literal["zone", "global"]
"""One end of a session: the zone dials, the global listens."""

SIDES: Final[tuple[Side, Side]] = ("zone", "global")


@attrs.frozen
class TransportPair:
    """A transport listening on an address of its own, and how zones dial it.

    Attributes:
        listener: the global's transport, not served yet; its address is new
            (port 0 for a network transport), so listeners never collide.
        dialler: returns the zone's transport for the address that
            ``listener.serve`` reported.
    """

    listener: Transport
    dialler: Callable[[str], Transport]


@attrs.frozen
class PeerProcess:
    """A working session whose other end runs in a child process.

    Attributes:
        session: this process's end. At least one frame went through it before
            the recipe yielded it, and every frame the child sent was received.
        kill: kills the child at once (SIGKILL): no close, no flush.
    """

    session: Session
    kill: Callable[[], None]


@attrs.frozen(kw_only=True)
class TransportFactory:
    """How to build one backend's transports; what the transport conformance checks take.

    Attributes:
        name: the backend's name, used in test ids.
        max_frame_size: the frame size limit of every session the factory's
            transports open (both ends configured alike).
        open_transports: opens a new :class:`TransportPair` and releases what it
            needed (temporary directories, servers) on exit. Each call is
            isolated from every other.
        loss_timeout: seconds within which a session whose connection was lost
            (:attr:`sever`, :attr:`open_peer_process`) must end; for a network
            transport, its keepalive interval plus timeout, plus some slack.
        sever: cuts the connection under a session, inside this process, as a
            network failure would; ``None`` when the backend cannot.
        open_peer_process: opens a :class:`PeerProcess` whose child runs the
            given side; ``None`` for backends that do not cross processes.
    """

    name: str
    max_frame_size: int
    open_transports: Callable[[], AbstractAsyncContextManager[TransportPair]]
    loss_timeout: float = 5.0
    sever: Callable[[Session], None] | None = None
    open_peer_process: Callable[[Side], AbstractAsyncContextManager[PeerProcess]] | None = None

    @contextlib.asynccontextmanager
    async def serving(self, handler: SessionHandler | None = None) -> AsyncIterator[Serving]:
        """Open a new listener and serve it until the block ends.

        Args:
            handler: runs for each accepted session. By default each session is
                handed to :meth:`Serving.accept` and kept open until the block ends.

        Yields:
            The running listener.
        """
        async with self.open_transports() as transports, serve(transports, handler) as served:
            yield served

    @contextlib.asynccontextmanager
    async def open_session_pair(self) -> AsyncIterator[tuple[Session, Session]]:
        """Open one session on a new listener: yields its ``(zone, global)`` ends.

        Both ends are checked to report :attr:`max_frame_size`. Sessions still
        open when the block ends are closed, and the listener stopped.
        """
        async with self.serving() as served:
            zone, global_ = await served.connect_pair()
            for side, session in (("zone", zone), ("global", global_)):
                _equal(session.max_frame_size, self.max_frame_size, f"{side} max_frame_size")
            yield zone, global_


class Serving:
    """A listener being served: the address it reported and the sessions it accepted."""

    def __init__(
        self, address: str, dialler: Transport, accepted: MemoryObjectReceiveStream[Session]
    ) -> None:
        self.address = address
        """The address ``serve`` reported."""
        self.dialler = dialler
        """The zone's transport for :attr:`address`."""
        self._accepted = accepted
        self._zones: list[Session] = []

    async def connect(self) -> Session:
        """Dial the listener: the zone's end of a new session, closed when serving ends."""
        with _within(TIMEOUT, "connect()"):
            session = await self.dialler.connect()
        self._zones.append(session)
        return session

    async def accept(self) -> Session:
        """The global's end of the next session (with the default handler only)."""
        with _within(TIMEOUT, "the listener handing over an accepted session"):
            return await self._accepted.receive()

    async def connect_pair(self) -> tuple[Session, Session]:
        """Dial and accept one session: its ``(zone, global)`` ends.

        Only pairs ends correctly when no other connection is being made.
        """
        zone = await self.connect()
        return zone, await self.accept()

    async def _close_zones(self) -> None:
        with anyio.CancelScope(shield=True), _within(TIMEOUT, "closing the zones' sessions"):
            async with anyio.create_task_group() as group:
                for session in self._zones:
                    group.start_soon(session.aclose, "the check is over")


@contextlib.asynccontextmanager
async def serve(
    transports: TransportPair, handler: SessionHandler | None = None
) -> AsyncIterator[Serving]:
    """Serve ``transports.listener`` until the block ends; see :meth:`TransportFactory.serving`.

    Checks that ``serve`` reports a non-empty address. On exit, closes the zone
    sessions :meth:`Serving.connect` opened, then stops the listener (which
    closes the global's sessions).
    """
    send, receive = anyio.create_memory_object_stream[Session](math.inf)

    async def hand_over(session: Session) -> None:
        send.send_nowait(session)
        await anyio.sleep_forever()  # the check owns the session until serving ends

    with send, receive:
        async with anyio.create_task_group() as group:
            with _within(TIMEOUT, "serve() reporting readiness"):
                address: object = await group.start(transports.listener.serve, handler or hand_over)
            if not isinstance(address, str) or not address:
                raise AssertionError(f"serve() must report a non-empty address, not {address!r}")
            served = Serving(address, transports.dialler(address), receive)
            try:
                yield served
            finally:
                await served._close_zones()
                group.cancel_scope.cancel()


def memory_transport_factory(
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
) -> TransportFactory:
    """The :class:`TransportFactory` of :class:`~kds.testing.MemoryTransport`.

    Each listener is a new transport with a name of its own; :attr:`~TransportFactory.sever`
    is :meth:`MemorySession.sever`. It has no peer process: the transport does not
    cross processes.

    Args:
        max_frame_size: the transports' frame size limit, in bytes.
        buffer_size: frames buffered per direction before ``send`` waits.
    """
    numbers = itertools.count(1)

    @contextlib.asynccontextmanager
    async def open_transports() -> AsyncIterator[TransportPair]:
        transport = MemoryTransport(
            name=f"conformance-{next(numbers)}",
            max_frame_size=max_frame_size,
            buffer_size=buffer_size,
        )

        def dialler(address: str) -> Transport:
            # One instance is both ends; the address must still be the one it has.
            _equal(address, transport.address, "the address serve() reported")
            return transport

        yield TransportPair(transport, dialler)

    def sever(session: Session) -> None:
        if not isinstance(session, MemorySession):
            raise TypeError(f"not a MemorySession: {session!r}")
        session.sever("severed by the conformance check")

    return TransportFactory(
        name="memory",
        max_frame_size=max_frame_size,
        open_transports=open_transports,
        sever=sever,
    )


# -- helpers ------------------------------------------------------------------------


@contextlib.contextmanager
def _within(seconds: float, what: str) -> Iterator[None]:
    """A deadline whose failure says what was being waited for."""
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise AssertionError(f"{what}: still waiting after {seconds} s") from None


def _other(side: Side) -> Side:
    return "global" if side == "zone" else "zone"


def _describe(frames: Sequence[bytes]) -> list[str]:
    """Frames as short descriptions: failure messages of megabytes help nobody."""
    return [f"{len(frame)}B:{frame[:8].hex()}" for frame in frames]


def _same_frames(actual: Sequence[bytes], expected: Sequence[bytes], what: str) -> None:
    if list(actual) == list(expected):
        return
    first = next(
        (
            index
            for index, (got, wanted) in enumerate(zip(actual, expected, strict=False))
            if got != wanted
        ),
        min(len(actual), len(expected)),
    )
    raise AssertionError(
        f"{what}: {len(actual)} frames received, {len(expected)} sent; first difference "
        f"at index {first}:\n  got:      {_describe(actual[first : first + 3])}\n"
        f"  expected: {_describe(expected[first : first + 3])}"
    )


async def _expect_closed(
    operation: Callable[[], Awaitable[object]], what: str, *, within: float = TIMEOUT
) -> SessionClosedError:
    """The SessionClosedError that awaiting ``operation()`` raises, within *within* seconds."""
    try:
        with _within(within, what):
            result = await operation()
    except SessionClosedError as exc:
        return exc
    shown = _describe([result]) if isinstance(result, bytes) else repr(result)
    raise AssertionError(f"{what}: expected SessionClosedError, got {shown}")


def _check_closed(error: SessionClosedError, *, by_peer: bool, reason: str, what: str) -> None:
    _equal((error.by_peer, error.reason), (by_peer, reason), f"{what}: (by_peer, reason)")


async def _send_all(session: Session, frames: Sequence[bytes]) -> None:
    for frame in frames:
        await session.send(frame)


def _end_marker(frames: Iterable[bytes]) -> bytes:
    """A frame unlike any of *frames*, sent after them.

    Receiving it means every frame sent before it has arrived or never will, so a
    lost frame shows at once as a difference instead of as a receive that waits.
    """
    taken = set(frames)
    return next(
        marker
        for marker in (f"end of frames {number}".encode() for number in itertools.count())
        if marker not in taken
    )


async def _receive_until(session: Session, marker: bytes, into: list[bytes]) -> None:
    while (frame := await session.receive()) != marker:
        _check(type(frame) is bytes, f"receive() must return bytes, returned {type(frame)}")
        into.append(frame)


async def _receive_until_closed(session: Session) -> tuple[list[bytes], SessionClosedError]:
    """Iterate *session* to its end: the frames, then the error that ended the iteration."""
    frames: list[bytes] = []
    try:
        async for frame in session:
            frames.append(frame)  # noqa: PERF401 -- iterating the session is what is checked
    except SessionClosedError as exc:
        return frames, exc
    raise AssertionError("iterating a session stopped without SessionClosedError")


# -- frames -------------------------------------------------------------------------


async def check_frames_arrive_in_order(
    factory: TransportFactory, up: Sequence[bytes], down: Sequence[bytes]
) -> None:
    """Frames arrive in order, whole, each exactly once, in both directions at once.

    The zone sends *up* while the global sends *down*, each side receiving
    concurrently; frames may be empty or exactly :attr:`~TransportFactory.max_frame_size`
    long. The session then closes cleanly: the global sees the zone's close,
    ``by_peer``, with its reason.
    """
    marker = _end_marker([*up, *down])
    async with factory.open_session_pair() as (zone, global_):
        received_up: list[bytes] = []
        received_down: list[bytes] = []
        with _within(TIMEOUT, f"{len(up)} frames up and {len(down)} down"):
            async with anyio.create_task_group() as group:
                group.start_soon(_send_all, zone, [*up, marker])
                group.start_soon(_send_all, global_, [*down, marker])
                group.start_soon(_receive_until, global_, marker, received_up)
                group.start_soon(_receive_until, zone, marker, received_down)
        _same_frames(received_up, up, "zone to global")
        _same_frames(received_down, down, "global to zone")
        await zone.aclose("done")
        error = await _expect_closed(global_.receive, "the global's receive after the close")
        _check_closed(error, by_peer=True, reason="done", what="the global after the zone's close")


async def check_oversized_frame_is_refused(
    factory: TransportFactory, side: Side, excess: int
) -> None:
    """A frame over the limit is refused, never sent, and leaves the session usable.

    *side* sends a frame *excess* bytes over the limit: :meth:`~kds.Session.send`
    raises :class:`~kds.errors.FrameTooLargeError` with the frame's size and the
    limit (both named in its message). The peer's next frame is the one sent
    after it; frames still flow both ways, and the session then closes cleanly.
    """
    _check(excess >= 1, f"excess must be >= 1, got {excess}")
    limit = factory.max_frame_size
    size = limit + excess
    async with factory.open_session_pair() as (zone, global_):
        sender, peer = (zone, global_) if side == "zone" else (global_, zone)
        try:
            with _within(TIMEOUT, "send() of an oversized frame"):
                await sender.send(b"\xee" * size)
        except FrameTooLargeError as exc:
            _equal((exc.size, exc.limit), (size, limit), "FrameTooLargeError (size, limit)")
            _check(
                str(size) in str(exc) and str(limit) in str(exc),
                f"FrameTooLargeError must name both sizes: {exc}",
            )
        else:
            raise AssertionError(f"send() of {size} bytes over a {limit}-byte limit returned")
        await sender.send(b"after")
        await peer.send(b"back")
        with _within(TIMEOUT, "frames after the refused one"):
            _equal(await peer.receive(), b"after", f"the {_other(side)}'s next frame")
            _equal(await sender.receive(), b"back", f"the {side}'s next frame")
        await sender.aclose("done")
        error = await _expect_closed(peer.receive, "the peer's receive after the close")
        _check_closed(error, by_peer=True, reason="done", what=f"the {_other(side)}")


async def check_concurrent_senders_keep_their_order(
    factory: TransportFactory, senders: int = 4, frames: int = 50
) -> None:
    """Several tasks sending on one session at once: each task's frames stay in its order.

    The contract leaves the interleaving of concurrent senders open, not the
    order of one task's frames, and nothing may be lost or duplicated. Both
    sides send this way at the same time.
    """
    marker = _end_marker([])

    def frames_of(side: Side, sender: int) -> list[bytes]:
        return [f"{side}/{sender}/{index}".encode() for index in range(frames)]

    async def send_from_tasks(session: Session, side: Side) -> None:
        async with anyio.create_task_group() as group:
            for sender in range(senders):
                group.start_soon(_send_all, session, frames_of(side, sender))
        await session.send(marker)

    async with factory.open_session_pair() as (zone, global_):
        outcome: dict[Side, list[bytes]] = {"zone": [], "global": []}
        with _within(TIMEOUT, f"{senders} concurrent senders on each side"):
            async with anyio.create_task_group() as group:
                group.start_soon(send_from_tasks, zone, "zone")
                group.start_soon(send_from_tasks, global_, "global")
                group.start_soon(_receive_until, global_, marker, outcome["zone"])
                group.start_soon(_receive_until, zone, marker, outcome["global"])
        for side in SIDES:
            for sender in range(senders):
                prefix = f"{side}/{sender}/".encode()
                own = [frame for frame in outcome[side] if frame.startswith(prefix)]
                _same_frames(own, frames_of(side, sender), f"sender {sender} of the {side}")


# -- closing ------------------------------------------------------------------------


async def check_close_delivers_frames_then_reason(
    factory: TransportFactory, closer: Side, before: Sequence[bytes], reason: str
) -> None:
    """After ``aclose(reason)`` the peer gets the frames sent before it, then the end.

    *closer* sends *before* and closes with *reason* while its peer iterates the
    session: the peer gets exactly *before*, then the iteration ends with
    :class:`~kds.errors.SessionClosedError` (``by_peer=True``, *reason*), as do
    its later receives and sends. On the closing side, send and receive raise
    it with ``by_peer=False`` and *reason*; a second ``aclose`` (with another
    reason) changes nothing, on either side.
    """
    async with factory.open_session_pair() as (zone, global_):
        closing, other = (zone, global_) if closer == "zone" else (global_, zone)
        peer = _other(closer)
        ended: list[tuple[list[bytes], SessionClosedError]] = []

        async def close_after_sending() -> None:
            await _send_all(closing, before)
            await closing.aclose(reason)

        async def drain() -> None:
            ended.append(await _receive_until_closed(other))

        with _within(TIMEOUT, f"{len(before)} frames, then the {closer}'s close"):
            async with anyio.create_task_group() as group:
                group.start_soon(close_after_sending)
                group.start_soon(drain)
        received, error = ended[0]
        _same_frames(received, before, f"frames the {peer} received before the close")
        _check_closed(error, by_peer=True, reason=reason, what=f"the {peer}'s end of iteration")

        await closing.aclose("a second reason")  # idempotent: the first reason stays
        for what, operation in (
            ("receive", other.receive),
            ("send", lambda: other.send(b"late")),
        ):
            error = await _expect_closed(operation, f"the {peer}'s {what} after the close")
            _check_closed(error, by_peer=True, reason=reason, what=f"the {peer}'s {what}")
        for what, operation in (
            ("receive", closing.receive),
            ("send", lambda: closing.send(b"late")),
        ):
            error = await _expect_closed(operation, f"the {closer}'s {what} after its close")
            _check_closed(error, by_peer=False, reason=reason, what=f"the {closer}'s {what}")
        await other.aclose("closing the other end")
        await other.aclose()


async def check_close_wakes_blocked_calls(factory: TransportFactory, closer: Side) -> None:
    """``aclose`` wakes receives and sends blocked on either side at the time.

    First both sides wait in ``receive`` when *closer* closes: its own receive
    raises :class:`~kds.errors.SessionClosedError` with ``by_peer=False`` and the
    reason, the peer's with ``by_peer=True`` and the reason. Then, on a new
    session, *closer* sends until the buffers are full, its peer not reading,
    and closes: its sender is woken with ``by_peer=False`` and the reason, the
    close returns, and the peer, reading at last, gets whole frames and then
    :class:`~kds.errors.SessionClosedError` with ``by_peer=True``.
    """
    peer = _other(closer)
    outcome: dict[Side, SessionClosedError] = {}

    async def expect(side: Side, operation: Callable[[], Awaitable[object]], what: str) -> None:
        outcome[side] = await _expect_closed(operation, f"the {side}'s blocked {what}")

    async with factory.open_session_pair() as (zone, global_):
        ends = {"zone": zone, "global": global_}
        with _within(TIMEOUT, "blocked receives woken by a close"):
            async with anyio.create_task_group() as group:
                for side in SIDES:
                    group.start_soon(expect, side, ends[side].receive, "receive")
                await anyio.wait_all_tasks_blocked()
                _equal(outcome, {}, "receives that returned with nothing sent")
                await ends[closer].aclose("wake up")
        _check_closed(outcome[closer], by_peer=False, reason="wake up", what=f"the {closer}")
        _check_closed(outcome[peer], by_peer=True, reason="wake up", what=f"the {peer}")

    outcome.clear()
    flood = b"\xf1" * factory.max_frame_size

    async def send_forever(session: Session) -> None:
        while True:
            await session.send(flood)

    async with factory.open_session_pair() as (zone, global_):
        closing, other = (zone, global_) if closer == "zone" else (global_, zone)
        with _within(TIMEOUT, f"the {closer}'s blocked send woken by its close"):
            async with anyio.create_task_group() as group:
                group.start_soon(expect, closer, functools.partial(send_forever, closing), "send")
                await anyio.wait_all_tasks_blocked()
                _equal(outcome, {}, "a sender that stopped although nothing was closed")
                await closing.aclose("stop sending")
        error = outcome[closer]
        _check_closed(error, by_peer=False, reason="stop sending", what=f"the {closer}'s send")
        # A close gives up flushing to a peer that does not read (say after a
        # timeout), so only whole frames and a final error are certain here.
        with _within(TIMEOUT, f"the {peer} draining the session"):
            received, error = await _receive_until_closed(other)
        _check(
            all(frame == flood for frame in received),
            f"the {peer} received frames that were never sent: {_describe(received)[:3]}",
        )
        _equal(error.by_peer, True, f"by_peer of the {peer}'s end after the {closer} closed")


async def check_cancelled_receive_loses_no_frame(
    factory: TransportFactory, frames: int = 200, seed: int = 0
) -> None:
    """A cancelled :meth:`~kds.Session.receive` loses no frame.

    A receive waiting on an empty session is cancelled, then a frame is sent:
    the next receive returns it. Then both sides send *frames* frames while the
    other side receives them under deadlines of a few microseconds (random, from
    *seed*), which cancel receives at every stage: every frame arrives, in order.
    """
    rng = random.Random(seed)  # noqa: S311 -- it picks deadlines, not secrets
    async with factory.open_session_pair() as (zone, global_):
        with _within(TIMEOUT, "cancelling a blocked receive"):
            async with anyio.create_task_group() as group:
                group.start_soon(global_.receive)
                await anyio.wait_all_tasks_blocked()
                group.cancel_scope.cancel()
        await zone.send(b"kept")
        with _within(TIMEOUT, "the frame sent after a cancelled receive"):
            _equal(await global_.receive(), b"kept", "the frame after a cancelled receive")

        sent = {side: [f"{side}-{index}".encode() for index in range(frames)] for side in SIDES}
        received: dict[Side, list[bytes]] = {"zone": [], "global": []}
        marker = _end_marker([])

        async def receive_hastily(session: Session, into: list[bytes]) -> None:
            while True:
                with anyio.move_on_after(rng.random() / 2000):
                    frame = await session.receive()
                    if frame == marker:
                        return
                    into.append(frame)

        with _within(TIMEOUT, f"{frames} frames each way under cancelled receives"):
            async with anyio.create_task_group() as group:
                group.start_soon(_send_all, zone, [*sent["zone"], marker])
                group.start_soon(_send_all, global_, [*sent["global"], marker])
                group.start_soon(receive_hastily, global_, received["zone"])
                group.start_soon(receive_hastily, zone, received["global"])
        for side in SIDES:
            _same_frames(received[side], sent[side], f"frames from the {side}")


# -- sessions and listeners ---------------------------------------------------------


async def check_sessions_stay_isolated(
    factory: TransportFactory, sessions: int = 20, frames: int = 20
) -> None:
    """Many sessions at once on one listener: each gets exactly its own frames.

    *sessions* zones dial concurrently; each names itself in its first frame,
    then zone and global exchange *frames* frames naming the zone, in both
    directions at once. The handler then returns, which closes the session:
    each zone receives its frames, then :class:`~kds.errors.SessionClosedError`
    with ``by_peer=True``.
    """
    got_by_global: dict[str, list[bytes]] = {}
    got_by_zone: dict[str, list[bytes]] = {}
    ends: dict[str, SessionClosedError] = {}
    marker = _end_marker([])

    def frames_of(name: str, direction: str) -> list[bytes]:
        return [f"{name}/{direction}/{index}".encode() for index in range(frames)]

    async def handler(session: Session) -> None:
        name = (await session.receive()).decode(errors="replace")
        got: list[bytes] = []
        async with anyio.create_task_group() as group:
            group.start_soon(_send_all, session, frames_of(name, "down"))
            await _receive_until(session, marker, got)
        got_by_global[name] = got

    async def zone(served: Serving, name: str) -> None:
        session = await served.connect()
        await session.send(name.encode())
        async with anyio.create_task_group() as group:
            group.start_soon(_send_all, session, [*frames_of(name, "up"), marker])
            got_by_zone[name], ends[name] = await _receive_until_closed(session)

    names = [f"zone-{number}" for number in range(sessions)]
    async with factory.serving(handler) as served:
        with _within(TIMEOUT, f"{sessions} concurrent sessions"):
            async with anyio.create_task_group() as group:
                for name in names:
                    group.start_soon(zone, served, name)
    for name in names:
        _same_frames(got_by_global.get(name, []), frames_of(name, "up"), f"the global from {name}")
        _same_frames(got_by_zone.get(name, []), frames_of(name, "down"), f"{name} from the global")
        _equal(ends[name].by_peer, True, f"by_peer of {name}'s end after its handler returned")


def _check_peer(peer: object, whose: str) -> None:
    # Typed as object: a third-party session may return anything.
    address: object = getattr(peer, "address", None)
    _check(
        isinstance(peer, PeerInfo) and isinstance(address, str) and bool(address),
        f"{whose} peer must be a PeerInfo with an address: {peer!r}",
    )


async def check_serve_and_connect(factory: TransportFactory) -> None:
    """Listening, dialling and the handler's part in a session's life.

    ``serve`` reports a non-empty address a zone can dial; sessions have a
    :class:`~kds.PeerInfo` with an address on both ends. A handler that returns
    closes its session (the zone first receives what it sent), one that raises
    ends only its own session; stopping ``serve`` ends the remaining sessions
    (``by_peer=True`` on the zone). Dialling the stopped listener raises
    :class:`~kds.errors.ConnectError` with a reason.
    """
    peers: list[PeerInfo] = []

    async def handler(session: Session) -> None:
        peers.append(session.peer)
        command = await session.receive()
        if command == b"return":
            await session.send(command)
            return
        if command == b"raise":
            raise RuntimeError("a handler failing on purpose (conformance check)")
        await session.send(command)
        async for frame in session:
            await session.send(frame)

    async def echo(session: Session, frame: bytes, what: str) -> None:
        await session.send(frame)
        with _within(TIMEOUT, what):
            _equal(await session.receive(), frame, what)

    async with contextlib.AsyncExitStack() as stack:
        transports = await stack.enter_async_context(factory.open_transports())
        async with serve(transports, handler) as served:
            address = served.address
            # Not served.connect(): these sessions must outlive serving.
            zones: list[Session] = []
            for _ in range(3):
                with _within(TIMEOUT, f"connect() to {address}"):
                    zones.append(await transports.dialler(address).connect())
                stack.push_async_callback(zones[-1].aclose)
            returning, raising, staying = zones
            for session in zones:
                _check_peer(session.peer, "the zone's")
            await echo(staying, b"stay", "an echo")
            await echo(returning, b"return", "the frame a handler sent before returning")
            error = await _expect_closed(returning.receive, "after the handler returned")
            _equal(error.by_peer, True, "by_peer after the handler returned")
            await raising.send(b"raise")
            error = await _expect_closed(raising.receive, "after the handler raised")
            _equal(error.by_peer, True, "by_peer after the handler raised")
            await echo(staying, b"still here", "an echo after another session's handler failed")
            _equal(len(peers), 3, "sessions the handler was given")
            for peer in peers:
                _check_peer(peer, "the global's")
        error = await _expect_closed(staying.receive, "a session when serve() stopped")
        _equal(error.by_peer, True, "by_peer of a session whose listener stopped")
        try:
            with _within(TIMEOUT, "connect() to a stopped listener"):
                late = await transports.dialler(address).connect()
        except ConnectError as exc:
            _check(bool(exc.reason), f"ConnectError must say why: {exc!r}")
        else:
            await late.aclose()
            raise AssertionError(f"connect() to the stopped listener at {address} succeeded")


# -- lost connections ---------------------------------------------------------------


async def _check_loss_detected(
    factory: TransportFactory,
    survivors: dict[str, Session],
    cut: Callable[[], None],
) -> None:
    """Cut a connection while *survivors* wait in receive; each must end within loss_timeout."""
    outcome: dict[str, SessionClosedError] = {}
    ended = anyio.Event()

    async def wait_for_the_end(what: str, session: Session) -> None:
        outcome[what] = await _expect_closed(session.receive, what, within=math.inf)
        if len(outcome) == len(survivors):
            ended.set()

    async with anyio.create_task_group() as group:
        for what, session in survivors.items():
            group.start_soon(wait_for_the_end, what, session)
        await anyio.wait_all_tasks_blocked()
        _equal(outcome, {}, "receives that returned before the connection was lost")
        cut()
        # The deadline starts at the cut: it bounds detection, not the set-up.
        with _within(factory.loss_timeout, "detecting the lost connection (loss_timeout)"):
            await ended.wait()
    for what, session in survivors.items():
        error = outcome[what]
        _equal(error.by_peer, True, f"{what}: by_peer")
        _check(bool(error.reason), f"{what}: a lost connection must say why: {error!r}")
        error = await _expect_closed(
            functools.partial(session.send, b"late"), f"{what}: a later send"
        )
        _equal(error.by_peer, True, f"{what}: by_peer of a later send")


async def check_severed_session_is_detected(factory: TransportFactory, side: Side) -> None:
    """A connection cut under a session ends it on both sides, within ``loss_timeout``.

    :attr:`TransportFactory.sever` is applied to *side*'s end while both ends
    wait in ``receive``: both raise :class:`~kds.errors.SessionClosedError` with
    ``by_peer=True`` and a reason, as do later sends.

    Raises:
        ValueError: the factory has no :attr:`~TransportFactory.sever`.
    """
    sever = factory.sever
    if sever is None:
        raise ValueError(f"the {factory.name} factory cannot sever sessions")
    async with factory.open_session_pair() as (zone, global_):
        cut = zone if side == "zone" else global_
        await _check_loss_detected(
            factory,
            {f"the zone (cut on the {side})": zone, f"the global (cut on the {side})": global_},
            lambda: sever(cut),
        )


async def check_killed_peer_process_is_detected(factory: TransportFactory, killed: Side) -> None:
    """A peer process killed with SIGKILL ends the session within ``loss_timeout``.

    The *killed* side runs in a child process (:attr:`TransportFactory.open_peer_process`);
    while this side waits in ``receive``, the child is killed: the receive raises
    :class:`~kds.errors.SessionClosedError` with ``by_peer=True`` and a reason, as
    does a later send.

    Raises:
        ValueError: the factory has no :attr:`~TransportFactory.open_peer_process`.
    """
    open_peer_process = factory.open_peer_process
    if open_peer_process is None:
        raise ValueError(f"the {factory.name} factory does not run peers in other processes")
    async with open_peer_process(killed) as peer:
        try:
            survivor = f"the {_other(killed)} after the {killed}'s process was killed"
            await _check_loss_detected(factory, {survivor: peer.session}, peer.kill)
        finally:
            with anyio.CancelScope(shield=True):
                await peer.session.aclose()
