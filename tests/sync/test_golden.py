"""Golden-file convergence: one global and two zones replicate to known end states.

Each directory under ``golden/`` is a case: ``<plane>.input.yaml`` is written into
each plane's store before the engines start, and ``<plane>.golden.yaml`` is what
that store must hold once replication has settled (compared on key, labels and
spec; Zone, ZoneInsight and MeshInsight are each plane's own and left out).
The golden files are the specification, so names are written in full; the checks
that run without the engines catch mistakes in them.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kds.catalog import DEFAULT_CATALOG
from kds.resource import (
    LABEL_DISPLAY_NAME,
    LABEL_K8S_NAMESPACE,
    LABEL_ORIGIN,
    LABEL_ZONE,
    ORIGIN_GLOBAL,
    ORIGIN_ZONE,
    hashed_name,
)
from kds.sync import SyncOptions
from kds.testing import MemoryStore
from kds_stores.sqlite import SQLiteStore
from tests.sync.harness import (
    IGNORED_TYPES,
    converge,
    load_resources,
    project,
    wait_until_all_equal,
)

if TYPE_CHECKING:
    from kds.store import Store, Upsert

pytestmark = pytest.mark.anyio

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(path.name for path in GOLDEN.iterdir() if path.is_dir())
ZONES = ("zone-1", "zone-2")
PLANES = ("global", *ZONES)
FILES = [(case, plane, kind) for case in CASES for plane in PLANES for kind in ("input", "golden")]

DEADLINE = 30.0  # seconds for every store of a case to reach its golden view
# Short timings keep a failed session or a slow reconnect from eating the deadline.
OPTIONS = SyncOptions(
    heartbeat_interval=0.1, heartbeat_timeout=1.0, reconnect_base=0.01, reconnect_max=0.2
)


def fixture_path(case: str, plane: str, kind: str) -> Path:
    return GOLDEN / case / f"{plane}.{kind}.yaml"


def resources(case: str, plane: str, kind: str) -> list[Upsert]:
    return load_resources(fixture_path(case, plane, kind))


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def new_store(backend: str, directory: Path, plane: str) -> Store:
    if backend == "memory":
        return MemoryStore()
    return SQLiteStore(directory / f"{plane}.db", poll_interval=0.05)


@pytest.mark.parametrize("case", CASES)
async def test_converges_to_golden(case: str, backend: str, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        stores: dict[str, Store] = {}
        for plane in PLANES:
            store = await stack.enter_async_context(new_store(backend, tmp_path, plane))
            await store.commit(resources(case, plane, "input"))
            stores[plane] = store
        async with converge(
            stores["global"], {zone: stores[zone] for zone in ZONES}, options=OPTIONS
        ):
            await wait_until_all_equal(
                stores,
                {plane: resources(case, plane, "golden") for plane in PLANES},
                deadline=DEADLINE,
            )


def test_every_case_has_every_file() -> None:
    assert CASES, f"no cases under {GOLDEN}"
    expected = {f"{plane}.{kind}.yaml" for plane in PLANES for kind in ("input", "golden")}
    for case in CASES:
        present = {path.name for path in (GOLDEN / case).iterdir()}
        assert present == expected, f"{case}: expected exactly {sorted(expected)}"


@pytest.mark.parametrize(("case", "plane", "kind"), FILES)
async def test_fixture_is_valid(case: str, plane: str, kind: str) -> None:
    upserts = resources(case, plane, kind)
    ignored = sorted(str(upsert.key) for upsert in upserts if upsert.key.type in IGNORED_TYPES)
    assert not ignored, f"never compared, so they must not be in fixtures: {ignored}"
    # Committing runs the catalog's checks: types, scopes, labels and specs.
    async with MemoryStore() as store:
        await store.commit(upserts)
        assert project(await store.list_resources()) == project(upserts)


def is_copy(plane: str, upsert: Upsert) -> bool:
    """A resource this plane got from another one, judged by its origin label."""
    origin = upsert.labels.get(LABEL_ORIGIN)
    return origin == (ORIGIN_ZONE if plane == "global" else ORIGIN_GLOBAL)


@pytest.mark.parametrize(("case", "plane"), [(case, plane) for case in CASES for plane in PLANES])
def test_copies_are_named_from_their_source(case: str, plane: str) -> None:
    inputs = {source: resources(case, source, "input") for source in PLANES}
    for copy in resources(case, plane, "golden"):
        if not is_copy(plane, copy):
            continue
        labels = copy.labels
        where = f"{case}/{plane}.golden.yaml: {copy.key}"
        if plane == "global":
            assert labels.get(LABEL_ZONE) in ZONES, f"{where}: a zone's copy names its zone"
        source_plane = labels.get(LABEL_ZONE, "global")
        if DEFAULT_CATALOG[copy.key.type].hash_names:
            assert LABEL_DISPLAY_NAME in labels, f"{where}: a hash-named copy has a display name"
            display_name = labels[LABEL_DISPLAY_NAME]
            extra = [
                labels[label] for label in (LABEL_ZONE, LABEL_K8S_NAMESPACE) if label in labels
            ]
            expected = hashed_name(copy.key.mesh or "", display_name, *extra)
            assert copy.key.name == expected, f"{where}: expected the name {expected}"
        else:
            display_name = copy.key.name
            assert LABEL_DISPLAY_NAME not in labels, f"{where}: the name is kept, not renamed"
        # The source: the resource of the same type and mesh, with that name (or
        # display name), in the plane that created it; a copy carries its spec as is.
        sources = [
            source
            for source in inputs[source_plane]
            if source.key.type == copy.key.type
            and source.key.mesh == copy.key.mesh
            and source.labels.get(LABEL_DISPLAY_NAME, source.key.name) == display_name
        ]
        assert len(sources) == 1, f"{where}: expected one source in {source_plane}.input.yaml"
        assert sources[0].spec == copy.spec, f"{where}: the spec differs from its source's"


def test_known_hashed_names_appear_in_the_fixtures() -> None:
    # The values reproduced from Kuma's own golden files: if these are in the
    # fixtures, the fixtures and Kuma agree on naming.
    names = {
        upsert.key.name
        for case, plane, kind in FILES
        if kind == "golden"
        for upsert in resources(case, plane, kind)
    }
    assert {
        "default-timeout-global-54dbd4c66zwbcf9c",
        "default-timeout-zone-1-c58w24w4vw27f454",
        "redis-zone-2-ff29vc4685c6f594",
    } <= names
