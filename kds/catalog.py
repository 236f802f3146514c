"""The default resource type catalog, mirroring Kuma's types and sync directions.

Directions follow Kuma 2.13 (``reference: pkg/core/resources/model``): what the
global sends down, what zones send up, what is re-broadcast to other zones, and
what each control plane keeps for itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from kds.errors import ValidationError
from kds.resource import Catalog, ResourceType, Scope, SpecValidator, SyncFlag

__all__ = ["DEFAULT_CATALOG", "optional_fields"]

_JSON_TYPE_NAMES: Final = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def optional_fields(**types: type) -> SpecValidator:
    """Return a validator that checks the type of each named top-level spec field.

    Fields that are absent pass; fields not named pass. ``bool`` is not accepted
    where ``int`` is asked for, and ``dict`` accepts any mapping.

    >>> optional_fields(enabled=bool)({"enabled": "yes"})
    Traceback (most recent call last):
    kds.errors.ValidationError: spec.enabled: must be a boolean, got str
    """

    def validate(spec: Mapping[str, Any]) -> None:
        for name, expected in types.items():
            if name not in spec:
                continue
            value = spec[name]
            accepted = (
                isinstance(value, Mapping)
                if expected is dict
                else isinstance(value, expected)
                and not (expected is not bool and isinstance(value, bool))
            )
            if not accepted:
                raise ValidationError(
                    f"spec.{name}",
                    f"must be {_JSON_TYPE_NAMES.get(expected, expected.__name__)}, "
                    f"got {type(value).__name__}",
                )

    return validate


_F = SyncFlag
_GLOBAL_TO_ZONES_WITH_LOCAL = _F.GLOBAL_TO_ZONES | _F.PROVIDED_BY_ZONE
_BIDIRECTIONAL = _F.GLOBAL_TO_ZONES | _F.ZONE_TO_GLOBAL
_BIDIRECTIONAL_ACROSS_ZONES = _BIDIRECTIONAL | _F.SYNCED_ACROSS_ZONES
_LOCAL_TO_EACH_PLANE = _F.PROVIDED_BY_GLOBAL | _F.PROVIDED_BY_ZONE

_NETWORKED = optional_fields(networking=dict)

_POLICIES: Final = (
    "MeshAccessLog",
    "MeshCircuitBreaker",
    "MeshFaultInjection",
    "MeshHealthCheck",
    "MeshHTTPRoute",
    "MeshLoadBalancingStrategy",
    "MeshRateLimit",
    "MeshRetry",
    "MeshTCPRoute",
    "MeshTimeout",
    "MeshTrafficPermission",
)
_POLICY_SPEC = optional_fields(targetRef=dict, to=list, **{"from": list}, rules=list)

DEFAULT_CATALOG: Final = Catalog.of(
    [
        # Global -> zones only. Mesh names are the same everywhere.
        ResourceType(
            name="Mesh",
            flat_spec=True,
            scope=Scope.GLOBAL,
            flags=_F.GLOBAL_TO_ZONES,
            hash_names=False,
            validator=optional_fields(mtls=dict, networking=dict, routing=dict),
        ),
        ResourceType(
            name="ServiceInsight", flat_spec=True, scope=Scope.MESH, flags=_F.GLOBAL_TO_ZONES
        ),
        # Global -> zones, and zones may keep local ones of their own.
        ResourceType(
            name="Secret",
            flat_spec=True,
            scope=Scope.MESH,
            flags=_GLOBAL_TO_ZONES_WITH_LOCAL,
            hash_names=False,
            validator=optional_fields(data=str),
        ),
        ResourceType(
            name="GlobalSecret",
            flat_spec=True,
            scope=Scope.GLOBAL,
            flags=_GLOBAL_TO_ZONES_WITH_LOCAL,
            hash_names=False,
            validator=optional_fields(data=str),
        ),
        ResourceType(
            name="Config",
            flat_spec=True,
            scope=Scope.GLOBAL,
            flags=_GLOBAL_TO_ZONES_WITH_LOCAL,
            hash_names=False,
            validator=optional_fields(config=str),
        ),
        # Both ways; zone copies go up for visibility only.
        ResourceType(name="MeshGateway", flat_spec=True, scope=Scope.MESH, flags=_BIDIRECTIONAL),
        # Both ways and re-broadcast to other zones (producer policies).
        *(
            ResourceType(
                name=name,
                scope=Scope.MESH,
                flags=_BIDIRECTIONAL_ACROSS_ZONES,
                validator=_POLICY_SPEC,
            )
            for name in _POLICIES
        ),
        # Zone -> global, then on to the other zones: cross-zone service discovery.
        ResourceType(
            name="ZoneIngress",
            flat_spec=True,
            scope=Scope.GLOBAL,
            flags=_F.ZONE_TO_GLOBAL | _F.SYNCED_ACROSS_ZONES,
            validator=optional_fields(zone=str, networking=dict, availableServices=list),
        ),
        ResourceType(
            name="MeshService",
            scope=Scope.MESH,
            flags=_F.ZONE_TO_GLOBAL | _F.SYNCED_ACROSS_ZONES,
            validator=optional_fields(selector=dict, ports=list),
        ),
        # Zone -> global only: runtime state the global aggregates.
        ResourceType(
            name="Dataplane",
            flat_spec=True,
            scope=Scope.MESH,
            flags=_F.ZONE_TO_GLOBAL,
            validator=_NETWORKED,
        ),
        ResourceType(
            name="DataplaneInsight", flat_spec=True, scope=Scope.MESH, flags=_F.ZONE_TO_GLOBAL
        ),
        ResourceType(
            name="ZoneIngressInsight", flat_spec=True, scope=Scope.GLOBAL, flags=_F.ZONE_TO_GLOBAL
        ),
        ResourceType(
            name="ZoneEgress",
            flat_spec=True,
            scope=Scope.GLOBAL,
            flags=_F.ZONE_TO_GLOBAL,
            validator=optional_fields(zone=str, networking=dict),
        ),
        ResourceType(
            name="ZoneEgressInsight", flat_spec=True, scope=Scope.GLOBAL, flags=_F.ZONE_TO_GLOBAL
        ),
        # Not replicated: each control plane keeps its own.
        ResourceType(
            name="Zone",
            flat_spec=True,
            scope=Scope.GLOBAL,
            flags=_LOCAL_TO_EACH_PLANE,
            validator=optional_fields(enabled=bool),
        ),
        ResourceType(
            name="ZoneInsight", flat_spec=True, scope=Scope.GLOBAL, flags=_LOCAL_TO_EACH_PLANE
        ),
        ResourceType(
            name="MeshInsight", flat_spec=True, scope=Scope.GLOBAL, flags=_F.PROVIDED_BY_GLOBAL
        ),
    ]
)
"""Every type kds knows out of the box; extend it with :meth:`Catalog.with_types`."""
