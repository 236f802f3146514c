"""SQLiteStore: the Store contract in one SQLite file, with group commit.

Suited to a control plane on one machine (and to tests): no server to run, durable
on commit, and several processes may open the same file. Writes funnel through one
writer connection per store instance; reads use a second connection and, thanks to
WAL, never wait for the writer.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import uuid
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, cast, final

import aiosqlite
import anyio

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
    Event,
    Snapshot,
    StoredVersion,
    check_read_args,
    matches,
)
from kds_stores._log import (
    ChangeRow,
    Commit,
    DbKey,
    LogStore,
    RolledBackRequest,
    Row,
    chunks,
    collection_paused,
    cursor_from_db,
    db_key,
    decode_events,
    text_from_db,
    text_to_db,
    to_micros,
)

if TYPE_CHECKING:
    from collections.abc import (
        AsyncIterator,
        Collection,
        Iterable,
        Mapping,
        Sequence,
    )

    from kds.resource import Catalog, Resource, ResourceKey
    from kds.store import Tracking

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION: Final = 1
"""The layout this code reads and writes, stored in ``PRAGMA user_version``."""

# Tables (see the class docstring). Global-scoped keys store mesh '' rather than
# NULL: NULLs in a primary key are all distinct in SQLite, so two NULL-mesh rows
# with the same type and name would not collide. Validation forbids empty mesh
# names, so '' cannot clash with a real mesh.
_SCHEMA: Final = (
    """
    CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch TEXT NOT NULL,
        head INTEGER NOT NULL,
        horizon INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE resources (
        type TEXT NOT NULL,
        mesh TEXT NOT NULL,
        name TEXT NOT NULL,
        labels BLOB NOT NULL,
        spec BLOB NOT NULL,
        version INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        modified_at INTEGER NOT NULL,
        PRIMARY KEY (type, mesh, name)
    ) WITHOUT ROWID
    """,
    # The log: one msgpack blob per event (see EVENT_HEADER below). SQLite's row
    # fetch costs per column, and followers fetch every event, so an event is one
    # column that one msgpack call decodes, not one column per field.
    """
    CREATE TABLE events (
        revision INTEGER PRIMARY KEY,
        data BLOB NOT NULL
    )
    """,
    # Events are written through `changes`, a write-only view: each inserted row is
    # an event plus the view columns it implies (spec NULL marks a deletion), and
    # its triggers append the event to `events` and apply it to `resources` in the
    # same statement. One executemany thus writes both tables, the view cannot
    # drift from the log, and a commit takes one call to SQLite, not two.
    """
    CREATE VIEW changes (
        revision, data, type, mesh, name, labels, spec, version, created_at, modified_at
    ) AS SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0
    """,
    """
    CREATE TRIGGER changes_upsert INSTEAD OF INSERT ON changes
    WHEN NEW.spec IS NOT NULL
    BEGIN
        INSERT INTO events (revision, data) VALUES (NEW.revision, NEW.data);
        INSERT OR REPLACE INTO resources
            (type, mesh, name, labels, spec, version, created_at, modified_at)
        VALUES (NEW.type, NEW.mesh, NEW.name, NEW.labels, NEW.spec, NEW.version,
                NEW.created_at, NEW.modified_at);
    END
    """,
    """
    CREATE TRIGGER changes_delete INSTEAD OF INSERT ON changes
    WHEN NEW.spec IS NULL
    BEGIN
        INSERT INTO events (revision, data) VALUES (NEW.revision, NEW.data);
        DELETE FROM resources
        WHERE type = NEW.type AND mesh = NEW.mesh AND name = NEW.name;
    END
    """,
    # Origins and epochs are arbitrary strings: stored as UTF-8 bytes with
    # 'surrogatepass' so that every Python str round-trips. A revision too large for
    # a 64-bit INTEGER is stored as its decimal text; the column has no declared
    # type, so SQLite keeps that text as it is (a numeric column would turn it into
    # a lossy REAL).
    """
    CREATE TABLE tracking (
        origin BLOB PRIMARY KEY,
        epoch BLOB NOT NULL,
        revision NOT NULL
    ) WITHOUT ROWID
    """,
)

_INSERT_CHANGE: Final = "INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPSERT_TRACKING: Final = (
    "INSERT OR REPLACE INTO tracking (origin, epoch, revision) VALUES (?, ?, ?)"
)
_RESOURCE_COLUMNS: Final = "type, mesh, name, labels, spec, version, created_at, modified_at"
_VERSION_COLUMNS: Final = "type, mesh, name, labels, version"
# A page of events, returned only if the horizon allows reading after ?1 -- both
# from the statement's own read snapshot, and the horizon is computed once per
# statement, not per row. No rows means "no events after ?1" or "compacted":
# read() tells them apart. (Only constants are interpolated in this and every other
# SQL string here, never a value: values are bound.)
_READ_EVENTS: Final = (
    "SELECT revision, data FROM events "
    "WHERE revision > ?1 AND ?1 >= (SELECT horizon FROM meta) ORDER BY revision LIMIT ?2"
)

_MAX_SQLITE_INT: Final = 2**63 - 1
_MAX_VARIABLES: Final = 30_000  # per statement; SQLite's own limit may be lower


@functools.cache
def _variable_limit() -> int:
    """The most ``?`` parameters one statement may bind with this SQLite library."""
    with contextlib.closing(sqlite3.connect(":memory:")) as probe:
        return min(probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), _MAX_VARIABLES)


_ROW_COLUMNS: Final = "type, mesh, name, labels, spec, version, created_at"


def _keys_per_join() -> int:
    return max(1, _variable_limit() // 3)  # three placeholders per key


@functools.cache
def _rows_of_keys(columns: str, count: int) -> str:
    """SELECT *columns* of the resources at *count* keys bound as (type, mesh, name) triples.

    Joining a VALUES list to the primary key probes the index once per key (a
    row-value IN over VALUES would scan the whole table). Only constant column
    names and placeholders are interpolated.
    """
    selected = ", ".join(f"r.{column}" for column in columns.split(", "))
    return (
        f"SELECT {selected} FROM (VALUES {', '.join(['(?, ?, ?)'] * count)}) AS k "  # noqa: S608
        "CROSS JOIN resources AS r "
        "ON r.type = k.column1 AND r.mesh = k.column2 AND r.name = k.column3"
    )


def _is_busy(exc: sqlite3.Error) -> bool:
    """True when *exc* says another connection holds a lock (worth waiting out)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    message = str(exc)
    return "locked" in message or "busy" in message


@final
class SQLiteStore(LogStore):
    """A :class:`~kds.Store` in one SQLite database file.

    Storage layout (schema version :data:`SCHEMA_VERSION`, kept in ``PRAGMA
    user_version``; a file with a newer version is refused):

    * ``meta``: one row holding the epoch (a random UUID chosen when the schema is
      created), the head revision and the compaction horizon;
    * ``resources``: the view, one row per resource keyed by ``(type, mesh, name)``
      (``WITHOUT ROWID``: the key is the clustered index, so lookups and key-ordered
      listings need no second index; global-scoped keys store mesh ``''``). Labels
      and spec are the msgpack blobs :meth:`~kds.Store.commit` encoded, so the
      no-op rule compares bytes; timestamps are integer microseconds UTC;
    * ``events``: the log, keyed by revision, each event one msgpack array in a
      single ``data`` column: ``[type, mesh, name, version, created_at,
      modified_at, labels, spec]`` (mesh nil when global; a deletion has nil
      timestamps and spec, and the labels it had). One column because SQLite's row
      fetch costs per column and every follower fetches every event: a page of
      events is two columns per row and one msgpack call per event. The writer
      splices the labels and spec blobs already encoded into the array, so nothing
      is encoded twice;
    * ``changes``: a write-only view through which events are written: its
      triggers append each event to ``events`` and apply it to ``resources`` in
      the same statement, so the view is the fold of the log by construction;
    * ``tracking``: the consumer cursor committed for each origin.

    Durability: the database runs in WAL mode. Readers see only committed data and
    never block the writer, and a process killed at any point leaves the file
    holding exactly the transactions that committed. With ``synchronous="full"``
    (the default) every commit is fsynced before :meth:`commit` returns, so a
    returned commit also survives power loss -- a store that replicates other
    stores' logs must not forget what it acknowledged. ``"normal"`` skips that fsync
    (the WAL is synced at checkpoints): faster and still safe against process
    crashes, but the last commits may be lost if the machine itself goes down.

    Writes: one writer connection per instance, driven by one writer task.
    Concurrent :meth:`commit` calls queue up and the writer applies everything
    queued in one ``BEGIN IMMEDIATE`` transaction, each call inside its own
    savepoint: they share one fsync but succeed or fail alone. Revisions are
    assigned inside that transaction, from the head stored in it, so revision order
    is commit order even when other processes write the same file. Nothing read
    from the database is cached across transactions (another process may have
    written in between) except the epoch, which never changes, and the highest
    head seen, which only lets a waiter return at once and can only lag the truth.

    Reads run on a second connection, one statement or one explicit read
    transaction at a time, so each result is consistent with a single revision.
    Commits through this instance wake :meth:`wait_for_commit` at once; commits by
    other processes or instances are noticed by reading the head every
    ``poll_interval`` seconds.

    The store runs on asyncio (as aiosqlite does).

    Args:
        path: the database file; created with the schema if it does not exist.
        catalog: the resource types this store accepts.
        poll_interval: seconds between checks for commits made by other processes
            or store instances while :meth:`wait_for_commit` waits; commits through
            this instance wake waiters at once.
        busy_timeout: seconds to wait for another connection's lock before an
            operation fails with :class:`~kds.errors.StoreUnavailableError`.
        synchronous: ``"full"`` to fsync every commit, ``"normal"`` to trade the
            durability of the latest commits on power loss for speed.

    Raises:
        ConfigError: a setting is invalid (an in-memory path, a non-positive
            interval, an unknown ``synchronous`` mode).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        catalog: Catalog = DEFAULT_CATALOG,
        poll_interval: float = 0.25,
        busy_timeout: float = 5.0,
        synchronous: Literal["normal", "full"] = "full",
    ) -> None:
        super().__init__(catalog=catalog, poll_interval=poll_interval)
        self._path = os.fspath(path)
        if not self._path or self._path == ":memory:" or self._path.startswith("file::memory:"):
            raise ConfigError(
                "SQLiteStore needs a database file path: an in-memory database is not "
                "shared between connections"
            )
        if not busy_timeout >= 0:
            raise ConfigError(f"busy_timeout must be >= 0 seconds, got {busy_timeout!r}")
        if synchronous not in ("normal", "full"):
            raise ConfigError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._writer_db: aiosqlite.Connection | None = None
        self._reader_db: aiosqlite.Connection | None = None
        self._lifecycle_lock: anyio.Lock | None = None
        self._read_lock: anyio.Lock | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r})"

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        if self._lifecycle_lock is None:
            self._lifecycle_lock = anyio.Lock()
        async with self._lifecycle_lock:
            if self._open:
                return
            writer = reader = None
            try:
                writer = await self._connect()
                await self._configure(writer, writer=True)
                await self._create_schema(writer)
                reader = await self._connect()
                await self._configure(reader, writer=False)
                rows = await self._run(reader, "SELECT epoch, head FROM meta", (), "opening")
                if len(rows) != 1:
                    raise StoreError(f"{self}: the meta table is damaged (expected one row)")
                epoch, head = rows[0]
            except BaseException:
                with anyio.CancelScope(shield=True):
                    for db in (reader, writer):
                        if db is not None:
                            with contextlib.suppress(Exception):
                                await db.close()
                raise
            self._writer_db, self._reader_db = writer, reader
            self._epoch = epoch
            self._known_head = head
            self._write_lock = anyio.Lock()
            self._read_lock = anyio.Lock()
            self._queue = deque()
            self._open = True

    async def _connect(self) -> aiosqlite.Connection:
        try:
            # When aiosqlite fails to connect, its worker thread reports the failure
            # to the event loop after connect() has already raised, and errors out if
            # the loop is gone by then. Opening the file once with plain sqlite3
            # first turns the usual failures (no such directory, no permission) into
            # an error here, before any thread exists.
            await anyio.to_thread.run_sync(self._probe)
            # isolation_level=None: no implicit transactions; every transaction here
            # is an explicit BEGIN, so its extent is visible in the code.
            return await aiosqlite.connect(
                self._path, isolation_level=None, timeout=self._busy_timeout
            )
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc

    def _probe(self) -> None:
        sqlite3.connect(self._path, timeout=self._busy_timeout).close()

    async def _configure(self, db: aiosqlite.Connection, *, writer: bool) -> None:
        statements = [
            f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}",
            f"PRAGMA synchronous = {self._synchronous.upper()}",
        ]
        if not writer:
            statements.append("PRAGMA query_only = ON")  # a bug here cannot write
        try:
            for statement in statements:
                await db.execute_fetchall(statement)
            if writer:
                # Persistent in the file; a no-op once set. Needs a moment's exclusive
                # access on a new file, which busy_timeout waits for.
                mode = await self._set_wal(db)
                if [tuple(row) for row in mode] != [("wal",)]:
                    raise ConfigError(
                        f"{self}: cannot switch {self._path!r} to WAL journal mode "
                        f"(got {list(mode)!r}); is it on a filesystem without shared memory?"
                    )
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc

    async def _set_wal(self, db: aiosqlite.Connection) -> Iterable[sqlite3.Row]:
        # Switching a new file to WAL can fail with "database is locked" at once,
        # without SQLite's busy handler waiting (it refuses to wait where waiting
        # could deadlock), when several connections open a new file together. Retry
        # with backoff until busy_timeout, as the busy handler would have.
        deadline = anyio.current_time() + self._busy_timeout
        delay = 0.001
        while True:
            try:
                return await db.execute_fetchall("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or anyio.current_time() >= deadline:
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _create_schema(self, db: aiosqlite.Connection) -> None:
        try:
            version = await self._user_version(db)
            if version == SCHEMA_VERSION:
                return
            # BEGIN IMMEDIATE takes the write lock first, so when two processes open
            # a new file at once, the second waits here and then finds the schema.
            await db.execute_fetchall("BEGIN IMMEDIATE")
            try:
                version = await self._user_version(db)
                if version == 0:
                    tables = await db.execute_fetchall(
                        "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
                    )
                    if list(tables):
                        raise ConfigError(
                            f"{self}: {self._path!r} is an SQLite database but not a kds "
                            "store (it has tables but no kds schema version)"
                        )
                    for statement in _SCHEMA:
                        await db.execute_fetchall(statement)
                    await db.execute_fetchall(
                        "INSERT INTO meta (id, epoch, head, horizon) VALUES (1, ?, 0, 0)",
                        (uuid.uuid4().hex,),
                    )
                    await db.execute_fetchall(f"PRAGMA user_version = {SCHEMA_VERSION}")
                await db.execute_fetchall("COMMIT")
            except BaseException:
                with anyio.CancelScope(shield=True), contextlib.suppress(sqlite3.Error):
                    await db.execute_fetchall("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc

    async def _user_version(self, db: aiosqlite.Connection) -> int:
        rows = list(await db.execute_fetchall("PRAGMA user_version"))
        version = int(rows[0][0])
        self._check_schema_version(version)
        return version

    def _check_schema_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{self}: {self._path!r} has schema version {version}, but this version "
                f"of kds understands only up to {SCHEMA_VERSION}: upgrade kds to open it"
            )

    def _open_error(self, exc: sqlite3.Error) -> StoreError | ConfigError:
        if isinstance(exc, sqlite3.OperationalError):
            return self._driver_error(exc, "opening")
        # Not an operational problem: the file is not a database, or it is damaged.
        return ConfigError(f"{self}: cannot open {self._path!r} as a kds store: {exc}")

    async def aclose(self) -> None:
        if self._lifecycle_lock is None:
            return
        with anyio.CancelScope(shield=True):
            async with self._lifecycle_lock:
                if not self._open:
                    return
                self._open = False
                await self._stop_writer()
                for db in (self._writer_db, self._reader_db):
                    if db is not None:
                        # aiosqlite runs queued operations before closing; later ones
                        # fail and are reported as StoreClosedError.
                        with contextlib.suppress(Exception):
                            await db.close()
                self._writer_db = self._reader_db = None

    # -- driver calls ----------------------------------------------------------------

    def _driver_error(self, exc: sqlite3.Error, action: str) -> StoreError:
        message = str(exc)
        if isinstance(exc, sqlite3.OperationalError):
            if _is_busy(exc):
                return StoreUnavailableError(
                    f"{self} is locked by another connection (waited up to "
                    f"{self._busy_timeout}s) while {action}: {message}"
                )
            return StoreUnavailableError(f"{self}: SQLite failed while {action}: {message}")
        return StoreError(f"{self}: SQLite failed while {action}: {type(exc).__name__}: {message}")

    def _call_error(self, exc: Exception, action: str) -> StoreError:
        """Translate whatever a driver call raised into a kds error."""
        if isinstance(exc, sqlite3.Error):
            return self._driver_error(exc, action)
        if not self._open:
            # aiosqlite raises ValueError once aclose() has closed the connection.
            return StoreClosedError(f"{self} was closed while {action}")
        return StoreError(f"{self}: cannot pass a value to SQLite while {action}: {exc}")

    async def _run(
        self, db: aiosqlite.Connection, sql: str, params: Sequence[Any], action: str
    ) -> list[tuple[Any, ...]]:
        try:
            rows = await db.execute_fetchall(sql, params)
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            raise self._call_error(exc, action) from exc
        # Rows are plain tuples: no row_factory is set.
        return cast("list[tuple[Any, ...]]", rows)

    async def _run_many(
        self, db: aiosqlite.Connection, sql: str, rows: Iterable[Sequence[Any]], action: str
    ) -> None:
        try:
            await db.executemany(sql, rows)
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            raise self._call_error(exc, action) from exc

    def _reader(self) -> tuple[aiosqlite.Connection, anyio.Lock]:
        self._check_open()
        assert self._reader_db is not None  # noqa: S101 -- set whenever open
        assert self._read_lock is not None  # noqa: S101 -- set whenever open
        return self._reader_db, self._read_lock

    async def _read(self, sql: str, params: Sequence[Any], action: str) -> list[tuple[Any, ...]]:
        """Run one read statement: one statement is one consistent snapshot."""
        db, lock = self._reader()
        # Even single statements take the lock: run inside another task's open read
        # transaction, they would see that transaction's older snapshot.
        async with lock:
            return await self._run(db, sql, params, action)

    @contextlib.asynccontextmanager
    async def _read_transaction(self, action: str) -> AsyncIterator[aiosqlite.Connection]:
        """Hold one read snapshot across several statements."""
        db, lock = self._reader()
        async with lock:
            try:
                await self._run(db, "BEGIN", (), action)
                yield db
            finally:
                # Queued after everything this task sent (aiosqlite runs calls in
                # order), so it ends the transaction even when the task was
                # cancelled mid-way; failing because none is open is harmless.
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await db.execute_fetchall("ROLLBACK")

    # -- writes --------------------------------------------------------------------

    async def _apply_batch(self, batch: list[Commit]) -> None:
        assert self._writer_db is not None  # noqa: S101 -- set whenever open
        db = self._writer_db
        action = "committing"
        # IMMEDIATE: take the write lock now, so the head read below cannot be
        # overtaken by another process before this transaction commits.
        await self._run(db, "BEGIN IMMEDIATE", (), action)
        try:
            head = start = await self._head_in(db, action)
            all_keys = {key for request in batch for key in request.keys}
            rows = await self._fetch_rows(db, all_keys)
            origins = {r.tracking.origin for r in batch if r.tracking is not None}
            tracked = await self._fetch_tracking(db, origins)
            now = to_micros(datetime.now(UTC))
            # A lone request needs no savepoint: rolling back the transaction is
            # rolling back the request.
            savepoints = len(batch) > 1
            outcomes: list[tuple[Commit, int | Exception]] = []
            for request in batch:
                try:
                    changes, local, revision = self._plan(request, rows, tracked, head, now)
                except Exception as exc:  # the caller's own error (conflict, not found)
                    # Planning happens before the request writes anything: a conflict
                    # leaves nothing to roll back. (Should packing have failed, the
                    # packer would hold partial output: drop it.)
                    self._packer.reset()
                    outcomes.append((request, exc))
                    continue
                tracking = request.tracking
                if changes or tracking is not None:
                    try:
                        await self._write_request(db, changes, tracking, savepoints=savepoints)
                    except RolledBackRequest as failed:
                        outcomes.append((request, failed.error))
                        continue
                rows.update(local)
                if tracking is not None:
                    tracked[tracking.origin] = tracking.cursor
                head = revision
                outcomes.append((request, revision))
            if head != start:
                await self._run(db, "UPDATE meta SET head = ? WHERE id = 1", (head,), action)
            # The fsync (synchronous=full) happens here, once for the whole batch. A
            # transaction that wrote nothing commits without touching the disk.
            await self._run(db, "COMMIT", (), action)
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await db.execute_fetchall("ROLLBACK")
            raise
        # Only now is any of it durable: resolve callers and wake followers.
        for request, outcome in outcomes:
            if isinstance(outcome, Exception):
                request.fail(outcome)
            else:
                request.resolve(outcome)
        self._saw_head(head)

    async def _write_request(
        self,
        db: aiosqlite.Connection,
        changes: list[ChangeRow],
        tracking: Tracking | None,
        *,
        savepoints: bool,
    ) -> None:
        """Write one request's events (the triggers update the view) and tracking."""
        action = "committing"
        if savepoints:
            await self._run(db, "SAVEPOINT request", (), action)
        try:
            if changes:
                await self._run_many(db, _INSERT_CHANGE, changes, action)
            if tracking is not None:
                revision = tracking.cursor.revision
                stored_revision: int | str = (
                    revision if revision <= _MAX_SQLITE_INT else str(revision)
                )
                await self._run(
                    db,
                    _UPSERT_TRACKING,
                    (
                        text_to_db(tracking.origin),
                        text_to_db(tracking.cursor.epoch),
                        stored_revision,
                    ),
                    action,
                )
        except StoreError as exc:
            # Undo this request alone and let the others commit -- unless there is
            # no savepoint, or SQLite has already rolled back the whole transaction
            # (I/O error, disk full): then the batch fails as a whole. (Rows an
            # executemany wrote before failing stay in the transaction otherwise.)
            if not savepoints or not db.in_transaction:
                raise
            await self._run(db, "ROLLBACK TO request", (), action)
            await self._run(db, "RELEASE request", (), action)
            raise RolledBackRequest(exc) from exc
        if savepoints:
            await self._run(db, "RELEASE request", (), action)

    async def _head_in(self, db: aiosqlite.Connection, action: str) -> int:
        rows = await self._run(db, "SELECT head FROM meta", (), action)
        head: int = rows[0][0]
        return head

    async def _fetch_rows(
        self, db: aiosqlite.Connection, keys: Collection[DbKey]
    ) -> dict[DbKey, Row | None]:
        """Read the stored rows of *keys* (missing keys are absent), a few queries in all."""
        found: dict[DbKey, Row | None] = {}
        for part in chunks(list(keys), _keys_per_join()):
            sql = _rows_of_keys(_ROW_COLUMNS, len(part))
            params = [value for key in part for value in key]
            for t, m, n, labels, spec, version, created in await self._run(
                db, sql, params, "committing"
            ):
                found[(t, m, n)] = (labels, spec, version, created)
        return found

    async def _fetch_tracking(
        self, db: aiosqlite.Connection, origins: Collection[str]
    ) -> dict[str, Cursor]:
        tracked: dict[str, Cursor] = {}
        ordered = [text_to_db(origin) for origin in origins]
        for part in chunks(ordered, _variable_limit()):
            # Only the placeholders are interpolated.
            sql = (
                "SELECT origin, epoch, revision FROM tracking "  # noqa: S608
                f"WHERE origin IN ({', '.join(['?'] * len(part))})"
            )
            for origin, epoch, revision in await self._run(db, sql, part, "committing"):
                tracked[text_from_db(origin)] = cursor_from_db(epoch, revision)
        return tracked

    async def compact(self, through: int) -> None:
        self._check_open()
        if through < 0:  # refused before waiting for any lock
            raise ValueError(f"through must be within 0..head, got {through}")
        assert self._writer_db is not None  # noqa: S101 -- set whenever open
        assert self._write_lock is not None  # noqa: S101 -- set whenever open
        db = self._writer_db
        action = "compacting"
        async with self._write_lock:
            # Shielded: the writer connection must never be left inside a transaction,
            # or the next commit could not begin one.
            with anyio.CancelScope(shield=True):
                await self._run(db, "BEGIN IMMEDIATE", (), action)
                try:
                    rows = await self._run(db, "SELECT head, horizon FROM meta", (), action)
                    head, horizon = rows[0]
                    if through > head:
                        raise ValueError(f"through must be within 0..{head}, got {through}")
                    if through > horizon:
                        await self._run(
                            db, "DELETE FROM events WHERE revision <= ?", (through,), action
                        )
                        await self._run(
                            db, "UPDATE meta SET horizon = ? WHERE id = 1", (through,), action
                        )
                    await self._run(db, "COMMIT", (), action)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await db.execute_fetchall("ROLLBACK")
                    raise
                self._recent.forget_through(through)

    # -- reads ---------------------------------------------------------------------

    async def head(self) -> int:
        rows = await self._read("SELECT head FROM meta", (), "reading the head")
        head: int = rows[0][0]
        self._saw_head(head)
        return head

    async def horizon(self) -> int:
        rows = await self._read("SELECT horizon FROM meta", (), "reading the horizon")
        horizon: int = rows[0][0]
        return horizon

    async def get(self, key: ResourceKey) -> Resource:
        self._check_open()
        stored_key = db_key(key)
        if stored_key is None:
            raise NotFoundError(key)
        rows = await self._read(
            f"SELECT {_RESOURCE_COLUMNS} FROM resources "  # noqa: S608 -- constant
            "WHERE type = ? AND mesh = ? AND name = ?",
            stored_key,
            "reading a resource",
        )
        if not rows:
            raise NotFoundError(key)
        return self._resources(rows)[0]

    async def find_many(self, keys: Collection[ResourceKey]) -> dict[ResourceKey, Resource]:
        self._check_open()
        stored = [k for k in {db_key(key) for key in keys} if k is not None]
        action = "reading resources"
        rows: list[tuple[Any, ...]] = []
        # One read snapshot for every chunk.
        async with self._read_transaction(action) as db:
            for part in chunks(stored, _keys_per_join()):
                sql = _rows_of_keys(_RESOURCE_COLUMNS, len(part))
                params = [value for key in part for value in key]
                rows.extend(await self._run(db, sql, params, action))
        return {resource.key: resource for resource in self._resources(rows)}

    async def find_versions(
        self, keys: Collection[ResourceKey]
    ) -> dict[ResourceKey, StoredVersion]:
        self._check_open()
        stored = [k for k in {db_key(key) for key in keys} if k is not None]
        action = "reading resource versions"
        rows: list[tuple[Any, ...]] = []
        async with self._read_transaction(action) as db:
            for part in chunks(stored, _keys_per_join()):
                sql = _rows_of_keys(_VERSION_COLUMNS, len(part))
                params = [value for key in part for value in key]
                rows.extend(await self._run(db, sql, params, action))
        return self._versions(rows)

    async def list_resources(
        self,
        type_name: str | None = None,
        *,
        mesh: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Resource]:
        self._check_open()
        conditions: list[str] = []
        params: list[Any] = []
        if type_name is not None:
            conditions.append("type = ?")
            params.append(type_name)
        if mesh is not None:
            if mesh == "":
                return []  # no resource has an empty mesh ('' stands for "no mesh")
            conditions.append("mesh = ?")
            params.append(mesh)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        # Only constant column names and placeholders are interpolated.
        sql = f"SELECT {_RESOURCE_COLUMNS} FROM resources{where} ORDER BY type, mesh, name"  # noqa: S608
        rows = await self._read(
            sql,
            params,
            "listing resources",
        )
        resources = self._resources(rows)
        # SQL narrowed by type and mesh; `matches` decides, as in every backend.
        return [r for r in resources if matches(r, type_name, mesh, labels)]

    async def snapshot(self, types: Collection[str] | None = None) -> Snapshot:
        self._check_open()
        action = "taking a snapshot"
        select = f"SELECT {_RESOURCE_COLUMNS} FROM resources"  # noqa: S608 -- constant
        order = " ORDER BY type, mesh, name"
        rows: list[tuple[Any, ...]] = []
        # The head and the view must come from one read snapshot.
        async with self._read_transaction(action) as db:
            head = (await self._run(db, "SELECT head FROM meta", (), action))[0][0]
            if types is None:
                rows = await self._run(db, select + order, (), action)
            else:
                # Chunks in type order, each in key order: the result is in key order.
                for part in chunks(sorted(set(types)), _variable_limit()):
                    where = f" WHERE type IN ({', '.join(['?'] * len(part))})"
                    rows.extend(await self._run(db, select + where + order, part, action))
        self._saw_head(head)
        return Snapshot(cursor=Cursor(self._epoch, head), resources=self._resources(rows))

    async def read(self, after: int, *, limit: int = DEFAULT_READ_LIMIT) -> list[Event]:
        self._check_open()
        check_read_args(after, limit)
        return await self._read_log(after, limit, self._fetch_events)

    async def _fetch_events(self, after: int, limit: int) -> list[Event]:
        action = "reading events"
        rows = await self._read(_READ_EVENTS, (after, limit), action)
        if rows:
            # The statement checked the horizon. The last revision read is a head
            # this snapshot had reached (a lower bound of the head, all that is
            # needed to wake waiters).
            self._saw_head(rows[-1][0])
            with collection_paused():
                events = decode_events(rows)
            self._recent.add(after, events)
            return events
        # No events after `after`, or `after` is below the horizon. A horizon read
        # now is at least the one then: if it still allows `after`, nothing was
        # missing.
        meta = await self._read("SELECT horizon, head FROM meta", (), action)
        horizon, head = meta[0]
        self._saw_head(head)
        if after < horizon:
            raise CompactedError(after, horizon)
        return []

    async def tracking(self, origin: str) -> Cursor | None:
        self._check_open()
        rows = await self._read(
            "SELECT epoch, revision FROM tracking WHERE origin = ?",
            (text_to_db(origin),),
            "reading a tracking cursor",
        )
        if not rows:
            return None
        epoch, revision = rows[0]
        return cursor_from_db(epoch, revision)
