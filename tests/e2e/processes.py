"""Control planes as real ``kds-cp run`` processes, and ``kdsctl`` as a real command.

Each process logs to a file in its work directory; when it dies unexpectedly, or a
wait times out, the failure shows the tail of that log. Processes are stopped by
their own pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from kds.testing._server import free_port

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

BIN = Path(sys.executable).parent

FAST_SYNC = {
    # Short timings, so that a killed peer is noticed and a zone reconnects quickly.
    "KDS_SYNC_HEARTBEAT_INTERVAL": "0.5",
    "KDS_SYNC_HEARTBEAT_TIMEOUT": "2",
    "KDS_SYNC_INSIGHT_INTERVAL": "0.5",
    "KDS_SYNC_RECONNECT_BASE": "0.1",
    "KDS_SYNC_RECONNECT_MAX": "1",
    "KDS_LOG_LEVEL": "debug",
}
"""Environment every test control plane gets."""


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 60.0, what: str, logs: tuple[Path, ...] = ()
) -> Any:
    """Poll *condition* until it returns something truthy; fail with the logs' tails."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except (httpx.HTTPError, AssertionError) as exc:
            last_error = exc
        else:
            if result:
                return result
        time.sleep(0.1)
    tails = "\n".join(f"--- {log}\n{tail(log)}" for log in logs)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error!r})\n{tails}")


def tail(path: Path, lines: int = 40) -> str:
    """The last *lines* lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class ControlPlane:
    """One ``kds-cp run`` process with its own work directory and API port.

    Args:
        name: for messages and the log file's name.
        work_dir: ``general.workDir`` (the SQLite store lives there).
        env: ``KDS_*``/``KUMA_*`` settings on top of :data:`FAST_SYNC`.
    """

    def __init__(self, name: str, work_dir: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.work_dir = work_dir
        self.api_port = free_port()
        self.env = {
            **FAST_SYNC,
            "KDS_GENERAL_WORK_DIR": str(work_dir),
            "KDS_API_PORT": str(self.api_port),
            **env,
        }
        self.log = work_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        """The API's base URL."""
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        """Start the process and wait until its API says it is ready."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("KDS_", "KUMA_"))}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 -- our own program
                [str(BIN / "kds-cp"), "run"],
                env={**environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, what=f"{self.name} to be ready", logs=(self.log,))

    def _ready(self) -> bool:
        assert self.process is not None
        status = self.process.poll()
        if status is not None:
            raise RuntimeError(f"{self.name} exited with status {status}:\n{tail(self.log)}")
        return httpx.get(f"{self.api}/ready", timeout=2).status_code == 200

    def kill(self) -> None:
        """``kill -9`` it and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM it and wait; return its exit status (SIGKILL after *timeout*)."""
        assert self.process is not None
        process, self.process = self.process, None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            process.kill()
            process.wait()
            raise AssertionError(f"{self.name} did not stop on SIGTERM:\n{tail(self.log)}") from exc

    def get(self, path: str) -> Any:
        """``GET`` an API path and return the JSON (raises on an error status)."""
        response = httpx.get(f"{self.api}{path}", timeout=5)
        response.raise_for_status()
        return response.json()


def run_kdsctl(
    config: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``kdsctl`` command with its own config file."""
    return subprocess.run(  # noqa: S603 -- our own program
        [str(BIN / "kdsctl"), *args],
        env={**os.environ, "KDSCTL_CONFIG": str(config)},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def kdsctl(config: Path, *args: str, stdin: str | None = None) -> str:
    """Run ``kdsctl``; return its stdout, failing the test if it fails."""
    result = run_kdsctl(config, *args, stdin=stdin)
    if result.returncode != 0:
        raise AssertionError(f"kdsctl {' '.join(args)} failed: {result.stderr}")
    return result.stdout
