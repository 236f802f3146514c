"""TcpRelay: forwards bytes both ways, severs every connection, refuses and accepts again."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import anyio
import attrs
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.memory import MemoryObjectReceiveStream

from kds.testing import TcpRelay

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import SocketStream

pytestmark = pytest.mark.anyio

DEADLINE = 10.0  # seconds; each step takes milliseconds


@attrs.frozen
class EchoServer:
    """A server echoing what it receives; says how each of its connections ended."""

    port: int
    endings: MemoryObjectReceiveStream[str]  # "end of stream" or "reset", one per connection


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[EchoServer]:
    send_ending, endings = anyio.create_memory_object_stream[str](100)

    async def echo(stream: SocketStream) -> None:
        ending = "end of stream"
        async with stream:
            try:
                async for chunk in stream:
                    await stream.send(chunk)
                await stream.send_eof()
            except anyio.BrokenResourceError:
                ending = "reset"
        send_ending.send_nowait(ending)

    async with (
        send_ending,
        endings,
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as group,
    ):
        group.start_soon(listener.serve, echo)
        port = listener.extra(SocketAttribute.local_port)  # noqa: S610 -- anyio's
        yield EchoServer(port, endings)
        group.cancel_scope.cancel()


async def receive_exactly(stream: SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await stream.receive(size - len(data))
    return data


async def test_forwards_bytes_both_ways_and_half_closes():
    async with echo_server() as server, TcpRelay("127.0.0.1", server.port) as relay:
        assert relay.host == "127.0.0.1"
        assert relay.address == f"127.0.0.1:{relay.port}"
        with anyio.fail_after(DEADLINE):
            async with await anyio.connect_tcp(relay.host, relay.port) as client:
                payload = bytes(range(256)) * 1024  # more than one read's worth
                await client.send(payload)
                assert await receive_exactly(client, len(payload)) == payload
                # The end of the client's stream reaches the server, whose own end
                # comes back: each direction ends on its own.
                await client.send_eof()
                with pytest.raises(anyio.EndOfStream):
                    await client.receive()
            assert await server.endings.receive() == "end of stream"
        assert relay.connections == 1


async def test_sever_all_resets_every_connection_and_new_ones_go_through():
    async with echo_server() as server, TcpRelay("127.0.0.1", server.port) as relay:
        with anyio.fail_after(DEADLINE):
            clients = [await anyio.connect_tcp(relay.host, relay.port) for _ in range(3)]
            for client in clients:
                await client.send(b"ping")
                assert await receive_exactly(client, 4) == b"ping"
            assert relay.open_connections == 3

            assert await relay.sever_all("test") == 3
            assert relay.open_connections == 0
            for client in clients:
                # A reset, not an orderly end of stream.
                with pytest.raises(anyio.BrokenResourceError):
                    await client.receive()
                await client.aclose()
            # The server's ends were cut too.
            assert [await server.endings.receive() for _ in clients] == ["reset"] * 3

            async with await anyio.connect_tcp(relay.host, relay.port) as client:
                await client.send(b"again")
                assert await receive_exactly(client, 5) == b"again"
        assert relay.connections == 4


async def test_refuses_new_connections_until_accepting_again():
    async with echo_server() as server, TcpRelay("127.0.0.1", server.port) as relay:
        with anyio.fail_after(DEADLINE):
            kept = await anyio.connect_tcp(relay.host, relay.port)
            await kept.send(b"before")
            assert await receive_exactly(kept, 6) == b"before"

            relay.refuse_connections()
            assert relay.refusing
            async with await anyio.connect_tcp(relay.host, relay.port) as refused:
                with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
                    await refused.receive()
            assert relay.refused == 1
            # Connections relayed before the refusal are not affected.
            await kept.send(b"still")
            assert await receive_exactly(kept, 5) == b"still"
            await kept.aclose()

            relay.accept_connections()
            async with await anyio.connect_tcp(relay.host, relay.port) as client:
                await client.send(b"after")
                assert await receive_exactly(client, 5) == b"after"
        assert relay.connections == 2


async def test_an_unreachable_target_resets_the_client():
    async with echo_server() as server:
        pass  # the port is free again: nothing listens there
    async with TcpRelay("127.0.0.1", server.port) as relay:
        with anyio.fail_after(DEADLINE):
            async with await anyio.connect_tcp(relay.host, relay.port) as client:
                with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
                    await client.receive()


async def test_stopping_closes_connections_and_the_port():
    async with echo_server() as server:
        async with TcpRelay("127.0.0.1", server.port) as relay:
            relay_port = relay.port
            client = await anyio.connect_tcp(relay.host, relay_port)
            await client.send(b"x")
            assert await receive_exactly(client, 1) == b"x"
        with anyio.fail_after(DEADLINE):
            with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
                await client.receive()
            await client.aclose()
            with pytest.raises(OSError, match="connection attempts failed"):
                await anyio.connect_tcp("127.0.0.1", relay_port)
        with pytest.raises(RuntimeError, match="not running"):
            _ = relay.port


async def test_new_connections_follow_a_changed_target():
    async with (
        echo_server() as first,
        echo_server() as second,
        TcpRelay("127.0.0.1", first.port) as relay,
    ):
        with anyio.fail_after(DEADLINE):
            before = await anyio.connect_tcp(relay.host, relay.port)
            await before.send(b"1")
            assert await receive_exactly(before, 1) == b"1"
            relay.target = ("127.0.0.1", second.port)
            async with await anyio.connect_tcp(relay.host, relay.port) as after:
                await after.send(b"2")
                assert await receive_exactly(after, 1) == b"2"
            assert await second.endings.receive() == "end of stream"
            # The connection made before stays with the first server.
            await before.send_eof()
            assert await first.endings.receive() == "end of stream"
            await before.aclose()
