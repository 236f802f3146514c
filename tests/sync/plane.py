"""A zone control plane in a process of its own, for tests that run planes apart.

``python -m tests.sync.plane --store PATH --zone NAME --address grpcs://... --ca FILE``
replicates the SQLite store at PATH with the global until it is terminated.
"""

from __future__ import annotations

import argparse
import signal

import anyio

from kds.sync import SyncOptions, ZoneEngine
from kds_stores.sqlite import SQLiteStore
from kds_transports.grpc import GrpcTransport

# Short timings, as the in-process tests use: a lost session is noticed quickly.
OPTIONS = SyncOptions(
    heartbeat_interval=0.1, heartbeat_timeout=1.0, reconnect_base=0.01, reconnect_max=0.2
)


async def run(store_path: str, zone: str, address: str, ca_file: str) -> None:
    """Replicate until SIGTERM."""
    transport = GrpcTransport.client(address, zone=zone, ca_file=ca_file)
    async with (
        SQLiteStore(store_path, poll_interval=0.02) as store,
        anyio.create_task_group() as group,
    ):
        group.start_soon(ZoneEngine(store, transport, zone=zone, options=OPTIONS).run)
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
        group.cancel_scope.cancel()


def main() -> None:
    """Parse the arguments and run the zone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--ca", required=True)
    args = parser.parse_args()
    anyio.run(run, args.store, args.zone, args.address, args.ca)


if __name__ == "__main__":
    main()
