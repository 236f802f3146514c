"""How resources look in the HTTP API and in kdsctl's YAML files.

A resource is one JSON object: the metadata keys (``type``, ``mesh`` for mesh-scoped
types, ``name``, ``labels``, ``creationTime``, ``modificationTime``) and its spec.
Types with :attr:`~kds.resource.ResourceType.flat_spec` (Kuma's older types: Mesh,
Dataplane, ZoneIngress, ...) show the spec's fields beside the metadata keys; every
other type keeps them under ``"spec"``::

    {"type": "Mesh", "name": "default", "mtls": {...}}
    {"type": "MeshTimeout", "mesh": "default", "name": "t", "spec": {"targetRef": {...}}}

The server and kdsctl both read and write resources with these functions, so a file
``kdsctl apply`` takes and what ``GET`` returns have one shape.
"""

from __future__ import annotations

import base64
import difflib
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from kds.errors import ValidationError
from kds.resource import ResourceKey, ResourceType, Scope

if TYPE_CHECKING:
    from kds.resource import Catalog, Resource

__all__ = [
    "FLAT_RESERVED_KEYS",
    "MAX_SPEC_DEPTH",
    "METADATA_KEYS",
    "format_time",
    "from_json",
    "jsonable",
    "label_field",
    "to_json",
    "type_path",
]

METADATA_KEYS: Final = frozenset(
    {"type", "mesh", "name", "labels", "creationTime", "modificationTime"}
)
"""Top-level keys that are metadata, never part of a spec."""

FLAT_RESERVED_KEYS: Final = METADATA_KEYS | {"spec"}
"""Keys a flat type's spec cannot use: the metadata keys, and ``spec`` (refused on
input so that a nested document sent for a flat type gets a clear error)."""

MAX_SPEC_DEPTH: Final = 100
"""Deepest nesting of lists and objects a spec may have (Kuma's specs use about 8)."""

_INT_MIN: Final = -(2**63)  # msgpack stores integers in 64 bits, signed or unsigned
_INT_MAX: Final = 2**64 - 1

# Kuma's URL paths for the types whose path is not the plural of the lower-case name.
_SPECIAL_PATHS: Final = {
    "Mesh": "meshes",
    "Zone": "zones",
    "ZoneInsight": "zone-insights",
    "ZoneIngress": "zoneingresses",
    "ZoneIngressInsight": "zone-ingress-insights",
    "ZoneEgress": "zoneegresses",
    "ZoneEgressInsight": "zoneegressinsights",
    "Dataplane": "dataplanes",
    "DataplaneInsight": "dataplane-insights",
    "ServiceInsight": "service-insights",
    "MeshInsight": "mesh-insights",
    "Secret": "secrets",
    "GlobalSecret": "global-secrets",
}

_JSON_NAMES: Final = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def type_path(resource_type: ResourceType | str) -> str:
    """Return the URL path segment of a type: ``MeshTimeout`` is ``meshtimeouts``.

    Kuma's paths for its types (``zone-insights``, ``zoneingresses``, ...); any
    other type gets its lower-case name plus ``es`` when it ends in ``s`` or ``x``,
    else plus ``s``.
    """
    name = resource_type if isinstance(resource_type, str) else resource_type.name
    special = _SPECIAL_PATHS.get(name)
    if special is not None:
        return special
    lower = name.lower()
    return lower + ("es" if lower.endswith(("s", "x")) else "s")


def format_time(moment: datetime) -> str:
    """A timestamp as the API shows it: RFC 3339 in UTC (``2024-05-01T12:00:00.5Z``)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def label_field(name: str) -> str:
    """The field name of one label in errors: ``labels["kuma.io/origin"]``."""
    return f"labels[{json.dumps(name, ensure_ascii=False)}]"


def to_json(resource: Resource, catalog: Catalog) -> dict[str, Any]:
    """Return *resource* as the API shows it: a JSON-ready dict.

    JSON has neither bytes nor non-finite numbers, which a spec written through the
    library may hold: bytes appear as base64 text, NaN and the infinities as the
    strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``. A flat type's spec fields
    named like a metadata key or ``spec`` (:data:`FLAT_RESERVED_KEYS`) cannot be shown
    beside them and are left out.

    Args:
        resource: a stored resource.
        catalog: where to find whether its type is flat (an unknown type is shown
            with its spec under ``"spec"``).
    """
    key = resource.key
    document: dict[str, Any] = {"type": key.type}
    if key.mesh is not None:
        document["mesh"] = key.mesh
    document["name"] = key.name
    if resource.labels:
        document["labels"] = dict(resource.labels)
    document["creationTime"] = format_time(resource.created_at)
    document["modificationTime"] = format_time(resource.modified_at)
    spec = jsonable(resource.spec)
    if key.type in catalog and catalog[key.type].flat_spec:
        document.update((k, v) for k, v in spec.items() if k not in FLAT_RESERVED_KEYS)
    else:
        document["spec"] = spec
    return document


def from_json(
    document: object, catalog: Catalog, *, mesh: str | None = None
) -> tuple[ResourceKey, dict[str, str], dict[str, Any]]:
    """Read a resource document (a parsed JSON body or YAML file) into key, labels and spec.

    ``creationTime`` and ``modificationTime`` are ignored; ``labels`` may be absent
    or null. Everything is checked, and the spec with the type's validator.

    Args:
        document: the parsed document.
        catalog: the known types.
        mesh: the mesh to use for a mesh-scoped type when the document has none
            (the server passes the mesh of the URL).

    Returns:
        The key, the labels and the spec.

    Raises:
        ValidationError: naming the field that is wrong: ``document``, ``type``,
            ``mesh``, ``name``, ``labels``, ``labels["x"]``, ``spec``, ``spec.x``,
            or an unknown top-level field.
    """
    if not isinstance(document, Mapping):
        raise ValidationError("document", f"must be an object, got {_json_name(document)}")
    for field in document:
        if not isinstance(field, str):
            raise ValidationError("document", f"field names must be strings, got {field!r}")
    resource_type = _resource_type(document, catalog)
    key = _key(document, resource_type, mesh)
    labels = _labels(document.get("labels"))
    spec = _spec(document, resource_type)
    resource_type.validate_spec(spec)
    return key, labels, spec


def _json_name(value: object) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _resource_type(document: Mapping[str, Any], catalog: Catalog) -> ResourceType:
    if "type" not in document:
        raise ValidationError("type", "is required")
    type_name = document["type"]
    if not isinstance(type_name, str):
        raise ValidationError("type", f"must be a string, got {_json_name(type_name)}")
    if type_name not in catalog:
        close = difflib.get_close_matches(type_name, catalog.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValidationError("type", f"unknown resource type {type_name!r}{hint}")
    return catalog[type_name]


def _key(
    document: Mapping[str, Any], resource_type: ResourceType, default_mesh: str | None
) -> ResourceKey:
    if "name" not in document:
        raise ValidationError("name", "is required")
    name = document["name"]
    given_mesh = document.get("mesh")
    if resource_type.scope is Scope.GLOBAL:
        if given_mesh is not None:
            raise ValidationError("mesh", f"must not be set: {resource_type.name} is not in a mesh")
        mesh = None
    else:
        mesh = given_mesh if given_mesh is not None else default_mesh
        if mesh is None:
            raise ValidationError("mesh", f"is required: {resource_type.name} is mesh-scoped")
    key = ResourceKey(resource_type.name, mesh, name)
    try:
        key.validate()
    except ValidationError as exc:
        # The key's fields are "key.mesh", "key.name": the document's are "mesh", "name".
        raise ValidationError(exc.field.removeprefix("key."), exc.reason) from None
    return key


def _labels(labels: object) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ValidationError("labels", f"must be an object, got {_json_name(labels)}")
    checked: dict[str, str] = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not name:
            raise ValidationError("labels", f"label names must be non-empty strings: {name!r}")
        if not isinstance(value, str):
            raise ValidationError(label_field(name), f"must be a string, got {_json_name(value)}")
        checked[name] = value
    return checked


def _spec(document: Mapping[str, Any], resource_type: ResourceType) -> dict[str, Any]:
    if resource_type.flat_spec:
        if "spec" in document:
            raise ValidationError(
                "spec",
                f"{resource_type.name} keeps its fields at the top level, beside type and "
                "name, not under spec",
            )
        spec = {k: v for k, v in document.items() if k not in METADATA_KEYS}
        _check_values("", spec)
        return spec
    for field in document:
        if field not in FLAT_RESERVED_KEYS:
            raise ValidationError(
                field, f"unknown field: {resource_type.name} keeps its fields under spec"
            )
    given = document.get("spec")
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise ValidationError("spec", f"must be an object, got {_json_name(given)}")
    spec = dict(given)
    _check_values("", spec)
    return spec


def _check_values(prefix: str, spec: Mapping[Any, Any]) -> None:
    """Check that *spec* holds only JSON values a store can keep, naming the bad one.

    Iterative rather than recursive: the nesting is bounded by :data:`MAX_SPEC_DEPTH`
    here, and must never exhaust the interpreter's stack on the way there.
    """
    stack: list[tuple[str, object, int]] = [(prefix, spec, 0)]
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, Mapping):
            children: list[tuple[str, object]] = []
            for child_name, child in value.items():
                if not isinstance(child_name, str):
                    raise ValidationError(
                        f"spec{path}", f"field names must be strings, got {child_name!r}"
                    )
                children.append((f"{path}.{child_name}", child))
        elif isinstance(value, list):
            children = [(f"{path}[{index}]", child) for index, child in enumerate(value)]
        elif isinstance(value, bool | str) or value is None:
            continue
        elif isinstance(value, int):
            if not _INT_MIN <= value <= _INT_MAX:
                raise ValidationError(f"spec{path}", "is out of range: integers have 64 bits")
            continue
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValidationError(f"spec{path}", "must be a finite number")
            continue
        else:
            raise ValidationError(
                f"spec{path}",
                f"must be an object, a list, a string, a number, a boolean or null, "
                f"got {type(value).__name__}",
            )
        if children and depth >= MAX_SPEC_DEPTH:
            raise ValidationError(
                f"spec{path}", f"is nested more than {MAX_SPEC_DEPTH} levels deep"
            )
        stack.extend((child_path, child, depth + 1) for child_path, child in children)


def jsonable(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of a stored spec holding only JSON values (see :func:`to_json`)."""
    result: dict[str, Any] = {}
    # Iterative for the same reason as _check_values: (destination, key, value) to copy.
    stack: list[tuple[dict[str, Any] | list[Any], str | int, object]] = [
        (result, name, value) for name, value in spec.items()
    ]
    while stack:
        target, slot, value = stack.pop()
        converted: object
        if isinstance(value, Mapping):
            converted = {}
            stack.extend((converted, _text(k), v) for k, v in value.items())
        elif isinstance(value, list | tuple):
            converted = [None] * len(value)
            stack.extend((converted, index, item) for index, item in enumerate(value))
        elif isinstance(value, bytes):
            converted = base64.b64encode(value).decode("ascii")
        elif isinstance(value, float) and not math.isfinite(value):
            converted = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        else:
            converted = value
        if isinstance(target, dict):
            target[str(slot)] = converted
        else:
            target[int(slot)] = converted
    return result


def _text(name: object) -> str:
    if isinstance(name, bytes):
        return base64.b64encode(name).decode("ascii")
    return str(name)
