"""CKKS aggregation (TenSEAL): the sum of encrypted levels, key-holder dropouts, ciphertexts under another key, refusals."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")

from fedloom.core.errors import ProtocolAbort, ProtocolError  # noqa: E402
from fedloom.core.types import ClientInstruction, ClientUpdate, ProtocolMessage, TrainConfig  # noqa: E402
from fedloom.secure import ckks  # noqa: E402
from fedloom.secure.ckks import DECRYPT, INPUT, KEYS, CkksClient, CkksConfig, CkksServer  # noqa: E402
from fedloom.secure.host import ProtocolClients  # noqa: E402
from fedloom.secure.secagg import SecAggConfig  # noqa: E402

NUMEL = 4096 + 300  # two ciphertexts, the second partly filled
CFG = CkksConfig(bits=16, clip=1.0)


def _inputs(cohort: Sequence[str], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {c: torch.randn(NUMEL, generator=g, dtype=torch.float64) * 0.4 for c in cohort}


class Recorder:
    """An exchange over in-process clients that records every request."""

    def __init__(self, host: ProtocolClients) -> None:
        self.host = host
        self.sent: list[ProtocolMessage] = []

    def __call__(self, requests: Sequence[ProtocolMessage]) -> Iterable[ProtocolMessage]:
        self.sent.extend(requests)
        return list(self.host.exchange(requests))


def _instruction(c: str, srv: CkksServer) -> ClientInstruction:
    return ClientInstruction(round=1, client_id=c, train=TrainConfig(), seed=7, protocol=srv.input_message(c))


def _round(cfg, n: int, drops=frozenset(), *, seed: int = 11, tamper=None):  # type: ignore[no-untyped-def]
    cohort = [f"c{i:02d}" for i in range(n)]
    host = ProtocolClients(drop=lambda r, c, s: (c, s) in drops)
    ex = Recorder(host)
    srv = cfg.server(1, cohort, seed=seed)
    xs = _inputs(cohort)
    trained = srv.setup(ex)
    rejected = {}
    for c in trained:
        sealed = host.seal(_instruction(c, srv), ClientUpdate(client_id=c, round=1, delta=xs[c], num_examples=3, weight=3.0))
        if sealed is None:
            continue
        if tamper is not None:
            sealed = tamper(c, sealed, srv)
        try:
            srv.check(sealed)
            srv.add(sealed, NUMEL)
        except ProtocolError as exc:
            rejected[c] = str(exc)
    total, survivors = srv.finish(ex)
    return total, survivors, xs, srv, rejected


def _levels(x: torch.Tensor, plan) -> np.ndarray:  # type: ignore[no-untyped-def]
    """What the client quantizes ``x`` to (the seed ProtocolClients derives for instruction seed 7)."""
    from fedloom.core.seeding import derive_seed

    gen = torch.Generator().manual_seed(derive_seed(7, "secagg") & 0x7FFF_FFFF_FFFF_FFFF)
    return plan.quantize(x, gen)


def test_the_decrypted_sum_is_the_exact_sum_of_the_quantized_inputs() -> None:
    total, survivors, xs, srv, _ = _round(CFG, 4)
    assert survivors == ["c00", "c01", "c02", "c03"]
    exact = sum(_levels(xs[c], CFG.plan).astype(np.int64) for c in survivors)
    want = CFG.plan.decode_sum(exact.astype(np.uint32), 4)
    assert torch.equal(total, want)  # rounding makes CKKS exact here
    plain = sum(xs[c].clamp(-1, 1) for c in survivors)
    assert (total - plain).abs().max().item() <= CFG.plan.sum_error_bound(4)
    assert srv.key_holder in survivors


def test_ckks_sums_within_its_precision_before_rounding() -> None:
    """The raw decryption of a sum of 50 integer vectors below 2^16 is within 1e-3 of the integers (CKKS precision)."""
    rng = np.random.default_rng(0)
    secret = ckks.new_context(8192)
    public = ckks.load_public(ckks.public_bytes(secret), 8192)
    import tenseal as ts

    xs = [rng.integers(0, 1 << 16, 4096).astype(np.float64) for _ in range(50)]
    acc = ts.ckks_vector(public, xs[0])
    for x in xs[1:]:
        acc.add_(ts.ckks_vector_from(public, ts.ckks_vector(public, x).serialize()))
    got = np.asarray(ts.ckks_vector_from(secret, acc.serialize()).decrypt())
    err = np.abs(got - np.sum(xs, axis=0)).max()
    assert 0 < err < 1e-3  # approximate (never exactly zero), far below the rounding margin 0.25


def test_ckks_gives_secaggs_result_for_the_same_quantization() -> None:
    total, survivors, _, _, _ = _round(CFG, 3)
    st, ss, _, _, _ = _round(SecAggConfig(bits=16, clip=1.0), 3)  # the same driver, the same seeded levels
    assert ss == survivors and torch.equal(st, total)


def test_a_client_that_drops_before_its_input_is_left_out() -> None:
    probe = CkksServer(CFG, 1, [f"c{i:02d}" for i in range(4)], seed=11)
    holder = probe.candidates[0]
    other = next(c for c in probe.cohort if c != holder)
    total, survivors, xs, _, _ = _round(CFG, 4, {(other, INPUT)})
    assert other not in survivors and len(survivors) == 3
    exact = sum(_levels(xs[c], CFG.plan).astype(np.int64) for c in survivors)
    assert torch.equal(total, CFG.plan.decode_sum(exact.astype(np.uint32), 3))


def test_a_key_holder_that_does_not_answer_is_replaced_by_the_next_candidate() -> None:
    probe = CkksServer(CFG, 1, [f"c{i:02d}" for i in range(4)], seed=11)
    first, second = probe.candidates[:2]
    _, survivors, _, srv, _ = _round(CFG, 4, {(first, KEYS)})
    assert srv.key_holder == second and first not in survivors and len(survivors) == 3


def test_a_key_holder_that_drops_before_decrypting_aborts_and_decrypts_nothing() -> None:
    probe = CkksServer(CFG, 1, [f"c{i:02d}" for i in range(4)], seed=11)
    with pytest.raises(ProtocolAbort, match="did not decrypt the sum"):
        _round(CFG, 4, {(probe.candidates[0], DECRYPT)})


def test_no_key_holder_aborts_setup() -> None:
    cohort = [f"c{i:02d}" for i in range(4)]
    host = ProtocolClients(drop=lambda r, c, s: s == KEYS)
    srv = CFG.server(1, cohort, seed=3)
    with pytest.raises(ProtocolAbort, match="no key holder"):
        srv.setup(Recorder(host))
    assert srv.stage == "aborted"


def test_a_ciphertext_under_another_key_aborts_the_round_unread() -> None:
    """A client encrypts under its own key but claims the round's fingerprint: the sum decrypts to noise."""

    def other_key(c: str, up: ClientUpdate, srv: CkksServer) -> ClientUpdate:
        if c != "c01":
            return up
        import tenseal as ts

        mine = ckks.new_context(8192)
        vs = [ts.ckks_vector(mine, np.zeros(n)) for n in (4096, NUMEL - 4096)]
        assert up.payload is not None
        return replace(up, payload=replace(up.payload, tensors=ckks._cts(vs)))

    with pytest.raises(ProtocolAbort, match="not the sum of 3 valid inputs"):
        _round(CFG, 3, tamper=other_key)


def test_an_input_out_of_range_aborts_the_round() -> None:
    """A client that encrypts levels above 2^bits − 1 under the right key pushes the sum outside [0, n(L − 1)]."""

    def huge(c: str, up: ClientUpdate, srv: CkksServer) -> ClientUpdate:
        if c != "c02":
            return up
        import tenseal as ts

        assert up.payload is not None
        vs = [ts.ckks_vector(srv._public, np.full(n, 1e7)) for n in (4096, NUMEL - 4096)]
        return replace(up, payload=replace(up.payload, tensors=ckks._cts(vs)))

    with pytest.raises(ProtocolAbort, match=r"integers in \[0, 196605\]"):
        _round(CFG, 3, tamper=huge)


@pytest.mark.parametrize(
    "tamper,match",
    [
        (lambda up: replace(up, payload=replace(up.payload, meta={**up.payload.meta, "fingerprint": "00" * 32})), "another key"),
        (lambda up: replace(up, payload=replace(up.payload, codec="secagg")), "must be a 'ckks' encrypted input"),
        (
            lambda up: replace(up, payload=replace(up.payload, tensors={**up.payload.tensors, "lengths": up.payload.tensors["lengths"][:1]})),
            "1 ciphertexts, the model needs 2",
        ),
        (
            lambda up: replace(up, payload=replace(up.payload, tensors={"ct": torch.zeros(20, dtype=torch.uint8), "lengths": torch.tensor([10, 10])})),
            "not a ciphertext of this round",
        ),
        (
            lambda up: replace(up, payload=replace(up.payload, tensors={**up.payload.tensors, "lengths": up.payload.tensors["lengths"] + 1})),
            "add up to the bytes sent",
        ),
    ],
)
def test_malformed_encrypted_inputs_are_refused_and_the_round_goes_on(tamper, match) -> None:  # type: ignore[no-untyped-def]
    total, survivors, xs, _, rejected = _round(CFG, 4, tamper=lambda c, up, srv: tamper(up) if c == "c03" else up)
    assert list(rejected) == ["c03"] and match in rejected["c03"]
    assert survivors == ["c00", "c01", "c02"]
    exact = sum(_levels(xs[c], CFG.plan).astype(np.int64) for c in survivors)
    assert torch.equal(total, CFG.plan.decode_sum(exact.astype(np.uint32), 3))


def test_a_swapped_ciphertext_chunk_of_the_wrong_size_is_refused() -> None:
    def swap(c: str, up: ClientUpdate, srv: CkksServer) -> ClientUpdate:  # the short second chunk first: 300 slots where 4096 belong
        if c != "c00":
            return up
        assert up.payload is not None
        t = up.payload.tensors
        a, b = t["lengths"].tolist()
        raw = t["ct"]
        ct = torch.cat([raw[a:], raw[:a]])
        return replace(up, payload=replace(up.payload, tensors={"ct": ct, "lengths": torch.tensor([b, a])}))

    _, survivors, _, _, rejected = _round(CFG, 3, tamper=swap)
    assert "300 slots where 4096 were expected" in rejected["c00"] and "c00" not in survivors


def test_server_refuses_a_replayed_input_and_inputs_from_strangers() -> None:
    cohort = ["a", "b", "c"]
    host = ProtocolClients()
    srv = CFG.server(1, cohort, seed=1)
    trained = srv.setup(Recorder(host))
    ups = {c: host.seal(_instruction(c, srv), ClientUpdate(client_id=c, round=1, delta=torch.zeros(NUMEL, dtype=torch.float64), num_examples=1)) for c in trained}
    srv.check(ups["a"])
    srv.add(ups["a"], NUMEL)
    with pytest.raises(ProtocolError, match="replayed"):
        srv.check(ups["a"])
    with pytest.raises(ProtocolError, match="not in this round's input stage"):
        srv.check(replace(ups["b"], client_id="mallory"))


def test_client_refuses_out_of_stage_replayed_and_misaddressed_messages() -> None:
    c = CkksClient("a")
    dec = ProtocolMessage("ckks", DECRYPT, 1, "a", meta={"numel": 10})
    with pytest.raises(ProtocolError, match="holds no key"):
        c.handle(dec)
    keys = ProtocolMessage("ckks", KEYS, 1, "a", meta={"poly_modulus_degree": 8192})
    with pytest.raises(ProtocolError, match="addressed to 'b'"):
        c.handle(replace(keys, client_id="b"))
    with pytest.raises(ProtocolError, match="parameters 1024 refused"):
        CkksClient("a").handle(replace(keys, meta={"poly_modulus_degree": 1024}))
    reply = c.handle(keys)
    assert set(reply.tensors) == {"context"}
    with pytest.raises(ProtocolError, match="replayed"):
        c.handle(keys)
    with pytest.raises(ProtocolError, match="round 2"):
        c.handle(replace(dec, round=2))
    # the published context holds no secret key
    pub = ckks.load_public(reply.tensors["context"].numpy().tobytes(), 8192)
    assert not pub.has_secret_key()


def test_a_context_holding_the_secret_key_or_other_parameters_is_refused_and_the_next_candidate_asked() -> None:
    cohort = ["a", "b", "c"]
    srv = CFG.server(1, cohort, seed=2)
    first = srv.candidates[0]
    host = ProtocolClients()

    def exchange(reqs: Sequence[ProtocolMessage]) -> Iterable[ProtocolMessage]:
        for m in reqs:
            r = host.handle(m)
            if r is not None and m.client_id == first:  # a key holder that leaks its secret key
                leaked = ckks.new_context(8192).serialize(save_secret_key=True)
                r = replace(r, tensors={"context": torch.frombuffer(bytearray(leaked), dtype=torch.uint8)})
            if r is not None:
                yield r

    trained = srv.setup(exchange)
    assert srv.key_holder == srv.candidates[1] and first not in trained
    assert "no secret key" in srv.rejected[first]
    small = ckks.new_context(16384)
    with pytest.raises(ProtocolError, match="not the round's"):
        ckks.load_public(ckks.public_bytes(small), 8192)
    with pytest.raises(ProtocolError, match="not a CKKS context"):
        ckks.load_public(b"\x00" * 100, 8192)


def test_an_input_message_whose_context_does_not_match_its_fingerprint_is_refused() -> None:
    cohort = ["a", "b"]
    host = ProtocolClients()
    srv = CFG.server(1, cohort, seed=1)
    srv.setup(Recorder(host))
    ins = _instruction("a", srv)
    bad = replace(ins, protocol=replace(ins.protocol, meta={**ins.protocol.meta, "fingerprint": "ab" * 32}))
    assert host.seal(bad, ClientUpdate(client_id="a", round=1, delta=torch.zeros(NUMEL), num_examples=1)) is None
    assert "does not match its fingerprint" in host.last_error


def test_config_validates_and_sizes_the_wire() -> None:
    from fedloom.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        CkksConfig(poly_modulus_degree=4096)
    assert e.value.key == "poly_modulus_degree"
    with pytest.raises(ConfigError) as e:
        CkksConfig(bits=28)
    assert e.value.key == "bits"
    assert CkksConfig(bits=16).max_clients == ((1 << 29) - 1) // 65535 == 8192
    cfg = CkksConfig()
    assert cfg.chunks(4096) == 1 and cfg.chunks(4097) == 2
    ct = ckks.ciphertext_bytes(8192)
    assert 130_000 < ct < 132_000  # 2 polynomials x 8192 coefficients x one 64-bit data prime
    assert cfg.wire_bytes(1_000_000) >= 245 * ct  # a million parameters: 245 ciphertexts
    with pytest.raises(ProtocolAbort, match="at most 8192"):
        cfg.server(1, [f"c{i}" for i in range(8193)], seed=0).setup(lambda reqs: iter(()))
