"""Views that join resources: zone and zone proxy overviews, the global insight, the GUI.

Overviews pair a resource with its insight of the same name (Zone with ZoneInsight,
ZoneIngress with ZoneIngressInsight, ZoneEgress with ZoneEgressInsight), as Kuma's
``/zones/_overview`` does, and add whether it is online now.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any, Final, Literal

from kds.api.representation import format_time, jsonable
from kds.insights import meshes_without_mtls_across_zones
from kds.resource import LABEL_ZONE
from kds.sync.lifecycle import is_enabled, is_online

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from datetime import datetime

    from kds.resource import Catalog, Resource

__all__ = [
    "PROXY_KINDS",
    "ProxyKind",
    "global_insight",
    "gui_page",
    "proxy_overview",
    "zone_online",
    "zone_overview",
]

ProxyKind = Literal["ZoneIngress", "ZoneEgress"]
"""The zone proxy types that have overviews."""

PROXY_KINDS: Final[dict[ProxyKind, tuple[str, str, str]]] = {
    # type: (its insight type, the overview's key for the proxy, ... for the insight)
    "ZoneIngress": ("ZoneIngressInsight", "zoneIngress", "zoneIngressInsight"),
    "ZoneEgress": ("ZoneEgressInsight", "zoneEgress", "zoneEgressInsight"),
}


def zone_online(
    zone: Resource | None, insight: Resource | None, *, now: datetime, liveness: float
) -> bool:
    """Whether a zone shows Online: a session open and seen within *liveness*, and enabled.

    A disabled zone shows Offline even while its last session winds down, as Kuma's
    ``kumactl inspect zones`` and GUI show it.
    """
    return is_enabled(zone) and is_online(insight, now=now, liveness=liveness)


def zone_overview(
    zone: Resource, insight: Resource | None, *, now: datetime, liveness: float
) -> dict[str, Any]:
    """The ``ZoneOverview`` of *zone*: its Zone, its ZoneInsight and whether it is online."""
    zone_insight = jsonable(insight.spec) if insight is not None else {}
    zone_insight.setdefault("subscriptions", [])
    return {
        "type": "ZoneOverview",
        "name": zone.key.name,
        "creationTime": format_time(zone.created_at),
        "modificationTime": format_time(zone.modified_at),
        "zone": {"enabled": is_enabled(zone)},
        "zoneInsight": zone_insight,
        "online": zone_online(zone, insight, now=now, liveness=liveness),
    }


def proxy_overview(
    kind: ProxyKind,
    proxy: Resource,
    insight: Resource | None,
    *,
    now: datetime,
    liveness: float,
) -> dict[str, Any]:
    """The overview of a ZoneIngress or ZoneEgress: the proxy, its insight, online or not.

    The proxy's spec and labels sit under ``zoneIngress`` (``zoneEgress``), the
    insight's spec under ``zoneIngressInsight`` (``zoneEgressInsight``; ``{}`` when
    it has none). Online means a subscription of the insight is open and was seen
    within *liveness* seconds, as for zones.
    """
    _, proxy_field, insight_field = PROXY_KINDS[kind]
    return {
        "type": f"{kind}Overview",
        "name": proxy.key.name,
        "creationTime": format_time(proxy.created_at),
        "modificationTime": format_time(proxy.modified_at),
        proxy_field: {**jsonable(proxy.spec), "labels": dict(proxy.labels)},
        insight_field: jsonable(insight.spec) if insight is not None else {},
        "online": is_online(insight, now=now, liveness=liveness),
    }


def global_insight(
    resources: Sequence[Resource], catalog: Catalog, *, now: datetime, liveness: float
) -> dict[str, Any]:
    """The ``GlobalInsight``: counts of zones (and how many are online) and of every type.

    ``meshes.withoutMtlsAcrossZones`` names the meshes used across zones without mTLS
    (:func:`kds.insights.meshes_without_mtls_across_zones`).

    Args:
        resources: every stored resource.
        catalog: the types to count (each appears, with 0 when there is none).
        now: the time to judge zones online at.
        liveness: seconds a zone's last sighting keeps it online.
    """
    totals = dict.fromkeys(catalog.names(), 0)
    zones: dict[str, Resource] = {}
    insights: dict[str, Resource] = {}
    for resource in resources:
        totals[resource.key.type] = totals.get(resource.key.type, 0) + 1
        if resource.key.type == "Zone":
            zones[resource.key.name] = resource
        elif resource.key.type == "ZoneInsight":
            insights[resource.key.name] = resource
    online = sum(
        zone_online(zone, insights.get(name), now=now, liveness=liveness)
        for name, zone in zones.items()
    )
    return {
        "type": "GlobalInsight",
        "createdAt": format_time(now),
        "zones": {
            "controlPlanes": {"total": len(zones), "online": online},
            "zoneIngresses": {"total": totals.get("ZoneIngress", 0)},
            "zoneEgresses": {"total": totals.get("ZoneEgress", 0)},
        },
        "meshes": {
            "total": totals.get("Mesh", 0),
            # Meshes whose dataplanes run in several zones with mTLS disabled.
            "withoutMtlsAcrossZones": list(meshes_without_mtls_across_zones(resources)),
        },
        "resources": {name: {"total": total} for name, total in sorted(totals.items())},
    }


_PAGE: Final = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="10">
<title>kds global control plane</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }}
.online {{ color: #060; }} .offline {{ color: #a00; }}
</style>
</head>
<body>
<h1>kds global control plane</h1>
<h2>Zones</h2>
<table>
<tr><th>Name</th><th>Status</th><th>Enabled</th></tr>
{zones}
</table>
<h2>Zone ingresses</h2>
<table>
<tr><th>Name</th><th>Zone</th><th>Status</th><th>Address</th></tr>
{ingresses}
</table>
</body>
</html>
"""


def gui_page(zones: Iterable[dict[str, Any]], ingresses: Iterable[dict[str, Any]]) -> str:
    """The HTML page listing zones and zone ingresses, from their overviews.

    Plain server-side HTML, every value escaped; it reloads itself every 10 seconds.
    """
    zone_rows = [
        _row(overview["name"], _status(overview["online"]), _yes_no(overview["zone"]["enabled"]))
        for overview in zones
    ]
    ingress_rows = []
    for overview in ingresses:
        proxy = overview["zoneIngress"]
        zone = proxy["labels"].get(LABEL_ZONE) or proxy.get("zone") or ""
        ingress_rows.append(
            _row(overview["name"], zone, _status(overview["online"]), _address(proxy))
        )
    return _PAGE.format(
        zones="\n".join(zone_rows) or _empty(3, "no zones"),
        ingresses="\n".join(ingress_rows) or _empty(4, "no zone ingresses"),
    )


def _status(online: bool) -> tuple[str, str]:
    return ("Online", "online") if online else ("Offline", "offline")


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _address(proxy: dict[str, Any]) -> str:
    networking = proxy.get("networking")
    if not isinstance(networking, dict):
        return ""
    address = networking.get("advertisedAddress") or networking.get("address")
    port = networking.get("advertisedPort") or networking.get("port")
    if address is None:
        return ""
    return f"{address}:{port}" if port is not None else str(address)


def _row(*cells: str | tuple[str, str]) -> str:
    parts = []
    for cell in cells:
        if isinstance(cell, tuple):
            text, css_class = cell
            parts.append(f'<td class="{css_class}">{html.escape(text)}</td>')
        else:
            parts.append(f"<td>{html.escape(str(cell))}</td>")
    return "<tr>" + "".join(parts) + "</tr>"


def _empty(columns: int, text: str) -> str:
    return f'<tr><td colspan="{columns}">{html.escape(text)}</td></tr>'
