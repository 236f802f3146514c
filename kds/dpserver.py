"""The zone control plane's dataplane server: where zone proxies register (``kds-dp``).

:class:`DataplaneServer` serves JSON over HTTPS (port 5678, like Kuma's dataplane
server). A proxy registers, heartbeats and says goodbye; each request carries its
token, checked every time (a revoked token stops a running proxy):

``POST /v1/proxies``
    ``{"proxyType": "ingress"|"egress"|"dataplane", "resource": {...}, "token": "...",
    "version": "0.1.0"}``. The resource (a ZoneIngress, ZoneEgress or Dataplane in
    the API's representation) is checked like ``kds-dp`` checks it, then created or
    updated with ``kuma.io/origin: zone`` and ``kuma.io/zone: <zone>``; its insight
    (same key, type ``ZoneIngressInsight``, ``ZoneEgressInsight`` or
    ``DataplaneInsight``) gets a new open subscription, and any older open one is
    closed (the proxy restarted). Answers ``{"subscription": id, "heartbeatInterval": s}``.
``POST /v1/proxies/heartbeat``
    ``{"proxyType", "mesh" (Dataplanes), "name", "subscription", "token"}`` refreshes
    the subscription's ``lastSeen``. 404 when the proxy or subscription is unknown,
    410 when it expired (register again), 409 when a newer registration of the same
    proxy superseded it.
``POST /v1/proxies/goodbye``
    the same body; closes the subscription (``disconnectTime``): offline at once.

Tokens: a ZoneIngress needs a zone token for this zone with scope ``ingress``, a
ZoneEgress one with scope ``egress``, a Dataplane a dataplane token for its mesh (and
its name, if the token names one). A token that is not valid is a 401, a valid one
that does not allow the request a 403; both say why, never what the token is.

A subscription is online while it is open and its ``lastSeen`` is within the
heartbeat timeout (:func:`kds.sync.lifecycle.is_online`). The server also closes
subscriptions whose heartbeats stopped (a proxy killed with SIGKILL), so they show
offline whatever liveness window a reader uses. An insight keeps the newest
:data:`~kds.sync.lifecycle.MAX_SUBSCRIPTIONS` subscriptions.
"""

from __future__ import annotations

import logging
import math
import ssl
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
from aiohttp import web

import kds
from kds.api.problems import (
    Problem,
    http_problem,
    json_response,
    read_json,
    store_unavailable,
    unexpected_failure,
)
from kds.api.representation import label_field
from kds.dp import PROXY_KINDS, ProxyKind, proxy_kind, read_proxy_document
from kds.errors import (
    ConfigError,
    ConflictError,
    KdsError,
    StoreClosedError,
    StoreUnavailableError,
    ValidationError,
)
from kds.resource import LABEL_ORIGIN, LABEL_ZONE, ORIGIN_GLOBAL, ORIGIN_ZONE, ResourceKey
from kds.store import MUST_NOT_EXIST, Change, Upsert
from kds.sync.lifecycle import MAX_SUBSCRIPTIONS, is_online, now_text
from kds.tokens import (
    PUBLIC_KEY_PREFIX,
    SIGNING_KEY_PREFIX,
    BadSignatureError,
    ExpiredTokenError,
    MalformedTokenError,
    MissingTokenError,
    NotYetValidTokenError,
    RevokedTokenError,
    TokenError,
    UnknownSigningKeyError,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from anyio.abc import TaskStatus

    from kds.resource import Catalog, Resource
    from kds.store import Store
    from kds.tokens import TokenVerifier

__all__ = [
    "CONTROL_PLANE_FIELDS",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "MAX_BODY_SIZE",
    "DataplaneServer",
]

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TIMEOUT: Final = 30.0
"""Seconds without a heartbeat after which a proxy is offline."""

MAX_BODY_SIZE: Final = 1024 * 1024
"""The largest request body the server reads, in bytes (1 MiB); larger ones get a 413."""

CONTROL_PLANE_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "ZoneIngress": ("availableServices",),
}
"""Spec fields the control plane maintains: a registration that omits them keeps the
stored values (a restarted ingress must not wipe the services it advertises)."""

_ATTEMPTS: Final = 20  # read-modify-write tries against concurrent writers (HA zone CPs)
_SHUTDOWN_TIMEOUT: Final = 5.0  # seconds in-flight requests get to finish on shutdown
_MAX_TEXT: Final = 256  # characters of an id, name or version a request may carry
# Token errors that mean "not a valid credential" (401); others mean "not allowed" (403).
_UNAUTHENTICATED: Final = (
    MissingTokenError,
    MalformedTokenError,
    ExpiredTokenError,
    NotYetValidTokenError,
    RevokedTokenError,
    UnknownSigningKeyError,
    BadSignatureError,
)


class DataplaneServer:
    """The dataplane server of one zone control plane, over its store.

    Args:
        store: the zone's store (open while the server serves).
        zone: the zone's name; registered proxies are labelled with it and zone
            tokens must be for it.
        verifier: checks tokens against the signing keys the zone received.
        work_dir: where a self-signed certificate is generated (and kept) when no
            *cert_file* is given: ``kds-cp.crt`` and ``kds-cp.key``, the files the
            zone's other listeners use, so proxies trust one certificate.
        cert_file: PEM certificate chain to serve (with *key_file*).
        key_file: its PEM private key.
        heartbeat_timeout: seconds without a heartbeat after which a proxy is offline.
        catalog: the known types; the store's catalog by default.
        instance_id: this control plane instance's id, recorded in subscriptions.
        max_body_size: the largest request body read, in bytes.

    Raises:
        ValueError: *zone* is empty, only one of *cert_file* and *key_file* is
            given, or *heartbeat_timeout* is not a positive number.
    """

    def __init__(
        self,
        store: Store,
        *,
        zone: str,
        verifier: TokenVerifier,
        work_dir: Path | str,
        cert_file: Path | str | None = None,
        key_file: Path | str | None = None,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        catalog: Catalog | None = None,
        instance_id: str | None = None,
        max_body_size: int = MAX_BODY_SIZE,
    ) -> None:
        if not zone:
            raise ValueError("the dataplane server needs the zone's name")
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if not math.isfinite(heartbeat_timeout) or heartbeat_timeout <= 0:
            raise ValueError(
                f"heartbeat_timeout must be a positive number of seconds, got {heartbeat_timeout!r}"
            )
        self.store = store
        self.zone = zone
        self.verifier = verifier
        self.work_dir = Path(work_dir)
        self.cert_file = Path(cert_file) if cert_file is not None else None
        self.key_file = Path(key_file) if key_file is not None else None
        self.heartbeat_timeout = heartbeat_timeout
        self.catalog = catalog if catalog is not None else store.catalog
        self.instance_id = instance_id or uuid.uuid4().hex
        self.max_body_size = max_body_size
        self.certificate_path: Path | None = None
        """The certificate served (PEM), once :meth:`serve` or :meth:`ssl_context` ran:
        what proxies pass as ``--ca-cert-file`` when it is self-signed."""

    def __repr__(self) -> str:
        return f"<DataplaneServer zone {self.zone!r} over {self.store!r}>"

    @property
    def heartbeat_interval(self) -> float:
        """How often proxies are asked to heartbeat: a third of the timeout, in seconds."""
        return self.heartbeat_timeout / 3

    def is_online(self, insight: Resource | None, *, now: datetime | None = None) -> bool:
        """Whether a proxy's insight has an open subscription seen within the timeout."""
        return is_online(insight, now=now or _now(), liveness=self.heartbeat_timeout)

    # -- serving -----------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """The server's TLS context: the configured certificate, or the work directory's.

        A missing certificate in the work directory is generated (self-signed; see
        :mod:`kds.tls`).

        Raises:
            ConfigError: the certificate or key cannot be read, do not belong
                together, or cannot be generated (the message names the file).
        """
        from kds import tls  # imported here: only a server needs it

        try:
            if self.cert_file is not None and self.key_file is not None:
                tls.load_server_material(self.cert_file, self.key_file)
                cert, key = self.cert_file, self.key_file
            else:
                cert, key = tls.ensure_certificate(self.work_dir)
        except KdsError as exc:
            raise ConfigError(f"dataplane server: {exc}") from exc
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"dataplane server: cannot use {cert} and {key}: {exc}") from exc
        self.certificate_path = cert
        return context

    def make_app(self) -> web.Application:
        """Build the aiohttp application :meth:`serve` runs (a new one each call)."""
        app = web.Application(middlewares=[self._middleware()], client_max_size=self.max_body_size)
        app.router.add_get("/", self._index)
        app.router.add_post("/v1/proxies", self._register)
        app.router.add_post("/v1/proxies/heartbeat", self._heartbeat)
        app.router.add_post("/v1/proxies/goodbye", self._goodbye)
        return app

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 5678,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on *host*:*port* over HTTPS until cancelled.

        Reports the bound base URL (``https://127.0.0.1:5678``; with the real port
        when *port* is 0) through *task_status* once listening. While serving, it
        closes subscriptions whose heartbeats stopped. On cancellation the listener
        closes and in-flight requests get a few seconds to finish.

        Raises:
            ConfigError: the TLS certificate cannot be used or generated.
            OSError: the address cannot be bound; the message names it.
        """
        context = self.ssl_context()
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, ssl_context=context)
            try:
                await site.start()
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"the dataplane server cannot listen on {host}:{port}: {exc.strerror}",
                ) from exc
            address = runner.addresses[0]
            bound_host, bound_port = address[0], address[1]
            url = (
                f"https://[{bound_host}]:{bound_port}"
                if ":" in bound_host
                else f"https://{bound_host}:{bound_port}"
            )
            logger.info("zone %r dataplane server listening on %s", self.zone, url)
            async with anyio.create_task_group() as group:
                group.start_soon(self._expire_forever)
                task_status.started(url)
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    # -- offline proxies ---------------------------------------------------------------

    async def _expire_forever(self) -> None:
        interval = min(self.heartbeat_timeout / 4, 10.0)
        while True:
            await anyio.sleep(interval)
            try:
                await self.expire_subscriptions()
            except (StoreUnavailableError, StoreClosedError, ConflictError) as exc:
                logger.warning("cannot close the subscriptions of silent proxies: %s", exc)

    async def expire_subscriptions(self, *, now: datetime | None = None) -> int:
        """Close the open subscriptions of this zone's proxies not seen within the timeout.

        Their ``disconnectTime`` becomes *now*, so they show offline to any reader.

        Returns:
            How many subscriptions were closed.
        """
        moment = now or _now()
        horizon = moment - timedelta(seconds=self.heartbeat_timeout)
        closed = 0
        for kind in PROXY_KINDS.values():
            if kind.insight_type not in self.catalog:
                continue
            insights = await self.store.list_resources(
                kind.insight_type, labels={LABEL_ORIGIN: ORIGIN_ZONE, LABEL_ZONE: self.zone}
            )
            for insight in insights:
                if _silent(insight, horizon):
                    closed += await self._close_silent(insight.key, horizon, moment)
        return closed

    async def _close_silent(self, key: ResourceKey, horizon: datetime, moment: datetime) -> int:
        closed = 0

        def close(subscriptions: list[dict[str, Any]]) -> None:
            nonlocal closed
            closed = 0
            for subscription in subscriptions:
                if subscription.get("disconnectTime") is None and _seen(subscription) < horizon:
                    subscription["disconnectTime"] = now_text(moment)
                    closed += 1

        try:
            await self._update_insight(key, close, create=False)
        except Problem as problem:  # deleted, or kept changing: the next round sees it
            logger.debug("%s: not closing its silent subscriptions now: %s", key, problem)
            return 0
        if closed:
            logger.info("%s: closed %d subscription(s) without heartbeats", key, closed)
        return closed

    # -- handlers ----------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            {
                "product": "kds",
                "version": kds.__version__,
                "service": "dataplane-server",
                "zone": self.zone,
                "instanceId": self.instance_id,
                "heartbeatInterval": self.heartbeat_interval,
            }
        )

    async def _register(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        _only(body, {"proxyType", "resource", "token", "version"})
        kind = _kind_of(body)
        try:
            key, labels, spec = read_proxy_document(
                body.get("resource"), kind.proxy_type, catalog=self.catalog
            )
        except ValidationError as exc:
            field = "resource" if exc.field == "document" else f"resource.{exc.field}"
            raise Problem.invalid(field, exc.reason) from None
        version = _optional_text(body, "version")
        labels = self._labels(labels)
        spec = self._spec(kind, spec)
        await self._authenticate(kind, key, body.get("token"))
        await self._check_mesh(key)
        subscription = uuid.uuid4().hex
        await self._save_registration(kind, key, labels, spec, subscription, version)
        logger.info("%s registered (subscription %s)", _label(key), subscription)
        return json_response(
            {"subscription": subscription, "heartbeatInterval": self.heartbeat_interval}
        )

    async def _heartbeat(self, request: web.Request) -> web.StreamResponse:
        kind, key, subscription = await self._reference(request)
        seen = now_text()

        def refresh(subscriptions: list[dict[str, Any]]) -> None:
            _open_subscription(subscriptions, subscription, key)["lastSeen"] = seen

        await self._update_insight(_insight_key(kind, key), refresh, create=False)
        return json_response({})

    async def _goodbye(self, request: web.Request) -> web.StreamResponse:
        kind, key, subscription = await self._reference(request)
        moment = now_text()

        def close(subscriptions: list[dict[str, Any]]) -> None:
            found = _find(subscriptions, subscription, key)
            if found.get("disconnectTime") is None:
                found["disconnectTime"] = moment

        await self._update_insight(_insight_key(kind, key), close, create=False)
        logger.info("%s said goodbye (subscription %s)", _label(key), subscription)
        return json_response({})

    # -- request parts -----------------------------------------------------------------

    async def _reference(self, request: web.Request) -> tuple[ProxyKind, ResourceKey, str]:
        """Check a heartbeat or goodbye: its body, its token, that the proxy is ours."""
        body = await self._body(request)
        _only(body, {"proxyType", "mesh", "name", "subscription", "token"})
        kind = _kind_of(body)
        name = _required_text(body, "name")
        mesh = _optional_text(body, "mesh")
        if kind.resource_type == "Dataplane" and mesh is None:
            raise Problem.invalid("mesh", "is required: a Dataplane is in a mesh")
        if kind.resource_type != "Dataplane" and mesh is not None:
            raise Problem.invalid("mesh", f"must not be set: {kind.resource_type} is not in a mesh")
        subscription = _required_text(body, "subscription")
        key = ResourceKey(kind.resource_type, mesh, name)
        try:
            key.validate()
        except ValidationError as exc:
            raise Problem.invalid(exc.field.removeprefix("key."), exc.reason) from None
        await self._authenticate(kind, key, body.get("token"))
        proxy = await self.store.find(key)
        if proxy is None or not self._ours(proxy):
            raise Problem(404, f"{_label(key)} is not registered with zone {self.zone!r}")
        return kind, key, subscription

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The body as a JSON object (strict: no duplicate keys, NaN or infinities)."""
        value = await read_json(request, max_body_size=self.max_body_size)
        if not isinstance(value, dict):
            raise Problem.invalid("body", "must be a JSON object")
        return value

    def _labels(self, labels: dict[str, str]) -> dict[str, str]:
        origin = labels.get(LABEL_ORIGIN)
        if origin is not None and origin != ORIGIN_ZONE:
            raise Problem.invalid(
                f"resource.{label_field(LABEL_ORIGIN)}",
                f"must be {ORIGIN_ZONE!r}: a proxy belongs to its zone, got {origin!r}",
            )
        zone = labels.get(LABEL_ZONE)
        if zone is not None and zone != self.zone:
            raise Problem.invalid(
                f"resource.{label_field(LABEL_ZONE)}",
                f"names zone {zone!r}, but this is the control plane of zone {self.zone!r}",
            )
        return {**labels, LABEL_ORIGIN: ORIGIN_ZONE, LABEL_ZONE: self.zone}

    def _spec(self, kind: ProxyKind, spec: dict[str, Any]) -> dict[str, Any]:
        if kind.resource_type in ("ZoneIngress", "ZoneEgress"):
            zone = spec.get("zone")
            if zone is not None and zone != self.zone:
                raise Problem.invalid(
                    "resource.zone",
                    f"names zone {zone!r}, but this is the control plane of zone {self.zone!r}",
                )
            spec = {**spec, "zone": self.zone}
        return spec

    async def _authenticate(self, kind: ProxyKind, key: ResourceKey, token: object) -> None:
        if token is not None and not isinstance(token, str):
            raise Problem.invalid("token", "must be a string")
        try:
            if kind.token_scope is not None:
                await self.verifier.verify_zone_token(token, zone=self.zone, scope=kind.token_scope)
            else:
                assert key.mesh is not None  # noqa: S101 -- Dataplanes are mesh-scoped
                await self.verifier.verify_dataplane_token(token, mesh=key.mesh, name=key.name)
        except UnknownSigningKeyError as exc:
            if not await self._has_signing_keys():
                # A zone that just started has not received the global's keys yet.
                raise Problem(
                    503,
                    f"{_label(key)} cannot be admitted yet: this zone control plane has not "
                    "received the token signing keys from the global control plane",
                ) from None
            raise _refusal(key, exc) from None
        except TokenError as exc:
            raise _refusal(key, exc) from None

    async def _has_signing_keys(self) -> bool:
        return any(
            secret.key.name.startswith((PUBLIC_KEY_PREFIX, SIGNING_KEY_PREFIX))
            for secret in await self.store.list_resources(
                "GlobalSecret", labels={LABEL_ORIGIN: ORIGIN_GLOBAL}
            )
        )

    async def _check_mesh(self, key: ResourceKey) -> None:
        if key.mesh is None or "Mesh" not in self.catalog:
            return
        if await self.store.find(ResourceKey("Mesh", None, key.mesh)) is None:
            # Meshes come from the global: on a new zone, it may not have arrived yet.
            raise Problem(
                503,
                f"{_label(key)} cannot be registered yet: mesh {key.mesh!r} does not exist "
                "on this zone control plane (meshes are created on the global control plane)",
            )

    def _ours(self, resource: Resource) -> bool:
        labels = resource.labels
        return labels.get(LABEL_ORIGIN) == ORIGIN_ZONE and labels.get(LABEL_ZONE) == self.zone

    # -- writes ------------------------------------------------------------------------

    async def _save_registration(
        self,
        kind: ProxyKind,
        key: ResourceKey,
        labels: dict[str, str],
        spec: dict[str, Any],
        subscription: str,
        version: str | None,
    ) -> None:
        """Upsert the proxy and open its subscription in one commit."""
        insight_key = _insight_key(kind, key)
        for _ in range(_ATTEMPTS):
            found = await self.store.find_many([key, insight_key])
            proxy, insight = found.get(key), found.get(insight_key)
            if proxy is not None and not self._ours(proxy):
                raise Problem(
                    409,
                    f"{_label(key)} exists and does not belong to zone {self.zone!r} "
                    f"(it is a copy from the global control plane): give the proxy another name",
                )
            stored = dict(spec)
            for field in CONTROL_PLANE_FIELDS.get(kind.resource_type, ()):
                if field not in stored and proxy is not None and field in proxy.spec:
                    stored[field] = proxy.spec[field]
            moment = now_text()
            opened: dict[str, Any] = {
                "id": subscription,
                "controlPlaneInstanceId": self.instance_id,
                "connectTime": moment,
                "lastSeen": moment,
                "disconnectTime": None,
                "version": {"kdsDp": {"version": version or "unknown"}},
            }
            subscriptions = _subscriptions(insight)
            for older in subscriptions:
                if older.get("disconnectTime") is None:
                    older["disconnectTime"] = moment  # superseded: the proxy restarted
            subscriptions.append(opened)
            insight_spec = {
                **(dict(insight.spec) if insight is not None else {}),
                "subscriptions": subscriptions[-MAX_SUBSCRIPTIONS:],
            }
            changes: list[Change] = [
                Upsert(
                    key=key,
                    labels=labels,
                    spec=stored,
                    expected_version=proxy.version if proxy is not None else MUST_NOT_EXIST,
                ),
                Upsert(
                    key=insight_key,
                    labels={LABEL_ORIGIN: ORIGIN_ZONE, LABEL_ZONE: self.zone},
                    spec=insight_spec,
                    expected_version=insight.version if insight is not None else MUST_NOT_EXIST,
                ),
            ]
            try:
                await self.store.commit(changes)
            except ConflictError:
                continue  # another registration or heartbeat got there first: read again
            return
        raise Problem(503, f"{_label(key)} kept changing while it registered; retry")

    async def _update_insight(
        self,
        key: ResourceKey,
        change: Callable[[list[dict[str, Any]]], None],
        *,
        create: bool,
    ) -> None:
        """Apply *change* to an insight's subscriptions (read, change, conditional write)."""
        for _ in range(_ATTEMPTS):
            insight = await self.store.find(key)
            if insight is None and not create:
                raise Problem(
                    404, f"{_label(key)} has no subscriptions on zone {self.zone!r}: register"
                )
            subscriptions = _subscriptions(insight)
            change(subscriptions)
            spec = {
                **(dict(insight.spec) if insight is not None else {}),
                "subscriptions": subscriptions[-MAX_SUBSCRIPTIONS:],
            }
            expected = insight.version if insight is not None else MUST_NOT_EXIST
            labels = (
                dict(insight.labels)
                if insight is not None
                else {LABEL_ORIGIN: ORIGIN_ZONE, LABEL_ZONE: self.zone}
            )
            try:
                await self.store.commit(
                    [Upsert(key=key, labels=labels, spec=spec, expected_version=expected)]
                )
            except ConflictError:
                continue
            return
        raise Problem(503, f"{_label(key)} kept changing; retry")

    # -- errors ------------------------------------------------------------------------

    def _middleware(self) -> Any:
        @web.middleware
        async def errors(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            try:
                return await handler(request)
            except Problem as problem:
                if problem.status in (401, 403):
                    logger.warning(
                        "%s %s from %s refused: %s",
                        request.method,
                        request.path,
                        request.remote,
                        problem.detail,
                    )
                return problem.response()
            except web.HTTPException as exc:
                return http_problem(request, exc).response()
            except (StoreUnavailableError, StoreClosedError) as exc:
                return store_unavailable(request, exc)
            except Exception:
                return unexpected_failure(request)

        return errors


# -- helpers -----------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _label(key: ResourceKey) -> str:
    where = f" in mesh {key.mesh!r}" if key.mesh is not None else ""
    return f"{key.type} {key.name!r}{where}"


def _insight_key(kind: ProxyKind, key: ResourceKey) -> ResourceKey:
    return ResourceKey(kind.insight_type, key.mesh, key.name)


def _subscriptions(insight: Resource | None) -> list[dict[str, Any]]:
    if insight is None:
        return []
    stored = insight.spec.get("subscriptions")
    if not isinstance(stored, list):
        return []
    return [dict(s) for s in stored if isinstance(s, dict)]


def _seen(subscription: Mapping[str, Any]) -> datetime:
    seen = subscription.get("lastSeen") or subscription.get("connectTime")
    if isinstance(seen, str):
        try:
            moment = datetime.fromisoformat(seen)
        except ValueError:
            pass
        else:
            return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return datetime.min.replace(tzinfo=UTC)  # never seen: silent for ever


def _silent(insight: Resource, horizon: datetime) -> bool:
    return any(
        s.get("disconnectTime") is None and _seen(s) < horizon for s in _subscriptions(insight)
    )


def _find(
    subscriptions: list[dict[str, Any]], subscription: str, key: ResourceKey
) -> dict[str, Any]:
    for found in subscriptions:
        if found.get("id") == subscription:
            return found
    raise Problem(
        404, f"{_label(key)} has no subscription {subscription!r} (it is too old): register again"
    )


def _open_subscription(
    subscriptions: list[dict[str, Any]], subscription: str, key: ResourceKey
) -> dict[str, Any]:
    found = _find(subscriptions, subscription, key)
    if found.get("disconnectTime") is None:
        return found
    newer = subscriptions.index(found) + 1
    if any(s.get("disconnectTime") is None for s in subscriptions[newer:]):
        raise Problem(
            409,
            f"subscription {subscription} of {_label(key)} was superseded by a newer "
            "registration of the same proxy (is another kds-dp running with this name?)",
        )
    raise Problem(
        410,
        f"subscription {subscription} of {_label(key)} expired: no heartbeat arrived within "
        "the heartbeat timeout",
        title="Gone",
    )


def _refusal(key: ResourceKey, error: TokenError) -> Problem:
    status = 401 if isinstance(error, _UNAUTHENTICATED) else 403
    title = "Unauthorized" if status == 401 else None
    return Problem(status, f"the control plane refused {_label(key)}: {error}", title=title)


def _kind_of(body: Mapping[str, Any]) -> ProxyKind:
    try:
        return proxy_kind(body.get("proxyType"))
    except ValidationError as exc:
        raise Problem.invalid(exc.field, exc.reason) from None


def _only(body: Mapping[str, Any], known: set[str]) -> None:
    for field in body:
        if field not in known:
            raise Problem.invalid(field, "unknown field")


def _optional_text(body: Mapping[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise Problem.invalid(field, f"must be a string of 1 to {_MAX_TEXT} characters")
    return value


def _required_text(body: Mapping[str, Any], field: str) -> str:
    value = _optional_text(body, field)
    if value is None:
        raise Problem.invalid(field, "is required")
    return value
