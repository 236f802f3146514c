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
from anyio.streams.buffered import BufferedByteReceiveStream

from kds.testing.transport_checks import (
    TIMEOUT,
    PeerProcess,
    Side,
    TransportFactory,
    TransportPair,
    memory_transport_factory,
    serve,
)
from kds_transports.grpc import GrpcTransport
from kds_transports.grpc.tls import CERT_FILE_NAME

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import Process

MAX_FRAME_SIZE: Final = 32 * 1024  # bytes: small, so that frames at the limit are cheap
KEEPALIVE: Final = 0.5  # seconds: the gRPC keepalive interval and timeout
CLOSE_TIMEOUT: Final = 0.5  # seconds a gRPC close waits for a peer that does not read
ROOT: Final = Path(__file__).resolve().parents[2]


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
                async with _child("global", work_dir, str(KEEPALIVE)) as (process, address):
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
                async with _child(*arguments) as (process, line):
                    if line.strip() != "connected":
                        raise AssertionError(f"the child zone said {line!r}")
                    accepted = await served.accept()
                    with anyio.fail_after(TIMEOUT):
                        if await accepted.receive() != b"hello":
                            raise AssertionError("the child zone did not say hello")
                    yield PeerProcess(accepted, process.kill)

    return TransportFactory(
        name="grpc",
        max_frame_size=MAX_FRAME_SIZE,
        open_transports=open_transports,
        # A killed peer's socket is closed by its kernel; keepalive bounds the rest.
        loss_timeout=2 * KEEPALIVE + 2,
        open_peer_process=open_peer_process,
    )


@contextlib.asynccontextmanager
async def _child(*args: str) -> AsyncIterator[tuple[Process, str]]:
    """Run :mod:`tests.integration.grpc_child` with *args*; yields it and its first line."""
    command = [sys.executable, "-m", "tests.integration.grpc_child", *args]
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


FACTORIES: Final = (_memory_factory(), _grpc_factory())
"""Every transport backend; each check runs on those it applies to."""
