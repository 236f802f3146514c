"""Zone proxies registering with their zone control plane: what ``kds-dp`` runs.

A zone ingress, zone egress or dataplane proxy is registered with the dataplane
server of its zone control plane (:class:`kds.dpserver.DataplaneServer`, HTTPS on
port 5678) and kept alive by heartbeats; no Envoy runs, only the registration.

* :func:`load_proxy_file` reads and checks a proxy's YAML or JSON file, naming
  the file and the field that is wrong; :func:`read_proxy_document` does the same
  checks on a parsed document (the server runs them again on what it receives).
* :class:`DataplaneClient` is one HTTPS connection pool to a dataplane server;
  many agents may share it.
* :class:`ProxyAgent` registers one proxy, heartbeats it and says goodbye when
  cancelled. A load generator runs many of them in one process::

      async with DataplaneClient("https://zone-cp:5678", ca_file="kds-cp.crt") as client:
          async with anyio.create_task_group() as group:
              for document in documents:
                  agent = ProxyAgent(client, proxy_type="dataplane", document=document,
                                     token=token)
                  await group.start(agent.run)

Failures are classes: :class:`ControlPlaneUnavailable` is worth retrying (the
agent does, with exponential backoff and jitter); :class:`ProxyRefused` and
:class:`ControlPlaneUntrusted` are not (a refused token, a bad resource, a
certificate nobody told the client to trust).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import random
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Self, cast
from urllib.parse import urlsplit

import anyio
import attrs
import httpx
import yaml

import kds
from kds._yaml import DocumentLoader
from kds.api.representation import from_json
from kds.catalog import DEFAULT_CATALOG
from kds.errors import ConfigError, KdsError, ValidationError

if TYPE_CHECKING:
    from os import PathLike
    from types import TracebackType

    from anyio.abc import TaskStatus

    from kds.resource import Catalog, ResourceKey

__all__ = [
    "DEFAULT_PORT",
    "PROXY_KINDS",
    "ControlPlaneUnavailable",
    "ControlPlaneUntrusted",
    "DataplaneClient",
    "DataplaneError",
    "ProxyAgent",
    "ProxyFileError",
    "ProxyKind",
    "ProxyRefused",
    "ProxyType",
    "Registration",
    "SubscriptionEnded",
    "check_proxy_spec",
    "load_proxy_file",
    "proxy_kind",
    "read_proxy_document",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT: Final = 5678
"""Where a zone control plane's dataplane server listens unless configured otherwise."""

ProxyType = Literal["ingress", "egress", "dataplane"]
"""What ``kds-dp run --proxy-type`` takes."""

_SERVICE_TAG: Final = "kuma.io/service"
_MAX_PORT: Final = 65535
_SNIPPET: Final = 200  # characters of a non-JSON error body worth showing


@attrs.frozen
class ProxyKind:
    """One proxy type: its resource and insight types, and the token it needs.

    Attributes:
        proxy_type: the ``--proxy-type`` value (``ingress``).
        resource_type: the resource registered (``ZoneIngress``).
        insight_type: the insight kept beside it, under the same key (``ZoneIngressInsight``).
        token_scope: the zone token scope it needs (``ingress``, ``egress``), or
            ``None`` for a dataplane, which needs a dataplane token for its mesh.
    """

    proxy_type: ProxyType
    resource_type: str
    insight_type: str
    token_scope: str | None


PROXY_KINDS: Final[Mapping[ProxyType, ProxyKind]] = {
    "ingress": ProxyKind("ingress", "ZoneIngress", "ZoneIngressInsight", "ingress"),
    "egress": ProxyKind("egress", "ZoneEgress", "ZoneEgressInsight", "egress"),
    "dataplane": ProxyKind("dataplane", "Dataplane", "DataplaneInsight", None),
}
"""Every proxy type, by its ``--proxy-type`` value."""


def proxy_kind(proxy_type: object) -> ProxyKind:
    """The :class:`ProxyKind` of a ``--proxy-type`` value.

    Raises:
        ValidationError: (field ``proxyType``) it is not ``ingress``, ``egress`` or
            ``dataplane``.
    """
    if isinstance(proxy_type, str) and proxy_type in PROXY_KINDS:
        return PROXY_KINDS[cast("ProxyType", proxy_type)]
    raise ValidationError(
        "proxyType",
        f"must be one of {', '.join(PROXY_KINDS)}, got {json.dumps(proxy_type, default=str)}",
    )


# -- the proxy's document ----------------------------------------------------------------


class ProxyFileError(ConfigError):
    """Raised when a proxy file cannot be read or is not a valid proxy of its type.

    The message is one line: the file, then the field and what is wrong with it.

    Attributes:
        path: the file.
        field: the offending field as the file spells it (``networking.port``), or
            ``None`` when the file as a whole is wrong (unreadable, not YAML).
        reason: what is wrong.
    """

    def __init__(self, path: str, field: str | None, reason: str) -> None:
        where = f"{path}: {field}" if field else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.field = field
        self.reason = reason


def read_proxy_document(
    document: object,
    proxy_type: object,
    *,
    catalog: Catalog = DEFAULT_CATALOG,
    mesh: str | None = None,
    name: str | None = None,
) -> tuple[ResourceKey, dict[str, str], dict[str, Any]]:
    """Check a parsed proxy document (a ZoneIngress, ZoneEgress or Dataplane).

    The document is read like any resource (:func:`kds.api.representation.from_json`,
    with the catalog's spec validator), then its type must be the one of
    *proxy_type* and its fields must make a proxy (:func:`check_proxy_spec`).

    Args:
        document: the parsed YAML or JSON.
        proxy_type: ``ingress``, ``egress`` or ``dataplane``.
        catalog: the known types.
        mesh: the mesh when the document names none (a Dataplane's); refused for
            ZoneIngress and ZoneEgress, and when the document names another one.
        name: the name when the document names none; refused when it names another one.

    Returns:
        The proxy's key, its labels and its spec.

    Raises:
        ValidationError: naming the field as the document spells it (``type``,
            ``name``, ``mesh``, ``networking.port``, ...).
    """
    kind = proxy_kind(proxy_type)
    if isinstance(document, Mapping):
        document = _fill(document, "name", name)
        if mesh is not None and kind.resource_type != "Dataplane":
            raise ValidationError("mesh", f"cannot be set: {kind.resource_type} is not in a mesh")
        document = _fill(document, "mesh", mesh)
        given_type = document.get("type")
        if given_type != kind.resource_type and given_type in {
            k.resource_type for k in PROXY_KINDS.values()
        }:
            raise ValidationError(
                "type",
                f"must be {kind.resource_type} for proxy type {kind.proxy_type!r}, "
                f"got {given_type!r}",
            )
    try:
        key, labels, spec = from_json(document, catalog)
    except ValidationError as exc:
        # Proxy types keep their fields at the top level: name them as the file does.
        raise ValidationError(_document_field(exc.field), exc.reason) from None
    if key.type != kind.resource_type:
        raise ValidationError(
            "type",
            f"must be {kind.resource_type} for proxy type {kind.proxy_type!r}, got {key.type!r}",
        )
    check_proxy_spec(kind.resource_type, spec)
    return key, labels, spec


def _fill(document: Mapping[str, Any], field: str, value: str | None) -> Mapping[str, Any]:
    if value is None:
        return document
    given = document.get(field)
    if given is None:
        return {**document, field: value}
    if given != value:
        raise ValidationError(field, f"the file says {given!r}, but {value!r} was given")
    return document


def _document_field(field: str) -> str:
    return field.removeprefix("spec.")


def load_proxy_file(
    path: str | PathLike[str],
    proxy_type: object,
    *,
    catalog: Catalog = DEFAULT_CATALOG,
    mesh: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Read a proxy's YAML (or JSON) file and check it with :func:`read_proxy_document`.

    Returns:
        The document, with *mesh* and *name* filled in where the file has none.

    Raises:
        ProxyFileError: the file cannot be read, is not one YAML document, or is not
            a valid proxy of *proxy_type*; the message names the file and the field.
    """
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ProxyFileError(shown, None, f"cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ProxyFileError(shown, None, f"is not UTF-8 text ({exc.reason})") from None
    try:
        documents = [d for d in yaml.load_all(text, Loader=DocumentLoader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ProxyFileError(shown, None, f"is not valid YAML: {problem}{where}") from None
    if len(documents) != 1:
        found = "nothing" if not documents else f"{len(documents)} documents"
        raise ProxyFileError(shown, None, f"must hold exactly one proxy resource, found {found}")
    try:
        key, _, _ = read_proxy_document(
            documents[0], proxy_type, catalog=catalog, mesh=mesh, name=name
        )
    except ValidationError as exc:
        raise ProxyFileError(shown, exc.field, exc.reason) from None
    document = dict(documents[0])
    document["name"] = key.name
    if key.mesh is not None:
        document["mesh"] = key.mesh
    return document


def check_proxy_spec(resource_type: str, spec: Mapping[str, Any]) -> None:
    """Check that *spec* describes a proxy of *resource_type*, as Kuma's validators do.

    ZoneIngress: ``networking.address`` and ``networking.port`` are required,
    ``advertisedAddress`` and ``advertisedPort`` go together. ZoneEgress:
    ``networking.address`` and ``networking.port``. Dataplane: ``networking.address``
    and at least one inbound (each with a port and a ``kuma.io/service`` tag) or a
    gateway. Unknown fields are refused (with a suggestion for a misspelt one).

    Raises:
        ValidationError: naming the field as the document spells it
            (``networking.inbound[0].tags``).
    """
    if resource_type == "ZoneIngress":
        _known(spec, "", {"networking", "availableServices", "zone"})
        networking = _networking(spec)
        _known(
            networking,
            "networking",
            {"address", "port", "advertisedAddress", "advertisedPort", "admin"},
        )
        _address(networking, "networking.address", required=True)
        _port(networking, "networking.port", required=True)
        advertised_address = _address(networking, "networking.advertisedAddress")
        advertised_port = _port(networking, "networking.advertisedPort")
        if (advertised_address is None) != (advertised_port is None):
            missing = "advertisedPort" if advertised_port is None else "advertisedAddress"
            raise ValidationError(
                f"networking.{missing}",
                "is required with "
                + ("advertisedAddress" if missing == "advertisedPort" else "advertisedPort"),
            )
        _admin(networking)
        _optional_list(spec, "availableServices")
        _text(spec, "zone")
    elif resource_type == "ZoneEgress":
        _known(spec, "", {"networking", "zone"})
        networking = _networking(spec)
        _known(networking, "networking", {"address", "port", "admin"})
        _address(networking, "networking.address", required=True)
        _port(networking, "networking.port", required=True)
        _admin(networking)
        _text(spec, "zone")
    elif resource_type == "Dataplane":
        _check_dataplane(spec)
    else:
        raise ValidationError("type", f"{resource_type!r} is not a proxy type")


def _check_dataplane(spec: Mapping[str, Any]) -> None:
    _known(spec, "", {"networking", "metrics", "probes"})
    networking = _networking(spec)
    _known(
        networking,
        "networking",
        {
            "address",
            "advertisedAddress",
            "inbound",
            "outbound",
            "gateway",
            "transparentProxying",
            "admin",
        },
    )
    _address(networking, "networking.address", required=True)
    _address(networking, "networking.advertisedAddress")
    _admin(networking)
    inbound = _optional_list(networking, "inbound", prefix="networking")
    for index, item in enumerate(inbound):
        field = f"networking.inbound[{index}]"
        if not isinstance(item, Mapping):
            raise ValidationError(field, f"must be an object, got {_kind(item)}")
        _known(
            item,
            field,
            {
                "port",
                "servicePort",
                "serviceAddress",
                "address",
                "tags",
                "health",
                "serviceProbe",
                "state",
                "name",
            },
        )
        _port(item, f"{field}.port", required=True)
        _port(item, f"{field}.servicePort")
        _address(item, f"{field}.serviceAddress")
        _address(item, f"{field}.address")
        _tags(item, f"{field}.tags", service_required=True)
    for index, item in enumerate(_optional_list(networking, "outbound", prefix="networking")):
        field = f"networking.outbound[{index}]"
        if not isinstance(item, Mapping):
            raise ValidationError(field, f"must be an object, got {_kind(item)}")
        _known(item, field, {"port", "address", "tags", "backendRef"})
        _port(item, f"{field}.port", required=True)
        _address(item, f"{field}.address")
        _tags(item, f"{field}.tags", service_required=False)
    gateway = _mapping(networking, "gateway", prefix="networking")
    if gateway is not None:
        _known(gateway, "networking.gateway", {"tags", "type"})
        _tags(gateway, "networking.gateway.tags", service_required=True)
        _text(gateway, "type", prefix="networking.gateway")
    if not inbound and gateway is None:
        raise ValidationError(
            "networking", "needs at least one inbound (networking.inbound) or a gateway"
        )


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if isinstance(value, Mapping):
        return "an object"
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _known(values: Mapping[str, Any], prefix: str, known: set[str]) -> None:
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValidationError(_join(prefix, name), f"unknown field{hint}")


def _mapping(values: Mapping[str, Any], name: str, *, prefix: str = "") -> Mapping[str, Any] | None:
    field = _join(prefix, name)
    value = values.get(name)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be an object, got {_kind(value)}")
    return cast("Mapping[str, Any]", value)


def _networking(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    networking = _mapping(spec, "networking")
    if networking is None:
        raise ValidationError("networking", "is required")
    return networking


def _optional_list(values: Mapping[str, Any], name: str, *, prefix: str = "") -> list[Any]:
    value = values.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError(_join(prefix, name), f"must be a list, got {_kind(value)}")
    return value


def _text(values: Mapping[str, Any], name: str, *, prefix: str = "") -> str | None:
    value = values.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValidationError(
            _join(prefix, name), f"must be a non-empty string, got {_kind(value)}"
        )
    return value


def _address(values: Mapping[str, Any], field: str, *, required: bool = False) -> str | None:
    name = field.rpartition(".")[2]
    value = values.get(name)
    if value is None:
        if required:
            raise ValidationError(field, "is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, f"must be an IP address or a host name, got {_kind(value)}")
    if any(c.isspace() for c in value) or "/" in value:
        raise ValidationError(field, f"must be an IP address or a host name, got {value!r}")
    return value


def _port(values: Mapping[str, Any], field: str, *, required: bool = False) -> int | None:
    name = field.rpartition(".")[2]
    value = values.get(name)
    if value is None:
        if required:
            raise ValidationError(field, "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be a port number (an integer), got {_kind(value)}")
    if not 1 <= value <= _MAX_PORT:
        raise ValidationError(field, f"must be between 1 and {_MAX_PORT}, got {value}")
    return value


def _admin(networking: Mapping[str, Any]) -> None:
    admin = _mapping(networking, "admin", prefix="networking")
    if admin is not None:
        _known(admin, "networking.admin", {"port"})
        _port(admin, "networking.admin.port")


def _tags(values: Mapping[str, Any], field: str, *, service_required: bool) -> None:
    tags = values.get("tags")
    if tags is None:
        if service_required:
            raise ValidationError(field, f"is required, with a {_SERVICE_TAG!r} tag")
        return
    if not isinstance(tags, Mapping):
        raise ValidationError(field, f"must be an object, got {_kind(tags)}")
    for tag, value in tags.items():
        if not isinstance(value, str) or not value:
            raise ValidationError(
                f"{field}[{json.dumps(tag)}]", f"must be a non-empty string, got {_kind(value)}"
            )
    if service_required and _SERVICE_TAG not in tags:
        raise ValidationError(field, f"must have a {_SERVICE_TAG!r} tag")


# -- talking to the dataplane server ---------------------------------------------------


class DataplaneError(KdsError):
    """Base of the errors talking to a dataplane server raises."""


class ControlPlaneUnavailable(DataplaneError, ConnectionError):
    """Raised when the dataplane server cannot be reached or cannot serve now; retry later.

    Attributes:
        address: the server's address.
        cause: why, in words (``connection refused``, ``HTTP 503: the store is unavailable``).
    """

    def __init__(self, address: str, cause: str) -> None:
        super().__init__(f"cannot reach the control plane at {address}: {cause}")
        self.address = address
        self.cause = cause


class ControlPlaneUntrusted(DataplaneError):
    """Raised when the server's TLS certificate is not trusted; retrying cannot help.

    The client needs the CA certificate that signed it (``ca_file``); a control
    plane's generated certificate is its own CA (``<workDir>/kds-cp.crt``).

    Attributes:
        address: the server's address.
        cause: the verification failure (``self-signed certificate``, ...).
    """

    def __init__(self, address: str, cause: str) -> None:
        super().__init__(
            f"cannot verify the certificate of the control plane at {address}: {cause}"
        )
        self.address = address
        self.cause = cause


class ProxyRefused(DataplaneError):
    """Raised when the server refuses the proxy: its token, its resource, or a rival.

    Retrying the same request cannot succeed; the message is the server's reason.

    Attributes:
        status: the HTTP status (400, 401, 403, 409, 413).
        reason: the server's reason.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class SubscriptionEnded(DataplaneError):
    """Raised when a heartbeat names a subscription the server no longer keeps open.

    It expired (no heartbeat within the server's timeout) or is unknown (the proxy
    or its insight was deleted): the proxy must register again.

    Attributes:
        reason: the server's reason.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class Registration:
    """What the server answered a registration.

    Attributes:
        subscription: the id of the proxy's new subscription (heartbeats name it).
        heartbeat_interval: how often the server wants heartbeats, in seconds.
    """

    subscription: str
    heartbeat_interval: float


class DataplaneClient:
    """A connection pool to one dataplane server; agents share it.

    Use it as an async context manager, or call :meth:`aclose`.

    Args:
        address: the server's base URL, ``https://host:5678``.
        ca_file: PEM file of the CA certificates to trust (for a control plane's
            generated certificate: that certificate, ``<workDir>/kds-cp.crt``);
            the system's CAs when not given.
        timeout: seconds to wait for a connection and for each answer.
        max_connections: connections the pool may open at once.

    Raises:
        ValidationError: (field ``address``) *address* is not an ``https://`` URL.
        ConfigError: *ca_file* cannot be read or holds no certificate.
    """

    def __init__(
        self,
        address: str,
        *,
        ca_file: str | PathLike[str] | None = None,
        timeout: float = 10.0,
        max_connections: int = 100,
    ) -> None:
        url = urlsplit(address)
        try:
            url.port  # noqa: B018 -- raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ValidationError("address", f"{address!r}: {exc}") from None
        if url.scheme != "https" or not url.hostname or url.path.strip("/"):
            raise ValidationError(
                "address",
                f"must be the https:// URL of a zone control plane's dataplane server "
                f"(https://host:{DEFAULT_PORT}), got {address!r}",
            )
        self.address = address.rstrip("/")
        context = ssl.create_default_context()
        if ca_file is not None:
            try:
                context.load_verify_locations(cafile=ca_file)
            except ssl.SSLError as exc:  # before OSError: it is one
                raise ConfigError(
                    f"CA certificate file {ca_file}: holds no PEM certificate ({exc.reason})"
                ) from None
            except OSError as exc:
                raise ConfigError(
                    f"CA certificate file {ca_file}: cannot read it: {exc.strerror or exc}"
                ) from None
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.address,
            verify=context,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
            headers={"Accept": "application/json", "User-Agent": f"kds-dp/{kds.__version__}"},
        )

    def __repr__(self) -> str:
        return f"DataplaneClient({self.address!r})"

    async def aclose(self) -> None:
        """Close the pool's connections."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def register(
        self, proxy_type: ProxyType, document: Mapping[str, Any], token: str
    ) -> Registration:
        """Register (create or update) a proxy and open a new subscription for it.

        Raises:
            ControlPlaneUnavailable: no answer, or the server cannot serve now; retry.
            ControlPlaneUntrusted: the server's certificate is not trusted.
            ProxyRefused: the token or the resource was refused.
        """
        body = await self._post(
            "/v1/proxies",
            {
                "proxyType": proxy_type,
                "resource": dict(document),
                "token": token,
                "version": kds.__version__,
            },
        )
        subscription = body.get("subscription")
        interval = body.get("heartbeatInterval")
        if not isinstance(subscription, str) or not isinstance(interval, int | float):
            raise ControlPlaneUnavailable(
                self.address, "the answer to a registration has no subscription"
            )
        return Registration(subscription, float(interval))

    async def heartbeat(
        self, proxy_type: ProxyType, key: ResourceKey, subscription: str, token: str
    ) -> None:
        """Tell the server the proxy's subscription is alive.

        Raises:
            SubscriptionEnded: the subscription expired or is unknown: register again.
            ControlPlaneUnavailable: no answer, or the server cannot serve now; retry.
            ControlPlaneUntrusted: the server's certificate is not trusted.
            ProxyRefused: the token was refused, or another registration of the same
                proxy superseded this one (409).
        """
        await self._post("/v1/proxies/heartbeat", _reference(proxy_type, key, subscription, token))

    async def goodbye(
        self, proxy_type: ProxyType, key: ResourceKey, subscription: str, token: str
    ) -> None:
        """Close the proxy's subscription: it shows offline at once.

        Raises:
            SubscriptionEnded: the subscription is unknown.
            ControlPlaneUnavailable: no answer, or the server cannot serve now.
            ControlPlaneUntrusted: the server's certificate is not trusted.
            ProxyRefused: the token was refused.
        """
        await self._post("/v1/proxies/goodbye", _reference(proxy_type, key, subscription, token))

    async def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            response = await self._http.post(path, json=body)
        except httpx.TimeoutException as exc:
            raise ControlPlaneUnavailable(
                self.address, f"no answer within {self._timeout:g}s ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            untrusted = _verification_failure(exc)
            if untrusted is not None:
                raise ControlPlaneUntrusted(self.address, untrusted) from exc
            raise ControlPlaneUnavailable(self.address, _describe(exc)) from exc
        status = response.status_code
        if status == httpx.codes.OK:
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise ControlPlaneUnavailable(
                    self.address, f"POST {path} did not answer a JSON object"
                )
            return answer
        reason = _reason(response)
        if status in (httpx.codes.NOT_FOUND, httpx.codes.GONE):
            raise SubscriptionEnded(reason)
        if status in (400, 401, 403, 409, 413):
            raise ProxyRefused(status, reason)
        raise ControlPlaneUnavailable(self.address, f"HTTP {status}: {reason}")


def _reference(
    proxy_type: ProxyType, key: ResourceKey, subscription: str, token: str
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "proxyType": proxy_type,
        "name": key.name,
        "subscription": subscription,
        "token": token,
    }
    if key.mesh is not None:
        body["mesh"] = key.mesh
    return body


def _reason(response: httpx.Response) -> str:
    """The reason an error answer gives: the error document's detail, or the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"]:
        return " ".join(str(body["detail"]).split())
    text = " ".join(response.text.split())[:_SNIPPET]
    return text or response.reason_phrase or f"HTTP {response.status_code}"


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _verification_failure(error: BaseException) -> str | None:
    for cause in _chain(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or str(cause)
            return str(reason).rstrip(".")
    return None


def _describe(error: httpx.TransportError) -> str:
    """Why a request got no answer, in words (never the request: it holds the token)."""
    for cause in _chain(error):
        if isinstance(cause, ssl.SSLError):
            reason = str(cause.reason or cause)
            if "WRONG_VERSION_NUMBER" in reason:
                reason += " (is the server speaking HTTPS?)"
            return f"TLS handshake failed: {reason}"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host name ({cause.strerror or cause})"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[0].lower() + cause.strerror[1:]
    if isinstance(error, httpx.RemoteProtocolError):
        return f"the server broke the HTTP exchange: {error}"
    return type(error).__name__


# -- one proxy ---------------------------------------------------------------------------


class ProxyAgent:
    """Registers one proxy with a dataplane server and keeps it alive until cancelled.

    :meth:`run` registers the proxy (retrying while the server is unavailable),
    then heartbeats it. A heartbeat that finds the subscription ended (it expired
    while the server was unreachable) registers the proxy again. When :meth:`run`
    is cancelled it says goodbye, so the proxy shows offline at once.

    Retries use exponential backoff with jitter, from *retry_base* up to
    *retry_max* seconds, and log one warning per attempt.

    Args:
        client: the connection pool to the dataplane server.
        proxy_type: ``ingress``, ``egress`` or ``dataplane``.
        document: the proxy resource (as :func:`load_proxy_file` returns it).
        token: a zone token with the proxy type's scope (ingress, egress), or a
            dataplane token for the Dataplane's mesh.
        heartbeat_interval: seconds between heartbeats; the server's advice when
            not given (a third of its timeout).
        retry_base: the first retry delay, in seconds.
        retry_max: the longest retry delay, in seconds.
        goodbye_timeout: how long the goodbye may take when cancelled, in seconds.
        catalog: the known types, to check *document*.

    Raises:
        ValidationError: *document* is not a valid proxy of *proxy_type*, or a
            number is not positive.
    """

    def __init__(
        self,
        client: DataplaneClient,
        *,
        proxy_type: ProxyType,
        document: Mapping[str, Any],
        token: str,
        heartbeat_interval: float | None = None,
        retry_base: float = 0.5,
        retry_max: float = 30.0,
        goodbye_timeout: float = 5.0,
        catalog: Catalog = DEFAULT_CATALOG,
    ) -> None:
        self.key, _, _ = read_proxy_document(document, proxy_type, catalog=catalog)
        for field, value in (
            ("heartbeat_interval", heartbeat_interval),
            ("retry_base", retry_base),
            ("retry_max", retry_max),
            ("goodbye_timeout", goodbye_timeout),
        ):
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValidationError(field, f"must be a positive number of seconds, got {value}")
        if not token.strip():
            raise ValidationError("token", "is empty")
        self.client = client
        self.proxy_type: ProxyType = proxy_kind(proxy_type).proxy_type
        self.document = dict(document)
        self._token = token.strip()
        self._heartbeat_interval = heartbeat_interval
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._goodbye_timeout = goodbye_timeout
        self.subscription: str | None = None
        """The open subscription's id, while registered."""
        self.registrations = 0
        """Successful registrations so far (more than one after the server lost track)."""
        self.heartbeats = 0
        """Heartbeats the server accepted so far."""

    def __repr__(self) -> str:
        return f"<ProxyAgent {self.label} at {self.client.address}>"

    @property
    def label(self) -> str:
        """How logs name the proxy: ``ZoneIngress 'ingress-1'``."""
        where = f" in mesh {self.key.mesh!r}" if self.key.mesh is not None else ""
        return f"{self.key.type} {self.key.name!r}{where}"

    async def run(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Register, then heartbeat until cancelled; say goodbye when cancelled.

        Reports the subscription id through *task_status* once registered.

        Raises:
            ProxyRefused: the server refused the token or the resource (or another
                registration of the same proxy superseded this one).
            ControlPlaneUntrusted: the server's certificate is not trusted.
        """
        registration = await self._register()
        task_status.started(registration.subscription)
        refused = False
        try:
            await self._heartbeat_forever(registration)
        except (ProxyRefused, ControlPlaneUntrusted):
            refused = True
            raise
        finally:
            if not refused:
                with anyio.CancelScope(shield=True):
                    await self._goodbye()

    async def _register(self) -> Registration:
        failures = 0
        while True:
            try:
                registration = await self.client.register(
                    self.proxy_type, self.document, self._token
                )
            except ControlPlaneUnavailable as exc:
                failures += 1
                await self._pause(exc, failures)
                continue
            self.subscription = registration.subscription
            self.registrations += 1
            logger.info(
                "%s registered with %s (subscription %s)",
                self.label,
                self.client.address,
                registration.subscription,
            )
            return registration

    async def _heartbeat_forever(self, registration: Registration) -> None:
        interval = self._heartbeat_interval or registration.heartbeat_interval
        failures = 0
        while True:
            await anyio.sleep(interval if failures == 0 else 0)
            subscription = registration.subscription
            try:
                await self.client.heartbeat(self.proxy_type, self.key, subscription, self._token)
            except ControlPlaneUnavailable as exc:
                failures += 1
                await self._pause(exc, failures)
                continue
            except SubscriptionEnded as exc:
                logger.warning("%s: %s; registering again", self.label, exc.reason)
                self.subscription = None
                registration = await self._register()
                interval = self._heartbeat_interval or registration.heartbeat_interval
                failures = 0
                continue
            if failures:
                logger.info("%s: the control plane answers again", self.label)
            failures = 0
            self.heartbeats += 1

    async def _pause(self, error: ControlPlaneUnavailable, failures: int) -> None:
        delay = self._backoff(failures)
        logger.warning("%s: %s; retrying in %.1fs (attempt %d)", self.label, error, delay, failures)
        await anyio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        """Exponential, capped, with jitter so that many proxies do not retry in step."""
        delay = min(self._retry_max, self._retry_base * float(2 ** min(failures - 1, 30)))
        return delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 -- jitter, not secrets

    async def _goodbye(self) -> None:
        subscription = self.subscription
        if subscription is None:
            return
        with anyio.move_on_after(self._goodbye_timeout) as scope:
            try:
                await self.client.goodbye(self.proxy_type, self.key, subscription, self._token)
            except DataplaneError as exc:
                logger.warning("%s: goodbye failed: %s", self.label, exc)
                return
        if scope.cancelled_caught:
            logger.warning(
                "%s: the control plane did not answer the goodbye within %gs",
                self.label,
                self._goodbye_timeout,
            )
            return
        self.subscription = None
        logger.info("%s: said goodbye (subscription %s)", self.label, subscription)
