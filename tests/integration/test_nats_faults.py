"""NatsTransport when NATS fails: a restarted server, a frozen one, a global that never answers.

The server is a real nats-server (:class:`~kds.testing.nats.NatsServer`),
stopped, frozen (SIGSTOP) and started again by its own pid.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
import nats
import pytest

from kds import ConnectError, SessionClosedError
from kds.testing.nats import NatsServer
from kds_transports.nats import NatsSession, NatsTransport, wire
from kds_transports.nats.wire import Kind

pytestmark = pytest.mark.anyio

TIMEOUT = 15  # seconds; a deadline for conditions, never a pause
KEEPALIVE = 0.5  # seconds: keepalive interval and timeout
LOSS_TIMEOUT = 2 * KEEPALIVE + 2  # seconds within which a silent peer must be detected


def client(address: str, **options) -> NatsTransport:
    return NatsTransport.client(
        address, keepalive_interval=KEEPALIVE, keepalive_timeout=KEEPALIVE, **options
    )


@asynccontextmanager
async def echo_global(address: str):
    """Serve echo sessions through NATS at *address*; yields how the global's sessions end."""
    send, receive = anyio.create_memory_object_stream[SessionClosedError](100)

    async def echo(session):
        try:
            async for frame in session:
                await session.send(frame)
        except SessionClosedError as exc:
            await send.send(exc)

    transport = NatsTransport.server(
        address, keepalive_interval=KEEPALIVE, keepalive_timeout=KEEPALIVE, reconnect_wait=0.2
    )
    with send, receive:
        async with anyio.create_task_group() as group:
            await group.start(transport.serve, echo)
            yield receive
            group.cancel_scope.cancel()


async def echo_once(session: NatsSession, frame: bytes = b"ping") -> None:
    await session.send(frame)
    with anyio.fail_after(TIMEOUT):
        assert await session.receive() == frame


async def end_of(session: NatsSession, within: float = TIMEOUT) -> SessionClosedError:
    with anyio.fail_after(within), pytest.raises(SessionClosedError) as caught:
        await drain(session)
    return caught.value


async def drain(session: NatsSession) -> None:
    while True:
        await session.receive()


async def subscribed(connection) -> None:
    """Return once the server has *connection*'s subscriptions.

    Two round trips: nats-py writes a flush's PING ahead of a SUB still queued for
    its writer task; the first lets that task run, the second follows the SUB.
    """
    for _ in range(2):
        await connection.flush()


async def test_a_restarted_server_ends_sessions_and_new_ones_work_once_it_is_back():
    with NatsServer() as server:
        async with echo_global(server.url) as global_ends:
            zone = await client(server.url).connect()
            await echo_once(zone)
            await anyio.to_thread.run_sync(server.stop)

            # Both ends learn at once, with a reason that names what was lost.
            with anyio.fail_after(TIMEOUT):
                global_end = await global_ends.receive()
            for end in (await end_of(zone), global_end):
                assert end.by_peer
                assert end.reason.startswith("connection lost: the connection to NATS at")
            with pytest.raises(ConnectError, match="cannot reach the NATS server"):
                await client(server.url).connect()

            await anyio.to_thread.run_sync(server.start)
            # The global reconnects by itself (backing off up to 0.2 s here): a zone
            # retries, as the sync engine does, until a global answers again.
            refusals: list[str] = []
            with anyio.fail_after(TIMEOUT):
                while True:
                    try:
                        again = await client(server.url).connect()
                        break
                    except ConnectError as exc:
                        refusals.append(exc.reason)
                    await anyio.sleep(0.05)  # a zone's retry backoff, shortened
            assert all("no global is serving" in refusal for refusal in refusals)
            await echo_once(again, b"after the restart")
            await again.aclose()


async def test_a_frozen_server_is_detected_by_keepalive_on_both_ends():
    with NatsServer() as server:
        async with echo_global(server.url) as global_ends:
            zone = await client(server.url).connect()
            await echo_once(zone)
            server.freeze()
            try:
                with anyio.fail_after(LOSS_TIMEOUT):
                    ends = [await end_of(zone), await global_ends.receive()]
            finally:
                server.thaw()
            assert ends[0].reason.startswith("connection lost: nothing from the global for")
            assert ends[1].reason.startswith("connection lost: nothing from the zone for")
            await zone.aclose()


async def test_a_zone_that_gets_no_answer_gives_up_and_tells_the_global():
    with NatsServer() as server:
        connection = await nats.connect(server.url, allow_reconnect=False)
        try:
            # A "global" that takes connect requests and never answers.
            requests = await connection.subscribe("kds.connect", queue=wire.QUEUE_GROUP)
            notes = await connection.subscribe("kds.s.*.z2g")
            await subscribed(connection)
            with pytest.raises(ConnectError, match=r"no answer within 0\.5 s"):
                await client(server.url, connect_timeout=0.5).connect()
            request = wire.ConnectRequest.from_json((await requests.next_msg(timeout=TIMEOUT)).data)
            note = await notes.next_msg(timeout=TIMEOUT)
            assert note.subject == wire.session_subjects("kds", request.session)[0]
            kind, sequence, body = wire.decode(note.data)
            assert (kind, sequence) == (Kind.CLOSE, 1)
            assert body == b"the zone gave up waiting for the global's answer"
        finally:
            await connection.close()
