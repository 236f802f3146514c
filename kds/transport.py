"""The Transport contract: authenticated, ordered, reliable sessions of opaque frames.

A zone control plane always dials; the global control plane always listens. A
:class:`Transport` gives the zone a :class:`Session` from :meth:`Transport.connect`
and hands each accepted session to a handler on the global in
:meth:`Transport.serve`. A session carries byte frames in both directions: in
order, without loss or duplication, each delivered whole. Transports never look
inside frames; :mod:`kds.protocol` does all encoding.

Every backend (memory, gRPC, NATS) implements these two classes and passes the same
conformance checks. What the engine relies on:

* frames arrive in the order they were sent, each exactly once, until the session
  ends; a frame larger than :attr:`Session.max_frame_size` is refused by
  :meth:`Session.send` and never sent;
* a session never ends silently: once it has ended, :meth:`Session.send` and
  :meth:`Session.receive` raise :class:`~kds.errors.SessionClosedError`, which
  says who ended it and why; frames the peer sent before closing are received
  first;
* a cancelled :meth:`Session.receive` loses no frame, so receiving under a
  timeout (heartbeats) is safe;
* :attr:`Session.peer` holds only what the transport itself verified.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Self

import anyio
import attrs

if TYPE_CHECKING:
    from types import TracebackType

    from anyio.abc import TaskStatus

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "PeerInfo", "Session", "SessionHandler", "Transport"]

DEFAULT_MAX_FRAME_SIZE: Final = 4 * 1024 * 1024  # bytes per frame
"""The frame size limit transports use unless configured otherwise.

The protocol chunks batches and snapshots under the limit, so it bounds memory per
frame, not the amount of data a session can carry."""


@attrs.frozen(kw_only=True)
class PeerInfo:
    """What a transport knows about the other end of a session.

    Only ``identity`` is authenticated, and only when the transport authenticates
    peers (a client certificate, a signed token checked during the transport's own
    handshake). A zone name declared inside the protocol's Hello frame is a claim,
    not an identity: the global trusts it only once it is backed by ``identity`` or
    by credentials it verified (a zone token).

    Attributes:
        address: where the peer is, for logs (``"10.0.0.7:51234"``,
            ``"memory://global/client-3"``); never used for authorization.
        identity: the peer identity the transport verified, or ``None`` when the
            transport does not authenticate peers.
    """

    address: str
    identity: str | None = None


class Session(ABC):
    """One bidirectional session of byte frames between a zone and the global.

    Use it as an async context manager, which closes it on exit, or call
    :meth:`aclose`. One task may send while another receives; concurrent calls to
    :meth:`send` (or to :meth:`receive`) from several tasks are allowed, but their
    relative order is then unspecified.

    Iterating a session (``async for frame in session``) receives frames until the
    session ends and then raises :class:`~kds.errors.SessionClosedError`, like
    :meth:`receive`: the end of a session is always something the caller handles,
    never a silent stop. (A clean end-of-stream that nobody noticed is how a
    replication stream can look healthy while being dead.)
    """

    @property
    @abstractmethod
    def peer(self) -> PeerInfo:
        """The other end of the session, as far as the transport verified it."""

    @property
    @abstractmethod
    def max_frame_size(self) -> int:
        """The largest frame, in bytes, this session sends or accepts."""

    @abstractmethod
    async def send(self, frame: bytes) -> None:
        """Send *frame* to the peer; waits while the transport's buffers are full.

        Returning does not mean the peer received the frame, only that the
        transport took it and will deliver it, in order, unless the session ends.

        Raises:
            FrameTooLargeError: *frame* is longer than :attr:`max_frame_size`.
                Nothing was sent and the session is still usable.
            SessionClosedError: the session has ended (see the error's ``by_peer``).

        Cancellation: the frame may or may not have been sent. The protocol cannot
        tell which, so the caller should end the session.
        """

    @abstractmethod
    async def receive(self) -> bytes:
        """Wait for and return the next frame from the peer.

        Raises:
            SessionClosedError: the session has ended. When the peer closed it, every
                frame it sent before closing was returned first.

        Cancellation: no frame is lost; the next call returns the frame this one
        would have returned.
        """

    @abstractmethod
    async def aclose(self, reason: str = "") -> None:
        """End the session and release its resources. Idempotent; never raises.

        The peer's :meth:`receive` raises :class:`~kds.errors.SessionClosedError`
        with *reason* and ``by_peer=True`` once it has received the frames sent
        before this call (transports deliver *reason* on a best-effort basis). On
        this side, later calls and calls blocked in :meth:`send` or :meth:`receive`
        raise it with ``by_peer=False``.

        The protocol's Goodbye frame is the reliable way to tell the peer why;
        *reason* is what the transport can add.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        return await self.receive()


SessionHandler = Callable[[Session], Awaitable[None]]
"""Serves one accepted session on the global; the session ends when it returns."""


class Transport(ABC):
    """Opens sessions from zones (diallers) to the global (the listener).

    A transport instance is configured with where to connect or where to listen
    (an address, TLS settings, a subject prefix); engines receive instances and
    never build them from names.
    """

    @abstractmethod
    async def connect(self) -> Session:
        """Open a session to the global (the zone side).

        The returned session is open: the transport's own handshake, if any, is
        done. The caller owns it and must close it.

        Raises:
            ConnectError: the global cannot be reached or refused the connection.
                Retry with backoff.

        Cancellation: no session was opened, or it was closed again.
        """

    @abstractmethod
    async def serve(
        self,
        handler: SessionHandler,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept sessions from zones and run ``handler(session)`` for each (the global side).

        Each session gets its own task. When the handler returns or raises, the
        transport closes the session; an exception from a handler is logged and
        ends only that session, never the listener. Runs until cancelled;
        cancelling it cancels every handler and closes every session.

        Use it with ``address = await task_group.start(transport.serve, handler)``:
        it reports readiness through *task_status* with the address zones can
        dial (useful when listening on port 0).

        Raises:
            TransportError: the transport cannot listen (address in use, bad TLS
                material); raised before readiness is reported.
        """
