"""The insight rules as pure functions: ServiceInsight specs, availableServices, mTLS flags."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kds import ResourceKey
from kds.insights import (
    AvailableServices,
    ServiceInsights,
    available_services,
    dataplane_services,
    is_service_insight_of,
    meshes_without_mtls_across_zones,
    mtls_enabled,
    service_insight_name,
    service_insight_spec,
    service_status,
    service_zones,
)
from kds.resource import Resource, hashed_name
from kds.sync.lifecycle import is_online
from kds.testing import MemoryStore

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
LIVENESS = 30.0
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


def resource(type_name, mesh, name, spec=None, labels=None) -> Resource:
    return Resource(
        key=ResourceKey(type_name, mesh, name),
        labels=labels or {},
        spec=spec or {},
        version=1,
        created_at=EPOCH,
        modified_at=EPOCH,
    )


def dataplane(name, *services, mesh="default", zone="zone-1", gateway=None, health=None):
    inbound = []
    for service in services:
        entry = {"port": 8080, "tags": {"kuma.io/service": service}}
        if health is not None:
            entry["health"] = {"ready": health}
        inbound.append(entry)
    networking = {"address": "10.0.0.1", "inbound": inbound}
    if gateway is not None:
        networking["gateway"] = gateway
    labels = {"kuma.io/origin": "zone", "kuma.io/zone": zone} if zone else {}
    return resource("Dataplane", mesh, name, {"networking": networking}, labels)


def subscription(seen: datetime, *, disconnected: datetime | None = None) -> dict[str, Any]:
    return {
        "id": "s",
        "connectTime": (seen - timedelta(minutes=5)).isoformat(),
        "lastSeen": seen.isoformat(),
        "disconnectTime": disconnected.isoformat() if disconnected else None,
    }


def insight(name, *subscriptions, mesh="default"):
    return resource("DataplaneInsight", mesh, name, {"subscriptions": list(subscriptions)})


def mesh(name, backend=None):
    spec = {"mtls": {"enabledBackend": backend}} if backend is not None else {}
    return resource("Mesh", None, name, spec)


# -- single rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("online", "total", "external", "status"),
    [
        (0, 0, True, "not_available"),
        (3, 3, True, "not_available"),
        (0, 3, False, "offline"),
        (0, 0, False, "offline"),
        (3, 3, False, "online"),
        (1, 3, False, "partially_degraded"),
    ],
)
def test_service_status_follows_kumas_rules(online, total, external, status):
    assert service_status(online=online, total=total, external=external) == status


def test_dataplane_services_reads_inbounds_and_gateways():
    spec = dataplane("dp", "backend", "admin").spec
    assert dataplane_services(spec) == {"backend": "internal", "admin": "internal"}
    builtin = {"type": "BUILTIN", "tags": {"kuma.io/service": "edge"}}
    assert dataplane_services(dataplane("gw", gateway=builtin).spec) == {"edge": "gateway_builtin"}
    delegated = {"tags": {"kuma.io/service": "kong"}}
    assert dataplane_services(dataplane("gw", gateway=delegated).spec) == {
        "kong": "gateway_delegated"
    }


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"networking": "10.0.0.1"},
        {"networking": {"inbound": "backend"}},
        {"networking": {"inbound": [None, 3, {"tags": "x"}, {"tags": {"kuma.io/service": 7}}]}},
        {"networking": {"inbound": [{"tags": {"kuma.io/service": ""}}], "gateway": []}},
    ],
)
def test_malformed_dataplanes_have_no_services(spec):
    assert dataplane_services(spec) == {}
    assert (
        service_insight_spec([resource("Dataplane", "m", "dp", spec)], [], now=NOW, liveness=1)[
            "services"
        ]
        == {}
    )
    assert available_services([resource("Dataplane", "m", "dp", spec)], [mesh("m", "ca")]) == []


@pytest.mark.parametrize(
    ("spec", "enabled"),
    [
        ({"mtls": {"enabledBackend": "ca-1"}}, True),
        ({"mtls": {"enabledBackend": ""}}, False),
        ({"mtls": {"backends": [{"name": "ca-1"}]}}, False),
        ({"mtls": "ca-1"}, False),
        ({}, False),
        (None, False),
    ],
)
def test_mtls_enabled_needs_an_enabled_backend(spec, enabled):
    assert mtls_enabled(spec) is enabled


def test_service_insight_names():
    assert service_insight_name("default") == "all-services-default"
    assert is_service_insight_of("all-services-default", {}, "default")
    assert not is_service_insight_of("all-services-default", {}, "other")
    # On a zone: the global's copy, hash-suffix name and display name.
    copy = hashed_name("default", "all-services-default")
    labels = {"kuma.io/display-name": "all-services-default", "kuma.io/origin": "global"}
    assert is_service_insight_of(copy, labels, "default")
    assert not is_service_insight_of(copy, {}, "default")


def test_service_insight_spec_counts_statuses_and_zones():
    recent, stale = NOW - timedelta(seconds=5), NOW - timedelta(minutes=5)
    dataplanes = [
        dataplane("be-1", "backend", zone="zone-1"),
        dataplane("be-2", "backend", zone="zone-2"),
        dataplane("web-1", "web", "admin", zone="zone-1"),
        dataplane("web-2", "web", zone="zone-2"),
        dataplane("db-1", "db", zone="zone-2"),
    ]
    insights = [
        insight("be-1", subscription(recent)),
        insight("be-2", subscription(stale), subscription(recent)),
        insight("web-1", subscription(recent)),
        insight("web-2", subscription(recent, disconnected=recent)),  # said goodbye
        insight("db-1", subscription(stale)),  # stopped heartbeating
        insight("gone", subscription(recent)),  # no such dataplane: ignored
    ]
    externals = [
        resource("ExternalService", "default", "httpbin", {"tags": {"kuma.io/service": "ext"}}),
        resource("ExternalService", "default", "shadow", {"tags": {"kuma.io/service": "db"}}),
    ]
    spec = service_insight_spec(
        dataplanes, insights, now=NOW, liveness=LIVENESS, external_services=externals
    )
    assert list(spec["services"]) == ["admin", "backend", "db", "ext", "web"]
    assert spec["services"]["backend"] == {
        "status": "online",
        "dataplanes": {"total": 2, "online": 2, "offline": 0},
        "serviceType": "internal",
        "zones": ["zone-1", "zone-2"],
    }
    assert spec["services"]["web"]["status"] == "partially_degraded"
    assert spec["services"]["web"]["dataplanes"] == {"total": 2, "online": 1, "offline": 1}
    assert spec["services"]["admin"]["status"] == "online"
    # A service dataplanes provide is theirs, even if an ExternalService names it too.
    assert spec["services"]["db"]["status"] == "offline"
    assert spec["services"]["db"]["zones"] == ["zone-2"]
    assert spec["services"]["ext"] == {
        "status": "not_available",
        "dataplanes": {"total": 0, "online": 0, "offline": 0},
        "serviceType": "external",
        "zones": [],
    }


def test_available_services_group_by_mesh_and_tag_set():
    secured, plain = mesh("secure", "ca-1"), mesh("plain")
    tags_v1 = {"kuma.io/service": "backend", "version": "v1"}
    tags_v2 = {"kuma.io/service": "backend", "version": "v2"}

    def dp(name, mesh_name, *tag_sets, health=None):
        inbound = [{"port": 1, "tags": tags} for tags in tag_sets]
        if health is not None:
            inbound[0]["health"] = {"ready": health}
        return resource("Dataplane", mesh_name, name, {"networking": {"inbound": inbound}})

    entries = available_services(
        [
            dp("a", "secure", tags_v1),
            dp("b", "secure", tags_v2, {"kuma.io/service": "web"}),
            dp("c", "secure", tags_v1),
            dp("d", "secure", tags_v2, health=False),  # unhealthy: not offered
            dp("e", "plain", tags_v1),  # mTLS off: not offered
            dp("f", "nomesh", tags_v1),  # no Mesh resource: not offered
        ],
        [secured, plain],
    )
    assert entries == [
        {"tags": {"kuma.io/service": "backend", "version": "v1"}, "instances": 2, "mesh": "secure"},
        {"tags": {"kuma.io/service": "backend", "version": "v2"}, "instances": 1, "mesh": "secure"},
        {"tags": {"kuma.io/service": "web"}, "instances": 1, "mesh": "secure"},
    ]


def test_meshes_without_mtls_across_zones():
    resources = [
        mesh("open"),
        mesh("secure", "ca-1"),
        mesh("local"),
        dataplane("a", "x", mesh="open", zone="zone-1"),
        dataplane("b", "x", mesh="open", zone="zone-2"),
        dataplane("c", "x", mesh="secure", zone="zone-1"),
        dataplane("d", "x", mesh="secure", zone="zone-2"),
        dataplane("e", "x", mesh="local", zone="zone-1"),
        dataplane("f", "x", mesh="local", zone="zone-1"),
        # No Mesh at all (yet): no mTLS either.
        dataplane("g", "x", mesh="orphan", zone="zone-1"),
        dataplane("h", "x", mesh="orphan", zone="zone-3"),
    ]
    assert meshes_without_mtls_across_zones(resources) == {
        "open": ["zone-1", "zone-2"],
        "orphan": ["zone-1", "zone-3"],
    }


def test_a_zone_learns_of_other_zones_from_the_service_insight():
    # A zone holds only its own Dataplanes, and the global's ServiceInsight copy.
    copy = hashed_name("open", "all-services-open")
    spec = {
        "services": {
            "x": {"zones": ["zone-1", "zone-2"]},
            "y": {"zones": ["zone-3"]},
            "broken": "not a service",
        }
    }
    labels = {"kuma.io/display-name": "all-services-open", "kuma.io/origin": "global"}
    assert service_zones(spec) == ["zone-1", "zone-2", "zone-3"]
    resources = [
        mesh("open"),
        dataplane("a", "x", mesh="open", zone="zone-1"),
        resource("ServiceInsight", "open", copy, spec, labels),
        # Some other ServiceInsight of the mesh says nothing about its zones.
        resource("ServiceInsight", "open", "mine", {"services": {"z": {"zones": ["zone-9"]}}}),
    ]
    assert meshes_without_mtls_across_zones(resources) == {"open": ["zone-1", "zone-2", "zone-3"]}


# -- properties ------------------------------------------------------------------------------

SERVICES = st.sampled_from(["backend", "web", "db", "cache"])
ZONES = st.sampled_from(["zone-1", "zone-2", "zone-3"])
OFFSETS = st.integers(min_value=-120, max_value=10)  # seconds from NOW


@st.composite
def fleets(draw):
    """Dataplanes with random services and zones, and random insights for some of them."""
    count = draw(st.integers(min_value=0, max_value=12))
    dataplanes, insights = [], []
    for index in range(count):
        name = f"dp-{index}"
        services = draw(st.lists(SERVICES, max_size=3))
        dataplanes.append(dataplane(name, *services, zone=draw(ZONES)))
        if draw(st.booleans()):
            subscriptions = []
            for _ in range(draw(st.integers(min_value=0, max_value=3))):
                seen = NOW + timedelta(seconds=draw(OFFSETS))
                closed = draw(st.booleans())
                subscriptions.append(subscription(seen, disconnected=seen if closed else None))
            insights.append(insight(name, *subscriptions))
    return dataplanes, insights


@given(fleet=fleets(), liveness=st.sampled_from([1.0, 30.0, 90.0]))
def test_totals_add_up_and_status_follows_the_rules(fleet, liveness):
    dataplanes, insights = fleet
    spec = service_insight_spec(dataplanes, insights, now=NOW, liveness=liveness)
    by_name = {i.key.name: i for i in insights}
    # The reference: each dataplane counts once per service; the zone lifecycle's rule.
    total: Counter[str] = Counter()
    online: Counter[str] = Counter()
    zones: dict[str, set[str]] = {}
    for dp in dataplanes:
        live = is_online(by_name.get(dp.key.name), now=NOW, liveness=liveness)
        for service in set(dataplane_services(dp.spec)):
            total[service] += 1
            online[service] += live
            zones.setdefault(service, set()).add(dp.labels["kuma.io/zone"])
    assert list(spec["services"]) == sorted(total)
    for name, service in spec["services"].items():
        counts = service["dataplanes"]
        assert counts == {
            "total": total[name],
            "online": online[name],
            "offline": total[name] - online[name],
        }
        assert counts["online"] + counts["offline"] == counts["total"] > 0
        expected = (
            "offline"
            if counts["online"] == 0
            else "online"
            if counts["online"] == counts["total"]
            else "partially_degraded"
        )
        assert service["status"] == expected
        assert service["zones"] == sorted(zones[name])


@given(fleet=fleets(), secured=st.sets(st.sampled_from(["default", "other"])))
def test_available_instances_add_up(fleet, secured):
    dataplanes, _ = fleet
    meshes = [mesh(name, "ca-1" if name in secured else None) for name in ("default", "other")]
    entries = available_services(dataplanes, meshes)
    inbounds = sum(len(dp.spec["networking"]["inbound"]) for dp in dataplanes)
    assert sum(entry["instances"] for entry in entries) == (inbounds if "default" in secured else 0)
    keys = [(e["mesh"], sorted(e["tags"].items())) for e in entries]
    assert keys == sorted(keys)
    assert len(set(map(repr, keys))) == len(keys)


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "1"])
def test_reconcilers_refuse_bad_intervals(value):
    store = MemoryStore()
    with pytest.raises(ValueError, match="interval must be"):
        ServiceInsights(store, liveness=30.0, interval=value)
    with pytest.raises(ValueError, match="liveness must be"):
        ServiceInsights(store, liveness=value)
    with pytest.raises(ValueError, match="interval must be"):
        AvailableServices(store, interval=value)
