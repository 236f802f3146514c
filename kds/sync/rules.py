"""What each direction replicates, how copies are named and labelled, and who owns what.

Kuma's filters and mappers (``reference/kuma-kds.md`` §2 and §3), as pure functions:

* **global → zone**: :func:`global_to_zone` decides, for one resource of the global's
  log and one zone, whether the zone gets it and as what (origin ``global``, the
  hash-suffix name); :data:`GLOBAL_COPY_LABELS` mark what a zone's copy of the global's
  stream consists of.
* **zone → global**: :func:`sent_by_zone` is what a zone offers (its locally
  originated resources); :func:`zone_to_global` is the global's copy of one, with
  ``kuma.io/origin``/``kuma.io/zone`` *overwritten* with the zone's authenticated
  name, so a zone can only ever write its own copies; :func:`zone_copy_labels` mark what
  the global holds of one zone.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import attrs

from kds.resource import (
    LABEL_DISPLAY_NAME,
    LABEL_KDS_SYNC,
    LABEL_ORIGIN,
    LABEL_POLICY_ROLE,
    LABEL_ZONE,
    ORIGIN_GLOBAL,
    ORIGIN_ZONE,
    ResourceKey,
    SyncFlag,
    sync_name,
)

if TYPE_CHECKING:
    from collections.abc import Collection

    from kds.resource import Catalog, ResourceType

__all__ = [
    "GLOBAL_COPY_LABELS",
    "INTERNAL_GLOBAL_SECRETS",
    "INTERNAL_SECRET_PREFIXES",
    "SYNCED_CONFIGS",
    "Copy",
    "global_copy",
    "global_to_zone",
    "is_locally_originated",
    "sent_by_zone",
    "zone_copy_labels",
    "zone_to_global",
]

SYNCED_CONFIGS: Final = frozenset({"kuma-cluster-id"})
"""The only Config resources the global sends to zones."""

INTERNAL_GLOBAL_SECRETS: Final = frozenset(
    {"envoy-admin-ca", "admin-user-token", "inter-cp-ca", "user-token-revocations"}
)
"""GlobalSecrets the global keeps to itself (also those :data:`INTERNAL_SECRET_PREFIXES` name)."""

INTERNAL_SECRET_PREFIXES: Final = ("user-token-signing-key", "zone-token-signing-key")
"""Name prefixes of GlobalSecrets the global keeps to itself: private signing keys.

``zone-token-signing-public-key-<serial>`` does not start with ``zone-token-signing-key``,
so zones still get the public keys they verify zone and dataplane tokens with."""

_POLICY_ROLE_PRODUCER: Final = "producer"


@attrs.frozen
class Copy:
    """A resource as the receiving side stores it: its key there and its labels.

    Attributes:
        key: the copy's key (the hash-suffix name where the type uses one).
        labels: the copy's labels.
    """

    key: ResourceKey
    labels: Mapping[str, str]


def is_locally_originated(labels: Mapping[str, str]) -> bool:
    """True for a resource created where it is stored (origin absent or ``zone``)."""
    return labels.get(LABEL_ORIGIN, ORIGIN_ZONE) == ORIGIN_ZONE


def _origin(labels: Mapping[str, str]) -> str | None:
    return labels.get(LABEL_ORIGIN)


def _withheld(resource_type: ResourceType, key: ResourceKey, labels: Mapping[str, str]) -> bool:
    """Kuma's exclusions that hold whoever the zone is."""
    if labels.get(LABEL_KDS_SYNC) == "disabled":
        return True
    if resource_type.name == "Config":
        return key.name not in SYNCED_CONFIGS
    if resource_type.name == "GlobalSecret":
        return key.name in INTERNAL_GLOBAL_SECRETS or key.name.startswith(INTERNAL_SECRET_PREFIXES)
    return False


def _copy(key: ResourceKey, labels: Mapping[str, str], *, hashed: bool) -> Copy:
    """The copy's key and labels when the type uses hash-suffix names (*hashed*) or not."""
    if not hashed:
        return Copy(key, labels)
    name = sync_name(key, labels)
    if name != key.name and LABEL_DISPLAY_NAME not in labels:
        labels = {**labels, LABEL_DISPLAY_NAME: key.name}
    return Copy(ResourceKey(key.type, key.mesh, name), labels)


def global_to_zone(
    catalog: Catalog,
    key: ResourceKey,
    labels: Mapping[str, str],
    zone: str,
    disabled_zones: Collection[str] = (),
) -> Copy | None:
    """The zone's copy of a resource of the global's log, or ``None`` if it gets none.

    The zone gets a resource of a type the global sends unless it is withheld
    (``kuma.io/kds-sync: disabled``, Configs other than ``kuma-cluster-id``, the
    global's internal GlobalSecrets). A global-origin resource of a
    ``GLOBAL_TO_ZONES`` type always goes; a zone-origin one only for
    ``SYNCED_ACROSS_ZONES`` types, never back to its own zone nor from a disabled
    zone, and, for policies (which also flow global→zones), only when its
    ``kuma.io/policy-role`` is ``producer``.

    The copy has ``kuma.io/origin: global`` and the hash-suffix name (with
    ``kuma.io/display-name`` set to the original name) unless the type keeps its
    names everywhere; a zone-origin copy keeps its ``kuma.io/zone``, so it has the
    same name in every zone as on the global.

    Args:
        catalog: the global's types.
        key: the resource's key on the global.
        labels: its labels on the global.
        zone: the receiving zone.
        disabled_zones: zones whose resources are not forwarded.
    """
    resource_type = sent_to_zone(catalog, key, labels, zone, disabled_zones)
    return None if resource_type is None else global_copy(resource_type, key, labels)


def sent_to_zone(
    catalog: Catalog,
    key: ResourceKey,
    labels: Mapping[str, str],
    zone: str,
    disabled_zones: Collection[str] = (),
) -> ResourceType | None:
    """The resource's type when *zone* gets a copy of it, ``None`` when it gets none.

    The filters of :func:`global_to_zone`, without the copy: what the copy is does
    not depend on the zone (:func:`global_copy`), so a sender serving many zones
    can make it once.
    """
    if key.type not in catalog:
        return None
    resource_type = catalog[key.type]
    if not resource_type.sent_from_global or _withheld(resource_type, key, labels):
        return None
    origin = _origin(labels)
    if origin in (None, ORIGIN_GLOBAL):
        if SyncFlag.GLOBAL_TO_ZONES not in resource_type.flags:
            return None
    else:
        if SyncFlag.SYNCED_ACROSS_ZONES not in resource_type.flags:
            return None
        source = labels.get(LABEL_ZONE)
        if source is None or source == zone or source in disabled_zones:
            return None
        is_policy = SyncFlag.GLOBAL_TO_ZONES in resource_type.flags
        if is_policy and labels.get(LABEL_POLICY_ROLE) != _POLICY_ROLE_PRODUCER:
            return None
    return resource_type


def global_copy(resource_type: ResourceType, key: ResourceKey, labels: Mapping[str, str]) -> Copy:
    """A zone's copy of a global resource, whether or not the zone gets it.

    What :func:`global_to_zone` returns when the resource passes its filters; also
    names the copy to delete when a resource stops passing them.
    """
    return _copy(key, {**labels, LABEL_ORIGIN: ORIGIN_GLOBAL}, hashed=resource_type.hash_names)


GLOBAL_COPY_LABELS: Final[Mapping[str, str]] = MappingProxyType({LABEL_ORIGIN: ORIGIN_GLOBAL})
"""The labels of a zone's copies of global resources (what a reset from the global replaces)."""


def sent_by_zone(catalog: Catalog, key: ResourceKey, labels: Mapping[str, str]) -> bool:
    """Whether a zone offers a resource of its log to the global.

    Only its locally originated resources of types zones send, and not those
    labelled ``kuma.io/kds-sync: disabled`` (the label keeps a resource where it
    was created, in either direction): copies received from the global are never
    echoed back.
    """
    if key.type not in catalog or not catalog[key.type].sent_from_zone:
        return False
    return is_locally_originated(labels) and labels.get(LABEL_KDS_SYNC) != "disabled"


def zone_to_global(key: ResourceKey, labels: Mapping[str, str], zone: str) -> Copy:
    """The global's copy of a resource *zone* sent.

    ``kuma.io/origin: zone`` and ``kuma.io/zone: <zone>`` are overwritten with the
    session's authenticated zone, whatever the zone put there, and the name is
    always the hash-suffix name over the original name and the zone: a zone
    cannot name another zone's copy (or a global resource) and so cannot write it.
    """
    stamped = {**labels, LABEL_ORIGIN: ORIGIN_ZONE, LABEL_ZONE: zone}
    return _copy(key, stamped, hashed=True)


def zone_copy_labels(zone: str) -> Mapping[str, str]:
    """The labels of the global's copies of what *zone* published (what it may change)."""
    return {LABEL_ORIGIN: ORIGIN_ZONE, LABEL_ZONE: zone}
