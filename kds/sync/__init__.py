"""Replication between the global control plane and zone control planes.

:class:`GlobalEngine` serves zones; :class:`ZoneEngine` keeps one zone connected.
Both take a :class:`~kds.Store` and a :class:`~kds.Transport`; the rules of what
flows where are in :mod:`kds.sync.rules`, the session machinery in
:mod:`kds.sync.replication`, zone status in :mod:`kds.sync.lifecycle`. The wire
protocol is described in ``docs/protocol.md``.
"""

from kds.sync.engines import GlobalEngine, ZoneEngine, ZoneRefused, tracking_origin
from kds.sync.replication import (
    SessionEnded,
    SharedSnapshot,
    SharedSnapshots,
    StreamStats,
    SyncOptions,
)

__all__ = [
    "GlobalEngine",
    "SessionEnded",
    "SharedSnapshot",
    "SharedSnapshots",
    "StreamStats",
    "SyncOptions",
    "ZoneEngine",
    "ZoneRefused",
    "tracking_origin",
]
