from __future__ import annotations

import logging
import random
from contextlib import asynccontextmanager
from typing import Any

import anyio
import grpc
import grpc.aio
import pytest

from kds import (
    ConfigError,
    ConnectError,
    FrameTooLargeError,
    ResourceKey,
    SessionClosedError,
    Transport,
    TransportError,
    Upsert,
)
from kds.sync import GlobalEngine, SyncOptions, ZoneEngine
from kds.testing import MemoryStore
from kds.tls import CERT_FILE_NAME
from kds_transports.grpc import (
    METHOD,
    GrpcClientOptions,
    GrpcServerOptions,
    GrpcSession,
    GrpcTransport,
)
from kds_transports.grpc._transport import _Listener

pytestmark = pytest.mark.anyio

TIMEOUT = 10  # seconds; a deadline for conditions, never a pause


class Server:
    """Collects the global-side sessions; its handler keeps each open until the test ends."""

    def __init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[GrpcSession](100)

    async def handler(self, session):
        assert isinstance(session, GrpcSession)
        await self._send.send(session)
        await anyio.sleep_forever()

    async def accept(self) -> GrpcSession:
        with anyio.fail_after(TIMEOUT):
            return await self._receive.receive()

    def close(self) -> None:
        self._send.close()
        self._receive.close()


class Served:
    """A running global: its reported address, its sessions, and zones dialling it."""

    def __init__(self, address: str, server: Server, ca_file) -> None:
        self.address = address
        self.server = server
        self.ca_file = ca_file

    def client(self, **kwargs) -> GrpcTransport:
        if self.address.startswith("grpcs://") and not kwargs.get("skip_verify"):
            kwargs.setdefault("ca_file", self.ca_file)
        return GrpcTransport.client(self.address, **kwargs)

    async def pair(self, **kwargs) -> tuple[GrpcSession, GrpcSession]:
        zone = await self.client(**kwargs).connect()
        return zone, await self.server.accept()


@pytest.fixture(params=["grpc", "grpcs"])
def scheme(request):
    return request.param


@asynccontextmanager
async def serving(tmp_path, handler=None, *, scheme="grpcs", **kwargs):
    kwargs.setdefault("work_dir", tmp_path)
    transport = GrpcTransport.server(f"{scheme}://127.0.0.1:0", **kwargs)
    server = Server()
    try:
        async with anyio.create_task_group() as task_group:
            address = await task_group.start(transport.serve, handler or server.handler)
            yield Served(address, server, tmp_path / CERT_FILE_NAME)
            task_group.cancel_scope.cancel()
    finally:
        server.close()


async def receive(session):
    with anyio.fail_after(TIMEOUT):
        return await session.receive()


async def drain(session):
    while True:
        await session.receive()


# -- configuration -----------------------------------------------------------------------


def test_grpc_transport_is_a_final_transport():
    assert issubclass(GrpcTransport, Transport)
    assert getattr(GrpcTransport, "__final__", False)
    assert getattr(GrpcSession, "__final__", False)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("grpcs://global.example:1234", "grpcs://global.example:1234"),
        ("grpc://10.0.0.1", "grpc://10.0.0.1:5685"),
        ("global.example", "grpcs://global.example:5685"),
        ("grpcs://[::1]:99", "grpcs://[::1]:99"),
    ],
)
def test_addresses_default_to_tls_and_port_5685(address, expected):
    assert GrpcTransport.client(address).address == expected


@pytest.mark.parametrize("address", ["http://x:1", "grpc://", "grpcs://x:notaport", "grpc://x:1/p"])
def test_bad_addresses_are_refused(address):
    with pytest.raises(ConfigError, match=r"grpcs://host:port"):
        GrpcTransport.client(address)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_frame_size": 0}, "max_frame_size"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"keepalive_interval": 0}, "keepalive_interval"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"ca_file": "ca.pem", "skip_verify": True}, "ca_file and skip_verify"),
        ({"zone": "zone\n1"}, "zone"),
        ({"credentials": "tök"}, "credentials"),
    ],
)
def test_bad_client_settings_name_the_option(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        GrpcTransport.client("grpcs://global:5685", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"cert_file": "a.crt"}, "cert_file and key_file"),
        ({"min_tls_version": "1.1"}, "min_tls_version"),
        ({"keepalive_min_interval": -1}, "keepalive_min_interval"),
    ],
)
def test_bad_server_settings_name_the_option(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        GrpcTransport.server("grpcs://0.0.0.0:0", **kwargs)


def test_tls_options_on_a_plaintext_address_are_refused():
    with pytest.raises(ConfigError, match="skip_verify needs a grpcs:// address"):
        GrpcTransport.client("grpc://global:5685", skip_verify=True)
    with pytest.raises(ConfigError, match="ca_file needs a grpcs:// address"):
        GrpcTransport.client("grpc://global:5685", ca_file="ca.pem")
    with pytest.raises(ConfigError, match="min_tls_version need a grpcs:// address"):
        GrpcTransport.server("grpc://0.0.0.0:0", min_tls_version="1.3")


def test_options_objects_and_with_zone():
    transport = GrpcTransport(
        "grpcs://global:5685",
        client=GrpcClientOptions(zone="zone-1", credentials="secret", skip_verify=True),
        server=GrpcServerOptions(extra_names=["kds.example"]),
    )
    assert transport.server_options.extra_names == ("kds.example",)
    assert "secret" not in repr(transport.client_options)
    other = transport.with_zone("zone-2", credentials="other")
    assert other.client_options.zone == "zone-2"
    assert other.client_options.skip_verify
    assert transport.client_options.zone == "zone-1"
    with pytest.raises(ConfigError, match="zone"):
        transport.with_zone("")


# -- frames ------------------------------------------------------------------------------


async def test_frames_arrive_in_order_without_loss_in_both_directions(tmp_path, scheme):
    limit = 64 * 1024
    rng = random.Random(7)
    up = [b"", b"x" * limit, *(rng.randbytes(rng.randrange(0, 2048)) for _ in range(300)), b""]
    down = [rng.randbytes(rng.randrange(0, limit + 1)) for _ in range(100)] + [b"y" * limit]
    async with serving(tmp_path, scheme=scheme, max_frame_size=limit) as served:
        zone, global_ = await served.pair(max_frame_size=limit)
        assert zone.max_frame_size == global_.max_frame_size == limit
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
        assert all(type(frame) is bytes for frame in received_up + received_down)
        await zone.aclose()


async def test_oversized_frame_is_refused_and_never_sent(tmp_path):
    async with serving(tmp_path, max_frame_size=10) as served:
        zone, global_ = await served.pair(max_frame_size=10)
        with pytest.raises(
            FrameTooLargeError, match="11 bytes exceeds the frame size limit of 10"
        ) as caught:
            await zone.send(b"y" * 11)
        assert (caught.value.size, caught.value.limit) == (11, 10)
        with pytest.raises(FrameTooLargeError):
            await global_.send(b"z" * 11)
        # The session is still usable and the oversized frames never arrive.
        await zone.send(b"next")
        await global_.send(b"back")
        assert await receive(global_) == b"next"
        assert await receive(zone) == b"back"
        await zone.aclose()


async def test_sessions_use_the_smaller_frame_limit_of_both_sides(tmp_path):
    async with serving(tmp_path, max_frame_size=1000) as served:
        zone, global_ = await served.pair(max_frame_size=100)
        assert zone.max_frame_size == global_.max_frame_size == 100
        with pytest.raises(FrameTooLargeError):
            await global_.send(b"x" * 101)
        await zone.aclose()


async def test_sent_frames_are_copies(tmp_path):
    async with serving(tmp_path, scheme="grpc") as served:
        zone, global_ = await served.pair()
        buffer = bytearray(b"abc")
        await zone.send(buffer)
        buffer[:] = b"xyz"
        assert await receive(global_) == b"abc"
        await zone.aclose()


async def test_a_sender_waits_while_the_peer_does_not_read(tmp_path):
    frame = b"f" * (64 * 1024)
    count = 2000  # 125 MiB: far more than any buffer between the two
    async with serving(tmp_path, scheme="grpc") as served:
        zone, global_ = await served.pair()
        sent = 0
        # An observation window, not a synchronisation: without backpressure the
        # whole stream would be accepted within it.
        with anyio.move_on_after(1.0):
            for _ in range(count):
                await zone.send(frame)
                sent += 1
        assert 0 < sent < count
        assert sent * len(frame) < 32 * 1024 * 1024  # bounded buffering
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:

                async def send_rest():
                    for number in range(sent, count):
                        await zone.send(number.to_bytes(4, "big"))

                task_group.start_soon(send_rest)
                for _ in range(sent):
                    assert await global_.receive() == frame
                for number in range(sent, count):
                    assert await global_.receive() == number.to_bytes(4, "big")
        await zone.aclose()


async def test_cancelled_receives_lose_no_frame(tmp_path):
    frames = [b"%d" % number for number in range(300)]
    async with serving(tmp_path, scheme="grpc") as served:
        zone, global_ = await served.pair()
        rng = random.Random(3)
        received: list[bytes] = []
        cancelled = 0

        async def send_all():
            for frame in frames:
                await zone.send(frame)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(send_all)
                while len(received) < len(frames):
                    # Deadlines of a few microseconds cancel receives at every stage.
                    with anyio.move_on_after(rng.random() / 2000) as scope:
                        received.append(await global_.receive())
                    cancelled += scope.cancelled_caught
        assert received == frames
        assert cancelled > 0
        await zone.aclose()


# -- closing -----------------------------------------------------------------------------


@pytest.mark.parametrize("closer", ["zone", "global"])
async def test_peer_close_is_seen_after_the_frames_sent_before_it(tmp_path, scheme, closer):
    async with serving(tmp_path, scheme=scheme) as served:
        zone, global_ = await served.pair()
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


async def test_aclose_is_idempotent_and_keeps_the_first_reason(tmp_path):
    async with serving(tmp_path, scheme="grpc") as served:
        zone, global_ = await served.pair()
        await zone.aclose("first")
        await zone.aclose("second")
        with pytest.raises(SessionClosedError) as caught:
            await receive(global_)
        assert caught.value.reason == "first"
        with pytest.raises(SessionClosedError) as caught:
            await zone.send(b"x")
        assert caught.value.reason == "first"


async def test_closes_wake_blocked_receivers_and_senders(tmp_path):
    async with serving(tmp_path, scheme="grpc") as served:
        zone, global_ = await served.pair()
        errors: dict[str, SessionClosedError] = {}

        async def expect_closed(name, operation):
            with pytest.raises(SessionClosedError) as caught:
                await operation
            errors[name] = caught.value

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(expect_closed, "zone receive", zone.receive())
                task_group.start_soon(expect_closed, "global receive", global_.receive())
                await anyio.wait_all_tasks_blocked()
                assert not errors
                await global_.aclose("stop")
        assert (errors["zone receive"].reason, errors["zone receive"].by_peer) == ("stop", True)
        assert (errors["global receive"].reason, errors["global receive"].by_peer) == (
            "stop",
            False,
        )

        # Senders blocked because the peer does not read are woken by either close.
        for closer in ("zone", "global"):
            # The zone's close gives up flushing what the global never reads after this.
            zone, global_ = await served.pair(close_timeout=0.2)
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as task_group:

                    async def flood(session):
                        while True:
                            await session.send(b"x" * 60000)

                    task_group.start_soon(expect_closed, "flood", flood(zone))
                    await anyio.wait_all_tasks_blocked()
                    assert not errors.get("flood")
                    await (zone if closer == "zone" else global_).aclose("enough")
            error = errors.pop("flood")
            assert (error.reason, error.by_peer) == ("enough", closer == "global")
            await zone.aclose()
            await global_.aclose()


async def test_context_manager_closes_and_iteration_ends_with_the_error(tmp_path):
    async with serving(tmp_path, scheme="grpc") as served:
        async with await served.client().connect() as zone:
            global_ = await served.server.accept()
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


async def test_handler_return_closes_the_session(tmp_path):
    async def handler(session):
        await session.send(await session.receive())

    async with serving(tmp_path, handler, scheme="grpc") as served:
        zone = await served.client().connect()
        await zone.send(b"echo")
        assert await receive(zone) == b"echo"
        with pytest.raises(SessionClosedError) as caught:
            await receive(zone)
        assert caught.value.by_peer
        await zone.aclose()


async def test_failing_handler_ends_only_its_session_and_is_logged(tmp_path, caplog):
    async def handler(session):
        frame = await session.receive()
        if frame == b"crash":
            raise RuntimeError("handler bug")
        await session.send(frame)

    with caplog.at_level(logging.ERROR, logger="kds_transports.grpc"):
        async with serving(tmp_path, handler, scheme="grpc") as served:
            doomed = await served.client().connect()
            await doomed.send(b"crash")
            with pytest.raises(SessionClosedError, match="session handler failed"):
                await receive(doomed)
            healthy = await served.client().connect()
            await healthy.send(b"fine")
            assert await receive(healthy) == b"fine"
            await doomed.aclose()
            await healthy.aclose()
    assert any("handler bug" in (record.exc_text or "") for record in caplog.records)


async def test_stopping_the_server_ends_every_session_with_a_reason(tmp_path, scheme):
    zones = []
    async with serving(tmp_path, scheme=scheme) as served:
        for _ in range(3):
            zone, _ = await served.pair()
            zones.append(zone)
        client = served.client()
    for zone in zones:
        with pytest.raises(SessionClosedError, match="server stopped") as caught:
            await receive(zone)
        assert caught.value.by_peer
        await zone.aclose()
    with pytest.raises(ConnectError, match="unavailable"):
        await client.connect()


async def test_a_close_that_cannot_be_flushed_still_tells_the_zone_why(tmp_path):
    # The zone does not read, so the global's close message is stuck behind its
    # frames; after close_timeout the reason travels in the call's status.
    async with serving(tmp_path, scheme="grpc", close_timeout=0.5) as served:
        zone, global_ = await served.pair()
        with anyio.move_on_after(1.0):  # fills every buffer (observation window)
            while True:
                await global_.send(b"x" * 60000)
        with anyio.fail_after(TIMEOUT):
            await global_.aclose("maintenance")
            with pytest.raises(SessionClosedError) as caught:
                await drain(zone)
        assert (caught.value.reason, caught.value.by_peer) == ("maintenance", True)
        await zone.aclose()


# -- streams that end without a close (proxies, load balancers) --------------------------


async def test_a_zone_stream_that_just_ends_is_reported_not_silent(tmp_path):
    async with serving(tmp_path, scheme="grpc") as served:
        endpoint = served.address.removeprefix("grpc://")
        async with grpc.aio.insecure_channel(endpoint) as channel:
            call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(METHOD)()
            await call.write(b"\x00hello")
            await call.done_writing()  # a clean end of stream, without a close message
            global_ = await served.server.accept()
            assert await receive(global_) == b"hello"
            with pytest.raises(SessionClosedError, match="without a reason") as caught:
                await receive(global_)
            assert caught.value.by_peer
            assert await call.code() == grpc.StatusCode.OK


async def test_a_malformed_message_ends_the_session(tmp_path):
    async with serving(tmp_path, scheme="grpc") as served:
        endpoint = served.address.removeprefix("grpc://")
        async with grpc.aio.insecure_channel(endpoint) as channel:
            call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(METHOD)()
            # Two packed frames, the second one cut short.
            await call.write(b"\x02\x00\x00\x00\x02ok\x00\x00\x00\x05abc")
            global_ = await served.server.accept()
            with pytest.raises(SessionClosedError, match="malformed packed message") as caught:
                await receive(global_)
            assert caught.value.by_peer


async def test_a_global_stream_that_just_ends_is_reported_not_silent():
    async def behaviour(_requests, context):
        await context.send_initial_metadata((("kds-max-frame-size", "1000"),))
        await context.write(b"\x00hi")
        # Returns: status OK, no close message, as a load balancer's clean EOF.

    server = grpc.aio.server()
    method = grpc.stream_stream_rpc_method_handler(behaviour)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("kds.v1.Sync", {"Session": method}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        zone = await GrpcTransport.client(f"grpc://127.0.0.1:{port}").connect()
        assert zone.max_frame_size == 1000
        assert await receive(zone) == b"hi"
        with pytest.raises(
            SessionClosedError, match="the global ended the stream without a reason"
        ):
            await receive(zone)
        with pytest.raises(SessionClosedError):
            await zone.send(b"x")
        await zone.aclose()
    finally:
        await server.stop(None)


# -- connecting, identity ----------------------------------------------------------------


async def test_connect_without_a_listener_is_refused():
    with anyio.fail_after(TIMEOUT), pytest.raises(ConnectError) as caught:
        await GrpcTransport.client("grpc://127.0.0.1:1").connect()
    assert caught.value.address == "grpc://127.0.0.1:1"
    assert "unavailable" in caught.value.reason


async def test_connecting_to_port_0_is_a_config_error():
    with pytest.raises(ConfigError, match="port 0"):
        await GrpcTransport.client("grpc://127.0.0.1:0").connect()


async def test_serving_twice_and_a_port_in_use_are_refused():
    async def handler(session):
        await session.aclose()

    transport = GrpcTransport.server("grpc://127.0.0.1:0")
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(transport.serve, handler)
        with pytest.raises(TransportError, match="already being served"):
            await transport.serve(handler)
        with pytest.raises(TransportError, match=f"cannot listen on {address}"):
            await GrpcTransport.server(address).serve(handler)
        task_group.cancel_scope.cancel()


async def test_without_a_hook_the_identity_is_none(tmp_path):
    async with serving(tmp_path) as served:
        zone, global_ = await served.pair(zone="zone-1", credentials="token")
        assert global_.peer.identity is None
        assert global_.peer.address.startswith("127.0.0.1:")
        # The zone verified the global's certificate for the name it dialled.
        assert zone.peer.address == served.address
        assert zone.peer.identity == "127.0.0.1"
        await zone.aclose()


async def test_the_authenticate_hook_sets_the_identity_or_refuses_with_a_reason(tmp_path, caplog):
    tokens = {"token-1": "zone-1", "token-2": "zone-2"}
    calls = []

    async def authenticate(zone, credentials, peer_address):
        calls.append((zone, credentials, peer_address))
        if credentials == "boom":
            raise RuntimeError("token service down")
        if credentials not in tokens or tokens[credentials] != zone:
            raise PermissionError(f"bad token for zone {zone!r}")
        return f"verified:{zone}"

    with caplog.at_level(logging.WARNING, logger="kds_transports.grpc"):
        async with serving(tmp_path, authenticate=authenticate) as served:
            zone, global_ = await served.pair(zone="zone-1", credentials="token-1")
            assert global_.peer.identity == "verified:zone-1"
            assert calls[0][:2] == ("zone-1", "token-1")
            assert calls[0][2] == global_.peer.address
            await zone.aclose()

            with pytest.raises(ConnectError, match="bad token for zone 'zone-2'") as caught:
                await served.client(zone="zone-2", credentials="token-1").connect()
            assert "refused the session" in caught.value.reason
            with pytest.raises(ConnectError, match="bad token for zone None"):
                await served.client().connect()
            with pytest.raises(ConnectError, match="could not check the credentials") as caught:
                await served.client(zone="zone-1", credentials="boom").connect()
            assert "token service down" not in str(caught.value)
    assert any("token service down" in (record.exc_text or "") for record in caplog.records)


async def test_many_concurrent_sessions_stay_isolated(tmp_path):
    zones = 10
    frames_each = 50

    async def authenticate(zone, credentials, peer_address):
        return zone

    async def echo(session):
        identity = session.peer.identity.encode()
        while True:
            frame = await session.receive()
            await session.send(identity + b":" + frame)

    async def zone_run(served, number):
        name = f"zone-{number}"
        async with await served.client(zone=name, buffer_size=1).connect() as session:
            expected = [f"{name}:{name}-{index}".encode() for index in range(frames_each)]

            async def send_all():
                for index in range(frames_each):
                    await session.send(f"{name}-{index}".encode())

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(send_all)
                received = [await session.receive() for _ in range(frames_each)]
            assert received == expected

    async with serving(tmp_path, echo, authenticate=authenticate) as served:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as task_group:
                for number in range(zones):
                    task_group.start_soon(zone_run, served, number)


async def test_tls_1_3_minimum_admits_grpc_zones(tmp_path):
    async with serving(tmp_path, min_tls_version="1.3") as served:
        zone, global_ = await served.pair()
        await zone.send(b"over TLS 1.3")
        assert await receive(global_) == b"over TLS 1.3"
        await zone.aclose()


@pytest.mark.parametrize(
    ("negotiated", "refused"),
    [([b"TLSv1.3"], False), ([b"TLSv1.2"], True), ([], True)],
)
def test_tls_1_3_minimum_refuses_sessions_that_negotiated_less(negotiated, refused):
    # grpcio cannot raise the handshake's floor; the session check is what enforces it.
    class Context:
        def auth_context(self):
            return {"ssl_tls_version": negotiated} if negotiated else {}

    async def handler(session):
        await session.aclose()

    transport = GrpcTransport.server("grpcs://127.0.0.1:0", min_tls_version="1.3")
    listener = _Listener(transport, handler)
    context: Any = Context()  # only what the check reads
    refusal = listener._tls_refusal(context)
    if refused:
        assert refusal is not None
        assert "requires TLS 1.3 (min_tls_version)" in refusal
    else:
        assert refusal is None
    lenient = _Listener(GrpcTransport.server("grpcs://127.0.0.1:0"), handler)
    assert lenient._tls_refusal(context) is None


async def test_a_plaintext_zone_cannot_reach_a_tls_global(tmp_path):
    async with serving(tmp_path) as served:
        plaintext = served.address.replace("grpcs://", "grpc://")
        with anyio.fail_after(TIMEOUT), pytest.raises(ConnectError, match="dial a grpcs://"):
            await GrpcTransport.client(plaintext, connect_timeout=3).connect()


# -- the sync engines over gRPC ----------------------------------------------------------

FAST = SyncOptions(
    heartbeat_interval=0.1,
    heartbeat_timeout=0.6,
    handshake_timeout=2.0,
    reconnect_base=0.02,
    reconnect_max=0.2,
    insight_interval=0.2,
)


async def test_engines_replicate_a_mesh_over_grpc_with_tls(tmp_path):
    mesh = ResourceKey("Mesh", None, "default")
    global_store = MemoryStore()
    await global_store.open()
    await global_store.commit([Upsert(key=mesh, spec={})])
    zone_store = MemoryStore()
    await zone_store.open()

    async def authenticate(zone, credentials, peer_address):
        if credentials != f"token-for-{zone}":
            raise PermissionError("unknown token")
        return zone

    server = GrpcTransport.server(
        "grpcs://127.0.0.1:0", work_dir=tmp_path, authenticate=authenticate
    )
    engine = GlobalEngine(global_store, server, options=FAST)
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(engine.run)
        client = GrpcTransport.client(
            address,
            zone="zone-1",
            credentials="token-for-zone-1",
            ca_file=tmp_path / CERT_FILE_NAME,
        )
        zone = ZoneEngine(zone_store, client, zone="zone-1", options=FAST)
        task_group.start_soon(zone.run)
        with anyio.fail_after(TIMEOUT):
            while True:
                if await zone_store.find(mesh) is not None:
                    break
                await anyio.sleep(0.01)  # polling a condition with no event to wait on
        assert engine.connected_zones == ["zone-1"]
        task_group.cancel_scope.cancel()
    await global_store.aclose()
    await zone_store.aclose()
