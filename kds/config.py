"""Configuration of the control plane (``kds-cp``): defaults, a YAML file, the environment.

The configuration is a tree of frozen attrs classes rooted at :class:`KdsConfig`.
Its YAML layout is Kuma's (``multizone.zone.globalAddress``, ``store.postgres.dbName``),
so a ``kuma-cp`` configuration file for the settings kds has works as written.

Every setting has an environment variable: ``KDS_`` plus its path in upper snake case
(``store.postgres.dbName`` is ``KDS_STORE_POSTGRES_DB_NAME``). Where Kuma has the same
setting, its ``KUMA_*`` name is accepted as an alias (``KUMA_STORE_POSTGRES_DB_NAME``),
so the deployment workflow written for ``kuma-cp`` runs unchanged.

Loading is strict, because a typo in configuration should stop start-up rather than
silently leave a default in place: an unknown file key or ``KDS_*`` variable, a value
of the wrong type, a value out of range and a missing required setting are all a
:class:`~kds.errors.ConfigError` whose one-line message names the environment variable
and/or the file key. Secret values are never part of a message or of ``repr``.

The library never reads ``os.environ`` itself: callers pass the environment to
:func:`load_config` (only the command line passes ``os.environ``).
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import logging
import math
import re
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, get_args, get_origin

import attrs
import yaml

from kds._yaml import StrictLoader
from kds.errors import ConfigError

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Iterator

    from kds.resource import Catalog
    from kds.store import Store
    from kds.sync import SyncOptions
    from kds_stores.postgres import PostgresSettings
    from kds_transports.grpc import Authenticate, GrpcTransport
    from kds_transports.nats import Authenticate as NatsAuthenticate
    from kds_transports.nats import NatsTransport

__all__ = [
    "MASK",
    "ApiConfig",
    "DpServerConfig",
    "GeneralConfig",
    "GlobalConfig",
    "GlobalKdsConfig",
    "KdsConfig",
    "LogConfig",
    "MultizoneConfig",
    "NatsConfig",
    "PostgresConfig",
    "PostgresTlsConfig",
    "Setting",
    "SqliteConfig",
    "StoreConfig",
    "SyncConfig",
    "ZoneConfig",
    "ZoneKdsConfig",
    "all_settings",
    "create_store",
    "global_kds_address",
    "grpc_client",
    "grpc_server",
    "load_config",
    "nats_client",
    "nats_server",
    "postgres_settings",
    "render_defaults_yaml",
    "render_docs",
    "render_yaml",
    "sqlite_path",
    "sync_options",
    "validate_config",
    "work_dir",
    "zone_token",
]

logger = logging.getLogger(__name__)

Mode: TypeAlias = Literal["global", "zone"]
Environment: TypeAlias = Literal["universal", "kubernetes"]
StoreType: TypeAlias = Literal["memory", "sqlite", "postgres", "kubernetes"]
TransportType: TypeAlias = Literal["grpc", "nats"]
Synchronous: TypeAlias = Literal["normal", "full"]
PostgresTlsMode: TypeAlias = Literal["disable", "verifyNone", "verifyCa", "verifyFull"]
TlsVersion: TypeAlias = Literal["1.2", "1.3"]
LogLevel: TypeAlias = Literal["debug", "info", "warning", "error"]
LogFormat: TypeAlias = Literal["text", "json"]
ZoneAuth: TypeAlias = Literal["zoneToken", "none"]

MASK: Final = "****"
"""What :func:`render_yaml` shows instead of a secret that is set."""

_META: Final = "kds.config"
_ENV_PREFIX: Final = "KDS_"
_KUMA_PREFIX: Final = "KUMA_"
_NOT_CONFIG_PREFIXES: Final = ("KDS_TEST_", "KDS_HYPOTHESIS_")
"""``KDS_*`` variables that belong to kds's own test suite, not to the control plane."""
_COMMAND_LINE: Final = "command line"
_DOCS_COMMAND: Final = "kds-cp config docs > docs/config.md"


@attrs.frozen
class _Meta:
    """How one attribute appears in the file and the environment, beyond its name."""

    key: str | None = None  # YAML key when camelCase of the attribute name is not Kuma's
    kuma: bool | str = False  # True: KUMA_ + the same suffix as KDS_; a str: that name
    secret: bool = False
    minimum: float | None = None
    maximum: float | None = None
    value_aliases: Mapping[str, str] = attrs.field(factory=dict)


def _meta(**kwargs: Any) -> dict[str, _Meta]:
    """Field metadata: how the attribute appears in the file and the environment.

    Secrets also need ``repr=False`` on their field, so that a logged config never
    shows them.
    """
    return {_META: _Meta(**kwargs)}


# -- the tree ------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class GeneralConfig:
    """Settings every part of the control plane shares."""

    work_dir: str = attrs.field(default="~/.kds", metadata=_meta(kuma=True))
    """Directory for the control plane's own files: the SQLite database by default and
    the generated KDS server certificate (``kds-cp.crt``). ``~`` is expanded."""


@attrs.frozen(kw_only=True)
class SqliteConfig:
    """The SQLite store: a single file, for a single control-plane process."""

    path: str = ""
    """Database file; empty means ``<workDir>/kds.db``. Created if missing."""
    synchronous: Synchronous = "full"
    """SQLite's ``synchronous`` pragma: ``full`` survives power loss, ``normal`` only
    process crashes (and commits faster)."""
    busy_timeout: float = attrs.field(default=5.0, metadata=_meta(minimum=0.0))
    """How long a write waits for a lock held by another connection before failing."""


@attrs.frozen(kw_only=True)
class PostgresTlsConfig:
    """TLS between the control plane and PostgreSQL (Kuma's ``store.postgres.tls``)."""

    mode: PostgresTlsMode = attrs.field(default="disable", metadata=_meta(kuma=True))
    """``disable`` (plain TCP), ``verifyNone`` (encrypted, any server certificate),
    ``verifyCa`` (certificate signed by ``caPath``) or ``verifyFull`` (also checks the
    host name)."""
    ca_path: str = attrs.field(default="", metadata=_meta(kuma=True))
    """PEM file of the CA(s) that sign the server certificate; ``verifyCa`` needs it."""
    cert_path: str = attrs.field(default="", metadata=_meta(kuma=True))
    """PEM client certificate, for servers that authenticate clients by certificate."""
    key_path: str = attrs.field(default="", metadata=_meta(kuma=True))
    """PEM private key of ``certPath`` (required with it)."""
    disable_sslsni: bool = attrs.field(
        default=False, metadata=_meta(key="disableSSLSNI", kuma=True)
    )
    """Do not send the server name in the TLS handshake (for proxies that reject it);
    cannot be combined with ``verifyFull``."""


@attrs.frozen(kw_only=True)
class PostgresConfig:
    """The PostgreSQL store (Kuma's ``store.postgres``), shared by any number of processes.

    Create or upgrade its schema with ``kds-cp migrate up`` before the first start.
    """

    host: str = attrs.field(default="", metadata=_meta(kuma=True))
    """Server host name or IP address; required when ``store.type`` is ``postgres``."""
    port: int = attrs.field(default=5432, metadata=_meta(kuma=True, minimum=1, maximum=65535))
    """Server TCP port."""
    user: str = attrs.field(default="kds", metadata=_meta(kuma=True))
    """Role to connect as."""
    password: str = attrs.field(default="", repr=False, metadata=_meta(kuma=True, secret=True))
    """The role's password; empty for none. Never printed or logged."""
    db_name: str = attrs.field(default="kds", metadata=_meta(kuma=True))
    """Database name."""
    schema: str = attrs.field(default="public", metadata=_meta(kuma=True))
    """Schema holding the kds tables; several stores can share a database, each in its
    own schema. (A kds setting: its ``KUMA_*`` name is accepted for compatibility.)"""
    tls: PostgresTlsConfig = attrs.field(factory=PostgresTlsConfig)
    connection_timeout: float = attrs.field(default=5.0, metadata=_meta(kuma=True))
    """How long to wait for a new connection before giving up."""
    command_timeout: float = 60.0
    """How long one statement may take before the operation fails as unavailable (a
    server that never answers is found out, not waited on forever)."""
    max_open_connections: int = attrs.field(default=10, metadata=_meta(kuma=True, minimum=1))
    """Most connections the store opens at once (plus one for ``LISTEN``)."""


@attrs.frozen(kw_only=True)
class KubernetesStoreConfig:
    """The Kubernetes store: resources as custom resources in one namespace."""

    namespace: str = "kds-system"
    """Namespace holding the store's objects (created if missing). Control planes
    that share a namespace share one store."""
    group: str = "kuma.io"
    """API group of the CustomResourceDefinitions (``meshtimeouts.kuma.io``)."""
    kubeconfig: str = ""
    """Kubeconfig file to reach the cluster with; empty uses the pod's service account
    when running in a cluster, else ``~/.kube/config``."""
    context: str = ""
    """Context of ``kubeconfig`` to use; empty uses its current context."""
    watch_timeout: float = attrs.field(default=10.0, metadata=_meta(minimum=1))
    """Seconds each watch lasts before it is opened again; the API server sends a
    bookmark shortly before a watch ends, which bounds how long a quiet resource type
    can hold back the merged event log."""


@attrs.frozen(kw_only=True)
class StoreConfig:
    """Where the control plane keeps its resources and their event log."""

    type: StoreType = attrs.field(default="sqlite", metadata=_meta(kuma=True))
    """``sqlite`` (a file in ``workDir``: works with no configuration at all),
    ``postgres`` (production, several processes), ``kubernetes`` (custom resources;
    the default when ``environment`` is ``kubernetes``) or ``memory`` (lost on exit)."""
    sqlite: SqliteConfig = attrs.field(factory=SqliteConfig)
    postgres: PostgresConfig = attrs.field(factory=PostgresConfig)
    kubernetes: KubernetesStoreConfig = attrs.field(factory=KubernetesStoreConfig)


@attrs.frozen(kw_only=True)
class GlobalKdsConfig:
    """The KDS server the global runs for its zones (gRPC transport)."""

    address: str = "0.0.0.0"  # noqa: S104 -- zones on other hosts must reach it
    """Interface the KDS server listens on."""
    grpc_port: int = attrs.field(default=5685, metadata=_meta(kuma=True, minimum=0, maximum=65535))
    """Port the KDS server listens on (0 picks a free one)."""
    tls_enabled: bool = attrs.field(default=True, metadata=_meta(kuma=True))
    """Serve ``grpcs://`` (TLS); ``false`` serves plaintext ``grpc://``."""
    tls_cert_file: str = attrs.field(default="", metadata=_meta(kuma=True))
    """PEM certificate chain to serve; empty generates a self-signed certificate in
    ``workDir`` (zones then need ``tlsSkipVerify`` or ``rootCaFile``)."""
    tls_key_file: str = attrs.field(default="", metadata=_meta(kuma=True))
    """PEM private key of ``tlsCertFile`` (required with it)."""
    tls_min_version: TlsVersion = attrs.field(
        default="1.2", metadata=_meta(kuma=True, value_aliases={"TLSv1_2": "1.2", "TLSv1_3": "1.3"})
    )
    """Oldest TLS version accepted: ``1.2`` or ``1.3`` (Kuma's ``TLSv1_2``/``TLSv1_3``
    are accepted too)."""
    tls_extra_names: tuple[str, ...] = ()
    """More DNS names or IPs for a generated certificate, such as the load balancer's
    name that zones dial (comma-separated in the environment)."""
    zone_auth: ZoneAuth = "zoneToken"
    """How the global authenticates zones: ``zoneToken`` (the default) admits a zone only
    with a ``cp``-scoped zone token issued for its name (``kdsctl generate zone-token
    --zone Z --scope cp``); ``none`` trusts the name a zone claims, as Kuma's open-source
    KDS does."""


@attrs.frozen(kw_only=True)
class GlobalConfig:
    """Settings of a control plane running as the global (``mode: global``)."""

    kds: GlobalKdsConfig = attrs.field(factory=GlobalKdsConfig)


@attrs.frozen(kw_only=True)
class ZoneKdsConfig:
    """How a zone connects to the global's KDS server."""

    tls_skip_verify: bool = attrs.field(default=False, metadata=_meta(kuma=True))
    """Encrypt, but accept any certificate the global presents (its default certificate
    is self-signed); excludes ``rootCaFile``."""
    root_ca_file: str = attrs.field(default="", metadata=_meta(kuma=True))
    """PEM file of the CA (or the global's own certificate) to verify the global with;
    empty trusts the system's CAs."""
    server_name: str = ""
    """Name to check the global's certificate against when ``globalAddress`` is not one
    of its names (a load balancer's IP, say)."""
    connect_timeout: float = 10.0
    """How long one connection attempt may take, TLS and admission included."""
    cp_token: str = attrs.field(default="", repr=False, metadata=_meta(secret=True))
    """The zone's ``cp``-scoped zone token, which the global requires by default; prefer
    ``cpTokenPath``. Never printed or logged."""
    cp_token_path: str = ""
    """File holding the zone's ``cp``-scoped zone token (read at start-up)."""


@attrs.frozen(kw_only=True)
class ZoneConfig:
    """Settings of a control plane running as a zone (``mode: zone``)."""

    name: str = attrs.field(default="", metadata=_meta(kuma=True))
    """The zone's name, the same for every control plane of the zone; required in zone
    mode."""
    global_address: str = attrs.field(default="", metadata=_meta(kuma=True))
    """The global's KDS address, ``grpcs://host:5685`` (``grpc://`` for plaintext);
    required in zone mode with the gRPC transport."""
    kds: ZoneKdsConfig = attrs.field(factory=ZoneKdsConfig)


@attrs.frozen(kw_only=True)
class NatsConfig:
    """The NATS server both the global and the zones connect to (``transport: nats``)."""

    url: str = "nats://127.0.0.1:4222"
    """Server URL (``nats://`` or ``tls://``); several servers of one cluster are
    separated by commas."""
    prefix: str = "kds"
    """Subject prefix sessions travel under; the global and its zones must agree."""
    user: str = ""
    """User name to authenticate with (with ``password``); empty for none."""
    password: str = attrs.field(default="", repr=False, metadata=_meta(secret=True))
    """Password of ``user``. Never printed or logged."""
    token: str = attrs.field(default="", repr=False, metadata=_meta(secret=True))
    """Authentication token; empty for none. Never printed or logged."""
    creds_file: str = ""
    """NATS credentials file (JWT and NKey seed); empty for none."""
    ca_file: str = ""
    """PEM file of the CA(s) that sign the NATS server's certificate; empty trusts the
    system's CAs. Needs a ``tls://`` URL."""
    cert_file: str = ""
    """PEM client certificate, for NATS servers that verify their clients
    (``tls { verify: true }``); needs a ``tls://`` URL."""
    key_file: str = ""
    """PEM private key of ``certFile`` (required with it)."""
    server_name: str = ""
    """Name to check the NATS server's certificate against when the URL does not use
    one of its names (an IP address, say); needs a ``tls://`` URL."""


@attrs.frozen(kw_only=True)
class MultizoneConfig:
    """How the global and its zones replicate resources."""

    transport: TransportType = "grpc"
    """``grpc``: zones dial the global's KDS server. ``nats``: both sides connect to the
    NATS server of ``multizone.nats`` instead."""
    global_: GlobalConfig = attrs.field(factory=GlobalConfig, metadata=_meta(key="global"))
    zone: ZoneConfig = attrs.field(factory=ZoneConfig)
    nats: NatsConfig = attrs.field(factory=NatsConfig)


@attrs.frozen(kw_only=True)
class DpServerConfig:
    """The zone's dataplane server, where ``kds-dp`` registers proxies (Kuma's ``dpServer``)."""

    address: str = "0.0.0.0"  # noqa: S104 -- proxies on other hosts must reach it
    """Interface the dataplane server listens on."""
    port: int = attrs.field(default=5678, metadata=_meta(kuma=True, minimum=0, maximum=65535))
    """Port the dataplane server listens on (HTTPS; 0 picks a free one)."""
    tls_cert_file: str = attrs.field(default="", metadata=_meta(kuma=True))
    """PEM certificate chain to serve; empty generates a self-signed certificate in
    ``workDir`` (``kds-dp`` then needs ``--ca-cert-file``)."""
    tls_key_file: str = attrs.field(default="", metadata=_meta(kuma=True))
    """PEM private key of ``tlsCertFile`` (required with it)."""
    heartbeat_timeout: float = 30.0
    """A proxy that sent no heartbeat for this long is shown offline."""


@attrs.frozen(kw_only=True)
class ApiConfig:
    """The control plane's HTTP API."""

    address: str = attrs.field(
        default="127.0.0.1", metadata=_meta(kuma="KUMA_API_SERVER_HTTP_INTERFACE")
    )
    """Interface the API listens on; loopback by default, since it is not authenticated."""
    port: int = attrs.field(
        default=5681, metadata=_meta(kuma="KUMA_API_SERVER_HTTP_PORT", minimum=0, maximum=65535)
    )
    """Port the API listens on (0 picks a free one)."""


@attrs.frozen(kw_only=True)
class SyncConfig:
    """Timing and flow control of replication sessions (see ``docs/protocol.md``)."""

    heartbeat_interval: float = 5.0
    """Silence after which a side sends a Ping (a zone uses the global's value)."""
    heartbeat_timeout: float = 15.0
    """Time without any frame from the peer after which the session is ended; must be
    longer than ``heartbeatInterval``."""
    handshake_timeout: float = 10.0
    """How long the zone waits for the Welcome, and the global for the Hello."""
    window: int = attrs.field(default=8, metadata=_meta(minimum=1))
    """Batches a sender lets await acknowledgement before it waits."""
    reconnect_base: float = 0.5
    """Delay before a zone's first reconnection attempt; doubles with each failure."""
    reconnect_max: float = 30.0
    """Longest delay between a zone's reconnection attempts."""
    max_frame_size: int = attrs.field(default=4 * 1024 * 1024, metadata=_meta(minimum=1024))
    """Largest frame this side accepts, in bytes."""
    insight_interval: float = 10.0
    """Time between the global's updates of a connected zone's ZoneInsight."""


@attrs.frozen(kw_only=True)
class LogConfig:
    """The daemon's logging (the library itself never configures logging)."""

    level: LogLevel = "info"
    """Least severe level written: ``debug``, ``info``, ``warning`` or ``error``."""
    format: LogFormat = "text"
    """``text`` for people, ``json`` (one object a line) for log collectors."""


@attrs.frozen(kw_only=True)
class KdsConfig:
    """The whole configuration of ``kds-cp``; every field has a working default.

    With no configuration at all this is a global control plane keeping its resources
    in a SQLite file in ``~/.kds``. Build one with :func:`load_config`; a config built
    in code can be checked with :func:`validate_config`.
    """

    mode: Mode = attrs.field(default="global", metadata=_meta(kuma=True))
    """``global`` (the one global control plane) or ``zone``."""
    environment: Environment = attrs.field(default="universal", metadata=_meta(kuma=True))
    """Where the control plane runs: ``universal`` (outside Kubernetes, or on it with a
    PostgreSQL store) or ``kubernetes`` (resources are custom resources: ``store.type``
    then defaults to ``kubernetes``)."""
    general: GeneralConfig = attrs.field(factory=GeneralConfig)
    store: StoreConfig = attrs.field(factory=StoreConfig)
    multizone: MultizoneConfig = attrs.field(factory=MultizoneConfig)
    api: ApiConfig = attrs.field(factory=ApiConfig)
    dp_server: DpServerConfig = attrs.field(factory=DpServerConfig)
    sync: SyncConfig = attrs.field(factory=SyncConfig)
    log: LogConfig = attrs.field(factory=LogConfig)


# -- the settings table --------------------------------------------------------------

_Kind: TypeAlias = Literal["bool", "int", "seconds", "str", "list", "choice"]


@attrs.frozen
class Setting:
    """One leaf of the configuration tree: where it lives and how it is spelled.

    Attributes:
        path: attribute names from :class:`KdsConfig` down (``("store", "postgres", "db_name")``).
        key: the dotted YAML key (``"store.postgres.dbName"``).
        env: the ``KDS_*`` environment variable (``"KDS_STORE_POSTGRES_DB_NAME"``).
        aliases: other environment variables accepted for it (Kuma's names).
        kind: ``bool``, ``int``, ``seconds`` (a float), ``str``, ``list`` (of strings) or
            ``choice`` (one of :attr:`choices`).
        choices: the values a ``choice`` accepts.
        default: the value when nothing sets it.
        secret: whether the value is hidden from ``repr``, messages and ``config print``.
        doc: the field's docstring.
        meta: the rest of what reading it checks: ``minimum`` and ``maximum`` bounds,
            ``value_aliases`` (Kuma's spellings of a choice).
    """

    path: tuple[str, ...]
    key: str
    env: str
    aliases: tuple[str, ...]
    kind: _Kind
    choices: tuple[str, ...]
    default: object
    secret: bool
    doc: str
    meta: _Meta = attrs.field(repr=False)

    @property
    def env_names(self) -> tuple[str, ...]:
        """Every environment variable that sets this, ``KDS_*`` first."""
        return (self.env, *self.aliases)

    def value_of(self, config: KdsConfig) -> Any:
        """This setting's value in *config*."""
        value: Any = config
        for name in self.path:
            value = getattr(value, name)
        return value


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _kind(annotation: Any) -> tuple[_Kind, tuple[str, ...]]:
    if annotation is bool:
        return "bool", ()
    if annotation is int:
        return "int", ()
    if annotation is float:
        return "seconds", ()
    if annotation is str:
        return "str", ()
    if get_origin(annotation) is Literal:
        return "choice", tuple(str(arg) for arg in get_args(annotation))
    if get_origin(annotation) is tuple and get_args(annotation) == (str, ...):
        return "list", ()
    raise TypeError(f"no configuration kind for {annotation!r}")  # a bug in this module


@functools.cache
def _attribute_docs() -> dict[str, dict[str, str]]:
    """Attribute docstrings per class, read from this module's source (as Sphinx does).

    Python keeps no attribute docstrings at run time; reading them back lets each field
    be documented once, where it is defined, and still feed ``docs/config.md``.
    """
    try:
        source = inspect.getsource(sys.modules[__name__])
    except (OSError, TypeError):  # installed without sources: docs lose their text only
        return {}
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for target, after in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(target, ast.AnnAssign)
                and isinstance(target.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                fields[target.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _walk(
    cls: type[Any], path: tuple[str, ...], keys: tuple[str, ...]
) -> Iterator[tuple[attrs.Attribute[Any], type[Any], tuple[str, ...], tuple[str, ...]]]:
    """Each attribute of *cls*: (attribute, its resolved type, its path, its YAML keys)."""
    attrs.resolve_types(cls)  # string annotations (PEP 563) to types, once per class
    for field in attrs.fields(cls):
        meta: _Meta = field.metadata.get(_META, _Meta())
        key = meta.key or _camel(field.name.rstrip("_"))
        assert field.type is not None  # noqa: S101 -- resolve_types filled every type in
        yield field, field.type, (*path, field.name), (*keys, key)


@functools.cache
def all_settings() -> tuple[Setting, ...]:
    """Every leaf setting of :class:`KdsConfig`, in file order.

    ``docs/config.md``, the loader and the tests are all driven by this table.
    """
    docs = _attribute_docs()

    def leaves(cls: type[Any], path: tuple[str, ...], keys: tuple[str, ...]) -> Iterator[Setting]:
        for field, annotation, field_path, field_keys in _walk(cls, path, keys):
            if attrs.has(annotation):
                yield from leaves(annotation, field_path, field_keys)
                continue
            meta: _Meta = field.metadata.get(_META, _Meta())
            env_suffix = "_".join(name.rstrip("_").upper() for name in field_path)
            if meta.kuma is True:
                aliases: tuple[str, ...] = (_KUMA_PREFIX + env_suffix,)
            elif isinstance(meta.kuma, str):
                aliases = (meta.kuma,)
            else:
                aliases = ()
            kind, choices = _kind(annotation)
            yield Setting(
                path=field_path,
                key=".".join(field_keys),
                env=_ENV_PREFIX + env_suffix,
                aliases=aliases,
                kind=kind,
                choices=choices,
                default=field.default,
                secret=meta.secret,
                doc=docs.get(cls.__name__, {}).get(field.name, ""),
                meta=meta,
            )

    return tuple(leaves(KdsConfig, (), ()))


@functools.cache
def _by_env() -> dict[str, Setting]:
    return {name: setting for setting in all_settings() for name in setting.env_names}


@functools.cache
def _by_path() -> dict[tuple[str, ...], Setting]:
    return {setting.path: setting for setting in all_settings()}


def _setting_at(*path: str) -> Setting:
    return _by_path()[path]


# -- parsing -------------------------------------------------------------------------

_DURATION: Final = re.compile(
    r"(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?P<unit>ms|s|m|h)?"
)
_UNITS: Final = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}
_INTEGER: Final = re.compile(r"[+-]?\d+")


def _show(setting: Setting, value: object) -> str:
    """*value* for a message: quoted, escaped onto one line, shortened; never a secret."""
    if setting.secret:
        return "<hidden>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse(setting: Setting, value: object, where: str) -> object:
    """*value* (an environment string or a YAML value) as *setting*'s type.

    Strings are read the same way wherever they come from, so ``port: "5432"`` in a
    file (as Kuma's Helm values write it) means what ``KDS_..._PORT=5432`` means.
    """

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: expected {expected}, got {_show(setting, value)}")

    text = value.strip() if isinstance(value, str) else None
    match setting.kind:
        case "bool":
            if isinstance(value, bool):
                return value
            # Only these: stock converters read "no", "off" or "false" as true (bool()),
            # YAML 1.1 reads "yes"/"on" as booleans; a boolean here is never a guess.
            if text is not None and text.lower() in ("true", "1"):
                return True
            if text is not None and text.lower() in ("false", "0"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise bad("true or false (or 1 or 0)")
        case "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if text is not None and _INTEGER.fullmatch(text):
                return int(text)
            raise bad("an integer")
        case "seconds":
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            match = _DURATION.fullmatch(text) if text is not None else None
            if match is None:
                raise bad("a duration in seconds (5, 0.5, or with a unit: 500ms, 5s, 1m, 1h)")
            return float(match["number"]) * _UNITS[match["unit"]]
        case "str":
            if value is None:  # an empty YAML value (Kuma writes `tlsCertFile:`) is unset
                return ""
            if isinstance(value, str):
                return value
            raise bad("a string (quote it in YAML)")
        case "list":
            if text is not None:
                return tuple(item.strip() for item in text.split(",") if item.strip())
            if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
                return tuple(value)
            if value is None:
                return ()
            raise bad("a list of strings (comma-separated in the environment)")
        case "choice":
            if isinstance(value, int | float) and not isinstance(value, bool):
                text = str(value)  # `tlsMinVersion: 1.3` is a YAML number
            if text is None:
                raise bad(f"one of {', '.join(setting.choices)}")
            text = setting.meta.value_aliases.get(text, text)
            if text not in setting.choices:
                raise bad(f"one of {', '.join(setting.choices)}")
            return text
    raise AssertionError(setting.kind)  # pragma: no cover - every kind is handled


# -- the YAML file -------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Writes strings with YAML line breaks (NEL, LS, PS) double-quoted, as escapes.

    With ``allow_unicode`` PyYAML writes them raw inside single quotes, where a
    reader folds them into spaces: the value would not survive the round trip.
    """


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = '"' if any(char in data for char in "\x85\u2028\u2029") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def _read_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"config file {path}: cannot be read: {reason}") from exc
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        # Not str(exc): it quotes the offending line, which may hold a password.
        mark = exc.problem_mark or exc.context_mark
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"config file {path}: invalid YAML{place}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {type(exc).__name__}") from None


def _merge_file(
    data: object,
    cls: type[Any],
    path: tuple[str, ...],
    keys: tuple[str, ...],
    file: Path,
    values: dict[tuple[str, ...], object],
) -> None:
    where = ".".join(keys) or "the top level"
    if data is None:  # `store:` with nothing under it
        return
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where} in {file}: expected a mapping of keys, got {type(data).__name__}"
        )
    children = {
        key[-1]: (field, annotation, fp, key)
        for field, annotation, fp, key in _walk(cls, path, keys)
    }
    for key, value in data.items():
        if key not in children:
            full = ".".join((*keys, str(key)))
            close = difflib.get_close_matches(str(key), list(children), n=1)
            hint = f" (did you mean {'.'.join((*keys, close[0]))}?)" if close else ""
            raise ConfigError(f"unknown key {full} in {file}{hint}")
        _, annotation, field_path, field_keys = children[key]
        if attrs.has(annotation):
            _merge_file(value, annotation, field_path, field_keys, file, values)
        else:
            setting = _by_path()[field_path]
            values[field_path] = _parse(setting, value, f"{setting.key} in {file}")


# -- the environment -----------------------------------------------------------------


def _merge_env(
    environ: Mapping[str, str], values: dict[tuple[str, ...], object]
) -> dict[tuple[str, ...], str]:
    """Parse the environment's settings into *values*; return each one's variable name."""
    by_env = _by_env()
    origins: dict[tuple[str, ...], str] = {}
    for name in sorted(environ):
        if name.startswith(_ENV_PREFIX) and name not in by_env:
            if name.startswith(_NOT_CONFIG_PREFIXES):
                continue
            close = difflib.get_close_matches(
                name, [n for n in by_env if n.startswith(_ENV_PREFIX)], n=1
            )
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown environment variable {name}: kds has no such setting{hint}")
        if name.startswith(_KUMA_PREFIX) and name not in by_env:
            # Kuma has hundreds of settings kds does not implement; a seed environment
            # written for kuma-cp sets some of them, which must not stop kds-cp.
            logger.debug("ignoring %s: kds has no such setting", name)
    for setting in all_settings():
        present = [name for name in setting.env_names if name in environ]
        if not present:
            continue
        parsed = {
            name: _parse(setting, environ[name], f"{name} ({setting.key})") for name in present
        }
        first, *others = present
        for other in others:
            if parsed[other] != parsed[first]:
                raise ConfigError(
                    f"{first} and {other} are both set, to different values: "
                    f"set only one of them ({setting.key})"
                )
        values[setting.path] = parsed[first]
        origins[setting.path] = first
    return origins


# -- building and checking -----------------------------------------------------------


def _build(cls: type[Any], path: tuple[str, ...], values: Mapping[tuple[str, ...], object]) -> Any:
    kwargs: dict[str, object] = {}
    for field, annotation, field_path, _ in _walk(cls, path, ()):
        if attrs.has(annotation):
            kwargs[field.name] = _build(annotation, field_path, values)
        elif field_path in values:
            kwargs[field.name] = values[field_path]
    return cls(**kwargs)


class _Checker:
    """Checks a whole config, naming each setting the way the user set it."""

    def __init__(self, config: KdsConfig, origins: Mapping[tuple[str, ...], str]) -> None:
        self.config = config
        self.origins = origins

    def where(self, setting: Setting) -> str:
        origin = self.origins.get(setting.path)
        if origin is None:  # a default, or a config built in code
            return f"{setting.key} ({setting.env})"
        if origin in setting.env_names:
            return f"{origin} ({setting.key})"
        if origin == _COMMAND_LINE:
            return f"{setting.key} ({origin})"
        return f"{setting.key} in {origin}"

    def fail(self, setting: Setting, problem: str) -> ConfigError:
        return ConfigError(f"{self.where(setting)}: {problem}")

    def missing(self, setting: Setting, why: str) -> ConfigError:
        names = " or ".join(setting.env_names)
        return ConfigError(
            f"{setting.key} is required {why}: set {names}, or {setting.key} in the config file"
        )

    def value(self, *path: str) -> Any:
        return _setting_at(*path).value_of(self.config)

    def check_values(self) -> None:
        for setting in all_settings():
            value = setting.value_of(self.config)
            self.check_type(setting, value)
            meta = setting.meta
            if setting.kind == "seconds":
                if not math.isfinite(value):
                    raise self.fail(setting, f"must be a finite number of seconds, got {value!r}")
                if meta.minimum is None and value <= 0:
                    raise self.fail(setting, f"must be more than 0 seconds, got {value!r}")
            if meta.minimum is not None and value < meta.minimum:
                raise self.fail(
                    setting, f"must be at least {meta.minimum:g}, got {_show(setting, value)}"
                )
            if meta.maximum is not None and value > meta.maximum:
                raise self.fail(
                    setting, f"must be at most {meta.maximum:g}, got {_show(setting, value)}"
                )

    def check_type(self, setting: Setting, value: object) -> None:
        ok = {
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "seconds": isinstance(value, int | float) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "list": isinstance(value, tuple) and all(isinstance(item, str) for item in value),
            "choice": value in setting.choices,
        }[setting.kind]
        if not ok:
            raise self.fail(setting, f"invalid value {_show(setting, value)}")

    def check_sync(self) -> None:
        interval = self.value("sync", "heartbeat_interval")
        timeout = self.value("sync", "heartbeat_timeout")
        if timeout <= interval:
            raise self.fail(
                _setting_at("sync", "heartbeat_timeout"),
                f"must be longer than sync.heartbeatInterval ({timeout:g} <= {interval:g})",
            )

    def check_zone(self) -> None:
        zone = self.config.multizone.zone
        if self.config.mode != "zone":
            return
        if not zone.name.strip():
            raise self.missing(_setting_at("multizone", "zone", "name"), "in zone mode")
        if self.config.multizone.transport != "grpc":
            return
        address = _setting_at("multizone", "zone", "global_address")
        if not zone.global_address.strip():
            raise self.missing(address, "in zone mode")
        tls = _grpc_address_tls(zone.global_address)
        if tls is None:
            raise self.fail(
                address,
                f"expected grpcs://host:port (grpc:// for plaintext), got {zone.global_address!r}",
            )
        token = _setting_at("multizone", "zone", "kds", "cp_token")
        token_path = _setting_at("multizone", "zone", "kds", "cp_token_path")
        if zone.kds.cp_token and zone.kds.cp_token_path:
            raise self.fail(token, f"cannot be combined with {self.where(token_path)}: set one")
        skip = _setting_at("multizone", "zone", "kds", "tls_skip_verify")
        root_ca = _setting_at("multizone", "zone", "kds", "root_ca_file")
        if zone.kds.tls_skip_verify and zone.kds.root_ca_file:
            raise self.fail(
                skip,
                f"cannot be combined with {self.where(root_ca)}: "
                "verify with one, or skip verification",
            )
        if not tls:
            for setting in (skip, root_ca, _setting_at("multizone", "zone", "kds", "server_name")):
                if setting.value_of(self.config):
                    raise self.fail(
                        setting, f"needs a grpcs:// global address, got {zone.global_address!r}"
                    )

    def check_pair(self, *path: str) -> None:
        """The ``tlsCertFile`` and ``tlsKeyFile`` under *path* are set together or not at all."""
        cert = _setting_at(*path, "tls_cert_file")
        key = _setting_at(*path, "tls_key_file")
        if bool(cert.value_of(self.config)) != bool(key.value_of(self.config)):
            raise ConfigError(f"{self.where(cert)} and {self.where(key)} must be set together")

    def check_global(self) -> None:
        self.check_pair("multizone", "global_", "kds")
        self.check_pair("dp_server")

    def check_postgres(self) -> None:
        postgres = self.config.store.postgres
        if not postgres.host.strip():
            raise self.missing(_setting_at("store", "postgres", "host"), "for the postgres store")
        for name in ("user", "db_name", "schema"):
            if not getattr(postgres, name):
                raise self.fail(_setting_at("store", "postgres", name), "must not be empty")
        tls = postgres.tls
        if tls.mode == "verifyCa" and not tls.ca_path:
            raise self.missing(
                _setting_at("store", "postgres", "tls", "ca_path"), "with TLS mode verifyCa"
            )
        if tls.disable_sslsni and tls.mode == "verifyFull":
            raise self.fail(
                _setting_at("store", "postgres", "tls", "disable_sslsni"),
                "cannot be combined with TLS mode verifyFull: checking the host name needs "
                "the name sent in the handshake; use verifyCa",
            )
        if bool(tls.cert_path) != bool(tls.key_path):
            cert = _setting_at("store", "postgres", "tls", "cert_path")
            key = _setting_at("store", "postgres", "tls", "key_path")
            raise ConfigError(f"{self.where(cert)} and {self.where(key)} must be set together")

    def check(self) -> None:
        self.check_values()
        self.check_sync()
        self.check_zone()
        self.check_global()
        if self.config.store.type == "postgres":
            self.check_postgres()


def _grpc_address_tls(address: str) -> bool | None:
    """Whether a gRPC address uses TLS, or ``None`` when it is not a gRPC address."""
    text = address.strip()
    if "://" not in text:
        text = f"grpcs://{text}"  # TLS unless asked otherwise, as GrpcTransport does
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return None
    if url.scheme not in ("grpc", "grpcs") or not url.hostname:
        return None
    if url.path not in ("", "/") or url.query or url.fragment or url.username:
        return None
    return url.scheme == "grpcs"


def validate_config(config: KdsConfig) -> None:
    """Check every value of *config* and the settings that depend on each other.

    :func:`load_config` does this already; call it for a config built in code.

    Raises:
        ConfigError: a value has the wrong type or is out of range, or a required
            setting is missing (a zone's name or global address, the PostgreSQL
            host), naming the setting's key and environment variable.
    """
    _Checker(config, {}).check()


def load_config(
    environ: Mapping[str, str],
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, object] | None = None,
) -> KdsConfig:
    """The configuration from defaults, then the YAML file at *path*, then *environ*.

    Args:
        environ: the environment to read ``KDS_*`` (and Kuma's ``KUMA_*``) variables
            from; pass ``os.environ`` from a program's entry point.
        path: a YAML file in the layout of ``docs/config.md``, or ``None``.
        overrides: values that win over all three, by dotted file key
            (``{"store.postgres.host": "db"}``): a command's options. They are read
            like file values, and named as coming from the command line in messages.

    Raises:
        ConfigError: with a one-line message naming the variable and/or file key:
            the file cannot be read or is not valid YAML, it has an unknown key, the
            environment has an unknown ``KDS_*`` variable (``KDS_TEST_*`` and
            ``KDS_HYPOTHESIS_*`` belong to the test suite and are ignored), a
            ``KDS_*`` variable and its ``KUMA_*`` alias disagree, a value is
            malformed or out of range, or a required setting is missing.
    """
    values: dict[tuple[str, ...], object] = {}
    origins: dict[tuple[str, ...], str] = {}
    if path is not None:
        file = Path(path)
        _merge_file(_read_yaml(file), KdsConfig, (), (), file, values)
        origins.update(dict.fromkeys(values, str(file)))
    origins.update(_merge_env(environ, values))
    by_key = {setting.key: setting for setting in all_settings()}
    for key, value in (overrides or {}).items():
        if key not in by_key:
            raise ConfigError(f"unknown setting {key}")  # a bug in the caller, not a user typo
        setting = by_key[key]
        values[setting.path] = _parse(setting, value, f"{key} ({_COMMAND_LINE})")
        origins[setting.path] = _COMMAND_LINE
    store_type = ("store", "type")
    if values.get(("environment",)) == "kubernetes" and store_type not in values:
        # As Kuma: on Kubernetes, resources are custom resources unless asked otherwise.
        values[store_type] = "kubernetes"
        origins[store_type] = origins[("environment",)]
    config: KdsConfig = _build(KdsConfig, (), values)
    _Checker(config, origins).check()
    return config


# -- rendering -----------------------------------------------------------------------


def _to_dict(
    config: Any, cls: type[Any], path: tuple[str, ...], *, mask_secrets: bool
) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for field, annotation, field_path, keys in _walk(cls, path, ()):
        value = getattr(config, field.name)
        if attrs.has(annotation):
            data[keys[-1]] = _to_dict(value, annotation, field_path, mask_secrets=mask_secrets)
            continue
        if _by_path()[field_path].secret and mask_secrets and value:
            value = MASK
        data[keys[-1]] = list(value) if isinstance(value, tuple) else value
    return data


def render_yaml(config: KdsConfig, *, mask_secrets: bool = True) -> str:
    """*config* as a YAML file :func:`load_config` reads back (``kds-cp config print``).

    Args:
        config: the configuration to render.
        mask_secrets: show secrets that are set as ``****`` (the default); pass
            ``False`` only to write a file that is itself kept secret.
    """
    data = _to_dict(config, KdsConfig, (), mask_secrets=mask_secrets)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)


def _scalar(value: object) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, allow_unicode=True, width=1000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _comment(doc: str, indent: str) -> list[str]:
    # Docstrings are reST (``x``); in the YAML comments of a Markdown page, `x` reads better.
    return [f"{indent}# {line}".rstrip() for line in doc.replace("``", "`").splitlines()]


def render_defaults_yaml() -> str:
    """The default configuration as a commented YAML file, Kuma style.

    Each key carries its docstring as a comment above it and its environment
    variables after it (``port: 5432 # ENV: KDS_STORE_POSTGRES_PORT, ...``). Loading
    it gives the default :class:`KdsConfig`.
    """
    docs = _attribute_docs()
    lines: list[str] = []

    def section(cls: type[Any], path: tuple[str, ...], depth: int) -> None:
        indent = "  " * depth
        for field, annotation, field_path, keys in _walk(cls, path, ()):
            if attrs.has(annotation):
                if depth == 0 and lines:
                    lines.append("")
                lines.extend(_comment(inspect.cleandoc(annotation.__doc__ or ""), indent))
                lines.append(f"{indent}{keys[-1]}:")
                section(annotation, field_path, depth + 1)
                continue
            setting = _by_path()[field_path]
            lines.extend(_comment(docs.get(cls.__name__, {}).get(field.name, ""), indent))
            env = ", ".join(setting.env_names)
            lines.append(f"{indent}{keys[-1]}: {_scalar(setting.default)} # ENV: {env}")

    section(KdsConfig, (), 0)
    return "\n".join(lines) + "\n"


_DOCS_INTRO: Final = """\
# Configuration reference

<!-- Generated from kds/config.py: do not edit. Regenerate with `{command}`. -->

`kds-cp` reads its configuration from three places, each overriding the one before:

1. the defaults below: with no configuration at all, `kds-cp run` is a global control
   plane keeping its resources in a SQLite file in `~/.kds`;
2. a YAML file given with `--config` (`-c`), in the layout below (Kuma's: camelCase
   keys, so a `kuma-cp` file's sections for these settings work as written);
3. environment variables: `KDS_` plus the key's path in upper snake case
   (`store.postgres.dbName` is `KDS_STORE_POSTGRES_DB_NAME`). Where Kuma has the same
   setting, its `KUMA_*` name is accepted as an alias, so Kuma's multi-zone deployment
   workflow (`KUMA_MODE=zone KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS=grpcs://...`) runs
   unchanged. Setting both names to different values is an error.

Values are read strictly, and any mistake stops start-up with one line naming the
variable and the file key:

- booleans are `true` or `false` (any case) or `1` or `0`; `yes`, `no`, `on` and `off`
  are refused, in the file as in the environment;
- durations (the settings whose defaults read `5.0`) are seconds (`5`, `0.5`) or a number
  with a unit (`500ms`, `5s`, `1m`, `1h`);
- lists are comma-separated in the environment;
- an empty string leaves a path or name unset;
- an unknown file key or `KDS_*` variable is an error (`KDS_TEST_*` and
  `KDS_HYPOTHESIS_*` belong to the test suite); `KUMA_*` variables kds does not
  implement are ignored;
- a zone needs `multizone.zone.name` and, with the gRPC transport,
  `multizone.zone.globalAddress`; the `postgres` store needs `store.postgres.host`.

Secrets (`store.postgres.password`, `multizone.nats.password`, `multizone.nats.token`)
never appear in logs or messages. `kds-cp config print` shows the effective
configuration with them masked as `****`.

## Defaults

```yaml
{defaults}```
"""


def render_docs() -> str:
    """The text of ``docs/config.md``: every key, its default, its variables, its docstring.

    Regenerate the file with ``kds-cp config docs > docs/config.md``.
    """
    return _DOCS_INTRO.format(command=_DOCS_COMMAND, defaults=render_defaults_yaml())


# -- turning the config into kds objects ---------------------------------------------


def work_dir(config: KdsConfig) -> Path:
    """``general.workDir`` with ``~`` expanded."""
    return Path(config.general.work_dir).expanduser()


def sqlite_path(config: KdsConfig) -> Path:
    """The SQLite database file: ``store.sqlite.path``, or ``<workDir>/kds.db`` when empty."""
    if config.store.sqlite.path:
        return Path(config.store.sqlite.path).expanduser()
    return work_dir(config) / "kds.db"


def postgres_settings(config: KdsConfig) -> PostgresSettings:
    """``store.postgres`` as the PostgreSQL store's settings, whatever ``store.type`` is.

    Raises:
        ConfigError: the ``postgres`` extra is not installed (naming the ``pip
            install``), ``store.postgres.host`` is not set, or a setting is invalid
            (a TLS file that does not exist, for example).
    """
    from kds._registry import store_class

    checker = _Checker(config, {})
    checker.check_postgres()
    # Through the registry: a missing extra is a ConfigError naming the pip install.
    module = sys.modules[store_class("postgres").__module__]
    postgres = config.store.postgres
    settings: PostgresSettings = module.PostgresSettings(
        host=postgres.host,
        port=postgres.port,
        user=postgres.user,
        password=postgres.password,
        db_name=postgres.db_name,
        schema=postgres.schema,
        tls_mode=postgres.tls.mode,
        ca_file=postgres.tls.ca_path or None,
        cert_file=postgres.tls.cert_path or None,
        key_file=postgres.tls.key_path or None,
        disable_sni=postgres.tls.disable_sslsni,
        connect_timeout=postgres.connection_timeout,
        command_timeout=postgres.command_timeout,
        pool_size=postgres.max_open_connections,
    )
    return settings


def sync_options(config: KdsConfig) -> SyncOptions:
    """``sync`` as the sync engines' options.

    Raises:
        ConfigError: a setting is out of range.
    """
    from kds.sync import SyncOptions

    return SyncOptions(**attrs.asdict(config.sync))


def create_store(config: KdsConfig, *, catalog: Catalog | None = None) -> Store:
    """A new (not yet opened) store of ``store.type``.

    Args:
        config: the configuration.
        catalog: the resource types the store accepts; the default catalog if ``None``.

    Raises:
        ConfigError: the store's extra is not installed, or its settings are invalid.
    """
    from kds._registry import store_class
    from kds.catalog import DEFAULT_CATALOG

    catalog = DEFAULT_CATALOG if catalog is None else catalog
    cls: Callable[..., Store] = store_class(config.store.type)
    match config.store.type:
        case "memory":
            return cls(catalog=catalog)
        case "sqlite":
            path = sqlite_path(config)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                where = "store.sqlite.path" if config.store.sqlite.path else "general.workDir"
                raise ConfigError(f"{where}: cannot create {path.parent}: {exc.strerror}") from exc
            return cls(
                path,
                catalog=catalog,
                busy_timeout=config.store.sqlite.busy_timeout,
                synchronous=config.store.sqlite.synchronous,
            )
        case "postgres":
            return cls(postgres_settings(config), catalog=catalog)
        case "kubernetes":
            kubernetes = config.store.kubernetes
            return cls(
                namespace=kubernetes.namespace,
                group=kubernetes.group,
                kubeconfig=kubernetes.kubeconfig or None,
                context=kubernetes.context or None,
                watch_timeout=kubernetes.watch_timeout,
                catalog=catalog,
            )
    raise AssertionError(config.store.type)  # pragma: no cover - validated on load


def global_kds_address(config: KdsConfig) -> str:
    """The URL the global's KDS server listens on (``grpcs://0.0.0.0:5685``)."""
    kds = config.multizone.global_.kds
    host = f"[{kds.address}]" if ":" in kds.address else kds.address
    return f"{'grpcs' if kds.tls_enabled else 'grpc'}://{host}:{kds.grpc_port}"


def _grpc() -> Any:
    try:
        import kds_transports.grpc as module
    except ImportError as exc:
        raise ConfigError(
            f"transport grpc cannot be imported: {exc}; install it with `pip install 'kds[grpc]'`"
        ) from exc
    return module


def grpc_server(config: KdsConfig, *, authenticate: Authenticate | None = None) -> GrpcTransport:
    """The global's gRPC transport, listening as ``multizone.global.kds`` says.

    Args:
        config: the configuration.
        authenticate: checks each zone before its session starts (see
            :data:`kds_transports.grpc.Authenticate`).

    Raises:
        ConfigError: the ``grpc`` extra is not installed, or an option is invalid.
    """
    kds = config.multizone.global_.kds
    transport: GrpcTransport = _grpc().GrpcTransport.server(
        global_kds_address(config),
        work_dir=work_dir(config),
        cert_file=kds.tls_cert_file or None,
        key_file=kds.tls_key_file or None,
        extra_names=kds.tls_extra_names,
        min_tls_version=kds.tls_min_version,
        authenticate=authenticate,
        max_frame_size=config.sync.max_frame_size,
    )
    return transport


def grpc_client(config: KdsConfig, *, credentials: str | None = None) -> GrpcTransport:
    """A zone's gRPC transport, dialling ``multizone.zone.globalAddress``.

    Args:
        config: the configuration.
        credentials: a token the zone presents to the global, if any.

    Raises:
        ConfigError: the ``grpc`` extra is not installed, or an option is invalid.
    """
    zone = config.multizone.zone
    transport: GrpcTransport = _grpc().GrpcTransport.client(
        zone.global_address,
        zone=zone.name,
        credentials=credentials,
        ca_file=zone.kds.root_ca_file or None,
        skip_verify=zone.kds.tls_skip_verify,
        server_name=zone.kds.server_name or None,
        connect_timeout=zone.kds.connect_timeout,
        max_frame_size=config.sync.max_frame_size,
    )
    return transport


def _nats() -> Any:
    try:
        import kds_transports.nats as module
    except ImportError as exc:
        raise ConfigError(
            f"transport nats cannot be imported: {exc}; install it with `pip install 'kds[nats]'`"
        ) from exc
    return module


def _nats_options(config: KdsConfig) -> dict[str, Any]:
    """``multizone.nats`` and ``sync`` as the options both sides pass to NatsTransport.

    Raises:
        ConfigError: settings that go together are not set together, exclude each
            other, or need a ``tls://`` URL; named by key and environment variable.
    """
    nats = config.multizone.nats
    checker = _Checker(config, {})

    def where(name: str) -> str:
        return checker.where(_setting_at("multizone", "nats", name))

    for first, second in (("user", "password"), ("cert_file", "key_file")):
        if bool(getattr(nats, first)) != bool(getattr(nats, second)):
            raise ConfigError(f"{where(first)} and {where(second)} must be set together")
    ways = [name for name in ("user", "token", "creds_file") if getattr(nats, name)]
    if len(ways) > 1:
        raise ConfigError(
            f"{' and '.join(where(name) for name in ways)} exclude each other: "
            "NATS authenticates a connection one way"
        )
    tls = all(part.strip().lower().startswith("tls://") for part in nats.url.split(","))
    for name in ("ca_file", "cert_file", "key_file", "server_name"):
        if getattr(nats, name) and not tls:
            raise ConfigError(f"{where(name)} needs a tls:// URL in {where('url')}")
    return {
        "prefix": nats.prefix,
        "user": nats.user or None,
        "password": nats.password or None,
        "token": nats.token or None,
        "creds_file": nats.creds_file or None,
        "ca_file": nats.ca_file or None,
        "cert_file": nats.cert_file or None,
        "key_file": nats.key_file or None,
        "server_name": nats.server_name or None,
        "max_frame_size": config.sync.max_frame_size,
    }


def _nats_transport(
    config: KdsConfig, build: Callable[..., NatsTransport], **options: Any
) -> NatsTransport:
    """*build* (a NatsTransport factory) called with the NATS settings and *options*."""
    settings = _nats_options(config)
    try:
        return build(config.multizone.nats.url, **settings, **options)
    except ConfigError as exc:
        # What is left for the transport to refuse: the URL, the prefix, a
        # missing nkeys package; its message names the option and the value.
        raise ConfigError(f"multizone.nats: {exc}") from exc


def nats_server(
    config: KdsConfig, *, authenticate: NatsAuthenticate | None = None
) -> NatsTransport:
    """The global's NATS transport: it serves zones through ``multizone.nats``.

    Args:
        config: the configuration.
        authenticate: checks each zone before its session starts (see
            :data:`kds_transports.nats.Authenticate`).

    Raises:
        ConfigError: the ``nats`` extra is not installed, or a setting is invalid.
    """
    return _nats_transport(config, _nats().NatsTransport.server, authenticate=authenticate)


def nats_client(config: KdsConfig, *, credentials: str | None = None) -> NatsTransport:
    """A zone's NATS transport: it reaches the global through ``multizone.nats``.

    Args:
        config: the configuration (``multizone.zone.name`` names the zone).
        credentials: a token the zone presents to the global, if any.

    Raises:
        ConfigError: the ``nats`` extra is not installed, ``multizone.zone.name`` is
            not set, or a setting is invalid.
    """
    name = config.multizone.zone.name
    if not name.strip():
        raise _Checker(config, {}).missing(
            _setting_at("multizone", "zone", "name"), "for a zone on NATS"
        )
    return _nats_transport(
        config, _nats().NatsTransport.client, zone=name, credentials=credentials or None
    )


def zone_token(config: KdsConfig) -> str | None:
    """The zone's ``cp`` token: ``multizone.zone.kds.cpToken``, or the file at ``cpTokenPath``.

    Returns ``None`` when neither is set (a global with ``zoneAuth: none`` needs none).

    Raises:
        ConfigError: the file cannot be read or is empty, naming the setting.
    """
    kds = config.multizone.zone.kds
    if kds.cp_token:
        return kds.cp_token.strip()
    if not kds.cp_token_path:
        return None
    setting = _setting_at("multizone", "zone", "kds", "cp_token_path")
    where = f"{setting.key} ({setting.env})"
    path = Path(kds.cp_token_path).expanduser()
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: {path} is not a text file") from exc
    if not token:
        raise ConfigError(f"{where}: {path} is empty")
    return token
