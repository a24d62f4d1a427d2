"""TLS credentials for one VM pair in QEMU's x509 layout (what ``tls_creds`` names)::

    ca-cert.pem                          the CA both hosts trust
    server-cert.pem  server-key.pem      presented by the standby (serverAuth)
    client-cert.pem  client-key.pem      presented by the primary (clientAuth)
    ca-key.pem                           the CA's key (only when this module made the CA)

Both certificates carry the pair's name (``kemari-<vm>`` unless ``tls_name``) as a
DNS subjectAltName, which is what each side checks besides the CA.  Both hosts of a
pair get the same directory (either may become the primary after a failover).  Keys
are EC P-256 (fast handshakes), written with mode 0600; keep ``ca-key.pem`` off the
hosts in production (``ca=`` signs with an existing CA).  Equivalent ``openssl``
steps are in docs/security.md.  ``kemari pki`` (kemari/cli/pki.py) and the demo use it.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kemari.config import TLS_FILES
from kemari.errors import ConfigError

DEFAULT_DAYS = 825
_KEY_MODE = 0o600


def make_credentials(
    directory: Path,
    name: str,
    *,
    ca: Path | None = None,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> None:
    """Write a pair's credentials for ``name`` into ``directory`` (a new CA unless ``ca``)."""
    if days < 1:
        raise ConfigError(f"--days: {days} must be at least 1")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = [f for f in (*TLS_FILES, "ca-key.pem") if (directory / f).exists()]
    if existing and not force:
        raise ConfigError(f"{directory} already holds {', '.join(existing)} (--force overwrites)")
    now = datetime.datetime.now(datetime.UTC)
    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key, f"Kemari CA for {name}", now, days)
        _write_key(directory / "ca-key.pem", ca_key)
    else:
        ca_key, ca_cert = _load_ca(ca)
    (directory / "ca-cert.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf_certificate(key, ca_key, ca_cert, name, f"{name} {role}", usage, now, days)
        _write_key(directory / f"{role}-key.pem", key)
        (directory / f"{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
        cert = x509.load_pem_x509_certificate((directory / "ca-cert.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--ca {directory}: cannot load ca-key.pem / ca-cert.pem: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"--ca {directory}: ca-key.pem is not an EC key made by kemari pki")
    return key, cert


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _KEY_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, common_name: str, now: datetime.datetime, days: int
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(  # noqa: PLR0917 (one call site, all positional)
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns_name: str,
    common_name: str,
    usage: x509.ObjectIdentifier,
    now: datetime.datetime,
    days: int,
) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
