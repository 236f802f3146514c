"""What the test servers (PostgreSQL, NATS) share: a free port and a process lifecycle."""

from __future__ import annotations

import socket
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os
    import subprocess
    from types import TracebackType
    from typing import Self

__all__ = ["ServerProcess", "free_port", "server_directory"]


def server_directory(directory: str | os.PathLike[str] | None, prefix: str) -> tuple[Path, bool]:
    """The directory a server keeps its files in (created if missing), and whether it is new.

    A new temporary directory (when *directory* is ``None``) is the server's to delete
    when it is cleaned up; a given one is left in place.
    """
    if directory is None:
        return Path(tempfile.mkdtemp(prefix=prefix)), True
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return path, False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess(ABC):
    """A server this process runs as a child and stops by its own pid.

    Subclasses start it into ``_process`` in :meth:`start` and stop it and delete
    its files in :meth:`cleanup`; as a context manager it does both.
    """

    _process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def start(self) -> None:
        """Start the server and wait until it accepts clients."""

    @abstractmethod
    def cleanup(self) -> None:
        """Stop the server and delete what it wrote."""

    @property
    def pid(self) -> int | None:
        """The server process id while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            # __exit__ is not called when __enter__ fails: clean up here instead.
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
