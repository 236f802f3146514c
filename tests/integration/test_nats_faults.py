"""NatsTransport when NATS fails: a restarted server, a frozen one, a global that never answers.

The server is a real nats-server (:class:`~kds.testing.nats.NatsServer`),
stopped, killed, frozen (SIGSTOP) and started again by its own pid. The last
tests run the sync engines over it: replication across a NATS crash while every
plane writes, and two globals on one NATS (HA), one of which vanishes.
"""

from __future__ import annotations

import contextlib
import random
import secrets
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
import nats
import pytest

from kds import ConnectError, ResourceKey, SessionClosedError
from kds.store import Delete, Upsert
from kds.sync import GlobalEngine, SyncOptions, ZoneEngine, tracking_origin
from kds.sync.engines import GLOBAL_ORIGIN
from kds.testing import MemoryStore, TcpRelay
from kds.testing.nats import NatsServer
from kds_stores.sqlite import SQLiteStore
from kds_transports.nats import NatsSession, NatsTransport, wire
from kds_transports.nats.wire import Kind
from tests.property.replication_model import (
    GLOBAL_EXTRAS,
    GLOBAL_KEYS,
    GLOBAL_ORIGINS,
    ZONE_EXTRAS,
    ZONE_KEPT_KEYS,
    ZONE_ORIGINS,
    ZONE_SENT_KEYS,
    GlobalDelete,
    GlobalUpsert,
    Model,
    Op,
    ZoneDelete,
    ZoneUpsert,
    authority_problems,
    comparable_global_view,
    describe_diff,
    expected_global_view,
    expected_zone_view,
    view_of,
)

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


async def test_a_global_whose_connection_is_gone_is_noticed_at_the_next_message():
    # A killed global's connection to NATS closes and NATS drops its subscriptions:
    # the zone's next message is answered "no responders", and the session ends
    # then, not a keepalive timeout later (an hour here).
    with NatsServer() as server:
        async with TcpRelay(server.host, server.port) as relay:
            transport = NatsTransport.server(
                f"nats://{relay.address}", keepalive_interval=3600, keepalive_timeout=3600
            )

            async def echo(session: NatsSession) -> None:
                with contextlib.suppress(SessionClosedError):
                    async for frame in session:
                        await session.send(frame)

            async with anyio.create_task_group() as group:
                await group.start(transport.serve, echo)
                zone = await NatsTransport.client(
                    server.url, keepalive_interval=3600, keepalive_timeout=3600
                ).connect()
                await echo_once(zone)
                relay.refuse_connections()
                await relay.sever_all("the global was killed")

                async def ask_until_answered() -> None:
                    # NATS may not have dropped the subscriptions yet when the first
                    # message arrives (then it is lost): ask again until answered.
                    while True:
                        await zone.send(b"are you there")
                        with anyio.move_on_after(10 * POLL):
                            await zone.receive()

                with anyio.fail_after(TIMEOUT), pytest.raises(SessionClosedError) as ended:
                    await ask_until_answered()
                assert ended.value.by_peer
                assert "the global is gone" in ended.value.reason, ended.value.reason
                await zone.aclose()
                group.cancel_scope.cancel()


async def test_a_stopping_global_answers_every_connect_request_it_received():
    # Requests that reached the global just before it stops find it at every stage
    # of admission (on their way, queued, being admitted, admitted): each gets an
    # answer, a REFUSE or an ACCEPT and then a CLOSE, and none is left for its zone
    # to wait out connect_timeout. Its zone then retries at once, and NATS hands
    # the retry to another global of the queue group, or to this one restarted.
    requests = 20
    with NatsServer() as server:
        connection = await nats.connect(server.url, allow_reconnect=False)
        try:
            answers = await connection.subscribe("kds.s.*.g2z")
            await subscribed(connection)
            transport = NatsTransport.server(
                server.url, keepalive_interval=KEEPALIVE, keepalive_timeout=KEEPALIVE
            )
            ids = [secrets.token_urlsafe(16) for _ in range(requests)]
            async with anyio.create_task_group() as group:
                await group.start(transport.serve, hold)
                for session_id in ids:
                    request = wire.ConnectRequest(
                        session=session_id,
                        zone="zone-1",
                        credentials=None,
                        address="127.0.0.1",
                        max_frame_size=1 << 20,
                        window=1 << 20,
                        keepalive_interval=KEEPALIVE,
                        max_payload=connection.max_payload,
                    )
                    _, g2z = wire.session_subjects("kds", session_id)
                    await connection.publish("kds.connect", request.to_json(), reply=g2z)
                # The server routed every request to the global before this returns.
                await connection.flush()
                group.cancel_scope.cancel()

            final: dict[str, str] = {}
            with anyio.fail_after(TIMEOUT):
                while len(final) < requests:
                    message = await answers.next_msg(timeout=TIMEOUT)
                    kind, _, body = wire.decode(message.data)
                    if kind in (Kind.REFUSE, Kind.CLOSE):
                        final[message.subject.split(".")[2]] = body.decode()
            assert sorted(final) == sorted(ids)
            assert set(final.values()) <= {"the global is shutting down", "server stopped"}
        finally:
            await connection.close()


async def hold(session: NatsSession) -> None:
    await anyio.sleep_forever()


# -- the sync engines over NATS ------------------------------------------------------------

FAST = SyncOptions(
    heartbeat_interval=0.1,
    heartbeat_timeout=0.6,
    handshake_timeout=2.0,
    reconnect_base=0.02,
    reconnect_max=0.2,
    insight_interval=0.2,
)
ZONES = ("zone-1", "zone-2", "zone-3")
WRITES = 30  # changes each plane commits before, while and after NATS is down
WRITE_PAUSE = 0.005  # seconds between two changes of one writer: a steady stream, not a burst
POLL = 0.02  # seconds between two looks at a condition nothing signals


def global_over_nats(address: str, **options) -> NatsTransport:
    options.setdefault("keepalive_interval", KEEPALIVE)
    options.setdefault("keepalive_timeout", KEEPALIVE)
    return NatsTransport.server(address, reconnect_wait=0.2, **options)


def zone_over_nats(address: str, zone: str, **options) -> NatsTransport:
    options.setdefault("keepalive_interval", KEEPALIVE)
    options.setdefault("keepalive_timeout", KEEPALIVE)
    return NatsTransport.client(address, zone=zone, connect_timeout=2.0, **options)


async def until(condition, what: str, *, within: float = TIMEOUT) -> None:
    """Return once *condition()* holds; fail naming *what* after *within* seconds."""
    with anyio.move_on_after(within):
        while True:
            if condition():
                return
            await anyio.sleep(POLL)  # polling: the engines signal none of these conditions
    raise AssertionError(f"not within {within} s: {what}")


class Writer:
    """Commits random changes to one plane's store and records them in the model."""

    def __init__(self, model: Model, store, zone: str | None, seed: int) -> None:
        self.model = model
        self.store = store
        self.zone = zone
        self.random = random.Random(seed)
        self.count = 0

    def next_op(self) -> Op:
        pick = self.random.choice
        if self.zone is None:
            if self.random.random() < 0.2:
                return GlobalDelete(pick(GLOBAL_KEYS))
            labels = {**pick(GLOBAL_ORIGINS), **pick(GLOBAL_EXTRAS)}
            return GlobalUpsert(pick(GLOBAL_KEYS), labels, {"note": str(self.count)})
        keys = ZONE_SENT_KEYS + ZONE_KEPT_KEYS
        if self.random.random() < 0.2:
            return ZoneDelete(self.zone, pick(keys))
        labels = {**pick(ZONE_ORIGINS), **pick(ZONE_EXTRAS)}
        return ZoneUpsert(self.zone, pick(keys), labels, {"note": str(self.count)})

    async def write(self, writes: int) -> None:
        """Commit *writes* more changes, one every :data:`WRITE_PAUSE` seconds."""
        for _ in range(writes):
            op = self.next_op()
            match op:
                case (
                    GlobalUpsert(key=key, labels=labels, spec=spec)
                    | ZoneUpsert(key=key, labels=labels, spec=spec)
                ):
                    await self.store.commit([Upsert(key=key, labels=labels, spec=spec)])
                case GlobalDelete(key=key) | ZoneDelete(key=key):
                    await self.store.commit([Delete(key=key, missing_ok=True)])
            self.model.apply(op)
            self.count += 1
            await anyio.sleep(WRITE_PAUSE)


async def differences(global_store, zone_stores, model: Model) -> list[str]:
    """How the planes differ from *model*; empty once every plane caught up and agrees."""
    head = await global_store.cursor()
    for zone, store in zone_stores.items():
        behind = (
            await store.tracking(GLOBAL_ORIGIN) != head
            or await global_store.tracking(tracking_origin(zone)) != await store.cursor()
        )
        if behind:
            return [f"{zone} has not caught up yet"]
    global_view = view_of(await global_store.list_resources())
    compared = comparable_global_view(global_view, ())
    problems = describe_diff(expected_global_view(model), compared)
    problems += authority_problems(compared, model)
    if problems:
        problems.insert(0, "global:")
    for zone, store in zone_stores.items():
        expected = expected_zone_view(zone, model.zone_local[zone], global_view, ())
        diff = describe_diff(expected, view_of(await store.list_resources()))
        if diff:
            problems += [f"{zone}:", *diff]
    return problems


async def converged(global_store, zone_stores, model: Model) -> None:
    """Wait until every zone equals the filtered global view and the global holds each
    zone's resources exactly once (the replication property test's checks)."""
    problems: list[str] = []
    with anyio.move_on_after(TIMEOUT):
        while True:
            problems = await differences(global_store, zone_stores, model)
            if not problems:
                return
            await anyio.sleep(POLL)  # polling: stores signal no "every plane caught up"
    raise AssertionError("\n".join(["not converged:", *problems]))


async def test_replication_survives_a_nats_crash_while_every_plane_writes(tmp_path):
    model = Model(ZONES)
    with NatsServer() as server:
        async with contextlib.AsyncExitStack() as stack:
            global_store = await stack.enter_async_context(
                SQLiteStore(tmp_path / "global.db", poll_interval=0.05)
            )
            zone_stores = {zone: await stack.enter_async_context(MemoryStore()) for zone in ZONES}
            writers = [Writer(model, global_store, None, seed=0)]
            writers += [
                Writer(model, store, zone, seed=index)
                for index, (zone, store) in enumerate(zone_stores.items(), start=1)
            ]
            global_engine = GlobalEngine(global_store, global_over_nats(server.url), options=FAST)
            zones = {
                zone: ZoneEngine(store, zone_over_nats(server.url, zone), zone=zone, options=FAST)
                for zone, store in zone_stores.items()
            }

            async def write_everywhere() -> None:
                async with anyio.create_task_group() as writing:
                    for writer in writers:
                        writing.start_soon(writer.write, WRITES)

            def all_connected() -> bool:
                return global_engine.connected_zones == sorted(ZONES) and all(
                    engine.connected for engine in zones.values()
                )

            async with anyio.create_task_group() as group:
                await group.start(global_engine.run)
                for engine in zones.values():
                    group.start_soon(engine.run)
                await until(all_connected, "every zone connected")
                await write_everywhere()  # before

                sessions = {zone: engine.sessions for zone, engine in zones.items()}
                async with anyio.create_task_group() as crash:
                    crash.start_soon(write_everywhere)  # during
                    await anyio.to_thread.run_sync(server.kill)
                    await until(
                        lambda: (
                            not global_engine.connected_zones
                            and not any(engine.connected for engine in zones.values())
                        ),
                        "every session ended on both sides",
                    )
                    await anyio.to_thread.run_sync(server.start)  # on the same port
                    await until(
                        lambda: (
                            all_connected()
                            and all(zones[zone].sessions > sessions[zone] for zone in ZONES)
                        ),
                        "every zone connected again",
                    )
                await write_everywhere()  # after
                await converged(global_store, zone_stores, model)
                group.cancel_scope.cancel()
            assert all(writer.count == 3 * WRITES for writer in writers)


async def test_a_vanished_global_is_detected_at_once_and_its_zones_move_to_the_other():
    # Two globals on one NATS share one store (HA) and the zones between them;
    # each connects to NATS through a relay of its own, so that one can vanish:
    # its connection is cut and never comes back. NATS drops its subscriptions, so
    # its zones' next messages are answered "no responders".
    zones = [f"zone-{index}" for index in range(1, 7)]
    with NatsServer() as server:
        async with contextlib.AsyncExitStack() as stack:
            store = await stack.enter_async_context(MemoryStore())
            relays = {
                name: await stack.enter_async_context(TcpRelay(server.host, server.port))
                for name in ("a", "b")
            }
            # Keepalive as by default (15 s): what notices the vanished global is the
            # answer to the zones' next messages, not a timeout.
            globals_ = {
                name: GlobalEngine(
                    store,
                    NatsTransport.server(f"nats://{relay.address}", reconnect_wait=0.2),
                    options=FAST,
                    instance_id=f"global-{name}",
                )
                for name, relay in relays.items()
            }
            engines = {
                zone: ZoneEngine(
                    await stack.enter_async_context(MemoryStore()),
                    NatsTransport.client(server.url, zone=zone),
                    zone=zone,
                    options=FAST,
                )
                for zone in zones
            }
            group = await stack.enter_async_context(anyio.create_task_group())
            for global_engine in globals_.values():
                await group.start(global_engine.run)
            for engine in engines.values():
                group.start_soon(engine.run)

            def served_by() -> dict[str, list[str]]:
                return {
                    zone: [name for name, g in globals_.items() if zone in g.connected_zones]
                    for zone in zones
                }

            def settled() -> bool:
                return all(served_by().values()) and all(
                    engine.connected for engine in engines.values()
                )

            await until(settled, "every zone served")
            # Each zone opened one session, and exactly one global serves it.
            assert all(len(names) == 1 for names in served_by().values()), served_by()
            assert {zone: engine.sessions for zone, engine in engines.items()} == dict.fromkeys(
                zones, 1
            )

            # The global serving the first zone vanishes (it may serve others too).
            [gone] = served_by()[zones[0]]
            [other] = set(globals_) - {gone}
            moved = [zone for zone, names in served_by().items() if names == [gone]]
            relays[gone].refuse_connections()
            await relays[gone].sever_all("the global vanished")

            await until(
                lambda: (
                    settled()
                    and all(names == [other] for names in served_by().values())
                    and all(engines[zone].sessions > 1 for zone in moved)
                ),
                f"every zone served by global-{other}",
            )
            for zone, engine in engines.items():
                if zone in moved:
                    assert engine.sessions == 2
                    assert engine.last_error is not None
                    assert "the global is gone" in engine.last_error, engine.last_error
                else:
                    assert engine.sessions == 1, f"{zone} was on the global that stayed"

            # Replication goes on through the global that stayed.
            mesh = ResourceKey("Mesh", None, "after-the-fail-over")
            await store.commit([Upsert(key=mesh, spec={})])
            for zone, engine in engines.items():
                await until_found(engine.store, mesh, zone)
            group.cancel_scope.cancel()


async def until_found(store, key: ResourceKey, where: str) -> None:
    with anyio.move_on_after(TIMEOUT):
        while True:
            if await store.find(key) is not None:
                return
            await anyio.sleep(POLL)  # polling, as in until()
    raise AssertionError(f"{key} did not reach {where} within {TIMEOUT} s")
