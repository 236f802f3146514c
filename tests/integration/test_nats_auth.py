"""NatsTransport's own connections to NATS: users, tokens, TLS and client certificates.

Each test starts a nats-server that requires what it tests (a password, a token,
TLS, a client certificate), and checks that both sides connect with the right
material and that the wrong material fails with a message saying what to fix.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kds import ConfigError, ConnectError, SessionClosedError, TransportError
from kds.testing.nats import NatsServer
from kds_transports.nats import NatsTransport

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

TIMEOUT = 15  # seconds; a deadline for conditions, never a pause
PASSWORD = "correct horse"  # noqa: S105 -- a test server's password
WRONG = "wrong"  # a password the server does not take
TOKEN = "s3cr3t-t0ken"  # noqa: S105 -- a test server's token


@asynccontextmanager
async def echo_global(transport: NatsTransport):
    """Serve echo sessions with *transport* until the block ends."""

    async def echo(session):
        with contextlib.suppress(SessionClosedError):  # the zone closing: fine
            async for frame in session:
                await session.send(frame)

    async with anyio.create_task_group() as group:
        await group.start(transport.serve, echo)
        yield
        group.cancel_scope.cancel()


async def echo_once(transport: NatsTransport) -> None:
    session = await transport.connect()
    try:
        await session.send(b"ping")
        with anyio.fail_after(TIMEOUT):
            assert await session.receive() == b"ping"
    finally:
        await session.aclose()


# -- users and tokens ----------------------------------------------------------------------


async def test_user_and_password_let_both_sides_in_and_a_wrong_one_says_so():
    with NatsServer(user="kds", password=PASSWORD) as server:
        url = server.url
        async with echo_global(NatsTransport.server(url, user="kds", password=PASSWORD)):
            await echo_once(NatsTransport.client(url, user="kds", password=PASSWORD))
            wrong: list[dict[str, Any]] = [{"user": "kds", "password": WRONG}, {}]
            for options in wrong:
                with pytest.raises(ConnectError) as caught:
                    await NatsTransport.client(url, **options).connect()
                assert "refused this connection's credentials" in caught.value.reason
                assert "user and password, token or creds_file" in caught.value.reason
        with pytest.raises(TransportError, match="refused this connection's credentials"):
            await NatsTransport.server(url, user="kds", password=WRONG).serve(unused_handler)


async def test_a_token_lets_both_sides_in_and_a_wrong_one_says_so():
    with NatsServer(token=TOKEN) as server:
        url = server.url
        async with echo_global(NatsTransport.server(url, token=TOKEN)):
            await echo_once(NatsTransport.client(url, token=TOKEN))
            with pytest.raises(ConnectError, match="refused this connection's credentials"):
                await NatsTransport.client(url, token="guess").connect()  # noqa: S106


# -- TLS --------------------------------------------------------------------------------------


def _write_pem(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


class Authority:
    """A throwaway CA that issues server and client certificates into *directory*."""

    def __init__(self, directory: Path, name: str = "test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.now = datetime.datetime.now(datetime.UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            self._builder(self.name, self.key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = _write_pem(directory / "ca.crt", certificate)

    def _builder(self, subject: x509.Name, key: ec.EllipticCurvePrivateKey):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(hours=1))
            .not_valid_after(self.now + datetime.timedelta(days=1))
        )

    def issue(self, stem: str, names: list[str], *, client: bool = False) -> tuple[Path, Path]:
        """A certificate for *names* (DNS names or IPs) and its key: their paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        alternatives: list[x509.GeneralName] = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        certificate = (
            self._builder(subject, key)
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return (
            _write_pem(self.directory / f"{stem}.crt", certificate),
            _write_key(self.directory / f"{stem}.key", key),
        )


async def test_tls_with_a_ca_file_and_the_failures_that_name_their_fix(tmp_path):
    authority = Authority(tmp_path / "ca")
    with NatsServer(tls=authority.issue("server", ["127.0.0.1", "localhost"])) as server:
        url = server.url
        assert url.startswith("tls://")
        ca_file = authority.ca_file
        async with echo_global(NatsTransport.server(url, ca_file=ca_file)):
            await echo_once(NatsTransport.client(url, ca_file=ca_file))
            await echo_once(
                NatsTransport.client(url.replace("127.0.0.1", "localhost"), ca_file=ca_file)
            )

            with pytest.raises(ConnectError) as caught:  # the system's roots do not know it
                await NatsTransport.client(url).connect()
            assert "cannot be verified" in caught.value.reason
            assert "ca_file" in caught.value.reason

            other = Authority(tmp_path / "other", "another CA")
            with pytest.raises(ConnectError, match="set ca_file"):
                await NatsTransport.client(url, ca_file=other.ca_file).connect()

            with pytest.raises(ConnectError, match=r"requires TLS .*dial a tls:// address"):
                await NatsTransport.client(url.replace("tls://", "nats://")).connect()

            with pytest.raises(ConfigError, match="cannot read ca_file"):
                await NatsTransport.client(url, ca_file=tmp_path / "missing.crt").connect()
        with pytest.raises(TransportError, match="cannot read ca_file"):
            await NatsTransport.server(url, ca_file=tmp_path / "missing.crt").serve(unused_handler)


async def test_server_name_checks_a_certificate_issued_for_another_name(tmp_path):
    authority = Authority(tmp_path)
    with NatsServer(tls=authority.issue("server", ["nats.internal"])) as server:
        url, ca_file = server.url, authority.ca_file
        async with echo_global(
            NatsTransport.server(url, ca_file=ca_file, server_name="nats.internal")
        ):
            with pytest.raises(ConnectError, match="server_name"):
                await NatsTransport.client(url, ca_file=ca_file).connect()
            await echo_once(NatsTransport.client(url, ca_file=ca_file, server_name="nats.internal"))


async def test_client_certificates_for_a_server_that_verifies_clients(tmp_path):
    authority = Authority(tmp_path)
    server_material = authority.issue("server", ["127.0.0.1"])
    cert_file, key_file = authority.issue("client", ["zone-1"], client=True)
    with NatsServer(tls=server_material, tls_verify=authority.ca_file) as server:
        url, ca_file = server.url, authority.ca_file
        material: dict[str, Any] = {
            "ca_file": ca_file,
            "cert_file": cert_file,
            "key_file": key_file,
        }
        async with echo_global(NatsTransport.server(url, **material)):
            await echo_once(NatsTransport.client(url, **material))
            with pytest.raises(ConnectError, match="set cert_file and key_file"):
                await NatsTransport.client(url, ca_file=ca_file).connect()
        with pytest.raises(ConfigError, match="cannot load cert_file"):
            await NatsTransport.client(
                url, ca_file=ca_file, cert_file=cert_file, key_file=server_material[1]
            ).connect()


async def test_a_tls_address_never_falls_back_to_plaintext():
    with NatsServer() as server:
        url = server.url.replace("nats://", "tls://")
        with pytest.raises(ConnectError, match="does not offer TLS"):
            await NatsTransport.client(url).connect()
        with pytest.raises(TransportError, match="does not offer TLS"):
            await NatsTransport.server(url).serve(unused_handler)


async def unused_handler(session):
    raise AssertionError("no session was expected")


# -- permissions --------------------------------------------------------------------------


def login(user: str) -> dict[str, Any]:
    """The NATS user and password options of one of :data:`PERMISSIONS`' users."""
    return {"user": user, "password": f"{user}-password"}


def _user(name: str, publish: list[str], subscribe: list[str]) -> str:
    rights = f"publish: {json.dumps(publish)}, subscribe: {json.dumps(subscribe)}"
    return f'{{ user: "{name}", password: "{name}-password", permissions: {{ {rights} }} }}'


USERS = [
    # The permissions docs/nats.md gives: enough for a session, nothing more.
    _user("global", ["kds.s.*.g2z"], ["kds.connect kds-global", "kds.s.*.z2g"]),
    _user("zone", ["kds.connect", "kds.s.*.z2g"], ["kds.s.*.g2z"]),
    # May ask for a session but not send in it; may not even ask.
    _user("mute", ["kds.connect"], ["kds.s.*.g2z"]),
    _user("outsider", ["kds.s.*.z2g"], ["kds.s.*.g2z"]),
]
PERMISSIONS = "{ users: [" + ", ".join(USERS) + "] }"


async def test_the_documented_permissions_suffice_and_a_refused_one_ends_the_session():
    with NatsServer(settings={"authorization": PERMISSIONS}) as server:
        url = server.url
        async with echo_global(NatsTransport.server(url, **login("global"))):
            await echo_once(NatsTransport.client(url, **login("zone")))

            # Allowed to ask, not to send: the first message it publishes is refused.
            session = await NatsTransport.client(url, **login("mute")).connect()
            await session.send(b"lost?")
            with anyio.fail_after(TIMEOUT), pytest.raises(SessionClosedError) as caught:
                await session.receive()
            assert caught.value.reason.startswith("NATS denied a permission this session needs")
            assert "publish to" in caught.value.reason
            await session.aclose()

            with pytest.raises(ConnectError, match=r"NATS denied .*kds\.connect"):
                await NatsTransport.client(url, **login("outsider")).connect()
