"""The transports the conformance suite runs against, as :class:`TransportFactory` recipes.

To add a backend, write a ``_<name>_factory()`` below and list it in
:data:`FACTORIES`. The fixtures of ``test_transport_conformance.py`` read off
each factory which checks apply to it: the sever check to factories with
``sever``, the killed-process check to those with ``open_peer_process``.
Factories are built when this module is imported, so building one must be cheap
and open nothing: listeners, certificates and servers belong in its
``open_transports``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from kds.testing.nats import NatsServer
from kds.testing.transport_checks import (
    TIMEOUT,
    PeerProcess,
    Side,
    TransportFactory,
    TransportPair,
    memory_transport_factory,
    serve,
)
from kds.tls import CERT_FILE_NAME
from kds_transports.grpc import GrpcTransport
from kds_transports.nats import NatsSession, NatsTransport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from anyio.abc import Process

    from kds.transport import Session

MAX_FRAME_SIZE: Final = 32 * 1024  # bytes: small, so that frames at the limit are cheap
KEEPALIVE: Final = 0.5  # seconds: the gRPC and NATS keepalive interval and timeout
CLOSE_TIMEOUT: Final = 0.5  # seconds a gRPC or NATS close may take
NATS_MAX_PAYLOAD: Final = 8 * 1024  # bytes: below MAX_FRAME_SIZE, so large frames go in parts
NATS_WINDOW: Final = 4 * MAX_FRAME_SIZE  # bytes of credit: small, so that senders do wait
NATS_PREFIX: Final = "kds-conformance"
ROOT: Final = Path(__file__).resolve().parents[2]
# Python arguments that run one end of a session in a child process, to kill. The
# NATS one is imported, not run with -m: kds.testing imports kds.testing.nats.
_GRPC_CHILD: Final = ("-m", "tests.integration.grpc_child")
_NATS_CHILD: Final = ("-c", "import sys; from kds.testing.nats import main; main(sys.argv[1:])")


def _memory_factory() -> TransportFactory:
    return memory_transport_factory(max_frame_size=MAX_FRAME_SIZE)


def _grpc_client(address: str, ca_file: Path) -> GrpcTransport:
    return GrpcTransport.client(
        address,
        ca_file=ca_file,
        max_frame_size=MAX_FRAME_SIZE,
        keepalive_interval=KEEPALIVE,
        keepalive_timeout=KEEPALIVE,
        close_timeout=CLOSE_TIMEOUT,
    )


def _grpc_transports(work_dir: str) -> TransportPair:
    """A grpcs:// listener on 127.0.0.1 whose generated certificate zones trust via ca_file."""
    listener = GrpcTransport.server(
        "grpcs://127.0.0.1:0",
        work_dir=work_dir,
        max_frame_size=MAX_FRAME_SIZE,
        keepalive_interval=KEEPALIVE,
        keepalive_timeout=KEEPALIVE,
        close_timeout=CLOSE_TIMEOUT,
        # Zones ping every KEEPALIVE seconds, more often than the default allows.
        keepalive_min_interval=0,
    )
    ca_file = Path(work_dir) / CERT_FILE_NAME  # written by serve() before it reports
    return TransportPair(listener, lambda address: _grpc_client(address, ca_file))


def _grpc_factory() -> TransportFactory:
    @contextlib.asynccontextmanager
    async def open_transports() -> AsyncIterator[TransportPair]:
        with tempfile.TemporaryDirectory(prefix="kds-grpc-") as work_dir:
            yield _grpc_transports(work_dir)

    @contextlib.asynccontextmanager
    async def open_peer_process(killed: Side) -> AsyncIterator[PeerProcess]:
        with tempfile.TemporaryDirectory(prefix="kds-grpc-") as work_dir:
            ca_file = Path(work_dir) / CERT_FILE_NAME
            if killed == "global":
                # The child serves echo sessions and prints the address it listens on.
                child = _child(_GRPC_CHILD, "global", work_dir, str(KEEPALIVE))
                async with child as (process, address):
                    with anyio.fail_after(TIMEOUT):
                        session = await _grpc_client(address.strip(), ca_file).connect()
                        await session.send(b"ping")
                        if await session.receive() != b"ping":
                            raise AssertionError("the child global did not echo")
                    yield PeerProcess(session, process.kill)
                return
            async with serve(_grpc_transports(work_dir)) as served:
                # The child dials, sends b"hello", prints "connected" and waits to be killed.
                arguments = ("zone", served.address, str(ca_file), str(KEEPALIVE))
                async with _child(_GRPC_CHILD, *arguments) as (process, line):
                    yield await _hello_from_child_zone(served.accept, process, line)

    return TransportFactory(
        name="grpc",
        max_frame_size=MAX_FRAME_SIZE,
        open_transports=open_transports,
        # A killed peer's socket is closed by its kernel; keepalive bounds the rest.
        loss_timeout=2 * KEEPALIVE + 2,
        open_peer_process=open_peer_process,
    )


def _nats_client(address: str) -> NatsTransport:
    return NatsTransport.client(
        address,
        prefix=NATS_PREFIX,
        max_frame_size=MAX_FRAME_SIZE,
        window=NATS_WINDOW,
        keepalive_interval=KEEPALIVE,
        keepalive_timeout=KEEPALIVE,
        close_timeout=CLOSE_TIMEOUT,
    )


def _nats_listener(address: str) -> NatsTransport:
    return NatsTransport.server(
        address,
        prefix=NATS_PREFIX,
        max_frame_size=MAX_FRAME_SIZE,
        window=NATS_WINDOW,
        keepalive_interval=KEEPALIVE,
        keepalive_timeout=KEEPALIVE,
        close_timeout=CLOSE_TIMEOUT,
    )


@contextlib.asynccontextmanager
async def _nats_server() -> AsyncIterator[NatsServer]:
    """A nats-server of its own (it starts in milliseconds), so that sever can crash it."""
    server = NatsServer(max_payload=NATS_MAX_PAYLOAD)
    try:
        await anyio.to_thread.run_sync(server.start)
        yield server
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.cleanup)


def _nats_factory() -> TransportFactory:
    servers: dict[str, NatsServer] = {}  # by URL, while their transports are open

    @contextlib.asynccontextmanager
    async def open_transports() -> AsyncIterator[TransportPair]:
        async with _nats_server() as server:
            servers[server.url] = server
            try:
                yield TransportPair(_nats_listener(server.url), _nats_client)
            finally:
                del servers[server.url]

    def sever(session: Session) -> None:
        if not isinstance(session, NatsSession):
            raise TypeError(f"not a NatsSession: {session!r}")
        # NATS crashing cuts both ends' connections, as a network failure would.
        servers[session.nats_url].kill()

    @contextlib.asynccontextmanager
    async def open_peer_process(killed: Side) -> AsyncIterator[PeerProcess]:
        async with _nats_server() as server:
            arguments = (killed, server.url, NATS_PREFIX, str(KEEPALIVE))
            if killed == "global":
                # The child serves echo sessions and prints "serving" once it listens.
                async with _child(_NATS_CHILD, *arguments) as (process, line):
                    if line.strip() != "serving":
                        raise AssertionError(f"the child global said {line!r}")
                    with anyio.fail_after(TIMEOUT):
                        session = await _nats_client(server.url).connect()
                        await session.send(b"ping")
                        if await session.receive() != b"ping":
                            raise AssertionError("the child global did not echo")
                    yield PeerProcess(session, process.kill)
                return
            transports = TransportPair(_nats_listener(server.url), _nats_client)
            # The child dials, sends b"hello", prints "connected" and waits to be killed.
            async with (
                serve(transports) as served,
                _child(_NATS_CHILD, *arguments) as (process, line),
            ):
                yield await _hello_from_child_zone(served.accept, process, line)

    return TransportFactory(
        name="nats",
        max_frame_size=MAX_FRAME_SIZE,
        open_transports=open_transports,
        # A crashed server resets connections at once; keepalive bounds the rest.
        loss_timeout=2 * KEEPALIVE + 2,
        sever=sever,
        open_peer_process=open_peer_process,
    )


async def _hello_from_child_zone(
    accept: Callable[[], Awaitable[Session]], process: Process, line: str
) -> PeerProcess:
    """The global's end of the session a child zone opened and said hello on."""
    if line.strip() != "connected":
        raise AssertionError(f"the child zone said {line!r}")
    accepted = await accept()
    with anyio.fail_after(TIMEOUT):
        if await accepted.receive() != b"hello":
            raise AssertionError("the child zone did not say hello")
    return PeerProcess(accepted, process.kill)


@contextlib.asynccontextmanager
async def _child(program: tuple[str, str], *args: str) -> AsyncIterator[tuple[Process, str]]:
    """Run Python with *program* and *args*; yields the process and its first line."""
    command = [sys.executable, *program, *args]
    async with await anyio.open_process(command, cwd=ROOT, stderr=subprocess.DEVNULL) as process:
        try:
            if process.stdout is None:
                raise AssertionError("the child has no stdout")
            with anyio.fail_after(TIMEOUT):
                line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 200)
            yield process, line.decode()
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()


FACTORIES: Final = (_memory_factory(), _grpc_factory(), _nats_factory())
"""Every transport backend; each check runs on those it applies to."""
