"""The golden cases over gRPC with TLS: in one process, and with every zone in its own.

The same fixtures and expectations as ``test_golden.py``; only the transport and
the process layout change, so the engines must not depend on either.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

import anyio
import pytest

from kds.sync import GlobalEngine, ZoneEngine
from kds_stores.sqlite import SQLiteStore
from kds_transports.grpc import GrpcTransport
from tests.sync.harness import load_resources, wait_until_all_equal
from tests.sync.test_golden import CASES, DEADLINE, OPTIONS, PLANES, ZONES, fixture_path

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from kds.store import Store, Upsert

pytestmark = pytest.mark.anyio


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
async def global_over_grpc(store: Store, work_dir: Path) -> AsyncIterator[str]:
    transport = GrpcTransport.server("grpcs://127.0.0.1:0", work_dir=work_dir)
    async with anyio.create_task_group() as group:
        address = await group.start(GlobalEngine(store, transport, options=OPTIONS).run)
        yield address
        group.cancel_scope.cancel()


@pytest.mark.parametrize("case", CASES)
async def test_converges_over_grpc_in_one_process(case, tmp_path):
    async with (
        stores_with_inputs(tmp_path, case) as stores,
        global_over_grpc(stores["global"], tmp_path) as address,
        anyio.create_task_group() as group,
    ):
        for zone in ZONES:
            transport = GrpcTransport.client(address, zone=zone, ca_file=tmp_path / "kds-cp.crt")
            group.start_soon(ZoneEngine(stores[zone], transport, zone=zone, options=OPTIONS).run)
        await wait_until_all_equal(stores, expected(case), deadline=DEADLINE)
        group.cancel_scope.cancel()


@pytest.mark.parametrize("case", CASES)
async def test_converges_with_each_zone_in_its_own_process(case, tmp_path):
    async with (
        stores_with_inputs(tmp_path, case) as stores,
        global_over_grpc(stores["global"], tmp_path) as address,
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
                "--address",
                address,
                "--ca",
                str(tmp_path / "kds-cp.crt"),
            ]
            children.append(
                await stack.enter_async_context(await anyio.open_process(command, stdout=None))
            )
        await wait_until_all_equal(stores, expected(case), deadline=DEADLINE)
        for child in children:
            child.terminate()
        with anyio.fail_after(30):
            for child in children:
                assert await child.wait() == 0
