"""Certificates made in the test, for TLS upstreams on loopback: an authority
that issues server and client certificates (valid, expired, for other names),
written as PEM files the gateway's config names, and the server-side
``ssl.SSLContext`` of an upstream that may require a client certificate.

EC P-256 keys: generated in a millisecond, where RSA would take a noticeable
part of a test.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# What a server certificate on loopback names unless a test says otherwise.
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as files."""

    cert: Path
    key: Path
    common_name: str


class Authority:
    """A CA of its own, writing what it issues under ``directory``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._subject = _name(f"{name} test CA")
        now = _now()
        self._cert = (
            _builder(self._subject, self._subject, self._key.public_key(), now - _DAY, now + _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert = directory / f"{name}-ca.pem"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def server(
        self, common_name: str = "upstream", names: tuple[str, ...] = LOOPBACK_NAMES, **kw: bool
    ) -> Issued:
        """A server certificate for ``names`` (DNS names or IP addresses)."""
        return self._issue(common_name, names, ExtendedKeyUsageOID.SERVER_AUTH, **kw)

    def client(self, common_name: str) -> Issued:
        """A client certificate, as an upstream that authenticates callers checks it."""
        return self._issue(common_name, (), ExtendedKeyUsageOID.CLIENT_AUTH)

    def _issue(
        self,
        common_name: str,
        names: tuple[str, ...],
        usage: x509.ObjectIdentifier,
        *,
        expired: bool = False,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        # Expired: valid for a day that ended yesterday (signed by a CA valid now).
        start, end = (now - 2 * _DAY, now - _DAY) if expired else (now - _DAY, now + _DAY)
        builder = _builder(_name(common_name), self._subject, key.public_key(), start, end)
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        # The identifiers Python 3.13's default context (VERIFY_X509_STRICT) insists on.
        builder = (
            builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        stem = self.directory / f"{self.name}-{common_name}{'-expired' if expired else ''}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return Issued(cert_path, key_path, common_name)


def server_context(issued: Issued, client_ca: Authority | None = None) -> ssl.SSLContext:
    """An upstream's TLS: ``issued`` as its certificate and, with ``client_ca``,
    a client certificate from that CA required of every caller."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert, issued.key)
    if client_ca is not None:
        context.load_verify_locations(client_ca.cert)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    start: datetime.datetime,
    end: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
