"""kdsctl's pieces that need no control plane: its configuration file, durations, tables."""

from __future__ import annotations

import re
import stat
from datetime import UTC, datetime, timedelta

import pytest

from kds.cli.ctl import (
    ControlPlaneEntry,
    CtlConfig,
    ago,
    human_duration,
    load_ctl_config,
    render_table,
    save_ctl_config,
)
from kds.client import ApiError, ControlPlaneClient, InvalidParameter
from kds.errors import ConfigError, ValidationError

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


# -- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "shown"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=3), "3s"),
        (timedelta(seconds=59.9), "59s"),
        (timedelta(seconds=60), "1m"),
        (timedelta(minutes=2, seconds=59), "2m"),
        (timedelta(minutes=59, seconds=59), "59m"),
        (timedelta(hours=1), "1h"),
        (timedelta(hours=23, minutes=59), "23h"),
        (timedelta(hours=24), "1d"),
        (timedelta(days=5, hours=23), "5d"),
        (timedelta(days=364), "364d"),
        (timedelta(days=365), "1y"),
        (timedelta(days=800), "2y"),
        # Clock skew: a moment up to a second or so ahead is "0s"; further ahead, kumactl's
        # "never".
        (timedelta(seconds=-0.5), "0s"),
        (timedelta(seconds=-1.9), "0s"),
        (timedelta(seconds=-2), "never"),
    ],
)
def test_human_duration_shows_whole_units_like_kumactl(delta, shown):
    assert human_duration(delta) == shown


def test_ago_reads_the_api_times_and_says_never_without_one():
    assert ago(None, NOW) == "never"
    assert ago("", NOW) == "never"
    assert ago("not a time", NOW) == "never"
    assert ago("2024-05-01T10:00:00Z", NOW) == "2h"
    assert ago("2024-05-01T11:59:57.250000+00:00", NOW) == "2s"
    assert ago("2024-05-01T13:00:00+02:00", NOW) == "1h"
    assert ago("2024-04-26T12:00:00", NOW) == "5d"  # naive: taken as UTC
    assert ago(NOW - timedelta(minutes=3), NOW) == "3m"


# -- tables --------------------------------------------------------------------------------


def test_tables_pad_columns_three_spaces_apart_without_trailing_spaces():
    table = render_table(
        ["MESH", "NAME", "AGE"], [["default", "example", "2m"], ["playground", "demo", ""]]
    )
    assert table == ("MESH         NAME      AGE\ndefault      example   2m\nplayground   demo\n")
    assert render_table(["NAME", "AGE"], []) == "NAME   AGE\n"


# -- the configuration file ----------------------------------------------------------------


def test_without_a_file_the_local_control_plane_is_active(tmp_path):
    config = load_ctl_config(tmp_path / "missing" / "config")
    assert config == CtlConfig.default()
    assert config.active() == ControlPlaneEntry("local", "http://127.0.0.1:5681")


def test_saved_configuration_reads_back_and_only_its_owner_can_read_it(tmp_path):
    path = tmp_path / "dir" / "config"
    entry = ControlPlaneEntry(
        "global",
        "https://global.example:5682",
        ca_cert_file="/etc/kds/ca.crt",
        skip_verify=False,
        auth_token_file="/etc/kds/token",  # noqa: S106 -- a file name, not a token
    )
    config = CtlConfig.default().with_control_plane(entry)
    save_ctl_config(config, path)
    assert load_ctl_config(path) == config
    assert config.current == "global"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["config"]  # no temporary file left


def test_a_kumactl_style_file_with_contexts_is_read(tmp_path):
    path = tmp_path / "config"
    path.write_text(
        "contexts:\n"
        "- name: prod\n"
        "  controlPlane: prod-global\n"
        "controlPlanes:\n"
        "- name: prod-global\n"
        "  coordinates:\n"
        "    apiServer:\n"
        "      url: http://10.0.0.1:5681\n"
        "      skipVerify: true\n"
        "currentContext: prod\n"
    )
    config = load_ctl_config(path)
    assert config.active() == ControlPlaneEntry(
        "prod-global", "http://10.0.0.1:5681", skip_verify=True
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("controlPlanes: [\n  {name: a,\n", "invalid YAML at line 3"),
        ("- a\n", "the top level: must be a mapping, got list"),
        ("currentcontext: a\n", "the top level: unknown key 'currentcontext'"),
        ("controlPlanes: {}\n", "controlPlanes: must be a list, got dict"),
        ("controlPlanes:\n- coordinates: {apiServer: {url: x}}\n", "controlPlanes[0].name"),
        ("controlPlanes:\n- name: a\n", "controlPlanes[0].coordinates.apiServer.url"),
        (
            "controlPlanes:\n- name: a\n  coordinates: {apiServer: {url: x, skipVerify: yes}}\n",
            "controlPlanes[0].coordinates.apiServer.skipVerify: must be true or false",
        ),
        (
            "controlPlanes:\n- name: a\n  coordinates: {apiServer: {url: x, token: t}}\n",
            "controlPlanes[0].coordinates.apiServer: unknown key 'token'",
        ),
        (
            "controlPlanes:\n"
            "- {name: a, coordinates: {apiServer: {url: x}}}\n"
            "- {name: a, coordinates: {apiServer: {url: y}}}\n",
            "controlPlanes[1].name: 'a' is defined twice",
        ),
        ("currentContext: nowhere\n", "currentContext: 'nowhere' names no control plane"),
    ],
)
def test_a_bad_configuration_file_is_named_with_the_field(tmp_path, text, message):
    path = tmp_path / "config"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_ctl_config(path)
    assert str(caught.value).startswith(f"config file {path}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_empty_file_has_no_active_control_plane(tmp_path):
    path = tmp_path / "config"
    path.write_text("")
    with pytest.raises(ConfigError, match="no active control plane"):
        load_ctl_config(path).active()


def test_removing_the_active_control_plane_leaves_none_active():
    config = CtlConfig.default().with_control_plane(ControlPlaneEntry("b", "http://b"))
    assert config.without("local").current == "b"
    assert config.without("b").current is None
    assert [cp.name for cp in config.without("b").control_planes] == ["local"]


def test_an_unusable_token_file_is_named(tmp_path):
    missing = tmp_path / "token"
    with pytest.raises(ConfigError, match=f"auth token file {missing}: cannot be read"):
        ControlPlaneEntry("a", "http://127.0.0.1:1", auth_token_file=str(missing)).client()
    missing.write_text("\n")
    with pytest.raises(ConfigError, match=f"auth token file {missing}: is empty"):
        ControlPlaneEntry("a", "http://127.0.0.1:1", auth_token_file=str(missing)).client()
    # A file that is not a token (a wrong path given) is refused without showing it.
    missing.write_text("first-secret-line\nsecond-secret-line\n")
    with pytest.raises(ConfigError) as caught:
        ControlPlaneEntry("a", "http://127.0.0.1:1", auth_token_file=str(missing)).client()
    assert str(caught.value) == (
        f"auth token file {missing}: the token must be one line of printable ASCII "
        "characters without spaces"
    )


def test_an_address_that_is_not_an_http_url_is_refused():
    with pytest.raises(ConfigError, match="control plane 'a': 'localhost:5681' is not an http"):
        ControlPlaneEntry("a", "localhost:5681").client()
    with pytest.raises(ValidationError, match="address"):
        ControlPlaneClient("grpcs://127.0.0.1:5685")
    with pytest.raises(ValidationError, match=re.escape("address: 'http://127.0.0.1:56a1': Port")):
        ControlPlaneClient("http://127.0.0.1:56a1")


# -- client errors -------------------------------------------------------------------------


def test_api_errors_print_as_one_line_with_every_invalid_parameter():
    error = ApiError(
        400,
        "Bad Request",
        "Resource is not valid",
        (
            InvalidParameter("spec.targetRef", "must be an object"),
            InvalidParameter(
                'labels["kuma.io/origin"]', "the origin label must be set to 'global'"
            ),
        ),
    )
    assert str(error) == (
        "Bad Request: Resource is not valid (spec.targetRef: must be an object; "
        "labels[\"kuma.io/origin\"]: the origin label must be set to 'global')"
    )
    assert str(ApiError(404, "Not found", "Not found")) == "Not found"
    repeated = ApiError(
        400, "Invalid request", "name: is required", (InvalidParameter("name", "is required"),)
    )
    assert str(repeated) == "Invalid request: name: is required"
    assert str(ApiError(503, "", "store\nunavailable")) == "HTTP 503: store unavailable"
