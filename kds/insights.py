"""Insights a control plane computes from its own store, as Kuma's control planes do.

* **ServiceInsight** (global): :class:`ServiceInsights` keeps one ServiceInsight per
  mesh, named ``all-services-<mesh>``, that counts each service's dataplanes (total,
  online, offline) across every zone and names the zones they run in. Zones receive
  it like any global resource.
* **availableServices** (zone): :class:`AvailableServices` keeps each of the zone's
  own ZoneIngresses' ``availableServices``: the tag sets of the zone's dataplanes in
  meshes with mTLS enabled, with how many instances have each. Other zones route
  cross-zone traffic to those services through the ingress.
* **Cross-zone traffic without mTLS**: :func:`meshes_without_mtls_across_zones`
  names the meshes whose dataplanes run in two or more zones while the Mesh has no
  mTLS backend enabled; such a mesh contributes nothing to any ingress, so its
  services cannot be reached from other zones.

The pure functions (:func:`service_insight_spec`, :func:`available_services`,
:func:`meshes_without_mtls_across_zones`) compute from resources; the reconcilers
apply the same rules to a model of the store that they keep by following its log.

Both reconcilers load a snapshot of the types they read, then follow the log from
the snapshot's revision, so their model is always the store's view at the last
event they applied. An event marks the meshes it affects; at most once per
``interval`` they recompute those meshes and write what differs from the stored
resource, each write conditional on the version in the model. When another writer
(a second global running the same reconciler, or an operator) got there first, the
write fails with :class:`~kds.errors.ConflictError` and the mesh is retried once the
log has brought that write into the model: two instances compute the same result
from the same view, so they converge and do not undo each other's writes. A log
compacted past the reconciler's position, or a store that became unreachable, makes
it start over from a new snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, final

import anyio
import attrs

from kds.errors import CompactedError, ConflictError, StoreUnavailableError, ValidationError
from kds.resource import LABEL_DISPLAY_NAME, LABEL_ZONE, ResourceKey
from kds.store import MUST_NOT_EXIST, Delete, Upsert, Upserted
from kds.sync.rules import is_locally_originated

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import TaskStatus

    from kds.resource import Resource
    from kds.store import Change, Event, Store

__all__ = [
    "DEFAULT_INTERVAL",
    "SERVICE_INSIGHT_PREFIX",
    "SERVICE_TAG",
    "AvailableServices",
    "ServiceInsights",
    "ServiceStatus",
    "available_services",
    "dataplane_services",
    "is_service_insight_of",
    "meshes_without_mtls_across_zones",
    "mtls_enabled",
    "service_insight_name",
    "service_insight_spec",
    "service_status",
    "service_zones",
]

logger = logging.getLogger(__name__)

SERVICE_TAG: Final = "kuma.io/service"
"""The tag that names the service an inbound (or a gateway) belongs to."""
SERVICE_INSIGHT_PREFIX: Final = "all-services-"
"""The mesh's ServiceInsight is called this prefix plus the mesh's name."""
DEFAULT_INTERVAL: Final = 1.0  # seconds between recomputations of the same mesh

ServiceStatus = Literal["online", "offline", "partially_degraded", "not_available"]
"""A service's status in a ServiceInsight (Kuma's values)."""

_EXPIRY_MARGIN: Final = 0.05  # seconds past a dataplane's liveness before it is recomputed
_RETRY_BASE: Final = 0.5  # seconds before reloading after the store became unreachable
_RETRY_MAX: Final = 30.0
_ALL_INGRESSES: Final = ""  # a dirty mark for "every ingress"; never a mesh name (non-empty)
# A service both proxied and served by a gateway shows as the first of these it is.
_SERVICE_TYPES: Final = ("internal", "gateway_delegated", "gateway_builtin")


# -- the rules, as pure functions ----------------------------------------------------------


def service_insight_name(mesh: str) -> str:
    """The name of *mesh*'s ServiceInsight: ``all-services-<mesh>``."""
    return f"{SERVICE_INSIGHT_PREFIX}{mesh}"


def is_service_insight_of(name: str, labels: Mapping[str, str], mesh: str) -> bool:
    """Whether a ServiceInsight called *name* in *mesh* is the mesh's ``all-services-`` one.

    On a zone the global's ServiceInsight has a hash-suffix name and keeps its
    original name in ``kuma.io/display-name``; both forms match.
    """
    return labels.get(LABEL_DISPLAY_NAME, name) == service_insight_name(mesh)


def mtls_enabled(mesh_spec: Mapping[str, Any] | None) -> bool:
    """Whether a Mesh spec enables mTLS: ``mtls.enabledBackend`` is a non-empty string."""
    mtls = mesh_spec.get("mtls") if isinstance(mesh_spec, Mapping) else None
    backend = mtls.get("enabledBackend") if isinstance(mtls, Mapping) else None
    return isinstance(backend, str) and backend != ""


def _service_of(tags: object) -> str | None:
    if not isinstance(tags, Mapping):
        return None
    service = tags.get(SERVICE_TAG)
    return service if isinstance(service, str) and service else None


def _items(value: object) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def dataplane_services(spec: Mapping[str, Any]) -> dict[str, str]:
    """The services a Dataplane spec belongs to, each with its Kuma ``serviceType``.

    The ``kuma.io/service`` tag of each of ``networking.inbound[].tags`` is an
    ``internal`` service; that of ``networking.gateway.tags`` a ``gateway_builtin``
    (gateway ``type: BUILTIN``) or ``gateway_delegated`` one. Entries without the tag,
    or of the wrong shape, are skipped: the store only checks that ``networking`` is
    a mapping.
    """
    networking = spec.get("networking")
    if not isinstance(networking, Mapping):
        return {}
    services: dict[str, str] = {}
    gateway = networking.get("gateway")
    if isinstance(gateway, Mapping):
        service = _service_of(gateway.get("tags"))
        if service is not None:
            builtin = gateway.get("type") == "BUILTIN"
            services[service] = "gateway_builtin" if builtin else "gateway_delegated"
    for inbound in _items(networking.get("inbound")):
        service = _service_of(inbound.get("tags")) if isinstance(inbound, Mapping) else None
        if service is not None:
            services[service] = "internal"  # a proxied service is internal, gateway or not
    return services


def _healthy_inbound_tags(spec: Mapping[str, Any]) -> list[tuple[tuple[str, str], ...]]:
    """The tag sets of a Dataplane's healthy inbounds (Kuma's ``GetHealthyInbounds``)."""
    networking = spec.get("networking")
    if not isinstance(networking, Mapping):
        return []
    tag_sets = []
    for inbound in _items(networking.get("inbound")):
        if not isinstance(inbound, Mapping):
            continue
        tags = inbound.get("tags")
        if not isinstance(tags, Mapping) or _service_of(tags) is None:
            continue
        health = inbound.get("health")
        if isinstance(health, Mapping) and health.get("ready") is False:
            continue
        if inbound.get("state") in ("NotReady", "Ignored"):
            continue
        tag_sets.append(tuple(sorted((str(k), v) for k, v in tags.items() if isinstance(v, str))))
    return tag_sets


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None  # a zone's bad timestamp makes its proxy offline, not the reconciler fail
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _online_until(insight_spec: Mapping[str, Any], liveness: float) -> datetime | None:
    """Until when an insight's proxy counts as online, or ``None`` if it has no open session.

    The same rule as :func:`kds.sync.lifecycle.is_online`: online at *now* exactly
    when ``now <= until``, where *until* is the latest ``lastSeen`` (else
    ``connectTime``) of the open subscriptions plus *liveness*.
    """
    latest: datetime | None = None
    for subscription in _items(insight_spec.get("subscriptions")):
        if not isinstance(subscription, Mapping) or subscription.get("disconnectTime") is not None:
            continue
        seen = _parse_time(subscription.get("lastSeen") or subscription.get("connectTime"))
        if seen is not None and (latest is None or seen > latest):
            latest = seen
    return None if latest is None else latest + timedelta(seconds=liveness)


def _live(until: datetime | None, now: datetime) -> bool:
    return until is not None and now <= until


def service_status(*, online: int, total: int, external: bool = False) -> ServiceStatus:
    """A service's status from its dataplanes (Kuma's rules).

    External services are ``not_available``; otherwise no dataplane online is
    ``offline``, all online is ``online``, and anything between is
    ``partially_degraded``.
    """
    if external:
        return "not_available"
    if online == 0:
        return "offline"
    if online == total:
        return "online"
    return "partially_degraded"


@attrs.frozen
class _Member:
    """What one dataplane contributes to its mesh's ServiceInsight."""

    zone: str | None
    services: Mapping[str, str]  # service -> serviceType


def _member(resource: Resource) -> _Member:
    zone = resource.labels.get(LABEL_ZONE)
    return _Member(zone or None, dataplane_services(resource.spec))


def _external_services(spec: Mapping[str, Any]) -> frozenset[str]:
    service = _service_of(spec.get("tags"))
    return frozenset() if service is None else frozenset({service})


@attrs.define
class _Tally:
    total: int = 0
    online: int = 0
    zones: set[str] = attrs.Factory(set)
    kinds: set[str] = attrs.Factory(set)


def _services_spec(
    members: Iterable[tuple[_Member, bool]], externals: Iterable[Iterable[str]]
) -> dict[str, Any]:
    """The ServiceInsight spec of one mesh: its dataplanes (with online-ness), its externals."""
    tallies: dict[str, _Tally] = {}
    for member, online in members:
        for service, kind in member.services.items():
            tally = tallies.setdefault(service, _Tally())
            tally.total += 1
            tally.online += online
            tally.kinds.add(kind)
            if member.zone is not None:
                tally.zones.add(member.zone)
    external = {name for names in externals for name in names} - set(tallies)
    services: dict[str, Any] = {}
    for name in sorted(tallies.keys() | external):
        counted = tallies.get(name)
        if counted is None:
            services[name] = {
                "status": service_status(online=0, total=0, external=True),
                "dataplanes": {"total": 0, "online": 0, "offline": 0},
                "serviceType": "external",
                "zones": [],
            }
            continue
        kind = next(k for k in _SERVICE_TYPES if k in counted.kinds)
        services[name] = {
            "status": service_status(online=counted.online, total=counted.total),
            "dataplanes": {
                "total": counted.total,
                "online": counted.online,
                "offline": counted.total - counted.online,
            },
            "serviceType": kind,
            "zones": sorted(counted.zones),
        }
    return {"services": services}


def service_insight_spec(
    dataplanes: Iterable[Resource],
    insights: Iterable[Resource],
    *,
    now: datetime,
    liveness: float,
    external_services: Iterable[Resource] = (),
) -> dict[str, Any]:
    """The ServiceInsight spec of one mesh: every service with its dataplanes and zones.

    ``{"services": {<service>: {"status", "dataplanes": {"total", "online",
    "offline"}, "serviceType", "zones"}}}``, services sorted by name. A dataplane
    counts once for each service it belongs to (:func:`dataplane_services`); it is
    online when its DataplaneInsight (same mesh and name) has an open subscription
    seen within *liveness* seconds of *now* (:func:`kds.sync.lifecycle.is_online`).
    ``zones`` lists the ``kuma.io/zone`` labels of the service's dataplanes. An
    ExternalService's ``kuma.io/service`` tag is a service of type ``external`` and
    status ``not_available`` unless dataplanes also provide it.

    Args:
        dataplanes: the mesh's Dataplanes.
        insights: DataplaneInsights; those of other dataplanes are ignored.
        now: the time to judge online-ness at.
        liveness: seconds a subscription's last sighting keeps its dataplane online.
        external_services: the mesh's ExternalServices, if the catalog has the type.
    """
    until = {
        (insight.key.mesh, insight.key.name): _online_until(insight.spec, liveness)
        for insight in insights
    }
    members = [
        (_member(dataplane), _live(until.get((dataplane.key.mesh, dataplane.key.name)), now))
        for dataplane in dataplanes
    ]
    externals = [_external_services(resource.spec) for resource in external_services]
    return _services_spec(members, externals)


def _available_entries(
    mesh: str, tag_sets: Iterable[tuple[tuple[str, str], ...]]
) -> list[dict[str, Any]]:
    counts = Counter(tag_sets)
    return [
        {"tags": dict(tags), "instances": counts[tags], "mesh": mesh} for tags in sorted(counts)
    ]


def available_services(
    dataplanes: Iterable[Resource], meshes: Iterable[Resource]
) -> list[dict[str, Any]]:
    """A ZoneIngress's ``availableServices`` for *dataplanes* (Kuma's rules).

    One entry per mesh and distinct tag set of a healthy inbound (its ``health.ready``
    is not false and its ``state`` is neither ``NotReady`` nor ``Ignored``), with the
    number of such inbounds: ``{"tags": {...}, "instances": n, "mesh": m}``. Only
    meshes among *meshes* with mTLS enabled (:func:`mtls_enabled`) contribute: cross-
    zone traffic goes through the ingress over mTLS. Sorted by mesh, then by tag set.

    Args:
        dataplanes: the zone's own Dataplanes.
        meshes: the Mesh resources.
    """
    secured = {mesh.key.name for mesh in meshes if mtls_enabled(mesh.spec)}
    by_mesh: dict[str, list[tuple[tuple[str, str], ...]]] = {}
    for dataplane in dataplanes:
        mesh = dataplane.key.mesh
        if mesh is not None and mesh in secured:
            by_mesh.setdefault(mesh, []).extend(_healthy_inbound_tags(dataplane.spec))
    return [entry for mesh in sorted(by_mesh) for entry in _available_entries(mesh, by_mesh[mesh])]


def service_zones(insight_spec: Mapping[str, Any]) -> list[str]:
    """Every zone a ServiceInsight spec names, sorted (over all of its services)."""
    services = insight_spec.get("services")
    zones: set[str] = set()
    if isinstance(services, Mapping):
        for service in services.values():
            if isinstance(service, Mapping):
                zones.update(z for z in _items(service.get("zones")) if isinstance(z, str))
    return sorted(zones)


def meshes_without_mtls_across_zones(resources: Iterable[Resource]) -> dict[str, list[str]]:
    """The meshes used across zones without mTLS, each with its zones (sorted).

    A mesh is used across zones when its dataplanes run in two or more zones: by the
    ``kuma.io/zone`` labels of its Dataplanes here (the global holds every zone's),
    or by the ``zones`` of its ``all-services-`` ServiceInsight (which is how a zone
    learns about the others). It is flagged when its Mesh has no
    ``mtls.enabledBackend`` (or no Mesh exists): its services are left out of every
    ZoneIngress's ``availableServices``, so traffic between zones cannot reach them.

    Args:
        resources: any resources; only Mesh, Dataplane and ServiceInsight are read.

    Returns:
        ``{mesh: [zone, ...]}`` for each flagged mesh, meshes in name order.
    """
    secured: set[str] = set()
    zones: dict[str, set[str]] = {}
    for resource in resources:
        key = resource.key
        if key.type == "Mesh":
            if mtls_enabled(resource.spec):
                secured.add(key.name)
        elif key.type == "Dataplane" and key.mesh is not None:
            zone = resource.labels.get(LABEL_ZONE)
            if zone:
                zones.setdefault(key.mesh, set()).add(zone)
        elif (
            key.type == "ServiceInsight"
            and key.mesh is not None
            and is_service_insight_of(key.name, resource.labels, key.mesh)
        ):
            zones.setdefault(key.mesh, set()).update(service_zones(resource.spec))
    return {
        mesh: sorted(names)
        for mesh, names in sorted(zones.items())
        if len(names) >= 2 and mesh not in secured
    }


# -- reconcilers ---------------------------------------------------------------------------


@attrs.frozen
class _Stored:
    """A resource a reconciler writes, as its model knows it (at the model's revision)."""

    version: int
    labels: Mapping[str, str]
    spec: Mapping[str, Any]


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _replace(table: dict[str, dict[str, Any]], mesh: str, name: str, value: object) -> bool:
    """Set (or, with ``None``, remove) ``table[mesh][name]``; return whether it changed."""
    entries = table.get(mesh)
    before = entries.get(name) if entries is not None else None
    if value is None:
        if entries is not None and name in entries:
            del entries[name]
            if not entries:
                del table[mesh]
    else:
        table.setdefault(mesh, {})[name] = value
    return before != value


class _Reconciler(ABC):
    """Load a snapshot, follow the log, recompute what events mark, at most once per interval.

    Subclasses keep a model of the types they read (:meth:`_reset`, :meth:`_apply`)
    and write from it (:meth:`_reconcile`, through :meth:`_write`). Marks name what
    to recompute (mesh names). A write that conflicts marks its mark again; a
    resource just written is not written again until the log has brought that write
    into the model (:meth:`_in_flight`), so every write expects the version the
    model holds.
    """

    _types: frozenset[str]

    def __init__(self, store: Store, *, interval: float) -> None:
        _check_seconds("interval", interval)
        self._store = store
        self._interval = interval
        self._dirty: set[str] = set()
        self._wake = anyio.Event()
        self._position = 0  # the revision of the last event applied to the model
        self._pending: dict[ResourceKey, int] = {}  # key -> revision of this side's write

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the computed resources up to date until cancelled.

        Reports through *task_status* once the first snapshot is loaded: every
        commit after that is seen. A compacted log makes it reload from a new
        snapshot; so does an unreachable store, after a backoff.

        Raises:
            StoreClosedError: the store was closed.
        """
        started = False
        delay = _RETRY_BASE
        while True:
            try:
                types = sorted(t for t in self._types if t in self._store.catalog)
                snapshot = await self._store.snapshot(types)
                self._load(snapshot.resources, snapshot.cursor.revision)
                if not started:
                    task_status.started()
                    started = True
                delay = _RETRY_BASE
                await self._follow()
            except CompactedError as exc:
                logger.info("%s: %s; recomputing from a snapshot", type(self).__name__, exc)
            except StoreUnavailableError as exc:
                logger.warning(
                    "%s: the store is unavailable (%s); retrying in %.1fs",
                    type(self).__name__,
                    exc,
                    delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)

    def _load(self, resources: Sequence[Resource], revision: int) -> None:
        self._reset()
        self._position = revision
        for resource in resources:
            self._apply(Upserted(revision=revision, resource=resource))
        self._pending.clear()
        self._dirty = self._all_marks()

    async def _follow(self) -> None:
        failures: list[Exception] = []

        async def guard(task: Callable[[], Awaitable[None]]) -> None:
            try:
                await task()
            except Exception as exc:  # ends both tasks; run() decides what it means
                failures.append(exc)
            group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(guard, self._consume)
            group.start_soon(guard, self._flush_loop)
        if failures:
            raise failures[0]

    async def _consume(self) -> None:
        async with contextlib.aclosing(self._store.follow(self._position)) as events:
            async for event in events:
                if event.key.type in self._types:
                    self._apply(event)
                self._position = event.revision
                if self._dirty:
                    self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            if not self._dirty:
                delay = self._expire(datetime.now(UTC))
                with anyio.move_on_after(math.inf if delay is None else delay):
                    await self._wake.wait()
                self._wake = anyio.Event()
                self._expire(datetime.now(UTC))
                if not self._dirty:
                    continue
            # Debounce: let a burst of events settle, and recompute a mesh at most
            # once per interval however busy heartbeats keep the log.
            await anyio.sleep(self._interval)
            self._expire(datetime.now(UTC))
            self._pending = {k: r for k, r in self._pending.items() if r > self._position}
            marks, self._dirty = self._dirty, set()
            await self._reconcile(marks)

    def _in_flight(self, key: ResourceKey) -> bool:
        """Whether this side wrote *key* in a commit the model has not caught up with."""
        return self._pending.get(key, 0) > self._position

    async def _write(self, mark: str, change: Change) -> bool:
        """Commit *change*; on a conflict mark *mark* again, to retry from a newer model."""
        try:
            revision = await self._store.commit([change])
        except ConflictError as exc:
            # Another writer got there first: its event is on its way into the model.
            logger.debug("%s: %s; recomputing %r later", type(self).__name__, exc, mark)
            self._dirty.add(mark)
            return False
        except ValidationError as exc:
            logger.warning("%s: cannot write %s: %s", type(self).__name__, change.key, exc)
            return False
        self._pending[change.key] = revision
        logger.debug("%s: wrote %s at revision %d", type(self).__name__, change.key, revision)
        return True

    @abstractmethod
    def _expire(self, now: datetime) -> float | None:
        """Mark what changed with time alone; seconds until more does (``None``: never)."""

    @abstractmethod
    def _reset(self) -> None:
        """Forget the model."""

    @abstractmethod
    def _apply(self, event: Event) -> None:
        """Update the model with *event* and mark what it affects."""

    @abstractmethod
    def _all_marks(self) -> set[str]:
        """Every mark the model knows of (for a full recomputation)."""

    @abstractmethod
    async def _reconcile(self, marks: set[str]) -> None:
        """Recompute *marks* and write what differs from the model's stored resources."""


@final
class ServiceInsights(_Reconciler):
    """Keeps each mesh's ``all-services-<mesh>`` ServiceInsight up to date (on the global).

    For every mesh that exists (a Mesh resource) or has Dataplanes (or
    ExternalServices, when the catalog has that type), the ServiceInsight's spec is
    :func:`service_insight_spec` of its Dataplanes and their DataplaneInsights, as
    the zones replicated them to the global; a mesh with neither loses its
    ServiceInsight. A dataplane stops being online without any event, when its
    insight is no longer refreshed: the reconciler also wakes when the first online
    dataplane of a mesh would turn offline.

    Two globals may run it on one store: they compute the same specs from the same
    log and write only what differs, each write conditional on the version their
    model holds. Only a difference between their clocks, around the moment a
    dataplane's liveness runs out, can make them disagree, for as long as that
    difference.

    Args:
        store: the global's store.
        liveness: seconds a DataplaneInsight's last sighting (``lastSeen``) keeps its
            dataplane online; the same as the API's.
        interval: seconds to wait after a change before recomputing (changes within
            it are handled together).

    Raises:
        ValueError: *liveness* or *interval* is not a positive number of seconds.
    """

    _types = frozenset(
        {"Mesh", "Dataplane", "DataplaneInsight", "ExternalService", "ServiceInsight"}
    )

    def __init__(
        self, store: Store, *, liveness: float, interval: float = DEFAULT_INTERVAL
    ) -> None:
        super().__init__(store, interval=interval)
        _check_seconds("liveness", liveness)
        self._liveness = liveness
        self._reset()

    def _reset(self) -> None:
        self._meshes: set[str] = set()
        self._members: dict[str, dict[str, _Member]] = {}
        self._externals: dict[str, dict[str, frozenset[str]]] = {}
        self._until: dict[str, dict[str, datetime]] = {}  # mesh -> insight -> online until
        self._stored: dict[str, _Stored] = {}
        self._expiry: dict[str, datetime] = {}  # mesh -> when its first online dataplane expires

    def _all_marks(self) -> set[str]:
        return self._meshes | self._members.keys() | self._externals.keys() | self._stored.keys()

    def _apply(self, event: Event) -> None:
        key = event.key
        resource = event.resource if isinstance(event, Upserted) else None
        if key.type == "Mesh":
            if resource is None:
                self._meshes.discard(key.name)
            else:
                self._meshes.add(key.name)
            self._dirty.add(key.name)
            return
        mesh = key.mesh
        if mesh is None:
            return
        if key.type == "Dataplane":
            member = _member(resource) if resource is not None else None
            if _replace(self._members, mesh, key.name, member):
                self._dirty.add(mesh)
        elif key.type == "ExternalService":
            services = _external_services(resource.spec) if resource is not None else None
            if _replace(self._externals, mesh, key.name, services):
                self._dirty.add(mesh)
        elif key.type == "DataplaneInsight":
            until = _online_until(resource.spec, self._liveness) if resource is not None else None
            before = self._until.get(mesh, {}).get(key.name)
            _replace(self._until, mesh, key.name, until)
            # Heartbeats only move lastSeen: recompute when online-ness changes.
            now = datetime.now(UTC)
            if key.name in self._members.get(mesh, {}) and _live(before, now) != _live(until, now):
                self._dirty.add(mesh)
        elif key.type == "ServiceInsight" and key.name == service_insight_name(mesh):
            if resource is None:
                self._stored.pop(mesh, None)
            else:
                self._stored[mesh] = _Stored(resource.version, resource.labels, resource.spec)
            # Recompute even when another writer changed it: it gets what the log says.
            self._dirty.add(mesh)

    def _expire(self, now: datetime) -> float | None:
        for mesh, expiry in list(self._expiry.items()):
            if expiry < now:
                del self._expiry[mesh]
                self._dirty.add(mesh)
        if not self._expiry:
            return None
        soonest = min(self._expiry.values())
        return max(0.0, (soonest - now).total_seconds() + _EXPIRY_MARGIN)

    def _compute(self, mesh: str, now: datetime) -> dict[str, Any] | None:
        """The mesh's spec now (``None``: it should have none); notes when it next expires."""
        members = self._members.get(mesh, {})
        externals = self._externals.get(mesh, {})
        if mesh not in self._meshes and not members and not externals:
            self._expiry.pop(mesh, None)
            return None
        until = self._until.get(mesh, {})
        pairs = []
        expiries = []
        for name, member in members.items():
            moment = until.get(name)
            online = _live(moment, now)
            pairs.append((member, online))
            if online and member.services and moment is not None:
                expiries.append(moment)
        if expiries:
            self._expiry[mesh] = min(expiries)
        else:
            self._expiry.pop(mesh, None)
        return _services_spec(pairs, externals.values())

    async def _reconcile(self, marks: set[str]) -> None:
        for mesh in sorted(marks):
            key = ResourceKey("ServiceInsight", mesh, service_insight_name(mesh))
            if self._in_flight(key):
                self._dirty.add(mesh)
                continue
            spec = self._compute(mesh, datetime.now(UTC))
            stored = self._stored.get(mesh)
            change: Change
            if spec is None:
                if stored is None:
                    continue
                change = Delete(key=key, expected_version=stored.version)
            elif stored is not None and stored.spec == spec:
                continue
            else:
                change = Upsert(
                    key=key,
                    labels=stored.labels if stored is not None else {},
                    spec=spec,
                    expected_version=stored.version if stored is not None else MUST_NOT_EXIST,
                )
            await self._write(mesh, change)


@final
class AvailableServices(_Reconciler):
    """Keeps ``availableServices`` of each of a zone's own ZoneIngresses up to date.

    The list is :func:`available_services` of the zone's own Dataplanes (labels
    ``kuma.io/origin`` absent or ``zone``) and its Meshes, the same for every
    ZoneIngress the zone registered itself; copies of other zones' ingresses (which
    the global sends) are left alone. Only ``availableServices`` is written: the rest
    of the ingress's spec and its labels stay as registered, and an ingress
    registered again without the list gets it back.

    Args:
        store: the zone's store.
        interval: seconds to wait after a change before recomputing.

    Raises:
        ValueError: *interval* is not a positive number of seconds.
    """

    _types = frozenset({"Mesh", "Dataplane", "ZoneIngress"})

    def __init__(self, store: Store, *, interval: float = DEFAULT_INTERVAL) -> None:
        super().__init__(store, interval=interval)
        self._reset()

    def _reset(self) -> None:
        self._secured: set[str] = set()  # meshes with mTLS enabled
        self._tag_sets: dict[str, dict[str, list[tuple[tuple[str, str], ...]]]] = {}
        self._ingresses: dict[str, _Stored] = {}
        self._entries: dict[str, list[dict[str, Any]]] = {}  # mesh -> its part of the list

    def _expire(self, now: datetime) -> float | None:
        return None  # nothing here depends on the time

    def _all_marks(self) -> set[str]:
        return {_ALL_INGRESSES} | self._secured | self._tag_sets.keys() | self._entries.keys()

    def _apply(self, event: Event) -> None:
        key = event.key
        resource = event.resource if isinstance(event, Upserted) else None
        if key.type == "Mesh":
            secured = resource is not None and mtls_enabled(resource.spec)
            if secured != (key.name in self._secured):
                if secured:
                    self._secured.add(key.name)
                else:
                    self._secured.discard(key.name)
                self._dirty.add(key.name)
        elif key.type == "Dataplane" and key.mesh is not None:
            tag_sets = None
            if resource is not None and is_locally_originated(resource.labels):
                tag_sets = _healthy_inbound_tags(resource.spec) or None
            if _replace(self._tag_sets, key.mesh, key.name, tag_sets):
                self._dirty.add(key.mesh)
        elif key.type == "ZoneIngress":
            if resource is not None and is_locally_originated(resource.labels):
                stored = _Stored(resource.version, resource.labels, resource.spec)
                self._ingresses[key.name] = stored
                self._dirty.add(_ALL_INGRESSES)
            else:
                self._ingresses.pop(key.name, None)

    async def _reconcile(self, marks: set[str]) -> None:
        for mesh in marks - {_ALL_INGRESSES}:
            tag_sets = self._tag_sets.get(mesh, {})
            if mesh in self._secured and tag_sets:
                every = [tags for sets in tag_sets.values() for tags in sets]
                self._entries[mesh] = _available_entries(mesh, every)
            else:
                self._entries.pop(mesh, None)
        wanted = [entry for mesh in sorted(self._entries) for entry in self._entries[mesh]]
        for name, stored in sorted(self._ingresses.items()):
            if list(stored.spec.get("availableServices") or ()) == wanted:
                continue
            key = ResourceKey("ZoneIngress", None, name)
            if self._in_flight(key):
                self._dirty.add(_ALL_INGRESSES)
                continue
            change = Upsert(
                key=key,
                labels=stored.labels,
                spec={**stored.spec, "availableServices": wanted},
                expected_version=stored.version,
            )
            await self._write(_ALL_INGRESSES, change)
