"""A global and two zones as separate ``kds-cp run`` processes over gRPC/TLS, driven by kdsctl.

The multi-zone workflow end to end: policies flow down, Dataplanes and ZoneIngresses
flow up (and across), and the deployment converges again after ``kill -9`` of the
global; a killed zone shows Offline.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kds.resource import hashed_name
from kds.testing._server import free_port
from tests.e2e.processes import BIN, FAST_SYNC, ControlPlane, kdsctl, wait_for

pytestmark = pytest.mark.crash

EXAMPLES = Path(__file__).parents[2] / "examples"

MESH = """\
type: Mesh
name: default
"""

TIMEOUT = """\
type: MeshTimeout
mesh: default
name: {name}
spec:
  targetRef:
    kind: Mesh
  to:
    - targetRef:
        kind: Mesh
      default:
        connectionTimeout: 2s
"""


def _dataplane(name: str, address: str) -> dict[str, object]:
    return {
        "type": "Dataplane",
        "mesh": "default",
        "name": name,
        "networking": {
            "address": address,
            "inbound": [{"port": 8080, "tags": {"kuma.io/service": "backend"}}],
        },
    }


def _names(plane: ControlPlane, path: str) -> set[str]:
    return {item["name"] for item in plane.get(path)["items"]}


def _has(plane: ControlPlane, path: str, name: str) -> bool:
    return name in _names(plane, path)


def _online(kdsctl_config, zones: set[str]) -> bool:
    rows = kdsctl(kdsctl_config, "inspect", "zones").splitlines()[1:]
    online = {row.split()[0] for row in rows if row.split()[1] == "Online"}
    return online == zones


@pytest.fixture
def deployment(tmp_path):
    kds_port = free_port()
    global_ = ControlPlane(
        "global",
        tmp_path / "global",
        {
            "KUMA_MODE": "global",
            "KUMA_ENVIRONMENT": "universal",
            "KUMA_MULTIZONE_GLOBAL_KDS_GRPC_PORT": str(kds_port),
            "KDS_MULTIZONE_GLOBAL_KDS_ADDRESS": "127.0.0.1",
        },
    )
    zones = [
        ControlPlane(
            zone,
            tmp_path / zone,
            {
                "KUMA_MODE": "zone",
                "KUMA_MULTIZONE_ZONE_NAME": zone,
                "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS": f"grpcs://127.0.0.1:{kds_port}",
                "KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY": "true",
                "KDS_DP_SERVER_ADDRESS": "127.0.0.1",
                "KDS_DP_SERVER_PORT": str(free_port()),
            },
        )
        for zone in ("zone-1", "zone-2")
    ]
    planes = [global_, *zones]
    try:
        global_.start()
        for zone in zones:
            # Zones authenticate with a cp-scoped zone token, which the global issues.
            issued = httpx.post(
                f"{global_.api}/tokens/zone", json={"zone": zone.name, "scope": ["cp"]}, timeout=10
            )
            assert issued.status_code == 200, issued.text
            zone.env["KDS_MULTIZONE_ZONE_KDS_CP_TOKEN"] = issued.text
            zone.start()
        yield global_, zones
    finally:
        for plane in planes:
            plane.kill()


def test_policies_down_dataplanes_up_and_recovery_after_kill_9(deployment, tmp_path):
    global_, (zone1, zone2) = deployment
    config = tmp_path / "kdsctl.yaml"
    logs = tuple(plane.log for plane in (global_, zone1, zone2))
    kdsctl(config, "config", "control-planes", "add", "--name", "global", "--address", global_.api)

    # A policy applied on the global with kdsctl reaches both zones under its hashed name.
    kdsctl(config, "apply", "-f", "-", stdin=MESH + "---\n" + TIMEOUT.format(name="timeout-1"))
    copy = hashed_name("default", "timeout-1")
    for zone in (zone1, zone2):
        wait_for(
            functools.partial(_has, zone, "/meshes/default/meshtimeouts", copy),
            what=f"the policy in {zone.name}",
            logs=logs,
        )
    assert zone1.get(f"/meshes/default/meshtimeouts/{copy}")["labels"]["kuma.io/origin"] == "global"

    # A Dataplane of zone-1 reaches the global under its hashed name, and not zone-2.
    response = httpx.put(
        f"{zone1.api}/meshes/default/dataplanes/backend-1",
        json=_dataplane("backend-1", "10.0.0.1"),
        timeout=5,
    )
    assert response.status_code == 201, response.text
    on_global = hashed_name("default", "backend-1", "zone-1")
    wait_for(
        lambda: on_global in _names(global_, "/meshes/default/dataplanes"),
        what="zone-1's Dataplane on the global",
        logs=logs,
    )
    dataplane = global_.get(f"/meshes/default/dataplanes/{on_global}")
    assert dataplane["labels"]["kuma.io/zone"] == "zone-1"
    assert dataplane["networking"]["address"] == "10.0.0.1"

    # A ZoneIngress of zone-1 reaches zone-2 (through the global).
    response = httpx.put(
        f"{zone1.api}/zoneingresses/ingress-1",
        json={
            "type": "ZoneIngress",
            "name": "ingress-1",
            "networking": {"address": "10.0.0.1", "port": 10001},
        },
        timeout=5,
    )
    assert response.status_code == 201, response.text
    ingress = hashed_name("", "ingress-1", "zone-1")
    wait_for(
        lambda: ingress in _names(zone2, "/zoneingresses"),
        what="zone-1's ZoneIngress in zone-2",
        logs=logs,
    )
    assert _names(zone2, "/meshes/default/dataplanes") == set()
    wait_for(lambda: _online(config, {"zone-1", "zone-2"}), what="both zones Online", logs=logs)

    # kill -9 the global, start it again: zones come back Online and replication resumes.
    global_.kill()
    global_.start()
    wait_for(lambda: _online(config, {"zone-1", "zone-2"}), what="zones Online again", logs=logs)
    kdsctl(config, "apply", "-f", "-", stdin=TIMEOUT.format(name="timeout-2"))
    for zone in (zone1, zone2):
        wait_for(
            functools.partial(
                _has, zone, "/meshes/default/meshtimeouts", hashed_name("default", "timeout-2")
            ),
            what=f"the new policy in {zone.name}",
            logs=logs,
        )
    assert on_global in _names(global_, "/meshes/default/dataplanes")

    # kill -9 a zone: the global shows it Offline within the heartbeat timeout (the
    # deadline adds the insight interval and slack for a loaded machine).
    zone2.kill()
    wait_for(
        lambda: _online(config, {"zone-1"}),
        timeout=float(FAST_SYNC["KDS_SYNC_HEARTBEAT_TIMEOUT"]) + 10,
        what="zone-2 Offline",
        logs=logs,
    )
    overview = {zone["name"]: zone["online"] for zone in global_.get("/zones/_overview")["items"]}
    assert overview == {"zone-1": True, "zone-2": False}
    inspect = kdsctl(config, "inspect", "zones", "-o", "json")
    assert {item["name"] for item in json.loads(inspect)["items"]} == {"zone-1", "zone-2"}


def test_sigterm_stops_gracefully_and_zone_shows_offline_at_once(deployment, tmp_path):
    global_, (zone1, _zone2) = deployment
    config = tmp_path / "kdsctl.yaml"
    kdsctl(config, "config", "control-planes", "add", "--name", "global", "--address", global_.api)
    wait_for(lambda: _online(config, {"zone-1", "zone-2"}), what="both zones Online")
    assert zone1.stop() == 0
    # A graceful stop says Goodbye: the global records the disconnect without waiting
    # for a heartbeat to time out.
    wait_for(lambda: _online(config, {"zone-2"}), what="zone-1 Offline")
    assert global_.stop() == 0


def test_with_no_configuration_a_global_keeps_its_resources_in_sqlite_in_its_work_dir(tmp_path):
    # Only the work directory and the ports are set (tests listen on loopback and on free
    # ports); everything else is the default: a global on SQLite.
    plane = ControlPlane(
        "global",
        tmp_path / "work",
        {
            "KDS_MULTIZONE_GLOBAL_KDS_ADDRESS": "127.0.0.1",
            "KDS_MULTIZONE_GLOBAL_KDS_GRPC_PORT": str(free_port()),
        },
    )
    try:
        plane.start()
        assert plane.get("/")["mode"] == "global"
        response = httpx.put(
            f"{plane.api}/meshes/default", json={"type": "Mesh", "name": "default"}, timeout=5
        )
        assert response.status_code == 201, response.text
        assert plane.stop() == 0
        assert (tmp_path / "work" / "kds.db").exists()
        plane.start()
        assert _names(plane, "/meshes") == {"default"}
        assert plane.stop() == 0
    finally:
        plane.kill()


def _free_port_base() -> int:
    """A port P with P, P+4, P+9997, P+10000, P+19997 and P+20000 free (the quickstart)."""
    import socket

    for _ in range(100):
        base = free_port()
        if base + 20000 > 65535:
            continue
        sockets = []
        try:
            for offset in (0, 4, 9997, 10000, 19997, 20000):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise AssertionError("no free port layout for the quickstart")


def test_the_readme_quickstart_shows_both_zones_online(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("KDS_", "KUMA_"))}
    result = subprocess.run(  # noqa: S603 -- our own script
        ["bash", str(EXAMPLES / "quickstart.sh")],  # noqa: S607 -- bash from PATH, as users run it
        env={
            **environ,
            "PATH": f"{BIN}{os.pathsep}{environ.get('PATH', '')}",
            "TMPDIR": str(tmp_path),
            "QUICKSTART_PORT_BASE": str(_free_port_base()),
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    inspect = result.stdout.split("$ kdsctl inspect zones")[1].split("$ kdsctl get")[0]
    rows = [line.split() for line in inspect.strip().splitlines()[1:]]
    assert sorted((row[0], row[1]) for row in rows) == [("zone-1", "Online"), ("zone-2", "Online")]
    assert list(tmp_path.iterdir()) == []  # it cleaned up after itself


def test_the_embedding_examples_replicate_a_custom_type(tmp_path):
    kds_port, global_api, zone_api = free_port(), free_port(), free_port()
    logs = (tmp_path / "global.log", tmp_path / "zone.log")
    commands = [
        ["global_daemon.py", str(tmp_path / "global"), "--kds-port", str(kds_port)],
        ["zone_daemon.py", str(tmp_path / "zone"), "--zone", "zone-1"],
    ]
    commands[0] += ["--api-port", str(global_api)]
    commands[1] += ["--global-address", f"grpcs://127.0.0.1:{kds_port}"]
    commands[1] += ["--api-port", str(zone_api)]
    processes = []
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("wb") as output:
                processes.append(
                    subprocess.Popen(  # noqa: S603 -- our own examples
                        [sys.executable, str(EXAMPLES / command[0]), *command[1:]],
                        stdout=output,
                        stderr=subprocess.STDOUT,
                    )
                )
        flag = {
            "type": "FeatureFlag",
            "mesh": "default",
            "name": "new-checkout",
            "spec": {"enabled": True, "rollout_percent": 10},
        }
        wait_for(
            lambda: (
                httpx.put(
                    f"http://127.0.0.1:{global_api}/meshes/default/featureflags/new-checkout",
                    json=flag,
                    timeout=5,
                ).status_code
                == 201
            ),
            what="the global example's API",
            logs=logs,
        )
        copy = hashed_name("default", "new-checkout")
        zone_url = f"http://127.0.0.1:{zone_api}/meshes/default/featureflags/{copy}"
        arrived = wait_for(
            lambda: (
                httpx.get(zone_url, timeout=5).json() if httpx.get(zone_url).is_success else None
            ),
            what="the flag in the zone",
            logs=logs,
        )
        assert arrived["spec"] == {"enabled": True, "rollout_percent": 10}
    finally:
        for process in processes:
            process.kill()
            process.wait()
