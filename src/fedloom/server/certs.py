"""PKI for remote deployment: a private CA, server and per-client certificates, revocation, signatures.

fedloom's remote mode runs over gRPC with mutual TLS: the server proves who it is with a
certificate for its host names, and every client proves who it is with a certificate whose
subject common name (CN) is its client id. All of them are signed by one private CA that
the operator of the federation keeps. This module makes and reads those files::

    ca/ca.pem  ca/ca.key  ca/revoked.txt           create_ca, revoke
    server/server.pem  server/server.key  server/ca.pem    issue_server
    creds/site-a/client.pem  creds/site-a/client.key  creds/site-a/ca.pem   issue_client

Keys are ECDSA on P-256 (SECG secp256r1), certificates are signed with SHA-256 (X.509 as
in RFC 5280). Private keys are written unencrypted as PKCS#8 PEM with file mode ``0o600``,
and a new directory is created with mode ``0o700``; nothing is ever overwritten unless
``overwrite=True``.

A client certificate may carry the most training examples its site may declare
(``issue_client(..., max_examples=N)``, ``fedloom certs client ID --max-examples N``): a
non-critical extension under :data:`MAX_EXAMPLES_OID` holding a DER INTEGER. The server
refuses a registration that declares more (an authenticated client could otherwise register
any count and dominate an example-weighted mean); :func:`peer_identity` reads it.

Revocation is a plain list: ``revoked.txt`` holds one certificate serial number per line,
in hexadecimal. The server loads it with :func:`load_revoked` and refuses a peer whose
serial (see :func:`peer_identity`) is in it; TLS itself does not consult it.

Reading credentials directories (:func:`load_client_credentials`, :func:`load_server_credentials`)
and signing results (:func:`sign`, :func:`verify`) are the transport's, which both ends use
(:mod:`fedloom.transport.credentials`, :mod:`fedloom.transport.signing`); they are re-exported here.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedloom.core.errors import CertError
from fedloom.transport.credentials import (
    CA_CERT,
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
    ClientCredentials,
    ServerCredentials,
    load_client_credentials,
    load_server_credentials,
    validate_client_id,
)
from fedloom.transport.credentials import check_key_pair as _check_pair
from fedloom.transport.credentials import read_pem as _read
from fedloom.transport.signing import load_pem_certificate as _parse_cert
from fedloom.transport.signing import load_pem_private_key as _parse_key
from fedloom.transport.signing import sign, verify
from fedloom.transport.signing import subject_common_name as _common_name

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "REVOKED",
    "SERVER_CERT",
    "SERVER_KEY",
    "CertError",
    "CertPaths",
    "ClientCredentials",
    "PeerIdentity",
    "ServerCredentials",
    "create_ca",
    "issue_client",
    "issue_server",
    "load_client_credentials",
    "load_revoked",
    "load_server_credentials",
    "peer_identity",
    "revoke",
    "sign",
    "validate_client_id",
    "verify",
    "verify_issued_by",
]

CA_KEY = "ca.key"
REVOKED = "revoked.txt"

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")  # optional leading wildcard label
_CLOCK_SKEW = timedelta(minutes=5)  # not_valid_before is backdated this much
_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`create_ca`, :func:`issue_server` or :func:`issue_client` wrote its files."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class PeerIdentity:
    """Who a certificate names: its subject CN (a client id), serial number and public key."""

    common_name: str
    serial: int
    public_key: CertificatePublicKeyTypes
    max_examples: int | None = None
    """The most training examples the site may declare (None: the certificate sets no cap)."""


# --------------------------------------------------------------------------- creation


def create_ca(
    directory: Path,
    *,
    name: str = "fedloom CA",
    days: int = 3650,
    overwrite: bool = False,
) -> CertPaths:
    """Create a self-signed CA: ``ca.pem`` and ``ca.key`` (mode 0o600) in ``directory``.

    Raises :class:`CertError` if either file exists and ``overwrite`` is false: replacing a
    CA invalidates every certificate it issued.
    """
    directory = Path(directory)
    _check_days(days)
    if not name or len(name) > 64:
        raise CertError(f"CA name must be 1-64 characters, got {len(name)}: {name!r}")
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    _refuse_existing([cert_path, key_path], overwrite=overwrite, what="CA")

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .sign(key, hashes.SHA256())
    )
    _make_dir(directory)
    _write(key_path, _key_bytes(key), mode=_KEY_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=_CERT_MODE)
    return CertPaths(cert=cert_path, key=key_path, ca=cert_path)


def issue_server(
    ca_dir: Path,
    out_dir: Path,
    *,
    hosts: Sequence[str],
    days: int = 825,
    overwrite: bool = False,
) -> CertPaths:
    """Issue the server's certificate: ``server.pem``, ``server.key`` and ``ca.pem`` in ``out_dir``.

    Each host becomes a SubjectAlternativeName: an IP address if it parses as one, else a DNS
    name. ``localhost`` and ``127.0.0.1`` are always added. The subject CN is the first host
    (``localhost`` if none is given). The validity is clipped to the CA's.
    """
    if isinstance(hosts, (str, bytes)):
        raise CertError(f"hosts must be a sequence of host names, not a single string: {hosts!r}")
    names: list[x509.GeneralName] = []
    for host in [*hosts, "localhost", "127.0.0.1"]:
        general = _general_name(host)
        if general not in names:
            names.append(general)
    first = str(hosts[0]).strip() if hosts else "localhost"
    cn = first if len(first) <= 64 else "fedloom server"
    out_dir = Path(out_dir)
    return _issue(
        ca_dir,
        out_dir / SERVER_CERT,
        out_dir / SERVER_KEY,
        cn=cn,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        san=names,
        days=days,
        overwrite=overwrite,
        what="server",
    )


def issue_client(
    ca_dir: Path,
    out_dir: Path,
    client_id: str,
    *,
    days: int = 825,
    overwrite: bool = False,
    max_examples: int | None = None,
) -> CertPaths:
    """Issue one client's credentials: ``client.pem``, ``client.key`` and ``ca.pem`` in ``out_dir``.

    The certificate's subject CN is ``client_id`` (see :func:`validate_client_id`) and its
    extended key usage is clientAuth. ``out_dir`` is that client's credentials directory,
    for example ``creds/site-a/``. ``max_examples`` caps the training examples the site may
    declare when it registers (an extension the server reads).
    """
    validate_client_id(client_id)
    extra = []
    if max_examples is not None:
        if isinstance(max_examples, bool) or not isinstance(max_examples, int) or not 1 <= max_examples < 2**63:
            raise CertError(f"max_examples must be an integer in [1, 2**63), got {max_examples!r}")
        extra.append(x509.UnrecognizedExtension(MAX_EXAMPLES_OID, _der_integer(max_examples)))
    out_dir = Path(out_dir)
    return _issue(
        ca_dir,
        out_dir / CLIENT_CERT,
        out_dir / CLIENT_KEY,
        cn=client_id,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        san=None,
        days=days,
        overwrite=overwrite,
        what=f"client {client_id!r}",
        extensions=extra,
    )


# --------------------------------------------------------------------------- revocation


def revoke(ca_dir: Path, cert_pem: Path | bytes) -> int:
    """Add the certificate's serial number to ``ca_dir/revoked.txt``; return the serial.

    The certificate (PEM bytes, or a path to a PEM file) must have been signed by the CA in
    ``ca_dir``. Revoking the same certificate twice leaves one line.
    """
    ca_dir = Path(ca_dir)
    if isinstance(cert_pem, str) and "-----BEGIN" in cert_pem:
        pem = cert_pem.encode()
    elif isinstance(cert_pem, (str, os.PathLike)):
        pem = _read(Path(cert_pem), "certificate to revoke")
    else:
        pem = bytes(cert_pem)
    cert = _parse_cert(pem, "certificate to revoke")
    ca_cert = _parse_cert(_read(ca_dir / CA_CERT, "CA certificate"), str(ca_dir / CA_CERT))
    if not _signed_by(ca_cert, cert):
        raise CertError(f"certificate {_cn_or_none(cert)!r} was not issued by the CA in {ca_dir}")
    serial = cert.serial_number
    path = ca_dir / REVOKED
    existing = load_revoked(path)
    if serial in existing:
        return serial
    prefix = b""
    if path.exists():
        text = path.read_bytes()
        if text and not text.endswith(b"\n"):
            prefix = b"\n"
    try:
        with open(path, "ab") as f:
            f.write(prefix + f"{serial:x}\n".encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise CertError(f"cannot write revocation list {path}: {exc.strerror or exc}") from exc
    return serial


def load_revoked(path: Path | None) -> frozenset[int]:
    """The revoked serial numbers in ``path`` (hex, one per line; ``#`` starts a comment).

    ``None`` or a file that does not exist yet (nothing revoked) gives an empty set.
    """
    if path is None:
        return frozenset()
    path = Path(path)
    if not path.exists():
        return frozenset()
    text = _read(path, "revocation list").decode("utf-8", errors="replace")
    serials: set[int] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            serials.add(int(line.removeprefix("0x").removeprefix("0X"), 16))
        except ValueError:
            raise CertError(f"{path}:{lineno}: not a hexadecimal serial number: {line!r}") from None
    return frozenset(serials)


# --------------------------------------------------------------------------- peers


def peer_identity(cert_pem: bytes) -> PeerIdentity:
    """The subject CN, serial number and public key of a PEM certificate.

    On the server, ``cert_pem`` is ``context.auth_context()["x509_pem_cert"][0]``. Raises
    :class:`CertError` if it is not a certificate or has no single subject CN.
    """
    cert = _parse_cert(cert_pem, "peer certificate")
    return PeerIdentity(
        common_name=_common_name(cert, "peer certificate"),
        serial=cert.serial_number,
        public_key=cert.public_key(),
        max_examples=_max_examples(cert),
    )


MAX_EXAMPLES_OID = x509.ObjectIdentifier("2.25.75000644888263920269980419731795055181")
"""fedloom's extension for a client's example cap: a UUID-based OID (ITU-T X.667, arc 2.25), needing no registration."""


def _der_integer(n: int) -> bytes:
    """A non-negative ``n`` as a DER INTEGER (tag 2, short or long length, two's complement content)."""
    body = n.to_bytes(n.bit_length() // 8 + 1, "big")  # a leading 0 byte keeps the sign bit clear
    return bytes([0x02, len(body)]) + body


def _max_examples(cert: x509.Certificate) -> int | None:
    try:
        raw = cert.extensions.get_extension_for_oid(MAX_EXAMPLES_OID).value
    except x509.ExtensionNotFound:
        return None
    data = getattr(raw, "value", b"")
    if len(data) < 3 or data[0] != 0x02 or data[1] != len(data) - 2 or data[1] > 9:
        raise CertError("the certificate's max-examples extension is not a DER INTEGER")
    body = data[2:]
    if body[0] & 0x80 or (len(body) > 1 and body[0] == 0 and not body[1] & 0x80):
        raise CertError("the certificate's max-examples extension is negative or not minimally encoded")
    n = int.from_bytes(body, "big")
    if n < 1:
        raise CertError("the certificate's max-examples extension must be at least 1")
    return n


def verify_issued_by(ca_pem: bytes, cert_pem: bytes, *, at: datetime | None = None) -> bool:
    """Whether ``cert_pem`` was signed by the CA in ``ca_pem`` and both are valid at ``at`` (now).

    False, not an exception, for a malformed, foreign, not-yet-valid or expired certificate
    (and for a ``ca_pem`` that is not a CA certificate).
    """
    try:
        ca = x509.load_pem_x509_certificate(bytes(ca_pem))
        cert = x509.load_pem_x509_certificate(bytes(cert_pem))
    except (ValueError, TypeError):
        return False
    if not _is_ca(ca) or not _signed_by(ca, cert):
        return False
    when = at if at is not None else datetime.now(timezone.utc)
    if when.tzinfo is None:
        raise CertError("verify_issued_by(at=...) needs a timezone-aware datetime")
    return all(c.not_valid_before_utc <= when <= c.not_valid_after_utc for c in (ca, cert))


# --------------------------------------------------------------------------- internals


def _issue(
    ca_dir: Path,
    cert_path: Path,
    key_path: Path,
    *,
    cn: str,
    eku: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None,
    days: int,
    overwrite: bool,
    what: str,
    extensions: Sequence[x509.ExtensionType] = (),
) -> CertPaths:
    _check_days(days)
    ca_dir = Path(ca_dir)
    ca_cert_pem = _read(ca_dir / CA_CERT, "CA certificate")
    ca_cert = _parse_cert(ca_cert_pem, str(ca_dir / CA_CERT))
    ca_key = _parse_key(_read(ca_dir / CA_KEY, "CA private key"), str(ca_dir / CA_KEY))
    if not _is_ca(ca_cert):
        raise CertError(f"{ca_dir / CA_CERT} is not a CA certificate")
    _check_pair(ca_cert, ca_key, ca_dir / CA_CERT)
    now = datetime.now(timezone.utc)
    if ca_cert.not_valid_after_utc <= now:
        raise CertError(f"the CA in {ca_dir} expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}")

    ca_copy = cert_path.parent / CA_CERT
    copy_ca = True
    if ca_copy.exists() and ca_copy.read_bytes() == ca_cert_pem:
        copy_ca = False  # the same CA (or ca_dir itself): nothing to write
    _refuse_existing([cert_path, key_path, *([ca_copy] if copy_ca else [])], overwrite=overwrite, what=what)

    key = ec.generate_private_key(ec.SECP256R1())
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:  # a CA made elsewhere, without a SubjectKeyIdentifier
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
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
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())

    _make_dir(cert_path.parent)
    _write(key_path, _key_bytes(key), mode=_KEY_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=_CERT_MODE)
    if copy_ca:
        _write(ca_copy, ca_cert_pem, mode=_CERT_MODE)
    return CertPaths(cert=cert_path, key=key_path, ca=ca_copy)


def _general_name(host: str) -> x509.GeneralName:
    if not isinstance(host, str):
        raise CertError(f"host must be a string, got {type(host).__name__}: {host!r}")
    name = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    if (
        not name
        or len(name) > 253
        or not name.isascii()
        or not _DNS_NAME.fullmatch(name)
    ):
        raise CertError(f"host {host!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(name.rstrip(".").lower())


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise CertError(f"days must be a positive integer, got {days!r}")


def _refuse_existing(paths: Sequence[Path], *, overwrite: bool, what: str) -> None:
    if overwrite:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise CertError(
            f"refusing to overwrite the existing {what} files {', '.join(existing)} (pass overwrite=True)"
        )


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertError(f"cannot create directory {directory}: {exc.strerror or exc}") from exc


def _write(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename), with ``mode``."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise CertError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cn_or_none(cert: x509.Certificate) -> str | None:
    try:
        return _common_name(cert, "certificate")
    except CertError:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(ca: x509.Certificate, cert: x509.Certificate) -> bool:
    """Issuer name matches and the signature verifies (no date or revocation check)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
