"""Sample-level DP-SGD in the sequential trainer: config, Poisson sampling, clipping, Opacus."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedloom.client.dpsgd import dpsgd_sampling, expected_batch_size, noise_generator, poisson_batches
from fedloom.client.training import train_local
from fedloom.core.errors import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, TrainConfig
from fedloom.data.base import Split
from fedloom.models import MLP

SRC = Path(__file__).resolve().parents[2] / "src"


def _regression(n: int, d: int = 3, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return Split(x, x @ torch.arange(1.0, d + 1, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64))


def _linear(d: int = 3) -> tuple[nn.Module, ParamSpec, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(d, 1).double()
    spec = ParamSpec.from_module(model)
    return model, spec, spec.module_vector(model)


def _ins(cfg: TrainConfig, seed: int = 3) -> ClientInstruction:
    return ClientInstruction(round=1, client_id="c", train=cfg, seed=seed)


# ------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"dp_clip_norm": 0.0}, "client.dp_clip_norm"),
        ({"dp_clip_norm": -1.0}, "client.dp_clip_norm"),
        ({"dp_clip_norm": math.inf}, "client.dp_clip_norm"),
        ({"dp_clip_norm": math.nan}, "client.dp_clip_norm"),
        ({"dp_clip_norm": True}, "client.dp_clip_norm"),
        ({"dp_clip_norm": "1"}, "client.dp_clip_norm"),
        ({"dp_clip_norm": 1.0, "dp_noise_multiplier": -0.5}, "client.dp_noise_multiplier"),
        ({"dp_clip_norm": 1.0, "dp_noise_multiplier": math.nan}, "client.dp_noise_multiplier"),
        ({"dp_clip_norm": 1.0, "dp_noise_multiplier": math.inf}, "client.dp_noise_multiplier"),
        ({"dp_noise_multiplier": 1.0}, "client.dp_noise_multiplier"),
    ],
)
def test_bad_dp_settings_name_their_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kwargs)
    assert err.value.key == key


def test_dp_settings_are_flat_fields_that_travel_as_a_dict() -> None:
    assert not TrainConfig().dpsgd and TrainConfig().dp_noise_multiplier == 0.0
    cfg = TrainConfig(dp_clip_norm=2, dp_noise_multiplier=1)  # JSON may deliver integers
    assert cfg.dpsgd and cfg.dp_clip_norm == 2.0 and isinstance(cfg.dp_clip_norm, float)
    assert isinstance(cfg.dp_noise_multiplier, float)
    assert TrainConfig(**asdict(cfg)) == cfg  # what the transport codec does
    assert TrainConfig(dp_clip_norm=1.0).dp_noise_multiplier == 0.0


# ------------------------------------------------------------------ sampling
def test_poisson_batches_are_deterministic_per_seed_sorted_and_in_range() -> None:
    cfg = TrainConfig(epochs=2, batch_size=4, dp_clip_norm=1.0)
    a, b, c = poisson_batches(17, cfg, 1), poisson_batches(17, cfg, 1), poisson_batches(17, cfg, 2)
    assert len(a) == 2 * math.ceil(17 / 4)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, c, strict=True))
    for batch in a:
        assert batch.dtype == torch.long and torch.equal(batch, batch.unique())  # sorted, no repeats
        assert bool(((batch >= 0) & (batch < 17)).all())


def test_poisson_inclusion_rate_matches_q_within_five_sigma() -> None:
    n, b, epochs = 50, 10, 40
    cfg = TrainConfig(epochs=epochs, batch_size=b, dp_clip_norm=1.0)
    q, steps = dpsgd_sampling(n, cfg)
    assert (q, steps) == (0.2, epochs * 5)
    batches = poisson_batches(n, cfg, seed=7)
    draws = n * steps
    included = sum(len(x) for x in batches)
    assert abs(included - q * draws) <= 5 * math.sqrt(draws * q * (1 - q))
    # Each example, too, is included at rate q (a 5-sigma bound per example, 50 examples).
    per_example = torch.bincount(torch.cat(batches), minlength=n).double()
    assert float((per_example - q * steps).abs().max()) <= 5 * math.sqrt(steps * q * (1 - q))
    # B >= n: q = 1, every step takes the whole set.
    assert all(torch.equal(x, torch.arange(6)) for x in poisson_batches(6, TrainConfig(batch_size=8, dp_clip_norm=1.0), 0))


def test_steps_are_epochs_times_ceil_n_over_b_truncated_at_max_steps() -> None:
    cfg = TrainConfig(epochs=3, batch_size=5, dp_clip_norm=1.0)
    assert dpsgd_sampling(23, cfg) == (5 / 23, 15)
    assert dpsgd_sampling(3, cfg) == (1.0, 3)
    assert expected_batch_size(23, cfg) == 5 and expected_batch_size(3, cfg) == 3
    capped = TrainConfig(epochs=3, batch_size=5, dp_clip_norm=1.0, max_steps=4)
    assert dpsgd_sampling(23, capped) == (5 / 23, 4)
    full, cut = poisson_batches(23, cfg, 9), poisson_batches(23, capped, 9)
    assert len(cut) == 4 and all(torch.equal(u, v) for u, v in zip(cut, full[:4], strict=False))
    with pytest.raises(ConfigError):
        dpsgd_sampling(0, cfg)


# ------------------------------------------------------------------ one step by hand
def _hand_step(
    spec: ParamSpec, g: torch.Tensor, data: Split, idx: torch.Tensor, *, lr: float, clip: float, denom: int
) -> tuple[torch.Tensor, list[float]]:
    """SGD on sum_j clip(grad l_j) / denom for the MSE of a linear model; also the clipped norms."""
    w = spec.unflatten(g)
    weight, bias = w["weight"], w["bias"]
    total = torch.zeros_like(g)
    norms = []
    for j in idx.tolist():
        resid = (data.x[j] @ weight[0] + bias[0]) - data.y[j]
        gj = torch.cat([2 * resid * data.x[j], (2 * resid).reshape(1)])  # grad of (w.x + b - y)^2
        gj = gj * min(1.0, clip / (float(gj.norm()) + 1e-6))
        norms.append(float(gj.norm()))
        total += gj
    return -lr * total / denom, norms


def test_unclipped_noiseless_step_is_the_plain_sum_over_the_expected_batch_size() -> None:
    model, spec, g = _linear()
    data = _regression(6)
    cfg = TrainConfig(loss="mse", batch_size=4, lr=0.1, max_steps=1, dp_clip_norm=1e9)
    seed = next(s for s in range(100) if len(poisson_batches(6, cfg, s)[0]) not in (0, 4))
    (idx,) = poisson_batches(6, cfg, seed)
    res = train_local(model, spec, g, data, _ins(cfg, seed))
    # The denominator is q·n = 4, not the actual batch size.
    expected, _ = _hand_step(spec, g, data, idx, lr=0.1, clip=1e9, denom=4)
    torch.testing.assert_close(res.update.delta, expected, rtol=0, atol=1e-14)
    losses = (data.x[idx] @ g[:3] + g[3] - data.y[idx]) ** 2
    assert res.update.metrics["train_loss"] == pytest.approx(float(losses.mean()), rel=1e-12)
    assert res.update.num_steps == 1 and res.update.num_examples == 6
    # B > n: q = 1, so one step is exactly a plain full-batch-mean step.
    big = TrainConfig(loss="mse", batch_size=10, lr=0.1, max_steps=1, dp_clip_norm=1e9)
    plain = train_local(model, spec, g, data, _ins(TrainConfig(loss="mse", batch_size=6, lr=0.1, max_steps=1), seed))
    torch.testing.assert_close(train_local(model, spec, g, data, _ins(big, seed)).update.delta, plain.update.delta, rtol=0, atol=1e-14)


def test_clipped_step_matches_per_sample_clipping_by_hand() -> None:
    model, spec, g = _linear()
    data = _regression(8, seed=1)
    clip, lr = 0.5, 0.2
    cfg = TrainConfig(loss="mse", batch_size=5, lr=lr, max_steps=1, dp_clip_norm=clip)
    seed = next(s for s in range(100) if len(poisson_batches(8, cfg, s)[0]) >= 3)
    (idx,) = poisson_batches(8, cfg, seed)
    expected, norms = _hand_step(spec, g, data, idx, lr=lr, clip=clip, denom=5)
    assert max(norms) <= clip and sum(n < clip * 0.999 for n in norms) < len(norms)  # some are clipped
    res = train_local(model, spec, g, data, _ins(cfg, seed))
    torch.testing.assert_close(res.update.delta, expected, rtol=0, atol=1e-14)


def test_one_sample_steps_move_at_most_lr_times_c() -> None:
    model, spec, g = _linear()
    data = _regression(1, seed=2)
    data = Split(data.x * 100, data.y)  # a huge gradient
    clip, lr = 0.25, 0.1
    res = train_local(model, spec, g, data, _ins(TrainConfig(loss="mse", batch_size=1, lr=lr, max_steps=1, dp_clip_norm=clip)))
    # q = 1, the one sample is the batch: the step is lr times its clipped gradient.
    assert float(res.update.delta.norm()) <= lr * clip
    assert float(res.update.delta.norm()) == pytest.approx(lr * clip, rel=1e-5)


def test_noise_is_seeded_and_added_and_empty_batches_still_step() -> None:
    model, spec, g = _linear()
    data = _regression(5)
    cfg = TrainConfig(loss="mse", epochs=2, batch_size=1, lr=0.05, dp_clip_norm=1.0, dp_noise_multiplier=1.0)
    seed = next(s for s in range(100) if any(len(b) == 0 for b in poisson_batches(5, cfg, s)))
    batches = poisson_batches(5, cfg, seed)
    a = train_local(model, spec, g, data, _ins(cfg, seed)).update
    b = train_local(model, spec, g, data, _ins(cfg, seed)).update
    quiet = TrainConfig(loss="mse", epochs=2, batch_size=1, lr=0.05, dp_clip_norm=1.0)
    c = train_local(model, spec, g, data, _ins(quiet, seed)).update
    other = train_local(model, spec, g, data, _ins(cfg, seed + 1000)).update
    assert torch.equal(a.delta, b.delta) and not torch.allclose(a.delta, c.delta)
    assert not torch.allclose(a.delta, other.delta)
    assert bool(torch.isfinite(a.delta).all()) and a.num_steps == len(batches) == 10


def test_an_empty_batch_steps_by_the_seeded_noise_alone() -> None:
    model, spec, g = _linear()
    data = _regression(5)
    lr, clip, sigma = 0.05, 0.5, 2.0
    cfg = TrainConfig(loss="mse", batch_size=2, lr=lr, max_steps=1, dp_clip_norm=clip, dp_noise_multiplier=sigma)
    seed = next(s for s in range(200) if len(poisson_batches(5, cfg, s)[0]) == 0)
    res = train_local(model, spec, g, data, _ins(cfg, seed)).update
    # Zero clipped sum, plus N(0, (σC)²) drawn per parameter in model order, over q·n = 2.
    gen = noise_generator(seed)
    noise = [torch.normal(0.0, sigma * clip, size=p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
    torch.testing.assert_close(res.delta, -lr * torch.cat([z.reshape(-1) for z in noise]) / 2, rtol=0, atol=1e-15)
    assert res.num_steps == 1 and res.metrics["train_loss"] == 0.0
    quiet = TrainConfig(loss="mse", batch_size=2, lr=lr, max_steps=1, dp_clip_norm=clip)
    assert torch.equal(train_local(model, spec, g, data, _ins(quiet, seed)).update.delta, torch.zeros_like(g))


# ------------------------------------------------------------------ Opacus
def test_the_sequential_path_runs_opacus_and_leaves_no_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    import opacus
    from opacus.optimizers import DPOptimizer

    wrapped: list[nn.Module] = []
    pre_steps: list[int] = []

    class Spy(opacus.GradSampleModule):  # type: ignore[misc]
        def __init__(self, m: nn.Module, **kw: object) -> None:
            super().__init__(m, **kw)
            wrapped.append(m)

    real_pre_step = DPOptimizer.pre_step
    monkeypatch.setattr(opacus, "GradSampleModule", Spy)
    monkeypatch.setattr(DPOptimizer, "pre_step", lambda self, *a: pre_steps.append(1) or real_pre_step(self, *a))

    torch.manual_seed(0)
    model = MLP(3, (8,), 1, dropout=0.2)
    spec = ParamSpec.from_module(model)
    g = spec.module_vector(model)
    data = Split(torch.randn(12, 3), torch.randn(12))
    plain = TrainConfig(loss="mse", epochs=2, batch_size=4, lr=0.1)
    before = train_local(model, spec, g, data, _ins(plain)).update.delta
    dp = TrainConfig(loss="mse", epochs=2, batch_size=4, lr=0.1, dp_clip_norm=1.0, dp_noise_multiplier=0.5)
    res = train_local(model, spec, g, data, _ins(dp))
    assert wrapped == [model] and len(pre_steps) == res.update.num_steps == 6
    # Hooks and Opacus's attributes are gone: a later plain run is the same as before.
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad") for p in model.parameters())
    assert torch.equal(train_local(model, spec, g, data, _ins(plain)).update.delta, before)


def test_importing_training_does_not_import_opacus() -> None:
    script = "import sys, fedloom, fedloom.client.training, fedloom.engines; print('opacus' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_a_batchnorm_model_is_refused() -> None:
    model = MLP(3, (8,), 1, batchnorm=True)
    spec = ParamSpec.from_module(model)
    cfg = TrainConfig(loss="mse", batch_size=4, dp_clip_norm=1.0)
    with pytest.raises(ConfigError, match="BatchNorm") as err:
        train_local(model, spec, spec.module_vector(model), Split(torch.randn(8, 3), torch.randn(8)), _ins(cfg))
    assert err.value.key == "client.dp_clip_norm"


def test_per_sample_losses_average_to_the_task_loss_and_accept_an_empty_batch() -> None:
    from fedloom.client.losses import get_loss, per_sample_loss

    out, y = torch.randn(7, 1, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    for name in ("mse", "l1", "huber", "bce"):
        target = (y > 0).double() if name == "bce" else y
        torch.testing.assert_close(per_sample_loss(name, out, target).mean(), get_loss(name)(out, target))
    logits, labels = torch.randn(7, 4), torch.randint(0, 4, (7,))
    torch.testing.assert_close(per_sample_loss("cross_entropy", logits, labels).mean(), F.cross_entropy(logits, labels))
    for name in ("mse", "cross_entropy"):
        empty = torch.zeros(0, 4 if name == "cross_entropy" else 1, requires_grad=True)
        target = torch.zeros(0, dtype=torch.long if name == "cross_entropy" else torch.float32)
        per = per_sample_loss(name, empty, target)
        assert per.shape == (0,)
        per.sum().backward()
        assert empty.grad is not None and empty.grad.shape == empty.shape
