"""TcpRelay: a TCP relay on loopback whose connections tests can cut, as a network would.

A :class:`TcpRelay` listens on a free 127.0.0.1 port and forwards each connection
it accepts to a target address, byte for byte: it understands nothing of what
flows (TLS passes through it end to end). Put it between a client and a server to
play the faults of the network between them:

* :meth:`TcpRelay.sever_all` resets every relayed connection at once, both ways,
  as a load balancer or a NAT that drops its connections does;
* :meth:`TcpRelay.refuse_connections` makes it reset every new connection as soon
  as it is accepted (the server is unreachable) until
  :meth:`TcpRelay.accept_connections`.

It runs on the caller's event loop, through anyio.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from typing import TYPE_CHECKING, Final, final

import anyio
import attrs
from anyio.abc import SocketAttribute, SocketListener, SocketStream

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

    from anyio.abc import TaskGroup

__all__ = ["TcpRelay"]

logger = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
"""The only address a relay listens on: tests must not open ports to the network."""

_CHUNK: Final = 65536  # bytes read at once from either side
_STOP_TIMEOUT: Final = 5.0  # seconds stopping waits for the accept loop to end

# Stream errors that mean "this connection is gone" (reset, closed under us): they
# end one connection, never the relay.
_CONNECTION_LOST: Final = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)


async def _splice(a: SocketStream, b: SocketStream) -> None:
    """Relay bytes between *a* and *b*, both ways, until both directions have ended.

    A direction ends when its source reaches end of stream; its sink is then told
    (``send_eof``: TCP's half-close) while the other direction carries on. An error
    on either stream (a connection reset) ends both directions. Both streams are
    closed on return, at once: what the kernel was not yet handed is dropped, as
    when a relay dies (on loopback, with both ends reading, that is nothing).
    """
    try:
        async with anyio.create_task_group() as group:

            async def one_way(source: SocketStream, sink: SocketStream) -> None:
                try:
                    while True:
                        try:
                            chunk = await source.receive(_CHUNK)
                        except anyio.EndOfStream:
                            break
                        await sink.send(chunk)
                    await sink.send_eof()
                except _CONNECTION_LOST:
                    group.cancel_scope.cancel()

            group.start_soon(one_way, a, b)
            group.start_soon(one_way, b, a)
    finally:
        await _close_both(a, b)


async def _close_both(a: SocketStream, b: SocketStream | None) -> None:
    """Close both streams at once, even when the caller is being cancelled."""
    # Shielded: in a cancelled caller, the first aclose_forcefully would raise the
    # caller's cancellation and the second stream would stay open.
    with anyio.CancelScope(shield=True):
        await anyio.aclose_forcefully(a)
        if b is not None:
            await anyio.aclose_forcefully(b)


def _reset_on_close(stream: SocketStream | None) -> None:
    """Make closing *stream* send a TCP reset instead of a FIN: an abrupt end."""
    if stream is None:
        return
    raw: socket.socket = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 -- anyio's, not Django's
    with contextlib.suppress(OSError):  # already closed: nothing left to reset
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@attrs.define(eq=False)
class _Connection:
    """One relayed connection: its two sockets, and the scope that ends it."""

    client: SocketStream
    upstream: SocketStream | None = None
    scope: anyio.CancelScope = attrs.Factory(anyio.CancelScope)
    done: anyio.Event = attrs.Factory(anyio.Event)

    def reset(self) -> None:
        """End the connection abruptly: both sides get a reset."""
        _reset_on_close(self.client)
        _reset_on_close(self.upstream)
        self.scope.cancel()


@final
class TcpRelay:
    """Forwards TCP connections from a 127.0.0.1 port to a target; tests cut them.

    Use it as an async context manager: entering binds a free port on 127.0.0.1
    (or *port*) and starts relaying; exiting stops accepting and closes every
    relayed connection. Dial :attr:`address`. Each accepted connection gets its own
    connection to the target, dialled when it arrives; when the target cannot be
    reached, the client's connection is reset. Half-closes are relayed; a reset on
    either side ends both.

    The relay runs on the event loop that entered it, and must be used from that
    loop only.

    Args:
        target_host: where to forward connections to; :attr:`target` changes it
            for new connections (a server restarted on another port, say).
        target_port: the target's port.
        port: the port to listen on; 0 (the default) picks a free one.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        port: int = 0,
    ) -> None:
        self.target: tuple[str, int] = (target_host, target_port)
        """Where new connections are forwarded to, as ``(host, port)``."""
        self._requested_port = port
        self._port: int | None = None
        self._listener: SocketListener | None = None
        self._group: TaskGroup | None = None
        self._open: set[_Connection] = set()
        self._accepted: set[SocketStream] = set()
        self._stopping = False
        self._accepting = anyio.Event()  # set once the accept loop has ended
        self._refusing = False
        self._connections = 0
        self._refused = 0

    def __repr__(self) -> str:
        where = f"{HOST}:{self._port}" if self._port is not None else "not listening"
        return f"TcpRelay({where} -> {self.target[0]}:{self.target[1]})"

    @property
    def host(self) -> str:
        """The address the relay listens on: always ``127.0.0.1``."""
        return HOST

    @property
    def port(self) -> int:
        """The port the relay listens on.

        Raises:
            RuntimeError: the relay is not running.
        """
        if self._port is None:
            raise RuntimeError(f"{self!r} is not running: use it with async with")
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``: what clients dial instead of the target."""
        return f"{HOST}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections accepted and relayed (or attempted) so far; refused ones excluded."""
        return self._connections

    @property
    def open_connections(self) -> int:
        """Connections being relayed right now."""
        return len(self._open)

    @property
    def refused(self) -> int:
        """Connections reset at once because connections were being refused."""
        return self._refused

    @property
    def refusing(self) -> bool:
        """Whether new connections are being refused."""
        return self._refusing

    def refuse_connections(self) -> None:
        """Reset every new connection as soon as it is accepted, until :meth:`accept_connections`.

        Connections already relayed are not affected: :meth:`sever_all` cuts those.
        """
        self._refusing = True

    def accept_connections(self) -> None:
        """Relay new connections again (undo :meth:`refuse_connections`)."""
        self._refusing = False

    async def sever_all(self, reason: str = "network cut") -> int:
        """Reset every relayed connection, both ways, and wait until each is closed.

        Args:
            reason: why, for the log.

        Returns:
            How many connections were severed.
        """
        severed = list(self._open)
        logger.info("%r: severing %d connection(s): %s", self, len(severed), reason)
        for connection in severed:
            connection.reset()
        for connection in severed:
            await connection.done.wait()
        return len(severed)

    async def __aenter__(self) -> Self:
        if self._group is not None:
            raise RuntimeError(f"{self!r} is already running")
        listeners = await anyio.create_tcp_listener(
            local_host=HOST, local_port=self._requested_port
        )
        [listener] = listeners.listeners  # one address, one socket
        assert isinstance(listener, SocketListener)  # noqa: S101 -- what anyio makes for TCP
        group = anyio.create_task_group()
        try:
            await group.__aenter__()
        except BaseException:
            await listener.aclose()
            raise
        self._listener, self._group = listener, group
        self._stopping = False
        self._accepting = anyio.Event()
        self._port = listener.extra(SocketAttribute.local_port)  # noqa: S610 -- anyio's, not Django's
        group.start_soon(self._accept, listener, group)
        logger.debug("%r: relaying", self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        group, listener = self._group, self._listener
        assert group is not None  # noqa: S101 -- only after __aenter__
        assert listener is not None  # noqa: S101 -- only after __aenter__
        self._stopping = True
        # accept() is ended with an error, not cancelled: a cancellation could drop a
        # connection it had just accepted, without closing it.
        raw: socket.socket = listener.extra(SocketAttribute.raw_socket)  # noqa: S610 -- anyio's
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)
        with anyio.move_on_after(_STOP_TIMEOUT, shield=True):
            await self._accepting.wait()
        group.cancel_scope.cancel()
        try:
            return await group.__aexit__(exc_type, exc, tb)
        finally:
            # Accepted connections whose task was cancelled before it ever ran.
            for client in self._accepted:
                await _close_both(client, None)
            self._accepted.clear()
            await anyio.aclose_forcefully(listener)
            self._group = self._listener = None
            self._port = None
            logger.debug("%r: stopped", self)

    async def _accept(self, listener: SocketListener, group: TaskGroup) -> None:
        try:
            while True:
                try:
                    client = await listener.accept()
                except ConnectionAbortedError:
                    continue  # the client gave up before it was accepted
                except OSError:
                    if self._stopping:
                        return  # __aexit__ shut the socket down
                    raise
                # Until its task runs and takes it: a task cancelled before it starts
                # never runs its own cleanup.
                self._accepted.add(client)
                group.start_soon(self._relay, client)
        finally:
            self._accepting.set()

    async def _relay(self, client: SocketStream) -> None:
        self._accepted.discard(client)
        if self._refusing:
            self._refused += 1
            _reset_on_close(client)
            await _close_both(client, None)
            return
        self._connections += 1
        connection = _Connection(client)
        self._open.add(connection)
        try:
            with connection.scope:
                host, port = self.target
                try:
                    connection.upstream = await anyio.connect_tcp(host, port)
                except OSError as exc:
                    # Like a load balancer without a healthy backend: the client is
                    # reset, not left waiting.
                    logger.debug("%r: cannot reach the target: %s", self, exc)
                    _reset_on_close(client)
                    return
                await _splice(client, connection.upstream)
        except _CONNECTION_LOST as exc:
            logger.debug("%r: a connection ended: %r", self, exc)
        except Exception:
            # One connection's failure must not stop the relay and every other
            # connection: report it and carry on.
            logger.exception("%r: relaying a connection failed", self)
        finally:
            await _close_both(client, connection.upstream)
            self._open.discard(connection)
            connection.done.set()
