"""The control plane ``kds-cp run`` starts: a store, the replication engine and the HTTP API.

:class:`ControlPlane` assembles them from a :class:`~kds.config.KdsConfig`:

- **global** (``mode: global``): the store, a :class:`~kds.sync.GlobalEngine` serving zones
  on the KDS transport (gRPC's ``grpcs://0.0.0.0:5685`` by default, or NATS) and admitting
  only zones with a ``cp`` zone token (unless ``zoneAuth: none``), the ServiceInsight
  reconciler, and the API;
- **zone** (``mode: zone``): the store, a :class:`~kds.sync.ZoneEngine` dialling the global
  with its zone token (and reconnecting for as long as it runs), the dataplane server
  where ``kds-dp`` registers proxies (``https://0.0.0.0:5678``), the reconciler of its
  ZoneIngresses' ``availableServices``, and the API.

The API accepts writes from loopback clients, and from others only with the admin token
that :func:`admin_token` keeps in ``<workDir>/admin-token`` (created on first start,
readable by its owner only). Programs embedding kds can assemble the same parts
themselves: ``examples/global_daemon.py`` and ``examples/zone_daemon.py`` show how.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import uuid
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs
import yaml

from kds.config import (
    create_store,
    grpc_client,
    grpc_server,
    nats_client,
    nats_server,
    render_yaml,
    sync_options,
    work_dir,
    zone_token,
)
from kds.errors import ConfigError
from kds.insights import AvailableServices, ServiceInsights
from kds.sync import GlobalEngine, ZoneEngine
from kds.sync.engines import default_authenticator
from kds.tokens import TokenVerifier, zone_authenticator

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from pathlib import Path

    from anyio.abc import TaskGroup, TaskStatus

    from kds.config import KdsConfig
    from kds.resource import Catalog
    from kds.store import Store
    from kds.transport import Transport

__all__ = ["ADMIN_TOKEN_FILE", "ControlPlane", "Endpoints", "admin_token"]

logger = logging.getLogger(__name__)

ADMIN_TOKEN_FILE: Final = "admin-token"  # noqa: S105 -- a file name, not a secret
"""The admin token's file name in ``general.workDir``."""

_LIVENESS_INTERVALS: Final = 3
"""A zone is Online while its session was seen within this many insight intervals."""


def admin_token(directory: Path) -> str:
    """The API's admin token, kept in *directory*/``admin-token``; created if missing.

    The file is created with mode 0600 (and *directory* with 0700), so that only the
    control plane's user -- and whoever it hands the token to -- can write to the API
    from another host.

    Raises:
        ConfigError: the directory or file cannot be created or read.
    """
    path = directory / ADMIN_TOKEN_FILE
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            # O_EXCL: two processes starting together must not overwrite each other's token.
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(secrets.token_urlsafe(32) + "\n")
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"general.workDir: cannot create {path}: {exc.strerror}") from exc
    if not token:
        raise ConfigError(f"general.workDir: {path} is empty; delete it to get a new token")
    return token


@attrs.frozen
class Endpoints:
    """Where a started control plane can be reached.

    Attributes:
        api: the HTTP API's base URL (``http://127.0.0.1:5681``).
        kds: the KDS address zones dial (a global's), or the global it dials (a zone's).
    """

    api: str
    kds: str
    dp: str | None = None
    """The dataplane server's URL (a zone's); ``None`` on a global."""


class ControlPlane:
    """A global or zone control plane, as ``kds-cp run`` runs it.

    Args:
        config: the configuration (see :func:`kds.config.load_config`).
        catalog: the resource types it knows; the default catalog if ``None``.

    Raises:
        ConfigError: the store or transport cannot be built from *config* (a missing
            extra, an unreadable certificate); raised by :meth:`run` before anything
            starts listening.
    """

    def __init__(self, config: KdsConfig, *, catalog: Catalog | None = None) -> None:
        self.config = config
        self.catalog = catalog
        self.instance_id = f"{config.mode}-{uuid.uuid4().hex[:12]}"
        self.global_engine: GlobalEngine | None = None
        """The replication engine of a global, once :meth:`run` has started it."""
        self.zone_engine: ZoneEngine | None = None
        """The replication engine of a zone, once :meth:`run` has started it."""
        self._kds_address: str | None = None

    def _transport(self) -> Transport:
        nats = self.config.multizone.transport == "nats"
        if self.config.mode == "global":
            return nats_server(self.config) if nats else grpc_server(self.config)
        return nats_client(self.config) if nats else grpc_client(self.config)

    def _ready(self) -> str | None:
        """Why the control plane is not ready yet, or ``None`` once it is."""
        if self.config.mode == "global" and self._kds_address is None:
            return "the KDS server is not listening yet"
        return None

    async def run(self, *, task_status: TaskStatus[Endpoints] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open the store, start replication and the API; run until cancelled.

        Reports the :class:`Endpoints` through *task_status* once both listen. On
        cancellation (SIGTERM, say) sessions end with a Goodbye and the store is closed.
        """
        from kds.api import ApiServer

        config = self.config
        token = admin_token(work_dir(config))
        transport = self._transport()
        store = create_store(config, catalog=self.catalog)
        dp_url: str | None = None
        async with store, anyio.create_task_group() as group:
            if config.mode == "global":
                self._kds_address = await self._start_global(store, transport, group)
            else:
                self._kds_address = self._start_zone(store, transport, group)
                dp_url = await self._start_dataplane_server(store, group)
            api = ApiServer(
                store,
                mode=config.mode,
                zone=config.multizone.zone.name if config.mode == "zone" else None,
                catalog=self.catalog,
                admin_token=token,
                config=_shown_config(config),
                liveness=_LIVENESS_INTERVALS * config.sync.insight_interval,
                ready=self._ready,
                instance_id=self.instance_id,
            )
            api_url = await _listen(group, api.serve, "api", config.api.address, config.api.port)
            endpoints = Endpoints(api=api_url, kds=self._kds_address, dp=dp_url)
            logger.info(
                "%s control plane %s started on a %s store: API %s, KDS %s%s",
                config.mode,
                self.instance_id,
                config.store.type,
                endpoints.api,
                endpoints.kds,
                f", dataplane server {dp_url}" if dp_url else "",
            )
            task_status.started(endpoints)

    async def _start_global(self, store: Store, transport: Transport, group: TaskGroup) -> str:
        if self.config.multizone.global_.kds.zone_auth == "zoneToken":
            authenticate = zone_authenticator(store)
        else:
            logger.warning(
                "multizone.global.kds.zoneAuth is none: any zone that reaches the KDS "
                "server is admitted under the name it claims"
            )
            authenticate = default_authenticator
        engine = GlobalEngine(
            store,
            transport,
            options=sync_options(self.config),
            catalog=self.catalog,
            authenticate=authenticate,
            instance_id=self.instance_id,
        )
        self.global_engine = engine
        address: str = await group.start(engine.run)
        # A dataplane counts as online while its heartbeats arrive (they replicate up).
        insights = ServiceInsights(store, liveness=self.config.dp_server.heartbeat_timeout)
        await group.start(insights.run)
        return address

    def _start_zone(self, store: Store, transport: Transport, group: TaskGroup) -> str:
        zone = self.config.multizone.zone
        credentials = zone_token(self.config)
        if credentials is None:
            logger.warning(
                "no zone token (multizone.zone.kds.cpTokenPath): a global that requires "
                "zone tokens (the default) will refuse this zone; generate one on the "
                "global with `kdsctl generate zone-token --zone %s --scope cp`",
                zone.name,
            )
        engine = ZoneEngine(
            store,
            transport,
            zone=zone.name,
            credentials=credentials,
            options=sync_options(self.config),
            catalog=self.catalog,
            instance_id=self.instance_id,
        )
        self.zone_engine = engine
        group.start_soon(engine.run)
        group.start_soon(AvailableServices(store).run)
        if self.config.multizone.transport == "nats":
            return self.config.multizone.nats.url
        return zone.global_address

    async def _start_dataplane_server(self, store: Store, group: TaskGroup) -> str:
        from kds.dpserver import DataplaneServer

        settings = self.config.dp_server
        server = DataplaneServer(
            store,
            zone=self.config.multizone.zone.name,
            verifier=TokenVerifier(store),
            work_dir=work_dir(self.config),
            cert_file=settings.tls_cert_file or None,
            key_file=settings.tls_key_file or None,
            heartbeat_timeout=settings.heartbeat_timeout,
            catalog=self.catalog,
            instance_id=self.instance_id,
        )
        return await _listen(group, server.serve, "dpServer", settings.address, settings.port)


async def _listen(
    group: TaskGroup,
    serve: Callable[..., Coroutine[Any, Any, None]],
    section: str,
    host: str,
    port: int,
) -> str:
    """Start the server *serve* on *host*:*port*; its URL. *section* names its settings."""
    try:
        url: str = await group.start(serve, host, port)
    except OSError as exc:  # the port is taken, the address is not ours, ...
        problem = exc.strerror or exc
        raise ConfigError(f"{section}: cannot listen on {host}:{port}: {problem}") from exc
    return url


def _shown_config(config: KdsConfig) -> dict[str, Any]:
    """The configuration as ``GET /config`` shows it: secrets masked, as ``config print``."""
    shown: dict[str, Any] = yaml.safe_load(render_yaml(config))
    return shown
