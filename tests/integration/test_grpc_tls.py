"""GrpcTransport's TLS and liveness: the generated certificate, verification, dead peers.

Peers that die or freeze run in child processes (:mod:`tests.integration.grpc_child`),
so that their sockets are really closed, or really left open and silent.
"""

from __future__ import annotations

import datetime
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kds import ConnectError, SessionClosedError, TransportError
from kds.tls import (
    CERT_FILE_NAME,
    KEY_FILE_NAME,
    ensure_certificate,
    generate_certificate,
)
from kds_transports.grpc import GrpcSession, GrpcTransport

pytestmark = pytest.mark.anyio

TIMEOUT = 15  # seconds; a deadline for conditions, never a pause
KEEPALIVE = 0.5  # seconds: keepalive interval and timeout in the liveness tests
ROOT = Path(__file__).resolve().parents[2]


def sans(cert_pem: bytes) -> tuple[list[str], list[str]]:
    certificate = x509.load_pem_x509_certificate(cert_pem)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.DNSName), [
        str(address) for address in names.get_values_for_type(x509.IPAddress)
    ]


@asynccontextmanager
async def serving(transport: GrpcTransport, *, echo: bool = True):
    """Serve *transport*; yields its address and a stream of its sessions.

    Sessions echo what they receive, unless *echo* is false: then they are left
    to the test.
    """
    sessions = anyio.create_memory_object_stream[GrpcSession](10)

    async def handler(session):
        await sessions[0].send(session)
        if not echo:
            await anyio.sleep_forever()
        async for frame in session:
            await session.send(frame)

    try:
        async with anyio.create_task_group() as task_group:
            address = await task_group.start(transport.serve, handler)
            yield address, sessions[1]
            task_group.cancel_scope.cancel()
    finally:
        sessions[0].close()
        sessions[1].close()


async def echo_once(transport: GrpcTransport) -> GrpcSession:
    session = await transport.connect()
    await session.send(b"ping")
    with anyio.fail_after(TIMEOUT):
        assert await session.receive() == b"ping"
    return session


# -- the generated certificate -----------------------------------------------------------


def test_the_generated_certificate_is_stored_once_and_reused(tmp_path):
    work_dir = tmp_path / "work"
    cert_path, key_path = ensure_certificate(work_dir)
    assert (cert_path, key_path) == (work_dir / CERT_FILE_NAME, work_dir / KEY_FILE_NAME)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    assert ensure_certificate(work_dir) == (cert_path, key_path)
    assert cert_path.read_bytes() == cert_pem
    assert key_path.read_bytes() == key_pem

    dns_names, addresses = sans(cert_pem)
    assert {"localhost", socket.gethostname()} <= set(dns_names)
    assert {"127.0.0.1", "::1"} <= set(addresses)
    certificate = x509.load_pem_x509_certificate(cert_pem)
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime > datetime.timedelta(days=3640)
    assert certificate.issuer == certificate.subject  # self-signed


def test_an_incomplete_pair_is_replaced_and_extra_names_are_added(tmp_path):
    (tmp_path / KEY_FILE_NAME).write_bytes(b"left over by a crash")
    cert_path, key_path = ensure_certificate(tmp_path, extra_names=("kds.example", "10.1.2.3"))
    dns_names, addresses = sans(cert_path.read_bytes())
    assert "kds.example" in dns_names
    assert "10.1.2.3" in addresses
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


async def test_a_restarted_global_presents_the_same_certificate(tmp_path):
    presented = []
    for _ in range(2):
        transport = GrpcTransport.server("grpcs://127.0.0.1:0", work_dir=tmp_path)
        async with serving(transport) as (address, _):
            port = int(address.rsplit(":", 1)[1])
            pem = await anyio.to_thread.run_sync(ssl.get_server_certificate, ("127.0.0.1", port))
            presented.append(ssl.PEM_cert_to_DER_cert(pem))
    stored = ssl.PEM_cert_to_DER_cert((tmp_path / CERT_FILE_NAME).read_text())
    assert presented == [stored, stored]


# -- verification on the zone ------------------------------------------------------------


async def test_zones_verify_the_generated_certificate_or_explicitly_skip(tmp_path):
    transport = GrpcTransport.server("grpcs://127.0.0.1:0", work_dir=tmp_path)
    async with serving(transport) as (address, _):
        ca_file = tmp_path / CERT_FILE_NAME
        for dialled in (address, address.replace("127.0.0.1", "localhost")):
            session = await echo_once(GrpcTransport.client(dialled, ca_file=ca_file))
            assert session.peer.identity == dialled.split("//")[1].rsplit(":", 1)[0]
            await session.aclose()

        with pytest.raises(ConnectError) as caught:
            await GrpcTransport.client(address).connect()
        message = str(caught.value)
        assert "cannot be verified" in message
        assert "ca_file" in message
        assert "skip_verify" in message

        other_ca = tmp_path / "other.crt"
        other_ca.write_bytes(generate_certificate(["localhost", "127.0.0.1"])[0])
        with pytest.raises(ConnectError, match=r"ca_file .*skip_verify"):
            await GrpcTransport.client(address, ca_file=other_ca).connect()

        session = await echo_once(GrpcTransport.client(address, skip_verify=True))
        assert session.peer.identity is None  # encrypted, but nothing was verified
        await session.aclose()


async def test_a_ca_signed_certificate_with_names_the_zone_must_match(tmp_path):
    ca_file, cert_file, key_file = make_ca_and_server_certificate(tmp_path, "global.internal")
    transport = GrpcTransport.server("grpcs://127.0.0.1:0", cert_file=cert_file, key_file=key_file)
    async with serving(transport) as (address, _):
        with pytest.raises(ConnectError, match="set server_name"):
            await GrpcTransport.client(address, ca_file=ca_file).connect()
        verified = GrpcTransport.client(address, ca_file=ca_file, server_name="global.internal")
        session = await echo_once(verified)
        assert session.peer.identity == "global.internal"
        await session.aclose()
        # skip_verify trusts the presented (CA-signed) certificate as it is.
        session = await echo_once(GrpcTransport.client(address, skip_verify=True))
        await session.aclose()
    assert not (tmp_path / CERT_FILE_NAME).exists()  # nothing was generated


async def test_bad_tls_material_fails_before_listening(tmp_path):
    _, cert_file, key_file = make_ca_and_server_certificate(tmp_path, "a.example")
    _, _, other_key = make_ca_and_server_certificate(tmp_path / "other", "b.example")
    with pytest.raises(TransportError, match=r"key_file .* does not belong"):
        await GrpcTransport.server(
            "grpcs://127.0.0.1:0", cert_file=cert_file, key_file=other_key
        ).serve(unused_handler)
    with pytest.raises(TransportError, match="cannot read cert_file"):
        await GrpcTransport.server(
            "grpcs://127.0.0.1:0", cert_file=tmp_path / "missing.crt", key_file=key_file
        ).serve(unused_handler)


async def unused_handler(session):
    raise AssertionError("no session was expected")


def make_ca_and_server_certificate(directory: Path, name: str) -> tuple[Path, Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = (directory / n for n in ("ca.crt", "server.crt", "server.key"))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


# -- dead and frozen peers ---------------------------------------------------------------


@asynccontextmanager
async def child(*args: str):
    """Run :mod:`tests.integration.grpc_child` with *args*; yields it and its first line."""
    command = [sys.executable, "-m", "tests.integration.grpc_child", *args]
    async with await anyio.open_process(command, cwd=ROOT, stderr=subprocess.DEVNULL) as process:
        assert process.stdout is not None
        try:
            with anyio.fail_after(TIMEOUT):
                line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 200)
            yield process, line.decode()
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)  # also ends a stopped process
            with anyio.CancelScope(shield=True):
                await process.wait()


async def drain(session: GrpcSession) -> None:
    while True:
        await session.receive()


async def time_until_closed(session: GrpcSession) -> tuple[float, SessionClosedError]:
    started = time.monotonic()
    with anyio.fail_after(TIMEOUT), pytest.raises(SessionClosedError) as caught:
        await drain(session)
    return time.monotonic() - started, caught.value


@pytest.mark.crash
async def test_a_killed_global_ends_the_zones_session(tmp_path):
    async with child("global", str(tmp_path), str(KEEPALIVE)) as (process, address):
        zone = GrpcTransport.client(
            address,
            ca_file=tmp_path / CERT_FILE_NAME,
            keepalive_interval=KEEPALIVE,
            keepalive_timeout=KEEPALIVE,
        )
        session = await echo_once(zone)
        process.send_signal(signal.SIGKILL)
        elapsed, error = await time_until_closed(session)
        assert error.by_peer
        assert error.reason.startswith("connection lost: ")
        assert elapsed < 2 * KEEPALIVE + 2
        await session.aclose()
        with pytest.raises(ConnectError):
            await zone.connect()


@pytest.mark.crash
async def test_a_frozen_global_is_detected_by_keepalive(tmp_path):
    # SIGSTOP leaves the socket open and silent: only keepalive can tell.
    async with child("global", str(tmp_path), "60") as (process, address):
        zone = GrpcTransport.client(
            address,
            ca_file=tmp_path / CERT_FILE_NAME,
            keepalive_interval=KEEPALIVE,
            keepalive_timeout=KEEPALIVE,
        )
        session = await echo_once(zone)
        process.send_signal(signal.SIGSTOP)
        elapsed, error = await time_until_closed(session)
        assert error.by_peer
        assert error.reason.startswith("connection lost: ")
        assert elapsed < 2 * KEEPALIVE + 3
        await session.aclose()


@pytest.mark.crash
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
async def test_a_killed_or_frozen_zone_is_detected_by_the_global(tmp_path, sig):
    transport = GrpcTransport.server(
        "grpcs://127.0.0.1:0",
        work_dir=tmp_path,
        keepalive_interval=KEEPALIVE,
        keepalive_timeout=KEEPALIVE,
        keepalive_min_interval=0,
    )
    async with serving(transport, echo=False) as (address, sessions):
        ca_file = str(tmp_path / CERT_FILE_NAME)
        # The zone's own keepalive is long: detecting it is the global's job.
        async with child("zone", address, ca_file, "60") as (process, line):
            assert line.strip() == "connected"
            with anyio.fail_after(TIMEOUT):
                global_ = await sessions.receive()
                assert await global_.receive() == b"hello"
            process.send_signal(sig)
            elapsed, error = await time_until_closed(global_)
            assert error.by_peer
            assert error.reason.startswith("connection lost: ")
            assert elapsed < 2 * KEEPALIVE + 3
            await global_.aclose()
