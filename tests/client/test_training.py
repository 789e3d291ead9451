"""Local training: exact epochs, determinism, FedProx and SCAFFOLD hooks."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from fedloom.client.training import batch_order, train_local
from fedloom.core.params import ParamSpec
from fedloom.core.types import ComponentSpec, ClientInstruction, TrainConfig
from fedloom.data.base import Split


def _data(n: int = 23, d: int = 4, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return Split(x, x @ torch.arange(1.0, d + 1) + 0.1 * torch.randn(n, generator=g))


def _ins(seed: int = 5, **train) -> ClientInstruction:
    return ClientInstruction(round=1, client_id="c", train=TrainConfig(loss="mse", **train), seed=seed)


def test_batch_order_is_exact_epochs() -> None:
    cfg = TrainConfig(epochs=3, batch_size=10)
    batches = batch_order(23, cfg, seed=1)
    assert [len(b) for b in batches] == [10, 10, 3] * 3
    for e in range(3):
        epoch = torch.cat(batches[3 * e : 3 * e + 3])
        assert torch.equal(epoch.sort().values, torch.arange(23))
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:6]))
    assert [len(b) for b in batch_order(23, TrainConfig(epochs=3, batch_size=10, max_steps=4), 1)] == [10, 10, 3, 10]


def test_full_batch_sgd_equals_manual_gradient_descent() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    spec = ParamSpec.from_module(model)
    g = spec.module_vector(model)
    data = _data()
    data = Split(data.x.double(), data.y.double())
    res = train_local(model, spec, g, data, _ins(epochs=3, batch_size=23, lr=0.1))
    # Manual gradient descent on the whole set, 3 steps.
    w = spec.unflatten(g)
    W, b = w["weight"].clone().requires_grad_(), w["bias"].clone().requires_grad_()
    for _ in range(3):
        loss = F.mse_loss((data.x @ W.T + b).reshape(-1), data.y)
        gw, gb = torch.autograd.grad(loss, (W, b))
        with torch.no_grad():
            W -= 0.1 * gw
            b -= 0.1 * gb
    expected = torch.cat([W.detach().reshape(-1), b.detach()]) - g
    torch.testing.assert_close(res.update.delta, expected, rtol=0, atol=1e-14)
    assert res.update.num_examples == 23 and res.update.num_steps == 3


def test_training_is_deterministic_and_seed_dependent() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    spec = ParamSpec.from_module(model)
    g = spec.module_vector(model)
    a = train_local(model, spec, g, _data(), _ins(seed=9, epochs=2, batch_size=5)).update.delta
    before = torch.get_rng_state()
    b = train_local(model, spec, g, _data(), _ins(seed=9, epochs=2, batch_size=5)).update.delta
    assert torch.equal(torch.get_rng_state(), before), "global RNG must not be disturbed"
    c = train_local(model, spec, g, _data(), _ins(seed=10, epochs=2, batch_size=5)).update.delta
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_fedprox_adds_proximal_gradient() -> None:
    torch.manual_seed(1)
    model = nn.Linear(4, 1).double()
    spec = ParamSpec.from_module(model)
    g = spec.module_vector(model)
    data = _data()
    data = Split(data.x.double(), data.y.double())
    mu, lr = 0.5, 0.05
    ins = replace(_ins(epochs=4, batch_size=23, lr=lr), transforms=(ComponentSpec.of("proximal", mu=mu),))
    res = train_local(model, spec, g, data, ins)
    w = g.clone().requires_grad_()
    for _ in range(4):
        out = data.x @ w[:4] + w[4]
        loss = F.mse_loss(out, data.y) + mu / 2 * ((w - g) ** 2).sum()
        (gr,) = torch.autograd.grad(loss, (w,))
        w = (w - lr * gr).detach().requires_grad_()
    torch.testing.assert_close(res.update.delta, w.detach() - g, rtol=0, atol=1e-13)


def test_scaffold_correction_and_control_update() -> None:
    torch.manual_seed(2)
    model = nn.Linear(4, 1).double()
    spec = ParamSpec.from_module(model)
    g = spec.module_vector(model)
    data = _data()
    data = Split(data.x.double(), data.y.double())
    lr, steps = 0.05, 3
    c = torch.tensor([0.5, -0.25, 0.0, 1.0, 0.125], dtype=torch.float64)
    c_i = torch.tensor([0.25, 0.0, -0.5, 0.0, 0.0], dtype=torch.float64)
    ins = ClientInstruction(
        round=1,
        client_id="c",
        train=TrainConfig(loss="mse", epochs=steps, batch_size=23, lr=lr),
        seed=0,
        payload={"server_control": c},
        transforms=(ComponentSpec("scaffold"),),
    )
    res = train_local(model, spec, g, data, ins, client_state={"control": c_i})
    w = g.clone().requires_grad_()
    for _ in range(steps):
        loss = F.mse_loss(data.x @ w[:4] + w[4], data.y)
        (gr,) = torch.autograd.grad(loss, (w,))
        w = (w - lr * (gr + c - c_i)).detach().requires_grad_()
    delta = w.detach() - g
    torch.testing.assert_close(res.update.delta, delta, rtol=0, atol=1e-13)
    new_ci = c_i - c - delta / (steps * lr)
    torch.testing.assert_close(res.state["control"], new_ci, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.update.extras["control_delta"], new_ci - c_i, rtol=0, atol=1e-12)
