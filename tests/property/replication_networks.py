"""The networks a replication property test runs its federation over.

A :class:`Network` is the part of a federation that changes from one run to the
next; the rest (the stores, the global engine, the program and the checks) is the
same code whichever network carries the sessions. It has two halves:

* :class:`Links`: how sessions travel between the global and its zones, and the
  faults they suffer. :class:`MemoryLinks` is a
  :class:`~kds.testing.MemoryTransport`, which severs and refuses sessions
  itself. :class:`GrpcLinks` is gRPC with TLS over loopback, the zones dialling
  the global through a :class:`~kds.testing.TcpRelay`: a fault there is a real
  network fault (connections reset in both directions, new ones reset at once),
  which neither engine nor transport is told about. :class:`NatsLinks` is NATS:
  the global connects to a nats-server directly and the zones through such a
  relay, so a fault cuts the zones off NATS and the global learns of it only
  from the silence that follows (or from the zone's next session).
* :class:`Zones`: where the zone engines run. :class:`ZoneEngines` runs them in
  this process; :class:`ZoneProcesses` runs each in a child process of its own
  (:mod:`tests.sync.plane`, over gRPC or NATS, on the SQLite file this process
  also opens), where restarting a zone is a crash: SIGKILL, and a new process.

:func:`open_network` puts the two together for one federation and takes them
apart afterwards: child processes are killed by their own pid, whatever happens.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import json
import subprocess
import sys
import tempfile
import urllib.parse
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import attrs
from anyio.abc import Process

from kds.sync import ZoneEngine
from kds.testing import MemoryTransport, TcpRelay
from kds_transports.grpc import GrpcTransport
from kds_transports.nats import NatsTransport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

    from anyio.abc import TaskGroup, TaskStatus

    from kds.store import Store
    from kds.sync import SyncOptions
    from kds.testing import StoreSpec
    from kds.transport import Transport

__all__ = [
    "NETWORKS",
    "GrpcLinks",
    "Links",
    "MemoryLinks",
    "NatsLinks",
    "Network",
    "NetworkName",
    "Task",
    "ZoneEngines",
    "ZoneProcesses",
    "Zones",
    "launch",
    "open_network",
]

NetworkName = Literal["memory", "grpc", "grpc-zone-processes", "nats", "nats-zone-processes"]

NETWORKS: Final[tuple[NetworkName, ...]] = (
    "memory",
    "grpc",
    "grpc-zone-processes",
    "nats",
    "nats-zone-processes",
)
"""Every network, by name: memory transport; gRPC or NATS in one process, or zones apart."""

NATS_NETWORKS: Final[frozenset[NetworkName]] = frozenset({"nats", "nats-zone-processes"})
"""The networks that need a NATS server (:func:`open_network`'s ``nats_url``)."""

STOP_TIMEOUT: Final = 30.0
"""Seconds an engine task or a killed process gets to end (it takes milliseconds)."""

CONNECT_TIMEOUT: Final = 2.0
"""Seconds a zone's gRPC connect may take; a global answers in milliseconds.

Bounded well below the replication test's stall limit, so that a connection
attempt lost in a fault is retried rather than awaited."""

CLOSE_TIMEOUT: Final = 1.0
"""Seconds a gRPC or NATS session's close waits to flush (and a stopping global its calls)."""

NATS_KEEPALIVE: Final = 0.5
"""Seconds: the NATS transport's keepalive interval and timeout.

The sync engines' heartbeats (much shorter in these tests) usually notice a lost
session first; this bounds how long a NATS session outlives silence if not."""

NATS_RECONNECT_WAIT: Final = 0.2
"""Seconds: the longest pause between a global's attempts to reach NATS again."""

LOG_TAIL: Final = 15
"""Lines of a zone process's stderr shown when a run fails."""

_REPOSITORY: Final = Path(__file__).resolve().parents[2]


# -- tasks ------------------------------------------------------------------------------


@attrs.define
class Task:
    """An engine's task: cancelled through *scope*; *done* once it has fully ended."""

    scope: anyio.CancelScope = attrs.Factory(anyio.CancelScope)
    done: anyio.Event = attrs.Factory(anyio.Event)

    async def stop(self) -> None:
        """Cancel the task and wait until it has ended."""
        self.scope.cancel()
        with anyio.fail_after(STOP_TIMEOUT):
            await self.done.wait()


async def launch(
    group: TaskGroup, run: Callable[..., Awaitable[None]], *, reports_start: bool = False
) -> tuple[Task, Any]:
    """Run *run* in *group* until the returned task is stopped.

    With *reports_start*, *run* takes a ``task_status`` and this returns once it
    reported its start, with the value it reported (a global's address).
    """
    task = Task()

    async def body(*, task_status: TaskStatus[Any]) -> None:
        with task.scope:
            try:
                if reports_start:
                    await run(task_status=task_status)
                else:
                    task_status.started(None)
                    await run()
            finally:
                task.done.set()

    started = await group.start(body)
    return task, started


# -- links ------------------------------------------------------------------------------


class Links(abc.ABC):
    """How sessions travel between the global and its zones, and the faults they suffer."""

    @abc.abstractmethod
    def global_transport(self) -> Transport:
        """A transport for a new global engine to serve on."""

    async def serving(self, address: str) -> None:  # noqa: B027 -- optional hook
        """Called with the address a new global engine reported it listens on."""

    @abc.abstractmethod
    def zone_transport(self, zone: str) -> Transport:
        """A transport for *zone*'s engine to dial the global with."""

    @abc.abstractmethod
    async def sever(self) -> None:
        """Cut every open session, as a network failure would."""

    @abc.abstractmethod
    def refuse(self) -> None:
        """Make new connections fail until :meth:`accept`."""

    @abc.abstractmethod
    def accept(self) -> None:
        """Let new connections through again."""

    def status(self) -> list[str]:
        """Lines about the links, for failure messages."""
        return []

    def plane_arguments(self) -> list[str]:
        """The arguments with which :mod:`tests.sync.plane` dials the global over these links.

        Raises:
            TypeError: these links carry sessions only within this process.
        """
        raise TypeError(f"{type(self).__name__} cannot carry sessions to zone processes")


class MemoryLinks(Links):
    """A :class:`MemoryTransport`: it refuses and severs sessions itself."""

    def __init__(self) -> None:
        self.transport = MemoryTransport()

    def global_transport(self) -> Transport:
        # The same instance on every restart: it is both the listener and the address.
        return self.transport

    def zone_transport(self, zone: str) -> Transport:
        return self.transport.with_identity(zone)

    async def sever(self) -> None:
        self.transport.sever_all("network cut")

    def refuse(self) -> None:
        self.transport.refuse_connections()

    def accept(self) -> None:
        self.transport.accept_connections()


class RelayedLinks(Links):
    """Links whose faults play on a :class:`TcpRelay` the zones' connections go through."""

    relay: TcpRelay

    async def sever(self) -> None:
        await self.relay.sever_all("network cut")

    def refuse(self) -> None:
        self.relay.refuse_connections()

    def accept(self) -> None:
        self.relay.accept_connections()


class GrpcLinks(RelayedLinks):
    """gRPC with TLS on loopback; zones dial the global through *relay*.

    Each global listens on a new port of its own (``grpcs://127.0.0.1:0``) with the
    self-signed certificate kept in *work_dir*; :meth:`serving` points the relay
    at it, as a load balancer in front of a restarted global would be.
    """

    def __init__(self, relay: TcpRelay, work_dir: Path) -> None:
        self.relay = relay
        self.work_dir = work_dir

    @property
    def zone_address(self) -> str:
        """What zones dial: the relay."""
        return f"grpcs://{self.relay.address}"

    @property
    def ca_file(self) -> Path:
        """The global's certificate, which zones trust (written when it first serves)."""
        return self.work_dir / "kds-cp.crt"

    def global_transport(self) -> Transport:
        return GrpcTransport.server(
            "grpcs://127.0.0.1:0", work_dir=self.work_dir, close_timeout=CLOSE_TIMEOUT
        )

    async def serving(self, address: str) -> None:
        url = urllib.parse.urlsplit(address)
        assert url.hostname is not None, address
        assert url.port is not None, address
        self.relay.target = (url.hostname, url.port)

    def zone_transport(self, zone: str) -> Transport:
        return GrpcTransport.client(
            self.zone_address,
            zone=zone,
            ca_file=self.ca_file,
            connect_timeout=CONNECT_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
        )

    def status(self) -> list[str]:
        return [_relay_status(self.relay)]

    def plane_arguments(self) -> list[str]:
        return [
            "--transport",
            "grpc",
            "--address",
            self.zone_address,
            "--ca",
            str(self.ca_file),
            "--connect-timeout",
            str(CONNECT_TIMEOUT),
        ]


class NatsLinks(RelayedLinks):
    """NATS on loopback: the global connects to the server *relay* targets, zones via *relay*.

    Every federation gets a subject prefix of its own, so federations sharing one
    server never see each other's sessions (nor their connect requests). Faults
    play on the relay, which carries only the zones' connections to NATS: a
    network failure between the zones and NATS. A zone's connection is reset and
    its session ends at once; the global's connection is untouched, so it learns
    that the zone is gone from heartbeats, or from the zone's next session, which
    supersedes the old one. A restarted global connects to NATS anew, on the same
    prefix, as another global of the queue group would.
    """

    def __init__(self, relay: TcpRelay) -> None:
        self.relay = relay
        host, port = relay.target
        self.server_url = f"nats://{host}:{port}"
        """Where the global connects: the NATS server itself."""
        self.prefix = f"kds-replication-{uuid.uuid4().hex[:12]}"

    @property
    def zone_address(self) -> str:
        """What zones dial: the relay, in front of the NATS server."""
        return f"nats://{self.relay.address}"

    def global_transport(self) -> Transport:
        return NatsTransport.server(
            self.server_url,
            prefix=self.prefix,
            connect_timeout=CONNECT_TIMEOUT,
            reconnect_wait=NATS_RECONNECT_WAIT,
            keepalive_interval=NATS_KEEPALIVE,
            keepalive_timeout=NATS_KEEPALIVE,
            close_timeout=CLOSE_TIMEOUT,
        )

    def zone_transport(self, zone: str) -> Transport:
        return NatsTransport.client(
            self.zone_address,
            zone=zone,
            prefix=self.prefix,
            connect_timeout=CONNECT_TIMEOUT,
            keepalive_interval=NATS_KEEPALIVE,
            keepalive_timeout=NATS_KEEPALIVE,
            close_timeout=CLOSE_TIMEOUT,
        )

    def status(self) -> list[str]:
        return [f"  NATS {self.server_url}, prefix {self.prefix}", _relay_status(self.relay)]

    def plane_arguments(self) -> list[str]:
        return [
            "--transport",
            "nats",
            "--address",
            self.zone_address,
            "--prefix",
            self.prefix,
            "--connect-timeout",
            str(CONNECT_TIMEOUT),
            "--keepalive",
            str(NATS_KEEPALIVE),
        ]


def _relay_status(relay: TcpRelay) -> str:
    return (
        f"  relay {relay.address} -> {relay.target[0]}:{relay.target[1]}: "
        f"{relay.connections} connections, {relay.open_connections} open, "
        f"{relay.refused} refused, refusing={relay.refusing}"
    )


# -- zones ------------------------------------------------------------------------------


class Zones(abc.ABC):
    """Where the zone engines run: each can be started and stopped again."""

    start_time: float = 0.0
    """Seconds a zone engine may take to start, before it even dials the global."""

    @abc.abstractmethod
    async def start(self, zone: str) -> None:
        """Start *zone*'s engine on its store."""

    @abc.abstractmethod
    async def stop(self, zone: str) -> None:
        """Stop *zone*'s engine and wait until it has ended; its store is kept."""

    @abc.abstractmethod
    def status(self, zone: str) -> str:
        """*zone*'s engine's state, for failure messages."""

    def exited(self) -> list[str]:
        """Zones whose engine ended without being stopped: they cannot catch up.

        (An engine in this process that fails fails the test's task group at once.)
        """
        return []


class ZoneEngines(Zones):
    """Zone engines in this process, in *group*, dialling over *links*."""

    def __init__(
        self, group: TaskGroup, links: Links, stores: Mapping[str, Store], options: SyncOptions
    ) -> None:
        self._group = group
        self._links = links
        self._stores = stores
        self._options = options
        self.engines: dict[str, ZoneEngine] = {}
        self._tasks: dict[str, Task] = {}

    async def start(self, zone: str) -> None:
        engine = ZoneEngine(
            self._stores[zone], self._links.zone_transport(zone), zone=zone, options=self._options
        )
        self._tasks[zone], _ = await launch(self._group, engine.run)
        self.engines[zone] = engine

    async def stop(self, zone: str) -> None:
        await self._tasks.pop(zone).stop()

    def status(self, zone: str) -> str:
        engine = self.engines[zone]
        return (
            f"connected={engine.connected} sessions={engine.sessions} "
            f"last_error={engine.last_error!r}"
        )


@attrs.define
class _Child:
    process: Process
    log: Path


_OUTLIVING_STORES: Final = ("sqlite", "kubernetes")
"""Stores whose data outlives a killed zone process: a file, or the API-server stand-in."""


class ZoneProcesses(Zones):
    """Each zone engine in a child process of its own, over *links*, on a durable store.

    A child runs :mod:`tests.sync.plane` on the file of *specs*' recipe for its
    zone (this process has the same file open) with *options*, dialling as
    :meth:`Links.plane_arguments` says, and logs to a file in *log_dir*.
    :meth:`stop` kills it (SIGKILL: a crash) and waits for it; :meth:`kill_all`
    kills whatever is left.
    """

    # A Python process importing gRPC or nats-py: about a second, several on a loaded
    # machine.
    start_time = 10.0

    def __init__(
        self,
        links: Links,
        specs: Mapping[str, StoreSpec],
        options: SyncOptions,
        log_dir: Path,
    ) -> None:
        for spec in specs.values():
            if spec.backend not in _OUTLIVING_STORES:
                raise ValueError(f"zones in processes need stores that outlive them: {spec}")
        self._links = links
        self._specs = specs
        self._options = options
        self._log_dir = log_dir
        self._children: dict[str, _Child] = {}
        self._numbers = itertools.count(1)

    def _command(self, zone: str) -> list[str]:
        spec = self._specs[zone].kwargs
        if self._specs[zone].backend == "sqlite":
            store = ["--store", str(spec["path"])]
        else:
            recipe = {"backend": self._specs[zone].backend, "kwargs": dict(spec)}
            store = ["--store-spec", json.dumps(recipe)]
        command = [
            sys.executable,
            "-m",
            "tests.sync.plane",
            *store,
            "--zone",
            zone,
            *self._links.plane_arguments(),
            "--log-level",
            "INFO",
        ]
        if "poll_interval" in spec:
            command += ["--poll-interval", str(spec["poll_interval"])]
        if "synchronous" in spec:
            command += ["--synchronous", str(spec["synchronous"])]
        for name, value in attrs.asdict(self._options).items():
            command += ["--sync-option", f"{name}={value}"]
        return command

    async def start(self, zone: str) -> None:
        assert zone not in self._children, f"{zone} is already running"
        log = self._log_dir / f"{zone}-{next(self._numbers)}.log"
        with log.open("wb") as stderr:
            process = await anyio.open_process(
                self._command(zone),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=_REPOSITORY,
            )
        self._children[zone] = _Child(process, log)

    async def stop(self, zone: str) -> None:
        await _kill(self._children.pop(zone).process)

    async def kill_all(self) -> None:
        """Kill every child still running, each by its own pid, and wait for them."""
        children, self._children = self._children, {}
        with anyio.CancelScope(shield=True):
            for child in children.values():
                await _kill(child.process)

    def exited(self) -> list[str]:
        children = self._children.items()
        return [zone for zone, child in children if child.process.returncode is not None]

    def status(self, zone: str) -> str:
        child = self._children.get(zone)
        if child is None:
            return "no process"
        code = child.process.returncode
        state = "running" if code is None else f"exited with status {code}"
        try:
            lines = child.log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        except OSError as exc:
            lines = [f"(cannot read {child.log}: {exc})"]
        tail = "".join(f"\n      {line}" for line in lines)
        return f"pid {child.process.pid} {state}; last lines of {child.log.name}:{tail}"


async def _kill(process: Process) -> None:
    if process.returncode is None:
        # By this process's own pid: never by name, never a process group.
        process.kill()
    with anyio.fail_after(STOP_TIMEOUT):
        await process.wait()
    await process.aclose()


# -- networks ---------------------------------------------------------------------------


@attrs.frozen
class Network:
    """The links between a federation's planes, and where its zone engines run."""

    name: NetworkName
    links: Links
    zones: Zones


@contextlib.asynccontextmanager
async def open_network(
    name: NetworkName,
    *,
    stores: Mapping[str, Store],
    specs: Mapping[str, StoreSpec],
    options: SyncOptions,
    work_dir: Path,
    nats_url: str | None = None,
) -> AsyncIterator[Network]:
    """The network *name* for zones with *stores* (opened from *specs*).

    *work_dir* keeps the gRPC certificate (reused from one federation to the next)
    and the zone processes' logs. The NATS networks run through the NATS server at
    *nats_url* (``nats://127.0.0.1:<port>``), which may serve other federations
    too: each uses a subject prefix of its own. On exit, in-process zone engines
    are stopped, child processes killed and the relay closed; the global engine
    is the caller's to stop.

    Raises:
        ValueError: a NATS network without *nats_url*, or a malformed one.
    """
    if name == "memory":
        links: Links = MemoryLinks()
        async with anyio.create_task_group() as group:
            yield Network(name, links, ZoneEngines(group, links, stores, options))
            group.cancel_scope.cancel()
        return
    if name in NATS_NETWORKS:
        relay = TcpRelay(*_nats_server_address(name, nats_url))  # in front of the server
    else:
        relay = TcpRelay("127.0.0.1", 0)  # pointed at each global once it serves
    async with relay:
        links = NatsLinks(relay) if name in NATS_NETWORKS else GrpcLinks(relay, work_dir)
        if not name.endswith("-zone-processes"):
            async with anyio.create_task_group() as group:
                yield Network(name, links, ZoneEngines(group, links, stores, options))
                group.cancel_scope.cancel()
            return
        log_dir = Path(tempfile.mkdtemp(prefix="zone-logs-", dir=work_dir))
        processes = ZoneProcesses(links, specs, options, log_dir)
        try:
            yield Network(name, links, processes)
        finally:
            await processes.kill_all()


def _nats_server_address(name: NetworkName, nats_url: str | None) -> tuple[str, int]:
    """The host and port of *nats_url* (``nats://host:port``), which network *name* needs."""
    if nats_url is None:
        raise ValueError(f"network {name!r} needs nats_url: the address of a NATS server")
    url = urllib.parse.urlsplit(nats_url)
    if url.scheme != "nats" or not url.hostname or url.port is None:
        raise ValueError(f"nats_url must be nats://host:port, got {nats_url!r}")
    return url.hostname, url.port
