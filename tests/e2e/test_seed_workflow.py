"""The multi-zone deployment guide's universal steps, as written, with our binary names.

A PostgreSQL global (``kds-cp migrate up``, then ``kds-cp run`` with the guide's
``KUMA_*`` variables), two SQLite zones authenticated with zone tokens, zone ingress and
egress registered by ``kds-dp`` from the guide's YAML, a service of one zone seen from the
other, and the guide's zone deletion and disabling.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import TYPE_CHECKING

import pytest

from kds.resource import hashed_name
from kds.testing._server import free_port
from kds.testing.postgres import PostgresServer
from tests.e2e.processes import BIN, ControlPlane, kdsctl, run_kdsctl, tail, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.crash

PASSWORD = "seed-Pa55word"  # noqa: S105 -- the test server's password

INGRESS = """\
type: ZoneIngress
name: ingress-01
networking:
  address: 127.0.0.1 # address that is routable within the zone
  port: 10000
  advertisedAddress: 10.0.0.1 # an address which other zones can use to consume this zone-ingress
  advertisedPort: 10000 # a port which other zones can use to consume this zone-ingress
"""

EGRESS = """\
type: ZoneEgress
name: zoneegress-01
networking:
  address: 127.0.0.1 # address that is routable within the zone
  port: 10002
"""

MESH = """\
type: Mesh
name: default
mtls:
  enabledBackend: ca-1
  backends:
    - name: ca-1
      type: builtin
"""

DATAPLANE = """\
type: Dataplane
mesh: default
name: echo-server-01
networking:
  address: 127.0.0.1
  inbound:
    - port: 1010
      tags:
        kuma.io/service: echo-server_echo-example_svc_1010
"""


class Proxy:
    """A ``kds-dp run`` process."""

    def __init__(self, work: Path, name: str, args: list[str]) -> None:
        self.log = work / f"{name}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 -- our own program
                [str(BIN / "kds-dp"), "run", *args], stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def postgres(tmp_path) -> Iterator[PostgresServer]:
    with PostgresServer(password=PASSWORD) as server:
        yield server


def test_the_seed_workflow(postgres, tmp_path):
    store_env = {
        "KUMA_STORE_TYPE": "postgres",
        "KUMA_STORE_POSTGRES_HOST": postgres.host,
        "KUMA_STORE_POSTGRES_PORT": str(postgres.port),
        "KUMA_STORE_POSTGRES_USER": postgres.user,
        "KUMA_STORE_POSTGRES_PASSWORD": PASSWORD,
        "KUMA_STORE_POSTGRES_DB_NAME": "postgres",
    }
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("KDS_", "KUMA_"))}
    migrate = subprocess.run(  # noqa: S603 -- our own program
        [str(BIN / "kds-cp"), "migrate", "up"],
        env={**environ, **store_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr

    kds_port = free_port()
    global_ = ControlPlane(
        "global",
        tmp_path / "global",
        {
            "KUMA_MODE": "global",
            "KUMA_ENVIRONMENT": "universal",
            **store_env,
            "KUMA_MULTIZONE_GLOBAL_KDS_GRPC_PORT": str(kds_port),
            "KDS_MULTIZONE_GLOBAL_KDS_ADDRESS": "127.0.0.1",
        },
    )
    config = tmp_path / "kdsctl.yaml"
    planes: list[ControlPlane] = [global_]
    proxies: list[Proxy] = []
    try:
        global_.start()
        kdsctl(
            config,
            "config",
            "control-planes",
            "add",
            "--name",
            "global-control-plane",
            "--address",
            global_.api,
        )
        kdsctl(config, "apply", "-f", "-", stdin=MESH)

        # Zone control planes, authenticated: the one step the guide does not have.
        zones: dict[str, ControlPlane] = {}
        dp_ports: dict[str, int] = {}
        for name in ("zone-1", "zone-2"):
            token = tmp_path / f"{name}-cp-token"
            token.write_text(
                kdsctl(config, "generate", "zone-token", f"--zone={name}", "--scope", "cp")
            )
            dp_ports[name] = free_port()
            zones[name] = ControlPlane(
                name,
                tmp_path / name,
                {
                    "KUMA_MODE": "zone",
                    "KUMA_MULTIZONE_ZONE_NAME": name,
                    "KUMA_ENVIRONMENT": "universal",
                    "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS": f"grpcs://127.0.0.1:{kds_port}",
                    "KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY": "true",
                    "KDS_MULTIZONE_ZONE_KDS_CP_TOKEN_PATH": str(token),
                    "KDS_DP_SERVER_ADDRESS": "127.0.0.1",
                    "KUMA_DP_SERVER_PORT": str(dp_ports[name]),
                },
            )
            planes.append(zones[name])
            zones[name].start()
        logs = tuple(plane.log for plane in planes)

        # The zone proxy token, and ingress and egress registered with each zone.
        (tmp_path / "ingress-dp.yaml").write_text(INGRESS)
        (tmp_path / "zoneegress-dataplane.yaml").write_text(EGRESS)
        for name, zone in zones.items():
            zone_token = tmp_path / f"{name}-zone-token"
            zone_token.write_text(
                kdsctl(
                    config,
                    "generate",
                    "zone-token",
                    f"--zone={name}",
                    "--scope",
                    "egress",
                    "--scope",
                    "ingress",
                )
            )
            for proxy_type, file in (
                ("ingress", "ingress-dp.yaml"),
                ("egress", "zoneegress-dataplane.yaml"),
            ):
                proxies.append(
                    Proxy(
                        tmp_path,
                        f"{name}-{proxy_type}",
                        [
                            f"--proxy-type={proxy_type}",
                            f"--cp-address=https://127.0.0.1:{dp_ports[name]}",
                            f"--dataplane-token-file={zone_token}",
                            f"--ca-cert-file={zone.work_dir / 'kds-cp.crt'}",
                            f"--dataplane-file={tmp_path / file}",
                        ],
                    )
                )
        logs += tuple(proxy.log for proxy in proxies)

        # kdsctl get zones lists both; both are Online.
        def zone_rows() -> dict[str, str]:
            rows = kdsctl(config, "inspect", "zones").splitlines()[1:]
            return {row.split()[0]: row.split()[1] for row in rows}

        wait_for(
            lambda: zone_rows() == {"zone-1": "Online", "zone-2": "Online"},
            what="both zones Online",
            logs=logs,
        )
        listed = kdsctl(config, "get", "zones").splitlines()
        assert listed[0].split() == ["NAME", "AGE"]
        assert sorted(row.split()[0] for row in listed[1:]) == ["zone-1", "zone-2"]

        # Each zone's ingress reaches the other zone.
        zone1_ingress = hashed_name("", "ingress-01", "zone-1")
        wait_for(
            lambda: zone1_ingress in _names(zones["zone-2"], "/zoneingresses"),
            what="zone-1's ingress in zone-2",
            logs=logs,
        )

        # A service in zone-2, seen from zone-1 with `kdsctl inspect services`.
        dataplane_token = tmp_path / "dataplane-token"
        dataplane_token.write_text(
            kdsctl(config, "generate", "dataplane-token", "--mesh", "default")
        )
        (tmp_path / "dataplane.yaml").write_text(DATAPLANE)
        wait_for(
            lambda: "default" in _names(zones["zone-2"], "/meshes"),
            what="the mesh in zone-2",
            logs=logs,
        )
        proxies.append(
            Proxy(
                tmp_path,
                "zone-2-dataplane",
                [
                    "--proxy-type=dataplane",
                    f"--cp-address=https://127.0.0.1:{dp_ports['zone-2']}",
                    f"--dataplane-token-file={dataplane_token}",
                    f"--ca-cert-file={zones['zone-2'].work_dir / 'kds-cp.crt'}",
                    f"--dataplane-file={tmp_path / 'dataplane.yaml'}",
                ],
            )
        )
        logs += (proxies[-1].log,)
        kdsctl(
            config,
            "config",
            "control-planes",
            "add",
            "--name",
            "zone-1",
            "--address",
            zones["zone-1"].api,
        )

        def services() -> list[list[str]]:
            return [row.split() for row in kdsctl(config, "inspect", "services").splitlines()]

        try:
            wait_for(
                lambda: ["echo-server_echo-example_svc_1010", "Online", "1/1"] in services(),
                what="zone-2's service in zone-1's inspect services",
                logs=logs,
            )
        except AssertionError as exc:
            state = {
                path: global_.get(path)
                for path in ("/service-insights", "/dataplanes", "/dataplane-insights")
            }
            zone_state = zones["zone-1"].get("/service-insights")
            raise AssertionError(
                f"on the global: {state}; in zone-1: {zone_state}; inspect: {services()}"
            ) from exc
        assert services()[0] == ["SERVICE", "STATUS", "DATAPLANES"]
        kdsctl(config, "config", "control-planes", "switch", "--name", "global-control-plane")

        # Deleting a connected zone is refused with Kuma's message.
        refused = run_kdsctl(config, "delete", "zone", "zone-1")
        assert refused.returncode != 0
        assert (
            "zone: unable to delete Zone, Zone CP is still connected, please shut it down first"
            in refused.stderr
        )

        # Disabling zone-1: its ingress leaves zone-2, and it shows Offline.
        kdsctl(config, "apply", "-f", "-", stdin="type: Zone\nname: zone-1\nenabled: false\n")
        wait_for(
            lambda: zone1_ingress not in _names(zones["zone-2"], "/zoneingresses"),
            what="zone-1's ingress gone from zone-2",
            logs=logs,
        )
        wait_for(lambda: zone_rows()["zone-1"] == "Offline", what="zone-1 Offline", logs=logs)

        # Once zone-1 is shut down, deleting it removes what it published everywhere.
        for proxy in proxies:
            if "zone-1" in proxy.log.name:
                proxy.stop()
        assert zones["zone-1"].stop() == 0
        kdsctl(config, "delete", "zone", "zone-1")
        assert "zone-1" not in zone_rows()
        for path in ("/zoneingresses", "/zoneegresses", "/zone-ingress-insights"):
            assert not any(
                item.get("labels", {}).get("kuma.io/zone") == "zone-1"
                for item in global_.get(path)["items"]
            ), path
        assert zone1_ingress not in _names(zones["zone-2"], "/zoneingresses")
    except BaseException:
        for proxy in proxies:
            print(f"--- {proxy.log}\n{tail(proxy.log)}")  # noqa: T201 -- shown on failure
        raise
    finally:
        for proxy in proxies:
            proxy.process.kill()
            proxy.process.wait()
        for plane in planes:
            plane.kill()


def _names(plane: ControlPlane, path: str) -> set[str]:
    return {item["name"] for item in plane.get(path)["items"]}
