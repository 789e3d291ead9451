"""SCAFFOLD end to end (round loop, engine, client state, stages, server), against hand-computed values.

Karimireddy et al. 2020, Algorithm 1 with option II, under partial participation (2 of N = 4
clients a round, one client first seen in round 3), unequal local step counts (K_i = 1, 2, 4)
and a client that comes back with a stale control variate. The model is one weight w
(``Linear(1, 1, bias=False)``), every example of client i is (x = 1, y = t_i) and the loss is
MSE, so with batch size 1 a local step is ``w ← w − η (2(w − t_i) − c_i + c)``; with η = 1/4
every value below is a short dyadic fraction, exact in float32, so the test asserts equality.

Clients (t_i, n_i = K_i): a (1, 1), b (2, 2), c (0, 4), d (−1, 2). Cohorts: {a, b}, {b, c}, {a, d}.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fedloom.core.keys import CLIENT_CONTROL
from fedloom.core.params import ParamSpec
from fedloom.core.types import TrainConfig
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines import SequentialEngine, VectorizedEngine
from fedloom.federation import Federation
from fedloom.strategies import Scaffold

TARGETS = {"a": (1.0, 1), "b": (2.0, 2), "c": (0.0, 4), "d": (-1.0, 2)}
COHORTS = (("a", "b"), ("b", "c"), ("a", "d"))
REGRESSION = TaskSpec(kind="regression", input_shape=(1,), num_outputs=1, loss="mse", metrics=("mae",))


@dataclass(frozen=True, kw_only=True)
class _Scheduled(Scaffold):
    """SCAFFOLD with the cohorts fixed by hand instead of sampled."""

    def select(self, rnd: int, available: Sequence[str]) -> list[str]:
        assert sorted(available) == ["a", "b", "c", "d"]
        return list(COHORTS[rnd - 1])


def _model() -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(m.weight)
    return m


def _dataset() -> FederatedDataset:
    clients = {cid: ClientData(Split(torch.ones(n, 1), torch.full((n,), t))) for cid, (t, n) in TARGETS.items()}
    return FederatedDataset("scaffold-toy", REGRESSION, clients)


# Hand computation (x: global weight, c: server control, c_i: client controls; option II
# c_i⁺ = c_i − c + (x − y_i)/(K_i η), which for these clients is the mean of the raw gradients
# 2(w − t_i) along the local path; server x += mean Δy_i, c += (|S|/N) mean Δc_i with N = 4).
#
# round 1, x = 0, c = 0, S = {a, b}
#   a: w 0 → 0.5;                      Δy = 0.5,   c_a = (0 − 0.5)/0.25 = −2          (grad at 0: −2)
#   b: w 0 → 1 → 1.5;                  Δy = 1.5,   c_b = (0 − 1.5)/0.5 = −3           (grads −4, −2)
#   x = 0 + (0.5 + 1.5)/2 = 1;         c = 0 + (2/4)(−2 − 3)/2 = −1.25
# round 2, x = 1, c = −1.25, S = {b, c}
#   b (c_b = −3, stale): w ← 0.5 w + 1 + 0.25(−3 + 1.25): 1 → 1.0625 → 1.09375
#                                      Δy = 0.09375, c_b = −3 + 1.25 − 0.09375/0.5 = −1.9375  (grads −2, −1.875)
#   c (new, c_c = 0): w ← 0.5 w + 0.25(1.25): 1 → 0.8125 → 0.71875 → 0.671875 → 0.6484375
#                                      Δy = −0.3515625, c_c = 1.25 + 0.3515625/1 = 1.6015625
#   x = 1 + (0.09375 − 0.3515625)/2 = 0.87109375
#   c = −1.25 + (2/4)((−1.9375 + 3) + 1.6015625)/2 = −0.583984375
# round 3, x = 0.87109375, c = −0.583984375, S = {a, d}
#   a (c_a = −2, two rounds stale): w = 0.5 x + 0.5 + 0.25(−2 + 0.583984375) = 0.58154296875
#                                      Δy = −0.28955078125, c_a = −2 + 0.583984375 + 4 · 0.28955078125 = −0.2578125
#   d (new): w ← 0.5 w − 0.5 + 0.25 · 0.583984375: 0.87109375 → 0.08154296875 → −0.313232421875
#                                      Δy = −1.184326171875, c_d = 0.583984375 + 1.184326171875/0.5 = 2.95263671875
#   x = 0.87109375 + (−0.28955078125 − 1.184326171875)/2 = 0.1341552734375
#   c = −0.583984375 + (2/4)((−0.2578125 + 2) + 2.95263671875)/2 = 0.5897216796875
EXPECTED = [
    (1.0, -1.25, {"a": -2.0, "b": -3.0}),
    (0.87109375, -0.583984375, {"a": -2.0, "b": -1.9375, "c": 1.6015625}),
    (0.1341552734375, 0.5897216796875, {"a": -0.2578125, "b": -1.9375, "c": 1.6015625, "d": 2.95263671875}),
]


@pytest.mark.parametrize("engine_cls", [SequentialEngine, VectorizedEngine])
def test_three_rounds_partial_participation_unequal_steps(engine_cls: type) -> None:
    data = _dataset()
    model = _model()
    spec = ParamSpec.from_module(model)
    strategy = _Scheduled(train=TrainConfig(loss="mse", epochs=1, batch_size=1, lr=0.25), fraction=0.5)
    engine = engine_cls(model_fn=_model, dataset=data, spec=spec)
    fed = Federation(strategy=strategy, engine=engine, spec=spec, initial=spec.module_vector(model))
    for rnd, (x, c, controls) in enumerate(EXPECTED, 1):
        rec = fed.step()
        assert sorted(rec.clients) == list(COHORTS[rnd - 1])
        assert fed.state.params.tolist() == [x]
        assert fed.state.tensors["control"].tolist() == [c]
        stored = {cid: engine.client_states.get(cid)[CLIENT_CONTROL].tolist() for cid in TARGETS if engine.client_states.get(cid)}
        assert stored == {cid: [v] for cid, v in controls.items()}  # a client never sampled keeps no state (c_i = 0)
        # the invariant option II keeps: c is the mean of all N clients' c_i (never sampled: 0)
        assert sum(controls.values()) / 4 == c
