"""PostgresStore over TLS and with password authentication, against real servers.

A throwaway CA signs the servers' certificates. One server presents a certificate
for 127.0.0.1, another one for a host name that is not this host; a third one
has no TLS but wants a password. The session's plain server stands for a server
without TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import secrets
import traceback
from typing import TYPE_CHECKING, Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kds import ConfigError, ResourceKey, Upsert
from kds.testing.postgres import PostgresServer
from kds_stores.postgres import (
    MIGRATIONS,
    SCHEMA_VERSION,
    PostgresSettings,
    PostgresStore,
    migrate_up,
    schema_version,
)
from tests.conftest import new_postgres_schema

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.anyio

# Made up per run, so that finding it anywhere means it leaked from this run.
PASSWORD = f"s3cr3t-{secrets.token_hex(8)}"
WRONG_PASSWORD = f"s3cr3t-wrong-{secrets.token_hex(8)}"


# -- certificates ----------------------------------------------------------------


@attrs.frozen
class Pki:
    """PEM files of a throwaway public key infrastructure."""

    ca_file: str
    """The CA that signs both server certificates."""
    other_ca_file: str
    """A CA that signed nothing here."""
    server: tuple[str, str]
    """Certificate and key for IP address 127.0.0.1."""
    elsewhere: tuple[str, str]
    """Certificate and key for DNS name not-this-host.example only."""
    garbage: str
    """A file that looks like PEM and is not."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(key, hashes.SHA256()), key


def _server_certificate(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[x509.GeneralName]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name("kds test server"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_certificate(path: Path, certificate: x509.Certificate) -> str:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_key = _ca("kds test CA")
    other_ca, _ = _ca("kds unrelated CA")
    server, server_key = _server_certificate(
        ca, ca_key, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    elsewhere, elsewhere_key = _server_certificate(
        ca, ca_key, [x509.DNSName("not-this-host.example")]
    )
    garbage = directory / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    return Pki(
        ca_file=_write_certificate(directory / "ca.pem", ca),
        other_ca_file=_write_certificate(directory / "other-ca.pem", other_ca),
        server=(
            _write_certificate(directory / "server.pem", server),
            _write_key(directory / "server.key", server_key),
        ),
        elsewhere=(
            _write_certificate(directory / "elsewhere.pem", elsewhere),
            _write_key(directory / "elsewhere.key", elsewhere_key),
        ),
        garbage=str(garbage),
    )


# -- servers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[PostgresServer]:
    with PostgresServer(tls=pki.server) as server:
        yield server


@pytest.fixture(scope="module")
def elsewhere_server(pki: Pki) -> Iterator[PostgresServer]:
    with PostgresServer(tls=pki.elsewhere) as server:
        yield server


@pytest.fixture(scope="module")
def password_server() -> Iterator[PostgresServer]:
    with PostgresServer(password=PASSWORD) as server:
        yield server


def settings_for(server: PostgresServer, **fields: Any) -> PostgresSettings:
    base = PostgresSettings(
        host=server.host, port=server.port, user=server.user, db_name="postgres"
    )
    return attrs.evolve(base, **fields)


async def round_trip(settings: PostgresSettings) -> None:
    """Open a store on *settings* (a migrated schema), commit a resource, read it back."""
    key = ResourceKey("Dataplane", "default", "over-tls")
    labels = {"tls_mode": settings.tls_mode}
    async with PostgresStore(settings) as store:
        revision = await store.commit([Upsert(key=key, labels=labels, spec={"port": 5432})])
        assert await store.head() == revision
    async with PostgresStore(settings) as store:
        resource = await store.get(key)
    assert resource.labels == labels
    assert resource.spec == {"port": 5432}


async def open_store(settings: PostgresSettings) -> None:
    async with PostgresStore(settings):
        pass


# -- verifyNone --------------------------------------------------------------------


async def test_verify_none_round_trips_over_an_encrypted_connection(tls_server):
    before = len(tls_server.tls_handshakes)
    settings = await new_postgres_schema(settings_for(tls_server, tls_mode="verifyNone"))
    await round_trip(settings)
    # At least migrate_up's connection and each store's first pooled one (their
    # LISTEN connections too, when they got that far).
    assert len(tls_server.tls_handshakes) - before >= 3


async def test_tls_server_takes_plain_clients_without_a_handshake(tls_server):
    # The counterpart of the test above: what is counted is TLS, not any connection.
    settings = await new_postgres_schema(settings_for(tls_server, tls_mode="verifyNone"))
    before = len(tls_server.tls_handshakes)
    await round_trip(attrs.evolve(settings, tls_mode="disable"))
    assert len(tls_server.tls_handshakes) == before


# -- verifyCa ----------------------------------------------------------------------


async def test_verify_ca_with_the_signing_ca_connects(tls_server, pki):
    base = settings_for(tls_server, tls_mode="verifyCa", ca_file=pki.ca_file)
    await round_trip(await new_postgres_schema(base))


async def test_verify_ca_with_another_ca_is_a_config_error_naming_ca_file(tls_server, pki):
    base = settings_for(tls_server, tls_mode="verifyCa", ca_file=pki.other_ca_file)
    with pytest.raises(ConfigError, match="ca_file") as raised:
        await new_postgres_schema(base)
    assert "cannot be verified" in str(raised.value)
    with pytest.raises(ConfigError, match="ca_file"):
        await open_store(attrs.evolve(base, schema="public"))


async def test_verify_ca_does_not_check_the_host_name(elsewhere_server, pki):
    base = settings_for(elsewhere_server, tls_mode="verifyCa", ca_file=pki.ca_file)
    await round_trip(await new_postgres_schema(base))


# -- verifyFull --------------------------------------------------------------------


async def test_verify_full_with_a_certificate_for_the_ip_address_connects(tls_server, pki):
    base = settings_for(tls_server, tls_mode="verifyFull", ca_file=pki.ca_file)
    await round_trip(await new_postgres_schema(base))


async def test_verify_full_against_a_certificate_for_another_host_is_a_config_error(
    elsewhere_server, pki
):
    base = settings_for(elsewhere_server, tls_mode="verifyFull", ca_file=pki.ca_file)
    with pytest.raises(ConfigError) as raised:
        await new_postgres_schema(base)
    message = str(raised.value)
    assert "cannot be verified" in message
    assert "not valid for '127.0.0.1'" in message
    assert "does not name host '127.0.0.1'" in message
    assert "verifyCa" in message
    # The CA is the right one: the message must not send anyone to change it.
    assert "ca_file" not in message


async def test_verify_full_without_ca_file_does_not_trust_a_private_ca(tls_server):
    base = settings_for(tls_server, tls_mode="verifyFull")
    with pytest.raises(ConfigError, match="set ca_file"):
        await new_postgres_schema(base)


# -- SNI -------------------------------------------------------------------------


async def test_disable_sni_with_verify_ca_connects_without_sending_the_name(tls_server, pki):
    # By name, not by address: a client sends no name for an IP address anyway.
    base = settings_for(tls_server, host="localhost", tls_mode="verifyCa", ca_file=pki.ca_file)
    settings = await new_postgres_schema(base)
    before = len(tls_server.tls_handshakes)
    await round_trip(settings)
    sent = tls_server.tls_handshakes[before:]
    assert sent
    assert set(sent) == {"localhost"}

    before = len(tls_server.tls_handshakes)
    await round_trip(attrs.evolve(settings, disable_sni=True))
    sent = tls_server.tls_handshakes[before:]
    assert sent
    assert set(sent) == {None}


async def test_disable_sni_with_verify_full_is_refused(pki):
    with pytest.raises(
        ConfigError, match="disable_sni cannot be combined with tls_mode verifyFull"
    ):
        PostgresSettings(tls_mode="verifyFull", ca_file=pki.ca_file, disable_sni=True)


# -- a server without TLS ----------------------------------------------------------


@pytest.mark.parametrize("tls_mode", ["verifyNone", "verifyCa", "verifyFull"])
async def test_tls_against_a_server_without_tls_is_a_config_error(postgres_server, pki, tls_mode):
    settings = attrs.evolve(
        postgres_server, tls_mode=tls_mode, ca_file=pki.ca_file, schema="kds_never_created"
    )
    for attempt in (migrate_up, open_store):
        with pytest.raises(ConfigError) as raised:
            await attempt(settings)
        message = str(raised.value)
        assert "does not accept TLS" in message
        assert "set tls_mode to disable" in message


# -- client certificates -----------------------------------------------------------


async def test_client_certificate_that_cannot_be_loaded_is_a_config_error(tls_server, pki):
    settings = settings_for(
        tls_server, tls_mode="verifyNone", cert_file=pki.garbage, key_file=pki.garbage
    )
    with pytest.raises(ConfigError, match="TLS files cannot be loaded"):
        await migrate_up(settings)
    with pytest.raises(ConfigError, match="TLS files cannot be loaded"):
        await open_store(settings)


async def test_client_key_that_does_not_match_the_certificate_is_a_config_error(tls_server, pki):
    settings = settings_for(
        tls_server, tls_mode="verifyNone", cert_file=pki.server[0], key_file=pki.elsewhere[1]
    )
    with pytest.raises(ConfigError, match="TLS files cannot be loaded"):
        await open_store(settings)


async def test_cert_file_without_key_file_is_refused(pki):
    with pytest.raises(ConfigError, match="cert_file and key_file must be given together"):
        PostgresSettings(tls_mode="verifyNone", cert_file=pki.server[0])
    with pytest.raises(ConfigError, match="cert_file and key_file must be given together"):
        PostgresSettings(tls_mode="verifyNone", key_file=pki.server[1])


# -- passwords ---------------------------------------------------------------------


def exception_chain(error: BaseException) -> list[BaseException]:
    """*error* and every exception it was raised from or while handling."""
    chain: list[BaseException] = []
    pending = [error]
    while pending:
        current = pending.pop()
        if any(current is seen for seen in chain):
            continue
        chain.append(current)
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
    return chain


def assert_no_secret(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text


def assert_logs_have_no_secret(secret: str, caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert_no_secret(secret, record.getMessage(), repr(record.args), str(record.__dict__))
    assert_no_secret(secret, caplog.text)


async def test_right_password_connects_and_is_never_shown(password_server, caplog):
    caplog.set_level(logging.DEBUG)
    settings = await new_postgres_schema(settings_for(password_server, password=PASSWORD))
    async with PostgresStore(settings) as store:
        await store.commit([Upsert(key=ResourceKey("Dataplane", "default", "dp-1"))])
        assert await store.head() == 1
        shown = [repr(settings), str(settings), repr(store), str(store), settings.address]
    assert_no_secret(PASSWORD, *shown)
    # The log did record something: the migration, at least.
    assert any(record.name.startswith("kds_stores") for record in caplog.records)
    assert_logs_have_no_secret(PASSWORD, caplog)


@pytest.mark.parametrize("password", [WRONG_PASSWORD, PASSWORD.upper(), ""])
async def test_wrong_or_missing_password_is_a_config_error_that_does_not_show_it(
    password_server, caplog, password
):
    caplog.set_level(logging.DEBUG)
    settings = settings_for(password_server, password=password, schema="kds_never_created")
    store = PostgresStore(settings)
    errors: list[ConfigError] = []
    for attempt in (lambda: migrate_up(settings), lambda: schema_version(settings), store.open):
        with pytest.raises(ConfigError, match="refused the credentials") as raised:
            await attempt()
        errors.append(raised.value)
    assert not store.listening
    for secret in {password, PASSWORD} - {""}:
        for error in errors:
            chain = exception_chain(error)
            assert len(chain) >= 2  # the driver's error is kept as the cause
            assert_no_secret(secret, *(f"{e!s} {e!r} {e.args!r}" for e in chain))
            assert_no_secret(secret, "".join(traceback.format_exception(error)))
        assert_no_secret(secret, repr(settings), repr(store))
        assert_logs_have_no_secret(secret, caplog)


async def test_password_server_keeps_its_password_to_itself(password_server):
    assert_no_secret(PASSWORD, password_server.dsn(), repr(password_server))
    # Not on disk either: the file initdb read it from is gone, and the server
    # stores only a verifier.
    for path in password_server.directory.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


# -- migrations ------------------------------------------------------------------


async def test_migrate_up_over_verify_full(tls_server, pki):
    base = settings_for(tls_server, tls_mode="verifyFull", ca_file=pki.ca_file)
    settings = await new_postgres_schema(base, migrate=False)
    before = len(tls_server.tls_handshakes)
    assert await migrate_up(settings) == list(MIGRATIONS)
    assert await migrate_up(settings) == []
    assert await schema_version(settings) == SCHEMA_VERSION
    assert len(tls_server.tls_handshakes) - before == 3
    await round_trip(settings)
