"""A throwaway certificate authority for the mutual-TLS tests.

Keys are EC P-256 (fast to make); every certificate carries both server and
client usages, as the certificates a service mesh issues do.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from belfry.config import TlsSettings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Authority:
    """A CA that signs leaf certificates into a folder."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    folder: Path

    @classmethod
    def create(cls, folder: Path, name: str) -> Authority:
        """A self-signed CA valid from yesterday for a year."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256())
        )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}-ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(name, key, cert, folder)

    @property
    def ca_path(self) -> Path:
        """The CA certificate file peers trust."""
        return self.folder / f"{self.name}-ca.pem"

    def issue(self, leaf: str, *, expired: bool = False, spiffe: bool = True) -> TlsSettings:
        """A leaf for ``localhost``/127.0.0.1, written to files; ``expired`` ended yesterday.

        It names its holder as the mesh's certificates do: ``spiffe://belfry/<leaf>``
        (without ``spiffe``, by DNS names only).
        """
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"spiffe://belfry/{leaf}")] if spiffe else []
        names += [x509.DNSName("localhost"), x509.DNSName(leaf), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        return self._sign(f"{self.name}-{leaf}", leaf, names, usages, start, end)

    def leaf(self, label: str, names: Sequence[x509.GeneralName]) -> TlsSettings:
        """A client certificate carrying exactly ``names`` as its subject alternative names, valid a day either side."""
        now = datetime.datetime.now(datetime.UTC)
        return self._sign(f"client-{label}", label, names, [ExtendedKeyUsageOID.CLIENT_AUTH], now - _DAY, now + _DAY)

    def _sign(
        self,
        stem: str,
        common_name: str,
        names: Sequence[x509.GeneralName],
        usages: list[x509.ObjectIdentifier],
        start: datetime.datetime,
        end: datetime.datetime,
    ) -> TlsSettings:
        """A leaf certificate and its key, written to ``<stem>.crt`` and ``<stem>.key`` in the folder."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        return TlsSettings(cert_path, key_path, self.ca_path)
