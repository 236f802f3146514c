"""``kdsctl``: the operator's command line for kds control planes (like Kuma's kumactl).

kdsctl talks to a control plane's HTTP API (see docs/kdsctl.md) through
:class:`kds.client.ControlPlaneClient`. The control planes it knows, and which one is
active, live in a YAML file (``--config-file``, ``$KDSCTL_CONFIG``, else
``~/.kdsctl/config``), written with mode 0600::

    contexts:
    - name: global
      controlPlane: global
    controlPlanes:
    - name: global
      coordinates:
        apiServer:
          url: https://global.example:5682
          caCertFile: /etc/kds/ca.crt      # optional
          skipVerify: false                # optional
          authTokenFile: /etc/kds/token    # optional: sent as a bearer token
    currentContext: global

Without a file, the active control plane is ``local`` at ``http://127.0.0.1:5681``.
Every failure ends the command with one line on stderr starting ``Error:`` and exit
status 1 (2 for values ``install control-plane`` cannot use).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

import attrs
import click
import yaml

from kds._yaml import DocumentLoader, StrictLoader
from kds.client import (
    DEFAULT_ADDRESS,
    ApiError,
    ApiResourceType,
    ControlPlaneClient,
    ControlPlaneUnreachable,
    ResourceList,
    UnknownResourceTypeError,
)
from kds.errors import ConfigError, KdsError, ValidationError
from kds.k8s import DEFAULT_NAMESPACE as _K8S_NAMESPACE
from kds.resource import LABEL_ZONE

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from kds.resource import Catalog

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_FILE",
    "ControlPlaneEntry",
    "CtlConfig",
    "ago",
    "human_duration",
    "load_ctl_config",
    "main",
    "render_table",
    "save_ctl_config",
]

DEFAULT_CONFIG_FILE: Final = "~/.kdsctl/config"
"""Where kdsctl keeps its control planes unless told otherwise."""
CONFIG_ENV: Final = "KDSCTL_CONFIG"
"""The environment variable naming the configuration file."""
DEFAULT_MESH: Final = "default"
"""The mesh of a named mesh-scoped resource when ``--mesh`` is not given (as kumactl)."""

_LOCAL: Final = "local"
_PRODUCT: Final = "kds"
_TLS_HINT: Final = (
    "; trust the control plane's CA with `kdsctl config control-planes add --ca-cert-file FILE`"
    " or skip verification with --skip-verify"
)


# -- configuration file ------------------------------------------------------------------


@attrs.frozen
class ControlPlaneEntry:
    """A control plane kdsctl knows: its name and how to reach its API.

    Attributes:
        name: what ``--name`` and ``currentContext`` call it.
        url: the API's address (``http://127.0.0.1:5681``).
        ca_cert_file: PEM file of the CA that signed the control plane's certificate.
        skip_verify: accept any certificate.
        auth_token_file: file holding a token sent as ``Authorization: Bearer``.
    """

    name: str
    url: str
    ca_cert_file: str | None = None
    skip_verify: bool = False
    auth_token_file: str | None = None

    def client(self, timeout: float = 10.0) -> ControlPlaneClient:
        """A client of this control plane.

        Raises:
            ConfigError: the token or CA certificate file cannot be used, or the
                URL is not an ``http://``/``https://`` URL.
        """
        token = None
        if self.auth_token_file is not None:
            token = _read_token(self.auth_token_file)
        try:
            return ControlPlaneClient(
                self.url,
                token=token,
                ca_file=self.ca_cert_file,
                skip_verify=self.skip_verify,
                timeout=timeout,
            )
        except ValidationError as error:
            if error.field == "token":
                raise ConfigError(
                    f"auth token file {self.auth_token_file}: the token {error.reason}"
                ) from None
            raise ConfigError(f"control plane {self.name!r}: {error.reason}") from None
        except OSError as error:
            raise ConfigError(
                f"control plane {self.name!r}: CA certificate file {self.ca_cert_file}: "
                f"{error.strerror or error}"
            ) from None

    def to_yaml(self) -> dict[str, Any]:
        """The entry as the configuration file holds it."""
        server: dict[str, Any] = {"url": self.url}
        if self.ca_cert_file is not None:
            server["caCertFile"] = self.ca_cert_file
        if self.skip_verify:
            server["skipVerify"] = True
        if self.auth_token_file is not None:
            server["authTokenFile"] = self.auth_token_file
        return {"name": self.name, "coordinates": {"apiServer": server}}


@attrs.frozen
class CtlConfig:
    """kdsctl's configuration: the control planes it knows and the active one.

    Attributes:
        control_planes: the known control planes, in the order they were added.
        current: the active control plane's name, or ``None``.
    """

    control_planes: tuple[ControlPlaneEntry, ...] = ()
    current: str | None = None

    @classmethod
    def default(cls) -> CtlConfig:
        """The configuration without a file: ``local`` at ``http://127.0.0.1:5681``."""
        return cls((ControlPlaneEntry(_LOCAL, DEFAULT_ADDRESS),), _LOCAL)

    def find(self, name: str) -> ControlPlaneEntry | None:
        """The control plane called *name*, if known."""
        return next((cp for cp in self.control_planes if cp.name == name), None)

    def active(self) -> ControlPlaneEntry:
        """The active control plane.

        Raises:
            ConfigError: none is active.
        """
        entry = self.find(self.current) if self.current is not None else None
        if entry is None:
            raise ConfigError(
                "no active control plane: add one with `kdsctl config control-planes add`"
                " or choose one with `kdsctl config control-planes switch`"
            )
        return entry

    def with_control_plane(self, entry: ControlPlaneEntry) -> CtlConfig:
        """This configuration with *entry* added (or replacing its namesake) and active."""
        planes = [entry if cp.name == entry.name else cp for cp in self.control_planes]
        if self.find(entry.name) is None:
            planes.append(entry)
        return CtlConfig(tuple(planes), entry.name)

    def without(self, name: str) -> CtlConfig:
        """This configuration without the control plane *name* (none active if it was)."""
        planes = tuple(cp for cp in self.control_planes if cp.name != name)
        return CtlConfig(planes, None if self.current == name else self.current)

    def to_yaml(self) -> dict[str, Any]:
        """The configuration as the file holds it (with kumactl's one context per plane)."""
        return {
            "contexts": [{"name": cp.name, "controlPlane": cp.name} for cp in self.control_planes],
            "controlPlanes": [cp.to_yaml() for cp in self.control_planes],
            "currentContext": self.current or "",
        }


def load_ctl_config(path: Path) -> CtlConfig:
    """Read kdsctl's configuration from *path*; :meth:`CtlConfig.default` when it does not exist.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or a field is wrong
            (the message names the file and the field).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return CtlConfig.default()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"config file {path}: cannot be read: {reason}") from None
    try:
        data = yaml.load(text, Loader=DocumentLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}: invalid YAML{_yaml_problem(error)}") from None
    return _parse_config(data, f"config file {path}")


def save_ctl_config(config: CtlConfig, path: Path) -> None:
    """Write *config* to *path* atomically, readable by its owner only (0600).

    Missing directories are created with mode 0700.

    Raises:
        ConfigError: the file cannot be written.
    """
    text = yaml.safe_dump(config.to_yaml(), sort_keys=False, allow_unicode=True)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp creates the file with mode 0600; replace() swaps it in whole, so a
        # reader never sees half a file and the mode never widens.
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot be written: {error.strerror}") from None


def _parse_config(data: object, source: str) -> CtlConfig:
    if data is None:
        return CtlConfig()
    top = _mapping(data, source, "the top level", {"controlPlanes", "currentContext", "contexts"})
    planes: list[ControlPlaneEntry] = []
    for index, item in enumerate(_list(top.get("controlPlanes"), source, "controlPlanes")):
        where = f"controlPlanes[{index}]"
        entry = _mapping(item, source, where, {"name", "coordinates"})
        name = _string(entry.get("name"), source, f"{where}.name", required=True)
        assert name is not None  # noqa: S101 -- required=True never returns None
        if any(cp.name == name for cp in planes):
            raise ConfigError(f"{source}: {where}.name: {name!r} is defined twice")
        coordinates = _mapping(
            entry.get("coordinates"), source, f"{where}.coordinates", {"apiServer"}
        )
        where = f"{where}.coordinates.apiServer"
        server = _mapping(
            coordinates.get("apiServer"),
            source,
            where,
            {"url", "caCertFile", "skipVerify", "authTokenFile"},
        )
        url = _string(server.get("url"), source, f"{where}.url", required=True)
        assert url is not None  # noqa: S101 -- required=True never returns None
        skip_verify = server.get("skipVerify", False)
        if not isinstance(skip_verify, bool):
            raise ConfigError(f"{source}: {where}.skipVerify: must be true or false")
        planes.append(
            ControlPlaneEntry(
                name,
                url,
                ca_cert_file=_string(server.get("caCertFile"), source, f"{where}.caCertFile"),
                skip_verify=skip_verify,
                auth_token_file=_string(
                    server.get("authTokenFile"), source, f"{where}.authTokenFile"
                ),
            )
        )
    # kumactl's files name a context, which names a control plane; kdsctl's contexts are
    # one per control plane, so currentContext may also name the control plane itself.
    contexts: dict[str, str] = {}
    for index, item in enumerate(_list(top.get("contexts"), source, "contexts")):
        context = _mapping(item, source, f"contexts[{index}]", {"name", "controlPlane"})
        name = _string(context.get("name"), source, f"contexts[{index}].name", required=True)
        plane = _string(
            context.get("controlPlane"), source, f"contexts[{index}].controlPlane", required=True
        )
        assert name is not None  # noqa: S101 -- required=True never returns None
        assert plane is not None  # noqa: S101
        contexts[name] = plane
    current = _string(top.get("currentContext"), source, "currentContext") or None
    if current is not None:
        current = contexts.get(current, current)
        if not any(cp.name == current for cp in planes):
            raise ConfigError(f"{source}: currentContext: {current!r} names no control plane")
    return CtlConfig(tuple(planes), current)


def _mapping(value: object, source: str, where: str, keys: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where}: must be a mapping, got {type(value).__name__}")
    unknown = sorted(str(key) for key in value if key not in keys)
    if unknown:
        raise ConfigError(
            f"{source}: {where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(keys))})"
        )
    return value


def _list(value: object, source: str, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {where}: must be a list, got {type(value).__name__}")
    return value


def _string(value: object, source: str, where: str, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        got = "nothing" if value is None else type(value).__name__
        raise ConfigError(f"{source}: {where}: must be a non-empty string, got {got}")
    return value


def _read_token(file_name: str) -> str:
    try:
        token = Path(file_name).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"auth token file {file_name}: cannot be read: {reason}") from None
    if not token:
        raise ConfigError(f"auth token file {file_name}: is empty")
    return token


# -- YAML --------------------------------------------------------------------------------


def _yaml_problem(error: yaml.YAMLError) -> str:
    # Not str(error): it quotes the offending lines, which may hold secrets.
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{place}: {error.problem or error.context or 'invalid YAML'}"
    return f": {type(error).__name__}"


def _dump_yaml(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


# -- output ------------------------------------------------------------------------------


def human_duration(delta: timedelta) -> str:
    """*delta* as kumactl shows it: ``3s``, ``2m``, ``1h``, ``5d``, ``2y``.

    Whole units, rounded down. A moment slightly in the future (less than two seconds:
    clock skew) is ``0s``; further in the future, ``never``, as kumactl prints it.

    >>> human_duration(timedelta(minutes=2, seconds=59))
    '2m'
    """
    seconds = int(delta.total_seconds())  # truncates toward zero, as Go's int() does
    if seconds < -1:
        return "never"
    if seconds < 0:
        return "0s"
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    hours = seconds // 3600
    if hours < 24:
        return f"{hours}h"
    if hours < 24 * 365:
        return f"{hours // 24}d"
    return f"{hours // (24 * 365)}y"


def ago(moment: datetime | str | None, now: datetime) -> str:
    """How long before *now* *moment* was (:func:`human_duration`); ``never`` without one.

    *moment* may be an ISO 8601 text, as the API sends times; a naive time or text
    is taken as UTC, and text that is not a time counts as no time.
    """
    if isinstance(moment, str):
        moment = _parse_time(moment)
    if moment is None:
        return "never"
    return human_duration(now - moment)


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table as kumactl prints it: columns three spaces apart, headers first.

    Every column but the last is padded to its widest cell; lines carry no
    trailing spaces.
    """
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    text = []
    for line in lines:
        cells = [cell.ljust(widths[i] + 3) for i, cell in enumerate(line[:-1])]
        text.append(("".join(cells) + line[-1]).rstrip())
    return "\n".join(text) + "\n"


def _echo_data(data: object, output: str) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        click.echo(_dump_yaml(data), nl=False)


def _text(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


# -- the command line --------------------------------------------------------------------


@attrs.define
class _State:
    """What every command shares: the configuration file and the API timeout."""

    config_path: Path
    timeout: float
    _config: CtlConfig | None = None

    def config(self) -> CtlConfig:
        if self._config is None:
            self._config = load_ctl_config(self.config_path)
        return self._config

    def save(self, config: CtlConfig) -> None:
        save_ctl_config(config, self.config_path)
        self._config = config

    def client(self) -> ControlPlaneClient:
        client = self.config().active().client(self.timeout)
        click.get_current_context().call_on_close(client.close)
        return client


class _Group(click.Group):
    """Turns kds errors into click's ``Error: ...`` line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ControlPlaneUnreachable as error:
            hint = _TLS_HINT if error.tls_verification_failed else ""
            raise click.ClickException(f"{error}{hint}") from None
        except KdsError as error:
            raise click.ClickException(str(error)) from None


_OUTPUT = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "yaml", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config-file",
    envvar=CONFIG_ENV,
    metavar="FILE",
    help=f"kdsctl's configuration file [${CONFIG_ENV}, else {DEFAULT_CONFIG_FILE}].",
)
@click.option(
    "--api-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the control plane's API.",
)
@click.pass_context
def main(ctx: click.Context, config_file: str | None, api_timeout: float) -> None:
    """Manage kds control planes: their resources, zones and zone proxies."""
    path = Path(os.path.expanduser(config_file or DEFAULT_CONFIG_FILE))
    ctx.obj = _State(path, api_timeout)


def _state() -> _State:
    state = click.get_current_context().find_object(_State)
    assert state is not None  # noqa: S101 -- main() always sets it
    return state


# -- config ------------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Show and change kdsctl's configuration."""


@config_group.command("view")
def config_view() -> None:
    """Print the configuration (the default one when there is no file)."""
    click.echo(_dump_yaml(_state().config().to_yaml()), nl=False)


@config_group.group("control-planes")
def control_planes() -> None:
    """Add, list, switch and remove control planes."""


@control_planes.command("add")
@click.option("--name", required=True, help="What to call the control plane.")
@click.option("--address", required=True, help="Its API's URL, e.g. https://host:5682.")
@click.option("--skip-verify", is_flag=True, help="Accept any TLS certificate (unsafe).")
@click.option(
    "--ca-cert-file",
    type=click.Path(exists=True, dir_okay=False, resolve_path=True),
    help="CA certificate (PEM) that signed the control plane's certificate.",
)
@click.option(
    "--auth-token-file",
    type=click.Path(exists=True, dir_okay=False, resolve_path=True),
    help="File holding the token sent with every request (the admin token for writes).",
)
@click.option("--overwrite", is_flag=True, help="Replace a control plane of the same name.")
def control_planes_add(
    name: str,
    address: str,
    skip_verify: bool,
    ca_cert_file: str | None,
    auth_token_file: str | None,
    overwrite: bool,
) -> None:
    """Add a control plane and make it the active one.

    The control plane must answer first: kdsctl checks that ADDRESS is a kds API.
    """
    if not name or not name.isprintable() or " " in name:
        raise click.BadParameter("must be a non-empty name without spaces", param_hint="--name")
    if skip_verify and ca_cert_file is not None:
        raise click.UsageError("give --ca-cert-file or --skip-verify, not both")
    state = _state()
    config = state.config()
    if config.find(name) is not None and not overwrite:
        raise click.ClickException(
            f"a control plane named {name!r} already exists: "
            "use --overwrite to replace it, or choose another --name"
        )
    entry = ControlPlaneEntry(
        name,
        address.rstrip("/"),
        ca_cert_file=ca_cert_file,
        skip_verify=skip_verify,
        auth_token_file=auth_token_file,
    )
    with entry.client(state.timeout) as client:
        try:
            index = client.index()
        except ApiError as error:
            raise click.ClickException(
                f"{address} answered, but it is not a kds control plane (GET /: {error})"
            ) from None
    if index.get("product") != _PRODUCT:
        raise click.ClickException(
            f"{address} answered, but it is not a kds control plane "
            f"(GET / says product {index.get('product')!r})"
        )
    state.save(config.with_control_plane(entry))
    click.echo(f'added Control Plane "{name}"')
    click.echo(f'switched active Control Plane to "{name}"')


@control_planes.command("list")
def control_planes_list() -> None:
    """List the control planes; * marks the active one."""
    config = _state().config()
    rows = [
        ["*" if cp.name == config.current else "", cp.name, cp.url] for cp in config.control_planes
    ]
    click.echo(render_table(["ACTIVE", "NAME", "ADDRESS"], rows), nl=False)


@control_planes.command("switch")
@click.option("--name", required=True, help="The control plane to make active.")
def control_planes_switch(name: str) -> None:
    """Make another known control plane the active one."""
    state = _state()
    config = state.config()
    _known(config, name)
    state.save(attrs.evolve(config, current=name))
    click.echo(f'switched active Control Plane to "{name}"')


@control_planes.command("remove")
@click.option("--name", required=True, help="The control plane to forget.")
def control_planes_remove(name: str) -> None:
    """Forget a control plane (none is active afterwards if it was the active one)."""
    state = _state()
    config = state.config()
    _known(config, name)
    state.save(config.without(name))
    click.echo(f'removed Control Plane "{name}"')
    if config.current == name:
        click.echo(
            "no control plane is active now: choose one with `kdsctl config control-planes switch`"
        )


def _known(config: CtlConfig, name: str) -> None:
    if config.find(name) is None:
        known = ", ".join(repr(cp.name) for cp in config.control_planes) or "none"
        raise click.ClickException(f"there is no control plane named {name!r} (known: {known})")


# -- get ---------------------------------------------------------------------------------


@main.command("get")
@click.argument("type_word", metavar="TYPE")
@click.argument("name", required=False)
@click.option("-m", "--mesh", help="Mesh of a mesh-scoped type (lists: all meshes without it).")
@_OUTPUT
@click.option("--size", type=click.IntRange(1, 1000), help="Read one page of this many.")
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Skip this many first.")
def get(
    type_word: str, name: str | None, mesh: str | None, output: str, size: int | None, offset: int
) -> None:
    """Show resources of a TYPE, or the one called NAME.

    TYPE is a type's URL path (meshes, zones, meshtimeouts, dataplanes, ...), its
    singular (meshtimeout) or its name (MeshTimeout), as the control plane lists
    them in GET /_resources.

    A named mesh-scoped resource is looked for in the "default" mesh unless
    --mesh says otherwise.
    """
    client = _state().client()
    resource_type = client.resource_type(type_word)
    now = datetime.now(UTC)
    if name is not None:
        if resource_type.mesh_scoped and mesh is None:
            mesh = DEFAULT_MESH
        document = _get_one(client, resource_type, name, mesh)
        if output != "table":
            _echo_data(document, output)
            return
        click.echo(_resource_table(resource_type, [document], now), nl=False)
        return
    listed = client.list(resource_type.path, mesh, size=size, offset=offset)
    if output != "table":
        _echo_data(listed.to_json(), output)
        return
    click.echo(_resource_table(resource_type, listed.items, now), nl=False)
    if listed.next is not None:
        following = offset + len(listed.items)
        click.echo(
            f"\nRest of the resources: kdsctl get {type_word} --offset {following} --size {size}"
        )


def _get_one(
    client: ControlPlaneClient, resource_type: ApiResourceType, name: str, mesh: str | None
) -> dict[str, Any]:
    try:
        return client.get(resource_type.path, name, mesh)
    except ApiError as error:
        if error.status == 404:
            raise click.ClickException(_not_found(resource_type, name, mesh)) from None
        raise


def _not_found(resource_type: ApiResourceType, name: str, mesh: str | None) -> str:
    where = f' in mesh "{mesh}"' if mesh is not None else ""
    return f'{resource_type.name} "{name}" not found{where}'


def _resource_table(
    resource_type: ApiResourceType, items: Sequence[Mapping[str, Any]], now: datetime
) -> str:
    if resource_type.mesh_scoped:
        rows = [
            [_text(item.get("mesh")), _text(item.get("name")), ago(item.get("creationTime"), now)]
            for item in items
        ]
        return render_table(["MESH", "NAME", "AGE"], rows)
    rows = [[_text(item.get("name")), ago(item.get("creationTime"), now)] for item in items]
    return render_table(["NAME", "AGE"], rows)


# -- inspect -----------------------------------------------------------------------------


@main.group("inspect")
def inspect() -> None:
    """Show zones, zone proxies and services with their state."""


_ZONE_HEADERS: Final = [
    "NAME",
    "STATUS",
    "LAST CONNECTED AGO",
    "LAST UPDATED AGO",
    "TOTAL UPDATES",
    "TOTAL ERRORS",
    "ZONE-CP VERSION",
    "BACKEND",
]
_PROXY_HEADERS: Final = [
    "NAME",
    "ZONE",
    "STATUS",
    "LAST CONNECTED AGO",
    "LAST UPDATED AGO",
    "TOTAL UPDATES",
    "TOTAL ERRORS",
]


@inspect.command("zones")
@_OUTPUT
def inspect_zones(output: str) -> None:
    """Show every zone: Online/Offline, its last session, its counters.

    A zone is Online while a session of it is open (and recently seen) and it is
    enabled: a disabled zone shows Offline, as in kumactl. TOTAL UPDATES and TOTAL
    ERRORS add up the responses sent and rejected over every session kept.
    """
    overviews = _state().client().zone_overviews()
    if output != "table":
        _echo_data(overviews.to_json(), output)
        return
    now = datetime.now(UTC)
    click.echo(
        render_table(_ZONE_HEADERS, (_zone_row(item, now) for item in overviews.items)), nl=False
    )


def _zone_row(item: Mapping[str, Any], now: datetime) -> list[str]:
    zone = item.get("zone")
    insight = item.get("zoneInsight")
    enabled = not (isinstance(zone, dict) and zone.get("enabled") is False)
    subscriptions = _subscriptions(insight)
    last = subscriptions[-1] if subscriptions else {}
    sent, rejected = _totals(subscriptions)
    return [
        _text(item.get("name")),
        "Online" if item.get("online") is True and enabled else "Offline",
        ago(last.get("connectTime"), now),
        ago(last.get("lastSeen"), now),
        str(sent),
        str(rejected),
        _text(_version(last.get("version"))),
        _text(last.get("backend")),
    ]


@inspect.command("zoneingresses")
@_OUTPUT
def inspect_zone_ingresses(output: str) -> None:
    """Show every zone ingress: its zone, Online/Offline, its last session and counters."""
    _inspect_proxies(_state().client().zone_ingress_overviews(), "zoneIngress", output)


@inspect.command("zoneegresses")
@_OUTPUT
def inspect_zone_egresses(output: str) -> None:
    """Show every zone egress: its zone, Online/Offline, its last session and counters."""
    _inspect_proxies(_state().client().zone_egress_overviews(), "zoneEgress", output)


def _inspect_proxies(overviews: ResourceList, kind: str, output: str) -> None:
    if output != "table":
        _echo_data(overviews.to_json(), output)
        return
    now = datetime.now(UTC)
    rows = (_proxy_row(item, kind, now) for item in overviews.items)
    click.echo(render_table(_PROXY_HEADERS, rows), nl=False)


def _proxy_row(item: Mapping[str, Any], kind: str, now: datetime) -> list[str]:
    proxy = item.get(kind)
    proxy = proxy if isinstance(proxy, dict) else {}
    labels = proxy.get("labels") or item.get("labels") or {}
    zone = labels.get(LABEL_ZONE) if isinstance(labels, dict) else None
    subscriptions = _subscriptions(item.get(f"{kind}Insight"))
    last = subscriptions[-1] if subscriptions else {}
    status = last.get("status")
    updated = last.get("lastSeen") or (
        status.get("lastUpdateTime") if isinstance(status, dict) else None
    )
    sent, rejected = _totals(subscriptions)
    return [
        _text(item.get("name")),
        _text(zone or proxy.get("zone")),
        "Online" if item.get("online") is True else "Offline",
        ago(last.get("connectTime"), now),
        ago(updated, now),
        str(sent),
        str(rejected),
    ]


def _subscriptions(insight: object) -> list[dict[str, Any]]:
    subscriptions = insight.get("subscriptions") if isinstance(insight, dict) else None
    if not isinstance(subscriptions, list):
        return []
    return [s for s in subscriptions if isinstance(s, dict)]


def _totals(subscriptions: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    sent = rejected = 0
    for subscription in subscriptions:
        status = subscription.get("status")
        total = status.get("total") if isinstance(status, dict) else None
        if isinstance(total, dict):
            sent += _count(total.get("responsesSent"))
            rejected += _count(total.get("responsesRejected"))
    return sent, rejected


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _version(version: object) -> object:
    # kds stores the zone's version as text; Kuma's subscriptions nest it.
    if isinstance(version, dict):
        kuma_cp = version.get("kumaCp")
        return kuma_cp.get("version") if isinstance(kuma_cp, dict) else None
    return version


# -- inspect services --------------------------------------------------------------------

_SERVICE_STATUS: Final = {
    "online": "Online",
    "offline": "Offline",
    "partially_degraded": "Partially degraded",
    "not_available": "Not available",
}


@inspect.command("services")
@click.option(
    "-m", "--mesh", default="default", show_default=True, help="The mesh whose services to show."
)
@click.option("-A", "--all-meshes", is_flag=True, help="Every mesh's services, with a MESH column.")
@_OUTPUT
def inspect_services(mesh: str, all_meshes: bool, output: str) -> None:
    """Show each service's status and how many of its dataplanes are online.

    Like kumactl, the mesh is ``default`` unless -m names another; -A shows them all.

    STATUS is Online (every dataplane online), Offline (none), Partially degraded
    (some) or Not available (an external service); DATAPLANES is ONLINE/TOTAL. Read
    from the mesh's all-services-<mesh> ServiceInsight, which the global keeps up
    to date and sends to every zone. A mesh whose dataplanes run in several zones
    while its mTLS is disabled gets a warning on stderr: traffic between zones
    needs mTLS.
    """
    # Imported here: only this command needs the insight rules.
    from kds.insights import mtls_enabled, service_zones

    client = _state().client()
    mesh_or_all = None if all_meshes else mesh
    listed = client.service_insights(mesh_or_all).items
    insights = sorted(listed, key=lambda item: str(item.get("mesh")))
    meshes = {item.get("name"): item for item in client.list("meshes").items}
    if mesh_or_all is not None and not insights and mesh_or_all not in meshes:
        raise click.ClickException(f'Mesh "{mesh_or_all}" not found')
    if output != "table":
        _echo_data(ResourceList(len(insights), insights).to_json(), output)
    else:
        rows = [
            [_text(insight.get("mesh")), *row] if all_meshes else row
            for insight in insights
            for row in _service_rows(insight)
        ]
        headers = ["SERVICE", "STATUS", "DATAPLANES"]
        click.echo(render_table(["MESH", *headers] if all_meshes else headers, rows), nl=False)
    for insight in insights:
        name = insight.get("mesh")
        zones = service_zones(insight)
        if len(zones) >= 2 and not mtls_enabled(meshes.get(name)):
            click.echo(
                f'WARNING: mesh "{name}" has dataplanes in zones {", ".join(zones)} but mTLS '
                "is disabled; cross-zone traffic needs mTLS",
                err=True,
            )


def _service_rows(insight: Mapping[str, Any]) -> list[list[str]]:
    services = insight.get("services")
    if not isinstance(services, dict):
        return []
    rows = []
    for name, service in sorted(services.items()):
        service = service if isinstance(service, dict) else {}
        status = service.get("status")
        dataplanes = service.get("dataplanes")
        dataplanes = dataplanes if isinstance(dataplanes, dict) else {}
        rows.append(
            [
                str(name),
                _SERVICE_STATUS.get(str(status), _text(status)),
                f"{_count(dataplanes.get('online'))}/{_count(dataplanes.get('total'))}",
            ]
        )
    return rows


# -- apply -------------------------------------------------------------------------------


@attrs.frozen
class _Planned:
    """A validated document of an apply and where it goes."""

    number: int
    document: dict[str, Any]
    resource_type: ApiResourceType
    url: str

    @property
    def label(self) -> str:
        name, mesh = self.document["name"], self.document.get("mesh")
        where = f' in mesh "{mesh}"' if mesh is not None else ""
        return f'{self.resource_type.name} "{name}"{where}'


class _FileProblem(click.ClickException):
    def __init__(self, source: str, number: int, problem: str) -> None:
        super().__init__(f"{source}: document {number}: {problem}")


@main.command("apply")
@click.option(
    "-f",
    "--file",
    "file_name",
    required=True,
    metavar="FILE",
    help="YAML file of resources, documents separated by ---; - reads stdin.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be sent; change nothing.")
def apply(file_name: str, dry_run: bool) -> None:
    """Create or update the resources a YAML file describes.

    Each document is a resource as the API shows it (type, name, mesh for
    mesh-scoped types, labels, and its spec). Every document is checked before
    any is sent: when one is invalid, nothing is applied.
    """
    # Imported here: kds.api brings the server (aiohttp), which only apply needs.
    from kds.api.representation import from_json

    source = "<stdin>" if file_name == "-" else file_name
    text = _read_source(file_name)
    documents = _read_documents(text, source)
    client = _state().client()
    catalog = client.catalog()
    planned = [_plan(client, catalog, from_json, source, number, doc) for number, doc in documents]
    if not planned:
        raise click.ClickException(f"{source}: holds no resources")
    if dry_run:
        for index, item in enumerate(planned):
            if index:
                click.echo("---")
            click.echo(f"# PUT {item.url}")
            click.echo(_dump_yaml(item.document), nl=False)
        return
    for item in planned:
        try:
            result = client.put(item.document)
        except ApiError as error:
            raise click.ClickException(
                f"{source}: document {item.number} ({item.label}): {error}"
            ) from None
        click.echo(f"{'created' if result.created else 'updated'} {item.label}")
        for warning in result.warnings:
            click.echo(f"Warning: {item.label}: {warning}", err=True)


def _read_source(file_name: str) -> str:
    if file_name == "-":
        return sys.stdin.read()
    try:
        return Path(file_name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise click.ClickException(f"{file_name}: cannot be read: {reason}") from None


def _read_documents(text: str, source: str) -> list[tuple[int, Any]]:
    """Every non-empty document of *text*, numbered from 1 as they appear."""
    documents: list[tuple[int, Any]] = []
    number = 1
    try:
        for document in yaml.load_all(text, Loader=DocumentLoader):
            if document is not None:  # an empty document (a stray ---) holds nothing
                documents.append((number, document))
            number += 1
    except yaml.YAMLError as error:
        raise _FileProblem(source, number, f"invalid YAML{_yaml_problem(error)}") from None
    return documents


def _plan(
    client: ControlPlaneClient,
    catalog: Catalog,
    read: Callable[[object, Catalog], object],
    source: str,
    number: int,
    document: object,
) -> _Planned:
    def problem(text: str) -> NoReturn:
        raise _FileProblem(source, number, text)

    if not isinstance(document, dict):
        problem(f"must be a mapping of resource fields, got {type(document).__name__}")
    type_name = document.get("type")
    if type_name is None:
        problem('missing "type"')
    if not isinstance(type_name, str):
        problem(f'"type" must be a type name, got {type(type_name).__name__}')
    try:
        resource_type = client.resource_type(type_name)
    except UnknownResourceTypeError as error:
        problem(str(error))
    if resource_type.name != type_name:
        problem(f"unknown resource type {type_name!r}: did you mean {resource_type.name!r}?")
    name = document.get("name")
    if name is None:
        problem('missing "name"')
    if not isinstance(name, str) or not name:
        problem(f'"name" must be a non-empty string, got {name!r}')
    if resource_type.mesh_scoped and document.get("mesh") is None:
        problem(f'missing "mesh" ({resource_type.name} is mesh-scoped)')
    if resource_type.read_only:
        problem(
            f"{resource_type.name} cannot be applied: the control plane at {client.address} "
            "does not accept writes of it (read-only there)"
        )
    try:
        read(document, catalog)
        url = resource_type.url(document["name"], document.get("mesh"))
    except ValidationError as error:
        problem(str(error))
    return _Planned(number, document, resource_type, url)


# -- delete ------------------------------------------------------------------------------


@main.command("delete")
@click.argument("type_word", metavar="TYPE")
@click.argument("name")
@click.option("-m", "--mesh", help=f"Mesh of a mesh-scoped type [{DEFAULT_MESH}].")
def delete(type_word: str, name: str, mesh: str | None) -> None:
    """Delete the resource of TYPE called NAME.

    TYPE is named as for 'kdsctl get'; a mesh-scoped resource is looked for in the
    "default" mesh unless --mesh says otherwise.
    """
    client = _state().client()
    resource_type = client.resource_type(type_word)
    if resource_type.mesh_scoped and mesh is None:
        mesh = DEFAULT_MESH
    try:
        client.delete(resource_type.path, name, mesh)
    except ApiError as error:
        if error.status == 404:
            raise click.ClickException(_not_found(resource_type, name, mesh)) from None
        raise
    where = f' in mesh "{mesh}"' if mesh is not None else ""
    click.echo(f'deleted {resource_type.name} "{name}"{where}')


# -- tokens ------------------------------------------------------------------------------

_VALID_FOR = click.option(
    "--valid-for",
    metavar="DURATION",
    help="How long the token is valid: 720h, 30m, 1h30m, 7d (at most 10 years) [720h].",
)


def _check_valid_for(valid_for: str | None) -> str | None:
    """Refuse a bad --valid-for before asking the control plane."""
    if valid_for is None:
        return None
    # Imported here: only the token commands need kds.tokens (and its crypto libraries).
    from kds.tokens import check_validity, parse_duration

    try:
        check_validity(parse_duration(valid_for))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--valid-for'") from None
    return valid_for.strip()


@main.group("generate")
def generate() -> None:
    """Issue zone and dataplane tokens (on the global control plane)."""


@generate.command("zone-token")
@click.option("--zone", required=True, help="The zone the token is for.")
@click.option(
    "--scope",
    "scopes",
    required=True,
    multiple=True,
    type=click.Choice(["cp", "ingress", "egress"]),
    help="What it allows (repeat for more): cp lets the zone control plane connect to "
    "the global; ingress and egress let zone proxies register with the zone.",
)
@_VALID_FOR
def generate_zone_token(zone: str, scopes: tuple[str, ...], valid_for: str | None) -> None:
    """Print a new zone token for the zone --zone names, signed by the global.

    Give a zone control plane a token with scope cp (in the file
    multizone.zone.kds.cpTokenPath names), and its zone ingress and egress proxies
    one with scope ingress or egress (kds-dp --dataplane-token-file). For example,
    'kdsctl generate zone-token --zone zone-1 --scope cp > token' stores the token.
    """
    checked = _check_valid_for(valid_for)
    token = _state().client().generate_zone_token(zone, scopes, valid_for=checked)
    click.echo(token)


@generate.command("dataplane-token")
@click.option("-m", "--mesh", required=True, help="The mesh whose Dataplanes it may register.")
@click.option("--name", help="The only Dataplane it may register (any in the mesh without).")
@_VALID_FOR
def generate_dataplane_token(mesh: str, name: str | None, valid_for: str | None) -> None:
    """Print a new dataplane token, signed by the global, for kds-dp --proxy-type=dataplane."""
    checked = _check_valid_for(valid_for)
    token = _state().client().generate_dataplane_token(mesh, name, valid_for=checked)
    click.echo(token)


@main.group("rotate")
def rotate() -> None:
    """Rotate the global's zone token signing key."""


@rotate.command("zone-token-signing-key")
def rotate_zone_token_signing_key() -> None:
    """Create a new signing key: it signs every token issued from now on.

    Tokens signed with older keys stay valid until those keys are removed with
    'kdsctl remove zone-token-signing-key --serial N'.
    """
    serial = _state().client().rotate_signing_key()
    click.echo(f"created zone token signing key {serial}: it signs every token issued from now on")


@main.group("remove")
def remove() -> None:
    """Remove a zone token signing key from the global."""


@remove.command("zone-token-signing-key")
@click.option("--serial", required=True, type=click.IntRange(min=1), help="The key's serial.")
def remove_zone_token_signing_key(serial: int) -> None:
    """Remove signing key SERIAL: every token it signed stops being valid, on every zone."""
    _state().client().remove_signing_key(serial)
    click.echo(f"removed zone token signing key {serial}: the tokens it signed are no longer valid")


@main.group("revoke")
def revoke() -> None:
    """Revoke zone and dataplane tokens: the global and every zone refuse them."""


def _revoke(kind: str, ids: tuple[str, ...], token_files: tuple[str, ...]) -> None:
    from kds.tokens import TokenError, token_id

    every = list(ids)
    for file_name in token_files:
        text = _read_source(file_name)
        try:
            every.append(token_id(text, kind=kind))
        except TokenError as error:
            raise click.ClickException(f"{file_name}: {error}") from None
    if not every:
        raise click.UsageError("name the tokens to revoke with --id or --token-file")
    unique = list(dict.fromkeys(every))
    _state().client().revoke_tokens(unique)
    click.echo(f"revoked {len(unique)} {kind} token(s): {', '.join(unique)}")


_TOKEN_IDS = click.option(
    "--id",
    "ids",
    multiple=True,
    metavar="ID",
    help="A token's id (its jti claim); repeat for more.",
)
_TOKEN_FILES = click.option(
    "--token-file",
    "token_files",
    multiple=True,
    metavar="FILE",
    help="A file holding the token to revoke (its id is read from it); repeat for more.",
)


@revoke.command("zone-token")
@_TOKEN_IDS
@_TOKEN_FILES
def revoke_zone_token(ids: tuple[str, ...], token_files: tuple[str, ...]) -> None:
    """Revoke zone tokens: zones and proxies presenting them are refused from now on."""
    _revoke("zone", ids, token_files)


@revoke.command("dataplane-token")
@_TOKEN_IDS
@_TOKEN_FILES
def revoke_dataplane_token(ids: tuple[str, ...], token_files: tuple[str, ...]) -> None:
    """Revoke dataplane tokens: proxies presenting them are refused from now on."""
    _revoke("dataplane", ids, token_files)


# -- install -----------------------------------------------------------------------------


class _BadValues(click.ClickException):
    """Install values that cannot work: one ``Error:`` line and exit status 2, as bad usage."""

    exit_code = 2


@main.group("install")
def install() -> None:
    """Print Kubernetes manifests that deploy kds (for kubectl apply -f -)."""


@install.command("control-plane")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a value, as Helm's --set does (repeat, or KEY=VALUE,KEY=VALUE); wins over --values.",
)
@click.option(
    "--values",
    "values_files",
    multiple=True,
    metavar="FILE",
    help="YAML file of values, nested as the keys' dots say (repeat: later files win).",
)
@click.option(
    "--namespace",
    default=_K8S_NAMESPACE,
    show_default=True,
    help="The namespace every object goes in.",
)
def install_control_plane(
    sets: tuple[str, ...], values_files: tuple[str, ...], namespace: str
) -> None:
    """Print the manifests of a global or zone control plane, as kumactl does.

    \b
    kdsctl install control-plane --set controlPlane.mode=global | kubectl apply -f -
    kdsctl install control-plane --set controlPlane.zone=zone-1
        --set controlPlane.kdsGlobalAddress=grpcs://GLOBAL:5685
        --set controlPlane.tls.kdsZoneClient.skipVerify=true
        --set ingress.enabled=true | kubectl apply -f -

    Keys: controlPlane.mode (global|zone, default zone), controlPlane.zone,
    controlPlane.kdsGlobalAddress, controlPlane.tls.kdsZoneClient.skipVerify,
    controlPlane.tls.dpServer.secret and .caKey, controlPlane.environment
    (kubernetes|universal), controlPlane.secrets, controlPlane.image,
    controlPlane.replicas, controlPlane.logLevel, postgres.port, postgres.tls.*,
    ingress.enabled, ingress.advertisedAddress, ingress.advertisedPort,
    egress.enabled (docs/kubernetes.md describes each). A zone needs the Secret
    kds-zone-token (key token) holding its cp zone token. Bad values print one
    Error line naming the key and exit with status 2, printing nothing else.
    """  # noqa: D301 -- "\b" is click's mark for a paragraph printed as written
    # Imported here: only this command builds manifests (and certificates).
    from kds import install as installer

    documents = [_read_values(file_name) for file_name in values_files]
    try:
        values = installer.load_values(documents, sets)
        manifests = installer.render_manifests(values, namespace=namespace)
    except installer.InstallError as error:
        raise _BadValues(str(error)) from None
    click.echo(installer.dump_manifests(manifests), nl=False)


def _read_values(file_name: str) -> dict[str, Any]:
    """A --values file: a YAML mapping (an empty file is no values)."""
    source = f"--values {file_name}"
    try:
        text = Path(file_name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise _BadValues(f"{source}: cannot be read: {reason}") from None
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as error:
        raise _BadValues(f"{source}: invalid YAML{_yaml_problem(error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _BadValues(f"{source}: must be a mapping of keys, got {type(data).__name__}")
    return data
