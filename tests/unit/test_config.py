"""kds.config: defaults, file, environment, Kuma's names, strictness, secrets, docs, CLI."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import types
from pathlib import Path

import attrs
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from kds import ConfigError, ResourceKey, Upsert
from kds.cli import cp
from kds.cli.cp import main
from kds.config import (
    MASK,
    ApiConfig,
    KdsConfig,
    Setting,
    all_settings,
    create_store,
    global_kds_address,
    grpc_client,
    grpc_server,
    load_config,
    nats_client,
    nats_server,
    postgres_settings,
    render_defaults_yaml,
    render_docs,
    render_yaml,
    sqlite_path,
    sync_options,
    validate_config,
    work_dir,
)
from kds.sync import SyncOptions
from kds_stores.postgres import PostgresSettings
from kds_stores.sqlite import SQLiteStore

DOCS = Path(__file__).parents[2] / "docs" / "config.md"
SECRET = "s3cr3t-Pa55w0rd"  # noqa: S105 -- a test value, looked for in every output

ZONE = {
    "KUMA_MODE": "zone",
    "KUMA_MULTIZONE_ZONE_NAME": "zone-1",
    "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS": "grpcs://global.example:5685",
}


def setting(key: str) -> Setting:
    return next(s for s in all_settings() if s.key == key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kds.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error(environ=None, text: str | None = None, tmp_path: Path | None = None) -> str:
    """The message of the ConfigError loading raises; it must be a single line."""
    path = None
    if text is not None:
        assert tmp_path is not None
        path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(environ or {}, path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def evolve(config, path: tuple[str, ...], value):
    """*config* with the attribute at *path* (attribute names) replaced."""
    name, *rest = path
    if rest:
        value = evolve(getattr(config, name), tuple(rest), value)
    return attrs.evolve(config, **{name: value})


# -- defaults ------------------------------------------------------------------------


def test_no_configuration_at_all_is_a_global_on_sqlite_in_the_work_dir():
    config = load_config({})
    assert config == KdsConfig()
    assert config.mode == "global"
    assert config.environment == "universal"
    assert config.store.type == "sqlite"
    assert sqlite_path(config) == Path("~/.kds/kds.db").expanduser()
    assert work_dir(config) == Path("~/.kds").expanduser()
    assert config.multizone.global_.kds.grpc_port == 5685
    assert config.api.port == 5681
    assert config.api.address == "127.0.0.1"
    assert global_kds_address(config) == "grpcs://0.0.0.0:5685"


@pytest.mark.anyio
async def test_the_default_store_is_a_working_sqlite_file_in_the_work_dir(tmp_path):
    config = load_config({"KDS_GENERAL_WORK_DIR": str(tmp_path / "work")})
    store = create_store(config)
    assert isinstance(store, SQLiteStore)
    async with store:
        await store.commit([Upsert(key=ResourceKey("Mesh", None, "default"), spec={})])
        assert (await store.get(ResourceKey("Mesh", None, "default"))).version == 1
    assert (tmp_path / "work" / "kds.db").is_file()


def test_sqlite_path_can_be_set():
    config = load_config({"KDS_STORE_SQLITE_PATH": "/data/store.db"})
    assert sqlite_path(config) == Path("/data/store.db")


def test_the_library_never_reads_os_environ(monkeypatch):
    monkeypatch.setenv("KDS_MODE", "zone")
    monkeypatch.setenv("KDS_NO_SUCH_SETTING", "1")
    assert load_config({}) == KdsConfig()


# -- precedence ----------------------------------------------------------------------


def test_file_overrides_defaults_and_environment_overrides_file(tmp_path):
    path = write(
        tmp_path,
        "store:\n  postgres:\n    port: 6432\n    user: from-file\napi:\n  port: 8081\n",
    )
    config = load_config({"KDS_STORE_POSTGRES_PORT": "7432"}, path)
    assert config.store.postgres.port == 7432  # env > file
    assert config.store.postgres.user == "from-file"  # file > default
    assert config.api.port == 8081
    assert config.store.postgres.db_name == "kds"  # default


def test_overrides_win_over_the_environment(tmp_path):
    path = write(tmp_path, "store:\n  postgres:\n    host: file-host\n")
    config = load_config(
        {"KUMA_STORE_POSTGRES_HOST": "env-host"}, path, overrides={"store.postgres.host": "cli"}
    )
    assert config.store.postgres.host == "cli"
    assert "store.postgres.port (command line)" in error_with_overrides({"store.postgres.port": 0})


def error_with_overrides(overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config({}, overrides=overrides)
    return str(info.value)


def test_kuma_style_camel_case_keys_are_read(tmp_path):
    path = write(
        tmp_path,
        """
mode: zone
environment: universal
general:
  workDir: /var/lib/kds
store:
  type: postgres
  postgres:
    host: db
    dbName: kuma
    tls:
      mode: verifyNone
      disableSSLSNI: true
multizone:
  global:
    kds:
      grpcPort: 15685
  zone:
    name: zone-1
    globalAddress: grpcs://global:5685
    kds:
      tlsSkipVerify: true
""",
    )
    config = load_config({}, path)
    assert config.mode == "zone"
    assert config.general.work_dir == "/var/lib/kds"
    assert config.store.postgres.db_name == "kuma"
    assert config.store.postgres.tls.disable_sslsni is True
    assert config.multizone.global_.kds.grpc_port == 15685
    assert config.multizone.zone.global_address == "grpcs://global:5685"
    assert config.multizone.zone.kds.tls_skip_verify is True


def test_quoted_numbers_in_the_file_are_read_like_environment_values(tmp_path):
    # Kuma's Helm values write `port: "5432"`.
    config = load_config({}, write(tmp_path, 'store:\n  postgres:\n    port: "6543"\n'))
    assert config.store.postgres.port == 6543


def test_an_empty_file_and_empty_sections_are_the_defaults(tmp_path):
    assert load_config({}, write(tmp_path, "")) == KdsConfig()
    assert load_config({}, write(tmp_path, "store:\nmultizone:\n  zone:\n")) == KdsConfig()


def test_an_empty_yaml_value_leaves_a_string_unset(tmp_path):
    text = "multizone:\n  global:\n    kds:\n      tlsCertFile:\n"
    assert load_config({}, write(tmp_path, text)).multizone.global_.kds.tls_cert_file == ""


# -- Kuma's names --------------------------------------------------------------------

KUMA_ALIASES = [
    ("KUMA_MODE", "zone", ("mode",), "zone"),
    ("KUMA_ENVIRONMENT", "universal", ("environment",), "universal"),
    ("KUMA_STORE_TYPE", "memory", ("store", "type"), "memory"),
    ("KUMA_STORE_POSTGRES_HOST", "db.example", ("store", "postgres", "host"), "db.example"),
    ("KUMA_STORE_POSTGRES_PORT", "15432", ("store", "postgres", "port"), 15432),
    ("KUMA_STORE_POSTGRES_USER", "kuma", ("store", "postgres", "user"), "kuma"),
    ("KUMA_STORE_POSTGRES_PASSWORD", SECRET, ("store", "postgres", "password"), SECRET),
    ("KUMA_STORE_POSTGRES_DB_NAME", "kuma", ("store", "postgres", "db_name"), "kuma"),
    (
        "KUMA_STORE_POSTGRES_TLS_MODE",
        "verifyNone",
        ("store", "postgres", "tls", "mode"),
        "verifyNone",
    ),
    ("KUMA_MULTIZONE_ZONE_NAME", "zone-7", ("multizone", "zone", "name"), "zone-7"),
    (
        "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS",
        "grpcs://10.0.0.1:5685",
        ("multizone", "zone", "global_address"),
        "grpcs://10.0.0.1:5685",
    ),
    (
        "KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY",
        "true",
        ("multizone", "zone", "kds", "tls_skip_verify"),
        True,
    ),
    (
        "KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE",
        "/etc/kds/ca.pem",
        ("multizone", "zone", "kds", "root_ca_file"),
        "/etc/kds/ca.pem",
    ),
    (
        "KUMA_MULTIZONE_GLOBAL_KDS_GRPC_PORT",
        "15685",
        ("multizone", "global_", "kds", "grpc_port"),
        15685,
    ),
    ("KUMA_GENERAL_WORK_DIR", "/var/lib/kds", ("general", "work_dir"), "/var/lib/kds"),
]


@pytest.mark.parametrize("prefix", ["KUMA_", "KDS_"])
@pytest.mark.parametrize(
    ("name", "text", "path", "value"), KUMA_ALIASES, ids=[a[0] for a in KUMA_ALIASES]
)
def test_each_kuma_name_and_its_kds_name_set_the_same_setting(prefix, name, text, path, value):
    environ = {prefix + name.removeprefix("KUMA_"): text}
    if path == ("mode",):
        environ |= {k: v for k, v in ZONE.items() if k != "KUMA_MODE"}
    config = load_config(environ)
    got = config
    for attribute in path:
        got = getattr(got, attribute)
    assert got == value


def test_the_seed_workflow_global_runs_as_written():
    config = load_config(
        {
            "KUMA_MODE": "global",
            "KUMA_ENVIRONMENT": "universal",
            "KUMA_STORE_TYPE": "postgres",
            "KUMA_STORE_POSTGRES_HOST": "pg.internal",
            "KUMA_STORE_POSTGRES_PORT": "5433",
            "KUMA_STORE_POSTGRES_USER": "kuma",
            "KUMA_STORE_POSTGRES_PASSWORD": SECRET,
            "KUMA_STORE_POSTGRES_DB_NAME": "kuma",
            # Settings kds does not implement are ignored, as in any seed environment.
            "KUMA_DP_SERVER_PORT": "5678",
        }
    )
    settings = postgres_settings(config)
    assert (settings.host, settings.port, settings.user, settings.db_name) == (
        "pg.internal",
        5433,
        "kuma",
        "kuma",
    )
    assert settings.password == SECRET
    assert SECRET not in repr(config)


def test_the_seed_workflow_zone_runs_as_written():
    config = load_config(
        {
            **ZONE,
            "KUMA_ENVIRONMENT": "universal",
            "KUMA_STORE_TYPE": "memory",
            "KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY": "true",
        }
    )
    transport = grpc_client(config)
    assert transport.address == "grpcs://global.example:5685"
    assert transport.client_options.zone == "zone-1"
    assert transport.client_options.skip_verify is True


def test_kds_and_kuma_names_set_to_different_values_is_an_error():
    message = error({"KDS_STORE_POSTGRES_HOST": "a", "KUMA_STORE_POSTGRES_HOST": "b"})
    assert "KDS_STORE_POSTGRES_HOST" in message
    assert "KUMA_STORE_POSTGRES_HOST" in message


def test_kds_and_kuma_names_set_to_the_same_value_agree():
    environ = {"KDS_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY": "true"}
    environ["KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY"] = "1"  # the same boolean
    assert load_config(environ).multizone.zone.kds.tls_skip_verify is True


def test_conflicting_secrets_are_not_shown():
    message = error({"KDS_STORE_POSTGRES_PASSWORD": SECRET, "KUMA_STORE_POSTGRES_PASSWORD": "x"})
    assert "KDS_STORE_POSTGRES_PASSWORD" in message
    assert SECRET not in message


def test_kuma_tls_version_names_are_accepted(tmp_path):
    config = load_config({"KUMA_MULTIZONE_GLOBAL_KDS_TLS_MIN_VERSION": "TLSv1_3"})
    assert config.multizone.global_.kds.tls_min_version == "1.3"
    text = "multizone:\n  global:\n    kds:\n      tlsMinVersion: 1.3\n"
    assert load_config({}, write(tmp_path, text)).multizone.global_.kds.tls_min_version == "1.3"


# -- strict values -------------------------------------------------------------------

BOOL = "KDS_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("1", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
    ],
)
def test_booleans_are_true_false_1_or_0_in_any_case(text, value):
    assert load_config({BOOL: text}).multizone.zone.kds.tls_skip_verify is value


@pytest.mark.parametrize("text", ["yes", "no", "on", "off", "y", "2", "", "truthy", "-1"])
def test_other_booleans_are_refused(text):
    message = error({BOOL: text})
    assert message.startswith(f"{BOOL} (multizone.zone.kds.tlsSkipVerify): expected true or false")
    assert repr(text) in message


@given(st.text(max_size=10).filter(lambda t: t.strip().lower() not in ("true", "false", "1", "0")))
def test_any_other_boolean_text_is_refused(text):
    with pytest.raises(ConfigError, match=BOOL):
        load_config({BOOL: text})


@pytest.mark.parametrize("word", ["yes", "no", "on", "off"])
def test_yaml_1_1_booleans_are_refused_in_the_file(tmp_path, word):
    text = f"multizone:\n  zone:\n    kds:\n      tlsSkipVerify: {word}\n"
    message = error(text=text, tmp_path=tmp_path)
    assert message.startswith("multizone.zone.kds.tlsSkipVerify in ")
    assert f"got {word!r}" in message


def test_yaml_1_1_booleans_stay_strings_where_strings_are_expected(tmp_path):
    # YAML 1.1 would make this zone's name False.
    config = load_config({"KDS_MODE": "zone"}, write(tmp_path, ZONE_FILE.format(name="no")))
    assert config.multizone.zone.name == "no"


ZONE_FILE = "multizone:\n  zone:\n    name: {name}\n    globalAddress: global:5685\n"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"KDS_STORE_POSTGRES_PORT": "abc"},
            "KDS_STORE_POSTGRES_PORT (store.postgres.port): expected an integer, got 'abc'",
        ),
        ({"KDS_STORE_POSTGRES_PORT": "54.32"}, "expected an integer"),
        (
            {"KUMA_STORE_POSTGRES_PORT": "70000"},
            "KUMA_STORE_POSTGRES_PORT (store.postgres.port): must be at most 65535, got 70000",
        ),
        ({"KDS_STORE_POSTGRES_PORT": "0"}, "must be at least 1"),
        ({"KDS_API_PORT": "-1"}, "KDS_API_PORT (api.port): must be at least 0"),
        ({"KDS_SYNC_WINDOW": "0"}, "KDS_SYNC_WINDOW (sync.window): must be at least 1"),
        (
            {"KDS_MODE": "standalone"},
            "KDS_MODE (mode): expected one of global, zone, got 'standalone'",
        ),
        (
            {"KUMA_STORE_TYPE": "mysql"},
            "KUMA_STORE_TYPE (store.type): expected one of memory, sqlite, postgres",
        ),
        (
            {"KDS_STORE_POSTGRES_TLS_MODE": "verify-full"},
            "expected one of disable, verifyNone, verifyCa, verifyFull",
        ),
        ({"KDS_LOG_FORMAT": "xml"}, "KDS_LOG_FORMAT (log.format): expected one of text, json"),
        (
            {"KDS_SYNC_HEARTBEAT_INTERVAL": "soon"},
            "KDS_SYNC_HEARTBEAT_INTERVAL (sync.heartbeatInterval): expected a duration",
        ),
        ({"KDS_SYNC_HEARTBEAT_INTERVAL": "0"}, "must be more than 0 seconds"),
        ({"KDS_SYNC_HEARTBEAT_TIMEOUT": "1e999"}, "must be a finite number of seconds"),
        (
            {"KDS_SYNC_HEARTBEAT_TIMEOUT": "5"},
            "sync.heartbeatTimeout): must be longer than sync.heartbeatInterval",
        ),
        ({"KDS_SYNC_MAX_FRAME_SIZE": "100"}, "must be at least 1024"),
    ],
)
def test_bad_values_name_the_variable_the_key_and_the_value(environ, expected):
    assert expected in error(environ)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "store:\n  postgres:\n    port: abc\n",
            "store.postgres.port in {file}: expected an integer, got 'abc'",
        ),
        (
            "store:\n  postgres:\n    port: 5432.5\n",
            "store.postgres.port in {file}: expected an integer, got 5432.5",
        ),
        ("store:\n  postgres:\n    port: true\n", "expected an integer, got True"),
        (
            "store:\n  postgres:\n    port: 99999\n",
            "store.postgres.port in {file}: must be at most 65535",
        ),
        ("store:\n  type: etcd\n", "store.type in {file}: expected one of"),
        (
            "store:\n  postgres:\n    user: 42\n",
            "store.postgres.user in {file}: expected a string (quote it in YAML), got 42",
        ),
        ("api: 5681\n", "api in {file}: expected a mapping of keys, got int"),
        ("- mode\n", "the top level in {file}: expected a mapping of keys, got list"),
        (
            "sync:\n  heartbeatTimeout: [1]\n",
            "sync.heartbeatTimeout in {file}: expected a duration",
        ),
    ],
)
def test_bad_file_values_name_the_key_and_the_file(tmp_path, text, expected):
    assert expected.format(file=tmp_path / "kds.yaml") in error(text=text, tmp_path=tmp_path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5", 5.0),
        ("0.5", 0.5),
        (".5", 0.5),
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1e1", 10.0),
    ],
)
def test_durations_are_seconds_or_have_a_unit(text, seconds):
    assert load_config({"KDS_SYNC_RECONNECT_MAX": text}).sync.reconnect_max == seconds


def test_lists_are_comma_separated_in_the_environment(tmp_path):
    config = load_config({"KDS_MULTIZONE_GLOBAL_KDS_TLS_EXTRA_NAMES": "lb.example, 10.0.0.1,,"})
    assert config.multizone.global_.kds.tls_extra_names == ("lb.example", "10.0.0.1")
    text = "multizone:\n  global:\n    kds:\n      tlsExtraNames: [a.example, b.example]\n"
    config = load_config({}, write(tmp_path, text))
    assert config.multizone.global_.kds.tls_extra_names == ("a.example", "b.example")


@pytest.mark.parametrize("name", ["KUMA_ENVIRONMENT", "KDS_ENVIRONMENT"])
def test_the_kubernetes_environment_defaults_to_the_kubernetes_store(name):
    config = load_config({name: "kubernetes"})
    assert (config.environment, config.store.type) == ("kubernetes", "kubernetes")
    assert config.store.kubernetes.namespace == "kds-system"


def test_the_kubernetes_environment_keeps_a_store_type_set_explicitly():
    # Kuma's "universal on Kubernetes" is environment universal; an explicit store
    # type wins over the environment's default in any case.
    config = load_config(
        {"KUMA_ENVIRONMENT": "kubernetes", "KUMA_STORE_TYPE": "postgres"},
        None,
        overrides={"store.postgres.host": "db"},
    )
    assert config.store.type == "postgres"


def test_kubernetes_store_settings_come_from_the_environment():
    config = load_config(
        {
            "KDS_STORE_TYPE": "kubernetes",
            "KDS_STORE_KUBERNETES_NAMESPACE": "cp",
            "KDS_STORE_KUBERNETES_WATCH_TIMEOUT": "3",
        }
    )
    assert (config.store.kubernetes.namespace, config.store.kubernetes.watch_timeout) == ("cp", 3)
    assert error({"KDS_STORE_KUBERNETES_WATCH_TIMEOUT": "0"}).startswith(
        "KDS_STORE_KUBERNETES_WATCH_TIMEOUT (store.kubernetes.watchTimeout): must be at least 1"
    )


def test_a_config_built_in_code_is_checked_too():
    validate_config(KdsConfig())
    with pytest.raises(ConfigError, match=r"^api.port \(KDS_API_PORT\): invalid value '5681'$"):
        validate_config(KdsConfig(api=ApiConfig(port="5681")))  # type: ignore[arg-type]


# -- unknown names -------------------------------------------------------------------


def test_an_unknown_kds_variable_is_an_error_with_a_suggestion():
    assert error({"KDS_STORE_POSTGRES_HOTS": "db"}) == (
        "unknown environment variable KDS_STORE_POSTGRES_HOTS: kds has no such setting "
        "(did you mean KDS_STORE_POSTGRES_HOST?)"
    )


@given(st.from_regex(r"KDS_[A-Z0-9_]{1,30}", fullmatch=True))
def test_any_unknown_kds_variable_is_an_error(name):
    known = {n for s in all_settings() for n in s.env_names}
    if name in known or name.startswith(("KDS_TEST_", "KDS_HYPOTHESIS_")):
        return
    with pytest.raises(ConfigError, match=f"unknown environment variable {name}"):
        load_config({name: "1"})


def test_test_suite_variables_and_unknown_kuma_variables_are_ignored(caplog):
    environ = {
        "KDS_TEST_POSTGRES_DSN": "postgresql://x",
        "KDS_HYPOTHESIS_PROFILE": "ci",
        "KUMA_DP_SERVER_AUTHN_DP_PROXY_TYPE": "dpToken",
        "KUMA_API_SERVER_AUTHN_TYPE": "tokens",
        "PATH": "/usr/bin",
    }
    with caplog.at_level(logging.DEBUG, logger="kds.config"):
        assert load_config(environ) == KdsConfig()
    assert "ignoring KUMA_DP_SERVER_AUTHN_DP_PROXY_TYPE" in caplog.text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mod: zone\n", "unknown key mod in {file} (did you mean mode?)"),
        (
            "store:\n  postgres:\n    db_name: x\n",
            "unknown key store.postgres.db_name in {file} (did you mean store.postgres.dbName?)",
        ),
        ("apiServer:\n  http:\n    port: 5681\n", "unknown key apiServer in {file}"),
        (
            "multizone:\n  zone:\n    kds:\n      skipVerify: true\n",
            "unknown key multizone.zone.kds.skipVerify in {file}",
        ),
        ("1: x\n", "unknown key 1 in {file}"),
    ],
)
def test_an_unknown_file_key_is_an_error_naming_its_path(tmp_path, text, expected):
    assert error(text=text, tmp_path=tmp_path).startswith(
        expected.format(file=tmp_path / "kds.yaml")
    )


def test_a_duplicate_file_key_is_an_error(tmp_path):
    message = error(text="mode: global\nmode: zone\n", tmp_path=tmp_path)
    assert "duplicate key 'mode'" in message
    assert "line 2" in message


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml: cannot be read: No such file"):
        load_config({}, tmp_path / "nope.yaml")


def test_invalid_yaml_is_one_line_without_the_offending_text(tmp_path):
    text = f"store:\n  postgres:\n    password: {SECRET}: oops\n"
    message = error(text=text, tmp_path=tmp_path)
    assert "invalid YAML at line 3" in message
    assert SECRET not in message


# -- required settings ---------------------------------------------------------------


def test_a_zone_needs_a_name():
    assert error({"KDS_MODE": "zone"}) == (
        "multizone.zone.name is required in zone mode: set KDS_MULTIZONE_ZONE_NAME or "
        "KUMA_MULTIZONE_ZONE_NAME, or multizone.zone.name in the config file"
    )


def test_a_zone_needs_a_global_address():
    message = error({"KUMA_MODE": "zone", "KUMA_MULTIZONE_ZONE_NAME": "z"})
    assert message.startswith("multizone.zone.globalAddress is required in zone mode")
    assert "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS" in message


def test_a_zone_on_nats_needs_no_global_address():
    environ = {
        "KDS_MODE": "zone",
        "KDS_MULTIZONE_ZONE_NAME": "z",
        "KDS_MULTIZONE_TRANSPORT": "nats",
    }
    assert load_config(environ).multizone.transport == "nats"


@pytest.mark.parametrize(
    "address", ["http://global:5685", "grpcs://:5685", "grpcs://g:port", "grpcs://g/x"]
)
def test_a_zone_needs_a_grpc_global_address(address):
    message = error({**ZONE, "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS": address})
    assert message.startswith(
        "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS (multizone.zone.globalAddress): expected grpcs://"
    )


def test_skip_verify_and_a_root_ca_exclude_each_other():
    environ = {
        **ZONE,
        "KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY": "true",
        "KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE": "/ca.pem",
    }
    message = error(environ)
    assert "KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY" in message
    assert "KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE" in message


def test_skip_verify_needs_tls():
    environ = {**ZONE, "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS": "grpc://g:5685"}
    environ["KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY"] = "true"
    assert "needs a grpcs:// global address" in error(environ)


def test_the_postgres_store_needs_a_host(tmp_path):
    message = error({"KUMA_STORE_TYPE": "postgres"})
    assert message == (
        "store.postgres.host is required for the postgres store: set KDS_STORE_POSTGRES_HOST "
        "or KUMA_STORE_POSTGRES_HOST, or store.postgres.host in the config file"
    )
    # Without the postgres store, an unset host is fine.
    assert load_config({"KUMA_STORE_TYPE": "sqlite"}).store.postgres.host == ""


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"KDS_STORE_POSTGRES_TLS_MODE": "verifyCa"},
            "store.postgres.tls.caPath is required with TLS mode verifyCa",
        ),
        ({"KDS_STORE_POSTGRES_TLS_CERT_PATH": "/c.pem"}, "must be set together"),
        (
            {
                "KDS_STORE_POSTGRES_TLS_MODE": "verifyFull",
                "KDS_STORE_POSTGRES_TLS_DISABLE_SSLSNI": "1",
            },
            "KDS_STORE_POSTGRES_TLS_DISABLE_SSLSNI (store.postgres.tls.disableSSLSNI): "
            "cannot be combined",
        ),
    ],
)
def test_postgres_tls_settings_are_checked(environ, expected):
    assert expected in error(
        {"KDS_STORE_TYPE": "postgres", "KDS_STORE_POSTGRES_HOST": "db", **environ}
    )


def test_the_global_certificate_needs_its_key():
    message = error({"KUMA_MULTIZONE_GLOBAL_KDS_TLS_CERT_FILE": "/cert.pem"})
    assert "KUMA_MULTIZONE_GLOBAL_KDS_TLS_CERT_FILE (multizone.global.kds.tlsCertFile)" in message
    assert "multizone.global.kds.tlsKeyFile (KDS_MULTIZONE_GLOBAL_KDS_TLS_KEY_FILE)" in message


# -- secrets -------------------------------------------------------------------------


def test_secrets_are_kept_out_of_repr():
    secrets = [s for s in all_settings() if s.secret]
    assert {s.key for s in secrets} == {
        "store.postgres.password",
        "multizone.nats.password",
        "multizone.nats.token",
        "multizone.zone.kds.cpToken",
    }
    config = KdsConfig()
    for s in secrets:
        config = evolve(config, s.path, SECRET)
    assert SECRET not in repr(config)


def test_secrets_are_masked_when_rendered():
    config = load_config(
        {"KUMA_STORE_POSTGRES_PASSWORD": SECRET, "KDS_MULTIZONE_NATS_TOKEN": SECRET}
    )
    text = render_yaml(config)
    assert SECRET not in text
    data = yaml.safe_load(text)
    assert data["store"]["postgres"]["password"] == MASK
    assert data["multizone"]["nats"]["token"] == MASK
    assert SECRET in render_yaml(config, mask_secrets=False)


def test_a_secret_of_the_wrong_type_is_not_shown(tmp_path):
    message = error(text="store:\n  postgres:\n    password: 123456789\n", tmp_path=tmp_path)
    assert "store.postgres.password" in message
    assert "123456789" not in message
    assert "<hidden>" in message


# -- helpers -------------------------------------------------------------------------


def test_postgres_settings_maps_every_field(tmp_path):
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    environ = {
        "KDS_STORE_TYPE": "postgres",
        "KDS_STORE_POSTGRES_HOST": "db",
        "KDS_STORE_POSTGRES_PORT": "6543",
        "KDS_STORE_POSTGRES_USER": "u",
        "KDS_STORE_POSTGRES_PASSWORD": SECRET,
        "KDS_STORE_POSTGRES_DB_NAME": "d",
        "KDS_STORE_POSTGRES_SCHEMA": "s",
        "KDS_STORE_POSTGRES_TLS_MODE": "verifyCa",
        "KDS_STORE_POSTGRES_TLS_CA_PATH": str(tmp_path / "ca.pem"),
        "KDS_STORE_POSTGRES_TLS_CERT_PATH": str(tmp_path / "cert.pem"),
        "KDS_STORE_POSTGRES_TLS_KEY_PATH": str(tmp_path / "key.pem"),
        "KDS_STORE_POSTGRES_TLS_DISABLE_SSLSNI": "true",
        "KDS_STORE_POSTGRES_CONNECTION_TIMEOUT": "7",
        "KDS_STORE_POSTGRES_COMMAND_TIMEOUT": "8",
        "KDS_STORE_POSTGRES_MAX_OPEN_CONNECTIONS": "9",
    }
    settings = postgres_settings(load_config(environ))
    expected = PostgresSettings(
        host="db",
        port=6543,
        user="u",
        password=SECRET,
        db_name="d",
        schema="s",
        tls_mode="verifyCa",
        ca_file=str(tmp_path / "ca.pem"),
        cert_file=str(tmp_path / "cert.pem"),
        key_file=str(tmp_path / "key.pem"),
        disable_sni=True,
        connect_timeout=7.0,
        command_timeout=8.0,
        pool_size=9,
    )
    assert settings == expected
    # Every PostgresSettings field was set to something other than its default.
    defaults = PostgresSettings()
    for field in attrs.fields(PostgresSettings):
        assert getattr(settings, field.name) != getattr(defaults, field.name), field.name


def test_postgres_defaults_are_the_stores():
    config = load_config({"KDS_STORE_POSTGRES_HOST": "127.0.0.1"})
    assert postgres_settings(config) == PostgresSettings()


def test_postgres_settings_need_a_host_whatever_the_store_type():
    with pytest.raises(ConfigError, match=r"^store.postgres.host is required"):
        postgres_settings(KdsConfig())


def test_sync_defaults_are_the_engines():
    assert sync_options(KdsConfig()) == SyncOptions()
    config_fields = {f.name for f in attrs.fields(type(KdsConfig().sync))}
    assert config_fields == {f.name for f in attrs.fields(SyncOptions)}


def test_sync_options_carry_the_settings():
    config = load_config({"KDS_SYNC_HEARTBEAT_INTERVAL": "1s", "KDS_SYNC_WINDOW": "3"})
    options = sync_options(config)
    assert (options.heartbeat_interval, options.window) == (1.0, 3)


def test_grpc_server_uses_the_global_settings(tmp_path):
    config = load_config(
        {
            "KDS_GENERAL_WORK_DIR": str(tmp_path),
            "KDS_MULTIZONE_GLOBAL_KDS_ADDRESS": "127.0.0.1",
            "KUMA_MULTIZONE_GLOBAL_KDS_GRPC_PORT": "15685",
            "KDS_MULTIZONE_GLOBAL_KDS_TLS_MIN_VERSION": "1.3",
            "KDS_MULTIZONE_GLOBAL_KDS_TLS_EXTRA_NAMES": "lb.example",
            "KDS_SYNC_MAX_FRAME_SIZE": "65536",
        }
    )
    transport = grpc_server(config)
    assert transport.address == "grpcs://127.0.0.1:15685"
    assert transport.server_options.work_dir == tmp_path
    assert transport.server_options.min_tls_version == "1.3"
    assert transport.server_options.extra_names == ("lb.example",)
    assert transport.max_frame_size == 65536
    plaintext = load_config({"KDS_MULTIZONE_GLOBAL_KDS_TLS_ENABLED": "false"})
    assert global_kds_address(plaintext) == "grpc://0.0.0.0:5685"


NATS_TLS = {
    "KDS_MULTIZONE_TRANSPORT": "nats",
    "KDS_MULTIZONE_NATS_URL": "tls://nats-1.example:4222, tls://nats-2.example",
    "KDS_MULTIZONE_NATS_PREFIX": "kds.prod",
    "KDS_MULTIZONE_NATS_CA_FILE": "/etc/kds/nats-ca.crt",
    "KDS_MULTIZONE_NATS_CERT_FILE": "/etc/kds/nats.crt",
    "KDS_MULTIZONE_NATS_KEY_FILE": "/etc/kds/nats.key",
    "KDS_MULTIZONE_NATS_SERVER_NAME": "nats.internal",
    "KDS_SYNC_MAX_FRAME_SIZE": "65536",
}


async def _check_zone(zone, credentials, address):
    return zone


def test_nats_server_uses_the_nats_and_sync_settings():
    config = load_config(
        {
            **NATS_TLS,
            "KDS_MULTIZONE_NATS_USER": "kds-global",
            "KDS_MULTIZONE_NATS_PASSWORD": SECRET,
        }
    )
    transport = nats_server(config, authenticate=_check_zone)
    assert transport.address == "tls://nats-1.example:4222,tls://nats-2.example:4222"
    assert transport.prefix == "kds.prod"
    assert transport.max_frame_size == 65536
    assert transport.server_options.authenticate is _check_zone
    options = transport.connection_options
    assert (options.user, options.password, options.token) == ("kds-global", SECRET, None)
    assert options.ca_file == Path("/etc/kds/nats-ca.crt")
    assert (options.cert_file, options.key_file) == (
        Path("/etc/kds/nats.crt"),
        Path("/etc/kds/nats.key"),
    )
    assert options.server_name == "nats.internal"


def test_nats_client_dials_as_the_zone_with_its_credentials():
    config = load_config(
        {
            "KDS_MODE": "zone",
            "KDS_MULTIZONE_ZONE_NAME": "zone-1",
            "KDS_MULTIZONE_TRANSPORT": "nats",
            "KDS_MULTIZONE_NATS_URL": "nats://nats.example",
            "KDS_MULTIZONE_NATS_TOKEN": SECRET,
        }
    )
    transport = nats_client(config, credentials="zone-token")
    assert transport.address == "nats://nats.example:4222"
    assert transport.prefix == "kds"
    assert transport.client_options.zone == "zone-1"
    assert transport.client_options.credentials == "zone-token"
    assert transport.connection_options.token == SECRET
    assert transport.connection_options.ca_file is None
    assert transport.max_frame_size == KdsConfig().sync.max_frame_size
    assert nats_client(config).client_options.credentials is None


def test_the_default_nats_settings_make_transports():
    assert nats_server(KdsConfig()).address == "nats://127.0.0.1:4222"
    zone = evolve(KdsConfig(), ("multizone", "zone", "name"), "zone-1")
    assert nats_client(zone).client_options.zone == "zone-1"


def test_a_zone_on_nats_needs_its_name_for_the_transport():
    with pytest.raises(ConfigError) as info:
        nats_client(KdsConfig())
    assert str(info.value) == (
        "multizone.zone.name is required for a zone on NATS: set KDS_MULTIZONE_ZONE_NAME or "
        "KUMA_MULTIZONE_ZONE_NAME, or multizone.zone.name in the config file"
    )


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"KDS_MULTIZONE_NATS_USER": "kds"},
            "multizone.nats.user (KDS_MULTIZONE_NATS_USER) and multizone.nats.password "
            "(KDS_MULTIZONE_NATS_PASSWORD) must be set together",
        ),
        (
            {"KDS_MULTIZONE_NATS_PASSWORD": SECRET},
            "multizone.nats.user (KDS_MULTIZONE_NATS_USER) and multizone.nats.password "
            "(KDS_MULTIZONE_NATS_PASSWORD) must be set together",
        ),
        (
            {
                "KDS_MULTIZONE_NATS_USER": "kds",
                "KDS_MULTIZONE_NATS_PASSWORD": SECRET,
                "KDS_MULTIZONE_NATS_TOKEN": SECRET,
            },
            "multizone.nats.user (KDS_MULTIZONE_NATS_USER) and multizone.nats.token "
            "(KDS_MULTIZONE_NATS_TOKEN) exclude each other: NATS authenticates a connection "
            "one way",
        ),
        (
            {"KDS_MULTIZONE_NATS_TOKEN": SECRET, "KDS_MULTIZONE_NATS_CREDS_FILE": "/x.creds"},
            "multizone.nats.token (KDS_MULTIZONE_NATS_TOKEN) and multizone.nats.credsFile "
            "(KDS_MULTIZONE_NATS_CREDS_FILE) exclude each other: NATS authenticates a "
            "connection one way",
        ),
        (
            {**NATS_TLS, "KDS_MULTIZONE_NATS_KEY_FILE": ""},
            "multizone.nats.certFile (KDS_MULTIZONE_NATS_CERT_FILE) and multizone.nats.keyFile "
            "(KDS_MULTIZONE_NATS_KEY_FILE) must be set together",
        ),
        (
            {"KDS_MULTIZONE_NATS_CA_FILE": "/etc/kds/nats-ca.crt"},
            "multizone.nats.caFile (KDS_MULTIZONE_NATS_CA_FILE) needs a tls:// URL in "
            "multizone.nats.url (KDS_MULTIZONE_NATS_URL)",
        ),
        (
            {**NATS_TLS, "KDS_MULTIZONE_NATS_URL": "tls://a:4222,nats://b:4222"},
            "multizone.nats.caFile (KDS_MULTIZONE_NATS_CA_FILE) needs a tls:// URL in "
            "multizone.nats.url (KDS_MULTIZONE_NATS_URL)",
        ),
        (
            {"KDS_MULTIZONE_NATS_SERVER_NAME": "nats.internal"},
            "multizone.nats.serverName (KDS_MULTIZONE_NATS_SERVER_NAME) needs a tls:// URL in "
            "multizone.nats.url (KDS_MULTIZONE_NATS_URL)",
        ),
        (
            {"KDS_MULTIZONE_NATS_URL": "http://nats.example:4222"},
            "multizone.nats: invalid NATS address 'http://nats.example:4222' (unknown scheme "
            "'http'): use nats://host:port, or tls://host:port for TLS, several separated by "
            "commas (port 4222 when omitted)",
        ),
        (
            {"KDS_MULTIZONE_NATS_PREFIX": "kds prod"},
            "multizone.nats: prefix must be dot-separated tokens of letters, digits, '_' or "
            "'-', got 'kds prod'",
        ),
    ],
)
def test_invalid_nats_settings_name_the_settings(environ, expected):
    config = load_config(environ)
    for build in (nats_server, nats_client):
        zone = evolve(config, ("multizone", "zone", "name"), "zone-1")
        with pytest.raises(ConfigError) as info:
            build(zone)
        assert str(info.value) == expected
        assert SECRET not in str(info.value)


def test_memory_store():
    from kds.testing import MemoryStore

    assert isinstance(create_store(load_config({"KDS_STORE_TYPE": "memory"})), MemoryStore)


# -- the settings table and the docs -------------------------------------------------


def test_environment_names_are_unique_and_prefixed():
    names = [name for s in all_settings() for name in s.env_names]
    assert len(names) == len(set(names))
    for s in all_settings():
        assert s.env.startswith("KDS_")
        assert all(alias.startswith("KUMA_") for alias in s.aliases)
        assert s.env == "KDS_" + "_".join(p.rstrip("_").upper() for p in s.path)


def test_file_keys_are_unique_and_every_setting_is_documented():
    keys = [s.key for s in all_settings()]
    assert len(keys) == len(set(keys))
    for s in all_settings():
        assert s.doc, f"{s.key} has no docstring"


def test_the_defaults_file_loads_as_the_defaults(tmp_path):
    assert load_config({}, write(tmp_path, render_defaults_yaml())) == KdsConfig()


def test_the_defaults_file_names_every_variable():
    text = render_defaults_yaml()
    for s in all_settings():
        assert f"# ENV: {', '.join(s.env_names)}" in text


def test_docs_config_md_is_up_to_date():
    assert DOCS.read_text(encoding="utf-8") == render_docs(), (
        "docs/config.md is out of date: regenerate it with `kds-cp config docs > docs/config.md`"
    )


# -- round trips ---------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
_NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_FILE = _NAME.map(lambda name: f"/etc/kds/{name}.pem")
_PATH = st.one_of(st.just(""), _FILE)


def _leaf(s: Setting) -> st.SearchStrategy[object]:
    meta = s.meta
    match s.kind:
        case "bool":
            return st.booleans()
        case "int":
            low = int(meta.minimum) if meta.minimum is not None else 0
            high = int(meta.maximum) if meta.maximum is not None else 2**31
            return st.integers(low, high)
        case "seconds":
            least = meta.minimum if meta.minimum is not None else 1e-3
            return st.floats(least, 1e6, allow_nan=False, allow_infinity=False)
        case "str":
            return _TEXT
        case "list":
            return st.lists(_NAME, max_size=3).map(tuple)
        case "choice":
            return st.sampled_from(s.choices)
    raise AssertionError(s.kind)


def _pair():
    """Two files that must be set together."""
    return st.one_of(st.just(("", "")), st.tuples(_FILE, _FILE))


@st.composite
def configs(draw) -> KdsConfig:
    """Any valid configuration."""
    config = KdsConfig()
    for s in all_settings():
        config = evolve(config, s.path, draw(_leaf(s), label=s.key))
    fixed: dict[tuple[str, ...], object] = {
        ("multizone", "zone", "name"): draw(_NAME),
        ("multizone", "zone", "global_address"): draw(
            st.sampled_from(["grpcs://global.example:5685", "global:5685", "grpcs://[::1]:15685"])
        ),
        ("store", "postgres", "host"): draw(_NAME),
        ("store", "postgres", "user"): draw(_NAME),
        ("store", "postgres", "db_name"): draw(_NAME),
        ("store", "postgres", "schema"): draw(_NAME),
    }
    skip = config.multizone.zone.kds.tls_skip_verify
    fixed["multizone", "zone", "kds", "root_ca_file"] = "" if skip else draw(_PATH)
    tls = config.store.postgres.tls
    if tls.mode == "verifyCa":
        fixed["store", "postgres", "tls", "ca_path"] = draw(_FILE)
    if tls.mode == "verifyFull":
        fixed["store", "postgres", "tls", "disable_sslsni"] = False
    (
        fixed["store", "postgres", "tls", "cert_path"],
        fixed["store", "postgres", "tls", "key_path"],
    ) = draw(_pair())
    for prefix in (("multizone", "global_", "kds"), ("dp_server",)):
        fixed[(*prefix, "tls_cert_file")], fixed[(*prefix, "tls_key_file")] = draw(_pair())
    if config.multizone.zone.kds.cp_token:
        fixed["multizone", "zone", "kds", "cp_token_path"] = ""
    interval = config.sync.heartbeat_interval
    fixed["sync", "heartbeat_timeout"] = interval + draw(st.floats(1e-3, 1e6))
    for path, value in fixed.items():
        config = evolve(config, path, value)
    validate_config(config)  # the strategy only makes valid configurations
    return config


def _environ(config: KdsConfig) -> dict[str, str]:
    environ = {}
    for s in all_settings():
        value = s.value_of(config)
        if s.kind == "bool":
            text = "true" if value else "false"
        elif s.kind == "list":
            text = ",".join(value)
        elif s.kind == "seconds":
            text = repr(value)
        else:
            text = str(value)
        environ[s.env] = text
    return environ


@given(configs())
def test_any_config_rendered_to_yaml_loads_back_the_same(config):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kds.yaml"
        path.write_text(render_yaml(config, mask_secrets=False), encoding="utf-8")
        assert load_config({}, path) == config


@given(configs())
def test_any_config_rendered_masked_loads_back_with_its_secrets_masked(config):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kds.yaml"
        path.write_text(render_yaml(config), encoding="utf-8")
        loaded = load_config({}, path)
    expected = config
    for s in all_settings():
        if s.secret and s.value_of(config):
            expected = evolve(expected, s.path, MASK)
    assert loaded == expected


@given(configs())
def test_any_config_set_through_the_environment_loads_back_the_same(config):
    assert load_config(_environ(config)) == config


@given(configs(), st.data())
def test_kuma_names_read_like_kds_names(config, data):
    environ = _environ(config)
    kuma = {}
    for s in all_settings():
        if s.aliases and data.draw(st.booleans()):
            kuma[data.draw(st.sampled_from(s.aliases))] = environ.pop(s.env)
    assert load_config(environ | kuma) == config


# -- the command line ----------------------------------------------------------------


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env or {}, catch_exceptions=False)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """CliRunner adds to os.environ: start every test from an environment without kds's names."""
    for name in list(os.environ):
        if name.startswith(("KDS_", "KUMA_")):
            monkeypatch.delenv(name)


def test_config_print_shows_the_effective_config_with_secrets_masked(tmp_path):
    path = write(tmp_path, "store:\n  type: postgres\n  postgres:\n    host: from-file\n")
    result = run(
        "config",
        "print",
        "--config",
        str(path),
        env={**ZONE, "KUMA_STORE_POSTGRES_PASSWORD": SECRET, "KUMA_STORE_POSTGRES_PORT": "6543"},
    )
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    data = yaml.safe_load(result.stdout)
    assert data["mode"] == "zone"
    assert data["multizone"]["zone"]["name"] == "zone-1"
    assert data["store"]["postgres"] == data["store"]["postgres"] | {
        "host": "from-file",
        "port": 6543,
        "password": MASK,
    }


def test_config_print_without_configuration_prints_the_defaults():
    result = run("config", "print")
    assert result.exit_code == 0
    assert yaml.safe_load(result.stdout) == yaml.safe_load(render_yaml(KdsConfig()))


@pytest.mark.parametrize("option", ["-c", "--config", "--config-file"])
def test_config_file_option_spellings(tmp_path, option):
    path = write(tmp_path, "api:\n  port: 9999\n")
    result = run("config", "print", option, str(path))
    assert yaml.safe_load(result.stdout)["api"]["port"] == 9999


def test_a_config_error_exits_2_with_one_line_and_no_traceback():
    result = run(
        "config",
        "print",
        env={"KUMA_STORE_POSTGRES_PORT": "many", "KDS_STORE_POSTGRES_PASSWORD": SECRET},
    )
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "kds-cp: error: KUMA_STORE_POSTGRES_PORT (store.postgres.port): "
        "expected an integer, got 'many'\n"
    )


def test_config_docs_prints_docs_config_md():
    result = run("config", "docs")
    assert result.exit_code == 0
    assert result.stdout == render_docs()


@pytest.fixture
def fake_postgres(monkeypatch):
    """The postgres module migrate uses, recording the settings instead of connecting."""
    seen: list[PostgresSettings] = []

    async def migrate_up(settings):
        seen.append(settings)
        return []

    module = types.SimpleNamespace(migrate_up=migrate_up, SCHEMA_VERSION=2)
    monkeypatch.setattr(cp, "_postgres", lambda: module)
    return seen


def test_migrate_reads_the_config_file_and_kuma_names(tmp_path, fake_postgres):
    path = write(tmp_path, "store:\n  postgres:\n    host: from-file\n    dbName: filedb\n")
    env = {"KUMA_STORE_POSTGRES_PORT": "6543", "KUMA_STORE_POSTGRES_PASSWORD": SECRET}
    result = run("migrate", "up", "--config", str(path), env=env)
    assert result.exit_code == 0, result.output
    assert "from-file:6543/filedb" in result.stdout
    assert SECRET not in result.output
    [settings] = fake_postgres
    assert (settings.host, settings.port, settings.db_name, settings.password) == (
        "from-file",
        6543,
        "filedb",
        SECRET,
    )


def test_migrate_options_override_the_environment(tmp_path, fake_postgres):
    password = tmp_path / "password"
    password.write_text(SECRET + "\n")
    env = {"KDS_STORE_TYPE": "postgres", "KDS_STORE_POSTGRES_USER": "env-user"}
    args = ["--host", "db", "--user", "cli-user", "--tls-mode", "verifyNone", "--disable-sni"]
    result = run("migrate", "up", *args, "--password-file", str(password), env=env)
    assert result.exit_code == 0, result.output
    [settings] = fake_postgres
    assert (settings.host, settings.user, settings.tls_mode, settings.disable_sni) == (
        "db",
        "cli-user",
        "verifyNone",
        True,
    )
    assert settings.password == SECRET


def test_migrate_flags_left_out_do_not_override_the_environment(fake_postgres):
    env = {
        "KDS_STORE_POSTGRES_TLS_MODE": "verifyNone",
        "KDS_STORE_POSTGRES_TLS_DISABLE_SSLSNI": "1",
    }
    result = run("migrate", "up", "--host", "db", env=env)
    assert result.exit_code == 0, result.output
    [settings] = fake_postgres
    assert (settings.tls_mode, settings.disable_sni) == ("verifyNone", True)


def test_migrate_without_a_host_names_the_setting(fake_postgres):
    result = run("migrate", "status")
    assert result.exit_code == 2
    assert re.fullmatch(
        r"kds-cp: error: store.postgres.host is required .*KUMA_STORE_POSTGRES_HOST.*\n",
        result.stderr,
    )
    assert fake_postgres == []


def test_zone_token_comes_from_the_setting_or_the_file(tmp_path):
    from kds.config import zone_token

    assert zone_token(load_config({})) is None
    assert zone_token(load_config({"KDS_MULTIZONE_ZONE_KDS_CP_TOKEN": " abc\n"})) == "abc"
    path = tmp_path / "token"
    path.write_text("xyz\n")
    assert zone_token(load_config({"KDS_MULTIZONE_ZONE_KDS_CP_TOKEN_PATH": str(path)})) == "xyz"


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_an_unreadable_or_empty_token_file_is_an_error_naming_the_setting(tmp_path, content):
    from kds.config import zone_token

    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    config = load_config({"KDS_MULTIZONE_ZONE_KDS_CP_TOKEN_PATH": str(path)})
    with pytest.raises(ConfigError, match=r"cpTokenPath \(KDS_MULTIZONE_ZONE_KDS_CP_TOKEN_PATH\)"):
        zone_token(config)


def test_a_token_and_a_token_file_together_are_refused():
    with pytest.raises(ConfigError, match=r"cpToken\): cannot be combined with .*cpTokenPath"):
        load_config(
            {
                "KDS_MULTIZONE_ZONE_KDS_CP_TOKEN": "abc",
                "KDS_MULTIZONE_ZONE_KDS_CP_TOKEN_PATH": "/x",
                **ZONE,
            }
        )
