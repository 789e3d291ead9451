"""Compression stages: exact encodings, unbiasedness, byte counts, error feedback, rejections."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedloom.compress import QSGD, BFloat16, Float16, TopK
from fedloom.compress._random import uniform
from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientUpdate, Payload
from fedloom.pipeline import ClientBatch, StageContext, build_stage


def _spec(p: int) -> ParamSpec:
    return ParamSpec.from_module(nn.Linear(p, 1, bias=False))  # p trainable entries, no buffers


def _bn_spec() -> ParamSpec:
    # Linear(3, 2): 8 trainable; BatchNorm1d(2): 4 trainable + 5 buffers (running_mean, running_var, num_batches_tracked)
    return ParamSpec.from_module(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))


def _batch(deltas: torch.Tensor, seeds: list[int] | None = None) -> ClientBatch:
    ups = [ClientUpdate(client_id=f"c{i}", round=1, delta=d, num_examples=1) for i, d in enumerate(deltas)]
    return ClientBatch.of(ups, seeds or list(range(len(ups))), [{} for _ in ups], deltas.clone())


def _roundtrip(stage, spec: ParamSpec, deltas: torch.Tensor, seeds=None):
    ctx = StageContext(spec, 1)
    batch = _batch(deltas, seeds)
    stage.client(batch, ctx)
    ups = batch.finish()
    return ups, [stage.server(u, ctx).delta for u in ups], batch


def test_qsgd_exact_on_levels_and_bytes() -> None:
    # bits=8: s = 127; with max |v| = 127 every integer in [-127, 127] is a level: decoded exactly.
    v = torch.tensor([[127.0, -5.0, 0.0, 64.0, -127.0, 1.0, 3.0]])
    ups, out, _ = _roundtrip(QSGD(bits=8, bucket=4), _spec(7), v)
    assert torch.equal(out[0], v[0])
    p = ups[0].payload
    assert p.meta == {"bits": 8, "bucket": 4}
    # 7 codes of 1 byte + 2 buckets x 4-byte scales + 0 buffers
    assert p.nbytes == 7 + 8
    assert p.tensors["scales"].tolist() == [127.0, 127.0]


@pytest.mark.parametrize("bits,codes", [(8, 1000), (4, 500), (2, 250)])
def test_qsgd_byte_counts(bits: int, codes: int) -> None:
    ups, _, _ = _roundtrip(QSGD(bits=bits, bucket=512), _spec(1000), torch.randn(1, 1000))
    assert ups[0].payload.nbytes == codes + 2 * 4  # ceil(1000/512) = 2 scales
    assert ups[0].nbytes == ups[0].payload.nbytes


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_qsgd_unbiased_within_bound(bits: int) -> None:
    torch.manual_seed(0)
    p, trials, bucket = 600, 400, 100
    v = torch.randn(p)
    stage = QSGD(bits=bits, bucket=bucket)
    _, outs, _ = _roundtrip(stage, _spec(p), v.repeat(trials, 1), seeds=list(range(trials)))
    mean = torch.stack(outs).to(torch.float64).mean(0)
    # Var(Q(v_j)) <= m^2 / (4 s^2) with m the bucket's max |v|: the mean of T draws is within
    # 6 standard deviations, m / (2 s sqrt(T)) each, for every entry.
    s = 2 ** (bits - 1) - 1
    m = v.view(-1, bucket).abs().amax(1).repeat_interleave(bucket).to(torch.float64)
    bound = 6 * m / (2 * s * math.sqrt(trials))
    assert bool(((mean - v.double()).abs() <= bound).all())
    # and it is really random: the draws differ between seeds (unless quantization is exact)
    assert not torch.equal(outs[0], outs[1])


def test_qsgd_batched_equals_alone() -> None:
    torch.manual_seed(1)
    d = torch.randn(3, 700)
    _, together, _ = _roundtrip(QSGD(bits=4), _spec(700), d, seeds=[11, 12, 13])
    for i in range(3):
        _, alone, _ = _roundtrip(QSGD(bits=4), _spec(700), d[i : i + 1], seeds=[11 + i])
        assert torch.equal(alone[0], together[i])


def test_uniform_hash_is_uniform_and_per_row() -> None:
    u = uniform([7, 8], 200_000)
    assert torch.equal(u[1], uniform([8], 200_000)[0])
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # mean within 6 sigma of 1/2 (sigma = 1/sqrt(12 n)); each decile holds 10% within 6 sigma
    n = u.numel()
    assert abs(float(u.double().mean()) - 0.5) < 6 / math.sqrt(12 * n)
    hist = torch.histc(u, bins=10, min=0, max=1) / n
    assert float((hist - 0.1).abs().max()) < 6 * math.sqrt(0.09 / n)


def test_cast_codecs() -> None:
    v = torch.tensor([[1.0, -2.5, 1e-3, 3.0e38]])
    ups, out, _ = _roundtrip(BFloat16(), _spec(4), v)
    assert ups[0].payload.nbytes == 8
    assert torch.equal(out[0], v[0].to(torch.bfloat16).float())
    ups, out, _ = _roundtrip(Float16(), _spec(3), v[:, :3])
    assert ups[0].payload.tensors["values"].dtype == torch.float16
    assert torch.equal(out[0], v[0, :3].half().float())
    # 3e38 overflows float16 to Inf: the server refuses it, naming the stage
    _, _, batch = _roundtrip(BFloat16(), _spec(4), v)  # (bf16 holds it)
    ctx = StageContext(_spec(4), 1)
    b = _batch(v)
    Float16().client(b, ctx)
    with pytest.raises(InvalidUpdateError, match="stage 'fp16'.*NaN or Inf"):
        Float16().server(b.finish()[0], ctx)


def test_topk_error_feedback_by_hand() -> None:
    spec, ctx, stage = _spec(4), StageContext(_spec(4), 1), TopK(fraction=0.5)
    b = _batch(torch.tensor([[0.25, -3.0, 2.0, 0.5]]))
    stage.client(b, ctx)
    up = b.finish()[0]
    assert up.payload.tensors["indices"].tolist() == [1, 2]
    assert up.payload.tensors["values"].tolist() == [-3.0, 2.0]
    assert up.payload.nbytes == 2 * 4 + 2 * 4
    assert b.states[0]["topk.residual"].tolist() == [0.25, 0.0, 0.0, 0.5]
    assert stage.server(up, ctx).delta.tolist() == [0.0, -3.0, 2.0, 0.0]
    # next round: the residual is added first, a = [0.75, 0, 0, 0.25] + ...
    ups = [ClientUpdate(client_id="c0", round=2, delta=torch.tensor([0.5, 0.0, 0.125, -0.5]), num_examples=1)]
    b2 = ClientBatch.of(ups, [0], b.states)
    stage.client(b2, ctx)
    up2 = b2.finish()[0]
    assert up2.payload.tensors["indices"].tolist() == [0, 2]
    assert up2.payload.tensors["values"].tolist() == [0.75, 0.125]
    assert b2.states[0]["topk.residual"].tolist() == [0.0, 0.0, 0.0, 0.0]
    # without error feedback nothing is kept
    b3 = _batch(torch.tensor([[0.25, -3.0, 2.0, 0.5]]))
    TopK(fraction=0.5, error_feedback=False).client(b3, ctx)
    assert b3.states[0] == {}


def test_buffers_travel_exactly_and_only_trainable_compressed() -> None:
    spec = _bn_spec()
    mask = spec.trainable_mask()
    assert int(mask.sum()) == 12 and spec.numel == 17
    d = torch.randn(2, spec.numel)
    d[:, ~mask] = torch.tensor([0.123456789, -7.0, 1.5, 2.25, 3.0])
    for stage in (QSGD(bits=2, bucket=4), TopK(fraction=0.25), Float16()):
        ups, out, _ = _roundtrip(stage, spec, d)
        for i in range(2):
            assert torch.equal(out[i][~mask], d[i][~mask])
            assert ups[i].payload.tensors["buffers"].numel() == 5
    ups, out, _ = _roundtrip(TopK(fraction=0.25), spec, d)
    assert ups[0].payload.nbytes == 3 * 8 + 5 * 4  # k = ceil(0.25 * 12) = 3 (index + value), 5 buffers


def _reject(stage, spec, payload: Payload, match: str) -> None:
    up = ClientUpdate(client_id="bad", round=1, delta=None, payload=payload, num_examples=1)
    with pytest.raises(InvalidUpdateError, match=match) as info:
        stage.server(up, StageContext(spec, 1))
    assert info.value.client_id == "bad"
    assert f"stage {stage.name!r}" in info.value.reason


def test_malformed_payloads_are_rejected_naming_the_stage() -> None:
    spec = _spec(100)
    ups, _, _ = _roundtrip(QSGD(bits=4, bucket=10), spec, torch.randn(1, 100))
    good = ups[0].payload
    t = dict(good.tensors)
    _reject(QSGD(bits=4, bucket=10), spec, Payload("qsgd", {**t, "codes": t["codes"][:-1]}, good.meta), "expected torch.uint8 \\(50,\\)")
    _reject(QSGD(bits=4, bucket=10), spec, Payload("qsgd", {**t, "scales": t["scales"].double()}, good.meta), "scales")
    _reject(QSGD(bits=4, bucket=10), spec, Payload("qsgd", {**t, "extra": torch.zeros(1)}, good.meta), "unexpected \\['extra'\\]")
    _reject(QSGD(bits=4, bucket=10), spec, Payload("qsgd", {k: v for k, v in t.items() if k != "scales"}, good.meta), "missing \\['scales'\\]")
    _reject(QSGD(bits=8, bucket=10), spec, good, "meta")
    _reject(TopK(), spec, good, "codec is 'qsgd'")
    bad_scale = t["scales"].clone()
    bad_scale[0] = float("nan")
    _reject(QSGD(bits=4, bucket=10), spec, Payload("qsgd", {**t, "scales": bad_scale}, good.meta), "NaN")
    bad_codes = t["codes"].clone()
    bad_codes[0] = 0xFF  # level 15 - 7 = 8 > 7
    _reject(QSGD(bits=4, bucket=10), spec, Payload("qsgd", {**t, "codes": bad_codes}, good.meta), "beyond")
    # top-k: indices out of range, repeated, and a dense delta where a payload is expected
    ups, _, _ = _roundtrip(TopK(fraction=0.03), spec, torch.randn(1, 100))
    tk = dict(ups[0].payload.tensors)
    _reject(TopK(fraction=0.03), spec, Payload("topk", {**tk, "indices": torch.tensor([0, 5, 100], dtype=torch.int32)}, {"k": 3}), "out of range")
    _reject(TopK(fraction=0.03), spec, Payload("topk", {**tk, "indices": torch.tensor([0, 5, 5], dtype=torch.int32)}, {"k": 3}), "strictly increasing")
    _reject(TopK(fraction=0.03), spec, Payload("topk", tk, {"k": 1000}), "meta")
    dense = ClientUpdate(client_id="bad", round=1, delta=torch.zeros(100), num_examples=1)
    with pytest.raises(InvalidUpdateError, match="got a dense delta"):
        TopK().server(dense, StageContext(spec, 1))


def test_stage_options_are_validated_with_keys() -> None:
    with pytest.raises(ConfigError, match="pipeline.bits"):
        build_stage("qsgd", {"bits": 3})
    with pytest.raises(ConfigError, match="pipeline.fraction"):
        build_stage("topk", {"fraction": 0.0})
    with pytest.raises(ConfigError, match="pipeline.levels: unknown option"):
        build_stage("qsgd", {"levels": 3})
    with pytest.raises(ConfigError, match="pipeline.name: unknown stage 'zip'"):
        build_stage("zip")
    assert build_stage("qsgd", {"bits": 2}) == QSGD(bits=2)
    assert build_stage(QSGD(bits=4, bucket=64).recipe()) == QSGD(bits=4, bucket=64)


def test_broadcast_encoding_round_trip() -> None:
    spec = _bn_spec()
    ctx = StageContext(spec, 3)
    params = torch.randn(spec.numel)
    for stage in (Float16(), QSGD(bits=8)):
        payload = stage.encode_model(params, ctx, seed=5)
        got = stage.decode_model(payload, ctx)
        assert torch.equal(got, stage.decode_model(stage.encode_model(params, ctx, seed=5), ctx))  # deterministic
        mask = spec.trainable_mask()
        assert torch.equal(got[~mask], params[~mask])
    with pytest.raises(Exception, match="cannot encode the broadcast"):
        TopK().encode_model(params, ctx, seed=0)
