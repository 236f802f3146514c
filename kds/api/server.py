"""The control plane's HTTP API server: resources, zone overviews, status and OpenAPI.

:class:`ApiServer` serves one store with aiohttp. Reads are open; writes follow the
rules Kuma's API server applies on a multi-zone control plane:

* a type is writable where its sync flags say it is provided (``PROVIDED_BY_GLOBAL``
  on the global, ``PROVIDED_BY_ZONE`` on a zone); ZoneInsight is never writable (the
  control plane keeps it). Other writes answer 405 with Kuma's texts;
* origin labels: on the global, what a zone published (``kuma.io/origin: zone``) is
  not the global's to change; on a zone, copies from the global (``origin: global``)
  are not the zone's; the server labels what it writes (``origin: global`` for what
  the global sends down, ``origin: zone`` and ``kuma.io/zone`` on a zone);
* deleting a Zone on the global is refused while it is connected, and otherwise
  deletes everything it published in the same transaction;
* writes from clients other than loopback need ``Authorization: Bearer <admin token>``.

Bad input of any kind is a 4xx naming what was wrong and changes nothing; an
unexpected failure is a 500 with a generic message, logged with its traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

import kds
from kds.api import openapi
from kds.api.overviews import (
    PROXY_KINDS,
    ProxyKind,
    global_insight,
    gui_page,
    proxy_overview,
    zone_overview,
)
from kds.api.problems import (
    Problem,
    http_problem,
    json_kind,
    json_response,
    public_field,
    read_json,
    store_unavailable,
    unexpected_failure,
)
from kds.api.representation import from_json, label_field, to_json, type_path
from kds.api.routes import Route, page_of
from kds.api.tokens import token_routes
from kds.errors import (
    ConflictError,
    NotFoundError,
    StoreClosedError,
    StoreUnavailableError,
    ValidationError,
)
from kds.resource import (
    LABEL_ORIGIN,
    LABEL_ZONE,
    ORIGIN_GLOBAL,
    ORIGIN_ZONE,
    ResourceKey,
    Scope,
)
from kds.store import MUST_NOT_EXIST, Change, Cursor, Delete, Tracking, Upsert
from kds.sync.engines import tracking_origin
from kds.sync.lifecycle import insight_key, is_online, zone_key
from kds.sync.rules import INTERNAL_SECRET_PREFIXES

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from aiohttp.web_request import BaseRequest
    from anyio.abc import TaskStatus

    from kds.api.routes import Handler
    from kds.resource import Catalog, Resource, ResourceType
    from kds.store import Store

__all__ = [
    "GLOBAL_READ_ONLY_MESSAGE",
    "MAX_BODY_SIZE",
    "READ_ONLY_TYPES",
    "SECRET_TYPES",
    "ZONE_CONNECTED_MESSAGE",
    "ZONE_READ_ONLY_MESSAGE",
    "ApiServer",
    "is_loopback",
]

logger = logging.getLogger(__name__)
_access_logger = logging.getLogger(f"{__name__}.access")

MAX_BODY_SIZE: Final = 4 * 1024 * 1024
"""The largest request body the server reads, in bytes (4 MiB); larger ones get a 413."""

READ_ONLY_TYPES: Final = frozenset({"ZoneInsight"})
"""Types no API may write, whatever their sync flags: the control plane keeps them."""

GLOBAL_READ_ONLY_MESSAGE: Final = (
    "On global control plane you can not modify dataplane resources with 'kumactl apply' "
    "or via the HTTP API. You can still use 'kumactl' or the HTTP API to modify them on "
    "the zone control plane."
)
"""Kuma's answer to a write, on the global, of a type only zones provide."""

ZONE_READ_ONLY_MESSAGE: Final = (
    "On zone control plane you can only modify zone resources with 'kumactl apply' or via "
    "the HTTP API. You can still use 'kumactl' or the HTTP API to modify the rest of the "
    "resource on the global control plane."
)
"""Kuma's answer to a write, on a zone, of a type only the global provides."""

ZONE_CONNECTED_MESSAGE: Final = (
    "unable to delete Zone, Zone CP is still connected, please shut it down first"
)
"""Kuma's reason for refusing to delete a connected zone (field ``zone``)."""

_SHUTDOWN_TIMEOUT: Final = 5.0  # seconds in-flight requests get to finish on shutdown
_ZONE_DELETE_ATTEMPTS: Final = 10  # listings to try while the zone's resources change


SECRET_TYPES: Final = frozenset({"Secret", "GlobalSecret"})
"""Types whose reads need what writes need (a loopback client or the admin token)."""


def _is_signing_key(key: ResourceKey) -> bool:
    """A private token-signing key: never served, and kept by ``/tokens/zone/signing-keys``."""
    return key.type == "GlobalSecret" and key.name.startswith(INTERNAL_SECRET_PREFIXES)


def _refuse_signing_key(key: ResourceKey) -> None:
    if _is_signing_key(key):
        raise Problem(
            400,
            f"{key}: private signing keys are not read or written as resources; rotate and "
            "remove them through /tokens/zone/signing-keys",
            [("name", "is the name of a private signing key")],
        )


def is_loopback(host: str | None) -> bool:
    """Whether *host* (a peer address as aiohttp reports it) is a loopback address.

    IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) count as their IPv4 address;
    anything that is not an IP address (a Unix socket, ``None``) does not count.
    """
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class ApiServer:
    """The HTTP API of a global or zone control plane, over one store.

    Args:
        store: the control plane's store (open while the server serves).
        mode: ``"global"`` or ``"zone"``: decides which types are writable and which
            labels the server sets.
        zone: the zone's name; required on a zone, not allowed on the global.
        catalog: the known types; the store's catalog by default.
        admin_token: the token writes from clients other than loopback must present
            as ``Authorization: Bearer <token>``; without one only loopback clients
            may write.
        config: the effective configuration ``GET /config`` shows (secrets already
            masked).
        liveness: seconds a zone's last sighting (``lastSeen``) keeps it Online.
        ready: returns ``None`` when the control plane is ready, else why not
            (``GET /ready`` answers 503 with it); always ready when not given.
        instance_id: this control plane instance's id (``GET /``); random when not given.
        is_local: decides from the peer address whether a client is local (may write
            without the token); loopback addresses by default.
        max_body_size: the largest request body read, in bytes.

    Raises:
        ValueError: *mode* is unknown, *zone* is missing on a zone or given on the
            global, or two types have the same URL path.
    """

    def __init__(
        self,
        store: Store,
        *,
        mode: Literal["global", "zone"],
        zone: str | None = None,
        catalog: Catalog | None = None,
        admin_token: str | None = None,
        config: Mapping[str, Any] | None = None,
        liveness: float = 30.0,
        ready: Callable[[], str | None] | None = None,
        instance_id: str | None = None,
        is_local: Callable[[str | None], bool] = is_loopback,
        max_body_size: int = MAX_BODY_SIZE,
    ) -> None:
        if mode not in ("global", "zone"):
            raise ValueError(f"mode must be 'global' or 'zone', got {mode!r}")
        if mode == "zone" and not zone:
            raise ValueError("a zone control plane's API needs the zone's name")
        if mode == "global" and zone is not None:
            raise ValueError("the global control plane's API takes no zone name")
        if not math.isfinite(liveness) or liveness <= 0:
            raise ValueError(f"liveness must be a positive number of seconds, got {liveness!r}")
        self.store = store
        self.mode = mode
        self.zone = zone
        self.catalog = catalog if catalog is not None else store.catalog
        self.liveness = liveness
        self.instance_id = instance_id or uuid.uuid4().hex
        self.max_body_size = max_body_size
        self._admin_token = admin_token.encode() if admin_token else None
        self._config = dict(config or {})
        self._ready = ready
        self._is_local = is_local
        paths: dict[str, str] = {}
        for resource_type in self.catalog:
            path = type_path(resource_type)
            if path in paths:
                raise ValueError(
                    f"types {paths[path]!r} and {resource_type.name!r} have the same URL "
                    f"path {path!r}"
                )
            paths[path] = resource_type.name

    def __repr__(self) -> str:
        zone = f" {self.zone!r}" if self.zone else ""
        return f"<ApiServer {self.mode}{zone} over {self.store!r}>"

    # -- what is served ----------------------------------------------------------------

    def read_only(self, resource_type: ResourceType) -> bool:
        """Whether this control plane's API refuses writes of *resource_type*."""
        if resource_type.name in READ_ONLY_TYPES:
            return True
        if self.mode == "global":
            return not resource_type.writable_on_global
        return not resource_type.writable_on_zone

    def routes(self) -> list[Route]:
        """Every endpoint this server serves (the OpenAPI document describes these)."""
        routes = self._fixed_routes()
        for resource_type in sorted(self.catalog, key=lambda t: t.name):
            routes += self._resource_routes(resource_type)
        return routes

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of this server (``GET /openapi.json``)."""
        return openapi.document(
            self.routes(), self.catalog, version=kds.__version__, mode=self.mode
        )

    def make_app(self) -> web.Application:
        """Build the aiohttp application :meth:`serve` runs (a new one each call)."""
        app = web.Application(middlewares=[self._middleware()], client_max_size=self.max_body_size)
        for route in self.routes():
            app.router.add_route(route.method, route.path, route.handler)
        return app

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 5681,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the API on *host*:*port* until cancelled.

        Reports the bound base URL (``http://127.0.0.1:5681``; with the real port when
        *port* is 0) through *task_status* once listening. On cancellation the
        listener closes and in-flight requests get a few seconds to finish.

        Raises:
            OSError: the address cannot be bound (in use, not local); the message
                names it.
        """
        runner = web.AppRunner(
            self.make_app(),
            access_log=_access_logger,
            access_log_class=_AccessLogger,
            shutdown_timeout=_SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError as exc:
                raise OSError(
                    exc.errno, f"the HTTP API cannot listen on {host}:{port}: {exc.strerror}"
                ) from exc
            url = _base_url(runner.addresses[0])
            logger.info("%s control plane HTTP API listening on %s", self.mode, url)
            task_status.started(url)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    # -- routes ------------------------------------------------------------------------

    def _fixed_routes(self) -> list[Route]:
        ref = openapi.ref
        routes = [
            Route(
                method="GET",
                path="/",
                handler=self._index,
                operation_id="index",
                summary="Product, version, mode and cluster id of this control plane",
                tag="Control plane",
                responses={200: ("The control plane", ref("Index"))},
            ),
            Route(
                method="GET",
                path="/_resources",
                handler=self._resource_types,
                operation_id="resourceTypes",
                summary="The resource types, their URL paths and whether they are writable here",
                tag="Control plane",
                responses={200: ("The types", ref("ResourceTypes"))},
            ),
            Route(
                method="GET",
                path="/openapi.json",
                handler=self._openapi,
                operation_id="openapi",
                summary="This document",
                tag="Control plane",
                responses={200: ("The OpenAPI document", {"type": "object"})},
            ),
            Route(
                method="GET",
                path="/config",
                handler=self._configuration,
                operation_id="configuration",
                summary="The effective configuration (secrets masked)",
                tag="Control plane",
                responses={200: ("The configuration", ref("Configuration"))},
            ),
            Route(
                method="GET",
                path="/ready",
                handler=self._readiness,
                operation_id="ready",
                summary="Whether the control plane is ready (503 with the reason if not)",
                tag="Control plane",
                responses={200: ("Ready", ref("Ready"))},
                errors=(503,),
            ),
            Route(
                method="GET",
                path="/global-insight",
                handler=self._global_insight,
                operation_id="globalInsight",
                summary="Counts of zones, zone proxies, meshes and every type",
                tag="Control plane",
                responses={200: ("The counts", ref("GlobalInsight"))},
                errors=(503,),
            ),
        ]
        if "Zone" in self.catalog and "ZoneInsight" in self.catalog:
            routes += self._zone_routes()
        for kind in PROXY_KINDS:
            if kind in self.catalog and PROXY_KINDS[kind][0] in self.catalog:
                routes += self._proxy_routes(kind)
        if self.mode == "global":
            routes.append(
                Route(
                    method="GET",
                    path="/gui",
                    handler=self._gui,
                    operation_id="gui",
                    summary="A web page listing zones and zone ingresses",
                    tag="Zones",
                    responses={200: ("The page", {"type": "string"})},
                    errors=(503,),
                    media_type="text/html",
                )
            )
        if "GlobalSecret" in self.catalog:  # where signing keys and revocations are kept
            routes += token_routes(
                self.store, mode=self.mode, authorize=self._authorize, read_json=self._json_body
            )
        return routes

    def _zone_routes(self) -> list[Route]:
        ref = openapi.ref
        routes = [
            Route(
                method="GET",
                path="/status/zones",
                handler=self._zone_statuses,
                operation_id="zoneStatuses",
                summary="Each zone's name and whether it is online",
                tag="Zones",
                responses={200: ("The zones", ref("ZoneStatuses"))},
                errors=(503,),
            )
        ]
        # Kuma's paths, and the aliases older kumactl versions use.
        for prefix, suffix, alias in (
            ("/zones/_overview", "/zones/{name}/_overview", ""),
            ("/zones+insights", "/zones+insights/{name}", "Legacy"),
        ):
            routes += [
                Route(
                    method="GET",
                    path=prefix,
                    handler=self._zone_overviews,
                    operation_id=f"listZoneOverviews{alias}",
                    summary="Every zone with its insight and whether it is online",
                    tag="Zones",
                    responses={200: ("The zones", ref("ZoneOverviewList"))},
                    errors=(400, 503),
                    paged=True,
                ),
                Route(
                    method="GET",
                    path=suffix,
                    handler=self._zone_overview,
                    operation_id=f"getZoneOverview{alias}",
                    summary="One zone with its insight and whether it is online",
                    tag="Zones",
                    responses={200: ("The zone", ref("ZoneOverview"))},
                    errors=(400, 404, 503),
                ),
            ]
        return routes

    def _proxy_routes(self, kind: ProxyKind) -> list[Route]:
        ref = openapi.ref
        path = type_path(kind)
        legacy = "zoneingresses+insights" if kind == "ZoneIngress" else "zoneegressoverviews"
        routes = []
        for prefix, suffix, alias in (
            (f"/{path}/_overview", f"/{path}/{{name}}/_overview", ""),
            (f"/{legacy}", f"/{legacy}/{{name}}", "Legacy"),
        ):
            routes += [
                Route(
                    method="GET",
                    path=prefix,
                    handler=self._bind_kind(self._proxy_overviews, kind),
                    operation_id=f"list{kind}Overviews{alias}",
                    summary=f"Every {kind} with its insight and whether it is online",
                    tag="Zone proxies",
                    responses={200: (f"The {kind}s", ref(f"{kind}OverviewList"))},
                    errors=(400, 503),
                    paged=True,
                ),
                Route(
                    method="GET",
                    path=suffix,
                    handler=self._bind_kind(self._proxy_overview, kind),
                    operation_id=f"get{kind}Overview{alias}",
                    summary=f"One {kind} with its insight and whether it is online",
                    tag="Zone proxies",
                    responses={200: (f"The {kind}", ref(f"{kind}Overview"))},
                    errors=(400, 404, 503),
                ),
            ]
        return routes

    def _resource_routes(self, resource_type: ResourceType) -> list[Route]:
        name = resource_type.name
        schema = openapi.schema_name(resource_type)
        path = type_path(resource_type)
        item = f"/{path}/{{name}}"
        listed = [
            Route(
                method="GET",
                path=f"/{path}",
                handler=self._bind(self._list, resource_type),
                operation_id=f"list{schema}",
                summary=f"Every {name}"
                + (" in every mesh" if resource_type.scope is Scope.MESH else ""),
                tag=name,
                responses={200: (f"The {name} resources", openapi.ref(f"{schema}List"))},
                errors=(400, 503),
                paged=True,
            )
        ]
        if resource_type.scope is Scope.MESH:
            listed.append(
                Route(
                    method="GET",
                    path=f"/meshes/{{mesh}}/{path}",
                    handler=self._bind(self._list, resource_type),
                    operation_id=f"list{schema}InMesh",
                    summary=f"Every {name} of one mesh",
                    tag=name,
                    responses={200: (f"The {name} resources", openapi.ref(f"{schema}List"))},
                    errors=(400, 503),
                    paged=True,
                )
            )
            item = f"/meshes/{{mesh}}/{path}/{{name}}"
        put_result = openapi.ref("PutResult")
        return [
            *listed,
            Route(
                method="GET",
                path=item,
                handler=self._bind(self._get, resource_type),
                operation_id=f"get{schema}",
                summary=f"One {name}",
                tag=name,
                responses={200: (f"The {name}", openapi.ref(schema))},
                errors=(400, 404, 503),
            ),
            Route(
                method="PUT",
                path=item,
                handler=self._bind(self._put, resource_type),
                operation_id=f"put{schema}",
                summary=f"Create or replace a {name}",
                tag=name,
                responses={201: ("Created", put_result), 200: ("Replaced", put_result)},
                errors=(400, 403, 405, 409, 413, 503),
                body=openapi.ref(schema),
                write=True,
            ),
            Route(
                method="DELETE",
                path=item,
                handler=self._bind(self._delete, resource_type),
                operation_id=f"delete{schema}",
                summary=f"Delete a {name}",
                tag=name,
                responses={200: ("Deleted", openapi.ref("DeleteResult"))},
                errors=(400, 403, 404, 405, 409, 503),
                write=True,
            ),
        ]

    @staticmethod
    def _bind(
        method: Callable[[ResourceType, web.Request], Awaitable[web.StreamResponse]],
        resource_type: ResourceType,
    ) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await method(resource_type, request)

        return handler

    @staticmethod
    def _bind_kind(
        method: Callable[[ProxyKind, web.Request], Awaitable[web.StreamResponse]],
        kind: ProxyKind,
    ) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await method(kind, request)

        return handler

    # -- errors ------------------------------------------------------------------------

    def _middleware(self) -> Any:
        @web.middleware
        async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except Problem as problem:
                return problem.response()
            except web.HTTPException as exc:
                return http_problem(request, exc).response()
            except ValidationError as exc:
                return Problem.from_validation(exc).response()
            except NotFoundError as exc:
                return Problem(404, f"{exc.key} was not found").response()
            except ConflictError as exc:
                return Problem(
                    409, f"{exc}: it changed while this request ran; read it again and retry"
                ).response()
            except (StoreUnavailableError, StoreClosedError) as exc:
                return store_unavailable(request, exc)
            except Exception:
                return unexpected_failure(request)

        return errors

    # -- control plane -----------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            {
                "product": "kds",
                "version": kds.__version__,
                "instanceId": self.instance_id,
                "mode": self.mode,
                "zone": self.zone,
                "clusterId": self.store.epoch,
            }
        )

    async def _resource_types(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            {
                "resources": [
                    {
                        "name": resource_type.name,
                        "path": type_path(resource_type),
                        "scope": "Mesh" if resource_type.scope is Scope.MESH else "Global",
                        "readOnly": self.read_only(resource_type),
                        "flatSpec": resource_type.flat_spec,
                    }
                    for resource_type in sorted(self.catalog, key=lambda t: t.name)
                ]
            }
        )

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.openapi())

    async def _configuration(self, request: web.Request) -> web.StreamResponse:
        # The daemon's configuration may hold paths and the like: show them as text.
        body = json.dumps(self._config, ensure_ascii=False, default=str)
        return web.Response(text=body, content_type="application/json")

    async def _readiness(self, request: web.Request) -> web.StreamResponse:
        reason = self._ready() if self._ready is not None else None
        if reason is not None:
            raise Problem(503, reason)
        return json_response({"status": "ready"})

    async def _global_insight(self, request: web.Request) -> web.StreamResponse:
        resources = await self.store.list_resources()
        return json_response(
            global_insight(resources, self.catalog, now=_now(), liveness=self.liveness)
        )

    async def _gui(self, request: web.Request) -> web.StreamResponse:
        zones = await self._all_zone_overviews()
        ingresses = await self._all_proxy_overviews("ZoneIngress")
        return web.Response(
            text=gui_page(zones, ingresses),
            content_type="text/html",
            # Nothing on the page runs or loads anything: say so to the browser.
            headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
        )

    # -- zones -------------------------------------------------------------------------

    async def _all_zone_overviews(self) -> list[dict[str, Any]]:
        zones = await self.store.list_resources("Zone")
        insights = {r.key.name: r for r in await self.store.list_resources("ZoneInsight")}
        now = _now()
        return [
            zone_overview(zone, insights.get(zone.key.name), now=now, liveness=self.liveness)
            for zone in zones
        ]

    async def _zone_overviews(self, request: web.Request) -> web.StreamResponse:
        page = page_of(request)
        return json_response(page.wrap(request, await self._all_zone_overviews()))

    async def _zone_overview(self, request: web.Request) -> web.StreamResponse:
        key = _path_key(zone_key(request.match_info["name"]))
        zone = await self.store.find(key)
        if zone is None:
            raise Problem(404, f"zone {key.name!r} was not found")
        insight = await self.store.find(insight_key(key.name))
        return json_response(zone_overview(zone, insight, now=_now(), liveness=self.liveness))

    async def _zone_statuses(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            [
                {"name": overview["name"], "active": overview["online"]}
                for overview in await self._all_zone_overviews()
            ]
        )

    async def _all_proxy_overviews(self, kind: ProxyKind) -> list[dict[str, Any]]:
        proxies = await self.store.list_resources(kind)
        insight_type = PROXY_KINDS[kind][0]
        insights = {r.key.name: r for r in await self.store.list_resources(insight_type)}
        now = _now()
        return [
            proxy_overview(
                kind, proxy, insights.get(proxy.key.name), now=now, liveness=self.liveness
            )
            for proxy in proxies
        ]

    async def _proxy_overviews(self, kind: ProxyKind, request: web.Request) -> web.StreamResponse:
        page = page_of(request)
        return json_response(page.wrap(request, await self._all_proxy_overviews(kind)))

    async def _proxy_overview(self, kind: ProxyKind, request: web.Request) -> web.StreamResponse:
        key = _path_key(ResourceKey(kind, None, request.match_info["name"]))
        proxy = await self.store.find(key)
        if proxy is None:
            raise Problem(404, f"{kind} {key.name!r} was not found")
        insight = await self.store.find(ResourceKey(PROXY_KINDS[kind][0], None, key.name))
        return json_response(
            proxy_overview(kind, proxy, insight, now=_now(), liveness=self.liveness)
        )

    # -- resources ---------------------------------------------------------------------

    async def _list(self, resource_type: ResourceType, request: web.Request) -> web.StreamResponse:
        page = page_of(request)
        if resource_type.name in SECRET_TYPES:
            self._authorize(request)
        mesh = request.match_info.get("mesh")
        if mesh is not None:
            _path_key(ResourceKey(resource_type.name, mesh, "-"))
        resources = [
            resource
            for resource in await self.store.list_resources(resource_type.name, mesh=mesh)
            if not _is_signing_key(resource.key)
        ]
        return json_response(
            page.wrap(request, resources, lambda resource: to_json(resource, self.catalog))
        )

    async def _get(self, resource_type: ResourceType, request: web.Request) -> web.StreamResponse:
        if resource_type.name in SECRET_TYPES:
            self._authorize(request)
        key = self._item_key(resource_type, request)
        resource = None if _is_signing_key(key) else await self.store.find(key)
        if resource is None:
            raise Problem(404, _missing(key))
        return json_response(to_json(resource, self.catalog))

    async def _put(self, resource_type: ResourceType, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        self._check_writable(resource_type)
        key = self._item_key(resource_type, request)
        _refuse_signing_key(key)
        document = await self._json_body(request)
        if not isinstance(document, dict):
            raise Problem.invalid("body", f"must be a JSON object, got {json_kind(document)}")
        given_type = document.get("type")
        if isinstance(given_type, str) and given_type != resource_type.name:
            raise Problem.invalid(
                "type", f"must be {resource_type.name!r} to match the path, got {given_type!r}"
            )
        try:
            body_key, labels, spec = from_json(document, self.catalog, mesh=key.mesh)
        except ValidationError as exc:
            raise Problem.from_validation(exc) from None
        if body_key.name != key.name:
            raise Problem.invalid(
                "name", f"must be {key.name!r} to match the path, got {body_key.name!r}"
            )
        if body_key.mesh != key.mesh:
            raise Problem.invalid(
                "mesh", f"must be {key.mesh!r} to match the path, got {body_key.mesh!r}"
            )
        labels = self._labels_to_store(resource_type, labels)
        existing = await self.store.find(key)
        if existing is not None:
            self._check_stored_origin(existing)
        expected = existing.version if existing is not None else MUST_NOT_EXIST
        await self.store.commit(
            [Upsert(key=key, labels=labels, spec=spec, expected_version=expected)]
        )
        return json_response({"warnings": []}, status=201 if existing is None else 200)

    async def _delete(
        self, resource_type: ResourceType, request: web.Request
    ) -> web.StreamResponse:
        self._authorize(request)
        self._check_writable(resource_type)
        key = self._item_key(resource_type, request)
        _refuse_signing_key(key)
        existing = await self.store.find(key)
        if existing is None:
            raise Problem(404, _missing(key))
        self._check_stored_origin(existing)
        if self.mode == "global" and resource_type.name == "Zone":
            await self._delete_zone(key.name)
        else:
            await self.store.commit([Delete(key=key, expected_version=existing.version)])
        return json_response({})

    async def _delete_zone(self, name: str) -> None:
        """Delete a disconnected zone, with everything it published, in one commit.

        The zone's replication cursor is replaced in the same transaction by one of a
        log that never existed, so if the zone connects again the global asks it for
        everything it publishes (a reset), not only for what changed since.
        """
        key = zone_key(name)
        for _ in range(_ZONE_DELETE_ATTEMPTS):
            zone = await self.store.find(key)
            if zone is None:
                raise Problem(404, _missing(key))
            insight = await self.store.find(insight_key(name))
            if is_online(insight, now=_now(), liveness=self.liveness):
                raise Problem(
                    400, f"zone: {ZONE_CONNECTED_MESSAGE}", [("zone", ZONE_CONNECTED_MESSAGE)]
                )
            published = await self.store.list_resources(
                labels={LABEL_ZONE: name, LABEL_ORIGIN: ORIGIN_ZONE}
            )
            doomed = [*published, zone, *([insight] if insight is not None else [])]
            changes: list[Change] = [
                Delete(key=resource.key, expected_version=resource.version)
                for resource in {resource.key: resource for resource in doomed}.values()
            ]
            forgotten = Tracking(tracking_origin(name), Cursor(f"deleted-{uuid.uuid4().hex}", 0))
            try:
                await self.store.commit(changes, tracking=forgotten)
            except ConflictError:
                continue  # the zone's resources changed meanwhile: list them again
            logger.info("zone %r deleted with the %d resources it published", name, len(published))
            return
        raise Problem(
            409, f"zone {name!r}: its resources kept changing; retry once the zone is quiet"
        )

    # -- write rules -------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        """Refuse (403) a write from a non-local client without the admin token."""
        if self._is_local(request.remote):
            return
        if self._admin_token is None:
            raise Problem(
                403,
                f"writes from {request.remote} are refused: this control plane has no admin "
                "token, so only loopback clients may write",
            )
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem(
                403,
                f"writes from {request.remote} need 'Authorization: Bearer <admin token>' "
                "(the control plane keeps the token in <workDir>/admin-token)",
            )
        if not hmac.compare_digest(token.strip().encode(), self._admin_token):
            raise Problem(403, "the admin token is not valid")

    def _check_writable(self, resource_type: ResourceType) -> None:
        if resource_type.name in READ_ONLY_TYPES:
            raise Problem(
                405, f"{resource_type.name} is read-only: the control plane keeps it itself"
            )
        if self.read_only(resource_type):
            raise Problem(
                405, GLOBAL_READ_ONLY_MESSAGE if self.mode == "global" else ZONE_READ_ONLY_MESSAGE
            )

    def _labels_to_store(
        self, resource_type: ResourceType, labels: dict[str, str]
    ) -> dict[str, str]:
        """Check the origin and zone labels of a body, and set the ones the server sets."""
        origin = labels.get(LABEL_ORIGIN)
        if self.mode == "global":
            if origin is not None and origin != ORIGIN_GLOBAL:
                raise Problem.invalid(
                    label_field(LABEL_ORIGIN), "the origin label must be set to 'global'"
                )
            if resource_type.sent_from_global:
                labels[LABEL_ORIGIN] = ORIGIN_GLOBAL
            return labels
        assert self.zone is not None  # noqa: S101 -- checked in __init__
        if origin is not None and origin != ORIGIN_ZONE:
            raise Problem.invalid(
                label_field(LABEL_ORIGIN), "the origin label must be set to 'zone'"
            )
        zone_label = labels.get(LABEL_ZONE)
        if zone_label is not None and zone_label != self.zone:
            raise Problem.invalid(
                label_field(LABEL_ZONE), f"kuma.io/zone label should have {self.zone} value"
            )
        labels[LABEL_ORIGIN] = ORIGIN_ZONE
        labels[LABEL_ZONE] = self.zone
        return labels

    def _check_stored_origin(self, existing: Resource) -> None:
        """Refuse to change or delete what the other side of replication owns."""
        origin = existing.labels.get(LABEL_ORIGIN)
        if self.mode == "global" and origin == ORIGIN_ZONE:
            raise Problem.invalid(
                label_field(LABEL_ORIGIN), "the origin label must be set to 'global'"
            )
        if self.mode == "zone" and origin == ORIGIN_GLOBAL:
            raise Problem.invalid(
                label_field(LABEL_ORIGIN), "the origin label must be set to 'zone'"
            )

    # -- request parts -----------------------------------------------------------------

    @staticmethod
    def _item_key(resource_type: ResourceType, request: web.Request) -> ResourceKey:
        return _path_key(
            ResourceKey(
                resource_type.name, request.match_info.get("mesh"), request.match_info["name"]
            )
        )

    async def _json_body(self, request: web.Request) -> object:
        """Read and parse the body as strict JSON (no duplicate keys, NaN or infinities)."""
        return await read_json(request, max_body_size=self.max_body_size)


class _AccessLogger(AbstractAccessLogger):
    """One DEBUG line per request: clients poll, so INFO would drown the daemon's log."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s %s -> %d in %.1f ms",
            request.remote,
            request.method,
            request.path_qs,
            response.status,
            time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


def _now() -> datetime:
    return datetime.now(UTC)


def _base_url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _path_key(key: ResourceKey) -> ResourceKey:
    """Check the mesh and name a URL gave; a 400 naming ``mesh`` or ``name`` if bad."""
    try:
        key.validate()
    except ValidationError as exc:
        raise Problem.invalid(public_field(exc.field), exc.reason) from None
    return key


def _missing(key: ResourceKey) -> str:
    where = f" in mesh {key.mesh!r}" if key.mesh is not None else ""
    return f"{key.type} {key.name!r} was not found{where}"
