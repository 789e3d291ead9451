"""Norm bounding (Sun et al. 2019) and capped example weights, by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedloom.core.errors import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientUpdate
from fedloom.pipeline import ExampleWeighting, Pipeline, StageContext, build_stage
from fedloom.pipeline.bounding import NormBound

CTX = StageContext(ParamSpec.from_module(nn.Linear(2, 1)), 1)  # 3 trainable entries


def _up(delta: list[float], weight: float | None = None, n: int = 1) -> ClientUpdate:
    return ClientUpdate(client_id="c", round=1, delta=torch.tensor(delta), num_examples=n, weight=weight)


def test_an_update_over_the_bound_is_scaled_to_it() -> None:
    out = NormBound(max_norm=1.0).server(_up([3.0, 4.0, 0.0]), CTX)  # norm 5 -> [0.6, 0.8, 0]
    assert torch.allclose(out.delta, torch.tensor([0.6, 0.8, 0.0]))
    assert out.metrics == {"update_norm": 5.0, "norm_bounded": 1.0}


def test_a_weighted_update_is_bounded_before_its_weight() -> None:
    # w = 2, Δ = [3, 4, 0]: the delta arrives as [6, 8, 0]; bounded Δ = [0.6, 0.8, 0], sent on as 2·Δ
    out = NormBound(max_norm=1.0).server(_up([6.0, 8.0, 0.0], weight=2.0, n=2), CTX)
    assert torch.allclose(out.delta, torch.tensor([1.2, 1.6, 0.0])) and out.weight == 2.0
    assert out.metrics["update_norm"] == 5.0


def test_an_update_within_the_bound_passes_unchanged() -> None:
    up = _up([0.3, 0.4, 0.0])
    out = NormBound(max_norm=1.0).server(up, CTX)
    assert torch.equal(out.delta, up.delta) and out.metrics["norm_bounded"] == 0.0
    assert out.metrics["update_norm"] == pytest.approx(0.5)


def test_buffers_are_not_bounded() -> None:
    spec = ParamSpec.from_module(nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)))
    mask = spec.trainable_mask()
    delta = torch.zeros(spec.numel)
    delta[mask] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # linear w, b, BN weight, bias
    delta[~mask] = 100.0  # running stats, batch count
    out = NormBound(max_norm=1.0).server(ClientUpdate(client_id="c", round=1, delta=delta, num_examples=1), StageContext(spec, 1))
    assert torch.allclose(out.delta[mask], torch.tensor([0.6, 0.8, 0.0, 0.0])) and bool((out.delta[~mask] == 100.0).all())


def test_norm_bound_is_a_server_stage_with_checked_options() -> None:
    st = build_stage("norm_bound", {"max_norm": 2.5})
    assert isinstance(st, NormBound) and not st.runs_on_client
    assert Pipeline((st,)).recipes == ()  # nothing for the clients to run
    for bad in (0.0, -1.0, float("inf"), True, "x"):
        with pytest.raises(ConfigError, match="pipeline.max_norm"):
            build_stage("norm_bound", {"max_norm": bad})


def test_capped_example_weighting() -> None:
    w = ExampleWeighting(cap=100)
    assert w.weight_of(_up([0.0, 0.0, 0.0], n=40)) == 40.0 and w.weight_of(_up([0.0, 0.0, 0.0], n=4000)) == 100.0
    with pytest.raises(Exception, match="not the rule's 100.0"):
        w.server(_up([0.0, 0.0, 0.0], weight=4000.0, n=4000), CTX)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="pipeline.cap"):
            build_stage("weight_examples", {"cap": bad})
