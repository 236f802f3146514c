"""The control plane's HTTP API, served for real on 127.0.0.1 over a SQLite store.

Each test starts an :class:`ApiServer` on a free port and talks to it with httpx:
resource CRUD in both representations, lists and their pages, every kind of bad
input (each a 4xx naming the field, none changing the store), the write rules of a
global and of a zone, zone overviews and status, the admin token, the OpenAPI
document and the GUI.
"""

from __future__ import annotations

import functools
import json
import logging
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.to_thread
import attrs
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi
from openapi_spec_validator.validation import OpenAPIV31SpecValidator

from kds import (
    DEFAULT_CATALOG,
    Cursor,
    ResourceKey,
    ResourceType,
    Scope,
    Store,
    SyncFlag,
    Upsert,
)
from kds.api import ApiServer, is_loopback, type_path
from kds.api.server import (
    GLOBAL_READ_ONLY_MESSAGE,
    MAX_BODY_SIZE,
    ZONE_CONNECTED_MESSAGE,
    ZONE_READ_ONLY_MESSAGE,
)
from kds.sync import tracking_origin
from kds_stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path

pytestmark = pytest.mark.anyio

TIMEOUT = 30  # seconds; a deadline for each request, never a pause
LIVENESS = 3600.0  # seconds: "fresh" and "old" sightings are hours apart, whatever the load
TOKEN = "admin-s3cret"  # noqa: S105 -- the test server's admin token


def _broken_validator(spec: Mapping[str, Any]) -> None:
    raise RuntimeError("internal detail that must not leak")


HOUR = timedelta(hours=1)

CATALOG = DEFAULT_CATALOG.with_types(
    # A custom global-scoped type with its spec under "spec" (none of Kuma's is).
    ResourceType(name="AuditPolicy", scope=Scope.GLOBAL, flags=SyncFlag.GLOBAL_TO_ZONES),
    # A type whose validator fails unexpectedly: the server must answer a bare 500.
    ResourceType(
        name="Fragile",
        scope=Scope.GLOBAL,
        flags=SyncFlag.PROVIDED_BY_GLOBAL,
        validator=_broken_validator,
    ),
)


@attrs.frozen
class Plane:
    """A served API: its client, its store and the server."""

    client: httpx.AsyncClient
    store: Store
    server: ApiServer
    url: str


@asynccontextmanager
async def serving(tmp_path: Path, **options: Any) -> AsyncIterator[Plane]:
    options.setdefault("mode", "global")
    options.setdefault("liveness", LIVENESS)
    await anyio.Path(tmp_path).mkdir(parents=True, exist_ok=True)
    async with (
        SQLiteStore(tmp_path / "kds.db", catalog=CATALOG, synchronous="normal") as store,
        anyio.create_task_group() as group,
    ):
        server = ApiServer(store, **options)
        url = await group.start(server.serve, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            yield Plane(client, store, server, url)
        group.cancel_scope.cancel()


def check_error(response: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["type"] == "/std-errors"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    if field is not None:
        assert [p["field"] for p in body["invalid_parameters"]] == [field], body
    return body


async def put(plane: Plane, path: str, document: Any, **kwargs: Any) -> httpx.Response:
    return await plane.client.put(path, json=document, **kwargs)


def now_text(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).isoformat()


# -- serving ---------------------------------------------------------------------------------


async def test_serve_reports_the_bound_url_logs_it_and_stops_cleanly(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kds.api")
    async with serving(tmp_path) as plane:
        assert plane.url.startswith("http://127.0.0.1:")
        assert not plane.url.endswith(":0")
        assert (await plane.client.get("/")).status_code == 200
    assert f"HTTP API listening on {plane.url}" in caplog.text
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=plane.url) as client:
            await client.get("/")


async def test_an_address_in_use_is_named(tmp_path):
    async with serving(tmp_path) as plane:
        port = int(plane.url.rsplit(":", 1)[1])
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await plane.server.serve("127.0.0.1", port)


async def test_index_and_resource_types(tmp_path):
    async with serving(tmp_path, instance_id="cp-1") as plane:
        index = (await plane.client.get("/")).json()
        assert index == {
            "product": "kds",
            "version": index["version"],
            "instanceId": "cp-1",
            "mode": "global",
            "zone": None,
            "clusterId": plane.store.epoch,
        }
        types = {t["name"]: t for t in (await plane.client.get("/_resources")).json()["resources"]}
        assert set(types) == set(CATALOG.names())
        assert types["MeshTimeout"] == {
            "name": "MeshTimeout",
            "path": "meshtimeouts",
            "scope": "Mesh",
            "readOnly": False,
            "flatSpec": False,
        }
        assert types["Mesh"]["flatSpec"] is True
        assert types["Mesh"]["scope"] == "Global"
        assert types["Dataplane"]["readOnly"] is True
        assert types["ZoneInsight"]["readOnly"] is True
        assert types["AuditPolicy"]["path"] == "auditpolicys"


async def test_a_zone_index_names_its_zone_and_what_it_may_write(tmp_path):
    async with serving(tmp_path, mode="zone", zone="zone-1") as plane:
        index = (await plane.client.get("/")).json()
        assert (index["mode"], index["zone"]) == ("zone", "zone-1")
        types = {t["name"]: t for t in (await plane.client.get("/_resources")).json()["resources"]}
        assert types["Dataplane"]["readOnly"] is False
        assert types["Mesh"]["readOnly"] is True
        assert types["ZoneInsight"]["readOnly"] is True


# -- CRUD ------------------------------------------------------------------------------------

CRUD_CASES = [
    # (type, collection path, item path, document, changed document)
    pytest.param(
        "Mesh",
        "/meshes",
        "/meshes/demo",
        {"type": "Mesh", "name": "demo", "mtls": {"enabledBackend": "ca-1"}},
        {"type": "Mesh", "name": "demo", "labels": {"team": "core"}, "routing": {}},
        id="global-scoped-flat",
    ),
    pytest.param(
        "AuditPolicy",
        "/auditpolicys",
        "/auditpolicys/audit",
        {"type": "AuditPolicy", "name": "audit", "spec": {"level": "full"}},
        {"type": "AuditPolicy", "name": "audit", "spec": {"level": "none"}},
        id="global-scoped-spec",
    ),
    pytest.param(
        "MeshGateway",
        "/meshes/default/meshgateways",
        "/meshes/default/meshgateways/edge",
        {"type": "MeshGateway", "mesh": "default", "name": "edge", "selectors": [{"a": 1}]},
        {"type": "MeshGateway", "name": "edge", "selectors": []},
        id="mesh-scoped-flat",
    ),
    pytest.param(
        "MeshTimeout",
        "/meshes/default/meshtimeouts",
        "/meshes/default/meshtimeouts/t1",
        {
            "type": "MeshTimeout",
            "mesh": "default",
            "name": "t1",
            "spec": {"targetRef": {"kind": "Mesh"}, "to": []},
        },
        {
            "type": "MeshTimeout",
            "name": "t1",
            "labels": {"env": "prod"},
            "spec": {"targetRef": {"kind": "MeshService", "name": "web"}},
        },
        id="mesh-scoped-spec",
    ),
]


@pytest.mark.parametrize(("type_name", "collection", "item", "document", "changed"), CRUD_CASES)
async def test_crud(tmp_path, type_name, collection, item, document, changed):
    async with serving(tmp_path) as plane:
        created = await put(plane, item, document)
        assert (created.status_code, created.json()) == (201, {"warnings": []})

        shown = (await plane.client.get(item)).json()
        expected = dict(document)
        expected["labels"] = {"kuma.io/origin": "global"}  # both types go down to zones
        assert {k: v for k, v in shown.items() if not k.endswith("Time")} == expected
        datetime.fromisoformat(shown["creationTime"])
        assert shown["creationTime"] == shown["modificationTime"]

        updated = await put(plane, item, changed)
        assert (updated.status_code, updated.json()) == (200, {"warnings": []})
        shown = (await plane.client.get(item)).json()
        assert shown["labels"] == {**changed.get("labels", {}), "kuma.io/origin": "global"}
        for field, value in changed.items():
            if field not in ("labels", "mesh"):
                assert shown[field] == value
        listed = (await plane.client.get(collection)).json()
        assert listed["total"] == 1
        assert listed["items"] == [shown]
        assert listed["next"] is None

        key = ResourceKey(type_name, shown.get("mesh"), shown["name"])
        assert (await plane.store.get(key)).version == 2

        deleted = await plane.client.delete(item)
        assert (deleted.status_code, deleted.json()) == (200, {})
        check_error(await plane.client.get(item), 404)
        assert check_error(await plane.client.delete(item), 404)["title"] == "Not found"
        assert await plane.store.find(key) is None


async def test_mesh_scoped_lists_per_mesh_and_across_meshes(tmp_path):
    async with serving(tmp_path) as plane:
        for mesh, name in [("default", "a"), ("demo", "b"), ("default", "c")]:
            document = {"type": "MeshTimeout", "name": name, "spec": {}}
            response = await put(plane, f"/meshes/{mesh}/meshtimeouts/{name}", document)
            assert response.status_code == 201
        everywhere = (await plane.client.get("/meshtimeouts")).json()
        assert [(i["mesh"], i["name"]) for i in everywhere["items"]] == [
            ("default", "a"),
            ("default", "c"),
            ("demo", "b"),
        ]
        in_demo = (await plane.client.get("/meshes/demo/meshtimeouts")).json()
        assert [i["name"] for i in in_demo["items"]] == ["b"]
        empty = (await plane.client.get("/meshes/nowhere/meshtimeouts")).json()
        assert empty == {"total": 0, "items": [], "next": None}


async def test_list_pages_follow_next_to_the_end(tmp_path):
    async with serving(tmp_path) as plane:
        names = [f"t{i}" for i in range(7)]
        await plane.store.commit(
            [Upsert(key=ResourceKey("MeshTimeout", "default", n), spec={}) for n in names]
        )
        seen: list[str] = []
        url: str | None = "/meshes/default/meshtimeouts?size=3"
        pages = 0
        while url is not None:
            page = (await plane.client.get(url)).json()
            assert page["total"] == 7
            assert len(page["items"]) <= 3
            seen += [item["name"] for item in page["items"]]
            url = page["next"]
            pages += 1
        assert (seen, pages) == (names, 3)
        last = (await plane.client.get("/meshtimeouts", params={"size": 5, "offset": 5})).json()
        assert ([i["name"] for i in last["items"]], last["next"]) == (["t5", "t6"], None)
        beyond = (await plane.client.get("/meshtimeouts", params={"offset": 100})).json()
        assert (beyond["total"], beyond["items"], beyond["next"]) == (7, [], None)
        default = (await plane.client.get("/meshtimeouts")).json()
        assert len(default["items"]) == 7


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("size=0", "size"),
        ("size=1001", "size"),
        ("size=ten", "size"),
        ("size=-1", "size"),
        ("size=%2B5", "size"),
        ("size=1&size=2", "size"),
        ("size=99999999999999999999", "size"),
        ("offset=-1", "offset"),
        ("offset=1.5", "offset"),
        ("limit=5", "limit"),
    ],
)
async def test_bad_list_queries_name_the_parameter(tmp_path, query, field):
    async with serving(tmp_path) as plane:
        for path in (
            "/meshes",
            "/meshtimeouts",
            "/meshes/default/meshtimeouts",
            "/zones/_overview",
        ):
            check_error(await plane.client.get(f"{path}?{query}"), 400, field)


# -- bad input -------------------------------------------------------------------------------

TIMEOUT_PATH = "/meshes/default/meshtimeouts/t1"
GOOD_TIMEOUT = {"type": "MeshTimeout", "name": "t1", "spec": {"targetRef": {"kind": "Mesh"}}}


def body(**changes: Any) -> bytes:
    document = {**GOOD_TIMEOUT, **changes}
    return json.dumps({k: v for k, v in document.items() if v is not None}).encode()


def nested(depth: int) -> bytes:
    return (
        b'{"type": "MeshTimeout", "name": "t1", "spec": {"x": '
        + b"[" * depth
        + b"]" * depth
        + b"}}"
    )


BAD_PUTS = [
    # (path, raw body, status, field)
    pytest.param(TIMEOUT_PATH, b'{"type": "MeshTimeout",', 400, "body", id="invalid-json"),
    pytest.param(TIMEOUT_PATH, b"", 400, "body", id="empty"),
    pytest.param(TIMEOUT_PATH, b"[1, 2]", 400, "body", id="a-list"),
    pytest.param(TIMEOUT_PATH, b'"MeshTimeout"', 400, "body", id="a-string"),
    pytest.param(TIMEOUT_PATH, b"null", 400, "body", id="null"),
    pytest.param(TIMEOUT_PATH, b'{"name": "t\xff1"}', 400, "body", id="not-utf8"),
    pytest.param(TIMEOUT_PATH, b'{"name": "t1", "name": "t2"}', 400, "body", id="duplicate-key"),
    pytest.param(TIMEOUT_PATH, body(spec={"x": 1}).replace(b"1}", b"NaN}"), 400, "body", id="nan"),
    pytest.param(
        TIMEOUT_PATH, body(spec={"x": 1}).replace(b"1}", b"1e999}"), 400, "body", id="inf"
    ),
    pytest.param(TIMEOUT_PATH, nested(200_000), 400, "body", id="nested-past-the-parser"),
    pytest.param(TIMEOUT_PATH, nested(150), 400, "spec.x" + "[0]" * 99, id="nested-deep"),
    pytest.param(TIMEOUT_PATH, body(type=None), 400, "type", id="no-type"),
    pytest.param(TIMEOUT_PATH, body(type=["MeshTimeout"]), 400, "type", id="type-not-string"),
    pytest.param(TIMEOUT_PATH, body(type="MeshRetry"), 400, "type", id="type-of-another-path"),
    pytest.param(TIMEOUT_PATH, body(name=None), 400, "name", id="no-name"),
    pytest.param(TIMEOUT_PATH, body(name="t2"), 400, "name", id="name-not-the-paths"),
    pytest.param(TIMEOUT_PATH, body(name=5), 400, "name", id="name-not-string"),
    pytest.param("/meshes/default/meshtimeouts/t%201", body(), 400, "name", id="name-in-path"),
    pytest.param("/meshes/a%09b/meshtimeouts/t1", body(), 400, "mesh", id="mesh-in-path"),
    pytest.param(TIMEOUT_PATH, body(mesh="demo"), 400, "mesh", id="mesh-not-the-paths"),
    pytest.param(TIMEOUT_PATH, body(mesh=3), 400, "mesh", id="mesh-not-string"),
    pytest.param(TIMEOUT_PATH, body(labels=["a"]), 400, "labels", id="labels-not-object"),
    pytest.param(TIMEOUT_PATH, body(labels={"team": 1}), 400, 'labels["team"]', id="label-int"),
    pytest.param(TIMEOUT_PATH, body(spec=[]), 400, "spec", id="spec-not-object"),
    pytest.param(TIMEOUT_PATH, body(spec={"to": {}}), 400, "spec.to", id="spec-refused"),
    pytest.param(TIMEOUT_PATH, body(spec={"x": 2**64}), 400, "spec.x", id="int-too-large"),
    pytest.param(TIMEOUT_PATH, body(targetRef={}), 400, "targetRef", id="field-beside-spec"),
    pytest.param(
        "/meshes/demo",
        json.dumps({"type": "Mesh", "name": "demo", "spec": {}}).encode(),
        400,
        "spec",
        id="spec-of-a-flat-type",
    ),
    pytest.param(
        "/meshes/demo",
        json.dumps({"type": "Mesh", "name": "demo", "mtls": "on"}).encode(),
        400,
        "spec.mtls",
        id="flat-spec-refused",
    ),
    pytest.param(
        TIMEOUT_PATH,
        b'{"type": "MeshTimeout", "name": "t1", "spec": {"x": "' + b"a" * MAX_BODY_SIZE + b'"}}',
        413,
        "body",
        id="too-large",
    ),
    pytest.param("/meshes/default/widgets/w", body(), 404, None, id="unknown-type-path"),
    pytest.param("/widgets/w", body(), 404, None, id="unknown-global-path"),
]


@pytest.mark.parametrize(("path", "raw", "status", "field"), BAD_PUTS)
async def test_bad_puts_are_refused_naming_the_field_and_change_nothing(
    tmp_path, path, raw, status, field
):
    async with serving(tmp_path) as plane:
        # Something stored already, so that an update that goes wrong would show too.
        stored = await put(plane, TIMEOUT_PATH, GOOD_TIMEOUT)
        assert stored.status_code == 201
        head = await plane.store.head()
        response = await plane.client.put(
            path, content=raw, headers={"Content-Type": "application/json"}
        )
        check_error(response, status, field)
        assert await plane.store.head() == head
        assert (await plane.client.get(TIMEOUT_PATH)).json()["spec"] == GOOD_TIMEOUT["spec"]


async def test_unknown_endpoints_and_methods(tmp_path):
    async with serving(tmp_path) as plane:
        check_error(await plane.client.get("/no/such/thing"), 404)
        check_error(await plane.client.get("/widgets"), 404)
        not_allowed = check_error(await plane.client.post("/meshes", json={}), 405)
        assert "allowed: GET" in not_allowed["detail"]
        check_error(await plane.client.get("/meshes/a%20b"), 400, "name")


async def test_an_unexpected_failure_is_a_bare_500_and_logged(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="kds.api")
    async with serving(tmp_path) as plane:
        head = await plane.store.head()
        document = {"type": "Fragile", "name": "f", "spec": {}}
        error = check_error(await put(plane, "/fragiles/f", document), 500)
        assert "internal detail" not in json.dumps(error)
        assert "RuntimeError" not in json.dumps(error)
        error_id = error["detail"].rsplit(" ", 1)[1]
        assert await plane.store.head() == head
    assert error_id in caplog.text
    assert "internal detail that must not leak" in caplog.text  # the traceback is logged


async def test_a_closed_store_is_a_503(tmp_path):
    async with serving(tmp_path) as plane:
        await plane.store.aclose()
        check_error(await plane.client.get("/meshes"), 503)
        check_error(await put(plane, "/meshes/x", {"type": "Mesh", "name": "x"}), 503)


# -- write rules -----------------------------------------------------------------------------


async def test_global_refuses_types_only_zones_provide_with_kumas_text(tmp_path):
    async with serving(tmp_path) as plane:
        head = await plane.store.head()
        document = {"type": "Dataplane", "name": "dp", "networking": {}}
        for response in (
            await put(plane, "/meshes/default/dataplanes/dp", document),
            await plane.client.delete("/meshes/default/dataplanes/dp"),
            await put(plane, "/zoneingresses/zi", {"type": "ZoneIngress", "name": "zi"}),
        ):
            assert check_error(response, 405)["detail"] == GLOBAL_READ_ONLY_MESSAGE
        insight = await put(plane, "/zone-insights/z", {"type": "ZoneInsight", "name": "z"})
        assert "read-only" in check_error(insight, 405)["detail"]
        assert await plane.store.head() == head


async def test_global_origin_rules(tmp_path):
    async with serving(tmp_path) as plane:
        origin_field = 'labels["kuma.io/origin"]'
        zone_labelled = {**GOOD_TIMEOUT, "labels": {"kuma.io/origin": "zone"}}
        error = check_error(await put(plane, TIMEOUT_PATH, zone_labelled), 400, origin_field)
        assert (
            error["invalid_parameters"][0]["reason"] == "the origin label must be set to 'global'"
        )

        # What a zone published is not the global's to change or delete.
        published = ResourceKey("MeshTimeout", "default", "from-zone")
        await plane.store.commit(
            [
                Upsert(
                    key=published,
                    labels={"kuma.io/origin": "zone", "kuma.io/zone": "zone-1"},
                    spec={},
                )
            ]
        )
        head = await plane.store.head()
        path = "/meshes/default/meshtimeouts/from-zone"
        document = {"type": "MeshTimeout", "name": "from-zone", "spec": {}}
        for response in (await put(plane, path, document), await plane.client.delete(path)):
            error = check_error(response, 400, origin_field)
            assert "the origin label must be set to 'global'" in error["detail"]
        assert await plane.store.head() == head

        # The global labels what it sends down, and only that.
        explicit = {**GOOD_TIMEOUT, "labels": {"kuma.io/origin": "global", "team": "a"}}
        assert (await put(plane, TIMEOUT_PATH, explicit)).status_code == 201
        stored = await plane.store.get(ResourceKey("MeshTimeout", "default", "t1"))
        assert stored.labels == {"kuma.io/origin": "global", "team": "a"}
        assert (await put(plane, "/zones/z", {"type": "Zone", "name": "z"})).status_code == 201
        assert (await plane.store.get(ResourceKey("Zone", None, "z"))).labels == {}


async def test_zone_write_rules(tmp_path):
    async with serving(tmp_path, mode="zone", zone="zone-1") as plane:
        origin_field = 'labels["kuma.io/origin"]'
        head = await plane.store.head()
        mesh = await put(plane, "/meshes/default", {"type": "Mesh", "name": "default"})
        assert check_error(mesh, 405)["detail"] == ZONE_READ_ONLY_MESSAGE
        assert await plane.store.head() == head

        dataplane = {"type": "Dataplane", "name": "dp-1", "networking": {"address": "10.0.0.1"}}
        created = await put(plane, "/meshes/default/dataplanes/dp-1", dataplane)
        assert created.status_code == 201
        stored = await plane.store.get(ResourceKey("Dataplane", "default", "dp-1"))
        assert stored.labels == {"kuma.io/origin": "zone", "kuma.io/zone": "zone-1"}
        assert stored.spec == {"networking": {"address": "10.0.0.1"}}

        head = await plane.store.head()
        global_labelled = {**dataplane, "labels": {"kuma.io/origin": "global"}}
        error = check_error(
            await put(plane, "/meshes/default/dataplanes/dp-1", global_labelled), 400, origin_field
        )
        assert error["invalid_parameters"][0]["reason"] == "the origin label must be set to 'zone'"
        other_zone = {**dataplane, "labels": {"kuma.io/zone": "zone-2"}}
        error = check_error(
            await put(plane, "/meshes/default/dataplanes/dp-1", other_zone),
            400,
            'labels["kuma.io/zone"]',
        )
        assert (
            error["invalid_parameters"][0]["reason"]
            == "kuma.io/zone label should have zone-1 value"
        )

        # Copies from the global are not the zone's to change or delete.
        await plane.store.commit(
            [
                Upsert(
                    key=ResourceKey("MeshTimeout", "default", "from-global"),
                    labels={"kuma.io/origin": "global"},
                    spec={},
                )
            ]
        )
        head = await plane.store.head()
        path = "/meshes/default/meshtimeouts/from-global"
        document = {"type": "MeshTimeout", "name": "from-global", "spec": {}}
        for response in (await put(plane, path, document), await plane.client.delete(path)):
            error = check_error(response, 400, origin_field)
            assert "the origin label must be set to 'zone'" in error["detail"]
        assert await plane.store.head() == head

        # The zone's own policy: labelled as the zone's.
        own = await put(plane, TIMEOUT_PATH, GOOD_TIMEOUT)
        assert own.status_code == 201
        assert (await plane.client.get(TIMEOUT_PATH)).json()["labels"] == {
            "kuma.io/origin": "zone",
            "kuma.io/zone": "zone-1",
        }
        assert (await plane.client.delete(TIMEOUT_PATH)).status_code == 200


# -- the admin token -------------------------------------------------------------------------


def test_loopback_addresses():
    assert is_loopback("127.0.0.1")
    assert is_loopback("127.0.0.2")
    assert is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1")
    assert not is_loopback("::ffff:10.0.0.1")
    assert not is_loopback("fe80::1%eth0")
    assert not is_loopback("")
    assert not is_loopback(None)
    assert not is_loopback("localhost")


def remote(host: str | None) -> bool:
    """The server's view of a client: none is local (as if they came over the network)."""
    return False


async def test_writes_from_other_hosts_need_the_admin_token(tmp_path):
    peers: list[str | None] = []

    def recorded_remote(host: str | None) -> bool:
        peers.append(host)
        return False

    async with serving(tmp_path, admin_token=TOKEN, is_local=recorded_remote) as plane:
        document = {"type": "Mesh", "name": "m"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            check_error(await put(plane, "/meshes/m", document, headers=headers), 403)
            check_error(await plane.client.delete("/meshes/m", headers=headers), 403)
        assert await plane.store.head() == 0
        authorized = {"Authorization": f"Bearer {TOKEN}"}
        assert (await put(plane, "/meshes/m", document, headers=authorized)).status_code == 201
        assert (await plane.client.get("/meshes/m")).status_code == 200  # reads are open
        assert (await plane.client.delete("/meshes/m", headers=authorized)).status_code == 200
    assert set(peers) == {"127.0.0.1"}  # the predicate judged the real peer, on writes only
    assert len(peers) == 8


async def test_secrets_are_read_like_they_are_written_and_signing_keys_never(tmp_path):
    from kds.tokens import issue_zone_token

    async with serving(tmp_path, admin_token=TOKEN, is_local=remote) as plane:
        await issue_zone_token(plane.store, zone="zone-1", scopes={"cp"}, valid_for=HOUR)
        stored = {r.key.name for r in await plane.store.list_resources("GlobalSecret")}
        assert "zone-token-signing-key-1" in stored
        for path in ("/global-secrets", "/global-secrets/zone-token-signing-public-key-1"):
            check_error(await plane.client.get(path), 403)
        authorized = {"Authorization": f"Bearer {TOKEN}"}
        listed = (await plane.client.get("/global-secrets", headers=authorized)).json()
        names = {item["name"] for item in listed["items"]}
        assert "zone-token-signing-public-key-1" in names
        assert not any(name.startswith("zone-token-signing-key") for name in names)
        path = "/global-secrets/zone-token-signing-key-1"
        check_error(await plane.client.get(path, headers=authorized), 404)
        document = {"type": "GlobalSecret", "name": "zone-token-signing-key-1", "data": "eA=="}
        head = await plane.store.head()
        check_error(await put(plane, path, document, headers=authorized), 400)
        check_error(await plane.client.delete(path, headers=authorized), 400)
        assert await plane.store.head() == head


async def test_without_a_token_only_loopback_clients_write(tmp_path):
    async with serving(tmp_path, is_local=remote) as plane:
        error = check_error(await put(plane, "/meshes/m", {"type": "Mesh", "name": "m"}), 403)
        assert "only loopback clients may write" in error["detail"]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        check_error(
            await put(plane, "/meshes/m", {"type": "Mesh", "name": "m"}, headers=headers), 403
        )
    async with serving(tmp_path / "default", admin_token=TOKEN) as plane:
        # The default: a loopback client needs no token.
        assert (await put(plane, "/meshes/m", {"type": "Mesh", "name": "m"})).status_code == 201


# -- zones -----------------------------------------------------------------------------------


def subscription(
    sid: str, *, last_seen: str, disconnect: str | None = None, backend: str | None = "sqlite"
) -> dict[str, Any]:
    entry = {
        "id": sid,
        "globalInstanceId": "global-1",
        "zoneInstanceId": f"zone-{sid}",
        "version": "0.1.0",
        "connectTime": last_seen,
        "disconnectTime": disconnect,
        "lastSeen": last_seen,
        "status": {
            "total": {"responsesSent": 3, "responsesAcknowledged": 2, "responsesRejected": 1},
            "stat": {
                "Mesh": {"responsesSent": 3, "responsesAcknowledged": 2, "responsesRejected": 1}
            },
        },
    }
    if backend is not None:
        entry["backend"] = backend
    return entry


async def add_zones(store: Store) -> None:
    fresh, old = now_text(), now_text(-timedelta(days=2))
    zones = {
        # name: (enabled, subscriptions or None for no ZoneInsight)
        "z-online": (
            True,
            [subscription("1", last_seen=old, disconnect=old), subscription("2", last_seen=fresh)],
        ),
        "z-stale": (True, [subscription("3", last_seen=old, backend=None)]),
        "z-gone": (True, [subscription("4", last_seen=fresh, disconnect=fresh)]),
        "z-disabled": (False, [subscription("5", last_seen=fresh)]),
        "z-new": (True, None),
    }
    changes = []
    for name, (enabled, subscriptions) in zones.items():
        changes.append(Upsert(key=ResourceKey("Zone", None, name), spec={"enabled": enabled}))
        if subscriptions is not None:
            changes.append(
                Upsert(
                    key=ResourceKey("ZoneInsight", None, name),
                    spec={"subscriptions": subscriptions},
                )
            )
    await store.commit(changes)


async def test_zone_overviews_say_which_zones_are_online(tmp_path):
    async with serving(tmp_path) as plane:
        await add_zones(plane.store)
        for path in ("/zones/_overview", "/zones+insights"):
            listed = (await plane.client.get(path)).json()
            assert listed["total"] == 5
            assert listed["next"] is None
            online = {item["name"]: item["online"] for item in listed["items"]}
            assert online == {
                "z-disabled": False,
                "z-gone": False,
                "z-new": False,
                "z-online": True,
                "z-stale": False,
            }
        for path in ("/zones/z-online/_overview", "/zones+insights/z-online"):
            overview = (await plane.client.get(path)).json()
            assert overview["type"] == "ZoneOverview"
            assert overview["name"] == "z-online"
            assert overview["zone"] == {"enabled": True}
            assert overview["online"] is True
            datetime.fromisoformat(overview["creationTime"])
            first, second = overview["zoneInsight"]["subscriptions"]
            assert second["id"] == "2"
            assert second["backend"] == "sqlite"
            assert second["disconnectTime"] is None
            assert second["status"]["total"] == {
                "responsesSent": 3,
                "responsesAcknowledged": 2,
                "responsesRejected": 1,
            }
            assert first["disconnectTime"] is not None
        stale = (await plane.client.get("/zones/z-stale/_overview")).json()
        assert "backend" not in stale["zoneInsight"]["subscriptions"][0]
        disabled = (await plane.client.get("/zones/z-disabled/_overview")).json()
        assert (disabled["zone"], disabled["online"]) == ({"enabled": False}, False)
        new = (await plane.client.get("/zones/z-new/_overview")).json()
        assert new["zoneInsight"] == {"subscriptions": []}
        check_error(await plane.client.get("/zones/nowhere/_overview"), 404)
        paged = (await plane.client.get("/zones/_overview?size=2")).json()
        assert [i["name"] for i in paged["items"]] == ["z-disabled", "z-gone"]
        assert paged["next"].endswith("/zones/_overview?size=2&offset=2")

        statuses = (await plane.client.get("/status/zones")).json()
        assert statuses == [
            {"name": "z-disabled", "active": False},
            {"name": "z-gone", "active": False},
            {"name": "z-new", "active": False},
            {"name": "z-online", "active": True},
            {"name": "z-stale", "active": False},
        ]
        insights = (await plane.client.get("/zone-insights")).json()
        assert insights["total"] == 4


async def test_global_insight_counts(tmp_path):
    async with serving(tmp_path) as plane:
        await add_zones(plane.store)
        await plane.store.commit(
            [
                Upsert(key=ResourceKey("Mesh", None, "default")),
                Upsert(key=ResourceKey("Mesh", None, "demo")),
                Upsert(key=ResourceKey("ZoneIngress", None, "zi-1"), labels={"kuma.io/zone": "z"}),
                Upsert(key=ResourceKey("MeshTimeout", "default", "t")),
            ]
        )
        insight = (await plane.client.get("/global-insight")).json()
        assert insight["type"] == "GlobalInsight"
        datetime.fromisoformat(insight["createdAt"])
        assert insight["zones"] == {
            "controlPlanes": {"total": 5, "online": 1},
            "zoneIngresses": {"total": 1},
            "zoneEgresses": {"total": 0},
        }
        assert insight["meshes"] == {"total": 2, "withoutMtlsAcrossZones": []}
        assert insight["resources"]["MeshTimeout"] == {"total": 1}
        assert insight["resources"]["MeshRetry"] == {"total": 0}
        assert set(insight["resources"]) == set(CATALOG.names())


async def test_zone_ingress_and_egress_overviews(tmp_path):
    async with serving(tmp_path) as plane:
        labels = {"kuma.io/origin": "zone", "kuma.io/zone": "zone-1"}
        networking = {
            "address": "10.0.0.1",
            "advertisedAddress": "1.2.3.4",
            "advertisedPort": 10001,
        }
        await plane.store.commit(
            [
                Upsert(
                    key=ResourceKey("ZoneIngress", None, "zi-1"),
                    labels=labels,
                    spec={"networking": networking},
                ),
                Upsert(
                    key=ResourceKey("ZoneIngressInsight", None, "zi-1"),
                    spec={"subscriptions": [subscription("1", last_seen=now_text())]},
                ),
                Upsert(key=ResourceKey("ZoneIngress", None, "zi-2"), labels=labels),
                Upsert(
                    key=ResourceKey("ZoneEgress", None, "ze-1"),
                    labels=labels,
                    spec={"zone": "zone-1"},
                ),
            ]
        )
        for path in ("/zoneingresses/_overview", "/zoneingresses+insights"):
            listed = (await plane.client.get(path)).json()
            assert [(i["name"], i["online"]) for i in listed["items"]] == [
                ("zi-1", True),
                ("zi-2", False),
            ]
        overview = (await plane.client.get("/zoneingresses/zi-1/_overview")).json()
        assert overview["type"] == "ZoneIngressOverview"
        assert overview["zoneIngress"] == {"networking": networking, "labels": labels}
        assert overview["zoneIngressInsight"]["subscriptions"][0]["id"] == "1"
        bare = (await plane.client.get("/zoneingresses/zi-2/_overview")).json()
        assert (bare["zoneIngressInsight"], bare["online"]) == ({}, False)
        egress = (await plane.client.get("/zoneegresses/ze-1/_overview")).json()
        assert egress["type"] == "ZoneEgressOverview"
        assert egress["zoneEgress"] == {"zone": "zone-1", "labels": labels}
        assert (egress["zoneEgressInsight"], egress["online"]) == ({}, False)
        assert (await plane.client.get("/zoneegressoverviews")).json()["total"] == 1
        check_error(await plane.client.get("/zoneegresses/nope/_overview"), 404)


async def test_deleting_a_connected_zone_is_refused(tmp_path):
    async with serving(tmp_path) as plane:
        await add_zones(plane.store)
        head = await plane.store.head()
        error = check_error(await plane.client.delete("/zones/z-online"), 400, "zone")
        assert error["detail"] == f"zone: {ZONE_CONNECTED_MESSAGE}"
        assert await plane.store.head() == head


async def test_deleting_a_disconnected_zone_deletes_what_it_published(tmp_path):
    async with serving(tmp_path) as plane:
        await add_zones(plane.store)
        from_zone = {"kuma.io/origin": "zone", "kuma.io/zone": "z-stale"}
        kept = [
            ResourceKey("Dataplane", "default", "of-another-zone"),
            ResourceKey("MeshTimeout", "default", "of-the-global"),
        ]
        doomed = [
            ResourceKey("Dataplane", "default", "dp-1"),
            ResourceKey("ZoneIngress", None, "zi-1"),
            ResourceKey("MeshTimeout", "default", "published"),
        ]
        await plane.store.commit(
            [Upsert(key=key, labels=from_zone) for key in doomed]
            + [
                Upsert(key=kept[0], labels={**from_zone, "kuma.io/zone": "z-online"}),
                Upsert(key=kept[1], labels={"kuma.io/origin": "global"}),
            ]
        )
        head = await plane.store.head()
        assert (await plane.client.delete("/zones/z-stale")).status_code == 200
        for key in [
            *doomed,
            ResourceKey("Zone", None, "z-stale"),
            ResourceKey("ZoneInsight", None, "z-stale"),
        ]:
            assert await plane.store.find(key) is None, key
        for key in kept:
            assert await plane.store.find(key) is not None, key
        events = await plane.store.read(head)
        assert len(events) == len(doomed) + 2
        assert len({event.revision for event in events}) == len(events)
        # The zone's replication cursor now points into no log: a returning zone resends all.
        cursor = await plane.store.tracking(tracking_origin("z-stale"))
        assert cursor is not None
        assert cursor.epoch.startswith("deleted-")
        assert cursor != Cursor(plane.store.epoch, 0)


# -- status, configuration, GUI -------------------------------------------------------------


async def test_ready_answers_503_with_the_reason_until_ready(tmp_path):
    reason: list[str | None] = ["the KDS server is not listening yet"]
    async with serving(tmp_path, ready=lambda: reason[0]) as plane:
        error = check_error(await plane.client.get("/ready"), 503)
        assert error["detail"] == "the KDS server is not listening yet"
        reason[0] = None
        response = await plane.client.get("/ready")
        assert (response.status_code, response.json()) == (200, {"status": "ready"})


async def test_config_is_shown_as_given(tmp_path):
    config = {"mode": "global", "store": {"type": "sqlite", "postgres": {"password": "****"}}}
    async with serving(tmp_path, config=config) as plane:
        assert (await plane.client.get("/config")).json() == config
    async with serving(tmp_path / "bare") as plane:
        assert (await plane.client.get("/config")).json() == {}


async def test_gui_lists_zones_and_ingresses_escaped(tmp_path):
    async with serving(tmp_path) as plane:
        await add_zones(plane.store)
        await plane.store.commit(
            [
                Upsert(key=ResourceKey("Zone", None, "<script>alert(1)</script>")),
                Upsert(
                    key=ResourceKey("ZoneIngress", None, "zi-<b>"),
                    labels={"kuma.io/zone": "z-online"},
                    spec={"networking": {"advertisedAddress": "1.2.3.4", "advertisedPort": 10001}},
                ),
            ]
        )
        response = await plane.client.get("/gui")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        page = response.text
        assert "<script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "zi-&lt;b&gt;" in page
        assert "1.2.3.4:10001" in page
        assert '<tr><td>z-online</td><td class="online">Online</td><td>yes</td></tr>' in page
        assert '<tr><td>z-disabled</td><td class="offline">Offline</td><td>no</td></tr>' in page
    async with serving(tmp_path / "zone", mode="zone", zone="zone-1") as plane:
        check_error(await plane.client.get("/gui"), 404)


# -- OpenAPI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["global", "zone"])
async def test_openapi_describes_every_route_served(tmp_path, mode):
    options: dict[str, Any] = {"mode": mode, "zone": "zone-1" if mode == "zone" else None}
    async with serving(tmp_path, **options) as plane:
        document = (await plane.client.get("/openapi.json")).json()
        validate_openapi(document, cls=OpenAPIV31SpecValidator)
        assert document["openapi"] == "3.1.0"
        documented = {
            (method.upper(), path)
            for path, operations in document["paths"].items()
            for method in operations
        }
        served = {
            (route.method, route.resource.canonical)
            for route in plane.server.make_app().router.routes()
            if route.resource is not None
        }
        assert served == documented
        for resource_type in CATALOG:
            path = type_path(resource_type)
            assert f"/{path}" in document["paths"]
            assert resource_type.name in document["components"]["schemas"]
        assert "/gui" in document["paths"] if mode == "global" else "/gui" not in document["paths"]
        ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
        assert len(ids) == len(set(ids))
        # And each documented operation is answered by a handler, not by the router.
        for method, path in sorted(documented):
            url = path.replace("{mesh}", "default").replace("{name}", "x")
            response = await plane.client.request(method, url, content=b"{}")
            if response.status_code in (404, 405):
                assert not response.json()["detail"].startswith("there is no endpoint"), url
                assert "is not allowed on" not in response.json()["detail"], url


# -- junk ------------------------------------------------------------------------------------

# Each path with a document it accepts; junk is that document with parts replaced.
JUNK_TARGETS: list[tuple[str, dict[str, Any]]] = [
    (TIMEOUT_PATH, GOOD_TIMEOUT),
    ("/meshes/default", {"type": "Mesh", "name": "default", "mtls": {}}),
    ("/zones/z", {"type": "Zone", "name": "z", "enabled": True}),
    ("/meshes/default/meshgateways/g", {"type": "MeshGateway", "name": "g", "selectors": []}),
    ("/auditpolicys/a", {"type": "AuditPolicy", "name": "a", "spec": {}}),
    ("/meshes/default/dataplanes/dp", {"type": "Dataplane", "name": "dp"}),
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
LABELS = st.dictionaries(
    st.sampled_from(["kuma.io/origin", "kuma.io/zone", "team", ""]) | st.text(max_size=8),
    st.sampled_from(["global", "zone", "zone-1"]) | JSON_VALUES,
    max_size=3,
)
REPLACEMENTS = {
    "type": st.sampled_from(["MeshTimeout", "Mesh", "Zone", "MeshRetry", "Nope"]) | JSON_VALUES,
    "name": st.sampled_from(["t1", "default", "z", "g", "a", "other", "", "a b"]) | JSON_VALUES,
    "mesh": st.sampled_from(["default", "demo"]) | JSON_VALUES,
    "labels": LABELS | JSON_VALUES,
    "spec": st.dictionaries(st.sampled_from(["targetRef", "to", "x"]), JSON_VALUES) | JSON_VALUES,
    "mtls": JSON_VALUES,
    "enabled": JSON_VALUES,
    "creationTime": JSON_VALUES,
    "extra": JSON_VALUES,
}


@st.composite
def junk_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    path, valid = draw(st.sampled_from(JUNK_TARGETS))
    kind = draw(st.sampled_from(["bytes", "json", "document"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
    if kind == "json":
        return path, json.dumps(draw(JSON_VALUES)).encode()
    document = dict(valid)
    for field in draw(st.sets(st.sampled_from(sorted(REPLACEMENTS)), max_size=3)):
        if draw(st.booleans()) and field in document:
            del document[field]
        else:
            document[field] = draw(REPLACEMENTS[field])
    return path, json.dumps(document).encode()


async def test_junk_bodies_never_produce_a_server_error(tmp_path):
    async with serving(tmp_path) as plane:

        @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(junk_requests())
        def put_junk(request: tuple[str, bytes]) -> None:
            path, raw = request
            head = anyio.from_thread.run(plane.store.head)
            response = anyio.from_thread.run(functools.partial(plane.client.put, path, content=raw))
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                check_error(response, response.status_code)
                assert anyio.from_thread.run(plane.store.head) == head

        # Hypothesis drives a worker thread; requests run on the server's event loop.
        await anyio.to_thread.run_sync(put_junk)
