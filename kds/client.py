"""A synchronous client of a kds control plane's HTTP API (the API kdsctl uses).

:class:`ControlPlaneClient` speaks to one control plane (global or zone) at an
``http://`` or ``https://`` address. It learns the control plane's resource types
from ``GET /_resources``, so application-defined types work like the built-in ones,
and it accepts a type by its URL path (``meshtimeouts``), the singular of the path
(``meshtimeout``) or its name in any case (``MeshTimeout``).

Failures are two kinds of error, both one line when printed:

- :class:`ControlPlaneUnreachable`: no HTTP answer (connection refused, TLS
  verification failed, timeout, ...); it names the address and the cause;
- :class:`ApiError`: the control plane answered with an error; it carries the
  status, title, detail and the invalid parameters of the API's error document.

>>> with ControlPlaneClient("http://127.0.0.1:5681") as client:  # doctest: +SKIP
...     client.put({"type": "Mesh", "name": "default"})
...     client.get("meshes", "default")
"""

from __future__ import annotations

import difflib
import socket
import ssl
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Self
from urllib.parse import parse_qs, quote, urlsplit

import attrs
import httpx

from kds.errors import KdsError, ValidationError
from kds.resource import Catalog, ResourceType, Scope

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from types import TracebackType

__all__ = [
    "DEFAULT_ADDRESS",
    "ApiError",
    "ApiResourceType",
    "ControlPlaneClient",
    "ControlPlaneUnreachable",
    "InvalidParameter",
    "PutResult",
    "ResourceList",
    "UnknownResourceTypeError",
]

DEFAULT_ADDRESS: Final = "http://127.0.0.1:5681"
"""Where a control plane's API listens unless configured otherwise."""

_PAGE_SIZE: Final = 1000  # the API's largest page: fewest round trips when reading everything
_SNIPPET: Final = 200  # characters of a non-JSON error body worth showing


class InvalidParameter(NamedTuple):
    """One entry of an API error's ``invalid_parameters``."""

    field: str
    """The offending field (``spec.mtls``, ``name``, ``labels["kuma.io/origin"]``)."""
    reason: str
    """What is wrong with it."""


class ApiError(KdsError):
    """Raised when the control plane answers a request with an error status.

    ``str()`` is one line: the title, the detail and each invalid parameter.

    Attributes:
        status: the HTTP status (400, 403, 404, 405, 409, 503, ...).
        title: the error document's title (``Not found``, ``Bad Request``, ...).
        detail: the error document's detail; may be empty.
        invalid_parameters: the fields the control plane rejected, with reasons.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        invalid_parameters: tuple[InvalidParameter, ...] = (),
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.invalid_parameters = invalid_parameters
        message = title or f"HTTP {status}"
        if detail and detail != title:
            message = f"{message}: {detail}"
        # Servers often repeat a single invalid parameter in the detail: say it once.
        fields = [f"{p.field}: {p.reason}" for p in invalid_parameters]
        fields = [field for field in fields if field not in message]
        if fields:
            message = f"{message} ({'; '.join(fields)})"
        super().__init__(" ".join(message.split()))  # one line, whatever the server sent

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """Build the error from a response: the API's error document, or what it sent instead."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not ("title" in body or "detail" in body):
            # Not the API's error document (a proxy in between, or not a kds API at all).
            text = " ".join(response.text.split())[:_SNIPPET]
            return cls(response.status_code, response.reason_phrase, text)
        parameters = tuple(
            InvalidParameter(str(item.get("field", "")), str(item.get("reason", "")))
            for item in body.get("invalid_parameters") or ()
            if isinstance(item, dict)
        )
        return cls(
            response.status_code,
            str(body.get("title") or response.reason_phrase),
            str(body.get("detail") or ""),
            parameters,
        )


class ControlPlaneUnreachable(KdsError, ConnectionError):
    """Raised when the control plane gives no HTTP answer at all.

    Attributes:
        address: the control plane's address.
        cause: why, in words (``connection refused``, ``TLS verification failed: ...``).
        tls_verification_failed: the server's certificate was not trusted: a CA
            certificate file, or skipping verification, would let the client in.
    """

    def __init__(self, address: str, cause: str, *, tls_verification_failed: bool = False) -> None:
        super().__init__(f"cannot reach the control plane at {address}: {cause}")
        self.address = address
        self.cause = cause
        self.tls_verification_failed = tls_verification_failed


class UnknownResourceTypeError(KdsError, LookupError):
    """Raised when a name given for a resource type matches none of the control plane's.

    Attributes:
        word: the name as given.
    """

    def __init__(self, word: str, suggestion: str | None = None) -> None:
        hint = f": did you mean {suggestion!r}?" if suggestion else ""
        super().__init__(f"unknown resource type {word!r}{hint}")
        self.word = word


@attrs.frozen
class ApiResourceType:
    """A resource type as the control plane describes it in ``GET /_resources``.

    Attributes:
        name: the type's name (``MeshTimeout``).
        path: its URL path segment (``meshtimeouts``).
        mesh_scoped: whether its resources live in a mesh.
        read_only: whether this control plane refuses writes of it.
        flat_spec: whether documents carry the spec's fields at the top level.
    """

    name: str
    path: str
    mesh_scoped: bool
    read_only: bool
    flat_spec: bool

    def url(self, name: str | None = None, mesh: str | None = None) -> str:
        """The API path of this type's list (*name* ``None``) or of one resource.

        With *mesh*, the list of that mesh or a resource in it; without, for a
        mesh-scoped type, the list across every mesh.

        Raises:
            ValidationError: *mesh* given for a global-scoped type, or missing where
                a mesh-scoped resource is named.
        """
        if mesh is not None and not self.mesh_scoped:
            raise ValidationError("mesh", f"{self.name} is global-scoped: it has no mesh")
        if name is not None and mesh is None and self.mesh_scoped:
            raise ValidationError("mesh", f"{self.name} is mesh-scoped: a mesh is required")
        parts = [f"/meshes/{_segment(mesh)}" if mesh is not None else "", f"/{self.path}"]
        if name is not None:
            parts.append(f"/{_segment(name)}")
        return "".join(parts)

    def matches(self, word: str) -> bool:
        """Whether *word* names this type: its path, the path's singular or its name."""
        lowered = word.lower()
        return lowered in (self.path, self.name.lower()) or self.path in (
            f"{lowered}s",
            f"{lowered}es",
        )


@attrs.frozen
class ResourceList:
    """A list answer: ``total`` resources exist, ``items`` holds those read.

    Attributes:
        total: how many the control plane holds.
        items: the documents read (all of them unless one page was asked for).
        next: where the next page is, when only one page was read and more exist.
    """

    total: int
    items: list[dict[str, Any]]
    next: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The list as the API shows it: ``{"total", "items", "next"}``."""
        return {"total": self.total, "items": self.items, "next": self.next}


@attrs.frozen
class PutResult:
    """What a ``PUT`` did.

    Attributes:
        created: True when the resource did not exist before (201), False when updated.
        warnings: warnings the control plane returned.
    """

    created: bool
    warnings: tuple[str, ...] = ()


def _segment(value: str) -> str:
    return quote(value, safe="")


def _duration(value: str | timedelta) -> str:
    """A validity as the API takes it: a duration text (``720h``)."""
    if isinstance(value, timedelta):
        return f"{int(value.total_seconds())}s"
    return value


class ControlPlaneClient:
    """A client of one control plane's HTTP API.

    Args:
        address: the API's base URL, ``http://host:5681`` or ``https://host:5682``.
        token: sent as ``Authorization: Bearer <token>`` (writes from other hosts
            need the control plane's admin token).
        ca_file: PEM file of the CA that signed an ``https`` control plane's certificate.
        skip_verify: accept any certificate (for self-signed certificates on trusted
            networks only).
        timeout: seconds to wait for a connection and for each answer.

    Raises:
        ValidationError: *address* is not an ``http://`` or ``https://`` URL, or
            *token* is not one line of printable ASCII without spaces.
        OSError: *ca_file* cannot be read.
        ssl.SSLError: *ca_file* holds no usable certificate.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        ca_file: str | None = None,
        skip_verify: bool = False,
        timeout: float = 10.0,
    ) -> None:
        url = urlsplit(address)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValidationError(
                "address", f"{address!r} is not an http:// or https:// URL of a control plane"
            )
        try:
            url.port  # noqa: B018 -- raises ValueError for a port that is not a number
        except ValueError as error:
            raise ValidationError("address", f"{address!r}: {error}") from None
        self.address = address.rstrip("/")
        verify: ssl.SSLContext | bool = True
        if skip_verify:
            verify = False
        elif ca_file is not None:
            verify = ssl.create_default_context(cafile=ca_file)
        headers = {"Accept": "application/json"}
        if token:
            # Checked here, not by httpx: its error would quote the header, token and all.
            if not (token.isascii() and token.isprintable()) or " " in token:
                raise ValidationError(
                    "token", "must be one line of printable ASCII characters without spaces"
                )
            headers["Authorization"] = f"Bearer {token}"
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=self.address, headers=headers, verify=verify, timeout=timeout
        )
        self._types: list[ApiResourceType] | None = None

    def __repr__(self) -> str:
        return f"ControlPlaneClient({self.address!r})"

    def close(self) -> None:
        """Close the client's connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the API ------------------------------------------------------------------------

    def index(self) -> dict[str, Any]:
        """``GET /``: product, version, instance id, mode, zone and cluster id.

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer, or one that is not a JSON object.
        """
        body = self._request("GET", "/")
        if not isinstance(body, dict):
            raise ApiError(200, "Unexpected answer", f"GET / returned {type(body).__name__}")
        return body

    def resource_types(self) -> list[ApiResourceType]:
        """The control plane's resource types (``GET /_resources``), read once and kept.

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer.
        """
        if self._types is None:
            body = self._request("GET", "/_resources")
            entries = body.get("resources") if isinstance(body, dict) else None
            if not isinstance(entries, list):
                raise ApiError(200, "Unexpected answer", "GET /_resources has no resources list")
            self._types = [
                ApiResourceType(
                    name=str(entry["name"]),
                    path=str(entry["path"]),
                    mesh_scoped=entry.get("scope") == "Mesh",
                    read_only=bool(entry.get("readOnly", False)),
                    flat_spec=bool(entry.get("flatSpec", False)),
                )
                for entry in entries
                if isinstance(entry, dict) and "name" in entry and "path" in entry
            ]
        return list(self._types)

    def resource_type(self, word: str) -> ApiResourceType:
        """The type *word* names: its path, the path's singular, or its name in any case.

        Raises:
            UnknownResourceTypeError: no type matches (the message suggests a close one).
            ControlPlaneUnreachable: no answer to ``GET /_resources``.
            ApiError: an error answer to it.
        """
        types = self.resource_types()
        for resource_type in types:
            if resource_type.matches(word):
                return resource_type
        paths = [t.path for t in types]
        close = difflib.get_close_matches(word.lower(), paths, n=1)
        raise UnknownResourceTypeError(word, close[0] if close else None)

    def catalog(self) -> Catalog:
        """The control plane's types as a :class:`~kds.resource.Catalog` for reading documents.

        The types carry no spec validators: the control plane checks specs itself.
        """
        return Catalog.of(
            ResourceType(
                name=t.name,
                scope=Scope.MESH if t.mesh_scoped else Scope.GLOBAL,
                flat_spec=t.flat_spec,
            )
            for t in self.resource_types()
        )

    def list(
        self,
        type_path: str,
        mesh: str | None = None,
        *,
        size: int | None = None,
        offset: int = 0,
    ) -> ResourceList:
        """List a type's resources: in *mesh*, or across all meshes when it is ``None``.

        Without *size*, reads every page and returns all items; with it, returns
        one page of at most *size* items from *offset*, with ``next`` set when more
        follow.

        Raises:
            UnknownResourceTypeError: *type_path* names no type.
            ValidationError: *mesh* given for a global-scoped type.
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer (a bad *size* or *offset* is a 400).
        """
        return self._list(self.resource_type(type_path).url(mesh=mesh), size, offset)

    def get(self, type_path: str, name: str, mesh: str | None = None) -> dict[str, Any]:
        """One resource's document.

        Raises:
            UnknownResourceTypeError: *type_path* names no type.
            ValidationError: *mesh* is missing for a mesh-scoped type, or given for
                a global-scoped one.
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer; status 404 when the resource does not exist.
        """
        body = self._request("GET", self.resource_type(type_path).url(name, mesh))
        if not isinstance(body, dict):
            raise ApiError(200, "Unexpected answer", f"a resource is {type(body).__name__}")
        return body

    def put(self, document: Mapping[str, Any]) -> PutResult:
        """Create or update the resource *document* describes (its type, mesh and name).

        Raises:
            ValidationError: *document* has no string ``type`` or ``name``, or no
                ``mesh`` for a mesh-scoped type.
            UnknownResourceTypeError: its type is not one of the control plane's.
            ControlPlaneUnreachable: no answer.
            ApiError: the control plane refused it (400 naming the field, 403, 405, 409).
        """
        type_name, name = document.get("type"), document.get("name")
        if not isinstance(type_name, str) or not type_name:
            raise ValidationError("type", "must be a resource type name")
        if not isinstance(name, str) or not name:
            raise ValidationError("name", "must be a non-empty string")
        resource_type = self.resource_type(type_name)
        if resource_type.name != type_name:
            raise UnknownResourceTypeError(type_name, resource_type.name)
        mesh = document.get("mesh")
        if mesh is not None and not isinstance(mesh, str):
            raise ValidationError("mesh", f"must be a string, got {type(mesh).__name__}")
        if not resource_type.mesh_scoped and mesh is not None:
            raise ValidationError("mesh", f"{type_name} is global-scoped: it has no mesh")
        response = self._send("PUT", resource_type.url(name, mesh), json=dict(document))
        body = _json(response) if response.content else {}
        warnings = body.get("warnings") if isinstance(body, dict) else None
        return PutResult(
            created=response.status_code == httpx.codes.CREATED,
            warnings=tuple(str(w) for w in warnings or ()),
        )

    def delete(self, type_path: str, name: str, mesh: str | None = None) -> None:
        """Delete one resource.

        Raises:
            UnknownResourceTypeError: *type_path* names no type.
            ValidationError: *mesh* is missing for a mesh-scoped type, or given for
                a global-scoped one.
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer; status 404 when the resource does not exist.
        """
        self._request("DELETE", self.resource_type(type_path).url(name, mesh))

    def zone_overviews(self) -> ResourceList:
        """Every zone with its ZoneInsight and ``online`` (``GET /zones/_overview``).

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer.
        """
        return self._list("/zones/_overview", None, 0)

    def zone_ingress_overviews(self) -> ResourceList:
        """Every ZoneIngress with its insight and ``online`` (``GET /zoneingresses/_overview``).

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer.
        """
        return self._list("/zoneingresses/_overview", None, 0)

    def zone_egress_overviews(self) -> ResourceList:
        """Every ZoneEgress with its insight and ``online`` (``GET /zoneegresses/_overview``).

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer.
        """
        return self._list("/zoneegresses/_overview", None, 0)

    def service_insights(self, mesh: str | None = None) -> ResourceList:
        """The ``all-services-<mesh>`` ServiceInsight of *mesh*, or of every mesh.

        A zone holds the global's ServiceInsights under hash-suffix names with the
        original in ``kuma.io/display-name``; both forms are found. Empty when the
        control plane has none yet (or the mesh does not exist).

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer.
        """
        # Imported here: kds.insights brings the store machinery, which few commands need.
        from kds.insights import is_service_insight_of

        found = []
        for item in self.list("service-insights", mesh).items:
            name, labels, item_mesh = item.get("name"), item.get("labels"), item.get("mesh")
            if not isinstance(name, str) or not isinstance(item_mesh, str):
                continue
            if is_service_insight_of(name, labels if isinstance(labels, dict) else {}, item_mesh):
                found.append(item)
        return ResourceList(len(found), found)

    # -- tokens (the global's API) -------------------------------------------------------

    def generate_zone_token(
        self, zone: str, scopes: Sequence[str], *, valid_for: str | timedelta | None = None
    ) -> str:
        """Have the global issue a zone token (``POST /tokens/zone``); return the token.

        Args:
            zone: the zone it is for.
            scopes: what it allows: ``cp``, ``ingress``, ``egress``.
            valid_for: how long it is valid (``720h``, ``30m``, or a timedelta); the
                control plane's default (720h) when ``None``.

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer (400 naming the bad field; 405 from a zone).
        """
        body: dict[str, Any] = {"zone": zone, "scope": list(scopes)}
        if valid_for is not None:
            body["validFor"] = _duration(valid_for)
        return self._token("/tokens/zone", body)

    def generate_dataplane_token(
        self,
        mesh: str,
        name: str | None = None,
        *,
        valid_for: str | timedelta | None = None,
    ) -> str:
        """Have the global issue a dataplane token (``POST /tokens/dataplane``); return it.

        Args:
            mesh: the mesh whose Dataplanes it may register.
            name: the only Dataplane it may register; any in *mesh* when ``None``.
            valid_for: how long it is valid (``720h``, ``30m``, or a timedelta).

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer (400 naming the bad field; 405 from a zone).
        """
        body: dict[str, Any] = {"mesh": mesh}
        if name is not None:
            body["name"] = name
        if valid_for is not None:
            body["validFor"] = _duration(valid_for)
        return self._token("/tokens/dataplane", body)

    def rotate_signing_key(self) -> int:
        """Create a new zone token signing key on the global; return its serial.

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer (405 from a zone).
        """
        body = self._request("POST", "/tokens/zone/signing-keys")
        serial = body.get("serial") if isinstance(body, dict) else None
        if not isinstance(serial, int) or isinstance(serial, bool):
            raise ApiError(200, "Unexpected answer", "the new signing key's serial is missing")
        return serial

    def remove_signing_key(self, serial: int) -> None:
        """Remove the zone token signing key *serial* on the global.

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer (404: no such key; 409: it is the only one).
        """
        self._request("DELETE", f"/tokens/zone/signing-keys/{serial}")

    def revoke_tokens(self, ids: Sequence[str]) -> None:
        """Revoke zone or dataplane tokens by id (their ``jti`` claims) on the global.

        Raises:
            ControlPlaneUnreachable: no answer.
            ApiError: an error answer (400 naming a bad id).
        """
        self._request("POST", "/tokens/zone/revocations", json={"ids": list(ids)})

    def _token(self, path: str, body: Mapping[str, Any]) -> str:
        response = self._send("POST", path, json=dict(body))
        token = response.text.strip()
        if not token or any(c.isspace() for c in token):
            raise ApiError(200, "Unexpected answer", f"POST {path} did not return a token")
        return token

    # -- plumbing -----------------------------------------------------------------------

    def _list(self, path: str, size: int | None, offset: int) -> ResourceList:
        if size is not None:
            page = self._page(path, size, offset)
            return ResourceList(page.total, page.items, page.next)
        items: list[dict[str, Any]] = []
        total = 0
        for page in self._pages(path, offset):
            items.extend(page.items)
            total = page.total
        return ResourceList(total, items)

    def _pages(self, path: str, offset: int) -> Iterator[ResourceList]:
        seen: set[int] = set()
        while True:
            page = self._page(path, _PAGE_SIZE, offset)
            yield page
            # Follow the offset the server put in "next" rather than its URL: behind a
            # proxy the URL the server built need not be one this client can reach.
            following = _next_offset(page.next)
            if following is None or following in seen or not page.items:
                return
            seen.add(offset)
            offset = following

    def _page(self, path: str, size: int, offset: int) -> ResourceList:
        body = self._request("GET", path, params={"size": size, "offset": offset})
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise ApiError(200, "Unexpected answer", f"GET {path} did not return a list")
        items = [item for item in body["items"] if isinstance(item, dict)]
        total = body.get("total")
        next_url = body.get("next")
        return ResourceList(
            total if isinstance(total, int) else len(items),
            items,
            next_url if isinstance(next_url, str) and next_url else None,
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        return _json(response) if response.content else None

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as error:
            raise ControlPlaneUnreachable(
                self.address, f"no answer within {self._timeout:g}s ({type(error).__name__})"
            ) from error
        except httpx.TransportError as error:
            cause, tls = _describe(error, https=self.address.startswith("https:"))
            raise ControlPlaneUnreachable(
                self.address, cause, tls_verification_failed=tls
            ) from error
        if response.is_error:
            raise ApiError.from_response(response)
        return response


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        text = " ".join(response.text.split())[:_SNIPPET]
        raise ApiError(
            response.status_code,
            "Unexpected answer",
            f"{response.request.method} {response.request.url.path} did not return JSON: {text}",
        ) from None


def _next_offset(next_url: str | None) -> int | None:
    if next_url is None:
        return None
    values = parse_qs(urlsplit(next_url).query).get("offset")
    try:
        return int(values[0]) if values else None
    except ValueError:
        return None


def _describe(error: httpx.TransportError, *, https: bool) -> tuple[str, bool]:
    """Why a request got no answer, in words; and whether TLS verification failed."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    # A plain HTTP request to a TLS listener is reset or answered with garbage.
    plain_to_tls = "" if https else " (is it an https:// address?)"
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or str(cause)
            return f"TLS verification failed: {reason.rstrip('.')}", True
    for cause in chain:
        if isinstance(cause, ssl.SSLError):
            reason = str(cause.reason or cause)
            if "WRONG_VERSION_NUMBER" in reason:
                reason += " (is it an http:// address?)"
            return f"TLS handshake failed: {reason}", False
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused", False
        if isinstance(cause, ConnectionResetError):
            return f"connection reset by the server{plain_to_tls}", False
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host name ({cause.strerror or cause})", False
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[0].lower() + cause.strerror[1:], False
    if isinstance(error, httpx.LocalProtocolError):
        # Not str(error): it may quote a header, and the Authorization header is a secret.
        return "the request could not be sent (a header value is not valid)", False
    if isinstance(error, httpx.RemoteProtocolError):
        return f"the server broke the HTTP exchange: {error}{plain_to_tls}", False
    return str(error) or type(error).__name__, False
