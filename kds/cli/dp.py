"""``kds-dp``: register a zone proxy with its zone control plane and keep it alive.

``kds-dp run`` reads a ZoneIngress, ZoneEgress or Dataplane from a YAML (or JSON)
file, registers it with the zone control plane's dataplane server
(:class:`kds.dpserver.DataplaneServer`) and heartbeats it until SIGTERM or SIGINT,
when it says goodbye (the proxy shows offline at once) and exits 0. It runs no
Envoy: only the registration (see ``docs/kds-dp.md``).

Exit statuses: 0 after a signal; 1 when the control plane refuses the proxy (its
token or its resource) or cannot be trusted (its certificate); 2 for bad options or
files. While the control plane cannot be reached it retries with exponential
backoff, logging each attempt. Errors are one line on stderr starting
``kds-dp: error:``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

import anyio
import click

import kds
from kds.cli._signals import run_until_signal
from kds.dp import (
    DEFAULT_PORT,
    PROXY_KINDS,
    ControlPlaneUntrusted,
    DataplaneClient,
    DataplaneError,
    ProxyAgent,
    ProxyFileError,
    load_proxy_file,
)
from kds.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from kds.dp import ProxyType

__all__ = ["main"]

logger = logging.getLogger("kds.dp.cli")

_EXIT_REFUSED: Final = 1
_EXIT_USAGE: Final = 2
_CA_HINT: Final = (
    "; pass the certificate of the CA that signed it with --ca-cert-file (a zone control "
    "plane's generated certificate is <workDir>/kds-cp.crt on its host)"
)


def _fail(message: str, status: int) -> NoReturn:
    click.echo(f"kds-dp: error: {' '.join(message.split())}", err=True)
    sys.exit(status)


@click.group()
@click.version_option(kds.__version__, prog_name="kds-dp")
def main() -> None:
    """Register zone proxies (ingress, egress, dataplane) with a zone control plane."""


@main.command("run")
@click.option(
    "--proxy-type",
    type=click.Choice(list(PROXY_KINDS)),
    required=True,
    envvar="KUMA_DATAPLANE_PROXY_TYPE",
    show_envvar=True,
    help="What the file describes: a ZoneIngress, a ZoneEgress or a Dataplane.",
)
@click.option(
    "--cp-address",
    required=True,
    metavar="URL",
    envvar="KUMA_CONTROL_PLANE_URL",
    show_envvar=True,
    help=f"The zone control plane's dataplane server, https://HOST:{DEFAULT_PORT}.",
)
@click.option(
    "--dataplane-file",
    required=True,
    metavar="FILE",
    help="YAML or JSON file holding the proxy resource.",
)
@click.option(
    "--dataplane-token-file",
    metavar="FILE",
    envvar="KUMA_DATAPLANE_RUNTIME_TOKEN_PATH",
    show_envvar=True,
    help="File holding the token: a zone token with scope ingress or egress, or a "
    "dataplane token for a Dataplane's mesh.",
)
@click.option(
    "--dataplane-token",
    metavar="TOKEN",
    help="The token itself (visible to other users in the process list: prefer the file).",
)
@click.option(
    "--ca-cert-file",
    metavar="FILE",
    envvar="KUMA_CONTROL_PLANE_CA_CERT_FILE",
    show_envvar=True,
    help="PEM certificate of the CA to trust for the control plane (its generated "
    "certificate is its own CA: <workDir>/kds-cp.crt).",
)
@click.option(
    "--name",
    envvar="KUMA_DATAPLANE_NAME",
    show_envvar=True,
    help="The proxy's name, when the file has none (must match when it has one).",
)
@click.option(
    "--mesh",
    envvar="KUMA_DATAPLANE_MESH",
    show_envvar=True,
    help="A Dataplane's mesh, when the file has none (must match when it has one).",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Seconds between heartbeats [default: what the control plane asks for].",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="The least severe messages logged (to stderr).",
)
def run(
    proxy_type: ProxyType,
    cp_address: str,
    dataplane_file: str,
    dataplane_token_file: str | None,
    dataplane_token: str | None,
    ca_cert_file: str | None,
    name: str | None,
    mesh: str | None,
    heartbeat_interval: float | None,
    log_level: str,
) -> None:
    """Register a proxy and heartbeat it until SIGTERM or SIGINT (then say goodbye)."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if log_level != "debug":
        # httpx logs every request at INFO: a heartbeat every few seconds drowns the log.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    token = _token(dataplane_token_file, dataplane_token)
    try:
        document = load_proxy_file(dataplane_file, proxy_type, mesh=mesh, name=name)
    except ProxyFileError as exc:
        _fail(f"--dataplane-file {exc}", _EXIT_USAGE)
    try:
        client = DataplaneClient(cp_address, ca_file=ca_cert_file)
    except ValidationError as exc:
        _fail(f"--cp-address: {exc.reason}", _EXIT_USAGE)
    except ConfigError as exc:
        _fail(f"--ca-cert-file: {exc}", _EXIT_USAGE)
    agent = ProxyAgent(
        client,
        proxy_type=proxy_type,
        document=document,
        token=token,
        heartbeat_interval=heartbeat_interval,
    )
    try:
        anyio.run(_run_until_signal, agent, backend="asyncio")
    except ControlPlaneUntrusted as exc:
        _fail(f"{exc}{_CA_HINT}", _EXIT_REFUSED)
    except DataplaneError as exc:
        _fail(str(exc), _EXIT_REFUSED)


def _token(path: str | None, inline: str | None) -> str:
    if path is not None and inline is not None:
        _fail(
            "--dataplane-token-file and --dataplane-token cannot be combined: give one", _EXIT_USAGE
        )
    if inline is not None:
        token = inline.strip()
        if not token:
            _fail("--dataplane-token is empty", _EXIT_USAGE)
        return token
    if path is None:
        _fail(
            "a token is required: --dataplane-token-file FILE (generate it on the global "
            "with `kdsctl generate zone-token` or `kdsctl generate dataplane-token`)",
            _EXIT_USAGE,
        )
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        _fail(f"--dataplane-token-file {path}: cannot read it: {exc.strerror or exc}", _EXIT_USAGE)
    except UnicodeDecodeError:
        _fail(f"--dataplane-token-file {path}: is not a text file", _EXIT_USAGE)
    if not token:
        _fail(f"--dataplane-token-file {path}: is empty", _EXIT_USAGE)
    if any(c.isspace() for c in token):
        _fail(f"--dataplane-token-file {path}: holds more than one token", _EXIT_USAGE)
    return token


async def _run_until_signal(agent: ProxyAgent) -> None:
    """Run *agent* until a signal (then it says goodbye) or until it is refused."""
    async with agent.client:
        await run_until_signal(agent.run, logger)
    logger.info("stopped")
