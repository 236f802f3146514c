"""Zone and dataplane tokens: RS256 JWTs signed with keys kept in the global's store.

A **zone token** proves who a zone is (``Zone``) and what it may do (``Scope``):
``cp`` lets a zone control plane replicate with the global, ``ingress`` and
``egress`` let zone proxies register with their zone control plane. A **dataplane
token** lets a proxy register Dataplanes of one mesh (and, if it names one, only the
Dataplane of that name) with a zone control plane.

Keys and revocations are GlobalSecrets of the global's store (Kuma's names), so the
global's replication carries what zones need to check tokens themselves:

* ``zone-token-signing-key-<serial>``: an RSA private key (PEM, PKCS #8, base64 in
  ``data``). The newest serial signs; it **never** leaves the global
  (:mod:`kds.sync.rules` withholds the names);
* ``zone-token-signing-public-key-<serial>``: its public key, which zones receive;
  every key present verifies the tokens it signed (the token header's ``kid`` is the
  serial), so a key rotation does not invalidate tokens already issued;
* ``zone-token-revocations``: the ids (``jti``) of revoked tokens, comma-separated,
  base64 in ``data``.

Only GlobalSecrets labelled ``kuma.io/origin: global`` count: on a zone those are the
global's copies, so a key written into the zone's own store (through its API) can
neither sign nor vouch for anything.

Verification never trusts a token's own claims about how it was signed: only RS256
is accepted (``alg: none`` and HMAC tokens "signed" with a public key are refused
before any key is used) and the key is chosen from the store by the ``kid``. Error
messages say what was wrong with a token, never what the token is.

>>> token = await issue_zone_token(store, zone="zone-1", scopes=["cp"])  # doctest: +SKIP
>>> await TokenVerifier(store).verify_zone_token(token, zone="zone-1", scope="cp")  # doctest: +SKIP
ZoneTokenClaims(zone='zone-1', scopes=frozenset({'cp'}), ...)
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kds.errors import ConflictError, KdsError, NotFoundError, ValidationError
from kds.resource import LABEL_ORIGIN, ORIGIN_GLOBAL, ResourceKey
from kds.store import MUST_NOT_EXIST, Delete, Upsert
from kds.sync.engines import ZoneRefused

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from kds.protocol import Hello
    from kds.resource import Resource
    from kds.store import Store
    from kds.transport import PeerInfo

__all__ = [
    "DEFAULT_VALIDITY",
    "MAX_VALIDITY",
    "PUBLIC_KEY_PREFIX",
    "REVOCATIONS_NAME",
    "SIGNING_KEY_PREFIX",
    "ZONE_SCOPES",
    "BadSignatureError",
    "DataplaneTokenClaims",
    "ExpiredTokenError",
    "LastSigningKeyError",
    "MalformedTokenError",
    "MissingTokenError",
    "NotYetValidTokenError",
    "RevokedTokenError",
    "TokenError",
    "TokenVerifier",
    "UnknownSigningKeyError",
    "UnusableSigningKeyError",
    "WrongMeshError",
    "WrongNameError",
    "WrongScopeError",
    "WrongTokenKindError",
    "WrongZoneError",
    "ZoneTokenClaims",
    "check_mesh",
    "check_proxy_name",
    "check_scopes",
    "check_token_id",
    "check_validity",
    "check_zone",
    "issue_dataplane_token",
    "issue_zone_token",
    "parse_duration",
    "remove_signing_key",
    "revoke",
    "rotate_signing_key",
    "signing_key_serials",
    "token_id",
    "zone_authenticator",
]

logger = logging.getLogger(__name__)

ZONE_SCOPES: Final = frozenset({"cp", "ingress", "egress"})
"""What a zone token may allow: ``cp`` (a zone control plane replicating with the
global), ``ingress`` and ``egress`` (zone proxies registering with their zone)."""

DEFAULT_VALIDITY: Final = timedelta(hours=720)
"""How long a token is valid unless told otherwise (30 days, as Kuma)."""

MAX_VALIDITY: Final = timedelta(days=3650)
"""The longest validity a token may have (10 years): tokens always expire."""

SIGNING_KEY_PREFIX: Final = "zone-token-signing-key-"
"""GlobalSecret name prefix of the private signing keys (suffix: the serial)."""

PUBLIC_KEY_PREFIX: Final = "zone-token-signing-public-key-"
"""GlobalSecret name prefix of the public keys zones verify with (suffix: the serial)."""

REVOCATIONS_NAME: Final = "zone-token-revocations"
"""GlobalSecret holding the ids of revoked tokens."""

KEY_SIZE: Final = 2048  # bits of a generated RSA key
MIN_KEY_SIZE: Final = 2048  # bits: a smaller stored key is refused rather than trusted
MAX_TOKEN_LENGTH: Final = 8192  # characters; ours are under 1000
CLOCK_SKEW: Final = timedelta(seconds=60)  # a token issued "in the future" by this much is fine
DEFAULT_CACHE_AGE: Final = 1.0  # seconds a verifier may keep keys while the store changes

_ALGORITHM: Final = "RS256"
_KIND_ZONE: Final = "zone"
_KIND_DATAPLANE: Final = "dataplane"
_MAX_SERIAL_DIGITS: Final = 9
_MAX_TOKEN_ID_LENGTH: Final = 128
_ATTEMPTS: Final = 10  # read-modify-write tries against concurrent writers (HA globals)
_LABELS: Final = {LABEL_ORIGIN: ORIGIN_GLOBAL}
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# -- errors ------------------------------------------------------------------------------


class TokenError(KdsError):
    """Raised when a token is refused; the message says why, never what the token is.

    Each subclass is one reason. ``str()`` is one line for the refused party's log.

    Attributes:
        kind: ``"zone"`` or ``"dataplane"``: the kind of token that was checked.
    """

    def __init__(self, message: str, *, kind: str = _KIND_ZONE) -> None:
        super().__init__(message)
        self.kind = kind


class MissingTokenError(TokenError):
    """Raised when no token was given where one is required."""

    def __init__(self, kind: str, hint: str = "") -> None:
        super().__init__(
            f"no {kind} token was given, and this control plane requires one{hint}", kind=kind
        )


class MalformedTokenError(TokenError):
    """Raised when a token is not a JWT this control plane issues.

    Not three base64url parts of JSON, an algorithm other than RS256 (``none``, or
    HMAC: the key-confusion attack), no key id, a wrong signature length, or claims
    of the wrong shape.

    Attributes:
        reason: what is wrong with it.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind} token is malformed: {reason}", kind=kind)
        self.reason = reason


class WrongTokenKindError(TokenError):
    """Raised when a dataplane token is given where a zone token is required, or the reverse.

    Attributes:
        actual: the kind of the token given.
    """

    def __init__(self, kind: str, actual: str) -> None:
        super().__init__(f"a {kind} token is required, but this is a {actual} token", kind=kind)
        self.actual = actual


class ExpiredTokenError(TokenError):
    """Raised when a token's expiry time has passed.

    Attributes:
        expired_at: when it expired (UTC).
        token_id: its id (``jti``).
    """

    def __init__(self, kind: str, expired_at: datetime, token_id: str) -> None:
        super().__init__(
            f"{kind} token expired at {_format_time(expired_at)} (id {token_id}): "
            "generate a new one",
            kind=kind,
        )
        self.expired_at = expired_at
        self.token_id = token_id


class NotYetValidTokenError(TokenError):
    """Raised when a token is not valid yet (its ``nbf`` is ahead of this clock).

    Attributes:
        valid_from: when it becomes valid (UTC).
        token_id: its id (``jti``).
    """

    def __init__(self, kind: str, valid_from: datetime, token_id: str) -> None:
        super().__init__(
            f"{kind} token is not valid before {_format_time(valid_from)} (id {token_id}): "
            "check the clocks of the control planes",
            kind=kind,
        )
        self.valid_from = valid_from
        self.token_id = token_id


class RevokedTokenError(TokenError):
    """Raised when a token's id is on the revocation list.

    Attributes:
        token_id: its id (``jti``).
    """

    def __init__(self, kind: str, token_id: str) -> None:
        super().__init__(f"{kind} token was revoked (id {token_id})", kind=kind)
        self.token_id = token_id


class WrongZoneError(TokenError):
    """Raised when a zone token was issued for another zone.

    Attributes:
        expected: the zone it had to be for.
        actual: the zone it is for.
    """

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"zone token is for zone {actual!r}, not {expected!r}")
        self.expected = expected
        self.actual = actual


class WrongScopeError(TokenError):
    """Raised when a zone token does not allow what it is used for.

    Attributes:
        required: the scope it needed.
        scopes: the scopes it has.
    """

    def __init__(self, required: str, scopes: Collection[str]) -> None:
        has = ", ".join(sorted(scopes)) or "none"
        super().__init__(f"zone token lacks scope {required!r} (it has: {has})")
        self.required = required
        self.scopes = frozenset(scopes)


class WrongMeshError(TokenError):
    """Raised when a dataplane token was issued for another mesh.

    Attributes:
        expected: the mesh it had to be for.
        actual: the mesh it is for.
    """

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"dataplane token is for mesh {actual!r}, not {expected!r}", kind=_KIND_DATAPLANE
        )
        self.expected = expected
        self.actual = actual


class WrongNameError(TokenError):
    """Raised when a dataplane token names another Dataplane.

    Attributes:
        expected: the Dataplane registering.
        actual: the Dataplane the token is for.
    """

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"dataplane token is for dataplane {actual!r}, not {expected!r}",
            kind=_KIND_DATAPLANE,
        )
        self.expected = expected
        self.actual = actual


class UnknownSigningKeyError(TokenError):
    """Raised when a token names a signing key this control plane does not have (or cannot use).

    The key was removed after a rotation, the token comes from another global, or
    (on a zone) the key has not replicated yet.

    Attributes:
        serial: the key's serial (the token's ``kid``).
    """

    def __init__(self, kind: str, serial: int, problem: str | None = None) -> None:
        if problem is None:
            message = (
                f"{kind} token was signed with signing key {serial}, which this control "
                "plane does not have"
            )
        else:
            message = (
                f"{kind} token was signed with signing key {serial}, which this control "
                f"plane cannot use: {problem}"
            )
        super().__init__(message, kind=kind)
        self.serial = serial


class BadSignatureError(TokenError):
    """Raised when a token's signature does not verify: it was altered or forged.

    Attributes:
        serial: the key it claims to be signed with.
    """

    def __init__(self, kind: str, serial: int) -> None:
        super().__init__(
            f"{kind} token's signature does not match signing key {serial}: the token "
            "was altered or not issued by this global",
            kind=kind,
        )
        self.serial = serial


class UnusableSigningKeyError(KdsError):
    """Raised when the newest signing key in the store cannot sign (its GlobalSecret is damaged).

    Attributes:
        serial: the key's serial.
    """

    def __init__(self, serial: int, problem: str) -> None:
        super().__init__(
            f"zone token signing key {serial} cannot be used: {problem}; "
            "create a new one (kdsctl rotate zone-token-signing-key)"
        )
        self.serial = serial


class LastSigningKeyError(KdsError, ValueError):
    """Raised when removing the only signing key: no token could be issued afterwards.

    Attributes:
        serial: the key that was to be removed.
    """

    def __init__(self, serial: int) -> None:
        super().__init__(
            f"signing key {serial} is the only zone token signing key: rotate first "
            "(a new key signs), then remove the old one"
        )
        self.serial = serial


# -- claims ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ZoneTokenClaims:
    """What a verified zone token says.

    Attributes:
        zone: the zone it was issued for.
        scopes: what it allows (``cp``, ``ingress``, ``egress``).
        token_id: its id (``jti``), what revocation names.
        issued_at: when it was issued (UTC).
        expires_at: when it expires (UTC).
        serial: the signing key that signed it.
    """

    zone: str
    scopes: frozenset[str]
    token_id: str
    issued_at: datetime
    expires_at: datetime
    serial: int


@attrs.frozen(kw_only=True)
class DataplaneTokenClaims:
    """What a verified dataplane token says.

    Attributes:
        mesh: the mesh whose Dataplanes it may register.
        name: the only Dataplane it may register, or ``None`` for any in *mesh*.
        token_id: its id (``jti``), what revocation names.
        issued_at: when it was issued (UTC).
        expires_at: when it expires (UTC).
        serial: the signing key that signed it.
    """

    mesh: str
    name: str | None
    token_id: str
    issued_at: datetime
    expires_at: datetime
    serial: int


# -- checks shared with the API and kdsctl ------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """A validity as kumactl writes it: ``720h``, ``30m``, ``10s``, ``1h30m``, ``1.5h``, ``7d``.

    Raises:
        ValueError: *text* is not such a duration (the message shows the forms).
    """
    compact = text.strip()
    position = 0
    seconds = 0.0
    for match in _DURATION.finditer(compact):
        if match.start() != position:
            break
        seconds += float(match[1]) * _DURATION_UNITS[match[2]]
        position = match.end()
    if not compact or position != len(compact):
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit (ms, s, m, h, d), "
            "such as 720h, 30m or 1h30m"
        )
    return timedelta(seconds=seconds)


def check_validity(valid_for: timedelta) -> None:
    """Check a token's validity period: more than zero, at most :data:`MAX_VALIDITY`.

    Raises:
        ValueError: it is not a timedelta, not positive, or longer than 10 years.
    """
    if not isinstance(valid_for, timedelta):
        raise ValueError(f"must be a duration, got {type(valid_for).__name__}")
    if valid_for < timedelta(seconds=1):
        raise ValueError(
            "must be at least 1s: tokens always expire, and one that is never valid is useless"
        )
    if valid_for > MAX_VALIDITY:
        raise ValueError(f"must be at most {MAX_VALIDITY.days}d (10 years)")


def check_zone(zone: object) -> str:
    """Check a zone name as a Zone resource's name; return it.

    Raises:
        ValueError: it is not a valid resource name.
    """
    return _check_resource_name("Zone", zone)


def check_mesh(mesh: object) -> str:
    """Check a mesh name as a Mesh resource's name; return it.

    Raises:
        ValueError: it is not a valid resource name.
    """
    return _check_resource_name("Mesh", mesh)


def check_proxy_name(name: object) -> str:
    """Check a Dataplane name; return it.

    Raises:
        ValueError: it is not a valid resource name.
    """
    return _check_resource_name("Dataplane", name)


def _check_resource_name(type_name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    try:
        ResourceKey(type_name, None, value).validate()
    except ValidationError as exc:
        raise ValueError(exc.reason) from None
    return value


def check_scopes(scopes: object) -> frozenset[str]:
    """Check the scopes of a zone token; return them as a set.

    Raises:
        ValueError: not a collection of strings, empty, or naming an unknown scope.
    """
    if isinstance(scopes, str):
        scopes = (scopes,)
    if not isinstance(scopes, Collection) or isinstance(scopes, Mapping | bytes):
        raise ValueError(f"must be a list of scopes, got {type(scopes).__name__}")
    known = ", ".join(sorted(ZONE_SCOPES))
    result = set()
    for scope in scopes:
        if not isinstance(scope, str):
            raise ValueError(f"scopes must be strings, got {type(scope).__name__}")
        if scope not in ZONE_SCOPES:
            raise ValueError(f"unknown scope {scope!r}: use {known}")
        result.add(scope)
    if not result:
        raise ValueError(f"give at least one scope ({known})")
    return frozenset(result)


def check_token_id(token_id: object) -> str:
    """Check a token id to revoke (a ``jti``); return it.

    Raises:
        ValueError: not a non-empty string of printable characters without commas or
            whitespace, or longer than 128 characters.
    """
    if not isinstance(token_id, str):
        raise ValueError(f"must be a string, got {type(token_id).__name__}")
    if not token_id:
        raise ValueError("must not be empty")
    if len(token_id) > _MAX_TOKEN_ID_LENGTH:
        raise ValueError(f"is {len(token_id)} characters long; token ids are at most 128")
    if not token_id.isprintable() or any(c.isspace() or c == "," for c in token_id):
        raise ValueError(
            f"{token_id!r} is not a token id (no commas, spaces or control characters)"
        )
    return token_id


def token_id(token: str, *, kind: str = _KIND_ZONE) -> str:
    """The id (``jti``) of a token, read without verifying it: what :func:`revoke` takes.

    Args:
        token: the token.
        kind: ``"zone"`` or ``"dataplane"``, for the error message.

    Raises:
        MissingTokenError: *token* is empty.
        MalformedTokenError: *token* is not a JWT with a string ``jti`` claim.
    """
    parts = _Parts.split(token, kind)
    jti = parts.payload.get("jti")
    if not isinstance(jti, str) or not jti:
        raise MalformedTokenError(kind, "it has no token id (jti claim)")
    return jti


# -- keys in the store ------------------------------------------------------------------


def _private_key_key(serial: int) -> ResourceKey:
    return ResourceKey("GlobalSecret", None, f"{SIGNING_KEY_PREFIX}{serial}")


def _public_key_key(serial: int) -> ResourceKey:
    return ResourceKey("GlobalSecret", None, f"{PUBLIC_KEY_PREFIX}{serial}")


_REVOCATIONS_KEY: Final = ResourceKey("GlobalSecret", None, REVOCATIONS_NAME)


def _serial(name: str, prefix: str) -> int | None:
    """The serial of a key's GlobalSecret name, or ``None`` if it is not such a name."""
    if not name.startswith(prefix):
        return None
    suffix = name[len(prefix) :]
    # "01" or "+1" would name key 1 a second time: only canonical numbers count.
    if not (suffix.isascii() and suffix.isdigit()) or len(suffix) > _MAX_SERIAL_DIGITS:
        return None
    if suffix != str(int(suffix)) or int(suffix) == 0:
        return None
    return int(suffix)


def _trusted(resource: Resource) -> bool:
    """Only the global's GlobalSecrets count (on a zone: the copies it received)."""
    return resource.labels.get(LABEL_ORIGIN) == ORIGIN_GLOBAL


async def _key_secrets(store: Store) -> tuple[dict[int, Resource], dict[int, Resource]]:
    """The trusted private and public key GlobalSecrets, by serial."""
    private: dict[int, Resource] = {}
    public: dict[int, Resource] = {}
    for resource in await store.list_resources("GlobalSecret"):
        if not _trusted(resource):
            continue
        name = resource.key.name
        serial = _serial(name, SIGNING_KEY_PREFIX)
        if serial is not None:
            private[serial] = resource
            continue
        serial = _serial(name, PUBLIC_KEY_PREFIX)
        if serial is not None:
            public[serial] = resource
    return private, public


async def signing_key_serials(store: Store) -> list[int]:
    """The serials of the signing keys (private keys) in *store*, oldest first.

    The last one signs new tokens. Empty on a zone (it has public keys only) and on a
    global that never issued a token.
    """
    private, _ = await _key_secrets(store)
    return sorted(private)


def _pem_of(resource: Resource) -> bytes:
    data = resource.spec.get("data")
    if not isinstance(data, str):
        raise ValueError(f"GlobalSecret {resource.key.name!r} has no data")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"GlobalSecret {resource.key.name!r}: data is not base64") from None


@functools.lru_cache(maxsize=64)
def _load_private(pem: bytes) -> rsa.RSAPrivateKey:
    # Parsing checks the key, which takes milliseconds: keep the parsed keys.
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM private key: {type(exc).__name__}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"not an RSA key but {type(key).__name__}")
    if key.key_size < MIN_KEY_SIZE:
        raise ValueError(f"an RSA key of {key.key_size} bits; at least {MIN_KEY_SIZE} are needed")
    return key


@functools.lru_cache(maxsize=64)
def _load_public(pem: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key: {type(exc).__name__}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"not an RSA key but {type(key).__name__}")
    if key.key_size < MIN_KEY_SIZE:
        raise ValueError(f"an RSA key of {key.key_size} bits; at least {MIN_KEY_SIZE} are needed")
    return key


def _generate() -> tuple[str, str]:
    """A new RSA key pair as GlobalSecret data: base64 of PKCS #8 and SubjectPublicKeyInfo PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(private).decode("ascii"), base64.b64encode(public).decode("ascii")


async def _create_key(store: Store, serial: int, pair: tuple[str, str]) -> None:
    """Store key *serial* (private and public in one commit); ConflictError if taken."""
    private, public = pair
    await store.commit(
        [
            Upsert(
                key=_private_key_key(serial),
                labels=_LABELS,
                spec={"data": private},
                expected_version=MUST_NOT_EXIST,
            ),
            Upsert(
                key=_public_key_key(serial),
                labels=_LABELS,
                spec={"data": public},
                expected_version=MUST_NOT_EXIST,
            ),
        ]
    )


async def _signing_key(store: Store) -> tuple[int, rsa.RSAPrivateKey]:
    """The newest signing key, created (serial 1) when there is none."""
    pair: tuple[str, str] | None = None
    for _ in range(_ATTEMPTS):
        private, public = await _key_secrets(store)
        if private:
            serial = max(private)
            try:
                return serial, _load_private(_pem_of(private[serial]))
            except ValueError as exc:
                raise UnusableSigningKeyError(serial, str(exc)) from None
        if pair is None:
            # Generating takes a while: not on the event loop.
            pair = await anyio.to_thread.run_sync(_generate)
        serial = max(public, default=0) + 1
        try:
            await _create_key(store, serial, pair)
        except ConflictError:
            continue  # another global instance created it first: use theirs
        logger.info("created zone token signing key %d", serial)
    raise ConflictError("zone token signing keys kept changing; retry")


# -- issuing ----------------------------------------------------------------------------


def _sign(key: rsa.RSAPrivateKey, serial: int, claims: dict[str, Any], valid_for: timedelta) -> str:
    now = int(time.time())
    payload = {
        **claims,
        "jti": str(uuid.uuid4()),
        "iat": now,
        "nbf": now,
        "exp": now + max(1, int(valid_for.total_seconds())),
    }
    return jwt.encode(payload, key, algorithm=_ALGORITHM, headers={"kid": str(serial)})


async def issue_zone_token(
    store: Store,
    *,
    zone: str,
    scopes: Collection[str],
    valid_for: timedelta = DEFAULT_VALIDITY,
) -> str:
    """Issue a zone token for *zone* with *scopes*, signed by the newest signing key.

    The first token issued creates signing key 1. Two globals doing so at once
    create one key: the second one's commit conflicts and it uses the first's.

    Args:
        store: the global's store.
        zone: the zone the token is for.
        scopes: what it allows: ``cp``, ``ingress``, ``egress`` (at least one).
        valid_for: how long it is valid (at most :data:`MAX_VALIDITY`).

    Returns:
        The token (a JWT).

    Raises:
        ValidationError: *zone*, *scopes* or *valid_for* is not valid (naming which).
        ConflictError: the keys kept changing under concurrent writers.
        UnusableSigningKeyError: the newest signing key's GlobalSecret is damaged.
    """
    zone = _field("zone", check_zone, zone)
    scope_set = _field("scopes", check_scopes, scopes)
    _field("valid_for", check_validity, valid_for)
    serial, key = await _signing_key(store)
    # Kuma's claim names; "Kind" tells zone and dataplane tokens apart.
    claims = {"Kind": _KIND_ZONE, "Zone": zone, "Scope": sorted(scope_set)}
    return _sign(key, serial, claims, valid_for)


async def issue_dataplane_token(
    store: Store,
    *,
    mesh: str,
    name: str | None = None,
    valid_for: timedelta = DEFAULT_VALIDITY,
) -> str:
    """Issue a dataplane token for proxies of *mesh* (only the Dataplane *name*, if given).

    Args:
        store: the global's store.
        mesh: the mesh whose Dataplanes it may register.
        name: the only Dataplane it may register; any in *mesh* when ``None``.
        valid_for: how long it is valid (at most :data:`MAX_VALIDITY`).

    Returns:
        The token (a JWT).

    Raises:
        ValidationError: *mesh*, *name* or *valid_for* is not valid (naming which).
        ConflictError: the keys kept changing under concurrent writers.
        UnusableSigningKeyError: the newest signing key's GlobalSecret is damaged.
    """
    mesh = _field("mesh", check_mesh, mesh)
    if name is not None:
        name = _field("name", check_proxy_name, name)
    _field("valid_for", check_validity, valid_for)
    serial, key = await _signing_key(store)
    claims: dict[str, Any] = {"Kind": _KIND_DATAPLANE, "Mesh": mesh}
    if name is not None:
        claims["Name"] = name
    return _sign(key, serial, claims, valid_for)


def _field(field: str, check: Callable[[Any], Any], value: Any) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise ValidationError(field, str(exc)) from None


# -- keys and revocations ----------------------------------------------------------------


async def rotate_signing_key(store: Store) -> int:
    """Create a new signing key; it signs every token issued from now on.

    Tokens signed with older keys stay valid until those keys are removed
    (:func:`remove_signing_key`).

    Returns:
        The new key's serial (one more than the highest so far).

    Raises:
        ConflictError: the keys kept changing under concurrent writers.
    """
    pair = await anyio.to_thread.run_sync(_generate)
    for _ in range(_ATTEMPTS):
        private, public = await _key_secrets(store)
        serial = max([*private, *public], default=0) + 1
        try:
            await _create_key(store, serial, pair)
        except ConflictError:
            continue
        logger.info("created zone token signing key %d", serial)
        return serial
    raise ConflictError("zone token signing keys kept changing; retry")


async def remove_signing_key(store: Store, serial: int) -> None:
    """Remove signing key *serial* (private and public): the tokens it signed stop verifying.

    Raises:
        NotFoundError: there is no key *serial*.
        LastSigningKeyError: it is the only signing key.
    """
    private, public = await _key_secrets(store)
    if serial not in private and serial not in public:
        raise NotFoundError(_private_key_key(serial))
    if serial in private and set(private) == {serial}:
        raise LastSigningKeyError(serial)
    await store.commit(
        [
            Delete(key=_private_key_key(serial), missing_ok=True),
            Delete(key=_public_key_key(serial), missing_ok=True),
        ]
    )
    logger.info("removed zone token signing key %d", serial)


def _revoked_ids(resource: Resource | None) -> list[str]:
    """The ids of a revocation GlobalSecret, in order (Kuma's format: comma-separated)."""
    if resource is None:
        return []
    text = _pem_of(resource).decode("utf-8", errors="strict")
    return [item.strip() for item in text.split(",") if item.strip()]


async def revoke(store: Store, token_ids: Collection[str]) -> None:
    """Add *token_ids* (``jti`` claims) to the revocation list; those tokens are refused.

    The list replicates to zones, which refuse the revoked tokens of their proxies
    too. Revoking an id twice changes nothing.

    Raises:
        ValidationError: an id is not a token id (field ``token_ids[i]``), or none is given.
        ConflictError: the list kept changing under concurrent writers.
    """
    if isinstance(token_ids, str):
        token_ids = (token_ids,)
    ids = [_field(f"token_ids[{i}]", check_token_id, t) for i, t in enumerate(token_ids)]
    if not ids:
        raise ValidationError("token_ids", "give at least one token id")
    for _ in range(_ATTEMPTS):
        existing = await store.find(_REVOCATIONS_KEY)
        try:
            current = _revoked_ids(existing)
        except (ValueError, UnicodeDecodeError):
            current = []  # unreadable: the list written now replaces it
        merged = current + sorted({i for i in ids if i not in current})
        if existing is not None and merged == current:
            return
        data = base64.b64encode(",".join(merged).encode("utf-8")).decode("ascii")
        try:
            await store.commit(
                [
                    Upsert(
                        key=_REVOCATIONS_KEY,
                        labels=_LABELS,
                        spec={"data": data},
                        expected_version=existing.version if existing else MUST_NOT_EXIST,
                    )
                ]
            )
        except ConflictError:
            continue
        logger.info("revoked %d token(s)", len(merged) - len(current))
        return
    raise ConflictError("the token revocation list kept changing; retry")


# -- verifying ---------------------------------------------------------------------------


@attrs.frozen
class _KeyRing:
    """What a verifier read from the store: the keys by serial, and the revoked ids."""

    head: int
    loaded_at: float
    keys: Mapping[int, rsa.RSAPublicKey | str]
    """A usable public key, or why the key with that serial cannot be used."""
    revoked: frozenset[str] | str
    """The revoked ids, or why the revocation list cannot be read."""


def _b64url(segment: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", segment):
        raise ValueError("characters outside base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@attrs.frozen
class _Parts:
    """A token split into its header, payload and signature (none of them verified)."""

    kind: str
    text: str
    """The token without surrounding whitespace."""
    header: dict[str, Any]
    payload: dict[str, Any]
    signature: bytes

    @classmethod
    def split(cls, token: str | None, kind: str, hint: str = "") -> _Parts:
        if not isinstance(token, str) or not token.strip():
            raise MissingTokenError(kind, hint)
        token = token.strip()
        if len(token) > MAX_TOKEN_LENGTH:
            raise MalformedTokenError(
                kind, f"it is {len(token)} characters long; tokens are at most {MAX_TOKEN_LENGTH}"
            )
        if not token.isascii():
            raise MalformedTokenError(kind, "it contains characters other than ASCII")
        pieces = token.split(".")
        if len(pieces) != 3:  # header, payload, signature
            raise MalformedTokenError(
                kind, f"it has {len(pieces)} dot-separated parts; a JWT has 3"
            )
        decoded = []
        for part, piece in zip(("header", "payload"), pieces[:2], strict=True):
            try:
                value = json.loads(_b64url(piece))
            except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
                raise MalformedTokenError(kind, f"its {part} is not base64url JSON") from None
            if not isinstance(value, dict):
                raise MalformedTokenError(kind, f"its {part} is not a JSON object")
            decoded.append(value)
        try:
            signature = _b64url(pieces[2])
        except (ValueError, binascii.Error):
            raise MalformedTokenError(kind, "its signature is not base64url") from None
        return cls(kind, token, decoded[0], decoded[1], signature)


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _timestamp(payload: Mapping[str, Any], claim: str, kind: str) -> datetime:
    value = payload.get(claim)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedTokenError(kind, f"its {claim!r} claim is not a time")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise MalformedTokenError(kind, f"its {claim!r} claim is out of range") from None


def _utc_now() -> datetime:
    return datetime.now(UTC)


class TokenVerifier:
    """Checks zone and dataplane tokens against the keys and revocations in a store.

    Works on the global (it derives public keys from the private ones it has) and on
    zones (the public keys and revocation list they received). Keys and revocations
    are read again whenever the store changed, at most once per *max_age* seconds
    while it keeps changing: a rotation or revocation takes effect within that.

    Args:
        store: the control plane's store.
        max_age: seconds read keys may serve while the store changes (0: read them
            again after every change).
        clock: the current time (UTC); for tests.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_age: float = DEFAULT_CACHE_AGE,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.store = store
        self.max_age = max_age
        self.clock = clock
        self._ring: _KeyRing | None = None
        self._lock = anyio.Lock()
        self._reported: set[str] = set()

    def __repr__(self) -> str:
        return f"TokenVerifier({self.store!r})"

    async def verify_zone_token(
        self, token: str | None, *, zone: str | None, scope: str
    ) -> ZoneTokenClaims:
        """Check a zone token for *zone* (any zone when ``None``) that allows *scope*.

        Returns:
            The token's claims.

        Raises:
            MissingTokenError: *token* is ``None`` or empty.
            MalformedTokenError: it is not a token this control plane issues.
            WrongTokenKindError: it is a dataplane token.
            UnknownSigningKeyError: its key is not (or no longer) in the store.
            BadSignatureError: its signature does not verify.
            RevokedTokenError: it was revoked.
            ExpiredTokenError: it expired.
            NotYetValidTokenError: it is not valid yet.
            WrongZoneError: it is for another zone.
            WrongScopeError: it does not allow *scope*.
            TokenError: the store's revocation list cannot be read (nothing is admitted).
        """
        hint = (
            f": generate one on the global with `kdsctl generate zone-token --zone "
            f"{zone or '<zone>'} --scope {scope}`"
        )
        payload, serial, common = await self._verify(token, _KIND_ZONE, hint)
        kind = _KIND_ZONE
        claimed_zone = payload.get("Zone")
        if not isinstance(claimed_zone, str) or not claimed_zone:
            raise MalformedTokenError(kind, "its 'Zone' claim is not a zone name")
        raw_scopes = payload.get("Scope")
        if not isinstance(raw_scopes, list) or not all(isinstance(s, str) for s in raw_scopes):
            raise MalformedTokenError(kind, "its 'Scope' claim is not a list of scopes")
        scopes = frozenset(raw_scopes)
        if zone is not None and claimed_zone != zone:
            raise WrongZoneError(zone, claimed_zone)
        if scope not in scopes:
            raise WrongScopeError(scope, scopes)
        return ZoneTokenClaims(zone=claimed_zone, scopes=scopes, serial=serial, **common)

    async def verify_dataplane_token(
        self, token: str | None, *, mesh: str, name: str
    ) -> DataplaneTokenClaims:
        """Check a dataplane token for the Dataplane *name* of *mesh*.

        Returns:
            The token's claims.

        Raises:
            MissingTokenError: *token* is ``None`` or empty.
            MalformedTokenError: it is not a token this control plane issues.
            WrongTokenKindError: it is a zone token.
            UnknownSigningKeyError: its key is not (or no longer) in the store.
            BadSignatureError: its signature does not verify.
            RevokedTokenError: it was revoked.
            ExpiredTokenError: it expired.
            NotYetValidTokenError: it is not valid yet.
            WrongMeshError: it is for another mesh.
            WrongNameError: it names another Dataplane.
            TokenError: the store's revocation list cannot be read (nothing is admitted).
        """
        hint = f": generate one on the global with `kdsctl generate dataplane-token --mesh {mesh}`"
        payload, serial, common = await self._verify(token, _KIND_DATAPLANE, hint)
        kind = _KIND_DATAPLANE
        claimed_mesh = payload.get("Mesh")
        if not isinstance(claimed_mesh, str) or not claimed_mesh:
            raise MalformedTokenError(kind, "its 'Mesh' claim is not a mesh name")
        claimed_name = payload.get("Name")
        if claimed_name is not None and (not isinstance(claimed_name, str) or not claimed_name):
            raise MalformedTokenError(kind, "its 'Name' claim is not a dataplane name")
        if claimed_mesh != mesh:
            raise WrongMeshError(mesh, claimed_mesh)
        if claimed_name is not None and claimed_name != name:
            raise WrongNameError(name, claimed_name)
        return DataplaneTokenClaims(mesh=claimed_mesh, name=claimed_name, serial=serial, **common)

    async def _verify(
        self, token: str | None, kind: str, hint: str
    ) -> tuple[dict[str, Any], int, dict[str, Any]]:
        """Check everything but the kind's own claims; return the payload, serial and times."""
        parts = _Parts.split(token, kind, hint)
        algorithm = parts.header.get("alg")
        if algorithm != _ALGORITHM:
            shown = (
                repr(algorithm)
                if isinstance(algorithm, str) and len(algorithm) <= 16
                else "an unknown algorithm"
            )
            raise MalformedTokenError(
                kind, f"its header names algorithm {shown}; tokens are signed with RS256 only"
            )
        kid = parts.header.get("kid")
        serial = _serial(kid, "") if isinstance(kid, str) else None
        if serial is None:
            raise MalformedTokenError(kind, "its header has no signing key serial (kid)")
        ring = await self._keyring()
        key = ring.keys.get(serial)
        if key is None:
            raise UnknownSigningKeyError(kind, serial)
        if isinstance(key, str):
            raise UnknownSigningKeyError(kind, serial, key)
        expected_length = (key.key_size + 7) // 8
        if len(parts.signature) != expected_length:
            raise MalformedTokenError(
                kind,
                f"its signature is {len(parts.signature)} bytes; signing key {serial} makes "
                f"{expected_length}-byte signatures (cut short or altered?)",
            )
        try:
            jwt.decode(
                parts.text,
                key,
                algorithms=[_ALGORITHM],
                # The claims are checked below, with messages that say what was wrong.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise BadSignatureError(kind, serial) from None
        except jwt.PyJWTError as exc:
            raise MalformedTokenError(
                kind, f"it cannot be decoded ({type(exc).__name__})"
            ) from None
        payload = parts.payload
        actual_kind = payload.get("Kind", _KIND_ZONE)  # Kuma's zone tokens have no Kind
        if actual_kind != kind:
            if actual_kind in (_KIND_ZONE, _KIND_DATAPLANE):
                raise WrongTokenKindError(kind, actual_kind)
            raise MalformedTokenError(kind, "its 'Kind' claim is neither zone nor dataplane")
        jti = payload.get("jti")
        if not isinstance(jti, str) or not jti:
            raise MalformedTokenError(kind, "it has no token id (jti claim)")
        if isinstance(ring.revoked, str):
            raise TokenError(ring.revoked, kind=kind)
        if jti in ring.revoked:
            raise RevokedTokenError(kind, jti)
        expires_at = _timestamp(payload, "exp", kind)
        issued_at = _timestamp(payload, "iat", kind) if "iat" in payload else None
        not_before = _timestamp(payload, "nbf", kind) if "nbf" in payload else issued_at
        now = self.clock()
        if now >= expires_at:
            raise ExpiredTokenError(kind, expires_at, jti)
        if not_before is not None and now + CLOCK_SKEW < not_before:
            raise NotYetValidTokenError(kind, not_before, jti)
        common = {
            "token_id": jti,
            "issued_at": issued_at or not_before or expires_at,
            "expires_at": expires_at,
        }
        return payload, serial, common

    async def _keyring(self) -> _KeyRing:
        async with self._lock:
            head = await self.store.head()
            ring = self._ring
            if ring is not None and (
                ring.head == head or time.monotonic() - ring.loaded_at < self.max_age
            ):
                return ring
            ring = await self._load(head)
            self._ring = ring
            return ring

    async def _load(self, head: int) -> _KeyRing:
        private, public = await _key_secrets(self.store)
        keys: dict[int, rsa.RSAPublicKey | str] = {}
        for serial, resource in public.items():
            try:
                keys[serial] = _load_public(_pem_of(resource))
            except ValueError as exc:
                keys[serial] = f"GlobalSecret {resource.key.name!r} is not usable ({exc})"
        for serial, resource in private.items():
            if isinstance(keys.get(serial), rsa.RSAPublicKey):
                continue
            try:
                keys[serial] = _load_private(_pem_of(resource)).public_key()
            except ValueError as exc:
                keys.setdefault(serial, f"GlobalSecret {resource.key.name!r} is not usable ({exc})")
        revocations = await self.store.find(_REVOCATIONS_KEY)
        revoked: frozenset[str] | str
        if revocations is not None and not _trusted(revocations):
            revocations = None
        try:
            revoked = frozenset(_revoked_ids(revocations))
        except (ValueError, UnicodeDecodeError):
            # Nobody can tell which tokens were revoked: admit none rather than all.
            revoked = (
                f"the token revocation list (GlobalSecret {REVOCATIONS_NAME!r}) cannot be "
                "read, so no token is accepted: fix it on the global"
            )
        problems = {problem for problem in (*keys.values(), revoked) if isinstance(problem, str)}
        # Said once, not at every reload: the keys are read again whenever the store changes.
        for problem in sorted(problems - self._reported):
            logger.error("cannot check tokens as they should be: %s", problem)
        self._reported = problems
        return _KeyRing(head, time.monotonic(), keys, revoked)


# -- the global's zone authentication ---------------------------------------------------


def zone_authenticator(
    store: Store, *, verifier: TokenVerifier | None = None
) -> Callable[[Hello, PeerInfo], Awaitable[str]]:
    """An authenticator for :class:`~kds.sync.GlobalEngine` that requires zone tokens.

    A zone is admitted when its Hello carries a zone token for the zone it claims,
    with scope ``cp``; a transport-verified identity, if there is one, must also
    match. Refusals are :class:`~kds.sync.ZoneRefused` with the token error's
    message (never the token), marked retryable: the zone keeps retrying with
    backoff, and is admitted once the operator fixes the token or the keys.

    Args:
        store: the global's store (signing keys, revocations).
        verifier: the verifier to use; one over *store* by default.
    """
    checker = verifier if verifier is not None else TokenVerifier(store)

    async def authenticate(hello: Hello, peer: PeerInfo) -> str:
        if peer.identity is not None and peer.identity != hello.zone:
            raise ZoneRefused(
                f"this connection is authenticated as zone {peer.identity!r}, "
                f"but its Hello claims zone {hello.zone!r}",
                retryable=False,
            )
        try:
            claims = await checker.verify_zone_token(hello.credentials, zone=hello.zone, scope="cp")
        except TokenError as exc:
            raise ZoneRefused(str(exc), retryable=True) from None
        return claims.zone

    return authenticate
