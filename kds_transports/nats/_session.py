"""NatsSession: one kds session over a pair of NATS subjects.

How a session keeps the Transport contract on top of NATS core, which delivers
each message at most once and drops messages for consumers that fall behind
(the message format is in :mod:`kds_transports.nats.wire`):

* **Order, no loss, no duplicates.** Each direction numbers its messages; the
  receiver checks that each one is the next, and ends the session on anything
  else ("messages lost"), telling the peer with a CLOSE. Frames already
  received intact are still handed over first, so the sync engine resumes
  from what it applied. A session whose NATS connection is lost ends too: a
  reconnected connection may have lost messages in between, so sessions never
  outlive their connection.
* **Large frames.** A frame longer than what one message may carry (the
  smaller of both sides' ``max_payload``, less the envelope header) travels as
  PART messages and a final DATA message, reassembled before delivery.
* **Flow control.** A sender may have at most the peer's *window* of credit
  (bytes of frames, plus :data:`~kds_transports.nats.wire.FRAME_COST` each) not
  yet acknowledged; the receiver acknowledges what its application has
  received (ACK, cumulative) once a quarter of the window was consumed, or at
  once when a waiting sender asks (CREDIT). The receiver's memory is bounded by
  its window, and no NATS pending limit is ever approached; a peer that sends
  beyond its credit breaks the protocol and ends the session.
* **Liveness.** A side that sent nothing for ``keepalive_interval`` sends a PING;
  a side that heard nothing for the peer's interval plus its own
  ``keepalive_timeout`` ends the session ("connection lost"). Keepalive messages
  are not subject to credit, so a peer that is alive but not reading is not
  taken for dead.
* **Closing.** ``aclose`` publishes CLOSE with the reason after the frames
  already sent (never in the middle of a split frame); the peer hands over
  those frames, then raises ``SessionClosedError(reason, by_peer=True)``.

Publishing order is the sequence order: a message's number is taken, and the
message handed to nats-py, with no suspension point in between (nats-py queues
a publish before its first await). Were that ever to change, the receiver's
check would end sessions with "messages lost", never deliver out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Final, Literal, final

import anyio
import anyio.lowlevel

from kds.errors import ConnectError, FrameTooLargeError, SessionClosedError
from kds.transport import PeerInfo, Session
from kds_transports.nats import wire
from kds_transports.nats._connection import describe
from kds_transports.nats.wire import FRAME_COST, Kind

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from kds_transports.nats._connection import Connection

__all__ = ["NatsSession"]

logger = logging.getLogger("kds_transports.nats")

MAX_REASON_BYTES: Final = 1024
"""Close reasons are cut to this many bytes."""

_WRITE_BATCH: Final = 64 * 1024  # bytes queued in nats-py after which a sender pauses
_STALL: Final = 0.05  # seconds a keepalive wakeup may be late before it counts as a stall

Role = Literal["zone", "global"]


class _Inbox:
    """Frames received and not yet taken; unbounded, since credit bounds it.

    :meth:`get` takes a frame only when it can return it without waiting again,
    so a cancelled ``get`` never loses one.
    """

    def __init__(self) -> None:
        self._frames: deque[tuple[bytes, int]] = deque()
        self._wakeup = anyio.Event()
        self._waiting = 0  # tasks in get() waiting for a frame
        self.finished = False
        self.abandoned = False

    def _changed(self) -> None:
        if self._waiting:
            self._wakeup.set()
            self._wakeup = anyio.Event()

    def put(self, frame: bytes, cost: int) -> None:
        if self.finished or self.abandoned:
            return
        self._frames.append((frame, cost))
        self._changed()

    async def get(self) -> tuple[bytes, int] | None:
        """The next frame and its cost; ``None`` once finished and drained, or abandoned."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self.abandoned:
                return None
            if self._frames:
                return self._frames.popleft()
            if self.finished:
                return None
            self._waiting += 1
            try:
                await self._wakeup.wait()
            finally:
                self._waiting -= 1

    def finish(self) -> None:
        """No more frames will come; what is here can still be taken."""
        self.finished = True
        self._changed()

    def abandon(self) -> None:
        """Nobody will take frames any more: drop them."""
        self.abandoned = True
        self._frames.clear()
        self._changed()


@final
class NatsSession(Session):
    """One end of a kds session over NATS; made by :class:`~kds_transports.nats.NatsTransport`.

    :meth:`send` waits while the peer's credit is used up (it is not reading);
    up to ``window`` bytes of frames are buffered on the receiving side.
    """

    def __init__(
        self,
        *,
        connection: Connection,
        role: Role,
        session_id: str,
        send_subject: str,
        receive_subject: str,
        max_frame_size: int,
        window: int,
        keepalive_interval: float,
        keepalive_timeout: float,
        close_timeout: float,
        release: Callable[[NatsSession], Awaitable[None]],
    ) -> None:
        self._connection = connection
        self._role: Role = role
        self._peer_name = "the global" if role == "zone" else "the zone"
        self._session_id = session_id
        self._send_subject = send_subject
        self._receive_subject = receive_subject
        self._max_frame_size = max_frame_size
        self._window = window
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._close_timeout = close_timeout
        self._release = release
        # anyio's clock on asyncio (nats-py's only loop), read without anyio's
        # per-call backend lookup: it is read for every message.
        self._clock = asyncio.get_running_loop().time
        self._peer = PeerInfo(address=connection.url)
        # Set from the handshake: what the peer accepts.
        self._peer_window = window
        self._peer_interval = keepalive_interval
        self._part_size = max(1, connection.max_payload - wire.HEADER.size)
        # Sending.
        self._next_sequence = 1
        self._sent_cost = 0  # credit used by every frame sent so far
        self._acked_cost = 0  # credit the peer gave back (its last ACK)
        self._credit_wanted = False  # a sender waits for credit
        self._credit_asked = False  # a CREDIT went out since the last ACK
        self._credit_changed = anyio.Event()
        self._frame_lock = anyio.Lock()  # the messages of one frame go out together
        self._last_sent = self._clock()
        # Receiving.
        self._expected = 1
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._inbox = _Inbox()
        self._received_cost = 0
        self._consumed_cost = 0  # credit of the frames the application took
        self._acked_sent = 0  # the total our last ACK gave back
        self._ack_wanted = False  # the peer asked for credit
        self._last_received = self._clock()
        # Ending.
        self._local_reason: str | None = None
        self._end: SessionClosedError | None = None
        self._tell_peer = False  # this side found the session broken: say so
        self._goodbye_sent = False
        self._control_changed = anyio.Event()
        self._runner_started = False
        self._runner_scope: anyio.CancelScope | None = None
        self._cancel_requested = False
        self._done = anyio.Event()
        self._subscription: Subscription | None = None
        # A zone's handshake: set once the global answered (or could not).
        self._connect_subject: str | None = None
        self._answered: anyio.Event | None = None
        self._answer: wire.ConnectReply | str | None = None

    # -- what the session is ----------------------------------------------------------

    @property
    def peer(self) -> PeerInfo:
        """The other end: the global for a zone, the dialling zone for the global.

        Over NATS a zone does not authenticate the global (any client allowed to
        answer on the connect subject could), so ``identity`` is ``None`` on the
        zone; on the global it is what the ``authenticate`` hook returned.
        """
        return self._peer

    @property
    def max_frame_size(self) -> int:
        """The frame size limit both ends agreed on (the smaller of their limits)."""
        return self._max_frame_size

    @property
    def session_id(self) -> str:
        """The id in the session's subjects (for logs and NATS monitoring)."""
        return self._session_id

    @property
    def send_subject(self) -> str:
        """The subject this end publishes on."""
        return self._send_subject

    @property
    def receive_subject(self) -> str:
        """The subject this end subscribes to."""
        return self._receive_subject

    @property
    def nats_url(self) -> str:
        """The NATS server this end's connection reached."""
        return self._connection.url

    def __repr__(self) -> str:
        return f"NatsSession({self._role}, {self._session_id!r}, peer={self._peer.address!r})"

    # -- the contract -----------------------------------------------------------------

    def _over(self) -> bool:
        return self._local_reason is not None or self._end is not None

    def _error(self) -> SessionClosedError:
        if self._local_reason is not None:
            return SessionClosedError(self._local_reason, by_peer=False)
        if self._end is not None:
            return self._end
        return SessionClosedError("connection lost", by_peer=True)

    async def send(self, frame: bytes) -> None:
        """Send *frame*; see :meth:`kds.Session.send`."""
        if len(frame) > self._max_frame_size:
            raise FrameTooLargeError(len(frame), self._max_frame_size)
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._over():
            raise self._error()
        # A copy, so that a caller reusing a bytearray cannot change a frame in flight.
        data = bytes(frame)
        cost = len(data) + FRAME_COST
        if (
            len(data) <= self._part_size
            and not self._frame_lock.locked()
            and self._has_credit(cost)
        ):
            # One message that may go now: counted and queued with no pause in
            # between, so that no other frame can come between the check and it.
            self._sent_cost += cost
            await self._publish(Kind.DATA, data)
        else:
            async with self._frame_lock:
                await self._wait_for_credit(cost)
                self._sent_cost += cost
                # A frame is never cut short: a peer would join its parts to the next one.
                with anyio.CancelScope(shield=True):
                    await self._publish_frame(data)
        if self._connection.client.pending_data_size >= _WRITE_BATCH:
            # Let nats-py write what was queued: sends that never pause batch
            # their messages into few writes (a write per frame costs dearly).
            await anyio.lowlevel.checkpoint()

    async def receive(self) -> bytes:
        """Receive the next frame; see :meth:`kds.Session.receive`."""
        item = await self._inbox.get()
        if item is None:
            raise self._error()
        frame, cost = item
        # Nothing below waits: a cancellation can no longer lose this frame.
        self._consumed_cost += cost
        if self._ack_due():
            self._wake_control()
        return frame

    async def aclose(self, reason: str = "") -> None:
        """Close this end; see :meth:`kds.Session.aclose`.

        The CLOSE message follows the frames already sent; publishing it and
        releasing the subscription (and, on a zone, its NATS connection) may take
        up to the transport's ``close_timeout``.
        """
        if self._local_reason is None:
            self._local_reason = reason
            self._inbox.abandon()
            self._parts.clear()
            self._wake_senders()
            self._wake_control()
        # Closing must finish even in a cancelled scope (handlers being stopped).
        with anyio.CancelScope(shield=True):
            if self._runner_started:
                with anyio.move_on_after(self._close_timeout):
                    await self._done.wait()
                if not self._done.is_set():
                    self._cancel_runner()
                    await self._done.wait()
                # The runner may have been stopped before this close (a global
                # that stops serving): then the CLOSE is still to be sent.
                await self._goodbye()
            elif not self._done.is_set():
                await self._goodbye()
                await self._release_once()

    # -- sending ------------------------------------------------------------------------

    def _has_credit(self, cost: int) -> bool:
        in_flight = self._sent_cost - self._acked_cost
        # A frame larger than the whole window goes alone.
        return in_flight == 0 or in_flight + cost <= self._peer_window

    async def _wait_for_credit(self, cost: int) -> None:
        while True:
            if self._over():
                raise self._error()
            if self._has_credit(cost):
                return
            if not self._credit_wanted:
                self._credit_wanted = True
                self._wake_control()
            await self._credit_changed.wait()

    async def _publish_frame(self, frame: bytes) -> None:
        size = self._part_size
        start = 0
        while len(frame) - start > size:
            await self._publish(Kind.PART, frame[start : start + size])
            start += size
        await self._publish(Kind.DATA, frame[start:] if start else frame)

    async def _publish(self, kind: Kind, body: bytes = b"") -> None:
        """Publish one envelope with the next sequence number.

        Raises:
            SessionClosedError: NATS refused it (the connection is gone); the
                session has ended.
        """
        sequence = self._next_sequence
        self._next_sequence += 1
        self._last_sent = self._clock()
        try:
            # No await before nats-py queues the message: see the module's docstring.
            # The reply subject is this end's own: when nobody subscribes to the send
            # subject any more (the peer's connection is gone: a killed global, or a
            # zone), NATS answers the message with "no responders" there at once,
            # rather than the session waiting for the keepalive timeout.
            await self._connection.client.publish(
                self._send_subject,
                wire.encode(kind, sequence, body),
                reply=self._receive_subject,
            )
        except Exception as exc:
            self._lose(f"cannot publish to NATS ({describe(exc)})")
            raise self._error() from None

    # -- receiving ------------------------------------------------------------------------

    async def _on_message(self, message: Msg) -> None:
        """nats-py's callback for the receive subject: never waits, never raises."""
        try:
            self._take(message)
        except Exception as exc:  # a malformed message, or a bug: end, never stall
            logger.debug("session %s: bad message", self._session_id, exc_info=True)
            self._violation(describe(exc))

    def _take(self, message: Msg) -> None:
        if self._over():
            return  # nobody will receive it
        data = message.data
        if not data and message.headers:
            # A status message from the server: "503" answers a connect request
            # that no global subscribed to, or a message on the session's subject
            # that nobody subscribes to any more.
            if message.headers.get("Status") != "503":
                return
            if self._answered is not None and self._answer is None:
                self._answer_with(
                    f"no global is serving on {self._connect_subject} (NATS has no responders)"
                )
            else:
                self._lose(
                    f"{self._peer_name} is gone: nobody subscribes to {self._send_subject} "
                    "any more (NATS has no responders)"
                )
            return
        kind, sequence, body = wire.decode(data)
        if kind in (Kind.ACCEPT, Kind.REFUSE):
            self._take_answer(kind, sequence, body)
            return
        if sequence != self._expected:
            self._broken(
                f"messages lost: expected message {self._expected} from {self._peer_name}, got "
                f"{sequence} (NATS delivers at most once; the session must be resumed)"
            )
            return
        self._expected += 1
        self._last_received = self._clock()
        if kind == Kind.DATA or kind == Kind.PART:
            self._take_piece(kind, body)
        elif kind == Kind.ACK:
            self._take_ack(wire.decode_counter(body))
        elif kind == Kind.CREDIT:
            self._ack_wanted = True
            self._wake_control()
        elif kind == Kind.CLOSE:
            self._finish(
                SessionClosedError(body.decode("utf-8", errors="replace"), by_peer=True),
                tell_peer=False,
            )
        # PING: hearing it was the point.

    def _take_piece(self, kind: Kind, body: bytes) -> None:
        size = self._parts_size + len(body)
        if size > self._max_frame_size:
            self._violation(
                f"{self._peer_name} sent a frame of more than {self._max_frame_size} bytes"
            )
            return
        if kind == Kind.PART:
            self._parts.append(body)
            self._parts_size = size
            return
        frame = b"".join([*self._parts, body]) if self._parts else body
        self._parts.clear()
        self._parts_size = 0
        cost = len(frame) + FRAME_COST
        self._received_cost += cost
        if self._received_cost - self._acked_sent > max(self._window, cost):
            self._violation(
                f"{self._peer_name} sent more than the {self._window}-byte window it was "
                f"given ({self._received_cost - self._acked_sent} bytes unacknowledged)"
            )
            return
        self._inbox.put(frame, cost)

    def _take_ack(self, acked: int) -> None:
        if acked < self._acked_cost or acked > self._sent_cost:
            self._violation(
                f"{self._peer_name} acknowledged {acked} bytes of credit; "
                f"{self._acked_cost} were acknowledged before and {self._sent_cost} sent"
            )
            return
        self._acked_cost = acked
        self._credit_wanted = False
        self._credit_asked = False
        self._wake_senders()

    def _take_answer(self, kind: Kind, sequence: int, body: bytes) -> None:
        if self._answered is None or self._answer is not None or sequence != 0:
            self._violation(f"{self._peer_name} sent an unexpected {kind.name}")
            return
        if kind == Kind.REFUSE:
            reason = body.decode("utf-8", errors="replace")
            self._answer_with(f"the global refused the session: {reason}")
            return
        try:
            self._answer_with(wire.ConnectReply.from_json(body))
        except ValueError as exc:
            self._answer_with(f"the global's answer is malformed ({exc})")

    def _answer_with(self, answer: wire.ConnectReply | str) -> None:
        if self._answered is not None and self._answer is None:
            self._answer = answer
            self._answered.set()

    # -- ending ---------------------------------------------------------------------------

    def _violation(self, detail: str) -> None:
        self._broken(f"protocol violation: {detail}")

    def _lose(self, detail: str) -> None:
        """The connection under the session is gone (or silent)."""
        self._finish(
            SessionClosedError(f"connection lost: {detail}", by_peer=True), tell_peer=False
        )

    def _broken(self, reason: str, *, tell_peer: bool = True) -> None:
        """The session cannot go on (messages lost, a peer breaking the protocol)."""
        self._finish(SessionClosedError(reason, by_peer=True), tell_peer=tell_peer)

    def _finish(self, end: SessionClosedError, *, tell_peer: bool) -> None:
        """Nothing more will be received: fail what waits, after what was received."""
        if self._end is None:
            self._end = end
            self._tell_peer = tell_peer and self._local_reason is None
        self._parts.clear()
        self._inbox.finish()
        self._answer_with(end.reason)
        self._wake_senders()
        self._wake_control()

    def _concerns(self, text: str) -> bool:
        """Whether a NATS error message names one of this session's subjects."""
        # nats-py lowercases the server's error messages, subjects included.
        lowered = text.lower()
        subjects = [self._send_subject, self._receive_subject, self._connect_subject]
        return any(subject and f'"{subject.lower()}"' in lowered for subject in subjects)

    def _wake_senders(self) -> None:
        self._credit_changed.set()
        self._credit_changed = anyio.Event()

    def _wake_control(self) -> None:
        self._control_changed.set()
        self._control_changed = anyio.Event()

    def _ack_due(self) -> bool:
        unacked = self._consumed_cost - self._acked_sent
        return unacked > 0 and (self._ack_wanted or unacked >= max(1, self._window // 4))

    async def _goodbye(self) -> None:
        """Publish this end's CLOSE, once, if this end ended a session that was live."""
        if self._goodbye_sent or self._connection.lost.is_set():
            return
        if self._end is not None:
            if not self._tell_peer:
                return  # the peer ended it, or the connection did: nobody to tell
            reason = self._end.reason
        elif self._local_reason is not None:
            reason = self._local_reason
        else:
            return
        self._goodbye_sent = True
        encoded = reason.encode("utf-8")[:MAX_REASON_BYTES]
        # Shielded: a runner cancelled with its global (serve() stopping) must still
        # say goodbye, or its zone only learns of the end from its keepalive.
        with anyio.move_on_after(self._close_timeout, shield=True):
            # After the frame being sent, if any: never between its parts.
            async with self._frame_lock:
                # If the connection is gone, the peer's keepalive will tell it.
                with contextlib.suppress(SessionClosedError):
                    await self._publish(Kind.CLOSE, encoded)

    async def _release_once(self) -> None:
        if self._done.is_set():
            return
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._close_timeout):
                await self._release(self)
        except Exception:
            logger.debug("releasing session %s failed", self._session_id, exc_info=True)
        finally:
            self._connection.discard(self)
            self._done.set()

    def _cancel_runner(self) -> None:
        self._cancel_requested = True
        if self._runner_scope is not None:
            self._runner_scope.cancel()

    # -- the runner: keepalive, acknowledgements, credit requests ---------------------------

    async def _run(self) -> None:
        """Keep the session alive until it ends, then say goodbye and release it."""
        self._runner_started = True
        try:
            with anyio.CancelScope() as scope:
                self._runner_scope = scope
                if self._cancel_requested:
                    scope.cancel()
                with contextlib.suppress(SessionClosedError):  # the session ended: fine
                    await self._control()
                await self._goodbye()
        finally:
            await self._release_once()

    async def _control(self) -> None:
        silence_limit = self._peer_interval + self._keepalive_timeout
        interval = self._keepalive_interval
        while not self._over():
            changed = self._control_changed
            now = self._clock()
            silent = now - self._last_received
            if silent >= silence_limit:
                # Said to the peer too: it may be alive and only its messages lost.
                self._finish(
                    SessionClosedError(
                        f"connection lost: nothing from {self._peer_name} for {silent:.1f} s "
                        f"(its keepalive interval {self._peer_interval:g} s + "
                        f"keepalive_timeout {self._keepalive_timeout:g} s)",
                        by_peer=True,
                    ),
                    tell_peer=True,
                )
                return
            if self._credit_wanted and not self._credit_asked:
                self._credit_asked = True
                await self._publish(Kind.CREDIT)
                continue
            if self._ack_due():
                self._acked_sent = self._consumed_cost
                self._ack_wanted = False
                await self._publish(Kind.ACK, wire.encode_counter(self._acked_sent))
                continue
            idle = now - self._last_sent
            if idle >= interval:
                await self._publish(Kind.PING)
                continue
            delay = min(interval - idle, silence_limit - silent)
            with anyio.move_on_after(delay):
                await changed.wait()
            late = self._clock() - (now + delay)
            if late > _STALL:
                # This process did not run for a while (CPU starvation, a long
                # pause): the peer's messages may be waiting unread, so that time
                # is not the peer's silence.
                self._last_received += late

    # -- opening --------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        subscription = await self._connection.client.subscribe(
            self._receive_subject, cb=self._on_message
        )
        self._subscription = subscription
        self._connection.subscriptions[subscription] = self

    async def _open_as_zone(self, connect_subject: str, request: wire.ConnectRequest) -> None:
        """Ask the global for this session and wait for its answer (the zone side).

        Raises:
            ConnectError: the global refused, none is serving, or the connection
                to NATS was lost meanwhile.
        """
        self._connect_subject = connect_subject
        self._answered = anyio.Event()
        self._connection.add(self)
        await self._subscribe()
        # The reply subject is this session's g2z subject: the answer comes first
        # on it, before anything else the global sends.
        await self._connection.client.publish(
            connect_subject, request.to_json(), reply=self._receive_subject
        )
        await self._answered.wait()
        answer = self._answer
        if not isinstance(answer, wire.ConnectReply):
            raise ConnectError(self._connection.url, str(answer))
        self._send_subject = answer.z2g
        self._agree(answer.max_frame_size, answer.window, answer.keepalive_interval)
        self._part_size = self._part_size_for(answer.max_payload)
        self._peer = PeerInfo(address=f"{answer.instance} via {self._connection.url}")
        self._last_received = self._clock()

    async def _give_up(self, reason: str) -> None:
        """Tell a global that may have accepted meanwhile that this zone is not coming.

        Its first message on the session subject, so a global that did accept
        ends the session at once rather than after its keepalive timeout.
        """
        with contextlib.suppress(Exception):
            await self._connection.client.publish(
                self._send_subject, wire.encode(Kind.CLOSE, 1, reason.encode("utf-8"))
            )

    def _agree(self, max_frame_size: int, window: int, keepalive_interval: float) -> None:
        self._max_frame_size = min(self._max_frame_size, max_frame_size)
        self._peer_window = window
        self._peer_interval = keepalive_interval

    def _part_size_for(self, peer_max_payload: int) -> int:
        return max(1, min(self._connection.max_payload, peer_max_payload) - wire.HEADER.size)

    async def _open_as_global(
        self, request: wire.ConnectRequest, reply: wire.ConnectReply, identity: str | None
    ) -> None:
        """Subscribe, then accept (the global side); the zone may send at once."""
        self._agree(request.max_frame_size, request.window, request.keepalive_interval)
        self._part_size = self._part_size_for(request.max_payload)
        self._peer = PeerInfo(
            address=f"{request.address} (session {self._session_id})", identity=identity
        )
        self._connection.add(self)
        await self._subscribe()
        await self._connection.client.publish(
            self._send_subject, wire.encode(Kind.ACCEPT, 0, reply.to_json())
        )
        self._last_received = self._clock()


def start_runner(session: NatsSession) -> None:
    """Run a zone session's runner in a task of its own: the session outlives ``connect()``."""

    async def run() -> None:
        await session._run()

    task = asyncio.get_running_loop().create_task(run())
    _runners.add(task)
    task.add_done_callback(_runners.discard)


# asyncio keeps only weak references to tasks.
_runners: set[asyncio.Task[None]] = set()
