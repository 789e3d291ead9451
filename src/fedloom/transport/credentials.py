"""The TLS material a client or the server loads, and what a valid client id is.

``fedloom certs`` (:mod:`fedloom.server.certs`) writes credentials directories; this module
reads them for either end of a connection, checking that every file is there, parses, and
that the private key belongs to the certificate::

    <client dir>/client.pem  client.key  ca.pem      load_client_credentials
    <server dir>/server.pem  server.key  ca.pem      load_server_credentials

A client's id is its certificate's subject CN (:func:`validate_client_id`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from fedloom.core.errors import CertError
from fedloom.transport.signing import load_pem_certificate, load_pem_private_key, subject_common_name

__all__ = [
    "CA_CERT",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "ClientCredentials",
    "ServerCredentials",
    "check_key_pair",
    "load_client_credentials",
    "load_server_credentials",
    "read_pem",
    "validate_client_id",
]

CA_CERT = "ca.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CLIENT_CERT = "client.pem"
CLIENT_KEY = "client.key"

_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class ClientCredentials:
    """A client's TLS material, as PEM bytes ready for ``grpc.ssl_channel_credentials``."""

    client_id: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes


@dataclass(frozen=True)
class ServerCredentials:
    """The server's TLS material, as PEM bytes ready for ``grpc.ssl_server_credentials``."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes


def validate_client_id(client_id: str) -> str:
    """Return ``client_id`` if it is 1-64 characters of ``[A-Za-z0-9._-]``, else raise :class:`CertError`.

    ``.`` and ``..`` are refused too: a client id also names a credentials directory.
    """
    if not isinstance(client_id, str):
        raise CertError(f"client id must be a string, got {type(client_id).__name__}")
    if not client_id:
        raise CertError("client id is empty: it must be 1-64 characters of A-Z a-z 0-9 . _ -")
    if len(client_id) > 64:
        raise CertError(f"client id {client_id!r} is {len(client_id)} characters long: at most 64 allowed")
    if not _CLIENT_ID.fullmatch(client_id):
        bad = sorted({c for c in client_id if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        raise CertError(
            f"client id {client_id!r} contains {''.join(bad)!r}: only A-Z a-z 0-9 . _ - are allowed"
        )
    if client_id in (".", ".."):
        raise CertError(f"client id {client_id!r} is not allowed: it is a path component")
    return client_id


def load_client_credentials(directory: Path) -> ClientCredentials:
    """Read ``client.pem``, ``client.key`` and ``ca.pem`` from a client's credentials directory.

    The client id is the certificate's subject CN. Raises :class:`CertError` if a file is
    missing or unreadable, or if the key does not belong to the certificate.
    """
    directory = Path(directory)
    cert_pem = read_pem(directory / CLIENT_CERT, "client certificate")
    key_pem = read_pem(directory / CLIENT_KEY, "client private key")
    ca_pem = read_pem(directory / CA_CERT, "CA certificate")
    cert = load_pem_certificate(cert_pem, str(directory / CLIENT_CERT))
    load_pem_certificate(ca_pem, str(directory / CA_CERT))
    check_key_pair(cert, load_pem_private_key(key_pem, str(directory / CLIENT_KEY)), directory / CLIENT_CERT)
    client_id = subject_common_name(cert, str(directory / CLIENT_CERT))
    validate_client_id(client_id)
    return ClientCredentials(client_id=client_id, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)


def load_server_credentials(directory: Path) -> ServerCredentials:
    """Read ``server.pem``, ``server.key`` and ``ca.pem`` from the server's credentials directory.

    Raises :class:`CertError` if a file is missing or unreadable, or if the key does not
    belong to the certificate.
    """
    directory = Path(directory)
    cert_pem = read_pem(directory / SERVER_CERT, "server certificate")
    key_pem = read_pem(directory / SERVER_KEY, "server private key")
    ca_pem = read_pem(directory / CA_CERT, "CA certificate")
    cert = load_pem_certificate(cert_pem, str(directory / SERVER_CERT))
    load_pem_certificate(ca_pem, str(directory / CA_CERT))
    check_key_pair(cert, load_pem_private_key(key_pem, str(directory / SERVER_KEY)), directory / SERVER_CERT)
    return ServerCredentials(cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of ``path``; :class:`CertError` naming ``what`` if it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"missing {what}: {path} does not exist") from None
    except IsADirectoryError:
        raise CertError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise CertError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def check_key_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path) -> None:
    """:class:`CertError` unless ``key`` is the private key of ``cert`` (read from ``cert_path``)."""
    def spki(k: CertificatePublicKeyTypes) -> bytes:
        return k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    if spki(cert.public_key()) != spki(key.public_key()):
        raise CertError(f"the private key next to {cert_path} does not belong to that certificate")
