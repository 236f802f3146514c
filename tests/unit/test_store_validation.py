"""Bad input to Store.commit is refused with the field named, and writes nothing."""

from __future__ import annotations

import pytest

from kds import (
    Cursor,
    Delete,
    ResourceKey,
    StoreClosedError,
    Tracking,
    Upsert,
    ValidationError,
)
from kds.testing import MemoryStore

pytestmark = pytest.mark.anyio

MESH = ResourceKey("Mesh", None, "default")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (Upsert(key=ResourceKey("Nope", None, "x")), "changes[1].key.type"),
        (Upsert(key=ResourceKey("Dataplane", None, "x")), "changes[1].key.mesh"),
        (Upsert(key=MESH, labels={"a": 1}), "changes[1].labels.a"),  # type: ignore[dict-item]
        (Upsert(key=MESH, spec={"mtls": "on"}), "changes[1].spec.mtls"),
        (Upsert(key=MESH, spec={"x": object()}), "changes[1].spec"),
        (Upsert(key=MESH, spec={"x": 2**64}), "changes[1].spec"),
        # msgpack encodes a nested map with integer keys but cannot decode it again.
        (Upsert(key=MESH, spec={"x": {1: "y"}}), "changes[1].spec"),
        (Upsert(key=MESH, expected_version=-1), "changes[1].expected_version"),
        (Upsert(key=MESH, expected_version=True), "changes[1].expected_version"),
        (Delete(key=ResourceKey("Mesh", None, "")), "changes[1].key.name"),
        ("not a change", "changes[1]"),
    ],
)
async def test_invalid_change_names_the_field_and_writes_nothing(change, field):
    async with MemoryStore() as store:
        good = Upsert(key=ResourceKey("Mesh", None, "good"))
        with pytest.raises(ValidationError) as info:
            await store.commit([good, change])
        assert info.value.field == field
        assert await store.head() == 0
        assert await store.list_resources() == []


@pytest.mark.parametrize(
    ("tracking", "field"),
    [
        (Tracking("", Cursor("e", 1)), "tracking.origin"),
        (Tracking("global", Cursor("", 1)), "tracking.cursor.epoch"),
        (Tracking("global", Cursor("e", -1)), "tracking.cursor.revision"),
    ],
)
async def test_invalid_tracking_is_refused(tracking, field):
    async with MemoryStore() as store:
        with pytest.raises(ValidationError) as info:
            await store.commit([Upsert(key=MESH)], tracking=tracking)
        assert info.value.field == field
        assert await store.head() == 0


async def test_closed_store_refuses_use():
    store = MemoryStore()
    with pytest.raises(StoreClosedError):
        await store.head()
    async with store:
        await store.commit([Upsert(key=MESH)])
    with pytest.raises(StoreClosedError):
        await store.get(MESH)
    with pytest.raises(StoreClosedError):
        _ = store.epoch
