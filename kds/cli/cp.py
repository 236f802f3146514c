"""``kds-cp``: the control plane's command line.

``kds-cp migrate up`` creates or upgrades the PostgreSQL schema a store needs
(``python -m kds migrate up`` does the same). Store settings come from options or
from the environment: ``KDS_STORE_POSTGRES_*``, with the ``KUMA_STORE_POSTGRES_*``
names Kuma uses accepted as aliases. The password is read only from the
environment or a file, never from the command line (where ``ps`` would show it).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import click

from kds._registry import store_class
from kds.errors import KdsError, StoreUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

__all__ = ["main"]

_EXIT_UNAVAILABLE = 1
_EXIT_CONFIG = 2


def _env(name: str) -> list[str]:
    """Environment variables for a ``store.postgres`` setting: ours, then Kuma's."""
    return [f"KDS_STORE_POSTGRES_{name}", f"KUMA_STORE_POSTGRES_{name}"]


def _postgres_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The connection options every postgres command takes."""
    options = [
        click.option("--host", envvar=_env("HOST"), default="127.0.0.1", show_default=True),
        click.option("--port", envvar=_env("PORT"), type=int, default=5432, show_default=True),
        click.option("--user", envvar=_env("USER"), default="kds", show_default=True),
        click.option("--db-name", envvar=_env("DB_NAME"), default="kds", show_default=True),
        click.option(
            "--schema",
            envvar=_env("SCHEMA"),
            default="public",
            show_default=True,
            help="Schema holding the kds tables.",
        ),
        click.option(
            "--password-file",
            type=click.Path(exists=True, dir_okay=False),
            help="File holding the password (else KDS_STORE_POSTGRES_PASSWORD).",
        ),
        click.option(
            "--tls-mode",
            envvar=_env("TLS_MODE"),
            type=click.Choice(["disable", "verifyNone", "verifyCa", "verifyFull"]),
            default="disable",
            show_default=True,
        ),
        click.option("--ca-file", envvar=_env("TLS_CA_PATH"), help="CA certificate (PEM)."),
        click.option("--cert-file", envvar=_env("TLS_CERT_PATH"), help="Client certificate."),
        click.option("--key-file", envvar=_env("TLS_KEY_PATH"), help="Client certificate key."),
        click.option(
            "--disable-sni",
            envvar=_env("TLS_DISABLE_SSLSNI"),
            is_flag=True,
            help="Do not send the server name in the TLS handshake.",
        ),
        click.option(
            "--connect-timeout",
            envvar=_env("CONNECTION_TIMEOUT"),
            type=float,
            default=5.0,
            show_default=True,
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _postgres() -> ModuleType:
    # Through the registry: a missing extra is a ConfigError naming the pip install.
    return importlib.import_module(store_class("postgres").__module__)


def _settings(module: ModuleType, password_file: str | None, **fields: Any) -> Any:
    password = ""
    if password_file:
        with open(password_file, encoding="utf-8") as file:
            password = file.read().strip()
    else:
        for name in _env("PASSWORD"):
            if name in os.environ:
                password = os.environ[name]
                break
    return module.PostgresSettings(password=password, **fields)


def _fail(error: KdsError) -> NoReturn:
    click.echo(f"kds-cp: error: {error}", err=True)
    sys.exit(_EXIT_UNAVAILABLE if isinstance(error, StoreUnavailableError) else _EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The kds control plane."""


@main.group()
def migrate() -> None:
    """Create or upgrade the PostgreSQL schema of a store."""


@migrate.command("up")
@_postgres_options
def migrate_up(password_file: str | None, **fields: Any) -> None:
    """Apply every pending migration (idempotent; safe to run from several places at once)."""
    try:
        module = _postgres()
        settings = _settings(module, password_file, **fields)
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
def migrate_status(password_file: str | None, **fields: Any) -> None:
    """Print the schema version of the database and the one this kds needs."""
    try:
        module = _postgres()
        settings = _settings(module, password_file, **fields)
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
