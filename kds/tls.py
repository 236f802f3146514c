"""TLS material of the control plane's servers: the default self-signed certificate.

A global serving ``grpcs://`` (and a zone's dataplane server) without a configured
certificate generates one on first start, as Kuma's control plane does, and keeps it
in its work directory so that a restart presents the same certificate (zones and
proxies that pinned it with ``ca_file`` keep working):

* ECDSA P-256 key, self-signed, valid for :data:`VALIDITY` (about ten years);
* subject alternative names: the machine's hostname, ``localhost``,
  ``127.0.0.1``, ``::1``, the machine's local addresses (see
  :func:`certificate_names`), and any extra names the caller adds (a load
  balancer's DNS name, for example);
* written as :data:`CERT_FILE_NAME` and :data:`KEY_FILE_NAME`, the key readable
  by its owner only (mode 0600).

Each global instance generates its own certificate, so zones reaching several
instances through one address should trust a shared certificate (configure
``cert_file``/``key_file`` on every instance) or use ``skip_verify``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kds.errors import TransportError

__all__ = [
    "CERT_FILE_NAME",
    "KEY_FILE_NAME",
    "VALIDITY",
    "certificate_names",
    "ensure_certificate",
    "generate_certificate",
    "load_server_material",
]

logger = logging.getLogger(__name__)

CERT_FILE_NAME: Final = "kds-cp.crt"
"""The generated certificate's file name in the work directory (PEM)."""

KEY_FILE_NAME: Final = "kds-cp.key"
"""The generated private key's file name in the work directory (PEM, PKCS#8, mode 0600)."""

VALIDITY: Final = datetime.timedelta(days=3650)
"""How long a generated certificate is valid."""

# Clocks of the machines that check the certificate may be a little behind ours.
_BACKDATE: Final = datetime.timedelta(hours=1)


def certificate_names(extra: tuple[str, ...] = ()) -> list[str]:
    """The names a generated certificate is valid for, without duplicates.

    The hostname, ``localhost``, the loopback addresses, the machine's local
    addresses, then *extra*. Local addresses are those the hostname resolves to
    and, on Linux, those of the network interfaces (link-local IPv6 addresses
    left out: they only mean something with an interface name). Whatever cannot
    be found out only means fewer addresses, never an error.
    """
    hostname = socket.gethostname()
    names = [hostname, "localhost", "127.0.0.1", "::1"]
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP):
            names.append(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone index
    names.extend(_interface_addresses())
    names.extend(extra)
    return list(dict.fromkeys(name for name in names if name))


def _interface_addresses() -> list[str]:
    # The standard library cannot list interface addresses; Linux's /proc can.
    addresses: list[str] = []
    with contextlib.suppress(OSError, ValueError):
        last = ""
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith("|-- "):
                last = text[4:]
            elif text == "/32 host LOCAL" and last:
                addresses.append(str(ipaddress.IPv4Address(last)))
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            address = ipaddress.IPv6Address(int(line.split()[0], 16))
            if not address.is_link_local:
                addresses.append(str(address))
    return addresses


def generate_certificate(names: list[str], *, common_name: str = "kds") -> tuple[bytes, bytes]:
    """Generate a self-signed server certificate for *names*.

    Args:
        names: DNS names and IP addresses the certificate is valid for; IP
            addresses become IP subject alternative names.
        common_name: the subject's common name (clients match the SANs, not this).

    Returns:
        The certificate and its unencrypted PKCS#8 private key, both PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_certificate(work_dir: Path, *, extra_names: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Return the work directory's certificate and key, generating them if missing.

    An existing pair is reused as it is (same bytes after a restart). When only
    one of the two files exists, a crash interrupted an earlier generation, so a
    new pair replaces it. *extra_names* only matter when a pair is generated.

    Returns:
        The certificate's and the key's paths.

    Raises:
        TransportError: the work directory cannot be created or written.
    """
    cert_path, key_path = work_dir / CERT_FILE_NAME, work_dir / KEY_FILE_NAME
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    if cert_path.exists() or key_path.exists():
        logger.warning("replacing the incomplete certificate pair in %s", work_dir)
    names = certificate_names(extra_names)
    cert_pem, key_pem = generate_certificate(names)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        # The key first: a certificate on disk always has its key beside it.
        _write_atomically(key_path, key_pem, mode=0o600)
        _write_atomically(cert_path, cert_pem, mode=0o644)
    except OSError as exc:
        raise TransportError(
            f"cannot store the generated TLS certificate in {work_dir} ({exc}); "
            "make work_dir writable or configure cert_file and key_file"
        ) from exc
    logger.info("generated a self-signed TLS certificate %s for %s", cert_path, ", ".join(names))
    return cert_path, key_path


def load_server_material(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    """Read and check a PEM certificate chain and its private key.

    Returns:
        The certificate chain and the key, as read.

    Raises:
        TransportError: a file cannot be read or parsed, or the key does not belong
            to the (first) certificate; the message names ``cert_file`` or ``key_file``.
    """
    try:
        cert_pem = cert_file.read_bytes()
    except OSError as exc:
        raise TransportError(f"cannot read cert_file {cert_file}: {exc}") from exc
    try:
        key_pem = key_file.read_bytes()
    except OSError as exc:
        raise TransportError(f"cannot read key_file {key_file}: {exc}") from exc
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise TransportError(f"cert_file {cert_file} is not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TransportError(
            f"key_file {key_file} is not an unencrypted PEM private key: {exc}"
        ) from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != certificate.public_key().public_bytes(serialization.Encoding.DER, public):
        raise TransportError(
            f"key_file {key_file} does not belong to the certificate in cert_file {cert_file}"
        )
    return cert_pem, key_pem


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Created with its final mode: the key is never readable by others, not even briefly.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)  # O_CREAT's mode is filtered by the umask
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
