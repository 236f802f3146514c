"""NatsTransport over a real nats-server: configuration, large frames, flow control, HA.

Misbehaving peers (a zone that skips a sequence number, or sends beyond its
credit) are played by a raw nats-py connection speaking the message format of
:mod:`kds_transports.nats.wire` by hand.
"""

from __future__ import annotations

import importlib.util
import math
import random
from contextlib import asynccontextmanager

import anyio
import nats
import pytest

from kds import ConfigError, ConnectError, FrameTooLargeError, SessionClosedError, TransportError
from kds.testing.nats import NatsServer
from kds_transports.nats import NatsSession, NatsTransport, wire
from kds_transports.nats.wire import FRAME_COST, Kind

pytestmark = pytest.mark.anyio

TIMEOUT = 15  # seconds; a deadline for conditions, never a pause
KEEPALIVE = 0.5  # seconds: keepalive interval and timeout
SMALL_PAYLOAD = 4096  # bytes: a server max_payload that makes ordinary frames travel in parts


@pytest.fixture
def nats_server():
    with NatsServer() as server:
        yield server


@pytest.fixture
def small_payload_server():
    with NatsServer(max_payload=SMALL_PAYLOAD) as server:
        yield server


def client(address: str, **options) -> NatsTransport:
    options.setdefault("keepalive_interval", KEEPALIVE)
    options.setdefault("keepalive_timeout", KEEPALIVE)
    return NatsTransport.client(address, **options)


def listener(address: str, **options) -> NatsTransport:
    options.setdefault("keepalive_interval", KEEPALIVE)
    options.setdefault("keepalive_timeout", KEEPALIVE)
    return NatsTransport.server(address, **options)


@asynccontextmanager
async def serving(transport: NatsTransport, handler=None):
    """Serve *transport*; yields a stream of its sessions (each kept open until the end)."""
    send, receive = anyio.create_memory_object_stream[NatsSession](100)

    async def hand_over(session):
        await send.send(session)
        await anyio.sleep_forever()

    with send, receive:
        async with anyio.create_task_group() as group:
            await group.start(transport.serve, handler or hand_over)
            yield receive
            group.cancel_scope.cancel()


async def next_session(sessions) -> NatsSession:
    with anyio.fail_after(TIMEOUT):
        session: NatsSession = await sessions.receive()
        return session


@asynccontextmanager
async def raw_connection(server: NatsServer):
    connection = await nats.connect(server.url, allow_reconnect=False)
    try:
        yield connection
    finally:
        await connection.close()


async def subscribed(connection) -> None:
    """Return once the server has *connection*'s subscriptions.

    Two round trips: nats-py writes a flush's PING ahead of a SUB still queued for
    its writer task; the first lets that task run, the second follows the SUB.
    """
    for _ in range(2):
        await connection.flush()


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("127.0.0.1", "nats://127.0.0.1:4222"),
        ("tls://nats.example", "tls://nats.example:4222"),
        ("nats://a:1, nats://b:2", "nats://a:1,nats://b:2"),
        ("nats://[::1]:4223", "nats://[::1]:4223"),
    ],
)
def test_addresses_are_normalised(address, expected):
    assert NatsTransport.client(address).address == expected


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("grpc://global:5685", "unknown scheme"),
        ("nats://user:secret@nats:4222", "credentials in the address"),
        ("nats://nats:4222/kds", "unexpected parts"),
        ("nats://nats:99999", "out of range"),
        ("nats://a:4222,tls://b:4222", "mixes nats:// and tls://"),
    ],
)
def test_bad_addresses_are_refused_with_the_reason(address, problem):
    with pytest.raises(ConfigError, match=problem):
        NatsTransport.client(address)


@pytest.mark.parametrize("address", ["nats://user:s3cret@nats:4222", "nats://s3cret@nats:4222"])
def test_a_refused_address_is_quoted_without_its_credentials(address):
    with pytest.raises(ConfigError) as refused:
        NatsTransport.client(address)
    assert "s3cret" not in str(refused.value)
    assert "nats://****@nats:4222" in str(refused.value)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"user": "kds"}, "user and password"),
        ({"password": "secret"}, "user and password"),
        ({"user": "kds", "password": "secret", "token": "t"}, "user/password and token"),
        ({"token": ""}, "token must be a non-empty string"),
        ({"ca_file": "ca.pem"}, "ca_file needs a tls:// address"),
        ({"server_name": "nats.internal"}, "server_name needs a tls:// address"),
        ({"prefix": "kds.>"}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"window": 0}, "window"),
        ({"keepalive_timeout": 0}, "keepalive_timeout"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"zone": ""}, "zone"),
    ],
)
def test_invalid_options_raise_config_errors_that_name_them(options, named):
    with pytest.raises(ConfigError, match=named):
        NatsTransport.client("nats://127.0.0.1:4222", **options)


def test_client_certificates_come_in_pairs():
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        NatsTransport.client("tls://nats:4222", cert_file="client.crt")


def test_a_creds_file_needs_the_nkeys_package_that_signs_with_it(tmp_path):
    creds_file = tmp_path / "zone.creds"
    if importlib.util.find_spec("nkeys") is None:
        with pytest.raises(ConfigError, match=r"creds_file needs the nkeys package"):
            NatsTransport.client("nats://127.0.0.1:4222", creds_file=creds_file)
    else:
        transport = NatsTransport.client("nats://127.0.0.1:4222", creds_file=creds_file)
        assert transport.connection_options.creds_file == creds_file
    with pytest.raises(ConfigError, match="token and creds_file exclude each other"):
        NatsTransport.client("nats://127.0.0.1:4222", creds_file=creds_file, token="t")  # noqa: S106


def test_options_objects_and_with_zone():
    transport = NatsTransport.client(
        "nats://127.0.0.1:4222", zone="zone-1", credentials="token-1", prefix="fleet.kds"
    )
    assert transport.prefix == "fleet.kds"
    assert transport.client_options.zone == "zone-1"
    assert "token-1" not in repr(transport.client_options)
    other = transport.with_zone("zone-2", credentials="token-2")
    assert (other.client_options.zone, other.client_options.credentials) == ("zone-2", "token-2")
    assert transport.client_options.zone == "zone-1"
    with pytest.raises(ConfigError, match="zone"):
        transport.with_zone("")


# -- listening and dialling ---------------------------------------------------------------


async def test_a_global_that_cannot_reach_nats_fails_before_listening(nats_server):
    url = nats_server.url
    nats_server.stop()
    with pytest.raises(TransportError, match="cannot reach the NATS server"):
        await listener(url).serve(unused_handler)


async def test_a_transport_is_served_once_at_a_time(nats_server):
    transport = listener(nats_server.url)
    async with serving(transport):
        with pytest.raises(TransportError, match="already being served"):
            await transport.serve(unused_handler)


async def test_without_a_global_connect_fails_at_once_and_says_why(nats_server):
    with anyio.fail_after(TIMEOUT), pytest.raises(ConnectError, match="no global is serving"):
        await client(nats_server.url, connect_timeout=TIMEOUT).connect()


async def test_prefixes_keep_federations_apart(nats_server):
    async with serving(listener(nats_server.url, prefix="one")) as sessions:
        with pytest.raises(ConnectError, match=r"no global is serving on two\.connect"):
            await client(nats_server.url, prefix="two").connect()
        zone = await client(nats_server.url, prefix="one").connect()
        global_ = await next_session(sessions)
        assert zone.send_subject == f"one.s.{zone.session_id}.z2g"
        assert global_.receive_subject == zone.send_subject
        await zone.aclose()


async def test_the_zone_name_and_credentials_reach_the_authenticate_hook(nats_server):
    seen = []

    async def authenticate(zone, credentials, address):
        seen.append((zone, credentials, address))
        if zone == "broken":
            raise RuntimeError("the token store is down")
        if credentials != f"token-{zone}":
            raise PermissionError(f"bad token for {zone}")
        return f"verified-{zone}"

    async with serving(listener(nats_server.url, authenticate=authenticate)) as sessions:
        zone = await client(nats_server.url, zone="z1", credentials="token-z1").connect()
        global_ = await next_session(sessions)
        assert global_.peer.identity == "verified-z1"
        assert zone.peer.identity is None  # NATS does not say which client answered
        assert seen[0][:2] == ("z1", "token-z1")
        assert seen[0][2] == "127.0.0.1"  # as NATS saw the zone
        await zone.send(b"hello")
        with anyio.fail_after(TIMEOUT):
            assert await global_.receive() == b"hello"
        await zone.aclose()

        with pytest.raises(ConnectError, match="authentication failed: bad token for z2"):
            await client(nats_server.url, zone="z2", credentials="stolen").connect()
        with pytest.raises(ConnectError, match="the global could not check the credentials"):
            await client(nats_server.url, zone="broken", credentials="x").connect()


# -- large frames --------------------------------------------------------------------------


async def test_frames_larger_than_a_message_travel_in_parts_and_arrive_whole(
    small_payload_server,
):
    url = small_payload_server.url
    sizes: list[int] = []
    kinds: list[Kind] = []
    frames = [random.Random(size).randbytes(size) for size in (0, 1, 4087, 4088, 50_000, 4087)]
    all_seen = anyio.Event()

    async def record(message):
        sizes.append(len(message.data))
        kinds.append(wire.decode(message.data)[0])
        if kinds.count(Kind.DATA) == len(frames):
            all_seen.set()

    async with raw_connection(small_payload_server) as monitor:
        await monitor.subscribe("kds.s.*.z2g", cb=record)
        await subscribed(monitor)
        async with serving(listener(url, max_frame_size=64 * 1024)) as sessions:
            zone = await client(url, max_frame_size=64 * 1024).connect()
            global_ = await next_session(sessions)
            assert zone.max_frame_size == 64 * 1024
            with pytest.raises(FrameTooLargeError):
                await zone.send(b"\0" * (64 * 1024 + 1))
            for frame in frames:
                await zone.send(frame)
            with anyio.fail_after(TIMEOUT):
                received = [await global_.receive() for _ in frames]
            assert received == frames
            await zone.aclose()
            with anyio.fail_after(TIMEOUT):
                await all_seen.wait()  # the monitor may lag the global a little
    assert max(sizes) <= SMALL_PAYLOAD
    per_message = SMALL_PAYLOAD - wire.HEADER.size
    expected_parts = sum(max(0, math.ceil(len(frame) / per_message) - 1) for frame in frames)
    assert kinds.count(Kind.PART) == expected_parts  # and nothing of the oversized frame
    assert kinds.count(Kind.DATA) == len(frames)


async def test_the_default_limit_frame_crosses_a_default_server(nats_server):
    async with serving(listener(nats_server.url)) as sessions:
        zone = await client(nats_server.url).connect()
        global_ = await next_session(sessions)
        frame = random.Random(1).randbytes(zone.max_frame_size)  # 4 MiB, 1 MiB messages
        await global_.send(frame)
        with anyio.fail_after(TIMEOUT):
            assert await zone.receive() == frame
        await zone.aclose()


# -- flow control ----------------------------------------------------------------------------


async def test_a_sender_waits_for_credit_and_nothing_is_lost_once_the_peer_reads(nats_server):
    window, size, count = 64 * 1024, 16 * 1024, 20
    # The first frame always goes; the others while they fit in the window.
    allowed = 1 + (window - (size + FRAME_COST)) // (size + FRAME_COST)
    frames = [bytes([index]) * size for index in range(count)]
    kinds: list[Kind] = []
    credit_asked = anyio.Event()

    async def record(message):
        kind = wire.decode(message.data)[0]
        kinds.append(kind)
        if kind == Kind.CREDIT:
            credit_asked.set()

    async with raw_connection(nats_server) as monitor:
        await monitor.subscribe("kds.s.*.z2g", cb=record)
        await subscribed(monitor)
        async with serving(listener(nats_server.url, window=window)) as sessions:
            zone = await client(nats_server.url).connect()
            global_ = await next_session(sessions)
            sent = 0

            async def send_all():
                nonlocal sent
                for frame in frames:
                    await zone.send(frame)
                    sent += 1

            async with anyio.create_task_group() as group:
                group.start_soon(send_all)
                # The zone asks for credit once the global's window is used up.
                with anyio.fail_after(TIMEOUT):
                    await credit_asked.wait()
                assert kinds[: kinds.index(Kind.CREDIT)].count(Kind.DATA) == allowed
                assert sent == allowed
                with anyio.fail_after(TIMEOUT):
                    received = [await global_.receive() for _ in frames]
            assert received == frames
            await zone.aclose()


async def forge_zone(server: NatsServer, connection, *, window: int = 1 << 20):
    """Open a session by hand, as a zone would: returns its subjects and the global's answer."""
    session_id = "forged-session-1"
    z2g, g2z = wire.session_subjects("kds", session_id)
    inbox = await connection.subscribe(g2z)
    request = wire.ConnectRequest(
        session=session_id,
        zone="forger",
        credentials=None,
        address="127.0.0.1",
        max_frame_size=1 << 20,
        window=window,
        keepalive_interval=KEEPALIVE,
        max_payload=connection.max_payload,
    )
    await connection.publish(wire.connect_subject("kds"), request.to_json(), reply=g2z)
    kind, sequence, body = wire.decode((await inbox.next_msg(timeout=TIMEOUT)).data)
    assert (kind, sequence) == (Kind.ACCEPT, 0)
    return z2g, inbox, wire.ConnectReply.from_json(body)


async def close_reason_sent_to(inbox) -> str:
    """The reason of the CLOSE the global publishes (after any keepalive messages)."""
    with anyio.fail_after(TIMEOUT):
        while True:
            kind, _, body = wire.decode((await inbox.next_msg(timeout=TIMEOUT)).data)
            if kind == Kind.CLOSE:
                return body.decode()


async def test_a_gap_in_the_sequence_ends_the_session_after_the_frames_before_it(nats_server):
    async with serving(listener(nats_server.url)) as sessions, raw_connection(nats_server) as raw:
        z2g, inbox, _ = await forge_zone(nats_server, raw)
        global_ = await next_session(sessions)
        for sequence in (1, 2, 4):  # message 3 "lost"
            await raw.publish(z2g, wire.encode(Kind.DATA, sequence, b"frame %d" % sequence))
        with anyio.fail_after(TIMEOUT):
            assert [await global_.receive(), await global_.receive()] == [b"frame 1", b"frame 2"]
            with pytest.raises(SessionClosedError) as caught:
                await global_.receive()
        assert caught.value.by_peer
        assert caught.value.reason.startswith("messages lost: expected message 3 from the zone")
        assert await close_reason_sent_to(inbox) == caught.value.reason  # the zone is told


async def test_a_peer_sending_beyond_its_credit_is_cut_off_not_silently_dropped(nats_server):
    window = 32 * 1024
    async with (
        serving(listener(nats_server.url, window=window)) as sessions,
        raw_connection(nats_server) as raw,
    ):
        z2g, inbox, reply = await forge_zone(nats_server, raw)
        assert reply.window == window
        global_ = await next_session(sessions)
        frame = b"\x01" * (8 * 1024)
        fitting = window // (len(frame) + FRAME_COST)
        for sequence in range(1, fitting + 3):  # never waiting for an ACK
            await raw.publish(z2g, wire.encode(Kind.DATA, sequence, frame))
        # Take nothing before the excess has arrived: each frame taken gives credit
        # back, and an early ACK would make room for the frames that should not fit.
        with anyio.fail_after(TIMEOUT):
            while global_._end is None:  # noqa: ASYNC110 -- the session's own state, polled
                await anyio.sleep(0.01)
        received: list[bytes] = []
        with anyio.fail_after(TIMEOUT), pytest.raises(SessionClosedError) as caught:
            await receive_all(global_, received)
        assert received == [frame] * fitting
        assert "protocol violation" in caught.value.reason
        assert f"sent more than the {window}-byte window" in caught.value.reason
        assert await close_reason_sent_to(inbox) == caught.value.reason


# -- several globals on one NATS (HA) ---------------------------------------------------------


async def test_each_session_is_served_by_exactly_one_of_two_globals(nats_server):
    url = nats_server.url
    served: dict[str, list[str]] = {"global-a": [], "global-b": []}

    def echo_as(name):
        async def handler(session):
            served[name].append(session.session_id)
            async for frame in session:
                await session.send(frame)

        return handler

    zones = 32  # the chance that one global gets none is 2 * 2**-32
    stops = {name: anyio.CancelScope() for name in served}

    async def run_global(name, *, task_status):
        with stops[name]:
            await listener(url, instance=name).serve(echo_as(name), task_status=task_status)

    async with anyio.create_task_group() as group:
        for name in served:
            await group.start(run_global, name)
        sessions: list[NatsSession] = []

        async def dial(index):
            session = await client(url, zone=f"zone-{index}").connect()
            sessions.append(session)
            await session.send(b"ping")
            with anyio.fail_after(TIMEOUT):
                assert await session.receive() == b"ping"

        async with anyio.create_task_group() as dialling:
            for index in range(zones):
                dialling.start_soon(dial, index)
        ids = [session.session_id for session in sessions]
        assert sorted(served["global-a"] + served["global-b"]) == sorted(ids)
        assert not set(served["global-a"]) & set(served["global-b"])
        assert served["global-a"]
        assert served["global-b"]
        for session in sessions:
            owner = "global-a" if session.session_id in served["global-a"] else "global-b"
            assert session.peer.address.startswith(owner)

        # One global stops: its zones are told, and their next sessions go to the other.
        stops["global-a"].cancel()
        for session in sessions:
            if session.session_id in served["global-a"]:
                with anyio.fail_after(TIMEOUT), pytest.raises(SessionClosedError) as caught:
                    await session.receive()
                assert caught.value.reason == "server stopped"
                again = await client(url).connect()
                assert again.peer.address.startswith("global-b")
                await again.aclose()
            await session.aclose()
        stops["global-b"].cancel()


async def receive_all(session: NatsSession, into: list[bytes]) -> None:
    while True:
        into.append(await session.receive())


async def unused_handler(session):
    raise AssertionError("no session was expected")


def test_a_server_given_a_directory_that_does_not_exist_creates_it(tmp_path):
    directory = tmp_path / "not" / "yet"
    with NatsServer(directory) as server:
        assert server.config.exists()
    assert directory.exists()  # a given directory is left in place
