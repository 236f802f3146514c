"""kds.daemon and `kds-cp run`: admin token, start-up errors, a global and a zone in-process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from kds.config import load_config
from kds.daemon import ADMIN_TOKEN_FILE, ControlPlane, admin_token
from kds.errors import ConfigError

KDS_CP = Path(sys.executable).parent / "kds-cp"


def test_admin_token_is_created_private_and_kept(tmp_path):
    directory = tmp_path / "work"
    token = admin_token(directory)
    path = directory / ADMIN_TOKEN_FILE
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert admin_token(directory) == token  # a restart keeps it


def test_an_empty_admin_token_file_is_an_error_naming_it(tmp_path):
    (tmp_path / ADMIN_TOKEN_FILE).write_text("\n")
    with pytest.raises(ConfigError, match="admin-token is empty"):
        admin_token(tmp_path)


def _run(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("KDS_", "KUMA_"))}
    return subprocess.run(  # noqa: S603 -- our own program
        [str(KDS_CP), "run"],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_zone_without_a_global_address_stops_with_one_line(tmp_path):
    result = _run({"KUMA_MODE": "zone", "KUMA_MULTIZONE_ZONE_NAME": "zone-1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS" in lines[0]


def test_a_bad_boolean_stops_with_one_line_naming_the_variable(tmp_path):
    result = _run(
        {"KDS_GENERAL_WORK_DIR": str(tmp_path), "KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY": "yes"}
    )
    assert result.returncode == 2
    assert "KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_busy_api_port_is_one_line_not_a_traceback(tmp_path):
    with _listening() as port:
        result = _run(
            {
                "KDS_GENERAL_WORK_DIR": str(tmp_path),
                "KDS_STORE_TYPE": "memory",
                "KDS_API_PORT": str(port),
                "KDS_MULTIZONE_GLOBAL_KDS_GRPC_PORT": "0",
                "KDS_MULTIZONE_GLOBAL_KDS_ADDRESS": "127.0.0.1",
            }
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert str(port) in result.stderr.strip().splitlines()[-1]


class _listening:
    """A loopback port held open for the duration of a ``with``."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        port: int = self.socket.getsockname()[1]
        return port

    def __exit__(self, *exc_info: object) -> None:
        self.socket.close()


@pytest.mark.anyio
async def test_global_and_zone_in_process_replicate_and_report_status(tmp_path):
    common = {
        "KDS_STORE_TYPE": "memory",
        "KDS_API_PORT": "0",
        "KDS_SYNC_INSIGHT_INTERVAL": "0.2",
        "KDS_SYNC_RECONNECT_BASE": "0.05",
        "KDS_SYNC_RECONNECT_MAX": "0.5",
    }
    global_config = load_config(
        {
            **common,
            "KDS_GENERAL_WORK_DIR": str(tmp_path / "global"),
            "KDS_MULTIZONE_GLOBAL_KDS_ADDRESS": "127.0.0.1",
            "KDS_MULTIZONE_GLOBAL_KDS_GRPC_PORT": "0",
        }
    )
    global_plane = ControlPlane(global_config)
    async with anyio.create_task_group() as group, httpx.AsyncClient(timeout=5) as client:
        global_endpoints = await group.start(global_plane.run)
        assert global_endpoints.kds.startswith("grpcs://127.0.0.1:")
        assert global_endpoints.dp is None
        issued = await client.post(
            global_endpoints.api + "/tokens/zone", json={"zone": "zone-1", "scope": ["cp"]}
        )
        assert issued.status_code == 200, issued.text
        zone_config = load_config(
            {
                **common,
                "KDS_MODE": "zone",
                "KDS_GENERAL_WORK_DIR": str(tmp_path / "zone"),
                "KDS_MULTIZONE_ZONE_NAME": "zone-1",
                "KDS_MULTIZONE_ZONE_GLOBAL_ADDRESS": global_endpoints.kds,
                "KDS_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY": "true",
                "KDS_MULTIZONE_ZONE_KDS_CP_TOKEN": issued.text,
                "KDS_DP_SERVER_ADDRESS": "127.0.0.1",
                "KDS_DP_SERVER_PORT": "0",
            }
        )
        zone_plane = ControlPlane(zone_config)
        zone_endpoints = await group.start(zone_plane.run)
        assert zone_endpoints.dp is not None
        assert zone_endpoints.dp.startswith("https://127.0.0.1:")
        index = (await client.get(zone_endpoints.api + "/")).json()
        assert (index["mode"], index["zone"]) == ("zone", "zone-1")
        response = await client.put(
            global_endpoints.api + "/meshes/default", json={"type": "Mesh", "name": "default"}
        )
        assert response.status_code == 201, response.text
        with anyio.fail_after(30):
            while True:
                statuses = (await client.get(global_endpoints.api + "/status/zones")).json()
                meshes = (await client.get(zone_endpoints.api + "/meshes")).json()
                if statuses == [{"name": "zone-1", "active": True}] and meshes["total"] == 1:
                    break
                await anyio.sleep(0.05)
        shown = (await client.get(global_endpoints.api + "/config")).json()
        assert shown["mode"] == "global"
        shown = (await client.get(zone_endpoints.api + "/config")).json()
        assert shown["multizone"]["zone"]["kds"]["cpToken"] == "****"
        overview = (await client.get(global_endpoints.api + "/zones/zone-1/_overview")).json()
        subscription = overview["zoneInsight"]["subscriptions"][-1]
        assert subscription["backend"] == "memory"
        assert subscription["zoneInstanceId"] == zone_plane.instance_id
        group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_global_refuses_a_zone_without_a_token_by_default(tmp_path):
    common = {"KDS_STORE_TYPE": "memory", "KDS_API_PORT": "0", "KDS_SYNC_RECONNECT_MAX": "0.5"}
    global_plane = ControlPlane(
        load_config(
            {
                **common,
                "KDS_GENERAL_WORK_DIR": str(tmp_path / "global"),
                "KDS_MULTIZONE_GLOBAL_KDS_ADDRESS": "127.0.0.1",
                "KDS_MULTIZONE_GLOBAL_KDS_GRPC_PORT": "0",
            }
        )
    )
    async with anyio.create_task_group() as group:
        endpoints = await group.start(global_plane.run)
        zone_plane = ControlPlane(
            load_config(
                {
                    **common,
                    "KDS_MODE": "zone",
                    "KDS_GENERAL_WORK_DIR": str(tmp_path / "zone"),
                    "KDS_MULTIZONE_ZONE_NAME": "zone-1",
                    "KDS_MULTIZONE_ZONE_GLOBAL_ADDRESS": endpoints.kds,
                    "KDS_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY": "true",
                    "KDS_DP_SERVER_ADDRESS": "127.0.0.1",
                    "KDS_DP_SERVER_PORT": "0",
                }
            )
        )
        await group.start(zone_plane.run)
        assert global_plane.global_engine is not None
        assert zone_plane.zone_engine is not None
        with anyio.fail_after(30):
            while global_plane.global_engine.refusals < 2:  # noqa: ASYNC110 -- a counter, polled
                await anyio.sleep(0.05)
        assert "token" in (zone_plane.zone_engine.last_error or "")
        assert global_plane.global_engine.connected_zones == []
        group.cancel_scope.cancel()
