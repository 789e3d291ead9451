"""DP-SGD for a chunk of clients in lockstep: per-sample gradients, clipping and noise, batched.

The semantics are :mod:`fedloom.client.dpsgd`'s (what the sequential trainer gets from
Opacus); here they are computed for the k active clients of a chunk at once:

* :class:`PerSampleClipper` — per-sample gradients of the single-sample loss with
  ``torch.func``: ``vmap`` over clients of ``vmap`` over samples of ``grad`` of a
  ``functional_call``. Poisson batches have different sizes, so each client's batch is padded
  to the step's largest one; a padded sample gets clip factor 0, so its GRADIENT (not only
  its loss) contributes nothing. The per-sample norms over all trainable parameters, the clip
  factors ``min(1, C / (norm + 1e-6))`` and the clipped sums are one batched operation each
  over the ``(k, B)`` samples.
* :class:`ChunkPrivatizer` — one chunk's run: the clipped sums, each client's Gaussian noise
  from its own generator (drawn client by client, parameter by parameter in model order:
  exactly the numbers Opacus draws for that client in the sequential engine), and the
  division by each client's expected batch size ``q_i · n_i``.

Dropout draws independent masks per sample from the global RNG (as the vmap program does),
not the sequential engine's masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedloom.client.dpsgd import CLIP_EPS, check_dp_model, expected_batch_size, noise_generator, noise_std
from fedloom.client.losses import per_sample_loss
from fedloom.core.errors import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, TrainConfig

__all__ = ["ChunkPrivatizer", "PerSampleClipper"]

_GradFn = Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]


class PerSampleClipper:
    """Clipped sums of per-sample gradients for k clients with stacked parameters (``torch.func``).

    ``model`` is a scratch module of the architecture (its own weights are never used);
    models with buffers are refused with a :class:`~fedloom.core.errors.ConfigError`.
    """

    def __init__(self, model: nn.Module, spec: ParamSpec) -> None:
        check_dp_model(model)
        self.model = model.train()
        self._consts = [e for e in spec.entries if not e.trainable]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        """Trainable parameters in model order: the order noise is drawn in."""
        trainable = sorted(e.name for e in spec.entries if e.trainable)
        if sorted(self.names) != trainable:
            raise ConfigError(
                f"DP-SGD: the model's trainable parameters {sorted(self.names)[:6]} are not the spec's "
                f"trainable entries {trainable[:6]} (a parameter shared under two names?)",
                key="client.dp_clip_norm",
            )
        self._fns: dict[str, _GradFn] = {}

    def _fn(self, loss: str) -> _GradFn:
        fn = self._fns.get(loss)
        if fn is None:
            model = self.model

            def sample_loss(
                params: dict[str, torch.Tensor], consts: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
            ) -> torch.Tensor:
                out = functional_call(model, (params, consts), (x.unsqueeze(0),))
                return per_sample_loss(loss, out, y.unsqueeze(0)).sum()

            per_sample = vmap(grad_and_value(sample_loss), in_dims=(None, None, 0, 0), randomness="different")
            fn = self._fns[loss] = vmap(per_sample, in_dims=(0, None, 0, 0), randomness="different")
        return fn

    def clipped_sum(
        self,
        params: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        state: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
        loss: str,
        clip: float,
    ) -> torch.Tensor:
        """Write each client's sum of clipped per-sample gradients into ``grads``; return its loss sum (k,).

        ``params`` / ``grads`` map trainable names to ``(k, *shape)`` tensors; ``x`` (k, W,
        *input) and ``y`` hold ``counts[i] <= W`` real samples per client, then padding.
        """
        k, w = x.shape[0], x.shape[1]
        if w == 0:
            for g in grads.values():
                g.zero_()
            return torch.zeros(k, dtype=state.dtype, device=state.device)
        consts = {e.name: state[0, e.offset : e.stop].view(e.shape) for e in self._consts}
        per_grads, per_loss = self._fn(loss)(params, consts, x, y)
        real = (torch.arange(w, device=x.device) < counts.unsqueeze(1)).to(per_loss.dtype)  # (k, W)
        norms = torch.stack([per_grads[n].reshape(k, w, -1).norm(2, dim=-1) for n in self.names], dim=-1).norm(2, dim=-1)
        factor = (clip / (norms + CLIP_EPS)).clamp(max=1.0) * real
        for n in self.names:
            grads[n].copy_(torch.einsum("kw,kw...->k...", factor, per_grads[n]))
        return (per_loss * real).sum(1)


class ChunkPrivatizer:
    """A chunk's DP-SGD gradients, step by step: clipped sums, per-client noise, division by q_i · n_i.

    ``instructions`` and ``sizes`` (the clients' numbers of examples) are in row order: row r
    of every step is client r, and the active clients are the first rows.
    """

    def __init__(
        self,
        clipper: PerSampleClipper,
        cfg: TrainConfig,
        instructions: Sequence[ClientInstruction],
        sizes: Sequence[int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        assert cfg.dp_clip_norm is not None
        self.clipper = clipper
        self.clip = cfg.dp_clip_norm
        self.loss = cfg.loss
        self.std = noise_std(cfg)
        self.gens = [noise_generator(ins.seed, device, cfg.dp_noise) for ins in instructions] if self.std > 0 else []
        self.denom = torch.tensor([expected_batch_size(n, cfg) for n in sizes], dtype=dtype, device=device)

    def step(
        self,
        params: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        state: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        """The first ``k = len(x)`` clients' privatized gradients into ``grads``; their loss sums (k,)."""
        k = x.shape[0]
        losses = self.clipper.clipped_sum(params, grads, state, x, y, counts, self.loss, self.clip)
        if self.std > 0:
            for r in range(k):
                gen = self.gens[r]
                for n in self.clipper.names:
                    g = grads[n][r]
                    g.add_(torch.normal(0.0, self.std, size=g.shape, generator=gen, dtype=g.dtype, device=g.device))
        denom = self.denom[:k]
        for g in grads.values():
            g.div_(denom.view(k, *([1] * (g.dim() - 1))))
        return losses
