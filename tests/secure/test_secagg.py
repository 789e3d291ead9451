"""The SecAgg / SecAgg+ state machines: sums, dropout recovery at every stage, aborts, refusals."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from fedloom.core.errors import ProtocolAbort, ProtocolError
from fedloom.core.types import ClientInstruction, ClientUpdate, ProtocolMessage, TrainConfig
from fedloom.secure import shamir
from fedloom.secure.host import DropoutModel, ProtocolClients
from fedloom.secure.secagg import ADVERTISE, INPUT, SHARE, UNMASK, SecAggClient, SecAggConfig, SecAggServer

NUMEL = 257


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


def _round(cfg: SecAggConfig, n: int, drops: set[tuple[str, str]] = frozenset(), *, xs=None):
    cohort = [f"c{i:02d}" for i in range(n)]
    host = ProtocolClients(drop=lambda r, c, s: (c, s) in drops)
    ex = Recorder(host)
    srv = cfg.server(1, cohort, seed=11)
    xs = xs or _inputs(cohort)
    trained = srv.setup(ex)
    for c in trained:
        ins = ClientInstruction(round=1, client_id=c, train=TrainConfig(), seed=7, protocol=srv.input_message(c))
        sealed = host.seal(ins, ClientUpdate(client_id=c, round=1, delta=xs[c], num_examples=3, weight=3.0))
        if sealed is not None:
            srv.check(sealed)
            srv.add(sealed, NUMEL)
    total, survivors = srv.finish(ex)
    return total, survivors, xs, srv, ex


def _plain(xs, survivors, clip=1.0):
    return sum(xs[c].clamp(-clip, clip) for c in survivors)


@pytest.mark.parametrize("cfg", [SecAggConfig(), SecAggConfig(graph="sparse", neighbours=4)], ids=["secagg", "secagg+"])
@pytest.mark.parametrize(
    "stage,expect_in",
    [(ADVERTISE, False), (SHARE, False), (INPUT, False), (UNMASK, True)],
)
def test_a_dropout_at_any_stage_leaves_the_exact_sum_of_the_survivors(cfg, stage, expect_in) -> None:
    total, survivors, xs, srv, ex = _round(cfg, 9, {("c04", stage)})
    assert ("c04" in survivors) is expect_in  # dropped after its masked input: its input still counts
    assert len(survivors) == 8 + expect_in
    err = (total - _plain(xs, survivors)).abs().max().item()
    assert err <= cfg.plan.sum_error_bound(len(survivors))
    assert srv.rejected == {}


def test_two_clients_drop_at_different_stages() -> None:
    cfg = SecAggConfig(threshold=0.5)
    total, survivors, xs, _srv, ex = _round(cfg, 10, {("c01", INPUT), ("c07", UNMASK), ("c03", SHARE)})
    assert survivors == [c for c in sorted(xs) if c not in ("c01", "c03")]
    assert (total - _plain(xs, survivors)).abs().max().item() <= cfg.plan.sum_error_bound(8)
    # nobody is asked for both kinds of share of one client
    for m in ex.sent:
        if m.stage == UNMASK:
            assert not set(m.meta["survivors"]) & set(m.meta["dropped"])
            assert "c01" in m.meta["dropped"] and (m.client_id == "c07" or "c07" in m.meta["survivors"])


def test_every_secagg_plus_client_talks_to_its_neighbours_only() -> None:
    cfg = SecAggConfig(graph="sparse", neighbours=4)
    _total, _s, _xs, srv, ex = _round(cfg, 16)
    for m in ex.sent:
        if m.stage == ADVERTISE:
            assert len(m.meta["neighbours"]) == 4
        if m.stage == SHARE:
            assert m.tensors["c_pk"].shape == (4, 32)
    assert srv.t == 3


def test_abort_below_the_threshold_unmasks_nothing() -> None:
    cfg = SecAggConfig(threshold=4)  # t = 4 of 5 neighbours
    drops = {("c01", INPUT), ("c02", INPUT), ("c03", INPUT)}  # 3 survivors hold <= 2 shares of each dropped key
    with pytest.raises(ProtocolAbort, match="before unmasking: fewer than t=4"):
        _round(cfg, 6, drops)


def test_abort_when_holders_drop_during_unmasking() -> None:
    cfg = SecAggConfig(threshold=4)
    drops = {("c01", UNMASK), ("c02", UNMASK), ("c03", UNMASK)}
    cohort = [f"c{i:02d}" for i in range(6)]
    host = ProtocolClients(drop=lambda r, c, s: (c, s) in drops)
    srv = SecAggServer(cfg, 1, cohort, seed=1)
    xs = _inputs(cohort)
    for c in srv.setup(host.exchange):
        ins = ClientInstruction(round=1, client_id=c, train=TrainConfig(), seed=7, protocol=srv.input_message(c))
        srv.add(host.seal(ins, ClientUpdate(client_id=c, round=1, delta=xs[c], num_examples=1)), NUMEL)
    with pytest.raises(ProtocolAbort, match="after unmasking"):
        srv.finish(host.exchange)
    assert srv.stage == "aborted"


def test_setup_aborts_when_too_few_advertise() -> None:
    cfg = SecAggConfig(threshold=3)
    with pytest.raises(ProtocolAbort, match="advertised keys"):
        _round(cfg, 4, {("c00", ADVERTISE), ("c01", ADVERTISE), ("c02", ADVERTISE)})


def test_one_masked_vector_is_uniform_over_the_ring() -> None:
    """A chi-square test on one client's masked vector (its input is all zeros), false-alarm rate 1e-6."""
    cfg = SecAggConfig(bits=8, modulus_bits=16)
    n = 3
    cohort = [f"c{i}" for i in range(n)]
    host = ProtocolClients()
    srv = SecAggServer(cfg, 1, cohort, seed=0)
    srv.setup(host.exchange)
    big = 1 << 17
    ins = ClientInstruction(round=1, client_id="c0", train=TrainConfig(), seed=7, protocol=srv.input_message("c0"))
    sealed = host.seal(ins, ClientUpdate(client_id="c0", round=1, delta=torch.zeros(big), num_examples=1))
    y = cfg.plan.from_wire(sealed.payload.tensors["masked"])
    assert y.max() < 1 << 16
    counts = np.bincount(y >> 8, minlength=256)  # 256 bins of the 16-bit ring
    chi2 = float(((counts - big / 256) ** 2 / (big / 256)).sum())
    assert chi2 < stats.chi2.ppf(1 - 1e-6, df=255)
    # the unmasked input: every entry is the level of 0 (a plain vector would fail the test at once)
    q = cfg.plan.quantize(torch.zeros(big), torch.Generator().manual_seed(0))
    plain_counts = np.bincount(q >> 8, minlength=256)
    assert float(((plain_counts - big / 256) ** 2 / (big / 256)).sum()) > stats.chi2.ppf(1 - 1e-6, df=255)


# ------------------------------------------------------------------ refusals
def _advertise(client: SecAggClient, rnd: int = 1) -> ProtocolMessage:
    msg = ProtocolMessage("secagg", ADVERTISE, rnd, client.client_id, meta={"neighbours": ["b", "c"], "threshold": 2, "points": {"b": 2, "c": 3}})
    return client.handle(msg)


def test_client_refuses_replayed_out_of_stage_and_misaddressed_messages() -> None:
    a = SecAggClient("a")
    share = ProtocolMessage("secagg", SHARE, 1, "a", meta={"neighbours": ["b", "c"]})
    with pytest.raises(ProtocolError, match="stage 'share' while expecting 'advertise'"):
        a.handle(share)
    _advertise(a)
    with pytest.raises(ProtocolError, match="already done"):
        _advertise(a)
    with pytest.raises(ProtocolError, match="round 2"):
        a.handle(replace(share, round=2))
    with pytest.raises(ProtocolError, match="addressed to 'b'"):
        a.handle(replace(share, client_id="b"))
    with pytest.raises(ProtocolError, match="comes with the training task"):
        a.handle(ProtocolMessage("secagg", INPUT, 1, "a"))
    with pytest.raises(ProtocolError, match="not this client's neighbours"):
        a.handle(replace(share, meta={"neighbours": ["b", "z"]}))


def test_client_refuses_an_unmask_request_naming_a_client_both_ways() -> None:
    cohort = ["a", "b", "c", "d"]
    host = ProtocolClients()
    srv = SecAggServer(SecAggConfig(threshold=2), 1, cohort, seed=0)
    srv.setup(host.exchange)
    for c in cohort:
        ins = ClientInstruction(round=1, client_id=c, train=TrainConfig(), seed=1, protocol=srv.input_message(c))
        host.seal(ins, ClientUpdate(client_id=c, round=1, delta=torch.zeros(NUMEL), num_examples=1))
    session = host._sessions["a"]
    bad = ProtocolMessage("secagg", UNMASK, 1, "a", meta={"survivors": ["b", "c"], "dropped": ["b"]})
    with pytest.raises(ProtocolError, match="both as survivor and as dropped"):
        session.handle(bad)


def test_server_refuses_replays_strangers_and_malformed_replies() -> None:
    cohort = ["a", "b", "c"]
    srv = SecAggServer(SecAggConfig(threshold=2), 1, cohort, seed=0)
    clients = {c: SecAggClient(c) for c in cohort}
    adv = {m.client_id: m for m in srv._advertise_requests()}
    reply = clients["a"].handle(adv["a"])
    srv.receive(reply)
    with pytest.raises(ProtocolError, match="already answered"):
        srv.receive(reply)
    with pytest.raises(ProtocolError, match="'zed' is not part"):
        srv.receive(replace(reply, client_id="zed"))
    with pytest.raises(ProtocolError, match="stage 'share' during stage 'advertise'"):
        srv.receive(replace(reply, client_id="b", stage=SHARE))
    with pytest.raises(ProtocolError, match="round 2"):
        srv.receive(replace(reply, client_id="b", round=2))
    with pytest.raises(ProtocolError, match="uint8 of shape"):
        srv.receive(replace(reply, client_id="b", tensors={"c_pk": torch.zeros(31, dtype=torch.uint8), "s_pk": torch.zeros(32, dtype=torch.uint8)}))
    with pytest.raises(ProtocolError, match="fresh and distinct"):
        srv.receive(replace(reply, client_id="b"))  # a's keys replayed as b's


def _setup_by_hand(cohort, cfg=None):
    cfg = cfg or SecAggConfig(threshold=2)
    srv = SecAggServer(cfg, 1, cohort, seed=0)
    clients = {c: SecAggClient(c) for c in cohort}
    return srv, clients


def test_shares_for_a_graph_the_client_is_not_in_are_refused() -> None:
    cohort = [f"c{i}" for i in range(6)]
    srv = SecAggServer(SecAggConfig(graph="sparse", neighbours=2, threshold=1), 1, cohort, seed=0)
    host = ProtocolClients()

    def tamper(requests):
        for r in host.exchange(requests):
            if r.client_id == "c0" and r.stage == SHARE:  # a ciphertext for a third, non-neighbour client
                r = replace(r, tensors={**r.tensors, "ct": torch.cat([r.tensors["ct"], r.tensors["ct"][:1]])})
            yield r

    trained = srv.setup(tamper)
    assert srv.rejected == {"c0": "secagg: stage 'share': 'ct' must be uint8 of shape (2, 160), got torch.uint8 (3, 160)"}
    assert trained == ["c1", "c2", "c3", "c4", "c5"]  # the round goes on without c0


def test_masked_inputs_of_the_wrong_length_dtype_or_codec_are_refused() -> None:
    cohort = ["a", "b", "c"]
    host = ProtocolClients()
    srv = SecAggServer(SecAggConfig(threshold=2), 1, cohort, seed=0)
    srv.setup(host.exchange)
    ins = ClientInstruction(round=1, client_id="a", train=TrainConfig(), seed=1, protocol=srv.input_message("a"))
    up = host.seal(ins, ClientUpdate(client_id="a", round=1, delta=torch.zeros(NUMEL), num_examples=1))
    with pytest.raises(ProtocolError, match="has 257 entries, the model 300"):
        srv.add(up, 300)
    wrong = replace(up, payload=replace(up.payload, tensors={"masked": torch.zeros(NUMEL, dtype=torch.float32)}))
    with pytest.raises(ProtocolError, match="1-D torch.int32"):
        srv.check(wrong)
    with pytest.raises(ProtocolError, match="must be a 'secagg' masked input"):
        srv.check(replace(up, payload=None, delta=torch.zeros(NUMEL)))
    with pytest.raises(ProtocolError, match="not in this round's input stage"):
        srv.check(replace(up, client_id="zed"))
    srv.check(up)
    srv.add(up, NUMEL)
    with pytest.raises(ProtocolError, match="second masked input"):
        srv.check(up)


def test_a_malformed_or_corrupted_share_is_refused_or_aborts_without_a_wrong_sum() -> None:
    cohort = ["a", "b", "c", "d"]
    host = ProtocolClients()
    srv = SecAggServer(SecAggConfig(threshold=3), 1, cohort, seed=0)
    srv.setup(host.exchange)
    xs = _inputs(cohort)
    for c in cohort:
        ins = ClientInstruction(round=1, client_id=c, train=TrainConfig(), seed=1, protocol=srv.input_message(c))
        srv.add(host.seal(ins, ClientUpdate(client_id=c, round=1, delta=xs[c], num_examples=1)), NUMEL)

    def tamper(requests):
        for r in host.exchange(requests):
            if r.client_id == "a":  # a malformed share: outside the field
                yield replace(r, tensors={**r.tensors, "b": torch.full_like(r.tensors["b"], 255)})
            elif r.client_id == "b":  # a well-formed but wrong share: one bit flipped
                b = r.tensors["b"].clone()
                b[0, -1] ^= 1
                yield replace(r, tensors={**r.tensors, "b": b})
            else:
                yield r

    with pytest.raises(ProtocolAbort, match="does not match its commitment|fewer than t"):
        srv.finish(tamper)
    assert srv.rejected["a"].startswith("secagg: share value outside the field")


def test_dropout_model_is_seeded_and_validated() -> None:
    m = DropoutModel(rates={"input": 0.3}, seed=5)
    drops = [m(r, f"c{i}", "input") for r in range(20) for i in range(50)]
    assert drops == [DropoutModel(rates={"input": 0.3}, seed=5)(r, f"c{i}", "input") for r in range(20) for i in range(50)]
    p = sum(drops) / len(drops)
    assert abs(p - 0.3) < 6 * math.sqrt(0.3 * 0.7 / len(drops))
    assert not m(1, "c1", "share")
    from fedloom.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage 'train'"):
        DropoutModel(rates={"train": 0.1})
    with pytest.raises(ConfigError, match="probability"):
        DropoutModel(rates={"share": 1.5})
