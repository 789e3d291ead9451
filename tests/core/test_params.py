"""ParamSpec: exact state_dict round trips through one flat vector."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedloom.core.errors import SpecError
from fedloom.core.params import ParamSpec


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(5, 4)
        self.register_buffer("counter", torch.tensor([7, -3, 1_000_000], dtype=torch.int32))
        self.register_buffer("flags", torch.tensor([True, False, True]))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_round_trip_float_int_bool_buffers() -> None:
    torch.manual_seed(0)
    m = Mixed()
    m.bn.num_batches_tracked.fill_(12345)
    m.bn.running_mean.uniform_()
    spec = ParamSpec.from_module(m)
    vec = spec.module_vector(m)
    assert vec.dtype == torch.float32
    assert vec.numel() == sum(t.numel() for t in m.state_dict().values())
    _assert_same(spec.unflatten(vec), m.state_dict())
    trainable = {e.name for e in spec.entries if e.trainable}
    assert trainable == {n for n, _ in m.named_parameters()}
    assert int(spec.trainable_mask().sum()) == sum(p.numel() for p in m.parameters())


def test_round_trip_half_and_bfloat16() -> None:
    for dt in (torch.float16, torch.bfloat16):
        m = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5)).to(dt)
        with torch.no_grad():
            m[0].weight.uniform_(-60000 if dt == torch.float16 else -1e30, 1e-3)
        spec = ParamSpec.from_module(m)
        _assert_same(spec.unflatten(spec.module_vector(m)), m.state_dict())


def test_float64_selects_float64_vector() -> None:
    m = nn.Linear(3, 2).double()
    with torch.no_grad():
        m.weight[0, 0] = 1.0 + 2.0**-40  # not representable in float32
    spec = ParamSpec.from_module(m)
    assert spec.dtype == torch.float64
    _assert_same(spec.unflatten(spec.module_vector(m)), m.state_dict())


def test_large_integer_refused_in_float32_but_exact_in_float64() -> None:
    m = nn.BatchNorm1d(2)
    m.num_batches_tracked.fill_(2**24 + 1)
    spec = ParamSpec.from_module(m)
    with pytest.raises(SpecError, match="num_batches_tracked"):
        spec.module_vector(m)
    spec64 = ParamSpec.from_module(m, vector_dtype=torch.float64)
    _assert_same(spec64.unflatten(spec64.module_vector(m)), m.state_dict())


def test_load_into_and_offsets() -> None:
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    spec = ParamSpec.from_module(a)
    assert [(e.name, e.offset, e.numel) for e in spec.entries] == [("weight", 0, 12), ("bias", 12, 3)]
    spec.load_into(b, spec.module_vector(a))
    _assert_same(b.state_dict(), a.state_dict())


def test_spec_json_round_trip() -> None:
    spec = ParamSpec.from_module(Mixed())
    assert ParamSpec.from_json(spec.to_json()) == spec


def test_errors_name_the_problem() -> None:
    spec = ParamSpec.from_module(nn.Linear(2, 2))
    with pytest.raises(SpecError, match=r"shape \(5,\)"):
        spec.check_vector(torch.zeros(5))
    with pytest.raises(SpecError, match="missing"):
        spec.flatten({"weight": torch.zeros(2, 2)})
    with pytest.raises(SpecError, match="shape"):
        spec.flatten({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)})
    with pytest.raises(SpecError, match="dtype"):
        spec.flatten({"weight": torch.zeros(2, 2, dtype=torch.float64), "bias": torch.zeros(2)})
    with pytest.raises(SpecError, match="malformed"):
        ParamSpec.from_json('{"entries": [{"name": "w"}]}')


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=6),
    dtypes=st.lists(st.sampled_from(["float32", "float16", "int64", "bool", "bfloat16", "uint8"]), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_round_trip_sweep(shapes: list[list[int]], dtypes: list[str], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i, shape in enumerate(shapes):
        dt = getattr(torch, dtypes[i])
        base = torch.randn(tuple(shape), generator=g) * 100
        state[f"t{i}"] = (base > 0) if dt == torch.bool else (base.abs().to(dt) if dt == torch.uint8 else base.to(dt))
    spec = ParamSpec.from_state_dict(state)
    vec = spec.flatten(state)
    assert vec.shape == (sum(t.numel() for t in state.values()),)
    _assert_same(spec.unflatten(vec), state)
