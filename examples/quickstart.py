"""Quickstart: commit resources to a SQLite store, follow its log, resolve a conflict.

Run: ``python examples/quickstart.py [PATH]`` (defaults to a temporary file).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import anyio

from kds import MUST_NOT_EXIST, ConflictError, Delete, ResourceKey, Upsert, Upserted
from kds_stores.sqlite import SQLiteStore


async def main(path: Path) -> None:
    """Write a mesh and a policy, show the events, then lose an optimistic-concurrency race."""
    mesh = ResourceKey("Mesh", None, "default")
    timeout = ResourceKey("MeshTimeout", "default", "default-timeout")
    async with SQLiteStore(path) as store:
        print(f"store {path} epoch {store.epoch} head {await store.head()}")
        start = await store.head()
        await store.commit(
            [
                Upsert(key=mesh, spec={"mtls": {}}, expected_version=MUST_NOT_EXIST),
                Upsert(key=timeout, labels={"kuma.io/origin": "global"}, spec={"rules": []}),
            ]
        )
        current = await store.get(timeout)
        await store.commit([Upsert(key=timeout, spec={"rules": [{"default": {}}]})])
        try:
            # Written against a version that is no longer current: refused, nothing written.
            await store.commit(
                [Upsert(key=timeout, spec={"rules": []}, expected_version=current.version)]
            )
        except ConflictError as exc:
            print(f"conflict, as expected: {exc}")
        await store.commit([Delete(key=timeout)])

        head = await store.head()
        async with contextlib.aclosing(store.follow(start)) as events:
            async for event in events:
                kind = "upserted" if isinstance(event, Upserted) else "deleted"
                print(f"  revision {event.revision}: {kind} {event.key}")
                if event.revision == head:
                    break


if __name__ == "__main__":
    if len(sys.argv) > 1:
        anyio.run(main, Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            anyio.run(main, Path(tmp) / "kds.sqlite")
