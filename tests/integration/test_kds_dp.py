"""``kds-dp run`` as a real process against a real dataplane server.

The server (:class:`DataplaneServer` of zone ``zone-1`` over a SQLite store, with a
real :class:`TokenVerifier` and tokens issued with :mod:`kds.tokens`) runs in the
test's event loop on a free port of 127.0.0.1; ``kds-dp`` is the installed console
script next to ``sys.executable``. Waits are conditions with deadlines, never pauses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import pytest

from kds import ResourceKey, Store, Upsert
from kds.dpserver import DataplaneServer
from kds.resource import LABEL_ORIGIN, ORIGIN_GLOBAL
from kds.tokens import TokenVerifier, issue_dataplane_token, issue_zone_token
from kds_stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

pytestmark = pytest.mark.anyio

KDS_DP = Path(sys.executable).parent / "kds-dp"
ZONE = "zone-1"
HOUR = timedelta(hours=1)
DEADLINE = 60.0  # seconds to wait for a condition (the machine may be busy); never a pause
INGRESS = """\
type: ZoneIngress
name: ingress-01
networking:
  address: 127.0.0.1 # address that is routable within the zone
  port: 10000
  advertisedAddress: 10.0.0.1 # an address which other zones can use to consume this zone-ingress
  advertisedPort: 10000 # a port which other zones can use to consume this zone-ingress
"""
INGRESS_KEY = ResourceKey("ZoneIngress", None, "ingress-01")
INGRESS_INSIGHT = ResourceKey("ZoneIngressInsight", None, "ingress-01")


async def eventually(
    condition: Callable[[], Awaitable[object]],
    *,
    what: str,
    within: float = DEADLINE,
    log: KdsDp | None = None,
) -> Any:
    """Poll *condition* until it returns something truthy; fail after *within* seconds.

    The failure shows the output of *log*'s process (as it is then).
    """
    try:
        with anyio.fail_after(within):
            while True:
                result = await condition()
                if result:
                    return result
                await anyio.sleep(0.05)
    except TimeoutError:
        output = f"; kds-dp's output:\n{log.output}" if log is not None else ""
        raise AssertionError(f"timed out after {within}s waiting for {what}{output}") from None


@attrs.frozen
class Zone:
    """A served dataplane server, its store and where files for kds-dp go."""

    store: Store
    server: DataplaneServer
    url: str
    files: Path

    @property
    def ca_file(self) -> Path:
        assert self.server.certificate_path is not None
        return self.server.certificate_path

    def file(self, name: str, text: str) -> Path:
        path = self.files / name
        path.write_text(text)
        return path

    async def token_file(self, *scopes: str, zone: str = ZONE) -> Path:
        token = await issue_zone_token(self.store, zone=zone, scopes=scopes, valid_for=HOUR)
        return self.file(f"token-{zone}-{'-'.join(scopes)}", token)

    async def subscriptions(self) -> list[dict[str, Any]]:
        insight = await self.store.find(INGRESS_INSIGHT)
        return [] if insight is None else list(insight.spec["subscriptions"])

    async def online(self) -> bool:
        return self.server.is_online(await self.store.find(INGRESS_INSIGHT))


@asynccontextmanager
async def zone_plane(tmp_path: Path, *, heartbeat_timeout: float = 30.0) -> AsyncIterator[Zone]:
    files = tmp_path / "files"
    files.mkdir()
    async with SQLiteStore(tmp_path / "zone.sqlite") as store:
        await store.commit(
            [Upsert(key=ResourceKey("Mesh", None, "default"), labels={LABEL_ORIGIN: ORIGIN_GLOBAL})]
        )
        server = DataplaneServer(
            store,
            zone=ZONE,
            verifier=TokenVerifier(store),
            work_dir=tmp_path / "work",
            heartbeat_timeout=heartbeat_timeout,
        )
        async with anyio.create_task_group() as group:
            url = await group.start(server.serve, "127.0.0.1", 0)
            yield Zone(store, server, url, files)
            group.cancel_scope.cancel()


class KdsDp:
    """One ``kds-dp run`` process; its stdout and stderr go to a log file."""

    def __init__(self, log: Path, *args: str | Path) -> None:
        self.log = log
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("KDS_", "KUMA_"))}
        with log.open("wb") as output:
            self.process = subprocess.Popen(  # noqa: S603 -- our own program
                [str(KDS_DP), "run", *map(str, args)],
                env=environ,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def exited(self) -> int:
        """Wait (with a deadline) for the process to exit; its status."""

        async def done() -> bool:
            return self.process.poll() is not None

        await eventually(done, what="kds-dp to exit", log=self)
        return self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextmanager
def kds_dp(zone: Zone, *args: str | Path, name: str = "kds-dp") -> Iterator[KdsDp]:
    process = KdsDp(zone.files / f"{name}.log", *args)
    try:
        yield process
    finally:
        process.stop()


def ingress_args(zone: Zone, token_file: Path, *, ca: bool = True) -> list[str | Path]:
    args: list[str | Path] = [
        "--proxy-type=ingress",
        f"--cp-address={zone.url}",
        f"--dataplane-token-file={token_file}",
        f"--dataplane-file={zone.file('ingress-dp.yaml', INGRESS)}",
    ]
    if ca:
        args.append(f"--ca-cert-file={zone.ca_file}")
    return args


async def refusal(zone: Zone, *args: str | Path) -> tuple[int, str]:
    """Run kds-dp expecting it to exit by itself: its status and its output."""
    with kds_dp(zone, *args) as process:
        status = await process.exited()
        return status, process.output


# -- running -----------------------------------------------------------------------------


async def test_an_ingress_heartbeats_and_a_sigterm_takes_it_offline_at_once(tmp_path):
    async with zone_plane(tmp_path) as zone:
        token = await zone.token_file("egress", "ingress")  # the workflow's token
        args = [*ingress_args(zone, token), "--heartbeat-interval=0.2"]
        with kds_dp(zone, *args) as process:
            await eventually(zone.online, what="the ingress to be online", log=process)
            first = (await zone.subscriptions())[-1]["lastSeen"]

            async def heartbeating() -> bool:
                return bool((await zone.subscriptions())[-1]["lastSeen"] > first)

            await eventually(heartbeating, what="a heartbeat")
            assert await zone.online()
            os.kill(process.process.pid, signal.SIGTERM)
            assert await process.exited() == 0, process.output
        # Offline as soon as it exited, long before the 30 s heartbeat timeout.
        [subscription] = await zone.subscriptions()
        assert subscription["disconnectTime"] is not None
        assert not await zone.online()
        assert "Traceback" not in process.output
        proxy = await zone.store.get(INGRESS_KEY)
        assert proxy.spec["networking"]["advertisedAddress"] == "10.0.0.1"


async def test_a_killed_ingress_goes_offline_after_the_heartbeat_timeout(tmp_path):
    async with zone_plane(tmp_path, heartbeat_timeout=2.0) as zone:
        token = await zone.token_file("ingress")
        with kds_dp(zone, *ingress_args(zone, token)) as process:
            await eventually(zone.online, what="the ingress to be online", log=process)
            process.stop()  # kill -9: no goodbye

            async def offline() -> bool:
                return not await zone.online()

            await eventually(offline, what="the killed ingress to go offline")
        # The server closed the subscription itself, for readers with any liveness.

        async def closed() -> bool:
            return (await zone.subscriptions())[-1]["disconnectTime"] is not None

        await eventually(closed, what="the silent subscription to be closed")


async def test_a_restarted_kds_dp_supersedes_its_old_subscription(tmp_path):
    async with zone_plane(tmp_path) as zone:
        token = await zone.token_file("ingress")
        with kds_dp(zone, *ingress_args(zone, token), name="first") as first:
            await eventually(zone.online, what="the ingress to be online", log=first)
            first.stop()
        with kds_dp(zone, *ingress_args(zone, token), name="second") as second:

            async def two() -> bool:
                return len(await zone.subscriptions()) == 2

            await eventually(two, what="a second subscription", log=second)
            older, newer = await zone.subscriptions()
            assert older["disconnectTime"] is not None
            assert newer["disconnectTime"] is None
            assert await zone.online()


async def test_a_dataplane_registers_with_a_dataplane_token(tmp_path):
    async with zone_plane(tmp_path) as zone:
        token = await issue_dataplane_token(zone.store, mesh="default", valid_for=HOUR)
        document = zone.file(
            "backend.yaml",
            "type: Dataplane\nname: backend-1\nnetworking:\n  address: 127.0.0.1\n"
            "  inbound:\n  - port: 8080\n    tags:\n      kuma.io/service: backend\n",
        )
        insight_key = ResourceKey("DataplaneInsight", "default", "backend-1")
        args = [
            "--proxy-type=dataplane",
            f"--cp-address={zone.url}",
            f"--dataplane-token-file={zone.file('dp-token', token)}",
            f"--dataplane-file={document}",
            f"--ca-cert-file={zone.ca_file}",
            "--mesh=default",
        ]
        with kds_dp(zone, *args) as process:

            async def online() -> bool:
                return zone.server.is_online(await zone.store.find(insight_key))

            await eventually(online, what="the dataplane to be online", log=process)


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "zone_name", "reason"),
    [
        (("cp",), ZONE, "zone token lacks scope 'ingress' (it has: cp)"),
        (("egress",), ZONE, "zone token lacks scope 'ingress' (it has: egress)"),
        (("ingress",), "zone-2", "zone token is for zone 'zone-2', not 'zone-1'"),
    ],
    ids=["wrong-scope", "egress-token-for-ingress", "other-zone"],
)
async def test_a_refused_token_ends_kds_dp_with_the_reason(tmp_path, scopes, zone_name, reason):
    async with zone_plane(tmp_path) as zone:
        token = await zone.token_file(*scopes, zone=zone_name)
        status, output = await refusal(zone, *ingress_args(zone, token))
        assert status == 1, output
        [error] = [line for line in output.splitlines() if line.startswith("kds-dp: error:")]
        assert reason in error
        assert "Traceback" not in output
        assert token.read_text() not in output
        assert await zone.store.find(INGRESS_KEY) is None


async def test_a_self_signed_server_without_ca_cert_file_names_the_option(tmp_path):
    async with zone_plane(tmp_path) as zone:
        token = await zone.token_file("ingress")
        status, output = await refusal(zone, *ingress_args(zone, token, ca=False))
        assert status == 1, output
        assert output.count("\n") == 1, output  # one line, no traceback
        assert output.startswith("kds-dp: error: ")
        assert "--ca-cert-file" in output
        assert "self-signed certificate" in output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            INGRESS.replace("  port: 10000\n", ""),
            "ingress-dp.yaml: networking.port: is required",
        ),
        (
            INGRESS.replace("port: 10000", "port: ten-thousand"),
            "ingress-dp.yaml: networking.port: must be a port number (an integer), got a string",
        ),
        (
            INGRESS.replace("type: ZoneIngress", "type: ZoneEgress"),
            "ingress-dp.yaml: type: must be ZoneIngress for proxy type 'ingress', got 'ZoneEgress'",
        ),
        (INGRESS.replace("name: ingress-01\n", ""), "ingress-dp.yaml: name: is required"),
        (
            INGRESS.replace("networking:", "netwroking:"),
            "ingress-dp.yaml: netwroking: unknown field; did you mean 'networking'?",
        ),
        (INGRESS + "  - oops\n", "ingress-dp.yaml: is not valid YAML"),
        ("", "ingress-dp.yaml: must hold exactly one proxy resource, found nothing"),
    ],
    ids=["missing-port", "bad-port", "wrong-type", "no-name", "typo", "not-yaml", "empty"],
)
async def test_a_bad_dataplane_file_is_named_with_its_field(tmp_path, text, message):
    async with zone_plane(tmp_path) as zone:
        token = await zone.token_file("ingress")
        args = ingress_args(zone, token)
        zone.file("ingress-dp.yaml", text)
        args[3] = f"--dataplane-file={zone.files / 'ingress-dp.yaml'}"
        status, output = await refusal(zone, *args)
        assert status == 2, output
        assert output.count("\n") == 1, output
        assert output.startswith("kds-dp: error: --dataplane-file ")
        assert message in output


async def test_options_that_cannot_work_are_refused_before_connecting(tmp_path):
    async with zone_plane(tmp_path) as zone:
        token = await zone.token_file("ingress")
        args = ingress_args(zone, token)
        cases: list[tuple[list[str | Path], str]] = [
            ([*args, "--mesh=default"], "ingress-dp.yaml: mesh: cannot be set"),
            ([*args, "--name=other"], "name: the file says 'ingress-01', but 'other'"),
            (
                [*args[:1], "--cp-address=http://127.0.0.1:1", *args[2:]],
                "--cp-address: must be the https:// URL",
            ),
            (
                [*args[:-1], f"--ca-cert-file={zone.files / 'missing.crt'}"],
                "--ca-cert-file: CA certificate file",
            ),
            (
                [*args[:2], f"--dataplane-token-file={zone.files / 'missing'}", *args[3:]],
                "--dataplane-token-file",
            ),
        ]
        for case_args, fragment in cases:
            status, output = await refusal(zone, *case_args)
            assert status == 2, output
            assert output.count("\n") == 1, output
            assert fragment in output, output
