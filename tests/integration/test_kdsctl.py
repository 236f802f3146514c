"""kdsctl against a real control plane API: an ApiServer over a SQLite store on loopback.

Each test starts its own server (port 0, a fresh database) in a thread running an
event loop, and drives kdsctl through click's CliRunner with a configuration file in
a temporary directory; one test runs the installed ``kdsctl`` console script.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import yaml
from anyio.from_thread import start_blocking_portal
from click.testing import CliRunner, Result

from kds import DEFAULT_CATALOG, ResourceKey, ResourceType, Scope, SyncFlag, Upsert
from kds.api import ApiServer
from kds.cli.ctl import ControlPlaneEntry, CtlConfig, main, save_ctl_config
from kds.client import ControlPlaneClient
from kds_stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from anyio.from_thread import BlockingPortal

TIMEOUT = 30  # seconds; a deadline for the server to stop, never a pause
ADMIN_TOKEN = "s3cret-admin"  # noqa: S105 -- a test server's token

ZONE_COLUMNS = [
    "NAME",
    "STATUS",
    "LAST CONNECTED AGO",
    "LAST UPDATED AGO",
    "TOTAL UPDATES",
    "TOTAL ERRORS",
    "ZONE-CP VERSION",
    "BACKEND",
]


class Plane:
    """A running control plane API: its URL, and its store for seeding."""

    def __init__(self, portal: BlockingPortal, url: str, store: SQLiteStore) -> None:
        self.portal = portal
        self.url = url
        self.store = store

    def commit(self, changes: Sequence[Upsert]) -> None:
        self.portal.call(self.store.commit, list(changes))

    def find(self, key: ResourceKey):
        return self.portal.call(self.store.find, key)


async def _serve(path, catalog, stop, options, *, task_status):
    async with SQLiteStore(path, catalog=catalog, synchronous="normal") as store:
        server = ApiServer(store, catalog=catalog, **options)
        async with anyio.create_task_group() as group:
            url = await group.start(server.serve, "127.0.0.1", 0)
            task_status.started((url, store))
            await stop.wait()
            group.cancel_scope.cancel()


@contextlib.contextmanager
def running_plane(path: Path, catalog=DEFAULT_CATALOG, **options: Any) -> Iterator[Plane]:
    options.setdefault("mode", "global")
    with start_blocking_portal("asyncio") as portal:
        stop = portal.call(anyio.Event)
        future, (url, store) = portal.start_task(_serve, path, catalog, stop, options)
        try:
            yield Plane(portal, url, store)
        finally:
            portal.call(stop.set)
            future.result(timeout=TIMEOUT)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    with running_plane(tmp_path / "global.sqlite", liveness=3600.0) as running:
        yield running


@pytest.fixture
def config_file(tmp_path: Path, plane: Plane) -> Path:
    path = tmp_path / "kdsctl" / "config"
    save_ctl_config(CtlConfig((ControlPlaneEntry("test", plane.url),), "test"), path)
    return path


def kdsctl(config: Path, *args: str, input: str | None = None) -> Result:
    result = CliRunner().invoke(main, ["--config-file", str(config), *args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback here is a bug in kdsctl: show it
    return result


def succeeds(config: Path, *args: str, input: str | None = None) -> str:
    result = kdsctl(config, *args, input=input)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return result.stdout


def fails(config: Path, *args: str, input: str | None = None) -> str:
    """Run kdsctl expecting one ``Error:`` line on stderr and exit status 1; return it."""
    result = kdsctl(config, *args, input=input)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0].removeprefix("Error: ")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def columns(header: str) -> list[str]:
    """A table's column names: cells are three or more spaces apart."""
    return re.split(r" {3,}", header)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


RESOURCES = """\
type: Mesh
name: default
mtls: {}
---
type: Mesh
name: other
---
type: MeshTimeout
mesh: default
name: timeout-1
labels:
  team: payments
spec:
  targetRef: {kind: Mesh}
  to:
  - targetRef: {kind: Mesh}
    default: {idleTimeout: 20s}
---
type: MeshTimeout
mesh: other
name: timeout-2
spec:
  targetRef: {kind: Mesh}
"""


# -- get, apply, delete --------------------------------------------------------------------


def test_apply_then_get_in_every_format(tmp_path, config_file):
    out = succeeds(config_file, "apply", "-f", write(tmp_path / "r.yaml", RESOURCES))
    assert out.splitlines() == [
        'created Mesh "default"',
        'created Mesh "other"',
        'created MeshTimeout "timeout-1" in mesh "default"',
        'created MeshTimeout "timeout-2" in mesh "other"',
    ]

    lines = succeeds(config_file, "get", "meshes").splitlines()
    assert lines[0] == "NAME      AGE"
    assert [line.split()[0] for line in lines[1:]] == ["default", "other"]
    assert all(line.split()[1].endswith(("s", "m")) for line in lines[1:])

    # Without --mesh a mesh-scoped list covers every mesh; with it, one mesh.
    lines = succeeds(config_file, "get", "meshtimeouts").splitlines()
    assert lines[0] == "MESH      NAME        AGE"
    assert [line.split()[:2] for line in lines[1:]] == [
        ["default", "timeout-1"],
        ["other", "timeout-2"],
    ]
    lines = succeeds(config_file, "get", "meshtimeouts", "-m", "other").splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["other", "timeout-2"]]

    # The path, its singular and the type name (any case) all name the type.
    for word in ("meshtimeout", "MeshTimeout", "MESHTIMEOUTS"):
        assert succeeds(config_file, "get", word, "-m", "other").splitlines()[1:] == lines[1:]

    one = yaml.safe_load(succeeds(config_file, "get", "meshtimeout", "timeout-1", "-o", "yaml"))
    assert one["type"] == "MeshTimeout"
    assert one["mesh"] == "default"
    assert one["name"] == "timeout-1"
    assert one["labels"]["team"] == "payments"
    assert one["spec"]["to"][0]["default"] == {"idleTimeout": "20s"}
    assert "creationTime" in one
    as_json = json.loads(succeeds(config_file, "get", "meshtimeout", "timeout-1", "-o", "json"))
    assert as_json == one

    listed = json.loads(succeeds(config_file, "get", "meshes", "-o", "json"))
    assert listed["total"] == 2
    assert listed["next"] is None
    assert [item["name"] for item in listed["items"]] == ["default", "other"]
    assert listed["items"][0]["mtls"] == {}  # Mesh keeps its spec at the top level
    assert yaml.safe_load(succeeds(config_file, "get", "meshes", "-o", "yaml")) == listed

    single = succeeds(config_file, "get", "mesh", "other").splitlines()
    assert single[0] == "NAME    AGE"
    assert single[1].split()[0] == "other"


def test_get_zones_and_a_type_the_control_plane_does_not_know(config_file, plane):
    plane.commit([Upsert(key=ResourceKey("Zone", None, "zone-1"), spec={"enabled": True})])
    lines = succeeds(config_file, "get", "zones").splitlines()
    assert lines[0] == "NAME     AGE"
    assert lines[1].split()[0] == "zone-1"
    message = fails(config_file, "get", "meshtimout")
    assert message == "unknown resource type 'meshtimout': did you mean 'meshtimeouts'?"
    message = fails(config_file, "get", "meshtimeout", "missing")
    assert message == 'MeshTimeout "missing" not found in mesh "default"'
    message = fails(config_file, "get", "zones", "-m", "default")
    assert message == "mesh: Zone is global-scoped: it has no mesh"


def test_apply_updates_and_reads_stdin(config_file):
    document = "type: Mesh\nname: default\n"
    assert succeeds(config_file, "apply", "-f", "-", input=document) == 'created Mesh "default"\n'
    changed = "type: Mesh\nname: default\nmtls: {enabledBackend: ca-1}\n"
    assert succeeds(config_file, "apply", "-f", "-", input=changed) == 'updated Mesh "default"\n'
    mesh = json.loads(succeeds(config_file, "get", "mesh", "default", "-o", "json"))
    assert mesh["mtls"] == {"enabledBackend": "ca-1"}


def test_delete_removes_the_resource_and_says_when_it_is_missing(tmp_path, config_file):
    succeeds(config_file, "apply", "-f", write(tmp_path / "r.yaml", RESOURCES))
    out = succeeds(config_file, "delete", "meshtimeout", "timeout-1", "-m", "default")
    assert out == 'deleted MeshTimeout "timeout-1" in mesh "default"\n'
    assert succeeds(config_file, "get", "meshtimeouts", "-m", "default") == "MESH   NAME   AGE\n"
    message = fails(config_file, "delete", "meshtimeouts", "timeout-1")
    assert message == 'MeshTimeout "timeout-1" not found in mesh "default"'
    assert succeeds(config_file, "delete", "Mesh", "other") == 'deleted Mesh "other"\n'


@pytest.mark.parametrize(
    ("third", "problem"),
    [
        (
            "type: MeshTimeout\nmesh: default\nname: x\n  oops: 1\n",
            "document 3: invalid YAML at line 11, column 7: mapping values are not allowed here",
        ),
        ("type: MeshTimeout\nmesh: default\n", 'document 3: missing "name"'),
        ("name: x\n", 'document 3: missing "type"'),
        (
            "type: MeshTimeOut\nmesh: default\nname: x\n",
            "document 3: unknown resource type 'MeshTimeOut': did you mean 'MeshTimeout'?",
        ),
        (
            "type: MeshTeapot\nmesh: default\nname: x\n",
            "document 3: unknown resource type 'MeshTeapot'",
        ),
        ("type: MeshTimeout\nname: x\n", 'document 3: missing "mesh" (MeshTimeout is mesh-scoped)'),
        (
            "type: MeshTimeout\nmesh: default\nname: x\nlabels: {a: 1}\n",
            'document 3: labels["a"]: must be a string, got an integer',
        ),
        (
            "type: MeshTimeout\nmesh: default\nname: x\ntargetRef: {}\n",
            "document 3: targetRef: unknown field: MeshTimeout keeps its fields under spec",
        ),
        ("- a list\n", "document 3: must be a mapping of resource fields, got list"),
        (
            "type: Dataplane\nmesh: default\nname: dp\n",
            "document 3: Dataplane cannot be applied: the control plane at",
        ),
    ],
)
def test_a_bad_document_is_named_and_nothing_is_applied(tmp_path, config_file, third, problem):
    text = (
        "type: Mesh\nname: default\n"
        "---\n"
        "type: MeshTimeout\nmesh: default\nname: first\n"
        "---\n" + third + "---\n"
        "type: Mesh\nname: last\n"
    )
    path = write(tmp_path / "bad.yaml", text)
    message = fails(config_file, "apply", "-f", path)
    assert message.startswith(f"{path}: {problem}")
    listed = json.loads(succeeds(config_file, "get", "meshes", "-o", "json"))
    assert listed == {"total": 0, "items": [], "next": None}


def test_the_control_plane_refusing_a_document_is_reported_with_its_fields(tmp_path, config_file):
    text = (
        "type: Mesh\nname: default\n"
        "---\n"
        "type: MeshTimeout\nmesh: default\nname: bad\nspec: {targetRef: not-a-mapping}\n"
    )
    path = write(tmp_path / "refused.yaml", text)
    result = kdsctl(config_file, "apply", "-f", path)
    assert result.exit_code == 1
    assert result.stdout == 'created Mesh "default"\n'
    (line,) = result.stderr.splitlines()
    assert line.startswith(f'Error: {path}: document 2 (MeshTimeout "bad" in mesh "default"): ')
    assert "spec.targetRef" in line


def test_dry_run_prints_what_would_be_sent_and_sends_nothing(tmp_path, config_file):
    text = "type: Mesh\nname: default\ncreated: 2024-01-01\nflag: no\n---\n---\n" + RESOURCES
    out = succeeds(config_file, "apply", "--dry-run", "-f", write(tmp_path / "r.yaml", text))
    documents = list(yaml.safe_load_all(out))
    assert len(documents) == 5
    assert out.startswith("# PUT /meshes/default\n")
    assert "# PUT /meshes/default/meshtimeouts/timeout-1\n" in out
    # Dates and YAML 1.1 booleans stay text, as in the file: JSON has neither.
    assert "created: '2024-01-01'" in out
    assert "flag: 'no'" in out
    assert json.loads(succeeds(config_file, "get", "meshes", "-o", "json"))["total"] == 0


def test_lists_are_read_page_by_page(config_file, plane):
    plane.commit([Upsert(key=ResourceKey("Mesh", None, f"mesh-{i:04}")) for i in range(1005)])
    with ControlPlaneClient(plane.url) as client:
        everything = client.list("meshes")
        assert everything.total == 1005
        assert [item["name"] for item in everything.items] == [f"mesh-{i:04}" for i in range(1005)]
        page = client.list("meshes", size=2, offset=1003)
        assert [item["name"] for item in page.items] == ["mesh-1003", "mesh-1004"]
        assert page.next is None
    lines = succeeds(config_file, "get", "meshes", "--size", "2", "--offset", "5").splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["mesh-0005", "mesh-0006"]
    assert lines[-1] == "Rest of the resources: kdsctl get meshes --offset 7 --size 2"
    page_json = json.loads(succeeds(config_file, "get", "meshes", "--size", "2", "-o", "json"))
    assert page_json["total"] == 1005
    assert "offset=2" in page_json["next"]


def test_types_the_application_registers_work_like_built_in_ones(tmp_path):
    canary = ResourceType(name="CanaryRelease", scope=Scope.MESH, flags=SyncFlag.GLOBAL_TO_ZONES)
    catalog = DEFAULT_CATALOG.with_types(canary)
    with running_plane(tmp_path / "custom.sqlite", catalog) as running:
        config = tmp_path / "config"
        save_ctl_config(CtlConfig((ControlPlaneEntry("c", running.url),), "c"), config)
        text = (
            "type: Mesh\nname: default\n---\n"
            "type: CanaryRelease\nmesh: default\nname: web\nspec: {weight: 10}\n"
        )
        succeeds(config, "apply", "-f", write(tmp_path / "c.yaml", text))
        lines = succeeds(config, "get", "canaryreleases").splitlines()
        assert [line.split()[:2] for line in lines[1:]] == [["default", "web"]]
        got = json.loads(succeeds(config, "get", "CanaryRelease", "web", "-o", "json"))
        assert got["spec"] == {"weight": 10}
        succeeds(config, "delete", "canaryrelease", "web")


# -- inspect -------------------------------------------------------------------------------


def _subscription(connected, seen, *, sent, rejected, disconnected=None, **extra):
    return {
        "id": f"s-{connected.timestamp()}",
        "globalInstanceId": "global-1",
        "zoneInstanceId": "zone-instance",
        "connectTime": connected.isoformat(),
        "disconnectTime": disconnected.isoformat() if disconnected else None,
        "lastSeen": seen.isoformat(),
        "status": {
            "total": {
                "responsesSent": sent,
                "responsesAcknowledged": sent - rejected,
                "responsesRejected": rejected,
            },
            "stat": {},
        },
        **extra,
    }


def test_inspect_zones_shows_status_sessions_and_counters(config_file, plane):
    now = datetime.now(UTC)
    zone = lambda name, enabled=True: Upsert(  # noqa: E731
        key=ResourceKey("Zone", None, name), spec={"enabled": enabled}
    )
    insight = lambda name, *subscriptions: Upsert(  # noqa: E731
        key=ResourceKey("ZoneInsight", None, name), spec={"subscriptions": list(subscriptions)}
    )
    old = now - timedelta(days=3)
    plane.commit(
        [
            zone("zone-1"),
            insight(
                "zone-1",
                _subscription(old, old, sent=30, rejected=2, disconnected=old, version="0.0.9"),
                _subscription(
                    now - timedelta(hours=2),
                    now - timedelta(minutes=5),
                    sent=12,
                    rejected=1,
                    version="0.1.0",
                    backend="postgres",
                ),
            ),
            # Connected and seen, but disabled: Offline, as Kuma shows it.
            zone("zone-2", enabled=False),
            insight(
                "zone-2",
                _subscription(now - timedelta(minutes=3), now, sent=4, rejected=0, version="0.1.0"),
            ),
            # Never connected.
            zone("zone-3"),
        ]
    )
    lines = succeeds(config_file, "inspect", "zones").splitlines()
    assert columns(lines[0]) == ZONE_COLUMNS
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["zone-1"].split() == [
        "zone-1",
        "Online",
        "2h",
        "5m",
        "42",
        "3",
        "0.1.0",
        "postgres",
    ]
    zone_2 = rows["zone-2"].split()
    assert zone_2[:3] == ["zone-2", "Offline", "3m"]
    assert zone_2[4:] == ["4", "0", "0.1.0", "-"]
    assert rows["zone-3"].split() == ["zone-3", "Offline", "never", "never", "0", "0", "-", "-"]
    # Columns line up under their headers.
    assert lines[1].index("Online") == lines[0].index("STATUS")
    assert lines[1].index("postgres") == lines[0].index("BACKEND")

    as_json = json.loads(succeeds(config_file, "inspect", "zones", "-o", "json"))
    assert as_json["total"] == 3
    assert as_json["next"] is None
    assert {item["name"]: item["online"] for item in as_json["items"]} == {
        "zone-1": True,
        "zone-2": False,
        "zone-3": False,
    }
    assert yaml.safe_load(succeeds(config_file, "inspect", "zones", "-o", "yaml")) == as_json


def test_inspect_zone_proxies_shows_their_zone_and_sessions(config_file, plane):
    now = datetime.now(UTC)
    plane.commit(
        [
            Upsert(
                key=ResourceKey("ZoneIngress", None, "ingress-1"),
                labels={"kuma.io/zone": "zone-1", "kuma.io/origin": "zone"},
                spec={"zone": "zone-1", "networking": {"address": "10.0.0.1", "port": 10001}},
            ),
            Upsert(
                key=ResourceKey("ZoneIngressInsight", None, "ingress-1"),
                spec={
                    "subscriptions": [
                        _subscription(
                            now - timedelta(hours=1), now - timedelta(minutes=2), sent=7, rejected=2
                        )
                    ]
                },
            ),
            Upsert(key=ResourceKey("ZoneIngress", None, "ingress-2"), spec={"zone": "zone-2"}),
            Upsert(key=ResourceKey("ZoneEgress", None, "egress-1"), spec={"zone": "zone-3"}),
        ]
    )
    lines = succeeds(config_file, "inspect", "zoneingresses").splitlines()
    assert columns(lines[0]) == [
        "NAME",
        "ZONE",
        "STATUS",
        "LAST CONNECTED AGO",
        "LAST UPDATED AGO",
        "TOTAL UPDATES",
        "TOTAL ERRORS",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["ingress-1"] == ["ingress-1", "zone-1", "Online", "1h", "2m", "7", "2"]
    assert rows["ingress-2"] == ["ingress-2", "zone-2", "Offline", "never", "never", "0", "0"]

    lines = succeeds(config_file, "inspect", "zoneegresses").splitlines()
    assert lines[1].split() == ["egress-1", "zone-3", "Offline", "never", "never", "0", "0"]
    as_json = json.loads(succeeds(config_file, "inspect", "zoneingresses", "-o", "json"))
    assert [item["name"] for item in as_json["items"]] == ["ingress-1", "ingress-2"]


# -- errors --------------------------------------------------------------------------------


def test_an_unreachable_control_plane_is_named_with_the_cause(tmp_path):
    config = tmp_path / "config"
    address = f"http://127.0.0.1:{free_port()}"
    save_ctl_config(CtlConfig((ControlPlaneEntry("gone", address),), "gone"), config)
    for args in (["get", "meshes"], ["inspect", "zones"], ["delete", "mesh", "x"]):
        message = fails(config, *args)
        assert message == f"cannot reach the control plane at {address}: connection refused"


def test_a_tls_control_plane_spoken_to_in_plain_http_is_explained(tmp_path):
    # An https:// address pointing at a plain HTTP listener: the TLS handshake fails.
    with running_plane(tmp_path / "plain.sqlite") as running:
        config = tmp_path / "config"
        address = running.url.replace("http://", "https://")
        save_ctl_config(CtlConfig((ControlPlaneEntry("tls", address),), "tls"), config)
        message = fails(config, "get", "meshes")
        assert message.startswith(f"cannot reach the control plane at {address}: TLS handshake")


def test_a_bad_config_file_is_one_error_line(tmp_path):
    config = tmp_path / "config"
    config.write_text("controlPlanes:\n  - name: [\n")
    assert fails(config, "get", "meshes").startswith(f"config file {config}: invalid YAML at line")
    config.write_text("currentContext: nowhere\n")
    message = fails(config, "get", "meshes")
    assert message == f"config file {config}: currentContext: 'nowhere' names no control plane"


# -- control planes ------------------------------------------------------------------------


def test_control_planes_add_list_switch_and_remove(tmp_path, plane):
    config = tmp_path / "home" / ".kdsctl" / "config"
    out = succeeds(config, "config", "control-planes", "list")
    assert out == "ACTIVE   NAME    ADDRESS\n*        local   http://127.0.0.1:5681\n"

    out = succeeds(
        config, "config", "control-planes", "add", "--name", "one", "--address", plane.url
    )
    assert out == 'added Control Plane "one"\nswitched active Control Plane to "one"\n'
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    succeeds(config, "get", "meshes")  # talks to "one"

    message = fails(config, "config", "control-planes", "add", "--name", "one", "--address", "x")
    assert "a control plane named 'one' already exists: use --overwrite" in message

    # An address that does not answer is not added.
    before = config.read_text()
    gone = f"http://127.0.0.1:{free_port()}"
    message = fails(config, "config", "control-planes", "add", "--name", "two", "--address", gone)
    assert message == f"cannot reach the control plane at {gone}: connection refused"
    assert config.read_text() == before

    succeeds(config, "config", "control-planes", "add", "--name", "two", "--address", plane.url)
    out = succeeds(
        config, "config", "control-planes", "add", "--name", "one", "--address", plane.url + "/",
        "--overwrite",
    )  # fmt: skip
    assert 'switched active Control Plane to "one"' in out
    out = succeeds(config, "config", "control-planes", "switch", "--name", "two")
    assert out == 'switched active Control Plane to "two"\n'
    lines = succeeds(config, "config", "control-planes", "list").splitlines()
    assert [line.split() for line in lines] == [
        ["ACTIVE", "NAME", "ADDRESS"],
        ["local", "http://127.0.0.1:5681"],
        ["one", plane.url],
        ["*", "two", plane.url],
    ]
    message = fails(config, "config", "control-planes", "switch", "--name", "three")
    assert message == "there is no control plane named 'three' (known: 'local', 'one', 'two')"

    out = succeeds(config, "config", "control-planes", "remove", "--name", "two")
    assert out.splitlines()[0] == 'removed Control Plane "two"'
    assert fails(config, "get", "meshes").startswith("no active control plane")
    view = yaml.safe_load(succeeds(config, "config", "view"))
    assert view == {
        "contexts": [
            {"name": "local", "controlPlane": "local"},
            {"name": "one", "controlPlane": "one"},
        ],
        "controlPlanes": [
            {"name": "local", "coordinates": {"apiServer": {"url": "http://127.0.0.1:5681"}}},
            {"name": "one", "coordinates": {"apiServer": {"url": plane.url}}},
        ],
        "currentContext": "",
    }


def test_the_config_file_comes_from_the_environment_too(tmp_path, plane):
    config = tmp_path / "env-config"
    result = CliRunner().invoke(
        main,
        ["config", "control-planes", "add", "--name", "env", "--address", plane.url],
        env={"KDSCTL_CONFIG": str(config)},
    )
    assert result.exit_code == 0, result.output
    assert "env" in config.read_text()


def test_the_auth_token_file_is_sent_as_a_bearer_token(tmp_path):
    # The server treats every client as remote, so writes need the admin token.
    with running_plane(
        tmp_path / "auth.sqlite", admin_token=ADMIN_TOKEN, is_local=lambda _peer: False
    ) as running:
        config = tmp_path / "config"
        token = write(tmp_path / "token", ADMIN_TOKEN + "\n")
        wrong = write(tmp_path / "wrong", "guess\n")
        resource = write(tmp_path / "mesh.yaml", "type: Mesh\nname: default\n")
        add = ["config", "control-planes", "add", "--address", running.url]

        succeeds(config, *add, "--name", "anonymous")
        assert "need 'Authorization: Bearer <admin token>'" in fails(
            config, "apply", "-f", resource
        )
        succeeds(config, *add, "--name", "wrong", "--auth-token-file", wrong)
        assert "the admin token is not valid" in fails(config, "apply", "-f", resource)
        succeeds(config, *add, "--name", "admin", "--auth-token-file", token)
        assert succeeds(config, "apply", "-f", resource) == 'created Mesh "default"\n'
        assert succeeds(config, "delete", "mesh", "default") == 'deleted Mesh "default"\n'
        stored = yaml.safe_load(config.read_text())["controlPlanes"][-1]
        assert stored["coordinates"]["apiServer"]["authTokenFile"] == token
        assert ADMIN_TOKEN not in config.read_text()


def test_the_installed_console_script_runs_against_the_server(tmp_path, config_file, plane):
    script = shutil.which("kdsctl", path=str(Path(sys.executable).parent))
    assert script is not None, "kdsctl is not installed next to this interpreter"
    plane.commit([Upsert(key=ResourceKey("Mesh", None, "default"))])
    env = {**os.environ, "KDSCTL_CONFIG": str(config_file)}
    done = subprocess.run(  # noqa: S603 -- our own program
        [script, "get", "meshes", "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [item["name"] for item in json.loads(done.stdout)["items"]] == ["default"]

    gone = tmp_path / "gone-config"
    address = f"http://127.0.0.1:{free_port()}"
    save_ctl_config(CtlConfig((ControlPlaneEntry("gone", address),), "gone"), gone)
    done = subprocess.run(  # noqa: S603 -- our own program
        [script, "--config-file", str(gone), "inspect", "zones"],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        f"Error: cannot reach the control plane at {address}: connection refused\n"
    )
