"""Test certificates made with ``cryptography``: a CA, server certificates, PEM files on disk.

Nothing is checked in: every key and certificate is generated when the tests run. RSA keys are
slow to make, so a few are cached per process (``rsa_key(n)``); tests that need a key that does
*not* match a certificate take another index.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)


def utc_now() -> datetime.datetime:
    """The current time, timezone-aware UTC, second precision (as certificates store it)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@lru_cache(maxsize=8)
def rsa_key(index: int = 0) -> rsa.RSAPrivateKey:
    """The index-th cached 2048-bit RSA key (RSA, so static-RSA suites exist to be refused)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class CertAndKey:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llamaproxy tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def make_ca(
    common_name: str = "llamaproxy test CA", issuer: CertAndKey | None = None
) -> CertAndKey:
    """A CA certificate (EC P-256): self-signed, or an intermediate signed by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = utc_now()
    signer_name = issuer.cert.subject if issuer else _name(common_name)
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    return CertAndKey(builder.sign(signer_key, hashes.SHA256()), key)


def make_server_cert(
    ca: CertAndKey,
    *,
    serial: int | None = None,
    key_index: int = 0,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
) -> CertAndKey:
    """A server certificate with SANs, signed by ``ca``; valid from yesterday for 90 days."""
    key = rsa_key(key_index)
    now = utc_now()
    san: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else "server"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before if not_before is not None else now - DAY)
        .not_valid_after(not_after if not_after is not None else now + 90 * DAY)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    )
    return CertAndKey(builder.sign(ca.key, hashes.SHA256()), key)


def make_expired_cert(ca: CertAndKey, serial: int | None = None) -> CertAndKey:
    """A server certificate whose notAfter was yesterday."""
    now = utc_now()
    return make_server_cert(ca, serial=serial, not_before=now - 30 * DAY, not_after=now - DAY)


def make_expiring_cert(
    ca: CertAndKey, days: float = 3, serial: int | None = None
) -> CertAndKey:
    """A server certificate that expires ``days`` from now."""
    now = utc_now()
    return make_server_cert(
        ca, serial=serial, not_before=now - 30 * DAY, not_after=now + days * DAY
    )


def write_file(path: str, data: bytes) -> str:
    """Replace ``path`` atomically (temporary file + rename), as certbot and editors do."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class PemFiles:
    """Paths of a PEM certificate, key and optional chain written by ``write_pem_files``."""

    cert_file: str
    key_file: str
    chain_file: str | None = None


def write_pem_files(
    directory: str,
    server: CertAndKey,
    *,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    chain: Sequence[x509.Certificate] = (),
    prefix: str = "server",
) -> PemFiles:
    """Write ``server``'s certificate and key (or another ``key``) and a chain file if given."""
    cert_file = write_file(os.path.join(directory, f"{prefix}.pem"), server.cert_pem)
    key_pem = (
        CertAndKey(server.cert, key).key_pem if key is not None else server.key_pem
    )
    key_file = write_file(os.path.join(directory, f"{prefix}-key.pem"), key_pem)
    chain_file = None
    if chain:
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        chain_file = write_file(os.path.join(directory, f"{prefix}-chain.pem"), chain_pem)
    return PemFiles(cert_file, key_file, chain_file)


def write_ca(directory: str, ca: CertAndKey, name: str = "ca.pem") -> str:
    """Write the CA certificate (what clients trust) and return its path."""
    return write_file(os.path.join(directory, name), ca.cert_pem)
