"""GrpcSession: one kds session over one bidirectional-streaming gRPC call.

Each gRPC message is a one-byte envelope kind followed by its payload:

* ``0x00`` + frame: a kds frame, passed through untouched;
* ``0x01`` + UTF-8 reason: the sender closed the session; nothing follows;
* ``0x02`` + frames, each preceded by its length (4 bytes, big-endian): several
  frames that were waiting to be sent together. gRPC's cost is per message, so
  packing small frames when the sender runs ahead multiplies throughput.

The close message is what lets a session end with a reason in both directions (a
gRPC client has no trailers of its own), and what tells a deliberate close from
a stream that merely ended: a clean end of stream without it (a proxy or load
balancer that dropped the connection politely) is reported as such, never taken
for a close and never left as a receive that waits forever.

Two loops per session move messages between the call and two bounded queues,
so that cancelling :meth:`GrpcSession.receive` or :meth:`GrpcSession.send` never
cancels the call itself (``grpc.aio`` cancels the whole RPC when a pending read
or write is cancelled), and so that a peer that stops reading makes
:meth:`GrpcSession.send` wait: the queue fills, then gRPC's flow-control window.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from typing import Final, Protocol, final

import anyio
import anyio.lowlevel
import grpc
import grpc.aio

from kds.errors import FrameTooLargeError, SessionClosedError
from kds.transport import PeerInfo, Session

__all__ = ["GrpcSession"]

logger = logging.getLogger(__name__)

DATA: Final = b"\x00"
CLOSE: Final = b"\x01"
PACKED: Final = b"\x02"
_LENGTH: Final = struct.Struct(">I")
MAX_REASON_BYTES: Final = 1024
"""Close reasons are cut to this many bytes; it is also the envelope's overhead budget."""

CLOSE_REASON_KEY: Final = "kds-close-reason-bin"
"""Trailing metadata with the global's close reason (UTF-8), for when its close
message could not be flushed in time (a zone that stopped reading)."""


class Stream(Protocol):
    """The gRPC call seen from one side: a client call or a server context."""

    async def read(self) -> bytes | None:
        """The next message, or ``None`` at a clean end of stream."""

    async def write(self, message: bytes) -> None:
        """Send *message*; waits for gRPC's flow control."""

    async def end_writing(self) -> None:
        """Tell the peer nothing follows the close message."""

    async def settle(self) -> None:
        """Wait a moment after an end of stream for a cancellation that explains it."""

    async def release(self, session: GrpcSession) -> None:
        """Free the call's resources once both loops have stopped."""

    async def close_reason(self, error: grpc.aio.AioRpcError | None) -> str | None:
        """The close reason the peer put in the call's trailers, if any.

        *error* is how the call failed, or ``None`` when it ended cleanly.
        """


class FrameQueue:
    """A bounded FIFO of messages between two tasks, safe to cancel on either side.

    :meth:`get` takes a message only when it can return it without waiting
    again, so a cancelled ``get`` never loses one (a hand-off to a waiting task,
    as memory object streams do, can be lost when that task is cancelled before
    it resumes).
    """

    def __init__(self, capacity: int) -> None:
        self._messages: deque[bytes] = deque()
        self._capacity = max(capacity, 1)
        # Created by a task about to wait, set and dropped by the next change: a
        # change nobody waits for (the usual case) costs no event.
        self._wakeup: anyio.Event | None = None
        self.finished = False
        """No more messages will be put; :meth:`get` drains the queue, then returns ``None``."""
        self.abandoned = False
        """Nobody will take messages any more: queued ones were dropped."""

    def _changed(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def _wait(self) -> None:
        if self._wakeup is None:
            self._wakeup = anyio.Event()
        await self._wakeup.wait()

    async def put(self, message: bytes) -> bool:
        """Queue *message*, waiting while the queue is full; ``False`` if refused."""
        await anyio.lowlevel.checkpoint()
        while True:
            if self.finished or self.abandoned:
                return False
            if len(self._messages) < self._capacity:
                self._messages.append(message)
                self._changed()
                return True
            await self._wait()

    def take(self, limit: int) -> bytes | None:
        """The next message if it is no longer than *limit* bytes, without waiting."""
        if self.abandoned or not self._messages or len(self._messages[0]) > limit:
            return None
        message = self._messages.popleft()
        self._changed()
        return message

    async def get(self) -> bytes | None:
        """The next message; ``None`` once finished and drained, or abandoned."""
        await anyio.lowlevel.checkpoint()
        while True:
            if self.abandoned:
                return None
            if self._messages:
                message = self._messages.popleft()
                self._changed()
                return message
            if self.finished:
                return None
            await self._wait()

    def finish(self) -> None:
        """Refuse further puts; what is queued can still be taken."""
        self.finished = True
        self._changed()

    def abandon(self) -> None:
        """Drop what is queued and refuse further puts and gets."""
        self.abandoned = True
        self._messages.clear()
        self._changed()


def describe_rpc_error(error: BaseException) -> str:
    """A one-line account of a failed call: the status code and gRPC's details."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details() or 'no details'}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


@final
class GrpcSession(Session):
    """One end of a session over a ``/kds.v1.Sync/Session`` gRPC call.

    Made by :class:`~kds_transports.grpc.GrpcTransport`, not by hand. Up to
    ``buffer_size`` frames are queued per direction, on top of what gRPC's
    flow-control window holds; :meth:`send` waits beyond that.
    """

    def __init__(
        self,
        *,
        peer: PeerInfo,
        max_frame_size: int,
        peer_name: str,
        buffer_size: int,
        close_timeout: float,
        ends_call_on_close: bool,
    ) -> None:
        self._peer = peer
        self._max_frame_size = max_frame_size
        self._peer_name = peer_name
        self._close_timeout = close_timeout
        # The server ends the call by returning once its close message is written;
        # the client half-closes and waits for the server to end it.
        self._ends_call_on_close = ends_call_on_close
        self._outbox = FrameQueue(buffer_size)
        self._inbox = FrameQueue(buffer_size)
        self._local_reason: str | None = None
        self._peer_end: SessionClosedError | None = None
        self._ended = anyio.Event()
        self._done = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._cancel_requested = False
        self._close_written = False  # this side's close message reached gRPC

    @property
    def peer(self) -> PeerInfo:
        """The other end: the global for a zone, the dialling zone for the global."""
        return self._peer

    @property
    def max_frame_size(self) -> int:
        """The frame size limit both ends agreed on (the smaller of their limits)."""
        return self._max_frame_size

    def _error(self) -> SessionClosedError:
        if self._local_reason is not None:
            return SessionClosedError(self._local_reason, by_peer=False)
        if self._peer_end is not None:
            return self._peer_end
        return SessionClosedError("connection lost: the call failed", by_peer=True)

    def _over(self) -> bool:
        return self._local_reason is not None or self._peer_end is not None

    async def send(self, frame: bytes) -> None:
        """Send *frame*; see :meth:`kds.Session.send`."""
        if len(frame) > self._max_frame_size:
            raise FrameTooLargeError(len(frame), self._max_frame_size)
        if self._over():
            await anyio.lowlevel.checkpoint()
            raise self._error()
        # A copy, so that a caller reusing a bytearray cannot change a frame in flight.
        if await self._outbox.put(bytes(frame)):
            return
        if not self._over():
            # The call broke under the writer; the reader is about to learn why
            # (the peer's close message may still be on its way).
            with anyio.move_on_after(self._close_timeout):
                await self._ended.wait()
        raise self._error()

    async def receive(self) -> bytes:
        """Receive the next frame; see :meth:`kds.Session.receive`."""
        frame = await self._inbox.get()
        if frame is None:
            raise self._error()
        return frame

    async def aclose(self, reason: str = "") -> None:
        """Close this end; see :meth:`kds.Session.aclose`.

        Frames already sent are flushed before the close message, for up to the
        transport's ``close_timeout``; after that the call is cancelled.
        """
        if self._local_reason is None:
            self._local_reason = reason
            self._inbox.abandon()
            self._outbox.finish()
            self._ended.set()
        # Closing must finish even in a cancelled scope (handlers being stopped).
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._close_timeout):
                await self._done.wait()
            if not self._done.is_set():
                self._cancel()
                await self._done.wait()

    def _cancel(self) -> None:
        self._cancel_requested = True
        if self._scope is not None:
            self._scope.cancel()

    def _finish(self, end: SessionClosedError) -> None:
        """The call is over (or about to be): fail what waits, after what was received."""
        if self._peer_end is None:
            self._peer_end = end
        self._inbox.finish()
        self._outbox.abandon()
        self._ended.set()

    def _lost(self, detail: str) -> SessionClosedError:
        return SessionClosedError(f"connection lost: {detail}", by_peer=True)

    async def _run(self, stream: Stream) -> None:
        """Move messages between the queues and *stream* until the session ends."""
        try:
            async with anyio.create_task_group() as group:
                self._scope = group.cancel_scope
                if self._cancel_requested:
                    group.cancel_scope.cancel()
                group.start_soon(self._read_loop, stream, group.cancel_scope)
                await self._write_loop(stream, group.cancel_scope)
        finally:
            self._finish(self._lost(f"{self._peer_name}'s stream was cancelled"))
            with anyio.CancelScope(shield=True):
                try:
                    await stream.release(self)
                finally:
                    self._done.set()

    async def _read_loop(self, stream: Stream, scope: anyio.CancelScope) -> None:
        try:
            while True:
                message = await stream.read()
                if message is None:
                    await stream.settle()
                    end = SessionClosedError(
                        await stream.close_reason(None)
                        or f"{self._peer_name} ended the stream without a reason "
                        "(a clean end of stream, as when a proxy or load balancer "
                        "drops the connection)",
                        by_peer=True,
                    )
                    break
                kind = message[:1]
                # Frames are dropped when this side has closed: nobody will receive them.
                if kind == DATA:
                    await self._inbox.put(message[1:])
                elif kind == PACKED:
                    frames = _unpack(message)
                    if frames is None:
                        end = self._lost(f"{self._peer_name} sent a malformed packed message")
                        break
                    for frame in frames:
                        await self._inbox.put(frame)
                elif kind == CLOSE:
                    end = SessionClosedError(
                        message[1:].decode("utf-8", errors="replace"), by_peer=True
                    )
                    break
                else:
                    end = self._lost(f"{self._peer_name} sent an unknown message kind {kind!r}")
                    break
        except grpc.aio.AioRpcError as exc:
            reason = await stream.close_reason(exc)
            end = (
                SessionClosedError(reason, by_peer=True)
                if reason is not None
                else self._lost(describe_rpc_error(exc))
            )
        except Exception as exc:  # any failure of the call ends the session
            end = self._lost(describe_rpc_error(exc))
        self._finish(end)
        scope.cancel()

    def _pack(self, first: bytes) -> bytes:
        """*first* as a message, with the frames queued behind it that fit in one."""
        frames = [first]
        budget = self._max_frame_size - _LENGTH.size - len(first)
        while (frame := self._outbox.take(budget - _LENGTH.size)) is not None:
            frames.append(frame)
            budget -= _LENGTH.size + len(frame)
        if len(frames) == 1:
            return DATA + first
        return PACKED + b"".join(_LENGTH.pack(len(frame)) + frame for frame in frames)

    async def _write_loop(self, stream: Stream, scope: anyio.CancelScope) -> None:
        try:
            while (frame := await self._outbox.get()) is not None:
                await stream.write(self._pack(frame))
            if self._outbox.abandoned or self._local_reason is None:
                return  # the peer ended the session: nothing to say
            reason = self._local_reason.encode("utf-8")[:MAX_REASON_BYTES]
            await stream.write(CLOSE + reason)
            self._close_written = True
            await stream.end_writing()
        except Exception:  # the reader reports why the call failed
            logger.debug("writing to %s failed", self._peer_name, exc_info=True)
            self._outbox.abandon()
            return
        if self._ends_call_on_close:
            scope.cancel()


def _unpack(message: bytes) -> list[bytes] | None:
    """The frames of a packed message, or ``None`` when it is malformed."""
    frames: list[bytes] = []
    view = memoryview(message)
    offset = 1
    while offset < len(view):
        if offset + _LENGTH.size > len(view):
            return None
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            return None
        frames.append(bytes(view[offset : offset + length]))
        offset += length
    return frames
