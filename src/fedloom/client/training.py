"""Local training: the reference semantics every engine must reproduce.

Given the global flat vector, a :class:`~fedloom.core.types.ClientInstruction` and the
client's data, :func:`train_local` runs ``epochs`` passes of minibatch training:

* each epoch visits every example exactly once, in an order drawn from a generator seeded
  with ``instruction.seed`` (the last batch may be smaller: no sample dropped or repeated);
* dropout and other randomness use the same seed (the global RNG is forked, not disturbed);
* the optimizer (SGD with momentum / Nesterov / weight decay, or Adam) is fresh each round;
* the instruction's gradient transforms (:mod:`fedloom.client.transforms`: FedProx's
  proximal term, SCAFFOLD's correction) edit each step's gradients; the vectorized engine
  applies the very same transform code to its stacked gradients;
* after training, each transform's ``finish`` adds its extras (SCAFFOLD's
  ``control_delta``) and updates the client state.

With ``cfg.dp_clip_norm`` set, local training is sample-level DP-SGD instead
(:mod:`fedloom.client.dpsgd`): Poisson-sampled batches, and each step's gradient is the
clipped, noised per-sample gradient sum that Opacus computes, before the transforms and the
optimizer step.

Training starts from the global vector, or where a transform says (personal layers: the
client's own values of them). The result is the delta ``local − global`` over the WHOLE state (buffers such as BatchNorm
statistics included), the number of examples and steps, and the mean training loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fedloom.client.dpsgd import OpacusDPSGD, poisson_batches
from fedloom.client.losses import get_loss
from fedloom.client.transforms import GradientTransform, build_transforms, start_vector
from fedloom.core.errors import ConfigError
from fedloom.core.keys import CLIENT_CONTROL, CONTROL_DELTA, SERVER_CONTROL
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ClientUpdate, TrainConfig
from fedloom.data.base import Split

__all__ = [
    "LocalResult",
    "active_transforms",
    "batch_order",
    "finish_local",
    "personal_instruction",
    "make_optimizer",
    "train_local",
]


@dataclass(frozen=True)
class LocalResult:
    """The update sent to the server and the client state kept for the next round."""

    update: ClientUpdate
    state: Mapping[str, torch.Tensor] = field(default_factory=dict)


def batch_order(n: int, cfg: TrainConfig, seed: int) -> list[torch.Tensor]:
    """The index batches of a whole local run (all epochs), as drawn by :func:`train_local`.

    One ``torch.randperm(n)`` per epoch from a CPU generator seeded with ``seed``; batches of
    ``cfg.batch_size`` with a smaller last batch; truncated at ``cfg.max_steps``.
    """
    gen = torch.Generator().manual_seed(seed % (2**63))
    batches: list[torch.Tensor] = []
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        batches.extend(perm[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size))
    if cfg.max_steps is not None:
        batches = batches[: cfg.max_steps]
    return batches


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The torch optimizer named by ``cfg`` (fresh state)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}", key="client.optimizer")


def _trainable_views(spec: ParamSpec, vec: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """Views of ``vec`` aligned with ``model``'s trainable parameters, in parameter order."""
    views = {e.name: vec[e.offset : e.stop].view(e.shape) for e in spec.entries if e.trainable}
    return [views[n] for n, p in model.named_parameters() if p.requires_grad]


def active_transforms(instruction: ClientInstruction) -> list[GradientTransform]:
    """The gradient transforms an instruction asks for."""
    return build_transforms(instruction.transforms)


def train_local(
    model: nn.Module,
    spec: ParamSpec,
    global_vec: torch.Tensor,
    data: Split,
    instruction: ClientInstruction,
    *,
    client_state: Mapping[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Train ``model`` (a scratch module of the right architecture) from ``global_vec`` on ``data``.

    The module is overwritten with the global state first; on return it holds the local state.
    """
    cfg = instruction.train
    n = len(data)
    if n == 0:
        raise ConfigError(f"client {instruction.client_id!r} has no training data", key="data")
    device = global_vec.device
    state = client_state or {}
    transforms = active_transforms(instruction)
    spec.load_into(model, start_vector(transforms, spec, global_vec, instruction, state))  # personal layers: the client's own
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    loss_fn = get_loss(cfg.loss)

    prepared = [t.prepare(spec, global_vec, instruction, state) for t in transforms]
    laid = [{k: _trainable_views(spec, v[k], model) for k in t.laid_out} for t, v in zip(transforms, prepared, strict=True)]

    dp = OpacusDPSGD(model, opt, cfg, n, instruction.seed, device) if cfg.dpsgd else None
    batches = batch_order(n, cfg, instruction.seed) if dp is None else poisson_batches(n, cfg, instruction.seed)
    x, y = data.x.to(device), data.y.to(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(instruction.seed % (2**63))
            for idx in batches:
                idx = idx.to(device)
                opt.zero_grad(set_to_none=False)
                if dp is None:
                    loss = loss_fn(model(x[idx]), y[idx])
                    loss.backward()
                    loss_sum += loss.detach().to(torch.float64) * len(idx)
                else:  # p.grad: the clipped, noised per-sample gradient sum over q·n
                    loss_sum += dp.backward(x[idx], y[idx]).to(torch.float64)
                if transforms:
                    grads = [p.grad for p in params]
                    for t, vecs in zip(transforms, laid, strict=True):
                        t.apply(params, grads, vecs)  # type: ignore[arg-type]
                opt.step()
                if transforms:
                    with torch.no_grad():
                        for t, vecs in zip(transforms, laid, strict=True):
                            t.after_step(params, vecs)
                seen += len(idx)
    finally:
        if dp is not None:
            dp.close()

    local_vec = spec.module_vector(model).to(global_vec.dtype)
    return finish_local(
        spec,
        instruction,
        local_vec - global_vec,
        num_examples=n,
        num_steps=len(batches),
        loss_sum=float(loss_sum),
        seen=seen,
        client_state=client_state,
        transforms=list(zip(transforms, prepared, strict=True)),
    )


def personal_instruction(instruction: ClientInstruction) -> ClientInstruction | None:
    """The personal local run an instruction asks for after the usual one (Ditto), or None.

    Same data order and hyperparameters, the ``personal`` transforms, no client stages: its
    update is never sent, only the client state it leaves is kept. Every engine runs it.
    """
    if not instruction.personal:
        return None
    return replace(instruction, transforms=instruction.personal, personal=(), stages=(), protocol=None)


def finish_local(
    spec: ParamSpec,
    instruction: ClientInstruction,
    delta: torch.Tensor,
    *,
    num_examples: int,
    num_steps: int,
    loss_sum: float,
    seen: int,
    client_state: Mapping[str, torch.Tensor] | None,
    transforms: Sequence[tuple[GradientTransform, Mapping[str, torch.Tensor]]] = (),
) -> LocalResult:
    """The :class:`LocalResult` of a finished local run whose state moved by ``delta``.

    ``loss_sum`` is the float64 sum of the steps' mean losses times their batch sizes and
    ``seen`` the number of samples of all steps. ``transforms`` pairs each gradient transform
    with the vectors it prepared for this client; their :meth:`~GradientTransform.finish`
    gives the update's extras (SCAFFOLD's ``control_delta``) and the new client state.
    Every engine builds its results here.
    """
    extras: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = dict(client_state or {})
    for t, vecs in transforms:
        extras.update(t.finish(spec, instruction, delta, num_steps, vecs, state))
    update = ClientUpdate(
        client_id=instruction.client_id,
        round=instruction.round,
        delta=delta,
        num_examples=num_examples,
        num_steps=num_steps,
        metrics={"train_loss": loss_sum / max(seen, 1)},
        extras=extras,
        model_version=instruction.model_version,
    )
    return LocalResult(update=update, state=state)
