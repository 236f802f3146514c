"""How kds resources look as Kubernetes custom resources.

Shared by the Kubernetes store (``kds_stores.kubernetes``) and ``kdsctl install
control-plane``, so the CustomResourceDefinitions the installer prints are the ones
the store registers, and both name objects alike. Nothing here talks to a cluster.

* Each resource type is a namespaced CRD ``<plural>.<group>`` (``meshtimeouts.kuma.io``),
  kind = the type's name, one served and stored version (``v1alpha1``).
* A resource is one object in the store's namespace. Its kds name and labels are kept
  exactly in annotations; Kubernetes labels carry the ones Kubernetes can represent,
  so label selectors work for them. Mesh-scoped resources carry ``mesh`` at the top
  level, as Kuma's do.
* The spec is stored readably under ``spec`` when JSON represents it exactly, and
  otherwise as base64 msgpack under ``encodedSpec`` (bytes, integer map keys, integral
  floats, integers outside int64: things JSON, or the API server's JSON decoding,
  would change).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import msgpack

from kds.errors import ConfigError, ValidationError
from kds.resource import Resource, ResourceKey, Scope

if TYPE_CHECKING:
    from collections.abc import Mapping

    from kds.resource import Catalog, ResourceType

__all__ = [
    "ANNOTATION_CREATED",
    "ANNOTATION_DIGEST",
    "ANNOTATION_LABELS",
    "ANNOTATION_MODIFIED",
    "ANNOTATION_NAME",
    "ANNOTATION_VERSION",
    "DEFAULT_GROUP",
    "DEFAULT_NAMESPACE",
    "DEFAULT_VERSION",
    "crd_manifest",
    "crd_manifests",
    "crd_name",
    "digest",
    "from_object",
    "is_label",
    "object_name",
    "plural",
    "to_object",
]

DEFAULT_GROUP: Final = "kuma.io"
"""The API group of the CRDs, as Kuma's (``meshtimeouts.kuma.io``)."""

DEFAULT_VERSION: Final = "v1alpha1"
"""The one version each CRD serves and stores."""

DEFAULT_NAMESPACE: Final = "kds-system"
"""The namespace a store keeps its objects in."""

ANNOTATION_NAME: Final = "kds.kuma.io/name"
"""The resource's kds name (object names are restricted to DNS subdomains)."""
ANNOTATION_LABELS: Final = "kds.kuma.io/labels"
"""Every kds label, as a JSON object (Kubernetes labels cannot hold every value)."""
ANNOTATION_VERSION: Final = "kds.kuma.io/version"
"""The resource's kds version: 1 on creation, +1 on every change."""
ANNOTATION_CREATED: Final = "kds.kuma.io/created"
"""When the resource was created, with microseconds (``creationTimestamp`` has seconds)."""
ANNOTATION_MODIFIED: Final = "kds.kuma.io/modified"
"""When the resource was last changed."""
ANNOTATION_DIGEST: Final = "kds.kuma.io/digest"
"""A digest of the encoded labels and spec, so "is this upsert a change?" does not
depend on the key order the API server writes maps back in."""

_DNS_LABEL_PATTERN: Final = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN: Final = re.compile(rf"{_DNS_LABEL_PATTERN}(\.{_DNS_LABEL_PATTERN})*")
_LABEL_PART: Final = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_KIND: Final = re.compile(r"[A-Z][A-Za-z0-9]*")
_INT64: Final = 2**63
_OBJECT_NAME_LIMIT: Final = 253
_HASH_CHARS: Final = 16


def plural(type_name: str) -> str:
    """The CRD plural of a type: its lower-case name made plural as in English.

    ``Mesh`` is ``meshes``, ``ZoneIngress`` ``zoneingresses``, ``MeshTimeout``
    ``meshtimeouts`` -- Kuma's plurals.

    Raises:
        ConfigError: the type's name cannot be a Kubernetes kind (it must be an
            ASCII identifier starting with a capital letter, at most 62 characters).
    """
    if not _KIND.fullmatch(type_name) or len(type_name) > 61:
        raise ConfigError(
            f"resource type {type_name!r} cannot be a Kubernetes kind: use an ASCII name "
            "starting with a capital letter, letters and digits only, at most 61 characters"
        )
    lower = type_name.lower()
    if lower.endswith("y") and lower[-2:-1] not in ("a", "e", "i", "o", "u"):
        return lower[:-1] + "ies"  # meshretries, meshloadbalancingstrategies
    return lower + ("es" if lower.endswith(("s", "x", "ch", "sh")) else "s")


def crd_name(type_name: str, group: str = DEFAULT_GROUP) -> str:
    """The CustomResourceDefinition's name: ``<plural>.<group>``."""
    return f"{plural(type_name)}.{group}"


def crd_manifest(
    resource_type: ResourceType, *, group: str = DEFAULT_GROUP, version: str = DEFAULT_VERSION
) -> dict[str, Any]:
    """The CustomResourceDefinition of *resource_type*, as a Kubernetes object.

    Namespaced, one version served and stored, a structural schema that keeps the
    spec as given (``x-kubernetes-preserve-unknown-fields``), and printer columns
    (MESH for mesh-scoped types, AGE).

    Raises:
        ConfigError: the type's name cannot be a Kubernetes kind, or *group* is not
            a DNS subdomain.
    """
    if not _DNS_SUBDOMAIN.fullmatch(group) or "." not in group:
        raise ConfigError(f"CRD group {group!r} must be a DNS subdomain with a dot (kuma.io)")
    name = resource_type.name
    properties: dict[str, Any] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "description": f"The {name}'s spec, as kds stores it.",
            "x-kubernetes-preserve-unknown-fields": True,
        },
        "encodedSpec": {
            "type": "string",
            "description": "The spec as base64 msgpack, when JSON cannot represent it exactly.",
        },
    }
    columns: list[dict[str, Any]] = []
    if resource_type.scope is Scope.MESH:
        properties["mesh"] = {"type": "string", "description": "The mesh this resource is in."}
        columns.append({"name": "Mesh", "type": "string", "jsonPath": ".mesh"})
    columns.append({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": crd_name(name, group),
            "labels": {"app.kubernetes.io/part-of": "kds"},
        },
        "spec": {
            "group": group,
            "names": {
                "kind": name,
                "listKind": f"{name}List",
                "plural": plural(name),
                "singular": name.lower(),
                "categories": ["kds"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": properties}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def crd_manifests(
    catalog: Catalog, *, group: str = DEFAULT_GROUP, version: str = DEFAULT_VERSION
) -> list[dict[str, Any]]:
    """The CRD of every type in *catalog*, in the catalog's order."""
    return [crd_manifest(t, group=group, version=version) for t in catalog]


def is_label(name: str, value: str) -> bool:
    """Whether Kubernetes accepts *name* = *value* as a label (so a selector can match it)."""
    prefix, slash, short = name.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return (
        0 < len(short) <= 63
        and _LABEL_PART.fullmatch(short) is not None
        and len(value) <= 63
        and _LABEL_PART.fullmatch(value) is not None
    )


def object_name(key: ResourceKey) -> str:
    """The Kubernetes object name of *key*: unique per type within one namespace.

    A global-scoped name that is already a DNS subdomain is used as it is
    (``kubectl get meshes default``). Any other name -- mesh-scoped, or with
    characters Kubernetes refuses -- becomes a readable lower-case prefix plus a
    hash of the mesh and name, so different keys get different object names (the
    store still checks the key an object carries, in case two ever collide).
    """
    if (
        key.mesh is None
        and len(key.name) <= _OBJECT_NAME_LIMIT
        and _DNS_SUBDOMAIN.fullmatch(key.name)
    ):
        return key.name
    source = key.name if key.mesh is None else f"{key.name}.{key.mesh}"
    readable = re.sub(r"[^a-z0-9.-]+", "-", source.lower())
    readable = re.sub(r"[.-]{2,}", "-", readable).strip(".-")
    readable = readable[: _OBJECT_NAME_LIMIT - _HASH_CHARS - 1].rstrip(".-") or "r"
    digest = hashlib.sha256(msgpack.packb([key.mesh, key.name])).hexdigest()[:_HASH_CHARS]
    return f"{readable}-{digest}"


def _json_faithful(value: object) -> bool:
    """Whether JSON, as the API server decodes and re-encodes it, gives *value* back."""
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -_INT64 <= value < _INT64
    if isinstance(value, float):
        # The API server re-encodes 1.0 as 1 (an int), and JSON has no NaN or infinity.
        return math.isfinite(value) and not value.is_integer()
    if isinstance(value, list | tuple):
        return all(_json_faithful(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_faithful(v) for k, v in value.items())
    return False  # bytes, extension types


def digest(labels_blob: bytes, spec_blob: bytes) -> str:
    """The :data:`ANNOTATION_DIGEST` of a resource's encoded labels and spec."""
    hashed = hashlib.sha256(len(labels_blob).to_bytes(8, "big") + labels_blob + spec_blob)
    return hashed.hexdigest()[:32]


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def to_object(
    resource: Resource,
    resource_type: ResourceType,
    *,
    content_digest: str,
    group: str = DEFAULT_GROUP,
    version: str = DEFAULT_VERSION,
    namespace: str = DEFAULT_NAMESPACE,
) -> dict[str, Any]:
    """The Kubernetes object that stores *resource* (without a resourceVersion)."""
    key = resource.key
    labels = {name: value for name, value in resource.labels.items() if is_label(name, value)}
    body: dict[str, Any] = {
        "apiVersion": f"{group}/{version}",
        "kind": resource_type.name,
        "metadata": {
            "name": object_name(key),
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                ANNOTATION_NAME: key.name,
                ANNOTATION_LABELS: json.dumps(dict(resource.labels), sort_keys=True),
                ANNOTATION_VERSION: str(resource.version),
                ANNOTATION_CREATED: _timestamp(resource.created_at),
                ANNOTATION_MODIFIED: _timestamp(resource.modified_at),
                ANNOTATION_DIGEST: content_digest,
            },
        },
    }
    if key.mesh is not None:
        body["mesh"] = key.mesh
    spec = dict(resource.spec)
    if _json_faithful(spec):
        body["spec"] = spec
    else:
        blob = msgpack.packb(spec, use_bin_type=True)
        body["spec"] = {}
        body["encodedSpec"] = base64.b64encode(blob).decode("ascii")
    return body


def _field(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValidationError(path, "is missing")
        value = value[part]
    return value


def from_object(obj: Mapping[str, Any], catalog: Catalog) -> Resource:
    """The kds resource a Kubernetes object stores.

    Objects kds did not write (created with ``kubectl apply``) are read too: their
    name and labels are the object's own and their version is the object's
    ``generation``.

    Raises:
        ValidationError: a kds annotation is malformed, naming the field; or the
            object's key does not fit *catalog*.
    """
    type_name = _field(obj, "kind")
    metadata = _field(obj, "metadata")
    annotations = metadata.get("annotations") or {}
    try:
        if ANNOTATION_VERSION in annotations:
            name = annotations[ANNOTATION_NAME]
            labels = json.loads(annotations[ANNOTATION_LABELS])
            version = int(annotations[ANNOTATION_VERSION])
            created_at = datetime.fromisoformat(annotations[ANNOTATION_CREATED])
            modified_at = datetime.fromisoformat(annotations[ANNOTATION_MODIFIED])
        else:
            # Written by someone else (kubectl apply): its own name and labels, and the
            # generation as its version, which Kubernetes bumps on every spec change.
            name = metadata["name"]
            labels = dict(metadata.get("labels") or {})
            version = int(metadata.get("generation") or 1)
            created_at = modified_at = datetime.fromisoformat(
                str(metadata["creationTimestamp"]).replace("Z", "+00:00")
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValidationError(
            "metadata.annotations", f"is not what kds writes ({type(exc).__name__}: {exc})"
        ) from exc
    mesh = obj.get("mesh")
    key = ResourceKey(type_name, mesh if isinstance(mesh, str) else None, name)
    catalog.validate_key(key)
    encoded = obj.get("encodedSpec")
    if isinstance(encoded, str) and encoded:
        spec = msgpack.unpackb(base64.b64decode(encoded), raw=False)
    else:
        spec = obj.get("spec") or {}
    return Resource(
        key=key,
        labels=labels,
        spec=spec,
        version=version,
        created_at=created_at,
        modified_at=modified_at,
    )
