"""GlobalEngine and ZoneEngine: the two ends of replication, each over a Store and a Transport.

The **global** listens. For each zone session it reads the Hello, authenticates
the zone (the transport's verified identity, when it has one, must match the name
the zone claims), creates the zone's Zone resource the first time, refuses a
disabled zone, and answers Welcome with its cursor in the zone's log. It then
streams its own log down (filtered and mapped for that zone) and applies the
zone's log up (attributed to that zone, within what that zone owns), recording the
session in the zone's ZoneInsight.

The **zone** dials, sends Hello with its cursor in the global's log, and on
Welcome replicates both ways; whenever the session ends it reconnects with
exponential backoff and jitter. Its store keeps serving local reads and writes
throughout: replication catches up when the global is back.
"""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs

from kds._registry import store_name
from kds.errors import (
    ConnectError,
    ProtocolError,
    SessionClosedError,
    StoreError,
    ValidationError,
    VersionMismatchError,
)
from kds.protocol import (
    FEATURES,
    SUPPORTED_VERSIONS,
    Goodbye,
    GoodbyeCode,
    Hello,
    ProtocolChecker,
    Reject,
    Role,
    Welcome,
    decode_frame,
    encode_frame,
    negotiate,
)
from kds.resource import (
    LABEL_ORIGIN,
    LABEL_ZONE,
    ORIGIN_GLOBAL,
    Catalog,
    Resource,
    ResourceKey,
)
from kds.store import Deleted, Upserted
from kds.sync import lifecycle, rules
from kds.sync.replication import (
    Direction,
    Replicator,
    SessionEnded,
    SharedSnapshot,
    SharedSnapshots,
    StreamStats,
    SyncOptions,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

    from anyio.abc import TaskStatus

    from kds.protocol import Frame
    from kds.store import Event, Store
    from kds.transport import PeerInfo, Session, Transport

__all__ = ["Authenticator", "GlobalEngine", "ZoneEngine", "ZoneRefused", "tracking_origin"]

logger = logging.getLogger(__name__)

GLOBAL_ORIGIN: Final = "global"
"""The tracking origin under which a zone records its position in the global's log."""

SNAPSHOT_KEEP: Final = 10.0
"""Seconds the global keeps a snapshot after taking it for the zones that need one next.

Zones reconnecting after a global restart arrive over seconds, each after its own
backoff; within this they share one snapshot (see :class:`SharedSnapshots`) and then
catch up on the events since, which costs far less than reading the store again."""


def tracking_origin(zone: str) -> str:
    """The tracking origin under which the global records its position in *zone*'s log."""
    return f"zone:{zone}"


def _software_version() -> str:
    try:
        return metadata.version("kds")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class ZoneRefused(Exception):
    """The global will not serve a zone session; the zone logs *reason* verbatim.

    Attributes:
        reason: why, for the zone's operator.
        retryable: whether connecting again may succeed without a change on the zone.
    """

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


Authenticator = "Callable[[Hello, PeerInfo], Awaitable[str]]"
"""Checks a Hello and the transport's peer; returns the zone's authenticated name.

Raises :class:`ZoneRefused` to refuse. Zone tokens plug in here."""


async def default_authenticator(hello: Hello, peer: PeerInfo) -> str:
    """Trust the transport: a verified identity must match the claimed name.

    Without a verified identity (and no token check configured) the claimed name is
    taken as it is -- as Kuma's open-source KDS does; tokens replace this.
    """
    if peer.identity is not None and peer.identity != hello.zone:
        raise ZoneRefused(
            f"this connection is authenticated as zone {peer.identity!r}, "
            f"but its Hello claims zone {hello.zone!r}",
            retryable=False,
        )
    return peer.identity or hello.zone


# -- what flows where -------------------------------------------------------------------


@attrs.define
class _ToZone:
    """The global's log as one zone gets it.

    Which other zones are disabled decides what this zone gets of theirs. A
    snapshot records that set; a session that resumes instead starts from the
    set as it is now but does not know what the zone last saw, so the first
    change to another zone's Zone resource it meets sends a snapshot (rare:
    Zone resources change only on first connect and when enabled or disabled).

    Attributes:
        catalog: the global's types.
        zone: the receiving zone.
        types: the types the zone declared it knows; it gets no others.
        disabled: the zones whose resources it does not get.
        known: whether *disabled* is what the zone's copy reflects.
        admitted_at: the head when the session was admitted: a disabling before it
            is history (the zone was enabled again since, or it was not admitted).
    """

    catalog: Catalog
    zone: str
    types: frozenset[str]
    disabled: set[str] = attrs.Factory(set)
    known: bool = False
    admitted_at: int = 0
    """The global's head when the session was admitted (with the zone enabled)."""

    def map_event(self, event: Event) -> Event | None:
        key = event.key
        labels = event.resource.labels if isinstance(event, Upserted) else event.labels
        if key.type not in self.catalog or key.type not in self.types:
            return None
        resource_type = self.catalog[key.type]
        if not resource_type.sent_from_global or labels.get(LABEL_ZONE) == self.zone:
            return None  # not a type zones get; or the zone's own, never sent back
        if isinstance(event, Upserted):
            copy = rules.global_to_zone(self.catalog, key, labels, self.zone, self.disabled)
            if copy is not None:
                resource = event.resource
                return Upserted(
                    revision=event.revision,
                    resource=Resource(
                        key=copy.key,
                        labels=copy.labels,
                        spec=resource.spec,
                        version=resource.version,
                        created_at=resource.created_at,
                        modified_at=resource.modified_at,
                    ),
                )
        # Deleted, or changed so that the zone no longer gets it: remove its copy (a
        # zone that never had one ignores the deletion).
        copy = rules.global_copy(resource_type, key, labels)
        version = event.resource.version if isinstance(event, Upserted) else event.version
        return Deleted(revision=event.revision, key=copy.key, version=version, labels=copy.labels)

    def map_snapshot(self, snapshot: SharedSnapshot) -> Iterator[Resource]:
        # Which zones are disabled is read now, from the whole snapshot; the rest as
        # frames are made.
        self.disabled = _disabled_zones(snapshot.resources)
        self.known = True
        return self._copies(snapshot)

    def _copies(self, snapshot: SharedSnapshot) -> Iterator[Resource]:
        make = self._zones_copy
        for index, resource in enumerate(snapshot.resources):
            key, labels = resource.key, resource.labels
            if key.type not in self.types or labels.get(LABEL_ZONE) == self.zone:
                continue
            gets = rules.sent_to_zone(self.catalog, key, labels, self.zone, self.disabled)
            if gets is not None:
                # Which resources the zone gets is its own; their copies are every
                # zone's, made once for all the sessions sharing the snapshot.
                yield snapshot.copy_of(index, make)

    def _zones_copy(self, resource: Resource) -> Resource:
        """The copy of a global resource every zone that gets it gets (not this zone's own)."""
        key = resource.key
        copy = rules.global_copy(self.catalog[key.type], key, resource.labels)
        return attrs.evolve(resource, key=copy.key, labels=copy.labels)

    def needs_reset(self, event: Event) -> bool:
        # Enabling or disabling another zone changes which of its resources this
        # zone should have, beyond any one event: start over from a snapshot.
        if event.key.type != "Zone" or event.key.name == self.zone:
            return False
        if not self.known:
            return True
        name = event.key.name
        disabled = isinstance(event, Upserted) and not lifecycle.is_enabled(event.resource)
        return disabled != (name in self.disabled)

    def ends_session(self, event: Event) -> str | None:
        if event.key.type != "Zone" or event.key.name != self.zone:
            return None
        if event.revision <= self.admitted_at:
            return None  # replayed history: the zone was enabled when admitted
        if isinstance(event, Upserted) and lifecycle.is_enabled(event.resource):
            return None
        state = "disabled" if isinstance(event, Upserted) else "deleted"
        return f"zone {self.zone!r} was {state} on the global"

    def snapshot_ends_session(self, resources: Sequence[Resource]) -> str | None:
        # The zone may have been disabled after it was admitted and before this
        # snapshot: then no event will say so on this stream.
        own = lifecycle.zone_key(self.zone)
        for resource in resources:
            if resource.key == own and not lifecycle.is_enabled(resource):
                return f"zone {self.zone!r} was disabled on the global"
        return None


def _disabled_zones(resources: Sequence[Resource]) -> set[str]:
    return {r.key.name for r in resources if r.key.type == "Zone" and not lifecycle.is_enabled(r)}


@attrs.define
class _FromZone:
    """A zone's log as the global applies it: attributed to that zone, within its own."""

    catalog: Catalog
    zone: str

    @property
    def origin(self) -> str:
        return tracking_origin(self.zone)

    def accept(
        self, key: ResourceKey, labels: Mapping[str, str]
    ) -> tuple[ResourceKey, dict[str, str]]:
        if key.type not in self.catalog or not self.catalog[key.type].sent_from_zone:
            raise ValidationError("key.type", f"zones do not send {key.type!r} to the global")
        copy = rules.zone_to_global(key, labels, self.zone)
        return copy.key, dict(copy.labels)

    @property
    def owned_labels(self) -> Mapping[str, str]:
        return rules.zone_copy_labels(self.zone)


@attrs.define
class _ToGlobal:
    """A zone's log as the global gets it: the zone's own resources only."""

    catalog: Catalog
    types: frozenset[str]
    """The types the global declared it knows; it gets no others."""

    def _sent(self, key: ResourceKey, labels: Mapping[str, str]) -> bool:
        return key.type in self.types and rules.sent_by_zone(self.catalog, key, labels)

    def map_event(self, event: Event) -> Event | None:
        key = event.key
        labels = event.resource.labels if isinstance(event, Upserted) else event.labels
        if key.type not in self.types or key.type not in self.catalog:
            return None
        if not self.catalog[key.type].sent_from_zone or not rules.is_locally_originated(labels):
            return None
        if isinstance(event, Upserted) and not self._sent(key, labels):
            # Still the zone's, but no longer shared (kds-sync: disabled): take the
            # global's copy away, as the zone's deletion would.
            resource = event.resource
            return Deleted(
                revision=event.revision, key=key, version=resource.version, labels=labels
            )
        return event

    def map_snapshot(self, snapshot: SharedSnapshot) -> Iterator[Resource]:
        return (r for r in snapshot.resources if self._sent(r.key, r.labels))

    def needs_reset(self, event: Event) -> bool:
        return False

    def ends_session(self, event: Event) -> str | None:
        return None

    def snapshot_ends_session(self, resources: Sequence[Resource]) -> str | None:
        return None


@attrs.define
class _FromGlobal:
    """The global's log as a zone applies it: copies marked ``origin: global``."""

    catalog: Catalog

    @property
    def origin(self) -> str:
        return GLOBAL_ORIGIN

    def accept(
        self, key: ResourceKey, labels: Mapping[str, str]
    ) -> tuple[ResourceKey, dict[str, str]]:
        if key.type not in self.catalog or not self.catalog[key.type].sent_from_global:
            raise ValidationError("key.type", f"the global does not send {key.type!r} to zones")
        return key, {**labels, LABEL_ORIGIN: ORIGIN_GLOBAL}

    @property
    def owned_labels(self) -> Mapping[str, str]:
        return rules.GLOBAL_COPY_LABELS


# -- the global -------------------------------------------------------------------------


async def _first_frame(session: Session, catalog: Catalog, deadline: float) -> Frame:
    """The next frame, within *deadline* seconds (the handshake's limit)."""
    with anyio.fail_after(deadline):
        return decode_frame(await session.receive(), catalog=catalog)


async def _send_now(session: Session, checker: ProtocolChecker, frame: Frame) -> None:
    checker.sent(frame)
    await session.send(encode_frame(frame))


async def _say_goodbye(session: Session, code: GoodbyeCode, reason: str) -> None:
    """Best effort: the session may already be gone."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
        with contextlib.suppress(Exception):
            await session.send(encode_frame(Goodbye(code=code.value, reason=reason)))
        await session.aclose(reason)


class GlobalEngine:
    """Serves every zone: replicates the global's log down and each zone's log up.

    Args:
        store: the global's store.
        transport: where zones connect.
        options: timing and flow control.
        catalog: the types the global knows (its store's catalog by default).
        authenticate: checks each zone's Hello and returns its authenticated name
            (see :data:`Authenticator`); by default the transport's verified
            identity must match the claimed name.
        instance_id: identifies this global instance in ZoneInsights.
    """

    def __init__(
        self,
        store: Store,
        transport: Transport,
        *,
        options: SyncOptions | None = None,
        catalog: Catalog | None = None,
        authenticate: Callable[[Hello, PeerInfo], Awaitable[str]] = default_authenticator,
        instance_id: str | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.options = options or SyncOptions()
        self.catalog: Catalog = catalog if catalog is not None else store.catalog
        self.authenticate = authenticate
        self.instance_id = instance_id or f"global-{uuid.uuid4().hex[:12]}"
        self.stats = StreamStats()
        """Counters summed over every finished session."""
        self.refusals = 0
        """Hellos refused (authentication, version, disabled zone)."""
        self.snapshots = SharedSnapshots(store, keep_for=SNAPSHOT_KEEP)
        """The snapshots zones' sessions send, shared by those that need one within
        seconds of each other (every zone, after a restore): its ``taken`` and
        ``shared`` count them."""
        self._sessions: dict[str, anyio.CancelScope] = {}
        # Each open session's subscription id and replicator, for the insight refresh.
        self._subscriptions: dict[str, tuple[str, Replicator]] = {}

    @property
    def connected_zones(self) -> list[str]:
        """Zones with a session open right now."""
        return sorted(self._sessions)

    async def run(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve zones until cancelled; report the listening address through *task_status*."""
        async with anyio.create_task_group() as group:
            address = await group.start(self.transport.serve, self._serve)
            group.start_soon(self._refresh_insights)
            group.start_soon(self.snapshots.run)
            task_status.started(address)

    async def _serve(self, session: Session) -> None:
        checker = ProtocolChecker(Role.GLOBAL)
        try:
            hello = await _first_frame(session, self.catalog, self.options.handshake_timeout)
            checker.received(hello)
        except TimeoutError:
            await _say_goodbye(session, GoodbyeCode.PROTOCOL_ERROR, "no Hello in time")
            return
        except ProtocolError as exc:
            await _say_goodbye(session, GoodbyeCode.PROTOCOL_ERROR, str(exc))
            return
        except SessionClosedError:
            return
        assert isinstance(hello, Hello)  # noqa: S101 -- the checker admits only a Hello first
        # Read before _admit checks that the zone is enabled: a disabling after this
        # revision ends the session; one before it would have refused it.
        admitted_at = await self.store.head()
        try:
            zone, version, features = await self._admit(hello, session.peer)
        except ZoneRefused as refused:
            self.refusals += 1
            logger.warning("refused zone %r (%s): %s", hello.zone, session.peer.address, refused)
            with contextlib.suppress(SessionClosedError):
                await _send_now(
                    session, checker, Reject(reason=refused.reason, retryable=refused.retryable)
                )
            await session.aclose(refused.reason)
            return
        with anyio.CancelScope() as scope:
            previous = self._sessions.get(zone)
            if previous is not None:
                logger.info("zone %r connected again: ending its older session", zone)
                previous.cancel()
            self._sessions[zone] = scope
            try:
                await self._replicate(session, checker, hello, zone, version, features, admitted_at)
            finally:
                if self._sessions.get(zone) is scope:
                    del self._sessions[zone]

    async def _admit(self, hello: Hello, peer: PeerInfo) -> tuple[str, int, frozenset[str]]:
        try:
            version, features = negotiate(hello, versions=SUPPORTED_VERSIONS, features=FEATURES)
        except VersionMismatchError as exc:
            raise ZoneRefused(str(exc), retryable=False) from exc
        zone = await self.authenticate(hello, peer)
        try:
            lifecycle.zone_key(zone).validate()
        except ValidationError as exc:
            raise ZoneRefused(f"invalid zone name {zone!r}: {exc.reason}", retryable=False) from exc
        record = await lifecycle.ensure_zone(self.store, zone)
        if not lifecycle.is_enabled(record):
            raise ZoneRefused(
                f"zone {zone!r} is disabled on the global: enable it to resume replication",
                retryable=True,
            )
        return zone, version, features

    async def _replicate(
        self,
        session: Session,
        checker: ProtocolChecker,
        hello: Hello,
        zone: str,
        version: int,
        features: frozenset[str],
        admitted_at: int,
    ) -> None:
        cursor = await self.store.tracking(tracking_origin(zone))
        welcome = Welcome(
            protocol_version=version,
            features=features,
            instance_id=self.instance_id,
            cursor=cursor,
            max_frame_size=self.options.max_frame_size,
            types=frozenset(self.catalog.names()),
            heartbeat_interval=self.options.heartbeat_interval,
            software_version=_software_version(),
        )
        try:
            await _send_now(session, checker, welcome)
        except SessionClosedError:
            return
        subscription = uuid.uuid4().hex
        await self._subscribe(zone, subscription, hello)
        replicator = Replicator(
            self.store,
            session,
            checker,
            Direction(
                outbound=_ToZone(
                    self.catalog,
                    zone,
                    frozenset(hello.types),
                    _disabled_zones(await self.store.list_resources("Zone")),
                    admitted_at=admitted_at,
                ),
                inbound=_FromZone(self.catalog, zone),
                peer_cursor=hello.cursor,
            ),
            catalog=self.catalog,
            options=self.options,
            max_frame_size=hello.max_frame_size,
            name=f"global <-> {zone}",
            snapshots=self.snapshots,
        )
        logger.info("zone %r connected (%s)", zone, session.peer.address)
        ended: SessionEnded | None = None
        self._subscriptions[zone] = (subscription, replicator)
        try:
            ended = await replicator.run()
        except StoreError as exc:
            # The global's store failed; the zone was told and will reconnect.
            logger.warning("zone %r: session ended by a store failure: %s", zone, exc)
        finally:
            if self._subscriptions.get(zone, (None,))[0] == subscription:
                del self._subscriptions[zone]
            with anyio.CancelScope(shield=True):
                self.stats.add(replicator.stats)
                await _say_goodbye(session, GoodbyeCode.SHUTDOWN, "the global ended the session")
                with contextlib.suppress(StoreError):
                    await self._unsubscribe(zone, subscription, replicator)
            logger.info(
                "zone %r disconnected: %s", zone, ended.reason if ended else "session cancelled"
            )

    async def _subscribe(self, zone: str, subscription: str, hello: Hello) -> None:
        now = lifecycle.now_text()

        def start(subscriptions: list[dict[str, Any]]) -> None:
            for older in subscriptions:
                if older.get("disconnectTime") is None:
                    older["disconnectTime"] = now  # superseded by this session
            subscriptions.append(
                {
                    "id": subscription,
                    "globalInstanceId": self.instance_id,
                    "zoneInstanceId": hello.instance_id,
                    "version": hello.software_version,
                    "backend": hello.backend,
                    "connectTime": now,
                    "disconnectTime": None,
                    "lastSeen": now,
                    "status": lifecycle.subscription_stats(StreamStats()),
                }
            )

        await lifecycle.update_insight(self.store, zone, start)

    async def _refresh_insights(self) -> None:
        """Every ``insight_interval``, mark each open session seen: one commit for all zones.

        One commit per zone would be one event per zone per interval, each waking
        every session's sender: N^2 wake-ups per interval with N zones.
        """
        while True:
            await anyio.sleep(self.options.insight_interval)
            if not self._subscriptions:
                continue
            now = lifecycle.now_text()
            changes = {
                zone: _seen(subscription, replicator, now, disconnected=False)
                for zone, (subscription, replicator) in self._subscriptions.items()
            }
            try:
                await lifecycle.update_insights(self.store, changes)
            except StoreError as exc:  # tried again next interval
                logger.warning("could not refresh the zones' insights: %s", exc)

    async def _unsubscribe(self, zone: str, subscription: str, replicator: Replicator) -> None:
        await self._touch(zone, subscription, replicator, disconnected=True)

    async def _touch(
        self, zone: str, subscription: str, replicator: Replicator, *, disconnected: bool
    ) -> None:
        """Record that *subscription* was seen now (and ended, if *disconnected*)."""
        now = lifecycle.now_text()
        await lifecycle.update_insight(
            self.store, zone, _seen(subscription, replicator, now, disconnected=disconnected)
        )


def _seen(
    subscription: str, replicator: Replicator, now: str, *, disconnected: bool
) -> Callable[[list[dict[str, Any]]], None]:
    """A change to a subscription list: *subscription* seen at *now* (and ended)."""
    status = lifecycle.subscription_stats(replicator.stats)

    def update(subscriptions: list[dict[str, Any]]) -> None:
        for entry in subscriptions:
            if entry.get("id") == subscription:
                entry["lastSeen"] = now
                entry["status"] = status
                if disconnected:
                    entry["disconnectTime"] = now

    return update


# -- the zone ---------------------------------------------------------------------------


class ZoneEngine:
    """Keeps one zone replicating with the global, reconnecting whenever needed.

    Args:
        store: the zone's store.
        transport: how to reach the global.
        zone: this zone's name.
        credentials: a zone token for the global, if it requires one.
        options: timing and flow control (the global's heartbeat interval wins).
        catalog: the types the zone knows (its store's catalog by default).
        instance_id: identifies this zone control plane instance.
    """

    def __init__(
        self,
        store: Store,
        transport: Transport,
        *,
        zone: str,
        credentials: str | None = None,
        options: SyncOptions | None = None,
        catalog: Catalog | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.zone = zone
        self.credentials = credentials
        self.options = options or SyncOptions()
        self.catalog: Catalog = catalog if catalog is not None else store.catalog
        self.instance_id = instance_id or f"{zone}-{uuid.uuid4().hex[:12]}"
        self.stats = StreamStats()
        """Counters summed over every finished session."""
        self.connected = False
        """Whether a session is established right now."""
        self.sessions = 0
        """Sessions established so far."""
        self.last_error: str | None = None
        """Why the last connection attempt or session ended, for status pages."""
        self._replicator: Replicator | None = None

    @property
    def current_stats(self) -> StreamStats:
        """Counters of every session so far, the open one included."""
        total = StreamStats()
        total.add(self.stats)
        if self._replicator is not None:
            total.add(self._replicator.stats)
        return total

    async def run(self) -> None:
        """Connect, replicate, and reconnect with backoff, until cancelled."""
        failures = 0
        while True:
            established = False
            try:
                session = await self.transport.connect()
            except ConnectError as exc:
                self.last_error = str(exc)
                logger.info("zone %r: cannot reach the global: %s", self.zone, exc)
            else:
                async with session:
                    established = await self._session(session)
            failures = 0 if established else failures + 1
            await anyio.sleep(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        """Exponential, capped, with jitter so that many zones do not retry in step."""
        base, cap = self.options.reconnect_base, self.options.reconnect_max
        delay = min(cap, base * float(2 ** min(failures, 30)))
        return delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 -- jitter, not secrets

    async def _session(self, session: Session) -> bool:
        """Run one session; return whether it got as far as a Welcome."""
        checker = ProtocolChecker(Role.ZONE)
        hello = Hello(
            protocol_versions=SUPPORTED_VERSIONS,
            zone=self.zone,
            credentials=self.credentials,
            features=FEATURES,
            cursor=await self.store.tracking(GLOBAL_ORIGIN),
            max_frame_size=self.options.max_frame_size,
            types=frozenset(self.catalog.names()),
            instance_id=self.instance_id,
            software_version=_software_version(),
            backend=store_name(self.store),
        )
        try:
            await _send_now(session, checker, hello)
            answer = await _first_frame(session, self.catalog, self.options.handshake_timeout)
            checker.received(answer)
        except TimeoutError:
            self.last_error = "the global did not answer the Hello in time"
            await _say_goodbye(session, GoodbyeCode.PROTOCOL_ERROR, self.last_error)
            return False
        except ProtocolError as exc:
            self.last_error = f"protocol error: {exc}"
            await _say_goodbye(session, GoodbyeCode.PROTOCOL_ERROR, str(exc))
            return False
        except SessionClosedError as exc:
            self.last_error = f"session closed during the handshake: {exc.reason}"
            return False
        if isinstance(answer, Reject):
            self.last_error = f"the global refused this zone: {answer.reason}"
            logger.warning("zone %r: the global refused this zone: %s", self.zone, answer.reason)
            return False
        if isinstance(answer, Goodbye):
            self.last_error = f"the global ended the session: {answer.reason}"
            return False
        assert isinstance(answer, Welcome)  # noqa: S101 -- the checker admits nothing else
        interval = answer.heartbeat_interval
        options = attrs.evolve(
            self.options,
            heartbeat_interval=interval,
            heartbeat_timeout=max(self.options.heartbeat_timeout, 3 * interval),
        )
        replicator = Replicator(
            self.store,
            session,
            checker,
            Direction(
                outbound=_ToGlobal(self.catalog, frozenset(answer.types)),
                inbound=_FromGlobal(self.catalog),
                peer_cursor=answer.cursor,
            ),
            catalog=self.catalog,
            options=options,
            max_frame_size=answer.max_frame_size,
            name=f"{self.zone} <-> global",
        )
        self._replicator = replicator
        self.connected = True
        self.sessions += 1
        logger.info("zone %r: connected to global %s", self.zone, answer.instance_id)
        try:
            ended = await replicator.run()
            self.last_error = ended.reason
        except anyio.get_cancelled_exc_class():
            # Stopping (SIGTERM): tell the global, so that it shows this zone Offline now
            # rather than after a heartbeat timeout.
            await _say_goodbye(session, GoodbyeCode.SHUTDOWN, "the zone control plane is stopping")
            raise
        except StoreError as exc:
            self.last_error = f"store failure: {exc}"
            logger.warning("zone %r: store failure, reconnecting: %s", self.zone, exc)
        finally:
            self.connected = False
            self._replicator = None
            self.stats.add(replicator.stats)
        return True
