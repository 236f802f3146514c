"""Zone and dataplane tokens (kds.tokens): issue, verify, refuse, rotate, revoke.

Every refusal is checked for its own error class and message, and for never
quoting the token. Forged tokens are built the way an attacker would: by hand,
with the public key as an HMAC secret, with ``alg: none``, with a key of their own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kds import DEFAULT_CATALOG, ResourceKey, Upsert
from kds.errors import NotFoundError, ValidationError
from kds.resource import LABEL_ORIGIN
from kds.sync import rules
from kds.testing import MemoryStore
from kds.tokens import (
    DEFAULT_VALIDITY,
    PUBLIC_KEY_PREFIX,
    REVOCATIONS_NAME,
    SIGNING_KEY_PREFIX,
    BadSignatureError,
    ExpiredTokenError,
    LastSigningKeyError,
    MalformedTokenError,
    MissingTokenError,
    NotYetValidTokenError,
    RevokedTokenError,
    TokenError,
    TokenVerifier,
    UnknownSigningKeyError,
    UnusableSigningKeyError,
    WrongMeshError,
    WrongNameError,
    WrongScopeError,
    WrongTokenKindError,
    WrongZoneError,
    check_validity,
    issue_dataplane_token,
    issue_zone_token,
    parse_duration,
    remove_signing_key,
    revoke,
    rotate_signing_key,
    signing_key_serials,
    token_id,
)
from kds_stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from kds.store import Store

pytestmark = pytest.mark.anyio

SCOPES = ("cp", "ingress", "egress")


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    async with MemoryStore() as opened:
        yield opened


def verifier(store: Store, **options: Any) -> TokenVerifier:
    # max_age=0: every change of the store is seen by the next verification.
    options.setdefault("max_age", 0.0)
    return TokenVerifier(store, **options)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(header))),
        json.loads(base64.urlsafe_b64decode(pad(payload))),
        signature,
    )


def unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"


async def private_key(store: Store, serial: int = 1) -> rsa.RSAPrivateKey:
    secret = await store.get(ResourceKey("GlobalSecret", None, f"{SIGNING_KEY_PREFIX}{serial}"))
    key = serialization.load_pem_private_key(base64.b64decode(secret.spec["data"]), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


async def public_pem(store: Store, serial: int = 1) -> bytes:
    secret = await store.get(ResourceKey("GlobalSecret", None, f"{PUBLIC_KEY_PREFIX}{serial}"))
    return base64.b64decode(secret.spec["data"])


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    base = {
        "Kind": "zone",
        "Zone": "zone-1",
        "Scope": ["cp"],
        "jti": "forged-1",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def assert_token_not_quoted(error: BaseException, token: str | None) -> None:
    if token is None or len(token) <= 12:
        return  # too short to tell a quote from a coincidence
    text = str(error)
    assert token not in text
    for piece in token.split("."):
        if len(piece) > 12:
            assert piece not in text, text


# -- round trips -------------------------------------------------------------------------

# Any valid resource name: printable, no whitespace, up to 253 characters.
resource_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp", "Co", "Cn")),
    min_size=1,
    max_size=60,
).filter(lambda text: text.isprintable() and not any(c.isspace() for c in text))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(zone=resource_names, scopes=st.sets(st.sampled_from(SCOPES), min_size=1))
async def test_a_zone_token_verifies_for_its_zone_and_each_of_its_scopes(store, zone, scopes):
    token = await issue_zone_token(store, zone=zone, scopes=scopes)
    check = verifier(store)
    for scope in SCOPES:
        if scope in scopes:
            found = await check.verify_zone_token(token, zone=zone, scope=scope)
            assert found.zone == zone
            assert found.scopes == scopes
            assert found.serial == 1
            assert found.token_id == token_id(token)
            assert found.expires_at - found.issued_at == DEFAULT_VALIDITY
        else:
            with pytest.raises(WrongScopeError) as refused:
                await check.verify_zone_token(token, zone=zone, scope=scope)
            assert str(refused.value) == (
                f"zone token lacks scope {scope!r} (it has: {', '.join(sorted(scopes))})"
            )
    # zone=None accepts the token of any zone (what a caller checks itself).
    assert (await check.verify_zone_token(token, zone=None, scope=min(scopes))).zone == zone


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mesh=resource_names, name=st.none() | resource_names)
async def test_a_dataplane_token_verifies_for_its_mesh_and_name(store, mesh, name):
    token = await issue_dataplane_token(store, mesh=mesh, name=name, valid_for=timedelta(hours=1))
    check = verifier(store)
    found = await check.verify_dataplane_token(token, mesh=mesh, name=name or "any-proxy")
    assert (found.mesh, found.name) == (mesh, name)
    assert found.expires_at - found.issued_at == timedelta(hours=1)
    with pytest.raises(WrongMeshError, match="dataplane token is for mesh"):
        await check.verify_dataplane_token(token, mesh=mesh + "-other", name=name or "x")
    if name is not None:
        with pytest.raises(WrongNameError, match="dataplane token is for dataplane"):
            await check.verify_dataplane_token(token, mesh=mesh, name=name + "-other")
    with pytest.raises(WrongTokenKindError, match="a zone token is required"):
        await check.verify_zone_token(token, zone=None, scope="cp")


# -- refusals ----------------------------------------------------------------------------


async def test_every_bad_token_is_refused_with_its_own_reason(store):
    good = await issue_zone_token(store, zone="zone-1", scopes=["cp", "ingress"])
    key = await private_key(store)
    header, payload, signature = parts(good)
    revoked = await issue_zone_token(store, zone="zone-1", scopes=["cp"])
    await revoke(store, [token_id(revoked)])
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = await public_pem(store)
    hs256_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": "1"}, claims())
    now = datetime.now(UTC)
    expired_at = int((now - timedelta(minutes=5)).timestamp())
    future = int((now + timedelta(hours=1)).timestamp())

    cases: dict[str, tuple[str | None, type[TokenError], str]] = {
        "no token": (None, MissingTokenError, "no zone token was given"),
        "empty token": ("  \n", MissingTokenError, "no zone token was given"),
        "expired": (
            jwt.encode(claims(exp=expired_at, iat=expired_at - 60), key, "RS256", {"kid": "1"}),
            ExpiredTokenError,
            f"zone token expired at {datetime.fromtimestamp(expired_at, UTC):%Y-%m-%dT%H:%M:%S}Z"
            " (id forged-1)",
        ),
        "not yet valid": (
            jwt.encode(claims(nbf=future), key, "RS256", {"kid": "1"}),
            NotYetValidTokenError,
            "zone token is not valid before",
        ),
        "revoked": (revoked, RevokedTokenError, f"zone token was revoked (id {token_id(revoked)})"),
        "another zone's": (
            await issue_zone_token(store, zone="zone-2", scopes=["cp"]),
            WrongZoneError,
            "zone token is for zone 'zone-2', not 'zone-1'",
        ),
        "ingress only": (
            await issue_zone_token(store, zone="zone-1", scopes=["ingress"]),
            WrongScopeError,
            "zone token lacks scope 'cp' (it has: ingress)",
        ),
        "a dataplane token": (
            await issue_dataplane_token(store, mesh="default"),
            WrongTokenKindError,
            "a zone token is required, but this is a dataplane token",
        ),
        "not a JWT": ("not-a-token", MalformedTokenError, "has 1 dot-separated parts"),
        "junk parts": ("a.b.c", MalformedTokenError, "its header is not base64url JSON"),
        "alg none": (
            unsigned({"alg": "none", "kid": "1"}, claims()) + ".",
            MalformedTokenError,
            "its header names algorithm 'none'; tokens are signed with RS256 only",
        ),
        "HS256 with the public key as secret": (
            hs256_input
            + "."
            + b64url(hmac.new(pem, hs256_input.encode(), hashlib.sha256).digest()),
            MalformedTokenError,
            "its header names algorithm 'HS256'",
        ),
        "no kid": (
            jwt.encode(claims(), key, "RS256"),
            MalformedTokenError,
            "its header has no signing key serial (kid)",
        ),
        "unknown kid": (
            jwt.encode(claims(), stranger, "RS256", {"kid": "7"}),
            UnknownSigningKeyError,
            "zone token was signed with signing key 7, which this control plane does not have",
        ),
        "another key under our kid": (
            jwt.encode(claims(), stranger, "RS256", {"kid": "1"}),
            BadSignatureError,
            "zone token's signature does not match signing key 1",
        ),
        "tampered payload": (
            f"{good.split('.')[0]}.{b64url(json.dumps({**payload, 'Zone': 'zone-9'}).encode())}"
            f".{signature}",
            BadSignatureError,
            "zone token's signature does not match signing key 1",
        ),
        "tampered header": (
            f"{b64url(json.dumps({**header, 'typ': 'X'}).encode())}.{good.split('.', 1)[1]}",
            BadSignatureError,
            "zone token's signature does not match signing key 1",
        ),
        "claims of the wrong shape": (
            jwt.encode(claims(Scope="cp"), key, "RS256", {"kid": "1"}),
            MalformedTokenError,
            "its 'Scope' claim is not a list of scopes",
        ),
        "no expiry": (
            jwt.encode(claims(exp=None), key, "RS256", {"kid": "1"}),
            MalformedTokenError,
            "its 'exp' claim is not a time",
        ),
    }
    check = verifier(store)
    cases_by_message: dict[str, set[str]] = {}
    for case, (token, error, message) in cases.items():
        with pytest.raises(TokenError) as refused:
            await check.verify_zone_token(token, zone="zone-1", scope="cp")
        assert type(refused.value) is error, f"{case}: {refused.value!r}"
        assert message in str(refused.value), f"{case}: {refused.value}"
        assert_token_not_quoted(refused.value, token)
        cases_by_message.setdefault(str(refused.value), set()).add(case)
    # Each reason reads differently; only cases with the same reason share a message.
    shared = [cases for cases in cases_by_message.values() if len(cases) > 1]
    assert sorted(map(sorted, shared)) == [
        ["another key under our kid", "tampered header", "tampered payload"],
        ["empty token", "no token"],
    ]
    # The good token still passes.
    await check.verify_zone_token(good, zone="zone-1", scope="ingress")


async def test_a_token_cut_anywhere_is_malformed(store):
    token = await issue_zone_token(store, zone="zone-1", scopes=["cp"])
    check = verifier(store)
    for end in range(1, len(token)):
        with pytest.raises(MalformedTokenError) as refused:
            await check.verify_zone_token(token[:end], zone="zone-1", scope="cp")
        assert_token_not_quoted(refused.value, token[:end])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
async def test_random_text_is_refused_as_missing_or_malformed(store, junk):
    check = verifier(store)
    with pytest.raises((MissingTokenError, MalformedTokenError)) as refused:
        await check.verify_zone_token(junk, zone="zone-1", scope="cp")
    assert_token_not_quoted(refused.value, junk.strip() if len(junk.strip()) > 12 else None)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.fixed_dictionaries(
        {}, optional={"alg": st.just("RS256") | JSON_VALUES, "kid": st.just("1") | JSON_VALUES}
    ),
    payload=st.dictionaries(st.sampled_from(["Kind", "Zone", "Scope", "jti", "exp"]), JSON_VALUES),
)
async def test_any_json_in_a_well_formed_token_is_refused_cleanly(store, header, payload):
    """Headers and payloads of any JSON: a TokenError each time, never a crash."""
    await issue_zone_token(store, zone="zone-1", scopes=["cp"])  # key 1 exists
    token = unsigned(header, payload) + "." + b64url(b"\0" * 256)
    with pytest.raises(TokenError):
        await verifier(store).verify_zone_token(token, zone="zone-1", scope="cp")


async def test_expiry_is_checked_against_the_clock(store):
    token = await issue_zone_token(
        store, zone="zone-1", scopes=["cp"], valid_for=parse_duration("1h")
    )
    later = TokenVerifier(store, clock=lambda: datetime.now(UTC) + timedelta(hours=2))
    with pytest.raises(ExpiredTokenError) as refused:
        await later.verify_zone_token(token, zone="zone-1", scope="cp")
    assert refused.value.token_id == token_id(token)
    assert str(refused.value).endswith("generate a new one")
    await TokenVerifier(store).verify_zone_token(token, zone="zone-1", scope="cp")


# -- keys ---------------------------------------------------------------------------------


async def test_rotation_new_key_signs_old_keeps_verifying_until_removed(store):
    old = await issue_zone_token(store, zone="zone-1", scopes=["cp"])
    with pytest.raises(LastSigningKeyError, match="only zone token signing key"):
        await remove_signing_key(store, 1)
    assert await rotate_signing_key(store) == 2
    new = await issue_zone_token(store, zone="zone-1", scopes=["cp"])
    assert parts(old)[0]["kid"] == "1"
    assert parts(new)[0]["kid"] == "2"
    check = verifier(store)
    assert (await check.verify_zone_token(old, zone="zone-1", scope="cp")).serial == 1
    assert (await check.verify_zone_token(new, zone="zone-1", scope="cp")).serial == 2

    await remove_signing_key(store, 1)
    assert await signing_key_serials(store) == [2]
    with pytest.raises(UnknownSigningKeyError) as refused:
        await check.verify_zone_token(old, zone="zone-1", scope="cp")
    assert refused.value.serial == 1
    await check.verify_zone_token(new, zone="zone-1", scope="cp")
    with pytest.raises(NotFoundError):
        await remove_signing_key(store, 1)
    # Serials are never reused, even after a removal.
    assert await rotate_signing_key(store) == 3


async def test_a_zone_verifies_with_the_public_keys_and_revocations_it_received(store):
    """The zone's store holds what replication gives it: no private key."""
    token = await issue_zone_token(store, zone="zone-1", scopes=["ingress"])
    dataplane = await issue_dataplane_token(store, mesh="default", name="web")
    revoked = await issue_zone_token(store, zone="zone-1", scopes=["ingress"])
    await revoke(store, [token_id(revoked)])
    async with MemoryStore() as zone:
        received = [
            resource
            for resource in await store.list_resources("GlobalSecret")
            if rules.global_to_zone(DEFAULT_CATALOG, resource.key, resource.labels, "zone-1")
        ]
        assert {r.key.name for r in received} == {f"{PUBLIC_KEY_PREFIX}1", REVOCATIONS_NAME}
        await zone.commit([Upsert(key=r.key, labels=r.labels, spec=r.spec) for r in received])
        check = verifier(zone)
        await check.verify_zone_token(token, zone="zone-1", scope="ingress")
        await check.verify_dataplane_token(dataplane, mesh="default", name="web")
        with pytest.raises(RevokedTokenError):
            await check.verify_zone_token(revoked, zone="zone-1", scope="ingress")

        # A key the zone's own API wrote (origin zone) vouches for nothing.
        forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forger_pem = forger.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        await zone.commit(
            [
                Upsert(
                    key=ResourceKey("GlobalSecret", None, f"{PUBLIC_KEY_PREFIX}9"),
                    labels={LABEL_ORIGIN: "zone"},
                    spec={"data": base64.b64encode(forger_pem).decode()},
                )
            ]
        )
        forged = jwt.encode(claims(Scope=["ingress"]), forger, "RS256", {"kid": "9"})
        with pytest.raises(UnknownSigningKeyError):
            await check.verify_zone_token(forged, zone="zone-1", scope="ingress")


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_two_globals_issuing_at_once_create_one_key(tmp_path: Path, backend: str):
    if backend == "memory":
        shared = MemoryStore()
        stores: list[Store] = [shared, shared]
    else:
        stores = [SQLiteStore(tmp_path / "global.db"), SQLiteStore(tmp_path / "global.db")]
    for opened in dict.fromkeys(stores):
        await opened.open()
    try:
        issued: list[str] = []

        async def issue(on: Store) -> None:
            issued.append(await issue_zone_token(on, zone="zone-1", scopes=["cp"]))

        async with anyio.create_task_group() as group:
            for on in stores:
                group.start_soon(issue, on)
        names = sorted(r.key.name for r in await stores[0].list_resources("GlobalSecret"))
        assert names == [f"{SIGNING_KEY_PREFIX}1", f"{PUBLIC_KEY_PREFIX}1"]
        for token in issued:
            await verifier(stores[1]).verify_zone_token(token, zone="zone-1", scope="cp")
    finally:
        for opened in dict.fromkeys(stores):
            await opened.aclose()


async def test_a_damaged_signing_key_is_reported_not_used(store):
    await issue_zone_token(store, zone="zone-1", scopes=["cp"])
    await store.commit(
        [
            Upsert(
                key=ResourceKey("GlobalSecret", None, f"{SIGNING_KEY_PREFIX}1"),
                labels={LABEL_ORIGIN: "global"},
                spec={"data": base64.b64encode(b"not a key").decode()},
            )
        ]
    )
    with pytest.raises(UnusableSigningKeyError, match="signing key 1 cannot be used"):
        await issue_zone_token(store, zone="zone-1", scopes=["cp"])


# -- revocation ---------------------------------------------------------------------------


async def test_revocations_are_kumas_format_and_idempotent(store):
    await revoke(store, ["b", "a"])
    await revoke(store, ["a", "c"])
    secret = await store.get(ResourceKey("GlobalSecret", None, REVOCATIONS_NAME))
    assert base64.b64decode(secret.spec["data"]).decode() == "a,b,c"
    version = secret.version
    await revoke(store, ["c"])
    assert (await store.get(secret.key)).version == version
    for bad, field in ((["a,b"], "token_ids[0]"), (["x", ""], "token_ids[1]"), ([], "token_ids")):
        with pytest.raises(ValidationError) as refused:
            await revoke(store, bad)
        assert refused.value.field == field


async def test_a_revocation_takes_effect_within_the_cache_age(store):
    token = await issue_zone_token(store, zone="zone-1", scopes=["cp"])
    cached = TokenVerifier(store)  # the default: keys may serve up to 1 s while the store changes
    await cached.verify_zone_token(token, zone="zone-1", scope="cp")
    await revoke(store, [token_id(token)])
    with anyio.fail_after(30):
        while True:
            try:
                await cached.verify_zone_token(token, zone="zone-1", scope="cp")
            except RevokedTokenError:
                break
            await anyio.sleep(0.05)  # polling: the cache has no event to wait on


async def test_an_unreadable_revocation_list_admits_nobody(store):
    token = await issue_zone_token(store, zone="zone-1", scopes=["cp"])
    await store.commit(
        [
            Upsert(
                key=ResourceKey("GlobalSecret", None, REVOCATIONS_NAME),
                labels={LABEL_ORIGIN: "global"},
                spec={"data": "%%% not base64"},
            )
        ]
    )
    with pytest.raises(TokenError, match=r"revocation list .* cannot be read"):
        await verifier(store).verify_zone_token(token, zone="zone-1", scope="cp")
    await revoke(store, ["other"])  # writing the list again repairs it
    await verifier(store).verify_zone_token(token, zone="zone-1", scope="cp")


def test_token_id_reads_the_jti_without_verifying():
    signature = "." + b64url(b"signature")
    assert token_id(unsigned({"alg": "RS256"}, {"jti": "abc"}) + signature) == "abc"
    with pytest.raises(MalformedTokenError, match="dataplane token is malformed: it has no token"):
        token_id(unsigned({}, {}) + signature, kind="dataplane")


# -- input checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"zone": "", "scopes": ["cp"]}, "zone"),
        ({"zone": "a b", "scopes": ["cp"]}, "zone"),
        ({"zone": "z", "scopes": []}, "scopes"),
        ({"zone": "z", "scopes": ["admin"]}, "scopes"),
        ({"zone": "z", "scopes": ["cp"], "valid_for": timedelta(0)}, "valid_for"),
        ({"zone": "z", "scopes": ["cp"], "valid_for": timedelta(days=3651)}, "valid_for"),
    ],
)
async def test_bad_arguments_name_the_field(store, arguments, field):
    with pytest.raises(ValidationError) as refused:
        await issue_zone_token(store, **arguments)
    assert refused.value.field == field
    assert await store.list_resources("GlobalSecret") == []  # nothing was created


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("720h", timedelta(hours=720)),
        ("30m", timedelta(minutes=30)),
        ("10s", timedelta(seconds=10)),
        ("1h30m", timedelta(minutes=90)),
        ("1.5h", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        ("500ms", timedelta(milliseconds=500)),
    ],
)
def test_durations_read_as_kumactl_writes_them(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "h", "10", "10x", "-1h", "1h 30m", "1h-"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_validity_is_at_least_a_second_and_at_most_ten_years():
    check_validity(timedelta(days=3650))
    for bad in (timedelta(0), timedelta(seconds=-5), timedelta(days=3651)):
        with pytest.raises(ValueError, match="must be at"):
            check_validity(bad)


# -- what zones receive -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sent"),
    [
        ("zone-token-signing-key-1", False),
        ("zone-token-signing-key-12", False),
        ("zone-token-signing-key", False),
        ("user-token-signing-key-1", False),
        ("zone-token-signing-public-key-1", True),
        ("zone-token-revocations", True),
        ("zone-token-signing-keys-backup", False),  # the prefix decides, as Kuma's
        ("my-zone-token-signing-key-1", True),
    ],
)
def test_zones_get_public_keys_and_revocations_never_private_keys(name, sent):
    key = ResourceKey("GlobalSecret", None, name)
    copy = rules.global_to_zone(DEFAULT_CATALOG, key, {LABEL_ORIGIN: "global"}, "zone-1")
    assert (copy is not None) is sent
