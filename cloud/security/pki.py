"""The deployment's own certificate authority: broker, cloud and device certificates, and a CRL.

``ecos-cloud broker-config`` creates the CA once and signs the broker's server certificate (its
host names and IP addresses as subject alternative names); ``ecos-cloud enroll`` signs one client
certificate per identity, whose common name *is* the identity: the broker takes it as the user
name (``use_identity_as_username``) and the client id (``use_username_as_clientid``), so the ACL's
``%u`` is the device id. A rotated or revoked certificate's serial goes into the CRL the broker
checks (``crlfile``). Keys are ECDSA P-256: every TLS stack on small devices (OpenSSL, mbedTLS,
wolfSSL) verifies it, and making one takes milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_sdk.errors import UsageError

CA_DAYS = 3650
CERT_DAYS = 825  # the longest lifetime browsers accepted for a leaf; devices get a new one with 'enroll --rotate'
CRL_DAYS = 3650  # the broker refuses every client once its CRL is past next_update: keep it long, reissue on change
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate small clock differences between hosts

Key = ec.EllipticCurvePrivateKey


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(name: str, days: int = CA_DAYS) -> Tuple[x509.Certificate, Key]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
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
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca_cert: x509.Certificate,
    ca_key: Key,
    common_name: str,
    *,
    server_names: Sequence[str] = (),
    days: int = CERT_DAYS,
    not_before: Optional[datetime.datetime] = None,
    not_after: Optional[datetime.datetime] = None,
) -> Tuple[x509.Certificate, Key]:
    """A leaf certificate for ``common_name``: a server certificate when ``server_names`` are given
    (DNS names and IP addresses), else a client certificate. ``not_before``/``not_after`` override
    the validity (tests make expired certificates with them)."""
    key = new_key()
    start = not_before or (_now() - _BACKDATE)
    end = not_after or (start + _BACKDATE + datetime.timedelta(days=days))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(server_names)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _alt_names(names: Iterable[str]) -> List[x509.GeneralName]:
    out: List[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def build_crl(
    ca_cert: x509.Certificate, ca_key: Key, revoked: Iterable[int], days: int = CRL_DAYS
) -> x509.CertificateRevocationList:
    """The CA's revocation list: every serial in ``revoked``."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + datetime.timedelta(days=days))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    for serial in sorted(set(revoked)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - _BACKDATE).build()
        )
    return builder.sign(ca_key, hashes.SHA256())


# ---- PEM in and out ------------------------------------------------------------------------------


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the certificate {path}: {exc}") from None


def load_key(path: Path) -> Key:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"cannot load the private key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{path} is not an EC private key (made by 'ecos-cloud broker-config')")
    return key


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def not_after(cert: x509.Certificate) -> datetime.datetime:
    """The end of validity, in UTC (cryptography < 42 has only the naive ``not_valid_after``)."""
    end = getattr(cert, "not_valid_after_utc", None)
    return end if end is not None else cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
