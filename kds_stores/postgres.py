"""PostgresStore: the Store contract on PostgreSQL, for a production global control plane.

Several control-plane instances may share one database: commits are serialised by
a row lock, so revision order is commit order across every writer, and followers
are woken by ``LISTEN``/``NOTIFY`` with polling as the safety net. The schema is
created and upgraded by explicit, versioned migrations (:func:`migrate_up`, or
``kds-cp migrate up``), never implicitly by opening a store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import ssl
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, cast, final

import anyio
import asyncpg
import attrs

from kds.catalog import DEFAULT_CATALOG
from kds.errors import (
    CompactedError,
    ConfigError,
    NotFoundError,
    StoreClosedError,
    StoreError,
    StoreUnavailableError,
)
from kds.store import (
    DEFAULT_READ_LIMIT,
    Cursor,
    Snapshot,
    StoredVersion,
    check_read_args,
    matches,
)
from kds_stores._log import (
    Commit,
    DbKey,
    LogStore,
    Row,
    collection_paused,
    cursor_from_db,
    db_key,
    decode_events,
    text_from_db,
    text_to_db,
    to_micros,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence

    from asyncpg.pool import PoolConnectionProxy

    from kds.resource import Catalog, Resource, ResourceKey
    from kds.store import Event

__all__ = [
    "LISTENER_APPLICATION_NAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Migration",
    "PostgresSettings",
    "PostgresStore",
    "TlsMode",
    "migrate_up",
    "schema_version",
]

_log = logging.getLogger(__name__)

_Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

TlsMode: TypeAlias = Literal["disable", "verifyNone", "verifyCa", "verifyFull"]
"""How to secure the connection to PostgreSQL (the names Kuma's store settings use).

* ``disable``: plain TCP;
* ``verifyNone``: TLS, but any server certificate is accepted (encrypts, does not
  authenticate the server);
* ``verifyCa``: TLS with a server certificate signed by ``ca_file``;
* ``verifyFull``: as ``verifyCa``, and the certificate must name ``host``. Without a
  ``ca_file`` the system's trusted CAs are used.
"""

_TLS_MODES: Final = ("disable", "verifyNone", "verifyCa", "verifyFull")
_MAX_IDENTIFIER_BYTES: Final = 63  # PostgreSQL's NAMEDATALEN - 1
_MIGRATE_COMMAND: Final = "kds-cp migrate up"


def _positive(field: str, value: object) -> None:
    # Typed as numbers, but settings may come from anywhere: check what is there.
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"postgres {field} must be a number > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class PostgresSettings:
    """How to reach the database; the fields Kuma's ``store.postgres`` section has.

    The password is kept out of ``repr`` and of every message kds writes.

    Raises:
        ConfigError: a field is invalid (checked on construction), naming the field.
    """

    host: str = "127.0.0.1"
    """Server host name or IP address."""
    port: int = 5432
    """Server TCP port."""
    user: str = "kds"
    """Role to connect as."""
    password: str = attrs.field(default="", repr=False)
    """The role's password; empty for none (trust or certificate authentication)."""
    db_name: str = "kds"
    """Database name."""
    schema: str = "public"
    """Schema holding the kds tables (created by :func:`migrate_up` if missing).

    Several independent stores can share one database, each in its own schema.
    """
    tls_mode: TlsMode = "disable"
    """See :data:`TlsMode`. Plain TCP by default, as Kuma: most in-cluster databases
    have no TLS. A warning is logged when a non-loopback host is reached without it."""
    ca_file: str | None = None
    """PEM file of the CA(s) that sign the server certificate (``verifyCa`` needs it)."""
    cert_file: str | None = None
    """PEM client certificate, for servers that authenticate clients by certificate."""
    key_file: str | None = None
    """PEM private key of ``cert_file`` (required with it)."""
    disable_sni: bool = False
    """Do not send the server name in the TLS handshake (for proxies that choke on it).

    Hostname verification needs the name, so this cannot be combined with ``verifyFull``.
    """
    connect_timeout: float = 5.0
    """Seconds to wait for a new connection before giving up."""
    command_timeout: float = 60.0
    """Seconds any one statement may take before the operation fails as unavailable
    (a dead server that never answers is found out, not waited on forever)."""
    pool_size: int = 10
    """Most connections the store opens at once (plus one for ``LISTEN``)."""

    def __attrs_post_init__(self) -> None:
        for field in ("host", "user", "db_name", "schema"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value or "\x00" in value:
                raise ConfigError(f"postgres {field} must be a non-empty string, got {value!r}")
        if not isinstance(self.password, str):
            raise ConfigError("postgres password must be a string")
        if len(self.schema.encode()) > _MAX_IDENTIFIER_BYTES:
            raise ConfigError(
                f"postgres schema must be at most {_MAX_IDENTIFIER_BYTES} bytes, "
                f"got {self.schema!r}"
            )
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigError(f"postgres port must be an integer, got {self.port!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"postgres port must be within 1..65535, got {self.port}")
        if self.tls_mode not in _TLS_MODES:
            raise ConfigError(
                f"postgres tls_mode must be one of {', '.join(_TLS_MODES)}, got {self.tls_mode!r}"
            )
        if self.tls_mode == "verifyCa" and not self.ca_file:
            raise ConfigError("postgres tls_mode verifyCa needs ca_file (the CA to verify with)")
        if self.disable_sni and self.tls_mode == "verifyFull":
            raise ConfigError(
                "postgres disable_sni cannot be combined with tls_mode verifyFull: verifying "
                "the host name needs the name sent in the handshake; use verifyCa"
            )
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("postgres cert_file and key_file must be given together")
        for field in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, field)
            if path and not os.path.isfile(path):
                raise ConfigError(f"postgres {field} {path!r} does not exist or is not a file")
        _positive("connect_timeout", self.connect_timeout)
        _positive("command_timeout", self.command_timeout)
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int):
            raise ConfigError(f"postgres pool_size must be an integer, got {self.pool_size!r}")
        if self.pool_size < 1:
            raise ConfigError(f"postgres pool_size must be >= 1, got {self.pool_size}")

    @property
    def address(self) -> str:
        """``user@host:port/db_name`` (schema ``s``): where this points, without secrets."""
        return f"{self.user}@{self.host}:{self.port}/{self.db_name} (schema {self.schema})"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS client context for :attr:`tls_mode`, or ``None`` for ``disable``.

        Raises:
            ConfigError: a certificate or key file cannot be loaded.
        """
        if self.tls_mode == "disable":
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
            if self.tls_mode != "verifyFull":
                context.check_hostname = False
            if self.tls_mode == "verifyNone":
                context.verify_mode = ssl.CERT_NONE
            if self.cert_file and self.key_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"postgres TLS files cannot be loaded: {exc}") from exc
        if self.disable_sni:
            return _NoSniContext.adopt(context)
        return context

    def _connect_kwargs(self, application_name: str = "kds") -> dict[str, Any]:
        ssl_context = self.ssl_context()
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password or None,
            "database": self.db_name,
            "ssl": ssl_context if ssl_context is not None else False,
            "timeout": self.connect_timeout,
            "command_timeout": self.command_timeout,
            # Shown in pg_stat_activity, so an operator can tell kds's connections apart.
            "server_settings": {"application_name": application_name},
        }


class _NoSniContext(ssl.SSLContext):
    """An SSL context that never sends the server name (SNI) in its handshakes."""

    @classmethod
    def adopt(cls, context: ssl.SSLContext) -> _NoSniContext:
        # SSLContext settings cannot be copied wholesale; the object is re-classed
        # instead (a subclass that adds no state), keeping every setting made.
        context.__class__ = cls
        return context  # type: ignore[return-value]

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        kwargs["server_hostname"] = None
        return super().wrap_bio(*args, **kwargs)


async def _keep_session(_connection: object) -> None:
    """The pool's reset between uses of a connection: nothing to undo.

    The store never changes session state on pooled connections (no SET, LISTEN,
    advisory session locks or cursors), and asyncpg rolls back a transaction left
    open before calling this. The default reset would cost a round trip per use.
    """


def _set_event(event: asyncio.Event, *_: object) -> None:
    event.set()


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


# -- migrations --------------------------------------------------------------------


@attrs.frozen
class Migration:
    """One step of the schema: applied once, in order, and recorded.

    Attributes:
        version: its number; the schema version after it is applied.
        description: what it does, recorded with it.
        statements: SQL run in order; ``{schema}`` stands for the quoted schema name.
    """

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: Final = (
    Migration(
        1,
        "resources, events, tracking and the log's identity",
        (
            # One row: the epoch (this log's identity, random at creation), the last
            # revision written and the compaction horizon. Commits lock it, which is
            # what makes revision order the commit order.
            """
            CREATE TABLE {schema}.kds_meta (
                id integer PRIMARY KEY CHECK (id = 1),
                epoch text NOT NULL,
                head bigint NOT NULL,
                horizon bigint NOT NULL
            )
            """,
            """
            INSERT INTO {schema}.kds_meta (id, epoch, head, horizon)
            VALUES (1, replace(gen_random_uuid()::text, '-', ''), 0, 0)
            """,
            # The view. COLLATE "C": keys sort by code point, as ResourceKey does in
            # Python, whatever the database's default collation. mesh '' stands for
            # a global-scoped key (NULLs would not collide in the primary key).
            """
            CREATE TABLE {schema}.kds_resources (
                type text COLLATE "C" NOT NULL,
                mesh text COLLATE "C" NOT NULL,
                name text COLLATE "C" NOT NULL,
                labels bytea NOT NULL,
                spec bytea NOT NULL,
                version bigint NOT NULL,
                created_at bigint NOT NULL,
                modified_at bigint NOT NULL,
                PRIMARY KEY (type, mesh, name)
            )
            """,
            # The log: one msgpack array per event (the layout kds_stores._log
            # documents), so a follower's page is two columns per row.
            """
            CREATE TABLE {schema}.kds_events (
                revision bigint PRIMARY KEY,
                data bytea NOT NULL
            )
            """,
            # Origins and epochs are arbitrary strings (stored as UTF-8 bytes with
            # surrogates passed through); revisions may exceed bigint.
            """
            CREATE TABLE {schema}.kds_tracking (
                origin bytea PRIMARY KEY,
                epoch bytea NOT NULL,
                revision numeric NOT NULL
            )
            """,
        ),
    ),
    Migration(
        2,
        "commit support: a write counter and kds_lock_for_commit()",
        (
            # Counts write transactions, tracking-only ones included (which do not
            # move the head): a commit planned on rows read without the lock is
            # written only if the counter is still what it read, which proves that
            # nothing was written in between.
            "ALTER TABLE {schema}.kds_meta ADD COLUMN writes bigint NOT NULL DEFAULT 0",
            # A commit that must lock the log before reading the rows it checks
            # needs those reads to see every commit that finished while it waited
            # for the lock: in one SQL statement they would not (its snapshot
            # predates the wait). In a PL/pgSQL function each statement takes a new
            # snapshot, so the lock and the reads make one round trip, not three.
            """
            CREATE FUNCTION {schema}.kds_lock_for_commit(
                types text[], meshes text[], names text[], origins bytea[]
            )
            RETURNS TABLE (
                kind smallint, type text, mesh text, name text, labels bytea,
                spec bytea, version bigint, created_at bigint, epoch bytea,
                revision numeric
            )
            LANGUAGE plpgsql VOLATILE AS $body$
            DECLARE
                locked_head bigint;
                locked_writes bigint;
            BEGIN
                SELECT m.head, m.writes INTO locked_head, locked_writes
                FROM {schema}.kds_meta AS m WHERE m.id = 1 FOR UPDATE;
                RETURN QUERY SELECT * FROM {schema}.kds_commit_inputs(
                    locked_head, locked_writes, types, meshes, names, origins
                );
            END
            $body$
            """,
            # The reads themselves, in one statement (one snapshot) -- also what a
            # commit runs without the lock, together with the head it read.
            # kind 0: the head (version) and write counter (created_at); 1: the
            # stored row of a key asked for; 2: the cursor of an origin asked for.
            """
            CREATE FUNCTION {schema}.kds_commit_inputs(
                head bigint, writes bigint,
                types text[], meshes text[], names text[], origins bytea[]
            )
            RETURNS TABLE (
                kind smallint, type text, mesh text, name text, labels bytea,
                spec bytea, version bigint, created_at bigint, epoch bytea,
                revision numeric
            )
            LANGUAGE sql STABLE AS $body$
                SELECT 0::smallint, NULL::text, NULL::text, NULL::text, NULL::bytea,
                    NULL::bytea, head, writes, NULL::bytea, NULL::numeric
                UNION ALL
                SELECT 1::smallint, r.type, r.mesh, r.name, r.labels, r.spec,
                    r.version, r.created_at, NULL::bytea, NULL::numeric
                FROM unnest(types, meshes, names) AS k(type, mesh, name)
                JOIN {schema}.kds_resources AS r
                    ON r.type = k.type AND r.mesh = k.mesh AND r.name = k.name
                UNION ALL
                SELECT 2::smallint, NULL::text, NULL::text, NULL::text, t.origin,
                    NULL::bytea, NULL::bigint, NULL::bigint, t.epoch, t.revision
                FROM {schema}.kds_tracking AS t WHERE t.origin = ANY(origins)
            $body$
            """,
        ),
    ),
)
"""Every migration, in order."""

SCHEMA_VERSION: Final = MIGRATIONS[-1].version
"""The schema version this code reads and writes."""

_MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS {schema}.kds_schema_migrations (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


# OpenSSL's verify codes for a certificate that is valid but names another host
# (X509_V_ERR_HOSTNAME_MISMATCH, _EMAIL_MISMATCH, _IP_ADDRESS_MISMATCH): a CA hint
# would send the operator the wrong way.
_NAME_MISMATCH: Final = frozenset({62, 63, 64})


def _connect_error(settings: PostgresSettings, exc: BaseException, action: str) -> KdsStoreError:
    """Translate a failure to connect or to run a statement into a kds error."""
    where = settings.address
    if isinstance(
        exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
    ):
        return ConfigError(f"postgres at {where} refused the credentials while {action}: {exc}")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return ConfigError(f"postgres database at {where} does not exist: {exc}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _NAME_MISMATCH:
            hint = (
                f"it does not name host {settings.host!r}: set host to a name the "
                "certificate has, or use tls_mode verifyCa"
            )
        elif settings.tls_mode in ("verifyCa", "verifyFull"):
            hint = "set ca_file to the CA that signed it"
        else:
            hint = "check tls_mode"
        return ConfigError(
            f"postgres server certificate at {where} cannot be verified "
            f"(tls_mode {settings.tls_mode}): {exc.verify_message.rstrip('.')}; {hint}"
        )
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return ConfigError(
            f"postgres at {where} does not accept TLS, but tls_mode is {settings.tls_mode}: "
            "enable TLS on the server or set tls_mode to disable"
        )
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", "") or ""
        # 08: connection exception; 53: insufficient resources; 57: operator
        # intervention (shutdown, crash); 40: serialization failure / deadlock. All
        # of them pass; the caller may retry.
        if sqlstate[:2] in ("08", "53", "57", "40"):
            return StoreUnavailableError(f"postgres at {where} failed while {action}: {exc}")
        return StoreError(f"postgres at {where} failed while {action}: {exc}")
    if isinstance(
        exc,
        OSError | asyncio.TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError,
    ):
        return StoreUnavailableError(
            f"postgres at {where} is unreachable while {action}: "
            f"{type(exc).__name__}: {str(exc) or 'timed out'}"
        )
    return StoreError(f"postgres at {where} failed while {action}: {type(exc).__name__}: {exc}")


KdsStoreError: TypeAlias = StoreError | ConfigError

# Everything asyncpg raises. InternalClientError means the connection's protocol
# state is broken (typically a connection lost mid-operation).
_RETRYABLE_DRIVER_ERRORS: Final = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def _connection_lost(exc: BaseException) -> bool:
    """True when *exc* leaves the connection unusable (as opposed to a refused statement)."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", "") or ""
        return isinstance(exc, asyncpg.PostgresConnectionError) or sqlstate[:2] in ("08", "57")
    return isinstance(
        exc, OSError | asyncio.TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError
    )


async def _connect(
    settings: PostgresSettings, action: str, application_name: str = "kds"
) -> asyncpg.Connection:
    if settings.tls_mode == "disable" and settings.host not in ("127.0.0.1", "::1", "localhost"):
        _log.warning("postgres at %s: connecting without TLS (tls_mode disable)", settings.address)
    try:
        connection: asyncpg.Connection = await asyncpg.connect(
            **settings._connect_kwargs(application_name)
        )
    except (*_RETRYABLE_DRIVER_ERRORS, ssl.SSLError) as exc:
        raise _connect_error(settings, exc, action) from exc
    return connection


async def schema_version(settings: PostgresSettings) -> int:
    """The highest migration applied to the database *settings* point at (0 for none).

    Raises:
        StoreUnavailableError: the server cannot be reached.
        ConfigError: the settings are wrong (credentials, database, TLS).
    """
    connection = await _connect(settings, "reading the schema version")
    try:
        return await _applied_version(connection, settings)
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await connection.close()


async def _applied_version(connection: _Connection, settings: PostgresSettings) -> int:
    table = f"{_quote(settings.schema)}.kds_schema_migrations"
    try:
        version = await connection.fetchval(f"SELECT max(version) FROM {table}")  # noqa: S608
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return 0
    except _RETRYABLE_DRIVER_ERRORS as exc:
        raise _connect_error(settings, exc, "reading the schema version") from exc
    return int(version or 0)


async def migrate_up(settings: PostgresSettings, *, to: int | None = None) -> list[Migration]:
    """Bring the schema up to :data:`SCHEMA_VERSION` (or *to*); return the migrations applied.

    Idempotent (an up-to-date schema is left alone) and safe to run from several
    processes at once: a transaction-scoped advisory lock on the schema name makes
    them take turns, and each applies what the one before it left to do. All
    pending migrations apply in one transaction: a failure leaves the schema as
    it was.

    Args:
        settings: the database and schema to migrate.
        to: stop after this version (for staged upgrades and tests).

    Raises:
        ConfigError: the settings are wrong, or the schema is newer than this code
            (upgrade kds instead).
        StoreUnavailableError: the server cannot be reached.
        ValueError: *to* is not a known version.
    """
    target = SCHEMA_VERSION if to is None else to
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"to must be within 0..{SCHEMA_VERSION}, got {to}")
    schema = _quote(settings.schema)
    connection = await _connect(settings, "migrating")
    applied: list[Migration] = []
    try:
        async with connection.transaction():
            await connection.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"kds-migrate:{settings.schema}"
            )
            await connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await connection.execute(_MIGRATIONS_TABLE.format(schema=schema))
            current = await _applied_version(connection, settings)
            if current > SCHEMA_VERSION:
                raise _newer_schema(settings, current)
            for migration in MIGRATIONS:
                if migration.version <= current or migration.version > target:
                    continue
                for statement in migration.statements:
                    await connection.execute(statement.format(schema=schema))
                await connection.execute(
                    f"INSERT INTO {schema}.kds_schema_migrations (version, description) "  # noqa: S608
                    "VALUES ($1, $2)",
                    migration.version,
                    migration.description,
                )
                applied.append(migration)
    except _RETRYABLE_DRIVER_ERRORS as exc:
        raise _connect_error(settings, exc, "migrating") from exc
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await connection.close()
    for migration in applied:
        _log.info(
            "postgres at %s: applied migration %d (%s)",
            settings.address,
            migration.version,
            migration.description,
        )
    return applied


def _newer_schema(settings: PostgresSettings, version: int) -> ConfigError:
    return ConfigError(
        f"postgres at {settings.address} has kds schema version {version}, but this version "
        f"of kds understands only up to {SCHEMA_VERSION}: upgrade kds"
    )


# -- the store ---------------------------------------------------------------------

_RESOURCE_COLUMNS: Final = "type, mesh, name, labels, spec, version, created_at, modified_at"
LISTENER_APPLICATION_NAME: Final = "kds-listen"
"""``application_name`` of the connection a store LISTENs on (see pg_stat_activity)."""
_LOOPBACK_RETRY: Final = 0.05  # first pause before reconnecting the listener, seconds


def _channel(schema: str) -> str:
    """The NOTIFY channel of a schema: readable when it fits in an identifier."""
    channel = f"kds_events.{schema}"
    if len(channel.encode()) <= _MAX_IDENTIFIER_BYTES:
        return channel
    return "kds_events." + hashlib.sha256(schema.encode()).hexdigest()[:32]


@final
class PostgresStore(LogStore):
    """A :class:`~kds.Store` in a PostgreSQL schema, shared by any number of processes.

    Storage layout (schema version :data:`SCHEMA_VERSION`, recorded in
    ``kds_schema_migrations``): ``kds_meta`` (epoch, head, horizon), ``kds_resources``
    (the view), ``kds_events`` (the log, one msgpack blob per event) and
    ``kds_tracking``, all in :attr:`PostgresSettings.schema`. The layout is the one
    SQLiteStore uses, table for table.

    Ordering: every commit holds the ``kds_meta`` row's lock while it writes
    revisions numbered from the head stored there, until it has committed, so
    commits -- from this process or any other -- take turns, and a transaction
    that took revision 7 has committed before any transaction can take 8. A
    follower therefore never passes a revision that is committed later. Within a
    process, concurrent :meth:`commit` calls are grouped into one batch (one lock,
    one WAL flush), which is what makes many small concurrent commits fast; each
    call still succeeds or fails alone, because conflicts are found before
    anything is written. A batch is planned on rows read without the lock and
    written by one self-committing statement that is fenced on a write counter
    (two round trips); when another process wrote in between, it is planned again
    under the lock (see :meth:`_apply_batch`).

    Followers: each commit sends ``NOTIFY`` with the new head as payload (a few
    bytes). The store keeps one extra connection that ``LISTEN``s and wakes
    :meth:`wait_for_commit` at once; should it drop, it reconnects with backoff,
    and meanwhile (and always, as a safety net for a lost notification) waiters
    poll the head every ``poll_interval`` seconds.

    Failures: a lost connection or a restarted server fails the operation in
    flight with :class:`~kds.errors.StoreUnavailableError` (for a commit: done
    completely or not at all); the pool replaces broken connections, so the store
    works again as soon as the server is back, without being reopened.

    The store runs on asyncio (as asyncpg does). Opening it does not create or
    upgrade the schema: run :func:`migrate_up` (``kds-cp migrate up``) first.

    Args:
        settings: where the database is; a mapping of :class:`PostgresSettings`
            fields is accepted too.
        catalog: the resource types this store accepts.
        poll_interval: seconds between head checks while :meth:`wait_for_commit`
            waits, bounding how late a lost notification can make a follower.
        listen: wake waiters with ``LISTEN``/``NOTIFY``; off, they only poll.

    Raises:
        ConfigError: a setting is invalid.
    """

    def __init__(
        self,
        settings: PostgresSettings | Mapping[str, Any] | None = None,
        *,
        catalog: Catalog = DEFAULT_CATALOG,
        poll_interval: float = 1.0,
        listen: bool = True,
    ) -> None:
        super().__init__(catalog=catalog, poll_interval=poll_interval)
        if settings is None:
            settings = PostgresSettings()
        elif not isinstance(settings, PostgresSettings):
            try:
                settings = PostgresSettings(**settings)
            except TypeError as exc:
                raise ConfigError(f"postgres settings: {exc}") from exc
        self.settings = settings
        self._listen = listen
        self._pool: asyncpg.Pool | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._listening = False
        self._lifecycle_lock: anyio.Lock | None = None
        # Awaited inside each commit transaction, after its writes and before COMMIT.
        # Only tests set it: holding transactions open is how they show that a
        # slow commit cannot be overtaken by a later revision.
        self._before_commit: Callable[[], Awaitable[None]] | None = None
        self._pessimistic_batches = 0
        schema = _quote(settings.schema)
        self._channel = _channel(settings.schema)
        self._sql = _Statements(schema)

    def __repr__(self) -> str:
        return f"PostgresStore({self.settings.address})"

    @property
    def listening(self) -> bool:
        """Whether notifications are being received right now (else waiters poll)."""
        return self._listening

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        if self._lifecycle_lock is None:
            self._lifecycle_lock = anyio.Lock()
        async with self._lifecycle_lock:
            if self._open:
                return
            settings = self.settings
            try:
                pool = await asyncpg.create_pool(
                    min_size=1,
                    max_size=settings.pool_size,
                    reset=_keep_session,
                    **settings._connect_kwargs(),
                )
            except (*_RETRYABLE_DRIVER_ERRORS, ssl.SSLError) as exc:
                raise _connect_error(settings, exc, "opening") from exc
            try:
                async with pool.acquire() as connection:
                    version = await _applied_version(connection, settings)
                    if version == 0:
                        raise ConfigError(
                            f"postgres at {settings.address} has no kds schema: run "
                            f"`{_MIGRATE_COMMAND}` (or `python -m kds migrate up`) with the "
                            "same store settings first"
                        )
                    if version > SCHEMA_VERSION:
                        raise _newer_schema(settings, version)
                    if version < SCHEMA_VERSION:
                        raise ConfigError(
                            f"postgres at {settings.address} has kds schema version "
                            f"{version}, this kds needs {SCHEMA_VERSION}: run "
                            f"`{_MIGRATE_COMMAND}` first"
                        )
                    rows = await connection.fetch(self._sql.meta)
            except BaseException as exc:
                pool.terminate()
                if isinstance(exc, _RETRYABLE_DRIVER_ERRORS):
                    raise _connect_error(settings, exc, "opening") from exc
                raise
            if len(rows) != 1:
                pool.terminate()
                raise StoreError(f"{self}: the kds_meta table is damaged (expected one row)")
            self._pool = pool
            self._epoch = rows[0]["epoch"]
            self._known_head = rows[0]["head"]
            self._write_lock = anyio.Lock()
            self._open = True
            if self._listen:
                self._listener_task = asyncio.get_running_loop().create_task(
                    self._listen_loop(), name=f"{self} listener"
                )

    async def aclose(self) -> None:
        if self._lifecycle_lock is None:
            return
        with anyio.CancelScope(shield=True):
            async with self._lifecycle_lock:
                if not self._open:
                    return
                self._open = False
                await self._stop_writer()
                if self._listener_task is not None:
                    self._listener_task.cancel()
                    await asyncio.wait([self._listener_task])
                    self._listener_task = None
                if self._pool is not None:
                    try:
                        await asyncio.wait_for(self._pool.close(), self.settings.connect_timeout)
                    except (TimeoutError, Exception):
                        self._pool.terminate()
                    self._pool = None

    # -- notifications ---------------------------------------------------------------

    async def _listen_loop(self) -> None:
        """Keep one connection LISTENing; reconnect with backoff when it drops."""
        pause = _LOOPBACK_RETRY
        while self._open:
            connection: asyncpg.Connection | None = None
            try:
                connection = await _connect(
                    self.settings, "listening for commits", LISTENER_APPLICATION_NAME
                )
                lost = asyncio.Event()
                connection.add_termination_listener(functools.partial(_set_event, lost))
                await connection.add_listener(self._channel, self._on_notify)
                self._listening = True
                # Commits made while no connection listened sent notifications
                # nobody heard: have every waiter look at the head now.
                self._wake()
                pause = _LOOPBACK_RETRY
                await lost.wait()
                _log.warning("%s: the LISTEN connection dropped; polling until it is back", self)
            except (StoreError, ConfigError, *_RETRYABLE_DRIVER_ERRORS) as exc:
                _log.debug("%s: cannot listen for commits: %s", self, exc)
            finally:
                self._listening = False
                if connection is not None:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), 1.0)
            await asyncio.sleep(pause)
            pause = min(pause * 2, self._poll_interval)

    def _on_notify(
        self, _connection: _Connection, _pid: int, _channel: str, payload: object, /
    ) -> None:
        try:
            head = int(str(payload))
        except ValueError:
            self._wake()  # someone else's message on our channel: just look
            return
        self._saw_head(head)

    # -- driver calls ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self, action: str) -> AsyncIterator[_Connection]:
        """A pooled connection; every driver error inside becomes a kds error."""
        self._check_open()
        pool = self._pool
        assert pool is not None  # noqa: S101 -- set whenever open
        try:
            async with pool.acquire(timeout=self.settings.connect_timeout) as connection:
                try:
                    yield connection
                except _RETRYABLE_DRIVER_ERRORS as exc:
                    if _connection_lost(exc):
                        # Dropped, not returned: resetting a broken connection for
                        # reuse would fail in turn.
                        connection.terminate()
                    raise
        except (*_RETRYABLE_DRIVER_ERRORS, ssl.SSLError) as exc:
            if not self._open:
                raise StoreClosedError(f"{self} was closed while {action}") from exc
            error = _connect_error(self.settings, exc, action)
            if isinstance(error, StoreUnavailableError):
                # The server may have restarted: every pooled connection is likely
                # dead. Have the pool replace them all rather than fail once per
                # stale connection.
                await pool.expire_connections()
            raise error from exc

    async def _fetch(self, sql: str, *args: Any, action: str) -> list[asyncpg.Record]:
        async with self._connection(action) as connection:
            rows: list[asyncpg.Record] = await connection.fetch(sql, *args)
            return rows

    # -- writes --------------------------------------------------------------------

    async def _apply_batch(self, batch: list[Commit]) -> None:
        """Write *batch*: optimistically in two round trips, else under the lock.

        Optimistic: read the head, the write counter and the rows the batch checks
        (one statement, one snapshot, no lock), plan, and send one statement that
        writes everything only if the write counter is unchanged -- it takes the
        log's lock to check, so no other commit can slip in -- and commits by
        itself. If another process wrote in between, nothing was written: plan
        again under the lock (BEGIN, lock and read, write, COMMIT), and stay on
        that path for a while, since the log is contended.
        """
        keys = {key for request in batch for key in request.keys}
        origins = {r.tracking.origin for r in batch if r.tracking is not None}
        if self._pessimistic_batches > 0:
            self._pessimistic_batches -= 1
        else:
            async with self._connection("committing") as connection:
                inputs = await self._commit_inputs(connection, keys, origins, lock=False)
                plan = self._plan_batch(batch, *inputs)
                if await self._write(connection, plan):
                    self._finish(plan)
                    return
            self._pessimistic_batches = _PESSIMISTIC_BATCHES
        async with self._connection("committing") as connection:
            transaction = connection.transaction()
            await transaction.start()
            try:
                inputs = await self._commit_inputs(connection, keys, origins, lock=True)
                plan = self._plan_batch(batch, *inputs)
                if not await self._write(connection, plan):
                    raise StoreError(f"{self}: the log changed while this commit held its lock")
                await transaction.commit()
            except BaseException:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await transaction.rollback()
                raise
        self._finish(plan)

    def _plan_batch(
        self,
        batch: list[Commit],
        head: int,
        writes: int,
        rows: dict[DbKey, Row | None],
        tracked: dict[str, Cursor],
    ) -> _BatchPlan:
        """Plan every request of *batch* on the rows read; conflicts fail their request."""
        plan = _BatchPlan(
            start=head,
            head=head,
            writes=writes,
            now=to_micros(datetime.now(UTC)),
            stored=frozenset(rows),
        )
        for request in batch:
            try:
                changes, local, revision = self._plan(request, rows, tracked, plan.head, plan.now)
            except Exception as exc:  # the caller's own error (conflict, not found)
                self._packer.reset()
                plan.outcomes.append((request, exc))
                continue
            plan.events.extend((change[0], change[1]) for change in changes)
            rows.update(local)
            plan.final.update(local)
            if request.tracking is not None:
                tracked[request.tracking.origin] = request.tracking.cursor
                plan.tracking[request.tracking.origin] = request.tracking.cursor
            plan.head = revision
            plan.outcomes.append((request, revision))
        return plan

    async def _write(self, connection: _Connection, plan: _BatchPlan) -> bool:
        """Write *plan*; False if another commit came first (then nothing was written).

        Outside a transaction the statement is one of its own: it has committed
        (and notified) when it returns, unless a test holds it open
        (``_before_commit``).
        """
        if not plan.events and not plan.tracking:
            return True  # nothing to write: every request failed, or only no-ops
        args = (
            *_write_args(plan),
            plan.head,
            plan.start,
            plan.writes,
            self._channel,
        )
        if self._before_commit is None:
            applied = await connection.fetch(self._sql.write, *args)
            return bool(applied)
        async with connection.transaction():
            applied = await connection.fetch(self._sql.write, *args)
            await self._before_commit()
        return bool(applied)

    def _finish(self, plan: _BatchPlan) -> None:
        """The batch is durable: resolve its callers and wake followers."""
        for request, outcome in plan.outcomes:
            if isinstance(outcome, Exception):
                request.fail(outcome)
            else:
                request.resolve(outcome)
        self._saw_head(plan.head)

    async def _commit_inputs(
        self,
        connection: _Connection,
        keys: Collection[DbKey],
        origins: Collection[str],
        *,
        lock: bool,
    ) -> tuple[int, int, dict[DbKey, Row | None], dict[str, Cursor]]:
        """Return the head, the write counter, the rows of *keys*, the cursors of *origins*.

        With *lock*, first take the log's lock (inside the caller's transaction).
        """
        head = writes = -1
        found: dict[DbKey, Row | None] = {}
        tracked: dict[str, Cursor] = {}
        rows = await connection.fetch(
            self._sql.lock_for_commit if lock else self._sql.commit_inputs,
            [key[0] for key in keys],
            [key[1] for key in keys],
            [key[2] for key in keys],
            [text_to_db(origin) for origin in origins],
        )
        for kind, t, m, n, labels, spec, version, created, epoch, revision in rows:
            if kind == 0:
                head, writes = version, created
            elif kind == 1:
                found[(t, m, n)] = (labels, spec, version, created)
            else:
                tracked[text_from_db(labels)] = cursor_from_db(epoch, int(revision))
        if head < 0:
            raise StoreError(f"{self}: the kds_meta table is damaged (it has no row)")
        return head, writes, found, tracked

    async def compact(self, through: int) -> None:
        self._check_open()
        if through < 0:
            raise ValueError(f"through must be within 0..head, got {through}")
        assert self._write_lock is not None  # noqa: S101 -- set whenever open
        async with self._write_lock, self._connection("compacting") as connection:
            # Shielded so that a cancelled caller cannot leave the connection inside
            # the transaction; the transaction itself is all or nothing.
            with anyio.CancelScope(shield=True):
                async with connection.transaction():
                    (row,) = await connection.fetch(self._sql.lock_meta)
                    head, horizon = row["head"], row["horizon"]
                    if through > head:
                        raise ValueError(f"through must be within 0..{head}, got {through}")
                    if through > horizon:
                        await connection.execute(self._sql.compact, through)
                self._recent.forget_through(through)

    # -- reads ---------------------------------------------------------------------

    async def head(self) -> int:
        rows = await self._fetch(self._sql.meta, action="reading the head")
        head: int = rows[0]["head"]
        self._saw_head(head)
        return head

    async def horizon(self) -> int:
        rows = await self._fetch(self._sql.meta, action="reading the horizon")
        horizon: int = rows[0]["horizon"]
        return horizon

    async def get(self, key: ResourceKey) -> Resource:
        self._check_open()
        stored_key = db_key(key)
        if stored_key is None:
            raise NotFoundError(key)
        rows = await self._fetch(self._sql.get, *stored_key, action="reading a resource")
        if not rows:
            raise NotFoundError(key)
        return self._resources(_tuples(rows))[0]

    async def find_many(self, keys: Collection[ResourceKey]) -> dict[ResourceKey, Resource]:
        self._check_open()
        stored = [k for k in {db_key(key) for key in keys} if k is not None]
        if not stored:
            return {}
        rows = await self._fetch(
            self._sql.find_many,
            [k[0] for k in stored],
            [k[1] for k in stored],
            [k[2] for k in stored],
            action="reading resources",
        )
        return {resource.key: resource for resource in self._resources(_tuples(rows))}

    async def find_versions(
        self, keys: Collection[ResourceKey]
    ) -> dict[ResourceKey, StoredVersion]:
        self._check_open()
        stored = [k for k in {db_key(key) for key in keys} if k is not None]
        if not stored:
            return {}
        rows = await self._fetch(
            self._sql.find_versions,
            [k[0] for k in stored],
            [k[1] for k in stored],
            [k[2] for k in stored],
            action="reading resource versions",
        )
        return self._versions(_tuples(rows))

    async def list_resources(
        self,
        type_name: str | None = None,
        *,
        mesh: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Resource]:
        self._check_open()
        filters: tuple[object, ...] = (type_name, mesh)
        for value in filters:
            if value is not None and (not isinstance(value, str) or not value.isprintable()):
                return []  # no stored key has such a part (names are printable)
        if mesh == "":
            return []  # no resource has an empty mesh ('' stands for "no mesh")
        rows = await self._fetch(self._sql.list, type_name, mesh, action="listing resources")
        resources = self._resources(_tuples(rows))
        return [r for r in resources if matches(r, type_name, mesh, labels)]

    async def snapshot(self, types: Collection[str] | None = None) -> Snapshot:
        self._check_open()
        action = "taking a snapshot"
        # One repeatable-read transaction: the head and the view of one moment.
        async with (
            self._connection(action) as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            head = (await connection.fetch(self._sql.meta))[0]["head"]
            if types is None:
                rows = await connection.fetch(self._sql.list, None, None)
            else:
                rows = await connection.fetch(self._sql.list_types, sorted(set(types)))
        self._saw_head(head)
        return Snapshot(cursor=Cursor(self._epoch, head), resources=self._resources(_tuples(rows)))

    async def read(self, after: int, *, limit: int = DEFAULT_READ_LIMIT) -> list[Event]:
        self._check_open()
        check_read_args(after, limit)
        return await self._read_log(after, limit, self._fetch_events)

    async def _fetch_events(self, after: int, limit: int) -> list[Event]:
        action = "reading events"
        after_arg = min(after, _MAX_BIGINT)  # no revision is higher; bigint takes no more
        rows = await self._fetch(self._sql.read, after_arg, limit, action=action)
        if rows:
            self._saw_head(rows[-1][0])
            with collection_paused():
                events = decode_events(_tuples(rows))
            self._recent.add(after, events)
            return events
        meta = await self._fetch(self._sql.meta, action=action)
        horizon, head = meta[0]["horizon"], meta[0]["head"]
        self._saw_head(head)
        if after < horizon:
            raise CompactedError(after, horizon)
        return []

    async def tracking(self, origin: str) -> Cursor | None:
        self._check_open()
        rows = await self._fetch(
            self._sql.tracking_of, [text_to_db(origin)], action="reading a tracking cursor"
        )
        if not rows:
            return None
        _, epoch, revision = rows[0]
        return cursor_from_db(epoch, int(revision))


_MAX_BIGINT: Final = 2**63 - 1
# After a batch found the log written by someone else, this many batches take the
# lock first instead of trying without it (each failed try costs a round trip).
_PESSIMISTIC_BATCHES: Final = 16


@attrs.define
class _BatchPlan:
    """What one batch will write, and what each of its requests gets back."""

    start: int  # the head the plan was made on
    head: int  # the head after the batch
    writes: int  # the write counter the plan was made on
    now: int  # the batch's timestamp, microseconds
    outcomes: list[tuple[Commit, int | Exception]] = attrs.Factory(list)
    events: list[tuple[int, bytes]] = attrs.Factory(list)
    final: dict[DbKey, Row | None] = attrs.Factory(dict)
    tracking: dict[str, Cursor] = attrs.Factory(dict)
    stored: frozenset[DbKey] = frozenset()  # the keys that had a row before the batch


def _tuples(rows: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
    # Records unpack like tuples, which is all the shared decoders do with a row.
    return cast("list[tuple[Any, ...]]", rows)


def _write_args(plan: _BatchPlan) -> tuple[Any, ...]:
    """The parameters $1..$24 of ``_Statements.write``: one statement writes a batch.

    The view gets each key's final state only (a batch may change a key several
    times, and one statement may not touch a row twice): rows that existed before
    the batch are updated or deleted, new ones plainly inserted (a third cheaper
    than an upsert). The log gets every event.
    """
    removed: list[DbKey] = []
    created: list[tuple[DbKey, Row]] = []
    changed: list[tuple[DbKey, Row]] = []
    for key, row in plan.final.items():
        existed = key in plan.stored
        if row is None:
            if existed:
                removed.append(key)
        elif existed:
            changed.append((key, row))
        else:
            created.append((key, row))
    return (
        [revision for revision, _ in plan.events],
        [data for _, data in plan.events],
        *_key_columns(removed),
        *_row_columns(created, plan.now),
        *_row_columns(changed, plan.now),
        [text_to_db(origin) for origin in plan.tracking],
        [text_to_db(cursor.epoch) for cursor in plan.tracking.values()],
        [cursor.revision for cursor in plan.tracking.values()],
    )


def _key_columns(keys: Sequence[DbKey]) -> tuple[list[str], list[str], list[str]]:
    return [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]


def _row_columns(rows: Sequence[tuple[DbKey, Row]], now: int) -> tuple[list[Any], ...]:
    """Columns type, mesh, name, labels, spec, version, created_at of *rows*, then modified_at.

    Every row a batch writes was planned with the batch's one timestamp, *now*.
    """
    keys = [key for key, _ in rows]
    return (
        *_key_columns(keys),
        [row[0] for _, row in rows],
        [row[1] for _, row in rows],
        [row[2] for _, row in rows],
        [row[3] for _, row in rows],
        [now] * len(rows),
    )


class _Statements:
    """Every SQL statement of one store, with its (quoted) schema name filled in once."""

    def __init__(self, schema: str) -> None:
        s = schema
        self.meta = f"SELECT epoch, head, horizon FROM {s}.kds_meta WHERE id = 1"  # noqa: S608
        self.lock_for_commit = f"SELECT * FROM {s}.kds_lock_for_commit($1, $2, $3, $4)"  # noqa: S608
        self.lock_meta = f"SELECT head, horizon FROM {s}.kds_meta WHERE id = 1 FOR UPDATE"  # noqa: S608
        self.tracking_of = (
            f"SELECT origin, epoch, revision FROM {s}.kds_tracking "  # noqa: S608
            "WHERE origin = ANY($1::bytea[])"
        )
        # One statement writes a whole batch, and only if the write counter is
        # still $27 (what the batch was planned on): `fence` takes the log's lock
        # (waiting for any commit holding it, then re-checking the counter on the
        # row as that commit left it), and every other write reads `fence` first,
        # so when the counter moved nothing at all is written and no row returns.
        # The view gets each key's final state only (a batch may change a key
        # several times; one statement may not touch a row twice); the log gets
        # every event. NOTIFY, when the head moved, goes out at commit.
        self.write = f"""
            WITH fence AS (
                UPDATE {s}.kds_meta SET head = $25::bigint, writes = writes + 1
                WHERE id = 1 AND writes = $27::bigint
                RETURNING head
            ), appended AS (
                INSERT INTO {s}.kds_events (revision, data)
                SELECT * FROM unnest($1::bigint[], $2::bytea[])
                WHERE EXISTS (SELECT FROM fence)
            ), removed AS (
                DELETE FROM {s}.kds_resources AS r
                USING unnest($3::text[], $4::text[], $5::text[]) AS d(type, mesh, name)
                WHERE r.type = d.type AND r.mesh = d.mesh AND r.name = d.name
                    AND EXISTS (SELECT FROM fence)
            ), created AS (
                INSERT INTO {s}.kds_resources ({_RESOURCE_COLUMNS})
                SELECT * FROM unnest(
                    $6::text[], $7::text[], $8::text[], $9::bytea[], $10::bytea[],
                    $11::bigint[], $12::bigint[], $13::bigint[]
                )
                WHERE EXISTS (SELECT FROM fence)
            ), changed AS (
                UPDATE {s}.kds_resources AS r SET
                    labels = u.labels, spec = u.spec, version = u.version,
                    created_at = u.created_at, modified_at = u.modified_at
                FROM unnest(
                    $14::text[], $15::text[], $16::text[], $17::bytea[], $18::bytea[],
                    $19::bigint[], $20::bigint[], $21::bigint[]
                ) AS u({_RESOURCE_COLUMNS})
                WHERE r.type = u.type AND r.mesh = u.mesh AND r.name = u.name
                    AND EXISTS (SELECT FROM fence)
            ), tracked AS (
                INSERT INTO {s}.kds_tracking (origin, epoch, revision)
                SELECT * FROM unnest($22::bytea[], $23::bytea[], $24::numeric[])
                WHERE EXISTS (SELECT FROM fence)
                ON CONFLICT (origin) DO UPDATE SET
                    epoch = EXCLUDED.epoch, revision = EXCLUDED.revision
            )
            SELECT head,
                CASE WHEN head <> $26::bigint THEN pg_notify($28::text, head::text) END
            FROM fence
        """  # noqa: S608
        self.commit_inputs = (
            f"SELECT * FROM {s}.kds_commit_inputs("  # noqa: S608
            f"(SELECT head FROM {s}.kds_meta WHERE id = 1), "
            f"(SELECT writes FROM {s}.kds_meta WHERE id = 1), $1, $2, $3, $4)"
        )
        self.compact = f"""
            WITH dropped AS (DELETE FROM {s}.kds_events WHERE revision <= $1::bigint)
            UPDATE {s}.kds_meta SET horizon = $1::bigint WHERE id = 1
        """  # noqa: S608
        self.get = (
            f"SELECT {_RESOURCE_COLUMNS} FROM {s}.kds_resources "  # noqa: S608
            "WHERE type = $1 AND mesh = $2 AND name = $3"
        )
        self.list = (
            f"SELECT {_RESOURCE_COLUMNS} FROM {s}.kds_resources "  # noqa: S608
            "WHERE ($1::text IS NULL OR type = $1) AND ($2::text IS NULL OR mesh = $2) "
            "ORDER BY type, mesh, name"
        )
        self.find_many = (
            "SELECT r.type, r.mesh, r.name, r.labels, r.spec, r.version, r.created_at, "  # noqa: S608
            "r.modified_at FROM unnest($1::text[], $2::text[], $3::text[]) AS k(type, mesh, name) "
            f"JOIN {s}.kds_resources AS r "
            "ON r.type = k.type AND r.mesh = k.mesh AND r.name = k.name"
        )
        self.find_versions = (
            "SELECT r.type, r.mesh, r.name, r.labels, r.version "  # noqa: S608
            "FROM unnest($1::text[], $2::text[], $3::text[]) AS k(type, mesh, name) "
            f"JOIN {s}.kds_resources AS r "
            "ON r.type = k.type AND r.mesh = k.mesh AND r.name = k.name"
        )
        self.list_types = (
            f"SELECT {_RESOURCE_COLUMNS} FROM {s}.kds_resources "  # noqa: S608
            "WHERE type = ANY($1::text[]) ORDER BY type, mesh, name"
        )

        # A page of events, returned only if the horizon allows reading after $1 --
        # both from this statement's one snapshot. No rows means "nothing after $1"
        # or "compacted": read() tells them apart.
        self.read = (
            f"SELECT revision, data FROM {s}.kds_events "  # noqa: S608
            f"WHERE revision > $1 AND $1 >= (SELECT horizon FROM {s}.kds_meta) "
            "ORDER BY revision LIMIT $2"
        )
