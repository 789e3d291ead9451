"""fedloom.server.certs: the CA, server and client certificates, revocation, signatures, and mTLS over gRPC."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedloom.core.errors import FedloomError
from fedloom.server.certs import (
    CertError,
    CertPaths,
    ClientCredentials,
    PeerIdentity,
    ServerCredentials,
    create_ca,
    issue_client,
    issue_server,
    load_client_credentials,
    load_revoked,
    load_server_credentials,
    peer_identity,
    revoke,
    sign,
    verify,
    verify_issued_by,
)


@dataclass(frozen=True)
class Pki:
    ca: CertPaths
    server: CertPaths
    a: CertPaths
    b: CertPaths
    root: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = create_ca(root / "ca")
    server = issue_server(root / "ca", root / "server", hosts=["fl.example.org", "10.0.0.7"])
    a = issue_client(root / "ca", root / "creds" / "site-a", "site-a")
    b = issue_client(root / "ca", root / "creds" / "site-b", "site-b")
    return Pki(ca=ca, server=server, a=a, b=b, root=root)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA with a server and a client of its own."""
    root = tmp_path_factory.mktemp("other")
    create_ca(root / "ca", name="other CA")
    issue_server(root / "ca", root / "server", hosts=[])
    issue_client(root / "ca", root / "creds" / "site-a", "site-a")  # same CN as the real site-a
    return root


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- files and contents


def test_create_ca_files(pki: Pki) -> None:
    d = pki.root / "ca"
    assert pki.ca == CertPaths(cert=d / "ca.pem", key=d / "ca.key", ca=d / "ca.pem")
    assert _mode(d / "ca.key") == 0o600
    cert = _cert(d / "ca.pem")
    assert cert.subject.rfc4514_string() == "CN=fedloom CA"
    assert cert.issuer == cert.subject
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) <= life <= timedelta(days=3650, minutes=6)


def test_server_cert(pki: Pki) -> None:
    d = pki.root / "server"
    assert pki.server == CertPaths(cert=d / "server.pem", key=d / "server.key", ca=d / "ca.pem")
    assert _mode(d / "server.key") == 0o600
    assert (d / "ca.pem").read_bytes() == (pki.root / "ca" / "ca.pem").read_bytes()
    cert = _cert(d / "server.pem")
    assert cert.subject.rfc4514_string() == "CN=fl.example.org"
    assert cert.issuer.rfc4514_string() == "CN=fedloom CA"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_server_hosts_dedup_and_ipv6(tmp_path: Path, pki: Pki) -> None:
    issue_server(pki.root / "ca", tmp_path, hosts=["LocalHost", "127.0.0.1", "::1", "[fe80::2]"])
    san = _cert(tmp_path / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("fe80::2"),
    ]


def test_server_hosts_rejects_bad_input(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(CertError, match="not a single string"):
        issue_server(pki.root / "ca", tmp_path, hosts="fl.example.org")
    with pytest.raises(CertError, match=r"host 'bad host' is neither an IP address nor a valid DNS name"):
        issue_server(pki.root / "ca", tmp_path, hosts=["bad host"])
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_client_certs(pki: Pki) -> None:
    for paths, cid in ((pki.a, "site-a"), (pki.b, "site-b")):
        d = pki.root / "creds" / cid
        assert paths == CertPaths(cert=d / "client.pem", key=d / "client.key", ca=d / "ca.pem")
        assert _mode(d / "client.key") == 0o600
        cert = _cert(d / "client.pem")
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cid
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert _cert(pki.a.cert).serial_number != _cert(pki.b.cert).serial_number


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca")
    before = (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(CertError, match="refusing to overwrite the existing CA files") as info:
        create_ca(tmp_path / "ca")
    assert isinstance(info.value, FedloomError)
    assert str(tmp_path / "ca" / "ca.pem") in str(info.value)
    assert (tmp_path / "ca" / "ca.key").read_bytes() == before

    issue_client(tmp_path / "ca", tmp_path / "a", "a")
    with pytest.raises(CertError, match="refusing to overwrite the existing client 'a' files"):
        issue_client(tmp_path / "ca", tmp_path / "a", "a")

    create_ca(tmp_path / "ca", overwrite=True)
    assert (tmp_path / "ca" / "ca.key").read_bytes() != before
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600
    # a client dir holding the OLD CA's ca.pem is not silently repointed at the new CA
    with pytest.raises(CertError, match=r"ca\.pem"):
        issue_client(tmp_path / "ca", tmp_path / "a", "a")
    issue_client(tmp_path / "ca", tmp_path / "a", "a", overwrite=True)
    assert (tmp_path / "a" / "ca.pem").read_bytes() == (tmp_path / "ca" / "ca.pem").read_bytes()


def test_server_in_ca_dir_does_not_clobber_ca(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    pem = ca.cert.read_bytes()
    issue_server(tmp_path, tmp_path, hosts=[])
    assert ca.cert.read_bytes() == pem
    assert load_server_credentials(tmp_path).ca_pem == pem


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "client id is empty"),
        ("site a", "client id 'site a' contains ' '"),
        ("site/a", "client id 'site/a' contains '/'"),
        ("x" * 65, "is 65 characters long: at most 64"),
        ("..", "client id '..' is not allowed"),
        ("h\u00f4pital", "client id 'h\u00f4pital' contains '\u00f4'"),
    ],
)
def test_bad_client_id(tmp_path: Path, pki: Pki, bad: str, message: str) -> None:
    with pytest.raises(CertError, match=message.replace(".", r"\.")):
        issue_client(pki.root / "ca", tmp_path / "c", bad)
    assert not (tmp_path / "c").exists()


def test_client_id_limits_ok(tmp_path: Path, pki: Pki) -> None:
    cid = "A.b_c-9" + "x" * 57
    assert len(cid) == 64
    issue_client(pki.root / "ca", tmp_path, cid)
    assert load_client_credentials(tmp_path).client_id == cid


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(CertError, match=r"missing CA certificate: .*ca\.pem does not exist"):
        issue_client(tmp_path / "nope", tmp_path / "c", "c")


# --------------------------------------------------------------------------- loading


def test_load_credentials(pki: Pki) -> None:
    creds = load_client_credentials(pki.root / "creds" / "site-a")
    assert isinstance(creds, ClientCredentials)
    assert creds.client_id == "site-a"
    assert creds.cert_pem == pki.a.cert.read_bytes()
    assert creds.key_pem == pki.a.key.read_bytes()
    assert creds.ca_pem == pki.ca.cert.read_bytes()
    assert "PRIVATE KEY" not in repr(creds)

    server = load_server_credentials(pki.root / "server")
    assert isinstance(server, ServerCredentials)
    assert server.cert_pem == pki.server.cert.read_bytes()
    assert server.key_pem == pki.server.key.read_bytes()
    assert server.ca_pem == pki.ca.cert.read_bytes()


def test_load_credentials_errors(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(CertError, match=r"missing client certificate: .*client\.pem does not exist"):
        load_client_credentials(tmp_path)
    with pytest.raises(CertError, match=r"missing server certificate: .*server\.pem does not exist"):
        load_server_credentials(tmp_path)
    # a key that belongs to another client's certificate
    for name in ("client.pem", "ca.pem"):
        (tmp_path / name).write_bytes((pki.root / "creds" / "site-a" / name).read_bytes())
    (tmp_path / "client.key").write_bytes(pki.b.key.read_bytes())
    with pytest.raises(CertError, match="does not belong to that certificate"):
        load_client_credentials(tmp_path)
    (tmp_path / "client.key").write_bytes(b"not a key")
    with pytest.raises(CertError, match="is not a PEM private key"):
        load_client_credentials(tmp_path)
    if os.geteuid() != 0:  # root reads anything
        (tmp_path / "client.key").chmod(0)
        with pytest.raises(CertError, match="cannot read client private key"):
            load_client_credentials(tmp_path)


# --------------------------------------------------------------------------- revocation


def test_revoke_is_idempotent(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca")
    a = issue_client(tmp_path / "ca", tmp_path / "a", "a")
    b = issue_client(tmp_path / "ca", tmp_path / "b", "b")
    serial_a = _cert(a.cert).serial_number
    serial_b = _cert(b.cert).serial_number

    assert load_revoked(None) == frozenset()
    assert load_revoked(tmp_path / "ca" / "revoked.txt") == frozenset()  # nothing revoked yet
    assert revoke(tmp_path / "ca", a.cert) == serial_a
    assert revoke(tmp_path / "ca", a.cert.read_bytes()) == serial_a
    assert (tmp_path / "ca" / "revoked.txt").read_text() == f"{serial_a:x}\n"
    assert load_revoked(tmp_path / "ca" / "revoked.txt") == frozenset({serial_a})
    revoke(tmp_path / "ca", b.cert)
    assert (tmp_path / "ca" / "revoked.txt").read_text() == f"{serial_a:x}\n{serial_b:x}\n"
    assert load_revoked(tmp_path / "ca" / "revoked.txt") == frozenset({serial_a, serial_b})
    assert peer_identity(a.cert.read_bytes()).serial in load_revoked(tmp_path / "ca" / "revoked.txt")


def test_revoke_foreign_cert_refused(pki: Pki, other_ca: Path) -> None:
    with pytest.raises(CertError, match="was not issued by the CA"):
        revoke(pki.root / "ca", other_ca / "creds" / "site-a" / "client.pem")


def test_load_revoked_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("# revoked\n1f  # site-x\n0xAB\n\nzz\n")
    with pytest.raises(CertError, match=r"revoked\.txt:5: not a hexadecimal serial number: 'zz'"):
        load_revoked(path)
    path.write_text("# revoked\n1f  # site-x\n0xAB\n\n")
    assert load_revoked(path) == frozenset({0x1F, 0xAB})


# --------------------------------------------------------------------------- identity and signatures


def test_peer_identity(pki: Pki) -> None:
    ident = peer_identity(pki.a.cert.read_bytes())
    assert isinstance(ident, PeerIdentity)
    assert ident.common_name == "site-a"
    assert ident.serial == _cert(pki.a.cert).serial_number
    assert ident.public_key == _cert(pki.a.cert).public_key()
    with pytest.raises(CertError, match="peer certificate is not a PEM certificate"):
        peer_identity(b"garbage")


def test_sign_verify(pki: Pki, other_ca: Path) -> None:
    data = b"round 3 update from site-a"
    sig = sign(pki.a.key.read_bytes(), data)
    cert_a, cert_b = pki.a.cert.read_bytes(), pki.b.cert.read_bytes()
    assert verify(cert_a, sig, data) is True
    assert verify(cert_a, sig, data + b"!") is False  # tampered data
    assert verify(cert_a, sig, b"") is False
    assert verify(cert_b, sig, data) is False  # another client's certificate
    other_a = (other_ca / "creds" / "site-a" / "client.pem").read_bytes()
    assert verify(other_a, sig, data) is False  # same CN, other CA, other key
    for garbage in (b"", b"\x00", b"\x30\x06\x02\x01\x01\x02\x01\x01", os.urandom(72), sig[:-1], sig + b"\x00"):
        assert verify(cert_a, garbage, data) is False
    assert verify(cert_a, "not bytes", data) is False  # type: ignore[arg-type]
    with pytest.raises(CertError, match="is not a PEM certificate"):
        verify(b"garbage", sig, data)


def test_verify_issued_by(pki: Pki, other_ca: Path) -> None:
    ca = pki.ca.cert.read_bytes()
    other = (other_ca / "ca" / "ca.pem").read_bytes()
    for paths in (pki.server, pki.a, pki.b):
        assert verify_issued_by(ca, paths.cert.read_bytes()) is True
        assert verify_issued_by(other, paths.cert.read_bytes()) is False
    foreign = (other_ca / "creds" / "site-a" / "client.pem").read_bytes()
    assert verify_issued_by(ca, foreign) is False
    assert verify_issued_by(other, foreign) is True
    assert verify_issued_by(ca, ca) is True  # the self-signed CA itself
    assert verify_issued_by(pki.a.cert.read_bytes(), pki.b.cert.read_bytes()) is False  # not a CA
    assert verify_issued_by(ca, b"garbage") is False
    # validity dates: issued now for 825 days (the CA lives 3650)
    now = datetime.now(timezone.utc)
    cert_a = pki.a.cert.read_bytes()
    assert verify_issued_by(ca, cert_a, at=now + timedelta(days=824)) is True
    assert verify_issued_by(ca, cert_a, at=now + timedelta(days=826)) is False
    assert verify_issued_by(ca, cert_a, at=now - timedelta(hours=1)) is False


def test_leaf_validity_clipped_to_ca(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca", days=10)
    issue_client(tmp_path / "ca", tmp_path / "a", "a", days=825)
    leaf, ca = _cert(tmp_path / "a" / "client.pem"), _cert(tmp_path / "ca" / "ca.pem")
    assert leaf.not_valid_after_utc == ca.not_valid_after_utc


# --------------------------------------------------------------------------- mutual TLS over gRPC

_TIMEOUT = 5.0
_NO_PROXY = [("grpc.enable_http_proxy", 0)]


@pytest.fixture()
def mtls_port(pki: Pki) -> Iterator[int]:
    """A gRPC server requiring client certificates from the fedloom CA; Echo replies b'<CN>:<request>'."""

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        cn = context.auth_context()["x509_common_name"][0]
        return cn + b":" + request

    handler = grpc.method_handlers_generic_handler(
        "fedloom.test.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=None, response_serializer=None)},
    )
    creds = load_server_credentials(pki.root / "server")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=_NO_PROXY)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem, require_client_auth=True
        ),
    )
    assert port > 0
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def _call(port: int, credentials: grpc.ChannelCredentials, payload: bytes = b"hello") -> bytes:
    with grpc.secure_channel(f"localhost:{port}", credentials, options=_NO_PROXY) as channel:
        rpc = channel.unary_unary("/fedloom.test.Echo/Echo", request_serializer=None, response_deserializer=None)
        reply: bytes = rpc(payload, timeout=_TIMEOUT)
        return reply


def test_mtls_valid_client(pki: Pki, mtls_port: int) -> None:
    for cid in ("site-a", "site-b"):
        c = load_client_credentials(pki.root / "creds" / cid)
        creds = grpc.ssl_channel_credentials(
            root_certificates=c.ca_pem, private_key=c.key_pem, certificate_chain=c.cert_pem
        )
        assert _call(mtls_port, creds) == cid.encode() + b":hello"


def test_mtls_client_from_other_ca_rejected(pki: Pki, other_ca: Path, mtls_port: int) -> None:
    foreign = other_ca / "creds" / "site-a"  # same CN "site-a", signed by the other CA
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),  # it trusts the right server
        private_key=(foreign / "client.key").read_bytes(),
        certificate_chain=(foreign / "client.pem").read_bytes(),
    )
    with pytest.raises(grpc.RpcError) as info:
        _call(mtls_port, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mtls_client_without_cert_rejected(pki: Pki, mtls_port: int) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert.read_bytes())
    with pytest.raises(grpc.RpcError) as info:
        _call(mtls_port, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mtls_client_rejects_server_from_other_ca(pki: Pki, other_ca: Path, mtls_port: int) -> None:
    c = load_client_credentials(pki.root / "creds" / "site-a")
    creds = grpc.ssl_channel_credentials(
        root_certificates=(other_ca / "ca" / "ca.pem").read_bytes(),  # does not trust our server
        private_key=c.key_pem,
        certificate_chain=c.cert_pem,
    )
    with pytest.raises(grpc.RpcError) as info:
        _call(mtls_port, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
