"""MemoryTransport: the reference model of the Transport contract, in one process.

Sessions are pairs of anyio memory object streams, one per direction, with a
bounded buffer: a sender that runs ahead of its receiver waits, as over a real
network. Tests can also play the failures a network produces: refuse connections
(the global is down) and sever sessions (the connection is cut mid-stream).
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import TYPE_CHECKING, Final, final

import anyio
import anyio.lowlevel
import attrs
from anyio.abc import TaskGroup

from kds.errors import ConnectError, FrameTooLargeError, SessionClosedError, TransportError
from kds.transport import DEFAULT_MAX_FRAME_SIZE, PeerInfo, Session, SessionHandler, Transport

if TYPE_CHECKING:
    from anyio.abc import TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["DEFAULT_BUFFER_SIZE", "MemorySession", "MemoryTransport"]

logger = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE: Final = 16  # frames buffered per direction before send() waits

# The anyio stream errors that mean "this end or the other end was closed"; which one
# the caller sees is decided by the session's own state, not by which stream noticed.
_STREAM_ENDED: Final = (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError)


@attrs.define(eq=False)
class _Link:
    """What both ends of one session share: whether the connection was lost."""

    lost: str | None = None
    ends: list[MemorySession] = attrs.Factory(list)

    def sever(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        for end in self.ends:
            end._close_streams()

    @property
    def open(self) -> bool:
        # Once either end closed, what it sent is already on its way (as after a TCP
        # FIN): a later network cut cannot take it back, so there is nothing to sever.
        return self.lost is None and all(end._reason is None for end in self.ends)


@final
class MemorySession(Session):
    """One end of a :class:`MemoryTransport` session; made by the transport, not by hand.

    Frames are buffered per direction, up to the transport's ``buffer_size``;
    :meth:`send` waits while the peer's buffer is full.
    """

    def __init__(
        self,
        link: _Link,
        peer: PeerInfo,
        max_frame_size: int,
        send_stream: MemoryObjectSendStream[bytes],
        receive_stream: MemoryObjectReceiveStream[bytes],
    ) -> None:
        self._link = link
        self._peer = peer
        self._max_frame_size = max_frame_size
        self._send_stream = send_stream
        self._receive_stream = receive_stream
        self._reason: str | None = None  # set by aclose(): this end was closed locally
        self._other: MemorySession | None = None
        link.ends.append(self)

    @property
    def peer(self) -> PeerInfo:
        """The other end: the global for a zone, the dialling zone for the global."""
        return self._peer

    @property
    def max_frame_size(self) -> int:
        """The transport's frame size limit, in bytes."""
        return self._max_frame_size

    def _error(self) -> SessionClosedError:
        if self._reason is not None:
            return SessionClosedError(self._reason, by_peer=False)
        if self._link.lost is not None:
            return SessionClosedError(f"connection lost: {self._link.lost}", by_peer=True)
        # Our streams only end without a local close or a loss when the peer closed.
        other = self._other
        reason = other._reason if other is not None and other._reason is not None else ""
        return SessionClosedError(reason, by_peer=True)

    def _ended(self) -> bool:
        return self._reason is not None or self._link.lost is not None

    async def send(self, frame: bytes) -> None:
        """Send *frame*; see :meth:`kds.Session.send`."""
        if len(frame) > self._max_frame_size:
            raise FrameTooLargeError(len(frame), self._max_frame_size)
        if self._ended():
            await anyio.lowlevel.checkpoint()
            raise self._error()
        try:
            # A copy, so that a caller reusing a bytearray cannot change a frame in flight.
            await self._send_stream.send(bytes(frame))
        except _STREAM_ENDED:
            raise self._error() from None

    async def receive(self) -> bytes:
        """Receive the next frame; see :meth:`kds.Session.receive`."""
        if self._ended():
            await anyio.lowlevel.checkpoint()
            raise self._error()
        try:
            frame = await self._receive_stream.receive()
        except _STREAM_ENDED:
            raise self._error() from None
        # A lost connection drops what was in flight, even a frame already handed to
        # this receive but not returned yet.
        if self._link.lost is not None:
            raise self._error()
        return frame

    async def aclose(self, reason: str = "") -> None:
        """Close this end; see :meth:`kds.Session.aclose`."""
        self.close(reason)

    def close(self, reason: str = "") -> None:
        """Close this end without waiting (:meth:`aclose` for synchronous callers)."""
        if self._reason is not None:
            return
        self._reason = reason
        # Closing our sending stream lets the peer drain what is buffered and then see
        # the end; closing our receiving stream fails the peer's pending and later sends.
        self._close_streams()

    def sever(self, reason: str = "network cut") -> None:
        """Cut the connection abruptly, as a network failure would.

        Both ends' :meth:`send` and :meth:`receive` raise
        :class:`~kds.errors.SessionClosedError` at once with ``by_peer=True`` and a
        reason starting ``"connection lost: "``; frames in flight are dropped.
        """
        self._link.sever(reason)

    def _close_streams(self) -> None:
        self._send_stream.close()
        self._receive_stream.close()


@attrs.define(eq=False)
class _Hub:
    """The in-memory "network": one listener and the sessions dialled to it."""

    name: str
    max_frame_size: int
    buffer_size: int
    server: TaskGroup | None = None
    handler: SessionHandler | None = None
    refusal: str | None = None
    links: list[_Link] = attrs.Factory(list)
    counter: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))

    @property
    def address(self) -> str:
        return f"memory://{self.name}"


@final
class MemoryTransport(Transport):
    """In-process reference implementation of :class:`~kds.Transport`.

    One instance is both the listener and the address zones dial:
    ``await task_group.start(transport.serve, handler)`` on the global side,
    ``await transport.connect()`` on the zone side. It authenticates nothing;
    :meth:`with_identity` gives a view of the same transport whose sessions
    present a verified identity, as a transport with client certificates would.

    Args:
        name: names the address (``memory://<name>``), for logs and errors.
        max_frame_size: the frame size limit of every session, in bytes.
        buffer_size: frames buffered per direction before :meth:`MemorySession.send`
            waits (backpressure).

    Raises:
        ValueError: *max_frame_size* is below 1 or *buffer_size* is negative (0
            means every send waits for a matching receive).
    """

    def __init__(
        self,
        *,
        name: str = "global",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ) -> None:
        if max_frame_size < 1:
            raise ValueError(f"max_frame_size must be >= 1, got {max_frame_size}")
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {buffer_size}")
        self._hub = _Hub(name, max_frame_size, buffer_size)
        self._identity: str | None = None

    @property
    def address(self) -> str:
        """The address zones dial: ``memory://<name>``."""
        return self._hub.address

    def with_identity(self, identity: str | None) -> MemoryTransport:
        """A view of this transport whose sessions present *identity* to the global.

        The view shares the listener, refusals and sessions of this transport; the
        global sees ``session.peer.identity == identity`` on sessions it dials.
        """
        view = copy.copy(self)
        view._identity = identity
        return view

    async def connect(self) -> MemorySession:
        """Open a session to the listener; see :meth:`kds.Transport.connect`.

        Raises:
            ConnectError: nothing is serving, or :meth:`refuse_connections` is in effect.
        """
        await anyio.lowlevel.checkpoint()
        hub = self._hub
        if hub.refusal is not None:
            raise ConnectError(hub.address, hub.refusal)
        if hub.server is None or hub.handler is None:
            raise ConnectError(hub.address, "connection refused: nothing is serving")
        number = next(hub.counter)
        to_global_send, to_global_receive = anyio.create_memory_object_stream[bytes](
            hub.buffer_size
        )
        to_zone_send, to_zone_receive = anyio.create_memory_object_stream[bytes](hub.buffer_size)
        link = _Link()
        zone_end = MemorySession(
            link, PeerInfo(address=hub.address), hub.max_frame_size, to_global_send, to_zone_receive
        )
        global_end = MemorySession(
            link,
            PeerInfo(address=f"{hub.address}/client-{number}", identity=self._identity),
            hub.max_frame_size,
            to_zone_send,
            to_global_receive,
        )
        zone_end._other, global_end._other = global_end, zone_end
        hub.links = [existing for existing in hub.links if existing.open]
        hub.links.append(link)
        hub.server.start_soon(_run_handler, hub.handler, global_end)
        return zone_end

    async def serve(
        self,
        handler: SessionHandler,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run *handler* for each session dialled; see :meth:`kds.Transport.serve`.

        Reports ``memory://<name>`` through *task_status*.

        Raises:
            TransportError: this transport is already being served.
        """
        hub = self._hub
        if hub.server is not None:
            raise TransportError(f"{hub.address} is already being served")
        async with anyio.create_task_group() as task_group:
            hub.server, hub.handler = task_group, handler
            try:
                task_status.started(hub.address)
                await anyio.sleep_forever()
            finally:
                hub.server = hub.handler = None

    def refuse_connections(self, reason: str = "connection refused: global is down") -> None:
        """Make :meth:`connect` raise :class:`~kds.errors.ConnectError` with *reason*.

        Sessions already open are not affected; :meth:`sever_all` cuts those.
        """
        self._hub.refusal = reason

    def accept_connections(self) -> None:
        """Undo :meth:`refuse_connections`."""
        self._hub.refusal = None

    def sever_all(self, reason: str = "network cut") -> int:
        """Sever every session neither end has closed (see :meth:`MemorySession.sever`).

        Returns:
            How many sessions were severed.
        """
        links = [link for link in self._hub.links if link.open]
        self._hub.links.clear()
        for link in links:
            link.sever(reason)
        return len(links)


async def _run_handler(handler: SessionHandler, session: MemorySession) -> None:
    reason = "server stopped"
    try:
        await handler(session)
        reason = ""
    except Exception:
        # One session's failure must not take the listener (and every other zone) down.
        logger.exception("session handler for %s failed", session.peer.address)
        reason = "session handler failed"
    finally:
        session.close(reason)
