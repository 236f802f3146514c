"""Zones as the global sees them: the Zone resource, its ZoneInsight, Online/Offline.

A Zone (``spec.enabled``) is created the first time a zone connects. Its ZoneInsight
keeps the last :data:`MAX_SUBSCRIPTIONS` sessions ("subscriptions"): when each
connected and disconnected, which global instance served it, the zone's instance
and version, and counters of what was sent, acknowledged and rejected per type.
The global refreshes every connected session's ``lastSeen`` every
``insight_interval`` (all zones in one commit), so a zone is Online only while a
session is open *and* recently seen: a global that crashed without closing its
subscriptions leaves no zone Online for longer than the liveness window.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from kds.errors import ConflictError
from kds.resource import ResourceKey
from kds.store import MUST_NOT_EXIST, Upsert

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from kds.resource import Resource
    from kds.store import Store
    from kds.sync.replication import StreamStats

__all__ = [
    "MAX_SUBSCRIPTIONS",
    "ensure_zone",
    "insight_key",
    "is_enabled",
    "is_online",
    "subscription_stats",
    "update_insight",
    "update_insights",
    "zone_key",
]

MAX_SUBSCRIPTIONS: Final = 10
"""Subscriptions a ZoneInsight keeps (the newest)."""

_ATTEMPTS: Final = 20  # read-modify-write tries against concurrent writers (HA globals)


def zone_key(zone: str) -> ResourceKey:
    """The key of *zone*'s Zone resource."""
    return ResourceKey("Zone", None, zone)


def insight_key(zone: str) -> ResourceKey:
    """The key of *zone*'s ZoneInsight resource."""
    return ResourceKey("ZoneInsight", None, zone)


def now_text(moment: datetime | None = None) -> str:
    """A timestamp as stored in insights: ISO 8601, UTC."""
    return (moment or datetime.now(UTC)).isoformat()


def is_enabled(zone: Resource | None) -> bool:
    """Whether a zone may replicate: its Zone says ``enabled`` (the default) or is missing."""
    return zone is None or zone.spec.get("enabled", True) is not False


def is_online(insight: Resource | None, *, now: datetime, liveness: float) -> bool:
    """Whether a session of the zone is open and was seen within *liveness* seconds."""
    if insight is None:
        return False
    horizon = now - timedelta(seconds=liveness)
    for subscription in insight.spec.get("subscriptions", ()):
        if subscription.get("disconnectTime") is not None:
            continue
        seen = subscription.get("lastSeen") or subscription.get("connectTime")
        if isinstance(seen, str) and datetime.fromisoformat(seen) >= horizon:
            return True
    return False


async def ensure_zone(store: Store, zone: str) -> Resource:
    """Return *zone*'s Zone resource, creating it (enabled) if it does not exist."""
    key = zone_key(zone)
    for _ in range(_ATTEMPTS):
        existing = await store.find(key)
        if existing is not None:
            return existing
        try:
            await store.commit(
                [Upsert(key=key, spec={"enabled": True}, expected_version=MUST_NOT_EXIST)]
            )
        except ConflictError:
            continue  # another instance created it first
    return await store.get(key)


async def update_insight(
    store: Store, zone: str, change: Callable[[list[dict[str, Any]]], None]
) -> None:
    """Apply *change* to *zone*'s subscription list (newest last), creating the insight.

    A read-modify-write with the expected version, retried when another writer
    (another global instance) got there first; keeps the newest subscriptions.
    """
    await update_insights(store, {zone: change})


async def update_insights(
    store: Store, changes: Mapping[str, Callable[[list[dict[str, Any]]], None]]
) -> None:
    """:func:`update_insight` for several zones at once, in one commit.

    A global refreshes every connected zone's insight together: one commit, hence
    one event batch waking each session once, rather than one per zone.
    """
    keys = {zone: insight_key(zone) for zone in changes}
    for _ in range(_ATTEMPTS):
        existing = await store.find_many(keys.values())
        upserts = []
        for zone, change in changes.items():
            key = keys[zone]
            stored = existing.get(key)
            subscriptions = [
                dict(s) for s in (stored.spec.get("subscriptions", ()) if stored else ())
            ]
            change(subscriptions)
            spec = {"subscriptions": subscriptions[-MAX_SUBSCRIPTIONS:]}
            expected = stored.version if stored is not None else MUST_NOT_EXIST
            upserts.append(Upsert(key=key, spec=spec, expected_version=expected))
        try:
            await store.commit(upserts)
        except ConflictError:
            continue
        return
    zones = ", ".join(repr(zone) for zone in changes)
    raise ConflictError(f"the ZoneInsight of {zones} kept changing; gave up updating it")


def subscription_stats(stats: StreamStats) -> dict[str, Any]:
    """A session's counters as a subscription's ``status`` (Kuma's field names)."""

    def counts(type_name: str | None) -> Mapping[str, int]:
        if type_name is None:
            return {
                "responsesSent": sum(stats.sent.values()),
                "responsesAcknowledged": sum(stats.acknowledged.values()),
                "responsesRejected": sum(stats.rejected.values()),
            }
        return {
            "responsesSent": stats.sent[type_name],
            "responsesAcknowledged": stats.acknowledged[type_name],
            "responsesRejected": stats.rejected[type_name],
        }

    types = sorted(set(stats.sent) | set(stats.acknowledged) | set(stats.rejected))
    return {
        "total": dict(counts(None)),
        "stat": {type_name: dict(counts(type_name)) for type_name in types},
    }
