"""The resource model: keys, resources, type descriptors, labels and copy naming."""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Final

import attrs

from kds.errors import ValidationError

__all__ = [
    "LABEL_DISPLAY_NAME",
    "LABEL_K8S_NAMESPACE",
    "LABEL_KDS_SYNC",
    "LABEL_ORIGIN",
    "LABEL_POLICY_ROLE",
    "LABEL_ZONE",
    "MAX_NAME_LENGTH",
    "ORIGIN_GLOBAL",
    "ORIGIN_ZONE",
    "Catalog",
    "Resource",
    "ResourceKey",
    "ResourceType",
    "Scope",
    "SpecValidator",
    "SyncFlag",
    "hashed_name",
    "sync_name",
    "validate_labels",
]

LABEL_ORIGIN: Final = "kuma.io/origin"
"""Where a resource was created: :data:`ORIGIN_GLOBAL` or :data:`ORIGIN_ZONE`.

Absent means local to whichever control plane reads it."""
LABEL_ZONE: Final = "kuma.io/zone"
"""The zone a zone-originated resource comes from."""
LABEL_DISPLAY_NAME: Final = "kuma.io/display-name"
"""The resource's original name, kept when a copy is renamed with a hash suffix."""
LABEL_K8S_NAMESPACE: Final = "k8s.kuma.io/namespace"
"""The Kubernetes namespace a resource came from (part of the copy-name hash)."""
LABEL_KDS_SYNC: Final = "kuma.io/kds-sync"
"""``enabled`` or ``disabled``: overrides the type's default for one resource."""
LABEL_POLICY_ROLE: Final = "kuma.io/policy-role"
"""``system``, ``producer``, ``consumer`` or ``workload-owner``."""

ORIGIN_GLOBAL: Final = "global"
ORIGIN_ZONE: Final = "zone"

MAX_NAME_LENGTH: Final = 253
"""Longest resource or mesh name: a DNS subdomain, as Kubernetes allows."""

# Copy names keep at most this much of the original name, so that "-" plus the
# 16-character hash still fits in MAX_NAME_LENGTH (Kuma: 253 - 17).
_HASHED_PREFIX_LENGTH: Final = MAX_NAME_LENGTH - 17
_SAFE_ALPHABET: Final = "bcdfghjklmnpqrstvwxz2456789"
_FNV64_OFFSET: Final = 0xCBF29CE484222325
_FNV64_PRIME: Final = 0x100000001B3
_U64: Final = 2**64 - 1


class Scope(enum.Enum):
    """Whether a type's resources live inside a mesh or beside the meshes."""

    GLOBAL = "global"
    """Not in a mesh: the key's ``mesh`` is ``None`` (Mesh, Zone, GlobalSecret)."""
    MESH = "mesh"
    """Inside one mesh: the key's ``mesh`` names it (Dataplane, policies)."""


class SyncFlag(enum.IntFlag):
    """Which control plane provides a type and which consumes it; Kuma's KDS flags.

    The same flags decide replication direction and which side's API may write
    the type. Values equal Kuma's bitmask so flags can be compared across systems.
    """

    NONE = 0
    CONSUMED_BY_ZONE = 1
    CONSUMED_BY_GLOBAL = 1 << 2
    PROVIDED_BY_ZONE = 1 << 3
    PROVIDED_BY_GLOBAL = 1 << 4
    SYNCED_ACROSS_ZONES = 1 << 5
    DISABLED_BY_DEFAULT = 1 << 6
    GLOBAL_TO_ZONES = PROVIDED_BY_GLOBAL | CONSUMED_BY_ZONE
    ZONE_TO_GLOBAL = CONSUMED_BY_GLOBAL | PROVIDED_BY_ZONE


def _check_name(field: str, value: object) -> None:
    # Fast path for the common, valid case (commits validate every key). Among
    # printable characters only the space is whitespace: the rest (tabs, newlines,
    # no-break and other Unicode spaces) are not printable.
    if (
        type(value) is str
        and 0 < len(value) <= MAX_NAME_LENGTH
        and value.isprintable()
        and " " not in value
    ):
        return
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise ValidationError(field, "must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise ValidationError(
            field, f"is {len(value)} characters long, the limit is {MAX_NAME_LENGTH}"
        )
    if not value.isprintable() or " " in value:
        raise ValidationError(field, f"{value!r} contains whitespace or control characters")


@attrs.frozen(order=True)
class ResourceKey:
    """Identity of a resource: its type name, its mesh and its name.

    ``mesh`` is ``None`` for global-scoped types. Keys order by
    ``(type, mesh, name)`` with ``None`` meshes first.
    """

    type: str
    mesh: str | None = attrs.field(order=lambda mesh: "" if mesh is None else "\0" + mesh)
    name: str

    def validate(self) -> None:
        """Check the key's own shape (not whether its type exists or fits its scope).

        Raises:
            ValidationError: a field is not a non-empty printable string without
                whitespace, or is longer than :data:`MAX_NAME_LENGTH`.
        """
        _check_name("key.type", self.type)
        if self.mesh is not None:
            _check_name("key.mesh", self.mesh)
        _check_name("key.name", self.name)

    def __str__(self) -> str:
        return f"{self.type}/{self.mesh}/{self.name}" if self.mesh else f"{self.type}/{self.name}"


@attrs.frozen(kw_only=True, eq=True)
class Resource:
    """One stored resource as a store returns it.

    Attributes:
        key: type, mesh and name.
        labels: string labels, including the ``kuma.io/*`` ones.
        spec: the type's content: a msgpack-able mapping, checked by the type's validator.
        version: starts at 1 and is bumped by the store on every change of this resource.
        created_at: when the store first committed it (UTC).
        modified_at: when the store last committed a change to it (UTC).
    """

    key: ResourceKey
    labels: Mapping[str, str]
    spec: Mapping[str, Any]
    version: int
    created_at: datetime
    modified_at: datetime

    def content(self) -> tuple[ResourceKey, Mapping[str, str], Mapping[str, Any], int]:
        """Everything but the timestamps: what two stores holding the same data agree on."""
        return (self.key, self.labels, self.spec, self.version)


SpecValidator = Callable[[Mapping[str, Any]], None]
"""Checks a spec; raises :class:`~kds.errors.ValidationError` naming the bad field."""


@attrs.frozen(kw_only=True)
class ResourceType:
    """Descriptor of a resource type: scope, sync direction, naming and validation.

    Attributes:
        name: the type name used in keys and on the wire (``"MeshTimeout"``).
        scope: whether resources are mesh-scoped or global-scoped.
        flags: who provides and consumes the type (:class:`SyncFlag`).
        hash_names: whether copies in other control planes get the hash-suffix name.
            Kuma skips it for Mesh, Secret, GlobalSecret and Config.
        validator: optional spec check run on every commit and every decode.
        flat_spec: whether the HTTP API and YAML files show the spec's fields beside
            ``type``, ``mesh`` and ``name`` (Kuma's older types: Mesh, Dataplane,
            ZoneIngress, ...) rather than under ``spec`` (Kuma's newer policies, and the
            default for new types).
    """

    name: str
    scope: Scope
    flags: SyncFlag = SyncFlag.NONE
    hash_names: bool = True
    validator: SpecValidator | None = attrs.field(default=None, eq=False)
    flat_spec: bool = False

    @property
    def sent_from_global(self) -> bool:
        """True when the global replicates this type down to zones."""
        return SyncFlag.GLOBAL_TO_ZONES in self.flags or (
            SyncFlag.SYNCED_ACROSS_ZONES in self.flags
        )

    @property
    def sent_from_zone(self) -> bool:
        """True when zones replicate this type up to the global."""
        return SyncFlag.ZONE_TO_GLOBAL in self.flags

    @property
    def writable_on_global(self) -> bool:
        """True when the global's API may create, change and delete this type."""
        return SyncFlag.PROVIDED_BY_GLOBAL in self.flags

    @property
    def writable_on_zone(self) -> bool:
        """True when a federated zone's API may create, change and delete this type."""
        return SyncFlag.PROVIDED_BY_ZONE in self.flags

    def validate_spec(self, spec: object) -> None:
        """Check that *spec* is a mapping with string keys that this type accepts.

        Raises:
            ValidationError: naming ``spec`` or the field inside it that is wrong.
        """
        if not isinstance(spec, Mapping):
            raise ValidationError("spec", f"must be a mapping, got {type(spec).__name__}")
        for field_name in spec:
            if not isinstance(field_name, str):
                raise ValidationError("spec", f"keys must be strings, got {field_name!r}")
        if self.validator is not None:
            self.validator(spec)


class Catalog:
    """An immutable set of resource types, looked up by name.

    Build a new one with :meth:`with_types` to add an application's own types.

    Args:
        types: the types by name; prefer :meth:`of`, which checks for duplicates.
    """

    __slots__ = ("_types",)

    def __init__(self, types: Mapping[str, ResourceType]) -> None:
        self._types = dict(types)

    def __repr__(self) -> str:
        return f"Catalog({self.names()!r})"

    @classmethod
    def of(cls, types: Iterable[ResourceType]) -> Catalog:
        """Create a catalog from *types*.

        Raises:
            ValueError: two types have the same name.
        """
        by_name: dict[str, ResourceType] = {}
        for resource_type in types:
            if resource_type.name in by_name:
                raise ValueError(f"resource type {resource_type.name!r} is defined twice")
            by_name[resource_type.name] = resource_type
        return cls(by_name)

    def with_types(self, *types: ResourceType) -> Catalog:
        """Return a catalog holding this one's types and *types*.

        Raises:
            ValueError: a type's name is already in this catalog.
        """
        return Catalog.of([*self._types.values(), *types])

    def __getitem__(self, name: str) -> ResourceType:
        """Return the type called *name*.

        Raises:
            KeyError: no such type.
        """
        return self._types[name]

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[ResourceType]:
        return iter(self._types.values())

    def __len__(self) -> int:
        return len(self._types)

    def names(self) -> list[str]:
        """All type names, sorted."""
        return sorted(self._types)

    def validate_key(self, key: ResourceKey) -> ResourceType:
        """Check *key*'s shape, that its type exists and that its mesh fits the scope.

        Returns:
            The key's resource type.

        Raises:
            ValidationError: naming ``key.type``, ``key.mesh`` or ``key.name``.
        """
        key.validate()
        try:
            resource_type = self._types[key.type]
        except KeyError:
            raise ValidationError("key.type", f"unknown resource type {key.type!r}") from None
        if resource_type.scope is Scope.MESH and key.mesh is None:
            raise ValidationError("key.mesh", f"{key.type} is mesh-scoped: a mesh is required")
        if resource_type.scope is Scope.GLOBAL and key.mesh is not None:
            raise ValidationError("key.mesh", f"{key.type} is global-scoped: mesh must be None")
        return resource_type


def validate_labels(labels: object) -> None:
    """Check that *labels* maps non-empty strings to strings.

    Raises:
        ValidationError: naming ``labels`` or the bad label.
    """
    if not isinstance(labels, Mapping):
        raise ValidationError("labels", f"must be a mapping, got {type(labels).__name__}")
    items = labels.items()
    # Fast path for the common, valid case; the loop below finds what is wrong.
    if all(type(name) is str and name and type(value) is str for name, value in items):
        return
    for name, value in items:
        if not isinstance(name, str) or not name:
            raise ValidationError("labels", f"label names must be non-empty strings: {name!r}")
        if not isinstance(value, str):
            raise ValidationError(f"labels.{name}", f"must be a string, got {type(value).__name__}")


def _fnv64a(data: bytes) -> int:
    value = _FNV64_OFFSET
    prime, mask = _FNV64_PRIME, _U64  # locals: this loop runs for every replicated copy
    for byte in data:
        value = ((value ^ byte) * prime) & mask
    return value


# Each hex digit's letter in the suffix: translating the digest beats a per-digit lookup.
_SUFFIX_LETTERS: Final = str.maketrans(
    {digit: _SAFE_ALPHABET[ord(digit) % len(_SAFE_ALPHABET)] for digit in "0123456789abcdef"}
)


def hashed_name(mesh: str, name: str, *extra: str) -> str:
    """Return the hash-suffix name Kuma gives copies of a resource in other planes.

    ``name[:236] + "-" + safe(hex(fnv64a(mesh + name + extra...)))``: the parts are
    concatenated with no separator and each hex digit maps onto a 27-letter
    alphabet without vowels, giving a DNS-safe 16-character suffix. The result is
    byte-for-byte what Kuma computes, so kds and Kuma name copies alike.

    >>> hashed_name("default", "redis-zone-2", "zone-2")
    'redis-zone-2-ff29vc4685c6f594'
    """
    return _hashed_name(mesh, name, *extra)


# Cached: the global names each copy once per zone it sends it to.
@functools.lru_cache(maxsize=65536)
def _hashed_name(mesh: str, name: str, *extra: str) -> str:
    digest = format(_fnv64a("".join((mesh, name, *extra)).encode()), "016x")
    return f"{name[:_HASHED_PREFIX_LENGTH]}-{digest.translate(_SUFFIX_LETTERS)}"


def sync_name(key: ResourceKey, labels: Mapping[str, str]) -> str:
    """Name a copy of the resource at *key* in another control plane.

    Uses the ``kuma.io/display-name`` label as the name when present, and adds the
    ``kuma.io/zone`` and ``k8s.kuma.io/namespace`` label values (in that order, only
    those present) to the hash, as Kuma does. Global-scoped keys hash an empty mesh.
    """
    name = labels.get(LABEL_DISPLAY_NAME, key.name)
    extra = [labels[label] for label in (LABEL_ZONE, LABEL_K8S_NAMESPACE) if label in labels]
    return hashed_name(key.mesh or "", name, *extra)
