"""The Kubernetes manifests of a kds control plane: what ``kdsctl install control-plane`` prints.

Like ``kumactl install control-plane``, the install is driven by Helm-style values: a
nested mapping (``controlPlane.mode``, ``controlPlane.zone``, ``ingress.enabled``, ...)
read from YAML files and ``--set KEY=VALUE`` options (:func:`load_values`), turned into
a list of Kubernetes objects (:func:`render_manifests`) and printed as one YAML stream
(:func:`dump_manifests`). Every key is listed in :data:`VALUE_KEYS`; the user's guide
is ``docs/kubernetes.md``.

What is built, all in one namespace (``kds-system`` unless told otherwise):

* the Namespace;
* on the ``kubernetes`` environment, the CustomResourceDefinitions of every type
  (:func:`kds.k8s.crd_manifests`) and the RBAC the Kubernetes store needs; a
  ``universal`` global keeps its resources in PostgreSQL and gets neither;
* the ``kds-control-plane`` ServiceAccount, Deployment (``kds-cp run``, configured
  through environment variables only) and ClusterIP Service;
* on a global, the ``kds-global-zone-sync`` LoadBalancer Service zones dial;
* on a zone, the dataplane server's TLS Secret (unless the user names their own)
  and, when enabled, the ``kds-ingress`` and ``kds-egress`` proxies (``kds-dp run``).

Nothing here reads files, the environment or the network; the only thing not
determined by its arguments is a generated certificate (:func:`generate_dp_server_tls`),
which :func:`render_manifests` takes as an argument when the caller wants the same
output twice.
"""

from __future__ import annotations

import base64
import difflib
import functools
import hashlib
import re
import urllib.parse
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import attrs
import yaml

from kds import k8s
from kds.catalog import DEFAULT_CATALOG
from kds.config import all_settings
from kds.errors import ConfigError
from kds.tls import generate_certificate

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from kds.config import Setting

__all__ = [
    "CONTROL_PLANE",
    "DEFAULT_IMAGE",
    "DEFAULT_NAMESPACE",
    "DP_SERVER_TLS_SECRET",
    "EGRESS_TOKEN_SECRET",
    "GLOBAL_ZONE_SYNC",
    "INGRESS_TOKEN_SECRET",
    "VALUE_KEYS",
    "ZONE_TOKEN_SECRET",
    "InstallError",
    "InstallValues",
    "SecretEnv",
    "ServerTls",
    "ValueKey",
    "dump_manifests",
    "generate_dp_server_tls",
    "load_values",
    "parse_set",
    "render_manifests",
]


def _version() -> str:
    from kds import __version__  # kds/__init__.py defines it after its imports

    return __version__


DEFAULT_NAMESPACE: Final = k8s.DEFAULT_NAMESPACE
"""The namespace everything is installed in unless ``--namespace`` says otherwise."""
DEFAULT_IMAGE: Final = f"docker.io/kds/kds:{_version()}"
"""The container image of ``kds-cp`` and ``kds-dp`` (not published yet: build your own)."""

CONTROL_PLANE: Final = "kds-control-plane"
"""Name of the control plane's Deployment, Service, ServiceAccount and RBAC objects."""
GLOBAL_ZONE_SYNC: Final = "kds-global-zone-sync"
"""Name of a global's LoadBalancer Service, where zones reach its KDS server."""
ZONE_TOKEN_SECRET: Final = "kds-zone-token"  # noqa: S105 -- a Secret's name
"""Secret (key ``token``) holding a zone's ``cp``-scoped zone token; the user creates it."""
INGRESS_TOKEN_SECRET: Final = "kds-ingress-token"  # noqa: S105 -- a Secret's name
"""Secret (key ``token``) holding the zone ingress's ``ingress``-scoped zone token."""
EGRESS_TOKEN_SECRET: Final = "kds-egress-token"  # noqa: S105 -- a Secret's name
"""Secret (key ``token``) holding the zone egress's ``egress``-scoped zone token."""
DP_SERVER_TLS_SECRET: Final = "kds-dp-server-tls"  # noqa: S105 -- a Secret's name
"""The generated Secret (``tls.crt``, ``tls.key``, ``ca.crt``) of a zone's dataplane server."""

_API_PORT: Final = 5681
_KDS_PORT: Final = 5685
_DP_SERVER_PORT: Final = 5678
_INGRESS_PORT: Final = 10001
_EGRESS_PORT: Final = 10002
_WORK_DIR: Final = "/var/lib/kds"
_SECRETS_DIR: Final = "/var/run/secrets/kds"
_TOKEN_KEY: Final = "token"  # noqa: S105 -- a Secret's key name
_UID: Final = 65532  # an unprivileged user no image is likely to give a name to
_PART_OF: Final = "kds"
_CHECKSUM_ANNOTATION: Final = "kds.kuma.io/dp-server-tls-sha256"

_DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
_SECRET_KEY: Final = re.compile(r"[-._a-zA-Z0-9]+")
_DIGITS: Final = re.compile(r"[0-9]+")

_Kind: TypeAlias = Literal["str", "bool", "int", "choice", "secrets"]


class InstallError(ConfigError):
    """Raised when the install values are wrong; the message names the key.

    Attributes:
        key: the value's dotted key (``controlPlane.mode``), or the option
            (``--set``, ``--namespace``).
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@attrs.frozen
class ValueKey:
    """One key of the install values.

    Attributes:
        key: the dotted key (``controlPlane.tls.kdsZoneClient.skipVerify``).
        field: the :class:`InstallValues` attribute it sets.
        kind: ``str``, ``bool``, ``int``, ``choice`` (one of :attr:`choices`) or
            ``secrets`` (``controlPlane.secrets``).
        doc: what it does.
        choices: the values a ``choice`` accepts.
    """

    key: str
    field: str
    kind: _Kind
    doc: str
    choices: tuple[str, ...] = ()


@attrs.frozen
class SecretEnv:
    """One entry of ``controlPlane.secrets``: an environment variable read from a Secret.

    Attributes:
        name: the entry's name in ``controlPlane.secrets`` (``postgresHost``).
        secret: the Secret's name.
        key: the key in the Secret.
        env: the control plane's environment variable it becomes
            (``KUMA_STORE_POSTGRES_HOST``).
    """

    name: str
    secret: str
    key: str
    env: str


@attrs.frozen
class ServerTls:
    """A certificate and its key, PEM, for a server of the control plane.

    Attributes:
        certificate: the certificate (self-signed: also the CA clients trust).
        key: its unencrypted private key.
    """

    certificate: bytes
    key: bytes = attrs.field(repr=False)


@attrs.frozen(kw_only=True)
class InstallValues:
    """The install values, checked; :func:`load_values` builds them.

    Each attribute is one key of :data:`VALUE_KEYS`; its default is the key's default.
    """

    mode: str = "zone"
    zone: str = ""
    kds_global_address: str = ""
    skip_verify: bool = False
    dp_server_secret: str = ""
    dp_server_ca_key: str = "ca.crt"
    environment: str = "kubernetes"
    secrets: tuple[SecretEnv, ...] = ()
    image: str = DEFAULT_IMAGE
    replicas: int = 1
    log_level: str = "info"
    postgres_port: str = "5432"
    postgres_tls_mode: str = "disable"
    postgres_tls_disable_sslsni: bool = False
    postgres_tls_ca_secret_name: str = ""
    postgres_tls_secret_name: str = ""
    ingress_enabled: bool = False
    ingress_advertised_address: str = ""
    ingress_advertised_port: int = _INGRESS_PORT
    egress_enabled: bool = False


VALUE_KEYS: Final[tuple[ValueKey, ...]] = (
    ValueKey(
        "controlPlane.mode",
        "mode",
        "choice",
        "`global` or `zone` (the default, as Kuma's).",
        ("global", "zone"),
    ),
    ValueKey("controlPlane.zone", "zone", "str", "The zone's name (a DNS label); zone only."),
    ValueKey(
        "controlPlane.kdsGlobalAddress",
        "kds_global_address",
        "str",
        "The global's KDS address, `grpcs://HOST:5685` (`grpc://` for plaintext); zone only.",
    ),
    ValueKey(
        "controlPlane.tls.kdsZoneClient.skipVerify",
        "skip_verify",
        "bool",
        "Accept any certificate from the global (its generated one is self-signed).",
    ),
    ValueKey(
        "controlPlane.tls.dpServer.secret",
        "dp_server_secret",
        "str",
        "A `kubernetes.io/tls` Secret for the zone's dataplane server, valid for "
        "`kds-control-plane.NAMESPACE.svc`; empty generates one.",
    ),
    ValueKey(
        "controlPlane.tls.dpServer.caKey",
        "dp_server_ca_key",
        "str",
        "The key of that Secret holding the CA the proxies trust (`tls.crt` for a "
        "self-signed certificate).",
    ),
    ValueKey(
        "controlPlane.environment",
        "environment",
        "choice",
        "`kubernetes` (resources are custom resources) or `universal` (a global on PostgreSQL).",
        ("kubernetes", "universal"),
    ),
    ValueKey(
        "controlPlane.secrets",
        "secrets",
        "secrets",
        "Name -> `{Secret, Key, Env}`: environment variables of `kds-cp` read from Secrets.",
    ),
    ValueKey("controlPlane.image", "image", "str", "The image running `kds-cp` and `kds-dp`."),
    ValueKey("controlPlane.replicas", "replicas", "int", "Control plane pods."),
    ValueKey(
        "controlPlane.logLevel",
        "log_level",
        "choice",
        "`debug`, `info`, `warning` or `error`, for the control plane and the proxies.",
        ("debug", "info", "warning", "error"),
    ),
    ValueKey("postgres.port", "postgres_port", "str", "PostgreSQL's port; universal only."),
    ValueKey(
        "postgres.tls.mode",
        "postgres_tls_mode",
        "choice",
        "`disable`, `verifyNone`, `verifyCa` or `verifyFull`; universal only.",
        ("disable", "verifyNone", "verifyCa", "verifyFull"),
    ),
    ValueKey(
        "postgres.tls.disableSSLSNI",
        "postgres_tls_disable_sslsni",
        "bool",
        "Do not send the server name in the TLS handshake; universal only.",
    ),
    ValueKey(
        "postgres.tls.caSecretName",
        "postgres_tls_ca_secret_name",
        "str",
        "Secret whose `ca.crt` signs PostgreSQL's certificate (required by `verifyCa`).",
    ),
    ValueKey(
        "postgres.tls.secretName",
        "postgres_tls_secret_name",
        "str",
        "Secret with a client certificate (`tls.crt`, `tls.key`) for PostgreSQL.",
    ),
    ValueKey("ingress.enabled", "ingress_enabled", "bool", "Run a zone ingress; zone only."),
    ValueKey(
        "ingress.advertisedAddress",
        "ingress_advertised_address",
        "str",
        "The address other zones reach the ingress at (its LoadBalancer's).",
    ),
    ValueKey(
        "ingress.advertisedPort",
        "ingress_advertised_port",
        "int",
        "The port other zones reach the ingress at.",
    ),
    ValueKey("egress.enabled", "egress_enabled", "bool", "Run a zone egress; zone only."),
)
"""Every key the install values accept, in the order the documentation lists them."""

_BY_KEY: Final = {value_key.key: value_key for value_key in VALUE_KEYS}
_PREFIXES: Final = frozenset(
    ".".join(value_key.key.split(".")[:depth])
    for value_key in VALUE_KEYS
    for depth in range(1, value_key.key.count(".") + 1)
)
_DEFAULTS: Final = InstallValues()


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind_name(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


# -- reading the values ------------------------------------------------------------------


def _split(text: str, separator: str) -> list[str]:
    """*text* split at each *separator* not escaped with a backslash (escapes kept)."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_set(text: str) -> list[tuple[tuple[str, ...], str]]:
    """One ``--set`` option as Helm reads it: ``KEY=VALUE[,KEY=VALUE...]``.

    Keys are dotted paths; a backslash escapes ``,``, ``.`` and ``=``. Values stay
    text: :func:`load_values` reads ``true``/``false`` and numbers where the key
    wants a boolean or a number, and keeps the text where it wants a string.

    Returns:
        Each assignment's key path and value, in order.

    Raises:
        InstallError: an assignment has no ``=`` or an empty key part.
    """
    assignments: list[tuple[tuple[str, ...], str]] = []
    for item in _split(text, ","):
        key, *rest = _split(item, "=")
        path = tuple(_unescape(part) for part in _split(key, "."))
        if not rest or not all(part.strip() for part in path):
            raise InstallError("--set", f"expected KEY=VALUE, got {_show(item)}")
        assignments.append((tuple(part.strip() for part in path), _unescape("=".join(rest))))
    return assignments


def _merge(target: dict[str, Any], source: Mapping[Any, Any]) -> None:
    """Merge *source* into *target*: mappings key by key, anything else replaced."""
    for key, value in source.items():
        existing = target.get(key)
        if isinstance(value, dict) and isinstance(existing, dict):
            _merge(existing, value)
        elif isinstance(value, dict):
            target[key] = {}
            _merge(target[key], value)
        else:
            target[key] = value


def _put(target: dict[str, Any], path: Sequence[str], value: str) -> None:
    for part in path[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[path[-1]] = value


def _flatten(raw: Mapping[Any, Any], prefix: str, out: dict[str, object]) -> None:
    """Each known key of the nested *raw* values into *out*, by dotted key."""
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if key in _BY_KEY:
            out[key] = value
        elif key in _PREFIXES:
            if value is None:  # an empty section (`controlPlane:` with nothing under it)
                continue
            if not isinstance(value, dict):
                raise InstallError(key, f"must be a mapping of keys, got {_kind_name(value)}")
            _flatten(value, key, out)
        else:
            choices = sorted(_BY_KEY) + sorted(_PREFIXES)
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InstallError(key, f"unknown key{hint}")


def _typed(value_key: ValueKey, value: object) -> object:
    """*value* (text from ``--set`` or a YAML value) as *value_key* wants it."""
    key = value_key.key
    match value_key.kind:
        case "str":
            if isinstance(value, str):
                return value.strip()
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)  # `port: 5432` in a values file, as Helm would template it
            raise InstallError(key, f"must be a string, got {_kind_name(value)}")
        case "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            raise InstallError(key, f"must be true or false, got {_show(value)}")
        case "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
                return int(value)
            raise InstallError(key, f"must be a whole number, got {_show(value)}")
        case "choice":
            text = value.strip() if isinstance(value, str) else None
            if text not in value_key.choices:
                choices = ", ".join(value_key.choices[:-1]) + f" or {value_key.choices[-1]}"
                raise InstallError(key, f"must be {choices}, got {_show(value)}")
            return text
        case "secrets":
            return _secret_envs(value)
    raise AssertionError(value_key.kind)  # pragma: no cover - every kind is handled


@functools.cache
def _settings_by_env() -> dict[str, Setting]:
    """Every environment variable ``kds-cp`` reads, and the setting it sets."""
    return {name: setting for setting in all_settings() for name in setting.env_names}


_SECRETS_KEY: Final = "controlPlane.secrets"
_SECRET_FIELDS: Final = ("Secret", "Key", "Env")


def _secret_envs(value: object) -> tuple[SecretEnv, ...]:
    """``controlPlane.secrets``: a mapping name -> ``{Secret, Key, Env}`` (or a list of them)."""
    if isinstance(value, dict):
        entries = [(str(name), entry) for name, entry in value.items()]
    elif isinstance(value, list):
        entries = [(str(index), entry) for index, entry in enumerate(value)]
    else:
        raise InstallError(
            _SECRETS_KEY,
            f"must be a mapping of names to {{Secret, Key, Env}}, got {_kind_name(value)}",
        )
    by_env = _settings_by_env()
    found: list[SecretEnv] = []
    seen: dict[tuple[str, ...], str] = {}
    for name, entry in entries:
        where = f"{_SECRETS_KEY}.{name}"
        if not isinstance(entry, dict):
            raise InstallError(
                where, f"must be a mapping with Secret, Key and Env, got {_kind_name(entry)}"
            )
        for field in entry:
            if field not in _SECRET_FIELDS:
                raise InstallError(f"{where}.{field}", "unknown key (expected Secret, Key and Env)")
        texts: dict[str, str] = {}
        for field in _SECRET_FIELDS:
            item = entry.get(field)
            if not isinstance(item, str) or not item.strip():
                raise InstallError(
                    f"{where}.{field}", f"must be a non-empty string, got {_kind_name(item)}"
                )
            texts[field] = item.strip()
        secret, key, env = texts["Secret"], texts["Key"], texts["Env"]
        if len(secret) > 253 or not _DNS_SUBDOMAIN.fullmatch(secret):
            raise InstallError(f"{where}.Secret", f"must be a Secret's name, got {_show(secret)}")
        if not _SECRET_KEY.fullmatch(key):
            raise InstallError(
                f"{where}.Key",
                f"must be a key of a Secret (letters, digits, '-', '_', '.'), got {_show(key)}",
            )
        setting = by_env.get(env)
        if setting is None:
            close = difflib.get_close_matches(env, list(by_env), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InstallError(f"{where}.Env", f"kds-cp reads no environment variable {env}{hint}")
        if setting.path in seen:
            raise InstallError(
                f"{where}.Env", f"{env} sets {setting.key}, as {seen[setting.path]} does"
            )
        seen[setting.path] = where
        found.append(SecretEnv(name, secret, key, env))
    return tuple(found)


def load_values(
    documents: Iterable[Mapping[str, Any]] = (), sets: Iterable[str] = ()
) -> InstallValues:
    """The install values from values files' contents, then ``--set`` options.

    Args:
        documents: the values files, each a nested mapping in the layout of
            :data:`VALUE_KEYS`, later ones winning over earlier ones (as Helm's ``-f``).
        sets: ``--set`` options (see :func:`parse_set`), winning over the files.

    Raises:
        InstallError: naming the key: an unknown key, a value of the wrong type, or
            values that do not work together (a zone without its name or the
            global's address, a global with zone settings, an invalid zone name or
            address, a universal global without a PostgreSQL host, ...).
    """
    raw: dict[str, Any] = {}
    for document in documents:
        _merge(raw, document)
    for text in sets:
        for path, assigned in parse_set(text):
            _put(raw, path, assigned)
    flat: dict[str, object] = {}
    _flatten(raw, "", flat)
    fields: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:  # as Helm: a null value leaves the default in place
            continue
        value_key = _BY_KEY[key]
        fields[value_key.field] = _typed(value_key, value)
    values = InstallValues(**fields)
    _check(values)
    return values


def _grpc_tls(address: str) -> bool | None:
    """Whether a KDS address uses TLS, or ``None`` when it is not ``grpc(s)://HOST[:PORT]``."""
    if any(char.isspace() for char in address):
        return None
    try:
        url = urllib.parse.urlsplit(address)
        url.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return None
    if url.scheme not in ("grpc", "grpcs") or not url.hostname:
        return None
    if url.path not in ("", "/") or url.query or url.fragment or url.username is not None:
        return None
    return url.scheme == "grpcs"


def _key_of(field: str) -> str:
    return next(value_key.key for value_key in VALUE_KEYS if value_key.field == field)


def _changed(values: InstallValues, field: str) -> bool:
    return bool(getattr(values, field) != getattr(_DEFAULTS, field))


_ZONE_ONLY: Final = (
    "zone",
    "kds_global_address",
    "skip_verify",
    "dp_server_secret",
    "dp_server_ca_key",
    "ingress_enabled",
    "ingress_advertised_address",
    "ingress_advertised_port",
    "egress_enabled",
)
_UNIVERSAL_ONLY: Final = (
    "postgres_port",
    "postgres_tls_mode",
    "postgres_tls_disable_sslsni",
    "postgres_tls_ca_secret_name",
    "postgres_tls_secret_name",
)


def _check_secret_name(field: str, name: str) -> None:
    if name and (len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name)):
        raise InstallError(_key_of(field), f"must be a Secret's name, got {_show(name)}")


def _check_port(key: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise InstallError(key, f"must be a port between 1 and 65535, got {port}")


def _check(values: InstallValues) -> None:
    """The checks that involve more than one key, or more than a key's type."""
    if not values.image or any(char.isspace() for char in values.image):
        raise InstallError(
            "controlPlane.image", f"must be an image reference, got {_show(values.image)}"
        )
    if values.replicas < 1:
        raise InstallError("controlPlane.replicas", f"must be at least 1, got {values.replicas}")
    if values.mode == "zone":
        _check_zone(values)
    else:
        for field in _ZONE_ONLY:
            if _changed(values, field):
                raise InstallError(
                    _key_of(field), "is for zones only (controlPlane.mode=zone), not a global"
                )
    if values.environment == "universal":
        _check_universal(values)
    else:
        for field in _UNIVERSAL_ONLY:
            if _changed(values, field):
                raise InstallError(
                    _key_of(field),
                    "is for a PostgreSQL store only (controlPlane.environment=universal)",
                )


def _check_zone(values: InstallValues) -> None:
    if not values.zone:
        raise InstallError(
            "controlPlane.zone",
            "is required with controlPlane.mode=zone (the default): the zone's name, "
            "e.g. --set controlPlane.zone=zone-1",
        )
    if len(values.zone) > 63 or not _DNS_LABEL.fullmatch(values.zone):
        raise InstallError(
            "controlPlane.zone",
            "must be a DNS-1123 label (at most 63 lower-case letters, digits and '-', "
            f"starting and ending with a letter or digit), got {_show(values.zone)}",
        )
    address_key = "controlPlane.kdsGlobalAddress"
    if not values.kds_global_address:
        raise InstallError(
            address_key, "is required with controlPlane.mode=zone: grpcs://GLOBAL-ADDRESS:5685"
        )
    tls = _grpc_tls(values.kds_global_address)
    if tls is None:
        got = _show(values.kds_global_address)
        raise InstallError(
            address_key, f"must be grpcs://HOST:PORT (grpc:// for plaintext), got {got}"
        )
    if values.skip_verify and not tls:
        raise InstallError(
            "controlPlane.tls.kdsZoneClient.skipVerify",
            f"needs a grpcs:// address in {address_key}, got {_show(values.kds_global_address)}",
        )
    if values.environment != "kubernetes":
        raise InstallError(
            "controlPlane.environment",
            "universal is for a global only: a zone on Kubernetes keeps its resources "
            "as custom resources (controlPlane.environment=kubernetes)",
        )
    _check_secret_name("dp_server_secret", values.dp_server_secret)
    if not _SECRET_KEY.fullmatch(values.dp_server_ca_key):
        raise InstallError(
            "controlPlane.tls.dpServer.caKey",
            f"must be a key of a Secret, got {_show(values.dp_server_ca_key)}",
        )
    address = values.ingress_advertised_address
    if not values.ingress_enabled:
        for field in ("ingress_advertised_address", "ingress_advertised_port"):
            if _changed(values, field):
                raise InstallError(_key_of(field), "needs ingress.enabled=true")
    if address and (any(char.isspace() for char in address) or "/" in address):
        raise InstallError(
            "ingress.advertisedAddress",
            f"must be an IP address or a host name, got {_show(address)}",
        )
    _check_port("ingress.advertisedPort", values.ingress_advertised_port)


def _check_universal(values: InstallValues) -> None:
    if values.mode != "global":
        return  # _check_zone said why
    if not _DIGITS.fullmatch(values.postgres_port) or not 1 <= int(values.postgres_port) <= 65535:
        raise InstallError(
            "postgres.port",
            f"must be a port between 1 and 65535, got {_show(values.postgres_port)}",
        )
    by_env = _settings_by_env()
    host = ("store", "postgres", "host")
    if not any(by_env[secret.env].path == host for secret in values.secrets):
        raise InstallError(
            _SECRETS_KEY,
            "a universal global needs the PostgreSQL host: add an entry with "
            "Env: KUMA_STORE_POSTGRES_HOST (and the database, user and password)",
        )
    _check_secret_name("postgres_tls_ca_secret_name", values.postgres_tls_ca_secret_name)
    _check_secret_name("postgres_tls_secret_name", values.postgres_tls_secret_name)
    if values.postgres_tls_mode == "verifyCa" and not values.postgres_tls_ca_secret_name:
        raise InstallError(
            "postgres.tls.caSecretName",
            "is required with postgres.tls.mode=verifyCa: a Secret whose ca.crt signed "
            "PostgreSQL's certificate",
        )
    if values.postgres_tls_disable_sslsni and values.postgres_tls_mode == "verifyFull":
        raise InstallError(
            "postgres.tls.disableSSLSNI",
            "cannot be combined with postgres.tls.mode=verifyFull (checking the host name "
            "needs the name sent in the handshake): use verifyCa",
        )


# -- building the manifests --------------------------------------------------------------


def _labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": _PART_OF,
        "app.kubernetes.io/version": _version(),
        "app.kubernetes.io/managed-by": "kdsctl",
    }


def _selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": _PART_OF}


def _metadata(name: str, namespace: str | None, component: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    metadata["labels"] = _labels(name, component)
    return metadata


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _dp_server_names(namespace: str) -> list[str]:
    service = CONTROL_PLANE
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def generate_dp_server_tls(namespace: str = DEFAULT_NAMESPACE) -> ServerTls:
    """A new self-signed certificate for a zone's dataplane server in *namespace*.

    Valid for the ``kds-control-plane`` Service's names (``kds-control-plane``,
    ``kds-control-plane.NAMESPACE``, ``kds-control-plane.NAMESPACE.svc`` and
    ``kds-control-plane.NAMESPACE.svc.cluster.local``), so proxies dialling
    ``https://kds-control-plane.NAMESPACE.svc:5678`` can verify it with the
    certificate itself as their CA.
    """
    certificate, key = generate_certificate(
        _dp_server_names(namespace), common_name=f"{CONTROL_PLANE}.{namespace}.svc"
    )
    return ServerTls(certificate, key)


def _namespace(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}


def _service_account(namespace: str, *, automount: bool) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(CONTROL_PLANE, namespace, "control-plane"),
        "automountServiceAccountToken": automount,
    }


def _rbac(namespace: str) -> list[dict[str, Any]]:
    """What the Kubernetes store needs, and nothing more.

    Cluster-wide: listing and registering the CRDs (reading only the kds ones), and
    reading ``kube-system`` and the namespace (their uids identify the store's log).
    In the namespace: the custom resources, and the ConfigMaps the store keeps its own
    records in (its horizon and tracking cursors).
    """
    # Cluster-scoped objects carry the namespace in their name: two installs in one
    # cluster (a global and a zone on a test cluster, say) must not overwrite each
    # other's binding.
    cluster_name = f"{CONTROL_PLANE}-{namespace}"
    crds = [k8s.crd_name(resource_type.name) for resource_type in DEFAULT_CATALOG]
    plurals = [k8s.plural(resource_type.name) for resource_type in DEFAULT_CATALOG]
    subject = {"kind": "ServiceAccount", "name": CONTROL_PLANE, "namespace": namespace}
    crd_group = "apiextensions.k8s.io"
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _metadata(cluster_name, None, "control-plane"),
            "rules": [
                # create and list cannot be limited to names (RBAC ignores
                # resourceNames for them); get can.
                {
                    "apiGroups": [crd_group],
                    "resources": ["customresourcedefinitions"],
                    "verbs": ["list", "create"],
                },
                {
                    "apiGroups": [crd_group],
                    "resources": ["customresourcedefinitions"],
                    "resourceNames": crds,
                    "verbs": ["get"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["namespaces"],
                    # kube-system's uid identifies the cluster in the store's epoch.
                    "resourceNames": sorted({"kube-system", namespace}),
                    "verbs": ["get"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _metadata(cluster_name, None, "control-plane"),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": cluster_name,
            },
            "subjects": [subject],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(CONTROL_PLANE, namespace, "control-plane"),
            "rules": [
                {
                    "apiGroups": [k8s.DEFAULT_GROUP],
                    "resources": plurals,
                    "verbs": ["get", "list", "watch", "create", "update", "delete"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "verbs": ["get", "create", "update"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(CONTROL_PLANE, namespace, "control-plane"),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": CONTROL_PLANE,
            },
            "subjects": [subject],
        },
    ]


def _tls_secret(namespace: str, tls: ServerTls) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(DP_SERVER_TLS_SECRET, namespace, "control-plane"),
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": _b64(tls.certificate),
            "tls.key": _b64(tls.key),
            # Self-signed: the certificate is its own CA (what proxies trust).
            "ca.crt": _b64(tls.certificate),
        },
    }


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _secret_volume(
    name: str, secret: str, items: Sequence[tuple[str, str]] | None = None
) -> dict[str, Any]:
    source: dict[str, Any] = {"secretName": secret, "defaultMode": 0o440}
    if items is not None:
        source["items"] = [{"key": key, "path": path} for key, path in items]
    return {"name": name, "secret": source}


def _mount(name: str, path: str, *, read_only: bool = True) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": name, "mountPath": path}
    if read_only:
        mount["readOnly"] = True
    return mount


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": _UID,
        "runAsGroup": _UID,
        "fsGroup": _UID,  # Secret and emptyDir volumes readable by the container's group
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


_ZONE_TOKEN_DIR: Final = f"{_SECRETS_DIR}/zone-token"
_DP_SERVER_TLS_DIR: Final = f"{_SECRETS_DIR}/dp-server-tls"
_POSTGRES_CA_DIR: Final = f"{_SECRETS_DIR}/postgres-ca"
_POSTGRES_TLS_DIR: Final = f"{_SECRETS_DIR}/postgres-tls"


def _control_plane_env(values: InstallValues) -> list[dict[str, Any]]:
    """The control plane's configuration: environment variables ``kds-cp`` reads."""
    env = [
        _env("KUMA_MODE", values.mode),
        _env("KUMA_ENVIRONMENT", values.environment),
        # The root file system is read-only: the work directory is an emptyDir.
        _env("KDS_GENERAL_WORK_DIR", _WORK_DIR),
        # The Service reaches the API through the pod's address; writes from off the
        # pod need the admin token (<workDir>/admin-token).
        _env("KDS_API_ADDRESS", "0.0.0.0"),  # noqa: S104 -- the Service must reach it
        _env("KDS_API_PORT", str(_API_PORT)),
        _env("KDS_LOG_LEVEL", values.log_level),
    ]
    if values.environment == "kubernetes":
        env.append(
            {
                "name": "KDS_STORE_KUBERNETES_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            }
        )
    else:
        env += [
            _env("KUMA_STORE_TYPE", "postgres"),
            _env("KUMA_STORE_POSTGRES_PORT", values.postgres_port),
            _env("KUMA_STORE_POSTGRES_TLS_MODE", values.postgres_tls_mode),
        ]
        if values.postgres_tls_disable_sslsni:
            env.append(_env("KUMA_STORE_POSTGRES_TLS_DISABLE_SSLSNI", "true"))
        if values.postgres_tls_ca_secret_name:
            env.append(_env("KUMA_STORE_POSTGRES_TLS_CA_PATH", f"{_POSTGRES_CA_DIR}/ca.crt"))
        if values.postgres_tls_secret_name:
            env += [
                _env("KUMA_STORE_POSTGRES_TLS_CERT_PATH", f"{_POSTGRES_TLS_DIR}/tls.crt"),
                _env("KUMA_STORE_POSTGRES_TLS_KEY_PATH", f"{_POSTGRES_TLS_DIR}/tls.key"),
            ]
    if values.mode == "global":
        env.append(_env("KUMA_MULTIZONE_GLOBAL_KDS_GRPC_PORT", str(_KDS_PORT)))
    else:
        env += [
            _env("KUMA_MULTIZONE_ZONE_NAME", values.zone),
            _env("KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS", values.kds_global_address),
            _env("KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY", str(values.skip_verify).lower()),
            _env("KDS_MULTIZONE_ZONE_KDS_CP_TOKEN_PATH", f"{_ZONE_TOKEN_DIR}/{_TOKEN_KEY}"),
            _env("KUMA_DP_SERVER_PORT", str(_DP_SERVER_PORT)),
            _env("KUMA_DP_SERVER_TLS_CERT_FILE", f"{_DP_SERVER_TLS_DIR}/tls.crt"),
            _env("KUMA_DP_SERVER_TLS_KEY_FILE", f"{_DP_SERVER_TLS_DIR}/tls.key"),
        ]
    by_env = _settings_by_env()
    installed = {by_env[item["name"]].path: item["name"] for item in env}
    for secret in values.secrets:
        setting = by_env[secret.env]
        if setting.path in installed:
            raise InstallError(
                f"{_SECRETS_KEY}.{secret.name}.Env",
                f"{secret.env} sets {setting.key}, which the install sets already "
                f"({installed[setting.path]})",
            )
        env.append(
            {
                "name": secret.env,
                "valueFrom": {"secretKeyRef": {"name": secret.secret, "key": secret.key}},
            }
        )
    return env


def _control_plane_volumes(values: InstallValues) -> tuple[list[Any], list[Any]]:
    """The control plane's volumes and their mounts."""
    volumes: list[dict[str, Any]] = [
        {"name": "work", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts = [
        _mount("work", _WORK_DIR, read_only=False),
        _mount("tmp", "/tmp", read_only=False),  # noqa: S108 -- the container's own /tmp
    ]
    if values.mode == "zone":
        volumes += [
            _secret_volume("zone-token", ZONE_TOKEN_SECRET, [(_TOKEN_KEY, _TOKEN_KEY)]),
            _secret_volume(
                "dp-server-tls",
                values.dp_server_secret or DP_SERVER_TLS_SECRET,
                [("tls.crt", "tls.crt"), ("tls.key", "tls.key")],
            ),
        ]
        mounts += [
            _mount("zone-token", _ZONE_TOKEN_DIR),
            _mount("dp-server-tls", _DP_SERVER_TLS_DIR),
        ]
    if values.postgres_tls_ca_secret_name:
        volumes.append(
            _secret_volume(
                "postgres-ca", values.postgres_tls_ca_secret_name, [("ca.crt", "ca.crt")]
            )
        )
        mounts.append(_mount("postgres-ca", _POSTGRES_CA_DIR))
    if values.postgres_tls_secret_name:
        volumes.append(
            _secret_volume(
                "postgres-tls",
                values.postgres_tls_secret_name,
                [("tls.crt", "tls.crt"), ("tls.key", "tls.key")],
            )
        )
        mounts.append(_mount("postgres-tls", _POSTGRES_TLS_DIR))
    return volumes, mounts


def _probe(period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/ready", "port": "http-api"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _pod_annotations(checksum: str | None) -> dict[str, Any]:
    # A new generated certificate changes the pod templates, so `kubectl apply` rolls
    # the pods: the control plane serves it and the proxies trust it from then on.
    return {"annotations": {_CHECKSUM_ANNOTATION: checksum}} if checksum else {}


def _control_plane(
    values: InstallValues, namespace: str, env: list[dict[str, Any]], checksum: str | None
) -> dict[str, Any]:
    volumes, mounts = _control_plane_volumes(values)
    ports = [{"name": "http-api", "containerPort": _API_PORT, "protocol": "TCP"}]
    if values.mode == "global":
        ports.append({"name": "grpc-kds", "containerPort": _KDS_PORT, "protocol": "TCP"})
    else:
        ports.append(
            {"name": "https-dp-server", "containerPort": _DP_SERVER_PORT, "protocol": "TCP"}
        )
    container = {
        "name": "control-plane",
        "image": values.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["kds-cp", "run"],
        "env": env,
        "ports": ports,
        # Start-up may wait for the store (CRDs registered, PostgreSQL reachable): the
        # startup probe gives it five minutes before liveness counts.
        "startupProbe": _probe(5, 60),
        "readinessProbe": _probe(5, 3),
        "livenessProbe": _probe(10, 6),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {
        "serviceAccountName": CONTROL_PLANE,
        "automountServiceAccountToken": values.environment == "kubernetes",
        "securityContext": _pod_security(),
    }
    if values.environment == "universal":
        # Idempotent, and serialised by an advisory lock: safe with several replicas.
        pod["initContainers"] = [
            {
                "name": "migrate",
                "image": values.image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["kds-cp", "migrate", "up"],
                "env": env,
                "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
                "securityContext": _container_security(),
                "volumeMounts": mounts,
            }
        ]
    pod["containers"] = [container]
    pod["volumes"] = volumes
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(CONTROL_PLANE, namespace, "control-plane"),
        "spec": {
            "replicas": values.replicas,
            "selector": {"matchLabels": _selector(CONTROL_PLANE)},
            "template": {
                "metadata": {
                    "labels": _labels(CONTROL_PLANE, "control-plane"),
                    **_pod_annotations(checksum),
                },
                "spec": pod,
            },
        },
    }


def _service(
    name: str,
    namespace: str,
    component: str,
    service_type: str,
    ports: Sequence[tuple[str, int]],
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, component),
        "spec": {
            "type": service_type,
            "selector": _selector(CONTROL_PLANE if component == "control-plane" else name),
            "ports": [
                {"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}
                for port_name, port in ports
            ],
        },
    }


def _proxy(
    kind: Literal["ingress", "egress"], values: InstallValues, namespace: str, checksum: str | None
) -> list[dict[str, Any]]:
    """A zone ingress or egress: its proxy file, ``kds-dp run`` and its Service."""
    name = f"kds-{kind}"
    port = _INGRESS_PORT if kind == "ingress" else _EGRESS_PORT
    networking: dict[str, Any] = {"address": f"{name}.{namespace}.svc", "port": port}
    if kind == "ingress" and values.ingress_advertised_address:
        networking["advertisedAddress"] = values.ingress_advertised_address
        networking["advertisedPort"] = values.ingress_advertised_port
    document = {
        "type": "ZoneIngress" if kind == "ingress" else "ZoneEgress",
        "name": name,
        "networking": networking,
    }
    token_secret = INGRESS_TOKEN_SECRET if kind == "ingress" else EGRESS_TOKEN_SECRET
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, namespace, kind),
        "data": {"dataplane.yaml": yaml.safe_dump(document, sort_keys=False)},
    }
    cp_address = f"https://{CONTROL_PLANE}.{namespace}.svc:{_DP_SERVER_PORT}"
    container = {
        "name": "proxy",
        "image": values.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["kds-dp", "run"],
        "args": [
            f"--proxy-type={kind}",
            f"--cp-address={cp_address}",
            f"--dataplane-token-file={_SECRETS_DIR}/proxy-token/{_TOKEN_KEY}",
            "--dataplane-file=/etc/kds/proxy/dataplane.yaml",
            f"--ca-cert-file={_SECRETS_DIR}/dp-server-ca/ca.crt",
            f"--log-level={values.log_level}",
        ],
        "ports": [{"name": kind, "containerPort": port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": [
            _mount("proxy-token", f"{_SECRETS_DIR}/proxy-token"),
            _mount("proxy-file", "/etc/kds/proxy"),
            _mount("dp-server-ca", f"{_SECRETS_DIR}/dp-server-ca"),
        ],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, namespace, kind),
        "spec": {
            # One proxy under one name: a second registration would supersede the first,
            # so the old pod stops (saying goodbye) before the new one starts.
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": _selector(name)},
            "template": {
                "metadata": {"labels": _labels(name, kind), **_pod_annotations(checksum)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "containers": [container],
                    "volumes": [
                        _secret_volume("proxy-token", token_secret, [(_TOKEN_KEY, _TOKEN_KEY)]),
                        {"name": "proxy-file", "configMap": {"name": name}},
                        # Only the CA: the server's private key stays with the control plane.
                        _secret_volume(
                            "dp-server-ca",
                            values.dp_server_secret or DP_SERVER_TLS_SECRET,
                            [(values.dp_server_ca_key, "ca.crt")],
                        ),
                    ],
                },
            },
        },
    }
    service_type = "LoadBalancer" if kind == "ingress" else "ClusterIP"
    return [config_map, deployment, _service(name, namespace, kind, service_type, [(kind, port)])]


def render_manifests(
    values: InstallValues,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    dp_server_tls: ServerTls | None = None,
) -> list[dict[str, Any]]:
    """The Kubernetes objects that deploy the control plane *values* describe.

    Args:
        values: the checked values (:func:`load_values`).
        namespace: where every namespaced object goes.
        dp_server_tls: a zone's dataplane server certificate, when
            ``controlPlane.tls.dpServer.secret`` names none; ``None`` generates one
            (:func:`generate_dp_server_tls`).

    Returns:
        The objects, in the order ``kubectl apply`` should create them.

    Raises:
        InstallError: *namespace* is not a DNS-1123 label, or an entry of
            ``controlPlane.secrets`` sets what the install sets itself.
    """
    if len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace):
        raise InstallError(
            "--namespace",
            f"must be a DNS-1123 label (at most 63 lower-case letters, digits and '-'), "
            f"got {_show(namespace)}",
        )
    env = _control_plane_env(values)
    kubernetes = values.environment == "kubernetes"
    manifests = [_namespace(namespace)]
    if kubernetes:
        manifests += k8s.crd_manifests(DEFAULT_CATALOG)
    manifests.append(_service_account(namespace, automount=kubernetes))
    if kubernetes:
        manifests += _rbac(namespace)
    checksum = None
    if values.mode == "zone" and not values.dp_server_secret:
        tls = dp_server_tls if dp_server_tls is not None else generate_dp_server_tls(namespace)
        manifests.append(_tls_secret(namespace, tls))
        checksum = hashlib.sha256(tls.certificate).hexdigest()
    manifests.append(_control_plane(values, namespace, env, checksum))
    ports = [("http-api", _API_PORT)]
    if values.mode == "zone":
        ports.append(("https-dp-server", _DP_SERVER_PORT))
    manifests.append(_service(CONTROL_PLANE, namespace, "control-plane", "ClusterIP", ports))
    if values.mode == "global":
        manifests.append(
            _service(
                GLOBAL_ZONE_SYNC,
                namespace,
                "control-plane",
                "LoadBalancer",
                [("grpc-kds", _KDS_PORT)],
            )
        )
    if values.ingress_enabled:
        manifests += _proxy("ingress", values, namespace, checksum)
    if values.egress_enabled:
        manifests += _proxy("egress", values, namespace, checksum)
    return manifests


class _Dumper(yaml.SafeDumper):
    """Writes text of several lines (a ConfigMap's file) as a literal block, as typed."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_manifests(manifests: Iterable[Mapping[str, Any]]) -> str:
    """*manifests* as one YAML stream, each document starting with ``---``."""
    return yaml.dump_all(
        [dict(manifest) for manifest in manifests],
        Dumper=_Dumper,
        explicit_start=True,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )
