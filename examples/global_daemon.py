"""A global control plane assembled from the library: store, transport, engine, HTTP API.

This is what ``kds-cp run`` does in ``mode: global``, written out for programs that
embed kds: it keeps resources in SQLite, serves zones over gRPC with TLS (a self-signed
certificate generated into the work directory), serves the HTTP API on loopback, and
knows one extra resource type, ``FeatureFlag`` (from ``custom_resource_type.py``), that
it replicates to every zone.

Run: ``python examples/global_daemon.py WORK_DIR [--kds-port 5685] [--api-port 5681]``;
Ctrl-C stops it. Zones connect with ``examples/zone_daemon.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anyio
from custom_resource_type import CATALOG

from kds.api import ApiServer
from kds.sync import GlobalEngine
from kds_stores.sqlite import SQLiteStore
from kds_transports.grpc import GrpcTransport


async def main(work_dir: Path, kds_port: int, api_port: int) -> None:
    """Serve zones and the API until cancelled."""
    await anyio.Path(work_dir).mkdir(parents=True, exist_ok=True)
    async with SQLiteStore(work_dir / "global.db", catalog=CATALOG) as store:
        transport = GrpcTransport.server(f"grpcs://127.0.0.1:{kds_port}", work_dir=work_dir)
        engine = GlobalEngine(store, transport, catalog=CATALOG)
        api = ApiServer(store, mode="global", catalog=CATALOG)
        async with anyio.create_task_group() as group:
            kds_address = await group.start(engine.run)
            api_url = await group.start(api.serve, "127.0.0.1", api_port)
            print(f"global: serving zones on {kds_address}, API on {api_url}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--kds-port", type=int, default=5685)
    parser.add_argument("--api-port", type=int, default=5681)
    arguments = parser.parse_args()
    try:
        anyio.run(main, arguments.work_dir, arguments.kds_port, arguments.api_port)
    except KeyboardInterrupt:
        print("global: stopped")
