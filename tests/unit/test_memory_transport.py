from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kds import (
    ConnectError,
    FrameTooLargeError,
    KdsError,
    PeerInfo,
    Session,
    SessionClosedError,
    Transport,
    TransportError,
)
from kds.testing import MemorySession, MemoryTransport

pytestmark = pytest.mark.anyio

TIMEOUT = 5  # seconds; a deadline for conditions, never a pause


class Server:
    """Collects the global-side sessions; its handler keeps each open until the test ends."""

    def __init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[MemorySession](100)

    async def handler(self, session: Session) -> None:
        assert isinstance(session, MemorySession)
        await self._send.send(session)
        await anyio.sleep_forever()

    async def accept(self) -> MemorySession:
        with anyio.fail_after(TIMEOUT):
            return await self._receive.receive()

    def close(self) -> None:
        self._send.close()
        self._receive.close()


@asynccontextmanager
async def serving(transport, handler=None):
    server = Server()
    try:
        async with anyio.create_task_group() as task_group:
            address = await task_group.start(transport.serve, handler or server.handler)
            assert address == transport.address
            yield server
            task_group.cancel_scope.cancel()
    finally:
        server.close()


async def connect_pair(transport, server):
    zone = await transport.connect()
    return zone, await server.accept()


async def receive(session):
    with anyio.fail_after(TIMEOUT):
        return await session.receive()


def test_memory_transport_is_a_transport():
    assert issubclass(MemoryTransport, Transport)
    assert issubclass(MemorySession, Session)
    assert getattr(MemoryTransport, "__final__", False)
    for error in (ConnectError, SessionClosedError, FrameTooLargeError):
        assert issubclass(error, TransportError)
    assert issubclass(TransportError, KdsError)


@pytest.mark.parametrize("kwargs", [{"max_frame_size": 0}, {"buffer_size": -1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MemoryTransport(**kwargs)


@given(
    up=st.lists(st.binary(max_size=64), max_size=30),
    down=st.lists(st.binary(max_size=64), max_size=30),
    buffer_size=st.integers(0, 4),
)
async def test_frames_arrive_in_order_without_loss_in_both_directions(up, down, buffer_size):
    transport = MemoryTransport(buffer_size=buffer_size)
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        received_up: list[bytes] = []
        received_down: list[bytes] = []

        async def send_all(session, frames):
            for frame in frames:
                await session.send(frame)

        async def receive_n(session, n, into):
            for _ in range(n):
                into.append(await session.receive())

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(send_all, zone, up)
                task_group.start_soon(send_all, global_, down)
                task_group.start_soon(receive_n, global_, len(up), received_up)
                task_group.start_soon(receive_n, zone, len(down), received_down)
        assert received_up == up
        assert received_down == down
        await zone.aclose()


async def test_empty_frame_and_frame_at_the_limit_arrive_intact():
    transport = MemoryTransport(max_frame_size=100)
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        assert zone.max_frame_size == global_.max_frame_size == 100
        await zone.send(b"")
        await zone.send(b"x" * 100)
        assert await receive(global_) == b""
        assert await receive(global_) == b"x" * 100
        await zone.aclose()


async def test_oversized_frame_is_refused_and_never_sent():
    transport = MemoryTransport(max_frame_size=10)
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        with pytest.raises(
            FrameTooLargeError, match="11 bytes exceeds the frame size limit of 10"
        ) as caught:
            await zone.send(b"y" * 11)
        assert (caught.value.size, caught.value.limit) == (11, 10)
        # The session is still usable and the oversized frame never arrives.
        await zone.send(b"next")
        assert await receive(global_) == b"next"
        await zone.aclose()


async def test_sent_frames_are_copies():
    transport = MemoryTransport()
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        buffer = bytearray(b"abc")
        await zone.send(buffer)
        buffer[:] = b"xyz"
        frame = await receive(global_)
        assert frame == b"abc"
        assert type(frame) is bytes
        await zone.aclose()


async def test_full_buffer_makes_the_sender_wait():
    transport = MemoryTransport(buffer_size=2)
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        sent = 0

        async def sender():
            nonlocal sent
            for number in range(5):
                await zone.send(b"%d" % number)
                sent += 1

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(sender)
                await anyio.wait_all_tasks_blocked()
                assert sent == 2  # the buffer is full; the third send waits
                assert await global_.receive() == b"0"
                await anyio.wait_all_tasks_blocked()
                assert sent == 3
                received = [await global_.receive() for _ in range(4)]
        assert received == [b"1", b"2", b"3", b"4"]
        assert sent == 5
        await zone.aclose()


@pytest.mark.parametrize("closer", ["zone", "global"])
async def test_peer_close_is_seen_after_the_frames_sent_before_it(closer):
    transport = MemoryTransport()
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        closing, other = (zone, global_) if closer == "zone" else (global_, zone)
        await closing.send(b"one")
        await closing.send(b"two")
        await closing.aclose("going away")
        assert await receive(other) == b"one"
        assert await receive(other) == b"two"
        with pytest.raises(
            SessionClosedError, match="session was closed remotely: going away"
        ) as caught:
            await receive(other)
        assert caught.value.by_peer
        assert caught.value.reason == "going away"
        with pytest.raises(SessionClosedError) as caught:
            await other.send(b"late")
        assert caught.value.by_peer
        assert caught.value.reason == "going away"
        # The side that closed gets its own reason, not by_peer.
        for operation in (closing.receive(), closing.send(b"x")):
            with pytest.raises(SessionClosedError) as caught:
                await operation
            assert not caught.value.by_peer
            assert caught.value.reason == "going away"
        await other.aclose()


async def test_aclose_is_idempotent_and_keeps_the_first_reason():
    transport = MemoryTransport()
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        await zone.aclose("first")
        await zone.aclose("second")
        with pytest.raises(SessionClosedError) as caught:
            await receive(global_)
        assert caught.value.reason == "first"
        with pytest.raises(SessionClosedError) as caught:
            await zone.send(b"x")
        assert caught.value.reason == "first"


async def test_peer_close_wakes_a_blocked_receive():
    transport = MemoryTransport()
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        errors: list[SessionClosedError] = []

        async def receiver():
            with pytest.raises(SessionClosedError) as caught:
                await zone.receive()
            errors.append(caught.value)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(receiver)
                await anyio.wait_all_tasks_blocked()
                assert not errors
                await global_.aclose("stop")
        assert [(error.reason, error.by_peer) for error in errors] == [("stop", True)]
        await zone.aclose()


async def test_own_close_wakes_a_blocked_receive_with_by_peer_false():
    transport = MemoryTransport()
    async with serving(transport) as server:
        zone, _ = await connect_pair(transport, server)
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                errors: list[SessionClosedError] = []

                async def receiver():
                    with pytest.raises(SessionClosedError) as caught:
                        await zone.receive()
                    errors.append(caught.value)

                task_group.start_soon(receiver)
                await anyio.wait_all_tasks_blocked()
                await zone.aclose("local")
        assert [(error.reason, error.by_peer) for error in errors] == [("local", False)]


async def test_peer_close_wakes_a_sender_blocked_on_a_full_buffer():
    transport = MemoryTransport(buffer_size=1)
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        await zone.send(b"fills the buffer")
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                errors: list[SessionClosedError] = []

                async def sender():
                    with pytest.raises(SessionClosedError) as caught:
                        await zone.send(b"waits")
                    errors.append(caught.value)

                task_group.start_soon(sender)
                await anyio.wait_all_tasks_blocked()
                assert not errors
                await global_.aclose("full")
        assert [(error.reason, error.by_peer) for error in errors] == [("full", True)]
        await zone.aclose()


async def test_cancelled_receive_loses_no_frame():
    transport = MemoryTransport()
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(global_.receive)
                await anyio.wait_all_tasks_blocked()
                task_group.cancel_scope.cancel()
        await zone.send(b"kept")
        assert await receive(global_) == b"kept"
        await zone.aclose()


async def test_context_manager_closes_and_iteration_ends_with_the_error():
    transport = MemoryTransport()
    async with serving(transport) as server:
        async with await transport.connect() as zone:
            global_ = await server.accept()
            for frame in (b"a", b"b", b"c"):
                await zone.send(frame)
        received = []

        async def drain():
            async for frame in global_:
                received.append(frame)  # noqa: PERF401  # the loop is what is tested

        with anyio.fail_after(TIMEOUT), pytest.raises(SessionClosedError) as caught:
            await drain()
        assert received == [b"a", b"b", b"c"]
        assert caught.value.by_peer


async def test_sever_drops_frames_in_flight_and_fails_both_ends():
    transport = MemoryTransport()
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        await zone.send(b"in flight")
        await global_.send(b"also in flight")
        zone.sever("cable unplugged")
        for session in (zone, global_):
            for operation in (session.receive(), session.send(b"x")):
                with pytest.raises(
                    SessionClosedError, match="connection lost: cable unplugged"
                ) as caught:
                    await operation
                assert caught.value.by_peer
        await zone.aclose()
        await global_.aclose()


async def test_sever_wakes_a_blocked_receive():
    transport = MemoryTransport()
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        errors: list[SessionClosedError] = []

        async def receiver():
            with pytest.raises(SessionClosedError) as caught:
                await global_.receive()
            errors.append(caught.value)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(receiver)
                await anyio.wait_all_tasks_blocked()
                global_.sever()
        assert len(errors) == 1
        assert errors[0].by_peer
        assert errors[0].reason == "connection lost: network cut"
        await zone.aclose()


async def test_sever_drops_a_frame_handed_to_a_receiver_that_has_not_resumed_yet():
    transport = MemoryTransport()
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        outcome: list[object] = []

        async def receiver():
            try:
                outcome.append(await global_.receive())
            except SessionClosedError as exc:
                outcome.append(exc)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(receiver)
                await anyio.wait_all_tasks_blocked()
                # The frame goes straight to the waiting receiver, which has not run
                # yet when the cut happens: it was still in flight.
                await zone.send(b"in flight")
                zone.sever()
        assert len(outcome) == 1
        assert isinstance(outcome[0], SessionClosedError)
        assert outcome[0].reason == "connection lost: network cut"
        await zone.aclose()
        await global_.aclose()


async def test_sever_all_cuts_only_open_sessions():
    transport = MemoryTransport()
    async with serving(transport) as server:
        pairs = [await connect_pair(transport, server) for _ in range(3)]
        await pairs[0][0].aclose("done")
        assert transport.sever_all("partition") == 2
        for zone, global_ in pairs[1:]:
            with pytest.raises(SessionClosedError, match="connection lost: partition"):
                await receive(zone)
            with pytest.raises(SessionClosedError, match="connection lost: partition"):
                await receive(global_)
        assert transport.sever_all() == 0
        # New connections still work.
        zone, global_ = await connect_pair(transport, server)
        await zone.send(b"after")
        assert await receive(global_) == b"after"
        for session, _ in [*pairs, (zone, global_)]:
            await session.aclose()


async def test_connect_without_a_listener_is_refused():
    transport = MemoryTransport(name="nowhere")
    with pytest.raises(
        ConnectError, match=r"cannot connect to memory://nowhere: .*nothing is serving"
    ) as caught:
        await transport.connect()
    assert caught.value.address == "memory://nowhere"


async def test_refused_connections_simulate_a_global_that_is_down():
    transport = MemoryTransport()
    async with serving(transport) as server:
        zone, global_ = await connect_pair(transport, server)
        transport.refuse_connections("maintenance")
        with pytest.raises(ConnectError, match="maintenance") as caught:
            await transport.connect()
        assert caught.value.reason == "maintenance"
        # Open sessions are not affected.
        await zone.send(b"still here")
        assert await receive(global_) == b"still here"
        transport.accept_connections()
        zone2, global2 = await connect_pair(transport, server)
        await zone2.send(b"back")
        assert await receive(global2) == b"back"
        await zone.aclose()
        await zone2.aclose()


async def test_serving_twice_is_refused():
    transport = MemoryTransport()
    async with serving(transport) as server:
        with pytest.raises(TransportError, match="already being served"):
            await transport.serve(server.handler)


async def test_peer_info_and_verified_identity():
    transport = MemoryTransport(name="gcp")
    async with serving(transport) as server:
        anonymous = await transport.connect()
        seen_anonymous = await server.accept()
        verified = await transport.with_identity("zone-1").connect()
        seen_verified = await server.accept()
        assert anonymous.peer == PeerInfo(address="memory://gcp")
        assert seen_anonymous.peer.identity is None
        assert seen_anonymous.peer.address.startswith("memory://gcp/client-")
        assert seen_verified.peer.identity == "zone-1"
        assert seen_verified.peer.address != seen_anonymous.peer.address
        await anonymous.aclose()
        await verified.aclose()


async def test_handler_return_closes_the_session():
    transport = MemoryTransport()

    async def handler(session):
        await session.send(await session.receive())

    async with serving(transport, handler):
        zone = await transport.connect()
        await zone.send(b"echo")
        assert await receive(zone) == b"echo"
        with pytest.raises(SessionClosedError) as caught:
            await receive(zone)
        assert caught.value.by_peer
        await zone.aclose()


async def test_failing_handler_ends_only_its_session_and_is_logged(caplog):
    transport = MemoryTransport()

    async def handler(session):
        frame = await session.receive()
        if frame == b"crash":
            raise RuntimeError("handler bug")
        await session.send(frame)

    with caplog.at_level(logging.ERROR, logger="kds.testing.transport"):
        async with serving(transport, handler):
            doomed = await transport.connect()
            await doomed.send(b"crash")
            with pytest.raises(SessionClosedError, match="session handler failed"):
                await receive(doomed)
            # The listener survived: another session works.
            healthy = await transport.connect()
            await healthy.send(b"fine")
            assert await receive(healthy) == b"fine"
            await doomed.aclose()
            await healthy.aclose()
    assert any(
        "handler bug" in (record.exc_text or str(record.exc_info)) for record in caplog.records
    )


async def test_stopping_the_listener_ends_every_session():
    transport = MemoryTransport()
    zones = []
    async with serving(transport) as server:
        for _ in range(3):
            zone, _ = await connect_pair(transport, server)
            zones.append(zone)
    for zone in zones:
        with pytest.raises(SessionClosedError, match="server stopped") as caught:
            await receive(zone)
        assert caught.value.by_peer
        await zone.aclose()
    with pytest.raises(ConnectError):
        await transport.connect()


async def test_many_concurrent_sessions_stay_isolated():
    transport = MemoryTransport(buffer_size=1)
    zones = 20
    frames_each = 25

    async def echo(session):
        # Tags each frame with the identity the transport verified for its session.
        identity = session.peer.identity.encode()
        while True:
            frame = await session.receive()
            await session.send(identity + b":" + frame)

    async def zone_run(number):
        name = f"zone-{number}"
        async with await transport.with_identity(name).connect() as session:
            expected = [f"{name}:{name}-{index}".encode() for index in range(frames_each)]

            async def send_all():
                for index in range(frames_each):
                    await session.send(f"{name}-{index}".encode())

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(send_all)
                received = [await session.receive() for _ in range(frames_each)]
            assert received == expected

    async with serving(transport, echo):
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                for number in range(zones):
                    task_group.start_soon(zone_run, number)
