"""Sample-level DP-SGD (Abadi et al. 2016) in local training: the semantics both engines follow.

DP-SGD is on when ``TrainConfig.dp_clip_norm`` (C) is set; ``dp_noise_multiplier`` is σ.
For a client with ``n`` examples and batch size ``B = cfg.batch_size``:

* **Poisson sampling** (what a privacy accountant models; no shuffling): the sampling rate is
  ``q = min(1, B / n)``; an epoch has ``S = ceil(n / B)`` steps and a run
  ``epochs · S`` steps, truncated at ``max_steps`` (:func:`dpsgd_sampling`). At each step
  every example is included independently with probability q, drawn as
  ``torch.rand(n, generator=g) < q`` from one CPU generator seeded with
  ``derive_seed(seed, "dpsgd-batches")`` (:func:`poisson_batches`). A batch may be empty.
* **Per step**: the per-sample gradient ``g_j`` of the per-sample loss
  (:func:`~fedloom.client.losses.per_sample_loss`) w.r.t. all trainable parameters is
  scaled by ``min(1, C / (||g_j||_2 + 1e-6))``, the norm taken over ALL trainable
  parameters together (Opacus's ``DPOptimizer.clip_and_accumulate``); the clipped
  gradients are summed, Gaussian noise ``N(0, (σC)²)`` is added to every coordinate of the
  sum, and the result is divided by the EXPECTED batch size ``q · n`` — a fixed
  denominator, whatever the actual batch size (:func:`expected_batch_size`, exactly
  ``min(B, n)``). The instruction's gradient transforms (FedProx's proximal term,
  SCAFFOLD's correction: post-processing of the privatized gradient) and the configured
  optimizer step (SGD, momentum, Adam) follow as usual.
* **Noise draws**: one generator per client and round on the training device, seeded with
  ``derive_seed(seed, "dpsgd-noise")`` (:func:`noise_generator`); each step draws, for each
  trainable parameter in model parameter order,
  ``torch.normal(0.0, σC, size=p.shape, generator=gen, dtype=p.dtype)`` (what Opacus's
  ``_generate_noise`` does with ``secure_mode=False``). With σ = 0 nothing is drawn.
  The vectorized engine draws the same numbers per client, so both engines give the same
  updates, noise included.
* Models with buffers (BatchNorm) are refused (:func:`check_dp_model`): their samples are
  coupled, so per-sample gradients are undefined (Opacus refuses them too). Dropout is
  allowed.
* ``train_loss`` is the mean per-sample loss over the samples actually drawn.

The sequential trainer runs the clipping and noise with Opacus (:class:`OpacusDPSGD`:
``GradSampleModule`` for per-sample gradients of the summed per-sample loss, ``DPOptimizer``
with ``loss_reduction="mean"`` and ``expected_batch_size = q · n``). Opacus is imported
only when a DP-SGD run starts: ``import fedloom`` and plain simulations never load it.
The vectorized engine computes the same quantities with ``torch.func`` for a whole chunk
of clients (:mod:`fedloom.engines._dpsgd`).

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang. "Deep Learning with Differential
Privacy." CCS 2016.
"""

from __future__ import annotations

import math
import secrets
import warnings
from typing import Any

import torch
from torch import nn

from fedloom.client.losses import per_sample_loss
from fedloom.core.errors import ConfigError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import TrainConfig

__all__ = [
    "CLIP_EPS",
    "OpacusDPSGD",
    "check_dp_model",
    "dpsgd_sampling",
    "expected_batch_size",
    "noise_generator",
    "noise_std",
    "poisson_batches",
]

CLIP_EPS = 1e-6
"""Added to a per-sample norm before dividing by it (Opacus's constant)."""


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"DP-SGD needs a client with at least one example, got n = {n!r}", key="data")


def expected_batch_size(n: int, cfg: TrainConfig) -> int:
    """The fixed denominator ``q · n`` of a DP-SGD step: exactly ``min(B, n)``."""
    _check_n(n)
    return min(cfg.batch_size, n)


def dpsgd_sampling(n: int, cfg: TrainConfig) -> tuple[float, int]:
    """``(q, steps)`` of a client's DP-SGD run: the Poisson sampling rate and the number of steps.

    ``q = min(1, B / n)``; ``steps = epochs · ceil(n / B)``, at most ``max_steps``. This is
    what a privacy accountant needs for one client and round.
    """
    _check_n(n)
    q = min(1.0, cfg.batch_size / n)
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    return q, steps


def poisson_batches(n: int, cfg: TrainConfig, seed: int) -> list[torch.Tensor]:
    """The sorted index batches of a DP-SGD run: each example included with probability q per step.

    One ``torch.rand(n) < q`` per step (:func:`dpsgd_sampling` steps) from a CPU generator
    seeded with ``derive_seed(seed, "dpsgd-batches")``; batches may be empty.
    """
    q, steps = dpsgd_sampling(n, cfg)
    gen = torch.Generator().manual_seed(derive_seed(seed, "dpsgd-batches"))
    return [torch.nonzero(torch.rand(n, generator=gen) < q).flatten() for _ in range(steps)]


def noise_generator(seed: int, device: torch.device | str = "cpu", source: str = "seeded") -> torch.Generator:
    """A client's noise generator for one round, on ``device``.

    Seeded with ``derive_seed(seed, "dpsgd-noise")`` (``source="seeded"``), or with 63 bits of OS
    entropy (``"os"``: the server that chose ``seed`` cannot recompute the noise).
    """
    gen = torch.Generator(device=device)
    return gen.manual_seed(secrets.randbits(63) if source == "os" else derive_seed(seed, "dpsgd-noise"))


def noise_std(cfg: TrainConfig) -> float:
    """The std ``σ · C`` of the noise added to the sum of clipped gradients (0 without DP-SGD)."""
    return cfg.dp_noise_multiplier * cfg.dp_clip_norm if cfg.dp_clip_norm is not None else 0.0


def check_dp_model(model: nn.Module) -> None:
    """Raise :class:`ConfigError` unless ``model`` has per-sample gradients (no buffers)."""
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise ConfigError(
            f"DP-SGD needs per-sample gradients, which a model with buffers does not have "
            f"(BatchNorm couples the samples of a batch): {buffers[:4]}; use a model without "
            f"BatchNorm (GroupNorm / LayerNorm) or unset client.dp_clip_norm",
            key="client.dp_clip_norm",
        )


class OpacusDPSGD:
    """Opacus's per-sample clipping and noise around a model and its torch optimizer, for one local run.

    ``GradSampleModule`` (``loss_reduction="sum"``: the loss backpropagated is the SUM of
    the per-sample losses, so each ``grad_sample`` is exactly one sample's gradient) and
    ``DPOptimizer`` (``loss_reduction="mean"`` with ``expected_batch_size = q · n``: the
    noised sum is divided by the fixed expected batch size). :meth:`backward` leaves the
    privatized gradient in ``p.grad``; the caller then applies its gradient transforms and
    steps ``optimizer`` (the original one) itself. :meth:`close` removes Opacus's hooks and
    attributes from the model; use the object as a context manager.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        n: int,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if cfg.dp_clip_norm is None:
            raise ConfigError("DP-SGD is off (client.dp_clip_norm is unset)", key="client.dp_clip_norm")
        check_dp_model(model)
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.model = model
        self.loss = cfg.loss
        self.module: Any = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        try:
            self.dp_optimizer: Any = DPOptimizer(
                optimizer,
                noise_multiplier=cfg.dp_noise_multiplier,
                max_grad_norm=cfg.dp_clip_norm,
                expected_batch_size=expected_batch_size(n, cfg),
                loss_reduction="mean",
                generator=noise_generator(seed, device, cfg.dp_noise),
                secure_mode=False,
            )
        except BaseException:
            self.close()
            raise

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients of one batch, clipped, summed, noised and scaled into ``p.grad``.

        Returns the detached sum of the batch's per-sample losses (0 for an empty batch).
        """
        self.dp_optimizer.zero_grad(False)
        loss = per_sample_loss(self.loss, self.module(x), y).sum()
        with warnings.catch_warnings():
            # The first layer's input needs no gradient: torch warns that its full backward
            # hook fires on the output gradient only, which is all Opacus reads.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            loss.backward()
        self.dp_optimizer.pre_step()
        return loss.detach()

    def close(self) -> None:
        """Remove Opacus's hooks and every attribute it put on the model's parameters and layers."""
        self.module._close()
        for p in self.model.parameters():
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        for m in self.model.modules():
            for attr in ("activations", "max_batch_len"):
                if hasattr(m, attr):
                    delattr(m, attr)

    def __enter__(self) -> OpacusDPSGD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
