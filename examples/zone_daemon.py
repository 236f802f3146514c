"""A zone control plane assembled from the library: store, transport, engine, HTTP API.

This is what ``kds-cp run`` does in ``mode: zone``, written out for programs that embed
kds: it keeps the zone's resources in SQLite, dials the global over gRPC with TLS
(accepting its self-signed certificate, as ``tlsSkipVerify`` does), reconnects whenever
the session ends, and serves the zone's HTTP API on loopback. It knows the same extra
``FeatureFlag`` type as ``global_daemon.py``, so flags written on the global arrive here.

Run: ``python examples/zone_daemon.py WORK_DIR --zone zone-1
[--global-address grpcs://127.0.0.1:5685] [--api-port 15681]``; Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anyio
from custom_resource_type import CATALOG

from kds.api import ApiServer
from kds.sync import ZoneEngine
from kds_stores.sqlite import SQLiteStore
from kds_transports.grpc import GrpcTransport


async def main(work_dir: Path, zone: str, global_address: str, api_port: int) -> None:
    """Replicate with the global and serve the zone's API until cancelled."""
    await anyio.Path(work_dir).mkdir(parents=True, exist_ok=True)
    async with SQLiteStore(work_dir / f"{zone}.db", catalog=CATALOG) as store:
        # skip_verify: the global's generated certificate is self-signed. In production
        # pass ca_file= (the global's certificate or its CA) instead.
        transport = GrpcTransport.client(global_address, zone=zone, skip_verify=True)
        engine = ZoneEngine(store, transport, zone=zone, catalog=CATALOG)
        api = ApiServer(store, mode="zone", zone=zone, catalog=CATALOG)
        async with anyio.create_task_group() as group:
            group.start_soon(engine.run)
            api_url = await group.start(api.serve, "127.0.0.1", api_port)
            print(f"{zone}: replicating with {global_address}, API on {api_url}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--global-address", default="grpcs://127.0.0.1:5685")
    parser.add_argument("--api-port", type=int, default=15681)
    arguments = parser.parse_args()
    try:
        anyio.run(
            main, arguments.work_dir, arguments.zone, arguments.global_address, arguments.api_port
        )
    except KeyboardInterrupt:
        print(f"{arguments.zone}: stopped")
