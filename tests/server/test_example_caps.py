"""Example caps: a site cannot register more training examples than its certificate or the server's config allows.

An authenticated client could otherwise declare any count and buy an example-weighted mean.
Real gRPC over mutual TLS; the cap travels in a certificate extension that `fedloom certs`
writes and the server reads.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from torch import nn
from typer.testing import CliRunner

from fedloom.cli import app
from fedloom.core.config import parse_config
from fedloom.core.errors import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.engines.coordinator import Coordinator
from fedloom.server import certs
from fedloom.server.service import FleetService, ServiceSettings, start_server
from fedloom.transport.proto import fedloom_pb2 as pb

sys.path.insert(0, str(Path(__file__).parent))
from test_service import Env  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    pki = tmp_path_factory.mktemp("pki")
    certs.create_ca(pki / "ca")
    certs.issue_server(pki / "ca", pki / "server", hosts=["localhost"])
    certs.issue_client(pki / "ca", pki / "clients" / "capped", "capped", max_examples=500)
    certs.issue_client(pki / "ca", pki / "clients" / "listed", "listed", max_examples=10_000)
    certs.issue_client(pki / "ca", pki / "clients" / "plain", "plain")
    settings = ServiceSettings(
        run_info={"model": {"name": "linear"}}, max_examples=5_000, client_max_examples={"listed": 800}
    )
    coord = Coordinator(heartbeat_timeout=30)
    service = FleetService(coord, spec=ParamSpec.from_module(nn.Linear(3, 2)), dtype=torch.float32, settings=settings)
    server, port = start_server(service, "127.0.0.1:0", credentials=certs.load_server_credentials(pki / "server"), max_workers=8)
    yield Env(port, coord, service, pki)
    server.stop(0)
    service.close()


def _refused(env: Env, who: str, n: int) -> str:
    with pytest.raises(grpc.RpcError) as err:
        env.stub(who).Register(pb.RegisterRequest(client_id=who, num_examples=n), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return err.value.details() or ""


def test_the_certificate_cap_bounds_the_declared_count(env: Env) -> None:
    assert _refused(env, "capped", 501) == "'capped' declares 501 training examples, above its cap of 500 (its certificate)"
    env.register("capped", 500)
    assert env.coord.info("capped").num_examples == 500


def test_the_smallest_cap_applies_and_is_named(env: Env) -> None:
    # listed: certificate 10,000, deploy.max_examples 5,000, deploy.client_max_examples 800 -> 800
    assert "above its cap of 800 (deploy.client_max_examples)" in _refused(env, "listed", 801)
    # plain: no certificate cap, deploy.max_examples 5,000
    assert "above its cap of 5000 (deploy.max_examples)" in _refused(env, "plain", 1_000_000)
    env.register("plain", 5_000)


def test_the_extension_round_trips_and_is_checked(tmp_path: Path) -> None:
    certs.create_ca(tmp_path / "ca")
    for n in (1, 127, 128, 255, 256, 70_000, 2**63 - 1):
        p = certs.issue_client(tmp_path / "ca", tmp_path / str(n), "site", max_examples=n)
        assert certs.peer_identity(p.cert.read_bytes()).max_examples == n
    p = certs.issue_client(tmp_path / "ca", tmp_path / "none", "site")
    assert certs.peer_identity(p.cert.read_bytes()).max_examples is None
    for bad in (0, -5, 2**63, 1.5, True):
        with pytest.raises(certs.CertError, match="max_examples"):
            certs.issue_client(tmp_path / "ca", tmp_path / "bad", "site", max_examples=bad)  # type: ignore[arg-type]
    # the DER INTEGER 128 is 02 02 00 80; the extension is non-critical
    cert = x509.load_pem_x509_certificate((tmp_path / "128" / "client.pem").read_bytes())
    ext = cert.extensions.get_extension_for_oid(certs.MAX_EXAMPLES_OID)
    assert ext.value.value == bytes([2, 2, 0, 0x80]) and not ext.critical


def test_certs_client_command_writes_the_cap(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["certs", "init", str(tmp_path), "--host", "localhost"]).exit_code == 0
    res = runner.invoke(app, ["certs", "client", "site-z", "--dir", str(tmp_path), "--max-examples", "1200"])
    assert res.exit_code == 0, res.output
    pem = (tmp_path / "clients" / "site-z" / "client.pem").read_bytes()
    assert certs.peer_identity(pem).max_examples == 1200
    assert runner.invoke(app, ["certs", "client", "site-y", "--dir", str(tmp_path), "--max-examples", "0"]).exit_code != 0


def test_caps_in_the_deploy_table_are_checked() -> None:
    base = {"data": {"name": "hospital"}, "model": {"name": "mlp"}}
    cfg = parse_config({**base, "deploy": {"max_examples": 12_000, "client_max_examples": {"hospital-a": 10_000}}})
    assert cfg.deploy.client_max_examples == {"hospital-a": 10_000}
    with pytest.raises(ConfigError, match="deploy.max_examples"):
        parse_config({**base, "deploy": {"max_examples": 0}})
    with pytest.raises(ConfigError, match="deploy.client_max_examples.hospital-a"):
        parse_config({**base, "deploy": {"client_max_examples": {"hospital-a": -1}}})
