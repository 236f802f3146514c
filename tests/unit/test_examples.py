"""The examples are documentation: run them as a user would and check what they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[2] / "examples"


def _run(name: str, *args: str) -> str:
    result = subprocess.run(  # noqa: S603 -- our own example with our own interpreter
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quickstart(tmp_path):
    out = _run("quickstart.py", str(tmp_path / "kds.sqlite"))
    assert "conflict, as expected" in out
    assert "revision 1: upserted Mesh/default" in out
    assert "revision 4: deleted MeshTimeout/default/default-timeout" in out


def test_custom_resource_type():
    out = _run("custom_resource_type.py")
    assert "FeatureFlag" in out
    assert "refused: changes[0].spec.enabled: must be a boolean, got str" in out


def test_replicate_in_process(tmp_path):
    out = _run("replicate_in_process.py", str(tmp_path))
    assert "MeshTimeout/default/timeouts-" in out  # the hash-suffix name in the zones
    zone1 = out.split("zone-1:")[1].split("zone-2:")[0]
    assert "ZoneIngress/ingress-zone-1  origin=zone zone=-" in zone1  # its own, untouched
    assert "origin=global zone=zone-2" in zone1  # zone-2's, via the global
    assert "origin=zone zone=zone-1" not in zone1  # never its own back
