"""ECDSA signatures of results, and the PEM parsing both ends of the transport need.

A client signs each result it pushes (:func:`sign`, with its TLS private key) over
:func:`~fedloom.transport.wire.signing_bytes` (its header, which names a single-use task,
and its data digest); the server checks it against the certificate the client presented
(:func:`verify`), so a result is attributed to a client certificate independently of the
channel it came over. ECDSA on P-256 with SHA-256.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedloom.core.errors import CertError

__all__ = ["load_pem_certificate", "load_pem_private_key", "sign", "subject_common_name", "verify"]


def sign(key_pem: bytes, data: bytes) -> bytes:
    """An ECDSA/SHA-256 signature (DER) of ``data`` with the EC private key in ``key_pem``."""
    key = load_pem_private_key(key_pem, "signing key")
    return key.sign(bytes(data), ec.ECDSA(hashes.SHA256()))


def verify(cert_pem: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is a valid ECDSA/SHA-256 signature of ``data`` by ``cert_pem``'s key.

    False for a wrong or malformed signature, never an exception; a ``cert_pem`` that is not
    an EC certificate raises :class:`CertError`. This checks the signature only: whether the
    certificate is trusted is :func:`fedloom.server.certs.verify_issued_by` and
    :func:`fedloom.server.certs.load_revoked`'s business.
    """
    cert = load_pem_certificate(cert_pem, "certificate")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CertError(f"certificate {_cn_or_none(cert)!r} does not hold an EC public key")
    if not isinstance(signature, (bytes, bytearray, memoryview)) or not isinstance(
        data, (bytes, bytearray, memoryview)
    ):
        return False
    try:
        public_key.verify(bytes(signature), bytes(data), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def load_pem_certificate(pem: bytes, where: str) -> x509.Certificate:
    """The X.509 certificate in ``pem``; :class:`CertError` naming ``where`` if it is not one."""
    try:
        return x509.load_pem_x509_certificate(bytes(pem))
    except (ValueError, TypeError) as exc:
        raise CertError(f"{where} is not a PEM certificate: {exc}") from None


def load_pem_private_key(pem: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    """The unencrypted EC private key in ``pem``; :class:`CertError` naming ``where`` otherwise."""
    try:
        key = serialization.load_pem_private_key(bytes(pem), password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise CertError(f"{where} is encrypted with a password; fedloom needs an unencrypted key") from None
    except ValueError as exc:
        raise CertError(f"{where} is not a PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{where} is a {type(key).__name__}, not an EC private key")
    return key


def subject_common_name(cert: x509.Certificate, where: str) -> str:
    """The certificate's single subject CN; :class:`CertError` naming ``where`` if it has none or several."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        raise CertError(f"{where} has {len(attrs)} subject common names, expected exactly one")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def _cn_or_none(cert: x509.Certificate) -> str | None:
    try:
        return subject_common_name(cert, "certificate")
    except CertError:
        return None
