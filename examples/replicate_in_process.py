"""A global and two zones replicating in one process, over the in-memory transport.

Run it: ``python examples/replicate_in_process.py [DIRECTORY]``. Each control plane
has its own SQLite store (in DIRECTORY, a temporary one by default). The global
creates a mesh and a policy; each zone registers a ZoneIngress. Once everything has
converged, the program prints what each store holds: the global's resources arrive
in both zones under their hash-suffix names, each zone's ingress reaches the global
(attributed to that zone) and the *other* zone, never back to its own.

Swap ``MemoryTransport`` for a network transport to run the planes in separate
processes; nothing else changes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio

from kds import ResourceKey, Store, Upsert
from kds.sync import GlobalEngine, SyncOptions, ZoneEngine
from kds.testing import MemoryTransport
from kds_stores.sqlite import SQLiteStore

# Short timings so the example finishes quickly; the defaults suit real networks.
OPTIONS = SyncOptions(heartbeat_interval=0.5, heartbeat_timeout=2.0, insight_interval=1.0)
REPLICATED = ["Mesh", "MeshTimeout", "ZoneIngress"]


async def show(name: str, store: Store) -> None:
    """Print the replicated resources *store* holds, with their origin and zone labels."""
    print(f"{name}:")
    for type_name in REPLICATED:
        for resource in await store.list_resources(type_name):
            origin = resource.labels.get("kuma.io/origin", "-")
            zone = resource.labels.get("kuma.io/zone", "-")
            print(f"  {resource.key}  origin={origin} zone={zone}")


async def counts(store: Store) -> list[int]:
    """How many resources of each replicated type *store* holds."""
    return [len(await store.list_resources(type_name)) for type_name in REPLICATED]


async def main(directory: Path) -> None:
    """Run the three control planes until they converge, then show their stores."""
    transport = MemoryTransport()
    async with (
        SQLiteStore(directory / "global.db") as global_store,
        SQLiteStore(directory / "zone-1.db") as zone1,
        SQLiteStore(directory / "zone-2.db") as zone2,
    ):
        await global_store.commit(
            [
                Upsert(key=ResourceKey("Mesh", None, "default"), spec={}),
                Upsert(key=ResourceKey("MeshTimeout", "default", "timeouts"), spec={}),
            ]
        )
        for name, store in (("zone-1", zone1), ("zone-2", zone2)):
            ingress = ResourceKey("ZoneIngress", None, f"ingress-{name}")
            await store.commit(
                [Upsert(key=ingress, labels={"kuma.io/origin": "zone"}, spec={"zone": name})]
            )
        async with anyio.create_task_group() as group:
            await group.start(GlobalEngine(global_store, transport, options=OPTIONS).run)
            for name, store in (("zone-1", zone1), ("zone-2", zone2)):
                zone_transport = transport.with_identity(name)
                engine = ZoneEngine(store, zone_transport, zone=name, options=OPTIONS)
                group.start_soon(engine.run)
            # Converged: the global holds 1 mesh, 1 policy, 2 ingresses; each zone
            # 1 mesh, 1 policy, its own ingress and the other zone's.
            with anyio.fail_after(30):
                stores = (global_store, zone1, zone2)
                while [await counts(s) for s in stores] != [[1, 1, 2]] * 3:  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # polling three stores is simplest here
            group.cancel_scope.cancel()
        for name, store in (("global", global_store), ("zone-1", zone1), ("zone-2", zone2)):
            await show(name, store)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        anyio.run(main, Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as temporary:
            anyio.run(main, Path(temporary))
