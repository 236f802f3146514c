"""The golden cases over every network transport: in one process, and with every zone in its own.

The same fixtures and expectations as ``test_golden.py``; only the transport (gRPC
with TLS, NATS) and the process layout change, so the engines must depend on
neither. Each transport is a :class:`Network`: how a global serves, how a zone in
this process dials it, and how a zone process (:mod:`tests.sync.plane`) does.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import anyio
import attrs
import pytest

from kds.sync import GlobalEngine, ZoneEngine
from kds.testing import NatsServer
from kds.transport import Transport
from kds_stores.sqlite import SQLiteStore
from kds_transports.grpc import GrpcTransport
from kds_transports.nats import NatsTransport
from tests.sync.harness import load_resources, wait_until_all_equal
from tests.sync.test_golden import CASES, DEADLINE, OPTIONS, PLANES, ZONES, fixture_path

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from anyio.abc import Process

    from kds.store import Store, Upsert

pytestmark = pytest.mark.anyio

TRANSPORTS: Final = ("grpc", "nats")
STOP_TIMEOUT: Final = 30.0  # seconds a terminated zone process gets to exit (it takes < 1)


@attrs.frozen
class Network:
    """One transport between the planes of a case.

    Attributes:
        name: the transport's name.
        global_transport: a new transport for the global to serve on.
        zone_transport: ``(address the global reported, zone) ->`` the zone's transport.
        plane_arguments: ``(address the global reported) ->`` the arguments with which
            :mod:`tests.sync.plane` dials the global.
    """

    name: str
    global_transport: Callable[[], Transport]
    zone_transport: Callable[[str, str], Transport]
    plane_arguments: Callable[[str], list[str]]


def _grpc(work_dir: Path) -> Network:
    # The global writes its self-signed certificate to work_dir when it serves.
    ca_file = work_dir / "kds-cp.crt"
    return Network(
        name="grpc",
        global_transport=lambda: GrpcTransport.server("grpcs://127.0.0.1:0", work_dir=work_dir),
        zone_transport=lambda address, zone: GrpcTransport.client(
            address, zone=zone, ca_file=ca_file
        ),
        plane_arguments=lambda address: ["--address", address, "--ca", str(ca_file)],
    )


def _nats(server: NatsServer) -> Network:
    # A prefix per case: cases sharing the module's server never see each other.
    prefix = f"kds-golden-{uuid.uuid4().hex[:12]}"
    return Network(
        name="nats",
        global_transport=lambda: NatsTransport.server(server.url, prefix=prefix),
        zone_transport=lambda address, zone: NatsTransport.client(
            address, zone=zone, prefix=prefix
        ),
        plane_arguments=lambda address: [
            "--transport",
            "nats",
            "--address",
            address,
            "--prefix",
            prefix,
        ],
    )


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    """One NATS server for every NATS case of the module."""
    with NatsServer() as server:
        yield server


@pytest.fixture(params=TRANSPORTS)
def network(request: pytest.FixtureRequest, tmp_path: Path) -> Network:
    """Each network transport, set up for one case."""
    if request.param == "nats":
        # Started by the first NATS case only.
        return _nats(request.getfixturevalue("nats_server"))
    return _grpc(tmp_path)


@contextlib.asynccontextmanager
async def stores_with_inputs(directory: Path, case: str) -> AsyncIterator[dict[str, SQLiteStore]]:
    async with contextlib.AsyncExitStack() as stack:
        stores = {}
        for plane in PLANES:
            store = SQLiteStore(directory / f"{plane}.db", poll_interval=0.02)
            await stack.enter_async_context(store)
            inputs = load_resources(fixture_path(case, plane, "input"))
            if inputs:
                await store.commit(inputs)
            stores[plane] = store
        yield stores


def expected(case: str) -> dict[str, list[Upsert]]:
    return {plane: load_resources(fixture_path(case, plane, "golden")) for plane in PLANES}


@contextlib.asynccontextmanager
async def serving_global(store: Store, network: Network) -> AsyncIterator[str]:
    """Run the global engine over *network*; yields the address it reported."""
    engine = GlobalEngine(store, network.global_transport(), options=OPTIONS)
    async with anyio.create_task_group() as group:
        address = await group.start(engine.run)
        yield address
        group.cancel_scope.cancel()


@pytest.mark.parametrize("case", CASES)
async def test_converges_in_one_process(case: str, network: Network, tmp_path: Path) -> None:
    async with (
        stores_with_inputs(tmp_path, case) as stores,
        serving_global(stores["global"], network) as address,
        anyio.create_task_group() as group,
    ):
        for zone in ZONES:
            transport = network.zone_transport(address, zone)
            group.start_soon(ZoneEngine(stores[zone], transport, zone=zone, options=OPTIONS).run)
        await wait_until_all_equal(stores, expected(case), deadline=DEADLINE)
        group.cancel_scope.cancel()


@pytest.mark.parametrize("case", CASES)
async def test_converges_with_each_zone_in_its_own_process(
    case: str, network: Network, tmp_path: Path
) -> None:
    async with (
        stores_with_inputs(tmp_path, case) as stores,
        serving_global(stores["global"], network) as address,
        contextlib.AsyncExitStack() as stack,
    ):
        children = []
        for zone in ZONES:
            command = [
                sys.executable,
                "-m",
                "tests.sync.plane",
                "--store",
                str(tmp_path / f"{zone}.db"),
                "--zone",
                zone,
                *network.plane_arguments(address),
            ]
            child = await anyio.open_process(command, stdout=None)
            stack.push_async_callback(reap, child)
            children.append(child)
        await wait_until_all_equal(stores, expected(case), deadline=DEADLINE)
        for child in children:
            child.terminate()
        with anyio.fail_after(STOP_TIMEOUT):
            for child in children:
                assert await child.wait() == 0


async def reap(process: Process) -> None:
    """Kill *process* if it still runs (a failed test's zone), by its own pid; wait for it."""
    if process.returncode is None:
        process.kill()
    await process.aclose()
