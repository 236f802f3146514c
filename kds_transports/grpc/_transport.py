"""GrpcTransport: kds sessions over gRPC (``grpc.aio``), the default zone-global link.

A session is one bidirectional-streaming call of ``/kds.v1.Sync/Session``, whose
messages are opaque bytes (no protobuf: identity serializers); see
:mod:`kds_transports.grpc._session` for the tiny envelope around each frame.
Every :meth:`GrpcTransport.connect` opens its own channel (one HTTP/2
connection), so a session's keepalive watches exactly its own connection.

Call metadata carries what the zone says about itself:

* ``kds-zone``: the zone's claimed name;
* ``authorization: Bearer <credentials>``: its credentials, when configured;
* ``kds-max-frame-size``: its frame size limit. The global answers with the
  smaller of both limits in its response headers, which is also how the zone
  knows the global accepted the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, final

import anyio
import anyio.to_thread
import attrs
import grpc
import grpc.aio
from cryptography import x509
from cryptography.x509.oid import NameOID

from kds import tls
from kds.errors import ConfigError, ConnectError, TransportError
from kds.transport import DEFAULT_MAX_FRAME_SIZE, PeerInfo, SessionHandler, Transport
from kds_transports.grpc._session import (
    CLOSE_REASON_KEY,
    MAX_REASON_BYTES,
    GrpcSession,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anyio.abc import TaskGroup, TaskStatus

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_PORT",
    "METHOD",
    "Authenticate",
    "GrpcClientOptions",
    "GrpcServerOptions",
    "GrpcTransport",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT: Final = 5685
"""The port a global listens on and zones dial when an address names none."""

DEFAULT_ADDRESS: Final = f"grpcs://0.0.0.0:{DEFAULT_PORT}"
"""Where a global listens by default: every IPv4 interface, TLS."""

SERVICE: Final = "kds.v1.Sync"
METHOD: Final = f"/{SERVICE}/Session"
"""The gRPC method a session is a call of."""

DEFAULT_KEEPALIVE_INTERVAL: Final = 15.0  # seconds between keepalive pings (Kuma's value)
DEFAULT_KEEPALIVE_TIMEOUT: Final = 15.0  # seconds to wait for a ping's answer
DEFAULT_KEEPALIVE_MIN_INTERVAL: Final = 5.0  # seconds; zones may ping the global this often
DEFAULT_CONNECT_TIMEOUT: Final = 10.0  # seconds for connect(), TLS and admission included
DEFAULT_CLOSE_TIMEOUT: Final = 5.0  # seconds aclose() waits to flush before cancelling
DEFAULT_BUFFER_SIZE: Final = 8  # frames queued per direction and session

_SETTLE_TIME: Final = 0.1  # seconds a zone's end of stream waits for a cancellation

ZONE_KEY: Final = "kds-zone"
AUTHORIZATION_KEY: Final = "authorization"
MAX_FRAME_KEY: Final = "kds-max-frame-size"

Authenticate = Callable[[str | None, str | None, str], Awaitable[str]]
"""Checks a zone when it opens a session, before any frame flows (the global side).

Called as ``await authenticate(zone, credentials, peer_address)`` with the zone
name the zone claims (``kds-zone`` metadata) and its credentials (the bearer
token of its ``authorization`` metadata), each ``None`` when absent, and its
network address (``"10.0.0.7:51234"``). Returns the zone's verified identity, which becomes
``session.peer.identity`` (the sync engine then requires the Hello to claim that
name). Raising :class:`PermissionError` refuses the session: its message is
sent to the zone, whose :meth:`GrpcTransport.connect` raises
:class:`~kds.errors.ConnectError` with it. Any other exception refuses too, is
logged, and the zone only learns that the check failed.
"""

_TLS_VERSIONS: Final = ("1.2", "1.3")


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class GrpcClientOptions:
    """How a zone dials the global (ignored when serving).

    Attributes:
        zone: the zone's name, sent as ``kds-zone`` metadata for the global's
            ``authenticate`` hook (the sync protocol's Hello claims it too).
        credentials: a token sent as ``authorization: Bearer <credentials>``.
        ca_file: PEM file of the certificates to trust for ``grpcs://``: the CA
            that signed the global's certificate, or the global's self-signed
            certificate itself. Read on every :meth:`GrpcTransport.connect`, so
            it can be rotated. By default the system's roots are trusted.
        skip_verify: encrypt, but accept whatever certificate the global presents
            (see :class:`GrpcTransport` for how and what it does not protect against).
        server_name: the name to check the global's certificate against when the
            address does not use one of its names (a load balancer's IP, say).
        connect_timeout: seconds :meth:`GrpcTransport.connect` may take, TLS and
            the global's admission checks included.
    """

    zone: str | None = None
    credentials: str | None = attrs.field(default=None, repr=False)
    ca_file: Path | None = attrs.field(default=None, converter=_path)
    skip_verify: bool = False
    server_name: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


@attrs.frozen(kw_only=True)
class GrpcServerOptions:
    """How the global listens (ignored when dialling).

    Attributes:
        work_dir: where a generated certificate is kept (``~/.kds`` by default);
            only used for ``grpcs://`` without ``cert_file``.
        cert_file: PEM certificate chain to serve; with ``key_file``.
        key_file: PEM private key (unencrypted) of ``cert_file``'s certificate.
        extra_names: more names (DNS names or IPs) for a generated certificate,
            such as the load balancer's name zones dial.
        min_tls_version: ``"1.2"`` (the default) or ``"1.3"``; see
            :class:`GrpcTransport` for how each is enforced.
        authenticate: checks each zone's name and credentials before its session
            starts (see :data:`Authenticate`); without it, ``peer.identity`` is
            ``None`` and the sync engine relies on the Hello's claim.
        keepalive_min_interval: seconds; zones may send keepalive pings this
            often while no data flows. gRPC may close the connection of a zone
            that pings more often (``too_many_pings``), so keep it at or below
            the zones' keepalive interval.
    """

    work_dir: Path | None = attrs.field(default=None, converter=_path)
    cert_file: Path | None = attrs.field(default=None, converter=_path)
    key_file: Path | None = attrs.field(default=None, converter=_path)
    extra_names: tuple[str, ...] = attrs.field(default=(), converter=_names)
    min_tls_version: Literal["1.2", "1.3"] = "1.2"
    authenticate: Authenticate | None = None
    keepalive_min_interval: float = DEFAULT_KEEPALIVE_MIN_INTERVAL


@attrs.frozen
class _Target:
    tls: bool
    host: str
    port: int

    @property
    def scheme(self) -> str:
        return "grpcs" if self.tls else "grpc"

    def endpoint(self, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port if port is None else port}"

    def url(self, port: int | None = None) -> str:
        return f"{self.scheme}://{self.endpoint(port)}"


def _parse_address(address: str) -> _Target:
    text = address.strip()
    if "://" not in text:
        text = f"grpcs://{text}"  # TLS unless asked otherwise
    url = urllib.parse.urlsplit(text)
    problem = ""
    if url.scheme not in ("grpc", "grpcs"):
        problem = f"unknown scheme {url.scheme!r}"
    elif not url.hostname:
        problem = "no host"
    elif url.path not in ("", "/") or url.query or url.fragment or url.username:
        problem = "unexpected parts after host:port"
    if not problem:
        try:
            port = url.port
        except ValueError as exc:
            problem = str(exc)
    if problem:
        raise ConfigError(
            f"invalid gRPC address {address!r} ({problem}): use grpcs://host:port for TLS "
            f"or grpc://host:port for plaintext (port {DEFAULT_PORT} when omitted)"
        )
    assert url.hostname is not None  # noqa: S101 -- checked above
    return _Target(url.scheme == "grpcs", url.hostname, DEFAULT_PORT if port is None else port)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")


def _check_metadata_value(name: str, value: str | None) -> None:
    # gRPC only carries printable ASCII in text metadata.
    if value is not None and not (value and value.isascii() and value.isprintable()):
        raise ConfigError(f"{name} must be non-empty printable ASCII")


@final
class GrpcTransport(Transport):
    """Sessions between zones and the global over gRPC: ``grpc://`` or ``grpcs://``.

    Build one with :meth:`client` on a zone and :meth:`server` on the global (the
    constructor takes both option sets, for configuration code). Addresses are
    ``grpcs://host:port`` (TLS, the default when the scheme is left out) or
    ``grpc://host:port`` (plaintext); the port defaults to :data:`DEFAULT_PORT`,
    and a global listening on port 0 gets a free one, which :meth:`serve` reports.

    **TLS on the global.** With ``cert_file``/``key_file`` it serves those. Without
    them it serves a self-signed certificate it generates on first start and keeps
    in ``work_dir`` (:mod:`kds.tls`), reusing it on restart. TLS
    versions: gRPC's TLS stack never negotiates below TLS 1.2, which is therefore
    enforced at the handshake; grpcio (up to at least 1.85) has no setting to
    raise that floor, so ``min_tls_version="1.3"`` is enforced per session
    instead: the handshake completes, then a session that negotiated TLS 1.2 is
    refused before any frame flows, with a message naming the option. (Two grpcio
    peers always negotiate TLS 1.3.) Cipher suites are gRPC's defaults; the
    ``GRPC_SSL_CIPHER_SUITES`` environment variable, read by gRPC at start-up,
    changes the TLS 1.2 ones for the whole process.

    **TLS on the zone.** The global's certificate is verified against
    ``ca_file`` (or the system's roots) and the dialled host name (or
    ``server_name``). grpcio cannot turn verification off, so ``skip_verify``
    first fetches the certificate the global presents (a separate TLS handshake,
    without verification) and then trusts exactly that certificate for the gRPC
    connection, checking it against a name the certificate contains. This
    encrypts, and only talks to the server that presented that certificate, but
    it does not authenticate the global: anyone who can intercept the first
    connection is trusted. Behind a load balancer whose instances each generated
    their own certificate, the two connections may reach different instances and
    fail; ``connect`` then raises :class:`~kds.errors.ConnectError` and the next
    attempt usually succeeds. Give the instances a shared certificate instead.
    An unverifiable certificate without ``skip_verify`` fails :meth:`connect`
    with a :class:`~kds.errors.ConnectError` that names ``ca_file`` and
    ``skip_verify``.

    **Identity.** A zone sends its name and credentials in call metadata; the
    global's ``authenticate`` hook turns them into ``session.peer.identity`` or
    refuses the session (see :data:`Authenticate`). On the zone,
    ``session.peer.identity`` is the name the global's certificate was verified
    for, and ``None`` with ``skip_verify`` or plaintext.

    **Liveness.** Both sides send HTTP/2 keepalive pings every
    ``keepalive_interval`` seconds and drop the connection when one is not
    answered within ``keepalive_timeout``: a killed, frozen or unreachable peer
    ends the session with :class:`~kds.errors.SessionClosedError` (``by_peer``,
    reason ``"connection lost: ..."``) within about their sum. A stream that
    ends cleanly without this transport's close message (a proxy or load
    balancer dropping it) ends the session the same way, with a reason saying so.

    Args:
        address: where to dial or listen.
        client: options for :meth:`connect`.
        server: options for :meth:`serve`.
        max_frame_size: the largest frame this side sends or accepts, in bytes; a
            session uses the smaller of both sides' limits.
        keepalive_interval: seconds between keepalive pings.
        keepalive_timeout: seconds to wait for a ping's answer.
        close_timeout: seconds :meth:`GrpcSession.aclose` waits for frames still
            queued to be flushed before it cancels the call.
        buffer_size: frames queued per direction and session before ``send``
            waits (gRPC's flow-control window buffers some more).

    Raises:
        ConfigError: an option is invalid or contradicts another; the message
            names it.
    """

    def __init__(
        self,
        address: str,
        *,
        client: GrpcClientOptions | None = None,
        server: GrpcServerOptions | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ) -> None:
        self._target = _parse_address(address)
        self._client = client or GrpcClientOptions()
        self._server = server or GrpcServerOptions()
        if max_frame_size < 1:
            raise ConfigError(f"max_frame_size must be >= 1, got {max_frame_size}")
        if buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {buffer_size}")
        _check_positive(
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            close_timeout=close_timeout,
        )
        self._max_frame_size = max_frame_size
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._close_timeout = close_timeout
        self._buffer_size = buffer_size
        self._check_client_options()
        self._check_server_options()
        self._serving = False

    @classmethod
    def client(
        cls,
        address: str,
        *,
        zone: str | None = None,
        credentials: str | None = None,
        ca_file: str | Path | None = None,
        skip_verify: bool = False,
        server_name: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ) -> GrpcTransport:
        """A transport for a zone dialling the global at *address*.

        The keyword arguments are those of :class:`GrpcClientOptions` and
        :class:`GrpcTransport`.

        Raises:
            ConfigError: an option is invalid (``ca_file`` together with
                ``skip_verify``, TLS options with a ``grpc://`` address, ...).
        """
        options = GrpcClientOptions(
            zone=zone,
            credentials=credentials,
            ca_file=_path(ca_file),
            skip_verify=skip_verify,
            server_name=server_name,
            connect_timeout=connect_timeout,
        )
        return cls(
            address,
            client=options,
            max_frame_size=max_frame_size,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            close_timeout=close_timeout,
            buffer_size=buffer_size,
        )

    @classmethod
    def server(
        cls,
        address: str = DEFAULT_ADDRESS,
        *,
        work_dir: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        extra_names: Sequence[str] = (),
        min_tls_version: Literal["1.2", "1.3"] = "1.2",
        authenticate: Authenticate | None = None,
        keepalive_min_interval: float = DEFAULT_KEEPALIVE_MIN_INTERVAL,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ) -> GrpcTransport:
        """A transport for the global listening on *address* (``grpcs://0.0.0.0:5685``).

        The keyword arguments are those of :class:`GrpcServerOptions` and
        :class:`GrpcTransport`.

        Raises:
            ConfigError: an option is invalid (``cert_file`` without ``key_file``,
                TLS options with a ``grpc://`` address, ...).
        """
        options = GrpcServerOptions(
            work_dir=_path(work_dir),
            cert_file=_path(cert_file),
            key_file=_path(key_file),
            extra_names=tuple(extra_names),
            min_tls_version=min_tls_version,
            authenticate=authenticate,
            keepalive_min_interval=keepalive_min_interval,
        )
        return cls(
            address,
            server=options,
            max_frame_size=max_frame_size,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            close_timeout=close_timeout,
            buffer_size=buffer_size,
        )

    @property
    def address(self) -> str:
        """The configured address, normalised (``grpcs://host:port``)."""
        return self._target.url()

    @property
    def client_options(self) -> GrpcClientOptions:
        """The options :meth:`connect` uses."""
        return self._client

    @property
    def server_options(self) -> GrpcServerOptions:
        """The options :meth:`serve` uses."""
        return self._server

    @property
    def max_frame_size(self) -> int:
        """The largest frame this side sends or accepts, in bytes."""
        return self._max_frame_size

    def with_zone(self, zone: str | None, *, credentials: str | None = None) -> GrpcTransport:
        """A copy of this transport that dials as *zone*, presenting *credentials*.

        Raises:
            ConfigError: *zone* or *credentials* cannot travel in gRPC metadata.
        """
        view = copy.copy(self)
        view._client = attrs.evolve(self._client, zone=zone, credentials=credentials)
        view._serving = False
        view._check_client_options()
        return view

    def _check_client_options(self) -> None:
        options = self._client
        _check_metadata_value("zone", options.zone)
        _check_metadata_value("credentials", options.credentials)
        _check_positive(connect_timeout=options.connect_timeout)
        if options.ca_file is not None and options.skip_verify:
            raise ConfigError(
                "ca_file and skip_verify exclude each other: verify the global's "
                "certificate with ca_file, or set skip_verify to accept any"
            )
        if not self._target.tls:
            for name in ("ca_file", "server_name"):
                if getattr(options, name) is not None:
                    raise ConfigError(f"{name} needs a grpcs:// address, got {self.address}")
            if options.skip_verify:
                raise ConfigError(f"skip_verify needs a grpcs:// address, got {self.address}")

    def _check_server_options(self) -> None:
        options = self._server
        if (options.cert_file is None) != (options.key_file is None):
            raise ConfigError("cert_file and key_file must be set together")
        if options.min_tls_version not in _TLS_VERSIONS:
            raise ConfigError(
                f"min_tls_version must be one of {', '.join(_TLS_VERSIONS)}, "
                f"got {options.min_tls_version!r}"
            )
        if not options.keepalive_min_interval >= 0:
            raise ConfigError(
                f"keepalive_min_interval must be >= 0, got {options.keepalive_min_interval}"
            )
        if not self._target.tls and (
            options.cert_file is not None or options.min_tls_version != "1.2"
        ):
            raise ConfigError(
                f"cert_file, key_file and min_tls_version need a grpcs:// address, "
                f"got {self.address}"
            )

    # -- zone side ----------------------------------------------------------------------

    async def connect(self) -> GrpcSession:
        """Open a session to the global; see :meth:`kds.Transport.connect`.

        Raises:
            ConnectError: the global is unreachable, the TLS handshake failed (the
                message names ``ca_file``/``skip_verify`` when the certificate could
                not be verified), the global refused the session (the
                ``authenticate`` hook's reason), or it did not answer within
                ``connect_timeout``.
            ConfigError: the address has port 0, or ``ca_file`` cannot be read.
        """
        if self._target.port == 0:
            raise ConfigError(f"cannot connect to {self.address}: port 0 is for listening")
        timeout = self._client.connect_timeout
        channel: grpc.aio.Channel | None = None
        try:
            with anyio.fail_after(timeout):
                channel, verified = await self._open_channel()
                call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(METHOD)(
                    metadata=self._call_metadata(), wait_for_ready=False
                )
                headers = await call.initial_metadata()
                limit = _metadata_value(headers, MAX_FRAME_KEY)
                if limit is None:
                    code, details = await call.code(), await call.details()
                    raise ConnectError(self.address, self._failure(code, details))
        except BaseException as exc:
            if channel is not None:
                with anyio.CancelScope(shield=True):
                    await channel.close()
            if isinstance(exc, TimeoutError):
                raise ConnectError(
                    self.address,
                    f"no answer within {timeout} s (raise connect_timeout if the global is slow)",
                ) from None
            raise
        session = GrpcSession(
            peer=PeerInfo(address=self.address, identity=verified),
            max_frame_size=min(self._max_frame_size, _as_limit(limit, self._max_frame_size)),
            peer_name="the global",
            buffer_size=self._buffer_size,
            close_timeout=self._close_timeout,
            ends_call_on_close=False,
        )
        _start_pump(session._run(_ClientStream(call, channel)))
        return session

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        metadata = [(MAX_FRAME_KEY, str(self._max_frame_size))]
        if self._client.zone is not None:
            metadata.append((ZONE_KEY, self._client.zone))
        if self._client.credentials is not None:
            metadata.append((AUTHORIZATION_KEY, f"Bearer {self._client.credentials}"))
        return tuple(metadata)

    def _common_options(self) -> list[tuple[str, Any]]:
        # Room for the envelope byte and a close reason on top of a full frame.
        message_limit = self._max_frame_size + MAX_REASON_BYTES + 1
        return [
            ("grpc.max_send_message_length", message_limit),
            ("grpc.max_receive_message_length", message_limit),
            ("grpc.keepalive_time_ms", round(self._keepalive_interval * 1000)),
            ("grpc.keepalive_timeout_ms", round(self._keepalive_timeout * 1000)),
            # Any unanswered ping, not only keepalive's, ends the connection in that
            # time: gRPC sends one ping at a time, so a flow-control (BDP) ping that
            # a frozen peer never answers would otherwise hold keepalive back.
            ("grpc.http2.ping_timeout_ms", round(self._keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Keep pinging while no data flows: a quiet session is still watched.
            ("grpc.http2.max_pings_without_data", 0),
        ]

    async def _open_channel(self) -> tuple[grpc.aio.Channel, str | None]:
        target, options = self._target, self._client
        channel_options = [
            *self._common_options(),
            # A connection of its own, not one shared with other channels to the
            # same address: closing or losing it concerns this session only.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 0),
            ("grpc.primary_user_agent", "kds"),
        ]
        if not target.tls:
            return grpc.aio.insecure_channel(target.endpoint(), options=channel_options), None
        name = options.server_name
        roots: bytes | None
        if options.skip_verify:
            roots = await self._fetch_certificate()
            name = name or _name_in_certificate(roots, target.host)
            verified = None
        else:
            roots = self._read_ca_file()
            verified = name or target.host
        if name is not None:
            channel_options.append(("grpc.ssl_target_name_override", name))
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)  # type: ignore[no-untyped-call]
        channel = grpc.aio.secure_channel(target.endpoint(), credentials, options=channel_options)
        return channel, verified

    def _read_ca_file(self) -> bytes | None:
        path = self._client.ca_file
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read ca_file {path}: {exc}") from exc

    async def _fetch_certificate(self) -> bytes:
        host, port = self._target.host, self._target.port
        timeout = self._client.connect_timeout
        try:
            pem = await anyio.to_thread.run_sync(
                lambda: ssl.get_server_certificate((host, port), timeout=timeout),
                abandon_on_cancel=True,
            )
        except (OSError, ValueError) as exc:
            reason = f"cannot fetch the global's certificate (skip_verify): {exc}"
            raise ConnectError(self.address, reason) from exc
        return pem.encode()

    def _failure(self, code: grpc.StatusCode, details: str | None) -> str:
        text = details or "no details"
        lowered = text.lower()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return f"the global refused the session: {text}"
        if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
            how = (
                "its certificate changed since it was fetched (several instances "
                "with different certificates behind one address?)"
                if self._client.skip_verify
                else "set ca_file to the certificate of the CA that signed it (for a "
                "self-signed global, its own certificate), or skip_verify=True to "
                "encrypt without verifying"
            )
            return f"TLS: the global's certificate cannot be verified ({text}); {how}"
        if "hostname verification" in lowered or "peer name" in lowered:
            return (
                f"TLS: the global's certificate is not valid for the name dialled ({text}); "
                "set server_name to a name it is valid for"
            )
        if "wrong_version_number" in lowered:
            # What a TLS client reads when the other end answers in plaintext.
            return (
                f"TLS handshake failed ({text}); if the global serves plaintext, "
                "dial a grpc:// address"
            )
        if "handshake" in lowered:
            # Anything else, a connection reset by a proxy or load balancer among them.
            return f"TLS handshake failed ({text})"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return f"the server does not serve kds sessions ({code.name}: {text})"
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = ""
            if not self._target.tls and "socket closed" in lowered:
                hint = "; if the global serves TLS, dial a grpcs:// address"
            return f"the global is unavailable ({text}){hint}"
        return f"{code.name}: {text}"

    # -- global side --------------------------------------------------------------------

    async def serve(
        self,
        handler: SessionHandler,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept sessions from zones; see :meth:`kds.Transport.serve`.

        Reports the address zones can dial (``grpcs://host:port``, with the real
        port when listening on port 0). Stopping it closes every session with the
        reason ``"server stopped"``, which zones receive.

        Raises:
            TransportError: the address cannot be bound (in use, say), the TLS
                material cannot be read, generated or does not match, or this
                transport is already being served.
        """
        if self._serving:
            raise TransportError(f"{self.address} is already being served")
        self._serving = True
        try:
            await self._serve(handler, task_status)
        finally:
            self._serving = False

    async def _serve(self, handler: SessionHandler, task_status: TaskStatus[str]) -> None:
        credentials = None
        if self._target.tls:
            cert_pem, key_pem = await anyio.to_thread.run_sync(self._server_material)
            credentials = grpc.ssl_server_credentials([(key_pem, cert_pem)])  # type: ignore[no-untyped-call]
        minimum_ping = round(self._server.keepalive_min_interval * 1000)
        server = grpc.aio.server(
            options=[
                *self._common_options(),
                # How often zones may ping while no data flows (gRPC's ping policing);
                # more frequent pings earn the connection a "too_many_pings" GOAWAY.
                ("grpc.http2.min_ping_interval_without_data_ms", minimum_ping),
                # gRPC sets SO_REUSEPORT by default: a second global on the same
                # port would then share it silently instead of failing.
                ("grpc.so_reuseport", 0),
            ]
        )
        listener = _Listener(self, handler)
        # Identity serializers (none given): messages are the envelope's bytes.
        method = grpc.stream_stream_rpc_method_handler(listener.rpc)  # type: ignore[no-untyped-call]
        service = grpc.method_handlers_generic_handler(SERVICE, {"Session": method})  # type: ignore[no-untyped-call]
        server.add_generic_rpc_handlers((service,))
        endpoint = self._target.endpoint()
        try:
            if credentials is None:
                port = server.add_insecure_port(endpoint)
            else:
                port = server.add_secure_port(endpoint, credentials)
        except RuntimeError as exc:
            raise TransportError(f"cannot listen on {self.address}: {exc}") from exc
        address = self._target.url(port)
        try:
            async with anyio.create_task_group() as group:
                listener.task_group = group
                await server.start()
                logger.info("listening for zones on %s", address)
                task_status.started(address)
                await anyio.sleep_forever()
        finally:
            listener.stopping = True
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as closing:
                    # Sessions whose handler never got to run (stopped at once).
                    for session in list(listener.sessions):
                        closing.start_soon(session.aclose, "server stopped")
                await server.stop(grace=self._close_timeout)
            logger.info("stopped listening on %s", address)

    def _server_material(self) -> tuple[bytes, bytes]:
        options = self._server
        if options.cert_file is not None and options.key_file is not None:
            return tls.load_server_material(options.cert_file, options.key_file)
        work_dir = options.work_dir or Path.home() / ".kds"
        cert_file, key_file = tls.ensure_certificate(work_dir, extra_names=options.extra_names)
        return tls.load_server_material(cert_file, key_file)


class _Listener:
    """Admits the calls of one :meth:`GrpcTransport.serve` and runs their handlers."""

    def __init__(self, transport: GrpcTransport, handler: SessionHandler) -> None:
        self.transport = transport
        self.handler = handler
        self.task_group: TaskGroup | None = None
        self.stopping = False
        self.sessions: set[GrpcSession] = set()

    async def rpc(self, _requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        transport = self.transport
        peer_address = _peer_address(context.peer())
        if self.stopping or self.task_group is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the global is shutting down")
        metadata: Any = context.invocation_metadata() or ()
        zone = _metadata_value(metadata, ZONE_KEY)
        refusal = self._tls_refusal(context)
        if refusal is not None:
            logger.warning("refused a session from %s (zone %r): %s", peer_address, zone, refusal)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        identity, refusal = await self._authenticate(zone, metadata, peer_address)
        if refusal is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        limit = min(
            transport.max_frame_size,
            _as_limit(_metadata_value(metadata, MAX_FRAME_KEY), transport.max_frame_size),
        )
        session = GrpcSession(
            peer=PeerInfo(address=peer_address, identity=identity),
            max_frame_size=limit,
            peer_name="the zone",
            buffer_size=transport._buffer_size,
            close_timeout=transport._close_timeout,
            ends_call_on_close=True,
        )
        await context.send_initial_metadata(((MAX_FRAME_KEY, str(limit)),))
        self.sessions.add(session)
        try:
            self.task_group.start_soon(self._run_handler, session)
        except RuntimeError:  # the task group is closing: serve() is stopping
            self.sessions.discard(session)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the global is shutting down")
        logger.debug("session from %s (zone %r) accepted", peer_address, zone)
        await session._run(_ServerStream(context))

    def _tls_refusal(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> str | None:
        transport = self.transport
        if not transport._target.tls or transport._server.min_tls_version == "1.2":
            return None  # gRPC itself never negotiates less than TLS 1.2
        negotiated = list(context.auth_context().get("ssl_tls_version") or [])
        version = negotiated[0].decode("ascii", errors="replace") if negotiated else None
        if version == "TLSv1.3":
            return None
        return (
            f"{version or 'an unknown TLS version'} was negotiated; this global requires "
            "TLS 1.3 (min_tls_version)"
        )

    async def _authenticate(
        self, zone: str | None, metadata: Any, peer_address: str
    ) -> tuple[str | None, str | None]:
        """The zone's verified identity, or why it is refused."""
        hook = self.transport._server.authenticate
        if hook is None:
            return None, None
        credentials = _metadata_value(metadata, AUTHORIZATION_KEY)
        if credentials is not None and credentials[:7].lower() == "bearer ":
            credentials = credentials[7:]
        try:
            return await hook(zone, credentials, peer_address), None
        except PermissionError as exc:
            logger.warning("refused a session from %s (zone %r): %s", peer_address, zone, exc)
            return None, f"authentication failed: {exc}"
        except Exception:
            logger.exception("authenticate hook failed for %s (zone %r)", peer_address, zone)
            return None, "authentication failed: the global could not check the credentials"

    async def _run_handler(self, session: GrpcSession) -> None:
        reason = "server stopped"
        try:
            await self.handler(session)
            reason = ""
        except Exception:
            # One session's failure must not take the listener (and every other zone) down.
            logger.exception("session handler for %s failed", session.peer.address)
            reason = "session handler failed"
        finally:
            await session.aclose(reason)
            self.sessions.discard(session)


class _ClientStream:
    """The zone's side of the call."""

    def __init__(self, call: grpc.aio.StreamStreamCall[bytes, bytes], channel: Any) -> None:
        self._call = call
        self._channel: grpc.aio.Channel = channel

    async def read(self) -> bytes | None:
        message = await self._call.read()
        return None if message is grpc.aio.EOF else bytes(message)

    async def write(self, message: bytes) -> None:
        await self._call.write(message)

    async def end_writing(self) -> None:
        await self._call.done_writing()

    async def settle(self) -> None:
        pass  # a lost connection fails the call with a status: nothing to wait for

    async def release(self, session: GrpcSession) -> None:
        await self._channel.close()

    async def close_reason(self, error: grpc.aio.AioRpcError | None) -> str | None:
        metadata = error.trailing_metadata() if error is not None else None
        if metadata is None:
            metadata = await self._call.trailing_metadata()
        return _metadata_value(metadata or (), CLOSE_REASON_KEY)


class _ServerStream:
    """The global's side of the call."""

    def __init__(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        self._context = context

    async def read(self) -> bytes | None:
        message = await self._context.read()
        return None if message is grpc.aio.EOF else bytes(message)

    async def write(self, message: bytes) -> None:
        await self._context.write(message)

    async def end_writing(self) -> None:
        pass  # the call ends when the handler returns, right after this

    async def settle(self) -> None:
        # A zone whose connection died looks, at first, exactly like one that ended
        # its stream: the read returns end of stream, and gRPC cancels the call an
        # instant later. Waiting that instant reports the loss as a loss.
        await anyio.sleep(_SETTLE_TIME)

    async def release(self, session: GrpcSession) -> None:
        reason = session._local_reason
        if reason is None or session._close_written:
            return
        # The close message never got out (the zone stopped reading): say it in the
        # status instead, which is not subject to flow control.
        encoded = reason.encode("utf-8")[:MAX_REASON_BYTES]
        try:
            self._context.set_trailing_metadata(((CLOSE_REASON_KEY, encoded),))
            self._context.set_code(grpc.StatusCode.ABORTED)
            self._context.set_details(reason or "closed by the global")
        except Exception:  # the call may be gone already; nothing left to tell
            logger.debug("could not set the close status", exc_info=True)

    async def close_reason(self, error: grpc.aio.AioRpcError | None) -> str | None:
        return None  # zones have no trailers


_pumps: set[asyncio.Task[None]] = set()


def _start_pump(coroutine: Awaitable[None]) -> None:
    async def pump() -> None:
        await coroutine

    # A zone's session outlives connect(): its loops run in a task of their own,
    # held here because asyncio keeps only weak references to tasks.
    task = asyncio.get_running_loop().create_task(pump())
    _pumps.add(task)
    task.add_done_callback(_pumps.discard)


def _metadata_value(metadata: Sequence[tuple[str, str | bytes]] | Any, key: str) -> str | None:
    for item_key, value in metadata:
        if item_key == key:
            if isinstance(value, bytes):  # "-bin" keys carry bytes
                return value.decode("utf-8", errors="replace")
            return str(value)
    return None


def _as_limit(value: str | None, default: int) -> int:
    try:
        limit = int(value) if value is not None else default
    except ValueError:
        return default
    return limit if limit >= 1 else default


def _peer_address(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` → ``10.0.0.7:51234``, ``ipv6:%5B::1%5D:1`` → ``[::1]:1``."""
    for prefix in ("ipv4:", "ipv6:", "unix:"):
        if peer.startswith(prefix):
            return urllib.parse.unquote(peer[len(prefix) :])
    return peer


def _name_in_certificate(pem: bytes, host: str) -> str | None:
    """A name *pem*'s certificate is valid for: ``None`` when *host* already is one."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    try:
        alt_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        dns_names: list[str] = []
        addresses: list[str] = []
    else:
        dns_names = alt_names.value.get_values_for_type(x509.DNSName)
        addresses = [str(ip) for ip in alt_names.value.get_values_for_type(x509.IPAddress)]
    candidates = [name for name in dns_names if "*" not in name] + addresses
    normalized = host
    with contextlib.suppress(ValueError):
        normalized = str(ipaddress.ip_address(host))
    if normalized in dns_names or normalized in addresses:
        return None
    if candidates:
        return candidates[0]
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common_names[0].value) if common_names else None
