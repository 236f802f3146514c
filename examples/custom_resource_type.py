"""Register an application's own resource type and store it next to Kuma's.

Run: ``python examples/custom_resource_type.py``.
"""

from __future__ import annotations

import anyio

from kds import (
    DEFAULT_CATALOG,
    ResourceKey,
    ResourceType,
    Scope,
    SyncFlag,
    Upsert,
    ValidationError,
    optional_fields,
)
from kds.testing import MemoryStore

#: A mesh-scoped type the global writes and every zone receives, validated on every
#: commit and decode.
FEATURE_FLAG = ResourceType(
    name="FeatureFlag",
    scope=Scope.MESH,
    flags=SyncFlag.GLOBAL_TO_ZONES,
    validator=optional_fields(enabled=bool, rollout_percent=int),
)
CATALOG = DEFAULT_CATALOG.with_types(FEATURE_FLAG)


async def main() -> None:
    """Store a valid flag, then show the error an invalid one gets."""
    async with MemoryStore(catalog=CATALOG) as store:
        key = ResourceKey("FeatureFlag", "default", "new-checkout")
        await store.commit([Upsert(key=key, spec={"enabled": True, "rollout_percent": 10})])
        print(await store.get(key))
        try:
            await store.commit([Upsert(key=key, spec={"enabled": "yes"})])
        except ValidationError as exc:
            print(f"refused: {exc}")


if __name__ == "__main__":
    anyio.run(main)
