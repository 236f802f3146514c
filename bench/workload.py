"""The workload every store benchmark writes: realistic Dataplanes, and their plain rows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgpack

from kds.resource import ResourceKey
from kds.store import Upsert

if TYPE_CHECKING:
    from collections.abc import Sequence


def make_upserts(count: int) -> list[Upsert]:
    """Dataplanes in mesh "default" with small, realistic labels and specs."""
    upserts = []
    for i in range(count):
        service = f"web-{i % 50}"
        upserts.append(
            Upsert(
                key=ResourceKey("Dataplane", "default", f"dp-{i:07d}"),
                labels={
                    "kuma.io/origin": "zone",
                    "kuma.io/zone": "zone-1",
                    "kuma.io/service": service,
                },
                spec={
                    "networking": {
                        "address": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                        "inbound": [{"port": 8080, "tags": {"kuma.io/service": service}}],
                    }
                },
            )
        )
    return upserts


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """*items* cut into consecutive slices of *size*."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def baseline_rows(upserts: Sequence[Upsert]) -> list[tuple[Any, ...]]:
    """The rows a plain table stores for *upserts*, as the drivers' baselines write them.

    (type, mesh or '', name, labels msgpack, spec msgpack, version 1, created and
    modified now in microseconds): what the stores keep per resource, minus the log.
    """
    micros = int(datetime.now(UTC).timestamp() * 1_000_000)
    return [
        (
            u.key.type,
            u.key.mesh or "",
            u.key.name,
            msgpack.packb(u.labels, use_bin_type=True),
            msgpack.packb(u.spec, use_bin_type=True),
            1,
            micros,
            micros,
        )
        for u in upserts
    ]
