"""The stores the conformance suite runs against, as session-scoped factories.

A ``@given`` test must not take a store fixture (Hypothesis would reuse one
function-scoped value for every example), so each test takes a *factory* and
opens a new, empty store per example in its body. Factories build no loop-bound
objects (the stateful test opens stores on its own event loop). To add a backend,
add a ``_<name>_factory`` below (it may ask *request* for fixtures) and list it in
``FACTORIES`` (and in ``DURABLE`` if its data survives the process).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import attrs
import pytest

from kds.testing import StoreFactory, StoreSpec
from tests.conftest import new_kube_store_spec, new_postgres_schema

if TYPE_CHECKING:
    from kds.testing.kubeapi import KubeApiServer
    from kds_stores.postgres import PostgresSettings


def _memory_factory(request: pytest.FixtureRequest) -> StoreFactory:
    async def new_spec() -> StoreSpec:
        return StoreSpec("memory")  # every create() is a new, empty MemoryStore

    return StoreFactory("memory", new_spec, durable=False)


def _sqlite_factory(request: pytest.FixtureRequest) -> StoreFactory:
    tmp_path_factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    directory = tmp_path_factory.mktemp("sqlite")
    numbers = itertools.count()

    async def new_spec() -> StoreSpec:
        path = directory / f"store-{next(numbers)}.db"
        return StoreSpec("sqlite", {"path": str(path), "poll_interval": 0.05})

    return StoreFactory("sqlite", new_spec, durable=True)


def _postgres_factory(request: pytest.FixtureRequest) -> StoreFactory:
    # Each store gets a schema of its own in the session's one server (started only
    # when a postgres test runs): creating a schema costs milliseconds, a database
    # a good part of a second.
    base: PostgresSettings = request.getfixturevalue("postgres_server")

    async def new_spec() -> StoreSpec:
        settings = await new_postgres_schema(base)
        fields = attrs.asdict(settings)
        return StoreSpec("postgres", {"settings": fields, "poll_interval": 0.05})

    return StoreFactory("postgres", new_spec, durable=True)


def _kubernetes_factory(request: pytest.FixtureRequest) -> StoreFactory:
    # Each store gets a namespace of its own in the session's one API-server stand-in;
    # its data lives in the stand-in's process, so it survives the store's process.
    server: KubeApiServer = request.getfixturevalue("kube_api_server")

    async def new_spec() -> StoreSpec:
        return new_kube_store_spec(server)

    return StoreFactory("kubernetes", new_spec, durable=True)


FACTORIES = {
    "memory": _memory_factory,
    "sqlite": _sqlite_factory,
    "postgres": _postgres_factory,
    "kubernetes": _kubernetes_factory,
}

# Backends whose data survives the process. The crash and reopen tests are defined
# only for these: a MemoryStore cannot outlive a SIGKILL, so no memory parameter is
# generated for them (it is not skipped; the test does not apply to it).
DURABLE = ["sqlite", "postgres", "kubernetes"]


@pytest.fixture(scope="session", params=list(FACTORIES))
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    """Every store backend, each handing out new, empty, isolated stores."""
    factory: StoreFactory = FACTORIES[request.param](request)
    return factory


@pytest.fixture(scope="session", params=DURABLE)
def durable_store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    """The durable backends only: stores whose data survives a reopen and a killed process."""
    factory: StoreFactory = FACTORIES[request.param](request)
    assert factory.durable, f"{factory.name} is listed in DURABLE but is not durable"
    return factory
