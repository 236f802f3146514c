"""NatsTransport: kds sessions through a NATS deployment (nats-py).

A zone opens a NATS connection of its own for each session, so that the
connection's loss concerns that session only; a global serves every session it
accepts on one connection, which it opens again (with backoff) when it is lost.
See :mod:`kds_transports.nats.wire` for the subjects and messages, and
:mod:`kds_transports.nats._session` for how a session keeps frames in order,
complete and flowing.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import os
import random
import secrets
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import anyio
import attrs

from kds.config import MASK
from kds.errors import ConfigError, ConnectError, TransportError
from kds.transport import DEFAULT_MAX_FRAME_SIZE, SessionHandler, Transport
from kds_transports.nats import wire
from kds_transports.nats._connection import Connection, ConnectionSettings, describe
from kds_transports.nats._session import NatsSession, start_runner

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_PORT",
    "DEFAULT_PREFIX",
    "DEFAULT_WINDOW",
    "Authenticate",
    "NatsClientOptions",
    "NatsConnectionOptions",
    "NatsServerOptions",
    "NatsTransport",
]

logger = logging.getLogger("kds_transports.nats")

DEFAULT_PORT: Final = 4222
"""NATS's client port, used when an address names none."""

DEFAULT_ADDRESS: Final = f"nats://localhost:{DEFAULT_PORT}"
"""Where a global finds NATS by default: a server on the same machine."""

DEFAULT_PREFIX: Final = "kds"
"""The subject prefix sessions use unless configured otherwise."""

DEFAULT_WINDOW: Final = 4 * 1024 * 1024  # bytes of credit a receiver grants its peer
DEFAULT_KEEPALIVE_INTERVAL: Final = 15.0  # seconds between keepalive messages (as gRPC's)
DEFAULT_KEEPALIVE_TIMEOUT: Final = 15.0  # seconds of silence past the peer's interval
DEFAULT_CONNECT_TIMEOUT: Final = 10.0  # seconds for connect(), NATS and the global's answer
DEFAULT_CLOSE_TIMEOUT: Final = 5.0  # seconds aclose() may take to publish its CLOSE
DEFAULT_RECONNECT_WAIT: Final = 2.0  # seconds: the longest pause between a global's attempts

_FIRST_RECONNECT_WAIT: Final = 0.05  # seconds before a global's first reconnection attempt

Authenticate = Callable[[str | None, str | None, str], Awaitable[str]]
"""Checks a zone when it opens a session, before any frame flows (the global side).

The same hook as :data:`kds_transports.grpc.Authenticate`: called as
``await authenticate(zone, credentials, peer_address)`` with the zone name and
credentials of the zone's connect request (each ``None`` when absent) and the
address the zone reported (its client IP as NATS saw it; for logs only).
Returns the zone's verified identity, which becomes ``session.peer.identity``.
Raising :class:`PermissionError` refuses the session: its message is sent to
the zone, whose :meth:`NatsTransport.connect` raises
:class:`~kds.errors.ConnectError` with it. Any other exception refuses too, is
logged, and the zone only learns that the check failed.
"""


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


@attrs.frozen(kw_only=True)
class NatsConnectionOptions:
    """How this side connects to NATS; zones and globals both do.

    At most one way of authenticating to NATS: ``user`` with ``password``,
    ``token``, or ``creds_file``.

    Attributes:
        user: the NATS user name (with ``password``).
        password: the NATS user's password.
        token: a NATS authorization token.
        creds_file: a NATS credentials file (user JWT and NKey seed, as ``nsc``
            writes them), read on every connection; needs the ``nkeys`` package.
        ca_file: PEM file of the certificates that verify the NATS server's
            certificate (``tls://`` addresses); by default the system's roots.
            Read on every connection, so it can be rotated.
        cert_file: a PEM client certificate, for NATS servers that verify
            clients (``tls { verify: true }``); with ``key_file``.
        key_file: the unencrypted PEM private key of ``cert_file``.
        server_name: the name to check the NATS server's certificate against,
            when the address does not use one of its names.
        connect_timeout: seconds to reach NATS (and, on a zone, to get the
            global's answer too).
    """

    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    creds_file: Path | None = attrs.field(default=None, converter=_path)
    ca_file: Path | None = attrs.field(default=None, converter=_path)
    cert_file: Path | None = attrs.field(default=None, converter=_path)
    key_file: Path | None = attrs.field(default=None, converter=_path)
    server_name: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


@attrs.frozen(kw_only=True)
class NatsClientOptions:
    """Who a zone says it is (ignored when serving).

    Attributes:
        zone: the zone's name, sent in the connect request for the global's
            ``authenticate`` hook (the sync protocol's Hello claims it too).
        credentials: the zone's credentials (a zone token), sent likewise.
    """

    zone: str | None = None
    credentials: str | None = attrs.field(default=None, repr=False)


@attrs.frozen(kw_only=True)
class NatsServerOptions:
    """How the global serves zones (ignored when dialling).

    Attributes:
        authenticate: checks each zone's name and credentials before its
            session starts (see :data:`Authenticate`); without it,
            ``peer.identity`` is ``None`` and the sync engine relies on the
            Hello's claim.
        reconnect_wait: seconds; the longest pause between attempts to reach
            NATS again after the global's connection was lost.
        instance: this global's name in zones' logs (``host:pid`` by default).
    """

    authenticate: Authenticate | None = None
    reconnect_wait: float = DEFAULT_RECONNECT_WAIT
    instance: str | None = None


@attrs.frozen
class _Target:
    tls: bool
    servers: tuple[str, ...]

    @property
    def address(self) -> str:
        return ",".join(self.servers)


def _parse_address(address: str) -> _Target:
    """``nats://host[:port]`` or ``tls://...``, or several of one scheme, comma-separated."""
    urls: list[str] = []
    schemes: set[str] = set()
    for part in address.split(","):
        text = part.strip()
        if "://" not in text:
            text = f"nats://{text}"
        url = urllib.parse.urlsplit(text)
        # Messages below quote the address: never with its user info (a password, or a
        # token in the user name's place).
        userinfo = url.netloc.rpartition("@")[0]
        shown = address.replace(userinfo, MASK) if userinfo else address
        problem = ""
        if url.scheme not in ("nats", "tls"):
            problem = f"unknown scheme {url.scheme!r}"
        elif url.username is not None or url.password is not None:
            problem = (
                "credentials in the address (addresses are logged): use the user and "
                "password, token or creds_file options"
            )
        elif not url.hostname:
            problem = "no host"
        elif url.path not in ("", "/") or url.query or url.fragment:
            problem = "unexpected parts after host:port"
        port = DEFAULT_PORT
        if not problem:
            try:
                port = url.port or DEFAULT_PORT
            except ValueError as exc:
                problem = str(exc)
        if problem:
            raise ConfigError(
                f"invalid NATS address {shown!r} ({problem}): use nats://host:port, or "
                f"tls://host:port for TLS, several separated by commas (port {DEFAULT_PORT} "
                "when omitted)"
            )
        assert url.hostname is not None  # noqa: S101 -- checked above
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        urls.append(f"{url.scheme}://{host}:{port}")
        schemes.add(url.scheme)
    if len(schemes) > 1:
        raise ConfigError(
            f"invalid NATS address {address!r}: mixes nats:// and tls:// (use tls:// for all "
            "servers or for none)"
        )
    return _Target(tls=schemes == {"tls"}, servers=tuple(urls))


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")


def _check_text(name: str, value: str | None) -> None:
    if value is not None and not value:
        raise ConfigError(f"{name} must be a non-empty string")


@final
class NatsTransport(Transport):
    """Sessions between zones and the global through NATS: ``nats://`` or ``tls://``.

    Build one with :meth:`client` on a zone and :meth:`server` on the global (the
    constructor takes every option set, for configuration code). Both sides
    connect to NATS at *address*: ``nats://host:port`` or ``tls://host:port``
    (the port defaults to 4222), or several servers of one cluster separated by
    commas. Sessions travel on subjects under *prefix*; a zone and the global
    must use the same one.

    **Sessions.** A zone opens its own NATS connection per session and asks for
    a session on ``<prefix>.connect``; globals listen there in one queue group,
    so NATS hands each request to exactly one of them (several globals on one
    NATS are an HA pair, never two servers of one session). Frames then flow on
    ``<prefix>.s.<id>.z2g`` and ``.g2z``, numbered, acknowledged and split below
    the servers' ``max_payload``; see ``docs/nats.md``.

    **Identity.** A zone sends its name and credentials in the connect request;
    the global's ``authenticate`` hook turns them into ``session.peer.identity``
    or refuses the session (see :data:`Authenticate`), exactly as over gRPC. On
    the zone, ``session.peer.identity`` is ``None``: NATS does not tell which
    client answered.

    **Liveness.** Each side sends a keepalive message when it sent nothing for
    ``keepalive_interval`` seconds, and ends the session when it heard nothing
    for the peer's interval plus its ``keepalive_timeout``: a killed, frozen or
    unreachable peer ends the session with :class:`~kds.errors.SessionClosedError`
    (``by_peer``, reason ``"connection lost: ..."``) within about their sum. A
    lost NATS connection ends every session on it at once.

    Args:
        address: where NATS is.
        prefix: the subject prefix (dot-separated tokens).
        connection: how to connect to NATS (authentication, TLS, timeout).
        client: the zone's name and credentials, for :meth:`connect`.
        server: options for :meth:`serve`.
        max_frame_size: the largest frame this side sends or accepts, in bytes; a
            session uses the smaller of both sides' limits.
        window: bytes of credit this side grants its peer: how much of the peer's
            frames it buffers before the peer's ``send`` waits.
        keepalive_interval: seconds without sending after which a keepalive
            message is sent.
        keepalive_timeout: seconds of silence, past the peer's keepalive
            interval, after which the session is taken for lost.
        close_timeout: seconds :meth:`NatsSession.aclose` may take to publish
            its CLOSE and release the session.

    Raises:
        ConfigError: an option is invalid or contradicts another; the message
            names it.
    """

    def __init__(
        self,
        address: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        connection: NatsConnectionOptions | None = None,
        client: NatsClientOptions | None = None,
        server: NatsServerOptions | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        window: int = DEFAULT_WINDOW,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self._target = _parse_address(address)
        self._prefix = prefix
        self._connection = connection or NatsConnectionOptions()
        self._client = client or NatsClientOptions()
        self._server = server or NatsServerOptions()
        self._max_frame_size = max_frame_size
        self._window = window
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._close_timeout = close_timeout
        self._serving = False
        if not wire.valid_prefix(prefix):
            raise ConfigError(
                f"prefix must be dot-separated tokens of letters, digits, '_' or '-', "
                f"got {prefix!r}"
            )
        if max_frame_size < 1 or window < 1:
            raise ConfigError(
                f"max_frame_size and window must be >= 1, got {max_frame_size} and {window}"
            )
        _check_positive(
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            close_timeout=close_timeout,
            reconnect_wait=self._server.reconnect_wait,
        )
        self._check_connection_options()
        self._check_client_options()

    @classmethod
    def client(
        cls,
        address: str,
        *,
        zone: str | None = None,
        credentials: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        window: int = DEFAULT_WINDOW,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> NatsTransport:
        """A transport for a zone reaching the global through NATS at *address*.

        The keyword arguments are those of :class:`NatsClientOptions`,
        :class:`NatsConnectionOptions` and :class:`NatsTransport`.

        Raises:
            ConfigError: an option is invalid (``token`` together with ``user``,
                ``ca_file`` with a ``nats://`` address, ...).
        """
        return cls(
            address,
            prefix=prefix,
            connection=NatsConnectionOptions(
                user=user,
                password=password,
                token=token,
                creds_file=creds_file,
                ca_file=ca_file,
                cert_file=cert_file,
                key_file=key_file,
                server_name=server_name,
                connect_timeout=connect_timeout,
            ),
            client=NatsClientOptions(zone=zone, credentials=credentials),
            max_frame_size=max_frame_size,
            window=window,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            close_timeout=close_timeout,
        )

    @classmethod
    def server(
        cls,
        address: str = DEFAULT_ADDRESS,
        *,
        authenticate: Authenticate | None = None,
        prefix: str = DEFAULT_PREFIX,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_wait: float = DEFAULT_RECONNECT_WAIT,
        instance: str | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        window: int = DEFAULT_WINDOW,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> NatsTransport:
        """A transport for the global, serving zones through NATS at *address*.

        The keyword arguments are those of :class:`NatsServerOptions`,
        :class:`NatsConnectionOptions` and :class:`NatsTransport`.

        Raises:
            ConfigError: an option is invalid.
        """
        return cls(
            address,
            prefix=prefix,
            connection=NatsConnectionOptions(
                user=user,
                password=password,
                token=token,
                creds_file=creds_file,
                ca_file=ca_file,
                cert_file=cert_file,
                key_file=key_file,
                server_name=server_name,
                connect_timeout=connect_timeout,
            ),
            server=NatsServerOptions(
                authenticate=authenticate, reconnect_wait=reconnect_wait, instance=instance
            ),
            max_frame_size=max_frame_size,
            window=window,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            close_timeout=close_timeout,
        )

    @property
    def address(self) -> str:
        """The configured address, normalised (``nats://host:port``, comma-separated)."""
        return self._target.address

    @property
    def prefix(self) -> str:
        """The subject prefix of this transport's sessions."""
        return self._prefix

    @property
    def connection_options(self) -> NatsConnectionOptions:
        """How this side connects to NATS."""
        return self._connection

    @property
    def client_options(self) -> NatsClientOptions:
        """The zone's name and credentials :meth:`connect` presents."""
        return self._client

    @property
    def server_options(self) -> NatsServerOptions:
        """The options :meth:`serve` uses."""
        return self._server

    @property
    def max_frame_size(self) -> int:
        """The largest frame this side sends or accepts, in bytes."""
        return self._max_frame_size

    def with_zone(self, zone: str | None, *, credentials: str | None = None) -> NatsTransport:
        """A copy of this transport that dials as *zone*, presenting *credentials*.

        Raises:
            ConfigError: *zone* or *credentials* is an empty string.
        """
        view = copy.copy(self)
        view._client = NatsClientOptions(zone=zone, credentials=credentials)
        view._serving = False
        view._check_client_options()
        return view

    def _check_client_options(self) -> None:
        _check_text("zone", self._client.zone)
        _check_text("credentials", self._client.credentials)

    def _check_connection_options(self) -> None:
        options = self._connection
        for name in ("user", "password", "token", "server_name"):
            _check_text(name, getattr(options, name))
        _check_positive(connect_timeout=options.connect_timeout)
        if (options.user is None) != (options.password is None):
            raise ConfigError("user and password must be set together")
        ways = [
            name
            for name, value in (
                ("user/password", options.user),
                ("token", options.token),
                ("creds_file", options.creds_file),
            )
            if value is not None
        ]
        if len(ways) > 1:
            raise ConfigError(
                f"{' and '.join(ways)} exclude each other: NATS authenticates a connection one way"
            )
        if options.creds_file is not None and importlib.util.find_spec("nkeys") is None:
            raise ConfigError(
                "creds_file needs the nkeys package, which nats-py uses to sign with the "
                "NKey seed: pip install nkeys"
            )
        if (options.cert_file is None) != (options.key_file is None):
            raise ConfigError("cert_file and key_file must be set together")
        if not self._target.tls:
            for name in ("ca_file", "cert_file", "server_name"):
                if getattr(options, name) is not None:
                    raise ConfigError(f"{name} needs a tls:// address, got {self.address}")

    def _settings(self, name: str) -> ConnectionSettings:
        options = self._connection
        return ConnectionSettings(
            servers=self._target.servers,
            tls=self._target.tls,
            name=name,
            user=options.user,
            password=options.password,
            token=options.token,
            creds_file=options.creds_file,
            ca_file=options.ca_file,
            cert_file=options.cert_file,
            key_file=options.key_file,
            server_name=options.server_name,
            connect_timeout=options.connect_timeout,
            keepalive_interval=self._keepalive_interval,
            keepalive_timeout=self._keepalive_timeout,
        )

    # -- zone side ----------------------------------------------------------------------

    async def connect(self) -> NatsSession:
        """Open a session to the global; see :meth:`kds.Transport.connect`.

        Raises:
            ConnectError: NATS is unreachable or refused this side's credentials,
                the TLS handshake failed, no global is serving on the prefix, the
                global refused the session (the ``authenticate`` hook's reason),
                or no answer came within ``connect_timeout``.
            ConfigError: ``ca_file``, ``cert_file`` or ``key_file`` cannot be read.
        """
        timeout = self._connection.connect_timeout
        zone = self._client.zone
        connection: Connection | None = None
        session: NatsSession | None = None
        try:
            with anyio.fail_after(timeout):
                connection = await Connection.open(self._settings(f"kds zone {zone or '-'}"))
                # Unguessable: knowing a session's id is what it takes to talk in it.
                session_id = secrets.token_urlsafe(16)
                z2g, g2z = wire.session_subjects(self._prefix, session_id)
                session = NatsSession(
                    connection=connection,
                    role="zone",
                    session_id=session_id,
                    send_subject=z2g,
                    receive_subject=g2z,
                    max_frame_size=self._max_frame_size,
                    window=self._window,
                    keepalive_interval=self._keepalive_interval,
                    keepalive_timeout=self._keepalive_timeout,
                    close_timeout=self._close_timeout,
                    release=_release_zone_session,
                )
                request = wire.ConnectRequest(
                    session=session_id,
                    zone=zone,
                    credentials=self._client.credentials,
                    address=connection.client_ip,
                    max_frame_size=self._max_frame_size,
                    window=self._window,
                    keepalive_interval=self._keepalive_interval,
                    max_payload=connection.max_payload,
                )
                await session._open_as_zone(wire.connect_subject(self._prefix), request)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if session is not None and not isinstance(exc, ConnectError):
                    # The global may have accepted just now: tell it not to wait.
                    await session._give_up("the zone gave up waiting for the global's answer")
                if connection is not None:
                    await connection.close()
            if isinstance(exc, TimeoutError):
                raise ConnectError(
                    self.address,
                    f"no answer within {timeout} s (raise connect_timeout if NATS or the "
                    "global is slow)",
                ) from None
            if isinstance(exc, ConnectError) and exc.address != self.address:
                raise ConnectError(self.address, exc.reason) from exc
            raise
        start_runner(session)
        return session

    # -- global side --------------------------------------------------------------------

    async def serve(
        self,
        handler: SessionHandler,
        *,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept sessions from zones; see :meth:`kds.Transport.serve`.

        Reports the NATS address zones dial (this transport's :attr:`address`)
        once it listens on ``<prefix>.connect``. When the connection to NATS is
        lost, every session ends and the global reconnects (pausing up to
        ``reconnect_wait`` between attempts) until it is stopped. Stopping it
        closes every session with the reason ``"server stopped"``, which zones
        receive.

        Raises:
            TransportError: NATS cannot be reached or refused this side's
                credentials, the TLS material cannot be read, or this transport
                is already being served.
        """
        if self._serving:
            raise TransportError(f"{self.address} ({self._prefix}) is already being served")
        self._serving = True
        try:
            await self._serve(handler, task_status)
        finally:
            self._serving = False

    async def _serve(self, handler: SessionHandler, task_status: TaskStatus[str]) -> None:
        listener = _Listener(self, handler)
        try:
            try:
                await listener.connect()
            except (ConnectError, ConfigError) as exc:
                detail = exc.reason if isinstance(exc, ConnectError) else str(exc)
                raise TransportError(
                    f"cannot serve zones through {self.address}: {detail}"
                ) from exc
            async with anyio.create_task_group() as group:
                listener.task_group = group
                group.start_soon(listener.dispatch)
                logger.info(
                    "serving zones through NATS at %s on %s",
                    self.address,
                    wire.connect_subject(self._prefix),
                )
                task_status.started(self.address)
                await listener.stay_connected()
        finally:
            await listener.stop()


class _Listener:
    """What one :meth:`NatsTransport.serve` runs: its connection, admissions and sessions."""

    def __init__(self, transport: NatsTransport, handler: SessionHandler) -> None:
        self.transport = transport
        self.handler = handler
        self.task_group: TaskGroup | None = None
        self.connection: Connection | None = None
        self.sessions: dict[str, NatsSession] = {}
        self.stopping = False
        self.instance = transport._server.instance or f"{socket.gethostname()}:{os.getpid()}"
        self._listening: Subscription | None = None  # on the connect subject
        # Connect requests no admission has taken yet, by reply subject: a global
        # that stops refuses them, so that their zones retry at once (another
        # global, or this one restarted) instead of waiting out connect_timeout.
        self._unanswered: dict[str, Connection] = {}
        self._requests: tuple[
            MemoryObjectSendStream[tuple[Connection, Msg]],
            MemoryObjectReceiveStream[tuple[Connection, Msg]],
        ] = anyio.create_memory_object_stream[tuple[Connection, "Msg"]](math.inf)

    async def connect(self) -> Connection:
        """Connect to NATS and listen for connect requests.

        Raises:
            ConnectError: NATS cannot be reached.
            ConfigError: the TLS material cannot be read.
        """
        transport = self.transport
        connection = await Connection.open(transport._settings(f"kds global {self.instance}"))
        send = self._requests[0]

        async def on_request(message: Msg) -> None:
            # nats-py calls this from its own task: admissions run in serve()'s.
            if message.reply:
                self._unanswered[message.reply] = connection
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                send.send_nowait((connection, message))

        try:
            self._listening = await connection.client.subscribe(
                wire.connect_subject(transport._prefix), queue=wire.QUEUE_GROUP, cb=on_request
            )
            # Round trips, so that the server has the subscription before zones are
            # told to dial. Two: nats-py writes a flush's PING straight to the socket,
            # ahead of a SUB still queued for its writer task; the first round trip
            # lets that task run, the second PING follows the SUB.
            timeout = max(1, math.ceil(transport._connection.connect_timeout))
            for _ in range(2):
                await connection.client.flush(timeout=timeout)
        except Exception as exc:
            await connection.close()
            raise ConnectError(transport.address, f"cannot subscribe ({describe(exc)})") from exc
        self.connection = connection
        return connection

    async def stay_connected(self) -> None:
        """Connect again whenever the connection is lost; runs until cancelled."""
        wait_cap = self.transport._server.reconnect_wait
        while True:
            assert self.connection is not None  # noqa: S101 -- connected before serving
            await self.connection.lost.wait()
            # The connection's loss already ended its sessions, with its reason.
            wait = _FIRST_RECONNECT_WAIT
            while True:
                try:
                    await self.connect()
                except (ConnectError, ConfigError) as exc:
                    logger.warning("cannot reach NATS again (%s); retrying", exc)
                else:
                    logger.info("connected to NATS again at %s", self.connection.url)
                    break
                # Jitter: globals that lost NATS together do not come back in lockstep.
                await anyio.sleep(wait * random.uniform(0.5, 1.0))  # noqa: S311 -- not a secret
                wait = min(2 * wait, wait_cap)

    async def dispatch(self) -> None:
        """Admit each connect request in a task of its own."""
        assert self.task_group is not None  # noqa: S101 -- set before this runs
        async for connection, message in self._requests[1]:
            self.task_group.start_soon(self._admit, connection, message)

    async def stop(self) -> None:
        """Refuse the requests not yet admitted, end every session ("server stopped"), close."""
        self.stopping = True
        with anyio.CancelScope(shield=True):
            await self._stop_listening()
            async with anyio.create_task_group() as closing:
                for session in list(self.sessions.values()):
                    closing.start_soon(session.aclose, "server stopped")
            if self.connection is not None:
                await self.connection.close()
            for stream in self._requests:
                stream.close()
        logger.info("stopped serving zones through %s", self.transport.address)

    async def _stop_listening(self) -> None:
        """Leave the queue group, then refuse every connect request not yet admitted."""
        connection, subscription = self.connection, self._listening
        if connection is not None and subscription is not None and not connection.lost.is_set():
            # Draining: NATS hands later requests to another global of the queue
            # group (or answers "no responders"), and those already on their way
            # here are still taken, to be refused below rather than dropped. (nats-py
            # sends the drain's PING ahead of its UNSUB: a request NATS routes here
            # in between is lost, and its zone waits out connect_timeout.)
            with (
                anyio.move_on_after(self.transport._close_timeout),
                contextlib.suppress(Exception),
            ):
                # nats-py leaves drain() unannotated.
                await subscription.drain()  # type: ignore[no-untyped-call]
        unanswered, self._unanswered = self._unanswered, {}
        for reply, via in unanswered.items():
            await self._refuse(via, reply, "the global is shutting down")

    def _closing(self, connection: Connection) -> bool:
        """Whether sessions can no longer be accepted on *connection*."""
        return self.stopping or connection.lost.is_set()

    async def _refuse(self, connection: Connection, reply: str, reason: str) -> None:
        with contextlib.suppress(Exception):
            await connection.client.publish(
                reply, wire.encode(wire.Kind.REFUSE, 0, reason.encode())
            )

    async def _admit(self, connection: Connection, message: Msg) -> None:
        transport = self.transport
        reply = message.reply
        if not reply:
            logger.debug("ignored a connect request without a reply subject")
            return
        # Answered from here on, whatever happens (a CLOSE if the global stops).
        self._unanswered.pop(reply, None)
        try:
            request = wire.ConnectRequest.from_json(message.data)
        except ValueError as exc:
            await self._refuse(connection, reply, f"malformed connect request: {exc}")
            return
        z2g, g2z = wire.session_subjects(transport._prefix, request.session)
        if reply != g2z:
            await self._refuse(connection, reply, f"the reply subject must be {g2z}")
            return
        if self._closing(connection):
            await self._refuse(connection, reply, "the global is shutting down")
            return
        if request.session in self.sessions:
            await self._refuse(connection, reply, "the session id is already in use")
            return
        session = NatsSession(
            connection=connection,
            role="global",
            session_id=request.session,
            send_subject=g2z,
            receive_subject=z2g,
            max_frame_size=transport._max_frame_size,
            window=transport._window,
            keepalive_interval=transport._keepalive_interval,
            keepalive_timeout=transport._keepalive_timeout,
            close_timeout=transport._close_timeout,
            release=self._release,
        )
        # Held from here, so that a second request with this id is refused (and so
        # that a global stopping meanwhile tells the zone, with a CLOSE).
        self.sessions[request.session] = session
        identity, refusal = await self._authenticate(request)
        if refusal is None and self._closing(connection):
            refusal = "the global is shutting down"
        if refusal is not None:
            self.sessions.pop(request.session, None)
            await self._refuse(connection, reply, refusal)
            return
        accept = wire.ConnectReply(
            z2g=z2g,
            g2z=g2z,
            instance=self.instance,
            max_frame_size=min(transport._max_frame_size, request.max_frame_size),
            window=transport._window,
            keepalive_interval=transport._keepalive_interval,
            max_payload=connection.max_payload,
        )
        try:
            await session._open_as_global(request, accept, identity)
        except Exception as exc:
            logger.warning("could not accept session %s: %s", request.session, describe(exc))
            await session.aclose("the global could not accept the session")
            return
        logger.debug(
            "session %s from %s (zone %r) accepted", request.session, request.address, request.zone
        )
        assert self.task_group is not None  # noqa: S101 -- admissions run in it
        self.task_group.start_soon(session._run)
        await self._run_handler(session)

    async def _authenticate(self, request: wire.ConnectRequest) -> tuple[str | None, str | None]:
        """The zone's verified identity, or why it is refused."""
        hook = self.transport._server.authenticate
        if hook is None:
            return None, None
        zone, address = request.zone, request.address
        try:
            return await hook(zone, request.credentials, address), None
        except PermissionError as exc:
            logger.warning("refused a session from %s (zone %r): %s", address, zone, exc)
            return None, f"authentication failed: {exc}"
        except Exception:
            logger.exception("authenticate hook failed for %s (zone %r)", address, zone)
            return None, "authentication failed: the global could not check the credentials"

    async def _run_handler(self, session: NatsSession) -> None:
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

    async def _release(self, session: NatsSession) -> None:
        self.sessions.pop(session.session_id, None)
        subscription = session._subscription
        if subscription is not None and not session._connection.lost.is_set():
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()


async def _release_zone_session(session: NatsSession) -> None:
    # The connection was the session's own.
    connection = session._connection
    connection.discard(session)
    await connection.close(session._close_timeout)
