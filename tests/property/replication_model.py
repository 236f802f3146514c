"""A model of replication between one global and a few zones, for property tests.

A *program* is a list of operations: writes on the global and on each zone, and
faults (cut sessions, refused connections, restarted engines, compacted logs,
zones disabled and enabled again). :class:`Model` follows only the writes and
the enabled state of each zone, which is all the converged state depends on:

* each zone's store must hold its own local resources, as written, plus the
  global's resources filtered and mapped for it (:func:`expected_zone_view`);
* the global must hold its own resources, as written, plus each enabled zone's
  locally originated resources as the global copies them
  (:func:`expected_global_view`), under names only their zone can write
  (:func:`authority_problems`).

The expected views are computed with the rules of :mod:`kds.sync.rules` from what
the program wrote (and, for zones, from what the global holds once it is itself
checked), never from what the engines did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs
from hypothesis import strategies as st

from kds.catalog import DEFAULT_CATALOG
from kds.resource import (
    LABEL_DISPLAY_NAME,
    LABEL_KDS_SYNC,
    LABEL_ORIGIN,
    LABEL_POLICY_ROLE,
    LABEL_ZONE,
    ORIGIN_GLOBAL,
    ORIGIN_ZONE,
    ResourceKey,
    hashed_name,
)
from kds.sync import rules

if TYPE_CHECKING:
    from hypothesis.strategies import DrawFn, SearchStrategy

    from kds.resource import Resource

__all__ = [
    "ALL_ZONES",
    "IGNORED_TYPES",
    "Accept",
    "AwaitSessions",
    "CompactGlobal",
    "CompactZone",
    "DisableZone",
    "EnableZone",
    "GlobalDelete",
    "GlobalUpsert",
    "Model",
    "Op",
    "Pause",
    "Program",
    "Refuse",
    "RestartGlobal",
    "RestartZone",
    "Settle",
    "Sever",
    "View",
    "ZoneDelete",
    "ZoneUpsert",
    "authority_problems",
    "comparable_global_view",
    "describe_diff",
    "expected_global_view",
    "expected_zone_view",
    "programs",
    "view_of",
]

IGNORED_TYPES: Final = frozenset({"Zone", "ZoneInsight", "MeshInsight"})
"""Each plane's own bookkeeping, never replicated: left out of every comparison."""

ALL_ZONES: Final = ("zone-1", "zone-2", "zone-3")

View = dict[ResourceKey, tuple[dict[str, str], dict[str, Any]]]
"""What two planes holding the same data agree on: key -> (labels, spec)."""


def _key(type_name: str, mesh: str | None, name: str) -> ResourceKey:
    return ResourceKey(type_name, mesh, name)


# -- pools ------------------------------------------------------------------------------
# Small on purpose, so that programs write the same keys again, delete what exists,
# and make zone-local names clash with the global's.

GLOBAL_KEYS: Final = (
    _key("MeshTimeout", "default", "mt-a"),
    _key("Mesh", None, "default"),
    _key("Mesh", None, "demo"),
    _key("MeshTimeout", "demo", "mt-a"),
    _key("MeshTimeout", "default", "mt-b"),
    _key("Secret", "default", "shared"),
    _key("Secret", "default", "s-global"),
    _key("GlobalSecret", None, "gs"),
    _key("GlobalSecret", None, "inter-cp-ca"),  # internal: never leaves the global
    _key("GlobalSecret", None, "shared-gs"),
    _key("Config", None, "kuma-cluster-id"),  # the one Config zones get
    _key("Config", None, "other-config"),
)

ZONE_SENT_KEYS: Final = (
    _key("Dataplane", "default", "dp-1"),
    _key("Dataplane", "demo", "dp-1"),
    _key("Dataplane", "default", "dp-2"),
    _key("ZoneIngress", None, "zi"),
    _key("MeshService", "default", "svc"),
    _key("MeshTimeout", "default", "mt-a"),  # the global's policy name, in the zone
    _key("MeshTimeout", "default", "mt-z"),
)
"""Zone-local resources of types zones send to the global."""

ZONE_KEPT_KEYS: Final = (_key("Secret", "default", "local-only"),)
"""Zone-local resources of types zones do not send, named unlike anything global."""

ZONE_CLASHING_KEYS: Final = (
    _key("Secret", "default", "shared"),
    _key("GlobalSecret", None, "shared-gs"),
)
"""Zone-local resources named exactly as one of the global's (names not hashed).

The zone keeps its own and refuses the global's. Programs never delete these: a
copy refused for a clash is sent again only when it changes on the global, so
after such a delete the zone would lack the global's copy until then, by design.
"""

SPECS: Final[tuple[dict[str, Any], ...]] = ({}, {"note": "1"}, {"note": "2"})
"""Specs every type of these pools accepts (validators ignore unknown fields)."""

GLOBAL_ORIGINS: Final[tuple[dict[str, str], ...]] = ({}, {LABEL_ORIGIN: ORIGIN_GLOBAL})
GLOBAL_EXTRAS: Final[tuple[dict[str, str], ...]] = (
    {},
    {"team": "a"},
    {LABEL_KDS_SYNC: "disabled"},
    {LABEL_KDS_SYNC: "enabled", "team": "b"},
    {LABEL_POLICY_ROLE: "producer"},
)
ZONE_ORIGINS: Final[tuple[dict[str, str], ...]] = ({}, {LABEL_ORIGIN: ORIGIN_ZONE})
ZONE_EXTRAS: Final[tuple[dict[str, str], ...]] = (
    {},
    {LABEL_POLICY_ROLE: "producer"},
    {LABEL_POLICY_ROLE: "consumer"},
    {"team": "a"},
    {LABEL_KDS_SYNC: "disabled", LABEL_POLICY_ROLE: "producer"},
    # A zone naming another zone (or itself) as the origin: the global must overwrite it.
    {LABEL_ZONE: "zone-2", LABEL_POLICY_ROLE: "producer"},
)


# -- operations -------------------------------------------------------------------------


def _short(key: ResourceKey, labels: Mapping[str, str] | None = None, spec: Any = None) -> str:
    text = str(key)
    if labels is not None:
        text += f" {dict(labels)}"
    if spec is not None:
        text += f" {dict(spec)}"
    return text


@attrs.frozen(repr=False)
class GlobalUpsert:
    """Write a global-origin resource on the global."""

    key: ResourceKey
    labels: Mapping[str, str]
    spec: Mapping[str, Any]

    def __repr__(self) -> str:
        return f"GlobalUpsert({_short(self.key, self.labels, self.spec)})"


@attrs.frozen(repr=False)
class GlobalDelete:
    """Delete a global-origin resource on the global (nothing if it is missing)."""

    key: ResourceKey

    def __repr__(self) -> str:
        return f"GlobalDelete({_short(self.key)})"


@attrs.frozen(repr=False)
class ZoneUpsert:
    """Write a local resource in *zone*."""

    zone: str
    key: ResourceKey
    labels: Mapping[str, str]
    spec: Mapping[str, Any]

    def __repr__(self) -> str:
        return f"ZoneUpsert({self.zone}: {_short(self.key, self.labels, self.spec)})"


@attrs.frozen(repr=False)
class ZoneDelete:
    """Delete a local resource in *zone* (nothing if it is missing)."""

    zone: str
    key: ResourceKey

    def __repr__(self) -> str:
        return f"ZoneDelete({self.zone}: {_short(self.key)})"


@attrs.frozen
class Pause:
    """Let the engines run for *turns* scheduler turns before the next operation."""

    turns: int


@attrs.frozen
class AwaitSessions:
    """Wait until every enabled zone has a session open (unless connections are refused).

    Writes that follow then flow through live sessions rather than a reconnect.
    """


@attrs.frozen
class Sever:
    """Cut every open session, as a network failure would."""


@attrs.frozen
class Refuse:
    """Refuse new connections (the global is unreachable) until :class:`Accept`."""


@attrs.frozen
class Accept:
    """Accept connections again."""


@attrs.frozen
class RestartZone:
    """Stop *zone*'s engine and start a new one on the same store."""

    zone: str


@attrs.frozen
class RestartGlobal:
    """Stop the global's engine and start a new one on the same store."""


@attrs.frozen
class CompactGlobal:
    """Compact the global's log up to its head."""


@attrs.frozen
class CompactZone:
    """Compact *zone*'s log up to its head."""

    zone: str


@attrs.frozen
class DisableZone:
    """Commit ``enabled: false`` on *zone*'s Zone resource on the global."""

    zone: str


@attrs.frozen
class EnableZone:
    """Commit ``enabled: true`` on *zone*'s Zone resource on the global."""

    zone: str


@attrs.frozen
class Settle:
    """Accept connections, wait for the federation to converge, and check it.

    Zones disabled at that point must be refused, and their resources must have
    left every other zone.
    """


Op = (
    GlobalUpsert
    | GlobalDelete
    | ZoneUpsert
    | ZoneDelete
    | Pause
    | AwaitSessions
    | Sever
    | Refuse
    | Accept
    | RestartZone
    | RestartGlobal
    | CompactGlobal
    | CompactZone
    | DisableZone
    | EnableZone
    | Settle
)


@attrs.frozen
class Program:
    """The zones of a federation and the operations applied while it runs."""

    zones: tuple[str, ...]
    ops: tuple[Op, ...]


# -- the model --------------------------------------------------------------------------


@attrs.define
class Model:
    """What the program wrote on each plane, and which zones are disabled."""

    zones: tuple[str, ...]
    global_own: View = attrs.Factory(dict)
    zone_local: dict[str, View] = attrs.Factory(dict)
    disabled: set[str] = attrs.Factory(set)

    def __attrs_post_init__(self) -> None:
        for zone in self.zones:
            self.zone_local.setdefault(zone, {})

    def enabled(self) -> list[str]:
        """The zones not disabled."""
        return [zone for zone in self.zones if zone not in self.disabled]

    def apply(self, op: Op) -> None:
        """Record the effect of *op* on the converged state."""
        if isinstance(op, GlobalUpsert):
            self.global_own[op.key] = (dict(op.labels), dict(op.spec))
        elif isinstance(op, GlobalDelete):
            self.global_own.pop(op.key, None)
        elif isinstance(op, ZoneUpsert):
            self.zone_local[op.zone][op.key] = (dict(op.labels), dict(op.spec))
        elif isinstance(op, ZoneDelete):
            self.zone_local[op.zone].pop(op.key, None)
        elif isinstance(op, DisableZone):
            self.disabled.add(op.zone)
        elif isinstance(op, EnableZone):
            self.disabled.discard(op.zone)
        # Faults change nothing the converged state depends on.


def view_of(resources: Iterable[Resource]) -> View:
    """The comparable view of stored resources, without each plane's bookkeeping."""
    return {
        r.key: (dict(r.labels), dict(r.spec)) for r in resources if r.key.type not in IGNORED_TYPES
    }


def expected_global_view(model: Model) -> View:
    """What the global holds once converged, leaving out disabled zones' copies.

    Its own resources as written, and each enabled zone's locally originated
    resources of types zones send, as the global copies them. (A disabled zone's
    copies stay as they were when it was last connected: not compared.)
    """
    expected = dict(model.global_own)
    for zone, local in model.zone_local.items():
        if zone in model.disabled:
            continue
        for key, (labels, spec) in local.items():
            if rules.sent_by_zone(DEFAULT_CATALOG, key, labels):
                copy = rules.zone_to_global(key, labels, zone)
                assert copy.key not in expected, f"zone_to_global names two resources {copy.key}"
                expected[copy.key] = (dict(copy.labels), spec)
    return expected


def comparable_global_view(actual: View, disabled: Iterable[str]) -> View:
    """The global's *actual* view without the copies of *disabled* zones."""
    skipped = set(disabled)
    return {
        key: value
        for key, value in actual.items()
        if not (value[0].get(LABEL_ORIGIN) == ORIGIN_ZONE and value[0].get(LABEL_ZONE) in skipped)
    }


def expected_zone_view(zone: str, local: View, global_view: View, disabled: Iterable[str]) -> View:
    """What *zone* holds once converged, given the global's (checked) view.

    Its own local resources as written, and each resource of the global that
    :func:`rules.global_to_zone` gives it, except where the copy's key is already
    taken by a local resource: the zone keeps its own and refuses the global's.
    """
    expected = dict(local)
    mapped: dict[ResourceKey, ResourceKey] = {}
    for key, (labels, spec) in global_view.items():
        copy = rules.global_to_zone(DEFAULT_CATALOG, key, labels, zone, frozenset(disabled))
        if copy is None:
            continue
        assert copy.key not in mapped, f"global_to_zone names {key} and {mapped[copy.key]} alike"
        mapped[copy.key] = key
        if copy.key not in local:
            expected[copy.key] = (dict(copy.labels), spec)
    return expected


def authority_problems(global_view: View, model: Model) -> list[str]:
    """What breaks authority on the global, checked without :mod:`kds.sync.rules`.

    Everything on the global that it did not write itself must be a zone's copy:
    labelled ``origin: zone`` and ``kuma.io/zone`` with one of the zones, named
    with Kuma's hash over its original name and that zone, and matching a local
    resource of that zone (same original name, mesh and type).
    """
    problems = []
    for key, (labels, _spec) in global_view.items():
        if key in model.global_own:
            continue
        zone = labels.get(LABEL_ZONE)
        original = labels.get(LABEL_DISPLAY_NAME, "")
        if labels.get(LABEL_ORIGIN) != ORIGIN_ZONE or zone not in model.zones:
            problems.append(f"{key}: not the global's own, yet not a zone's copy: {labels}")
        elif key.name != hashed_name(key.mesh or "", original, zone):
            problems.append(f"{key}: not the name zone {zone!r} gives {original!r}")
        elif ResourceKey(key.type, key.mesh, original) not in model.zone_local[zone]:
            problems.append(f"{key}: zone {zone!r} has no local {key.type} {original!r}")
    return problems


def describe_diff(expected: View, actual: View) -> list[str]:
    """One line per key that differs: missing, unexpected, or with other content."""
    lines = []
    for key in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(key), actual.get(key)
        if want == got:
            continue
        if got is None:
            lines.append(f"  missing    {key} {want}")
        elif want is None:
            lines.append(f"  unexpected {key} {got}")
        else:
            lines.append(f"  different  {key}: expected {want}, got {got}")
    return lines


# -- strategies -------------------------------------------------------------------------


def _labels(
    origins: tuple[dict[str, str], ...], extras: tuple[dict[str, str], ...]
) -> SearchStrategy[dict[str, str]]:
    return st.sampled_from([{**origin, **extra} for origin in origins for extra in extras])


_GLOBAL_LABELS: Final = _labels(GLOBAL_ORIGINS, GLOBAL_EXTRAS)
_ZONE_LABELS: Final = _labels(ZONE_ORIGINS, ZONE_EXTRAS)
_SPECS: Final = st.sampled_from(SPECS)

# Operation kinds, repeated for weight: writes are the bulk of a program, faults
# are sprinkled in. sampled_from shrinks towards the front, so writes come first.
_KINDS: Final = (
    *("global-upsert",) * 4,
    *("zone-upsert",) * 4,
    *("pause",) * 3,
    *("await-sessions",) * 2,
    *("global-delete",) * 2,
    *("zone-delete",) * 2,
    "sever",
    "refuse",
    "accept",
    "restart-zone",
    "restart-global",
    "compact-global",
    "compact-zone",
    "disable",
    "enable",
    "settle",
)


@st.composite
def _op(draw: DrawFn, zones: tuple[str, ...]) -> Op:
    kind = draw(st.sampled_from(_KINDS))
    zone = draw(st.sampled_from(zones))
    op: Op
    if kind == "global-upsert":
        op = GlobalUpsert(draw(st.sampled_from(GLOBAL_KEYS)), draw(_GLOBAL_LABELS), draw(_SPECS))
    elif kind == "global-delete":
        op = GlobalDelete(draw(st.sampled_from(GLOBAL_KEYS)))
    elif kind == "zone-upsert":
        keys = ZONE_SENT_KEYS + ZONE_KEPT_KEYS + ZONE_CLASHING_KEYS
        op = ZoneUpsert(zone, draw(st.sampled_from(keys)), draw(_ZONE_LABELS), draw(_SPECS))
    elif kind == "zone-delete":
        op = ZoneDelete(zone, draw(st.sampled_from(ZONE_SENT_KEYS + ZONE_KEPT_KEYS)))
    elif kind == "pause":
        op = Pause(draw(st.integers(1, 50)))
    else:
        faults: dict[str, Op] = {
            "await-sessions": AwaitSessions(),
            "sever": Sever(),
            "refuse": Refuse(),
            "accept": Accept(),
            "restart-zone": RestartZone(zone),
            "restart-global": RestartGlobal(),
            "compact-global": CompactGlobal(),
            "compact-zone": CompactZone(zone),
            "disable": DisableZone(zone),
            "enable": EnableZone(zone),
            "settle": Settle(),
        }
        op = faults[kind]
    return op


@st.composite
def programs(draw: DrawFn, *, max_ops: int = 30) -> Program:
    """Programs over two or three zones of 1 to *max_ops* operations.

    The length is drawn uniformly: Hypothesis' lists favour short ones, and long
    programs are where faults pile up.
    """
    zones = ALL_ZONES[: draw(st.integers(2, 3))]
    length = draw(st.integers(1, max_ops))
    return Program(zones, tuple(draw(_op(zones)) for _ in range(length)))
