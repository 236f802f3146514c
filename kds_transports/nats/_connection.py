"""One connection to NATS, owned by kds: opened without automatic reconnection.

nats-py can reconnect by itself, replaying subscriptions and buffering what is
published meanwhile; a session riding on such a connection could lose messages
without anyone noticing. kds turns that off: a lost connection ends every
session on it with a reason, and whoever needs NATS again (a zone's next
``connect()``, the global's listener) opens a new connection.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs
import nats.errors
from nats.aio.client import Client

from kds.errors import ConfigError, ConnectError

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription

    from kds_transports.nats._session import NatsSession

__all__ = ["Connection", "ConnectionSettings"]

logger = logging.getLogger("kds_transports.nats")

_CLOSE_TIMEOUT: Final = 5.0  # seconds closing a connection may take to flush


@attrs.frozen(kw_only=True)
class ConnectionSettings:
    """Everything needed to open a connection: where, as whom, with which TLS."""

    servers: tuple[str, ...]
    tls: bool
    name: str
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    creds_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    connect_timeout: float
    keepalive_interval: float
    keepalive_timeout: float

    def tls_context(self) -> ssl.SSLContext:
        """A context that verifies the server against ``ca_file`` (or the system's roots).

        Raises:
            ConfigError: ``ca_file``, ``cert_file`` or ``key_file`` cannot be read.
        """
        try:
            context = ssl.create_default_context(
                cafile=None if self.ca_file is None else str(self.ca_file)
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot read ca_file {self.ca_file}: {exc}") from exc
        if self.cert_file is not None and self.key_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load cert_file {self.cert_file} with key_file {self.key_file}: {exc}"
                ) from exc
        return context


def describe(error: BaseException) -> str:
    """A one-line account of a nats-py or socket error."""
    text = str(error)
    return text if text else type(error).__name__


def _connect_failure(error: BaseException, settings: ConnectionSettings) -> str:
    """Why a connection attempt failed, with a hint where one helps."""
    text = describe(error)
    lowered = text.lower()
    # A server that verifies client certificates ends the handshake of a client
    # without one in several ways (an alert, a reset, an end of stream).
    certificate_hint = (
        "; if it verifies client certificates, set cert_file and key_file"
        if settings.tls and settings.cert_file is None
        else ""
    )
    if isinstance(error, ssl.SSLCertVerificationError) or "certificate verify failed" in lowered:
        if settings.tls:
            return (
                f"TLS: the NATS server's certificate cannot be verified ({text}); set ca_file "
                "to the certificate of the CA that signed it, or server_name to a name it "
                "is valid for"
            )
        return (
            f"the NATS server requires TLS and its certificate cannot be verified ({text}); "
            "dial a tls:// address with ca_file"
        )
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake with the NATS server failed ({text}){certificate_hint}"
    if "authorization violation" in lowered or isinstance(error, nats.errors.AuthorizationError):
        return (
            f"the NATS server refused this connection's credentials ({text}): check user "
            "and password, token or creds_file"
        )
    if isinstance(error, TimeoutError):
        return f"the NATS server did not answer in time ({text})"
    if isinstance(error, ConnectionRefusedError | socket.gaierror):
        return f"cannot reach the NATS server ({text})"
    if settings.tls and isinstance(error, ConnectionError | EOFError | nats.errors.UnexpectedEOF):
        return (
            f"the NATS server closed the connection during the TLS handshake ({text})"
            f"{certificate_hint}"
        )
    if isinstance(error, OSError):
        return f"cannot reach the NATS server ({text})"
    return text


def _uses_tls(client: Client) -> bool:
    # nats-py upgrades to TLS only when the server's INFO requires it, even for a
    # tls:// URL; whether it did is only visible on its (private) stream writer.
    transport = getattr(client, "_transport", None)
    writer = getattr(transport, "_io_writer", None)
    get_extra_info = getattr(writer, "get_extra_info", None)
    return get_extra_info is not None and get_extra_info("ssl_object") is not None


def _abandon(client: Client) -> None:
    """Close the sockets of a connection that never came up, without waiting.

    After a failed TLS handshake, nats-py's ``close()`` waits forever for the
    plain stream it handed to the TLS upgrade; aborting needs no waiting, and
    such a client never started its tasks. (The streams are nats-py's private
    attributes; a missing one only means there is nothing to abort.)
    """
    transport = getattr(client, "_transport", None)
    for name in ("_io_writer", "_bare_io_writer"):
        writer = getattr(transport, name, None)
        with contextlib.suppress(Exception):
            writer.transport.abort()  # type: ignore[union-attr]


class _Client(Client):
    """nats-py's client, with one way of losing the connection finished properly.

    When the connection fails while messages are still queued, nats-py (2.16) writes
    them out as it closes, and that write's error (the same reset) escapes its
    reading task: the client then never finishes closing, never calls ``closed_cb``
    (so sessions would only notice through their keepalive), and asyncio reports a
    task exception nobody retrieved. Here that error is caught, the queued messages
    are dropped -- the connection they were for is gone -- and the close completes.
    """

    async def _process_op_err(self, e: Exception) -> None:
        try:
            await super()._process_op_err(e)
        except OSError:
            self._pending = []
            self._pending_data_size = 0
            self._status = Client.DISCONNECTED  # so that closing runs again, to the end
            await self._close(Client.CLOSED, True)


class Connection:
    """A nats-py client and the sessions riding on it.

    Made by :meth:`open`. When the connection is lost (the server stopped, the
    network failed, the server dropped it as a slow consumer), :attr:`lost` is
    set and every session on it ends with the reason.
    """

    def __init__(self, client: Client, url: str) -> None:
        self.client = client
        self.url = url
        """The server this connection reached (``nats://host:port``)."""
        self.lost = anyio.Event()
        self.sessions: set[NatsSession] = set()
        self._closing = False
        self._failure: Exception | None = None  # the last error nats-py reported
        self.subscriptions: dict[Subscription, NatsSession] = {}

    @property
    def max_payload(self) -> int:
        """The largest message payload the server accepts (from its INFO)."""
        return self.client.max_payload

    @property
    def client_ip(self) -> str:
        """This side's address as the server saw it, for the peer's logs."""
        return self.client.client_ip or "unknown"

    @classmethod
    async def open(cls, settings: ConnectionSettings) -> Connection:
        """Connect to one of ``settings.servers`` (tried in random order, as NATS clients do).

        Raises:
            ConnectError: no server could be reached, or every one refused.
            ConfigError: the TLS files cannot be read.
        """
        servers = list(settings.servers)
        random.shuffle(servers)
        failures: list[ConnectError] = []
        for url in servers:
            try:
                return await cls._open_one(settings, url)
            except ConnectError as exc:
                failures.append(exc)
        if len(failures) == 1:
            raise failures[0]
        reasons = "; ".join(f"{failure.address}: {failure.reason}" for failure in failures)
        raise ConnectError(",".join(settings.servers), reasons) from failures[-1]

    @classmethod
    async def _open_one(cls, settings: ConnectionSettings, url: str) -> Connection:
        options: dict[str, Any] = {}
        if settings.tls:
            options["tls"] = settings.tls_context()
            if settings.server_name is not None:
                options["tls_hostname"] = settings.server_name
        if settings.user is not None:
            options["user"] = settings.user
            options["password"] = settings.password
        if settings.token is not None:
            options["token"] = settings.token
        if settings.creds_file is not None:
            options["user_credentials"] = str(settings.creds_file)
        # nats-py's own PING/PONG watches the connection itself (sessions have their
        # keepalive messages): a server that stops answering closes it, in about
        # keepalive_interval + keepalive_timeout.
        ping_interval = max(1, math.ceil(settings.keepalive_interval))
        client = _Client()
        connection = cls(client, url)
        try:
            with anyio.fail_after(settings.connect_timeout):
                await client.connect(
                    url,
                    name=settings.name,
                    allow_reconnect=False,
                    # nats-py retries a server it cannot reach, this many times more,
                    # even without reconnection: once, at once.
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    connect_timeout=max(1, math.ceil(settings.connect_timeout)),
                    ping_interval=ping_interval,
                    max_outstanding_pings=max(
                        1, math.ceil(settings.keepalive_timeout / ping_interval)
                    ),
                    # A publish waiting for a full buffer to drain gives up after this.
                    flush_timeout=settings.keepalive_timeout,
                    error_cb=connection._on_error,
                    closed_cb=connection._on_closed,
                    **options,
                )
            if settings.tls and not _uses_tls(client):
                raise ConnectError(
                    url,
                    "the NATS server does not offer TLS: dial a nats:// address, or "
                    "enable TLS on the server",
                )
        except BaseException as exc:
            connection._closing = True
            if client.is_connected:
                await connection.close()
            else:
                _abandon(client)
            if isinstance(exc, ConnectError | ConfigError) or not isinstance(exc, Exception):
                raise
            if isinstance(exc, ImportError):  # creds_file without the nkeys package
                raise ConfigError(f"creds_file needs the nkeys package: {exc}") from exc
            if isinstance(exc, nats.errors.NoServersError) and connection._failure is not None:
                exc = connection._failure  # what actually went wrong, not "no servers"
            if isinstance(exc, TimeoutError) and connection._failure is None:
                reason = f"no answer within {settings.connect_timeout} s"
            else:
                reason = _connect_failure(exc, settings)
            raise ConnectError(url, reason) from exc
        logger.debug("connected to NATS at %s as %r", url, settings.name)
        return connection

    def add(self, session: NatsSession) -> None:
        """Let *session* hear about the connection's loss."""
        self.sessions.add(session)
        if self.lost.is_set():
            session._lose(self.loss_reason())

    def discard(self, session: NatsSession) -> None:
        """Forget *session* (it has ended)."""
        self.sessions.discard(session)
        for subscription, owner in list(self.subscriptions.items()):
            if owner is session:
                del self.subscriptions[subscription]

    def loss_reason(self) -> str:
        """Why the connection is gone, as sessions report it."""
        if self._closing:
            return "the connection to NATS was closed"
        error = self.client.last_error
        detail = describe(error) if error is not None else "closed"
        return f"the connection to NATS at {self.url} ended ({detail})"

    async def close(self, flush_time: float = _CLOSE_TIMEOUT) -> None:
        """Flush what is queued (for up to *flush_time* seconds) and close; never raises."""
        self._closing = True
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(flush_time) as scope, contextlib.suppress(Exception):
                # nats-py's close() writes what is still queued before closing.
                await self.client.close()
            if scope.cancelled_caught:
                _abandon(self.client)  # a server that stopped reading: drop the rest
        self.lost.set()

    async def _on_closed(self) -> None:
        reason = self.loss_reason()
        if not self._closing:
            logger.warning("%s", reason)
        self.lost.set()
        for session in list(self.sessions):
            session._lose(reason)

    async def _on_error(self, error: Exception) -> None:
        self._failure = error
        if isinstance(error, nats.errors.SlowConsumerError):
            # nats-py dropped a message it could not queue: the session it was
            # for can no longer be complete.
            session = self.subscriptions.get(error.sub)
            if session is not None:
                session._broken(
                    "messages lost: nats-py dropped messages for this slow consumer "
                    "(subscription pending limits exceeded)"
                )
            return
        text = describe(error)
        if "permissions violation" in text.lower():
            # The server refused a publish or a subscription: the messages
            # concerned vanish, so the sessions they belong to end now.
            concerned = [session for session in self.sessions if session._concerns(text)]
            for session in concerned:
                session._broken(f"NATS denied a permission this session needs ({text})")
            if not concerned:
                logger.warning("NATS on %s: %s", self.url, text)
            return
        logger.debug("NATS on %s: %s", self.url, text)
