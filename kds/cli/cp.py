"""``kds-cp``: the control plane's command line.

Every command that needs configuration takes ``--config FILE`` and reads the
environment through :func:`kds.config.load_config` (see ``docs/config.md``):
``KDS_*`` variables, with the ``KUMA_*`` names Kuma uses accepted as aliases. A
configuration error ends the command with exit status 2 and one line on stderr.

``kds-cp run`` starts a global or zone control plane (:class:`kds.daemon.ControlPlane`)
and runs it until SIGTERM or SIGINT, which end it gracefully: zones are told Goodbye
and the store is closed. A second signal during that shutdown exits at once.

``kds-cp config print`` shows the effective configuration (secrets masked);
``kds-cp config docs`` writes ``docs/config.md``. ``kds-cp migrate up`` creates or
upgrades the PostgreSQL schema a store needs (``python -m kds migrate up`` does the
same); its options override the ``store.postgres`` settings. The password is read
only from the configuration, the environment or a file, never from the command line
(where ``ps`` would show it).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import click

from kds.cli._signals import run_until_signal
from kds.config import KdsConfig, load_config, postgres_settings, render_docs, render_yaml
from kds.errors import ConfigError, KdsError, StoreUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import ModuleType

    from kds_stores.postgres import PostgresSettings

__all__ = ["config_option", "load_cli_config", "main"]

_EXIT_UNAVAILABLE = 1
_EXIT_CONFIG = 2

logger = logging.getLogger("kds.cp")


def _fail(error: KdsError) -> NoReturn:
    click.echo(f"kds-cp: error: {error}", err=True)
    sys.exit(_EXIT_UNAVAILABLE if isinstance(error, StoreUnavailableError) else _EXIT_CONFIG)


def config_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config``/``-c`` (Kuma's ``--config-file`` too) as the ``config_file`` argument.

    Pass the argument to :func:`load_cli_config`.
    """
    return click.option(
        "-c",
        "--config",
        "--config-file",
        "config_file",
        metavar="FILE",
        help="YAML configuration file (docs/config.md); KDS_*/KUMA_* variables override it.",
    )(command)


def load_cli_config(
    config_file: str | None, *, overrides: Mapping[str, object] | None = None
) -> KdsConfig:
    """The configuration from *config_file* and ``os.environ``; exits 2 when it is invalid.

    Args:
        config_file: the ``--config`` argument (see :func:`config_option`).
        overrides: the command's own options, by dotted file key; they win over the
            file and the environment (see :func:`kds.config.load_config`).

    A :class:`~kds.errors.ConfigError` is written to stderr as one line, without a
    traceback, and ends the program with exit status 2.
    """
    try:
        return load_config(os.environ, config_file, overrides=overrides)
    except ConfigError as error:
        _fail(error)


_POSTGRES_OPTIONS = {
    # option name -> the store.postgres setting it overrides
    "host": "store.postgres.host",
    "port": "store.postgres.port",
    "user": "store.postgres.user",
    "db_name": "store.postgres.dbName",
    "schema": "store.postgres.schema",
    "tls_mode": "store.postgres.tls.mode",
    "ca_file": "store.postgres.tls.caPath",
    "cert_file": "store.postgres.tls.certPath",
    "key_file": "store.postgres.tls.keyPath",
    "disable_sni": "store.postgres.tls.disableSSLSNI",
    "connect_timeout": "store.postgres.connectionTimeout",
}


def _postgres_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The connection options every postgres command takes; each overrides the config."""
    options = [
        config_option,
        click.option("--host", help="Server host (store.postgres.host); no default."),
        click.option("--port", type=int, help="Server port (store.postgres.port) [5432]."),
        click.option("--user", help="Role (store.postgres.user) [kds]."),
        click.option("--db-name", help="Database (store.postgres.dbName) [kds]."),
        click.option("--schema", help="Schema holding the kds tables [public]."),
        click.option(
            "--password-file",
            type=click.Path(exists=True, dir_okay=False),
            help="File holding the password (else store.postgres.password).",
        ),
        click.option(
            "--tls-mode",
            type=click.Choice(["disable", "verifyNone", "verifyCa", "verifyFull"]),
            help="store.postgres.tls.mode [disable].",
        ),
        click.option("--ca-file", help="CA certificate (PEM)."),
        click.option("--cert-file", help="Client certificate."),
        click.option("--key-file", help="Client certificate key."),
        click.option(
            "--disable-sni",
            is_flag=True,
            default=None,
            help="Do not send the server name in the TLS handshake.",
        ),
        click.option("--connect-timeout", type=float, help="Seconds [5]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _postgres_settings(
    config_file: str | None, password_file: str | None, options: dict[str, Any]
) -> PostgresSettings:
    """``store.postgres`` from the configuration, overridden by the command's options."""
    overrides = {
        key: options[name] for name, key in _POSTGRES_OPTIONS.items() if options[name] is not None
    }
    if password_file:
        with open(password_file, encoding="utf-8") as file:
            overrides["store.postgres.password"] = file.read().strip()
    return postgres_settings(load_cli_config(config_file, overrides=overrides))


def _postgres() -> ModuleType:
    # Through the registry: a missing extra is a ConfigError naming the pip install.
    from kds._registry import store_class

    return importlib.import_module(store_class("postgres").__module__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The kds control plane."""


@main.group("config")
def config_group() -> None:
    """Show the configuration and its reference."""


@config_group.command("print")
@config_option
def config_print(config_file: str | None) -> None:
    """Print the effective configuration as YAML, secrets masked.

    The configuration is the defaults, then the --config file, then the environment:
    what ``kds-cp run`` would use.
    """
    click.echo(render_yaml(load_cli_config(config_file)), nl=False)


@config_group.command("docs")
def config_docs() -> None:
    """Print the configuration reference (docs/config.md).

    Every key with its default, its environment variables and what it does.
    """
    click.echo(render_docs(), nl=False)


@main.group()
def migrate() -> None:
    """Create or upgrade the PostgreSQL schema of a store."""


@migrate.command("up")
@_postgres_options
def migrate_up(config_file: str | None, password_file: str | None, **options: Any) -> None:
    """Apply every pending migration (idempotent; safe to run from several places at once)."""
    try:
        module = _postgres()
        settings = _postgres_settings(config_file, password_file, options)
        applied = anyio.run(module.migrate_up, settings, backend="asyncio")
    except KdsError as error:
        _fail(error)
    if not applied:
        click.echo(f"{settings.address}: schema is up to date (version {module.SCHEMA_VERSION})")
        return
    for migration in applied:
        click.echo(f"{settings.address}: applied {migration.version} ({migration.description})")


@migrate.command("status")
@_postgres_options
def migrate_status(config_file: str | None, password_file: str | None, **options: Any) -> None:
    """Print the schema version of the database and the one this kds needs."""
    try:
        module = _postgres()
        settings = _postgres_settings(config_file, password_file, options)
        version = anyio.run(module.schema_version, settings, backend="asyncio")
    except KdsError as error:
        _fail(error)
    click.echo(f"{settings.address}: schema version {version}, kds needs {module.SCHEMA_VERSION}")
    if version < module.SCHEMA_VERSION:
        click.echo("run `kds-cp migrate up` to upgrade it")
        sys.exit(_EXIT_CONFIG)
    if version > module.SCHEMA_VERSION:
        click.echo("the schema is newer than this kds: upgrade kds")
        sys.exit(_EXIT_CONFIG)


class _JsonFormatter(logging.Formatter):
    """One JSON object a line, for log collectors (``log.format: json``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _configure_logging(config: KdsConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log.level.upper(), handlers=[handler], force=True)


async def _run_until_signal(config: KdsConfig) -> None:
    from kds.daemon import ControlPlane

    await run_until_signal(ControlPlane(config).run, logger)
    logger.info("stopped")


def _first_kds_error(error: BaseException) -> KdsError | None:
    """The first :class:`KdsError` in *error*, looking inside exception groups."""
    if isinstance(error, KdsError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_kds_error(inner)
            if found is not None:
                return found
    return None


@main.command("run")
@config_option
def run(config_file: str | None) -> None:
    """Run a global or zone control plane until SIGTERM or SIGINT.

    With no configuration at all this is a global keeping its resources in a SQLite
    file in ~/.kds, serving zones on grpcs://0.0.0.0:5685 and its API on
    http://127.0.0.1:5681. A zone needs KDS_MULTIZONE_ZONE_NAME and
    KDS_MULTIZONE_ZONE_GLOBAL_ADDRESS (or Kuma's KUMA_* names); see docs/config.md.
    """
    config = load_cli_config(config_file)
    _configure_logging(config)
    try:
        anyio.run(_run_until_signal, config, backend="asyncio")
    except (KdsError, BaseExceptionGroup) as error:
        found = _first_kds_error(error)
        if found is None:
            raise
        _fail(found)
