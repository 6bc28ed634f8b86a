"""Certificates for the TLS tests, made with ``cryptography`` in a directory.

:func:`make_pki` makes two unrelated authorities, ``good`` and ``other``;
each has a CA, a server certificate for 127.0.0.1 (an IP SAN: what the LP
checks when it dials ``tls:127.0.0.1:PORT``), a client certificate, and a
server certificate for a name that is not 127.0.0.1 (for the LP's name
check). ``good`` also has a server certificate issued through an
intermediate CA, in a file with its chain. EC P-256 keys: each takes
microseconds to make.

The LP's ``trustRoots=`` takes a directory of CA certificates, so each CA
is also alone in a directory of its own (:attr:`Authority.trust_dir`).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"
OTHER_NAME = "rp.tm3.invalid"


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, each in a PEM file."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    ca: Path  # the CA certificate, PEM
    trust_dir: Path  # a directory holding only that certificate (the LP's trustRoots=)
    server: Pair  # for 127.0.0.1
    named_server: Pair  # for OTHER_NAME only
    client: Pair


@dataclass(frozen=True)
class PKI:
    good: Authority
    other: Authority
    chained_server: Pair  # for 127.0.0.1, issued by an intermediate of good's CA; cert file = leaf + intermediate


def make_pki(directory: Path) -> PKI:
    good = _authority(directory / "good", "TM3 test CA")
    other = _authority(directory / "other", "TM3 other CA")
    ca_cert, ca_key = _load(good.ca, directory / "good" / "ca.key")
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = _cert("TM3 intermediate CA", mid_key, ca_cert.subject, ca_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("tm3 chained server", leaf_key, mid.subject, mid_key, ip=HOST, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    chained = _write_pair(directory / "good", "chained-server", [leaf, mid], leaf_key)
    return PKI(good, other, chained)


def _authority(directory: Path, name: str) -> Authority:
    directory.mkdir(parents=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(name, ca_key, None, ca_key, ca=True)
    (directory / "trust").mkdir()
    (directory / "trust" / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_pair(directory, "ca", [ca], ca_key)

    def issue(
        stem: str, common_name: str, usage: x509.ObjectIdentifier, ip: str | None = None, dns: str | None = None
    ) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(common_name, key, ca.subject, ca_key, ip=ip, dns=dns, usage=usage)
        return _write_pair(directory, stem, [cert], key)

    return Authority(
        ca=directory / "ca.pem",
        trust_dir=directory / "trust",
        server=issue("server", "tm3 rp", ExtendedKeyUsageOID.SERVER_AUTH, ip=HOST),
        named_server=issue("named-server", OTHER_NAME, ExtendedKeyUsageOID.SERVER_AUTH, dns=OTHER_NAME),
        client=issue("client", "tm3 lp", ExtendedKeyUsageOID.CLIENT_AUTH),
    )


def _cert(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool = False,
    ip: str | None = None,
    dns: str | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    names: list[x509.GeneralName] = []
    if ip is not None:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    if dns is not None:
        names.append(x509.DNSName(dns))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(directory: Path, stem: str, chain: list[x509.Certificate], key: ec.EllipticCurvePrivateKey) -> Pair:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Pair(cert_path, key_path)


def _load(cert: Path, key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    return x509.load_pem_x509_certificate(cert.read_bytes()), loaded


def make_web_pki(directory: Path, ips: list[str]) -> tuple[Path, Pair]:
    """A CA (its certificate's path) and one server certificate for all of
    ``ips`` (IP SANs): the Level 4 web server's HTTPS origins."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("TM3 web test CA", ca_key, None, ca_key, ca=True)
    _write_pair(directory, "web-ca", [ca], ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tm3 web")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return directory / "web-ca.pem", _write_pair(directory, "web", [cert], key)
