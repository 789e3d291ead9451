"""The vectorized engine: a cohort's clients trained in lockstep as ONE batched computation.

Design. The clients of a chunk of the cohort keep their trainable parameters as the rows of
one ``(k, P)`` matrix ``theta`` and their full states (buffers such as BatchNorm statistics)
as the rows of a ``(k, numel)`` matrix. At step t every client that still has a batch
takes one optimizer step: a lockstep program (:mod:`fedloom.engines._lockstep`) computes
all their losses and gradients at once — stacked-weight ``baddbmm`` / grouped convolutions
for models made of supported layers, ``torch.func.vmap`` for other buffer-free models — and
the optimizer, FedProx's proximal gradient and SCAFFOLD's correction are single fused
operations on the ``(k, P)`` matrices. Cohorts are cut into chunks whose working set fits a
memory budget (the CPU cache by default), so weights stay cache-resident.

Exactness (the same updates as :func:`fedloom.client.training.train_local`, up to float
rounding). Each client's index batches are ``batch_order(n, cfg, seed)``, exactly the
sequential ones. Clients are sorted by their number of steps, so the clients still active
at step t are a prefix of the rows: finished clients stop stepping and cost nothing. A
client's last, smaller batch is padded to B with samples of zero loss weight, and its loss
is the mean over its own samples; BatchNorm layers use masked per-client statistics, so
padding never enters a statistic. Clients share no parameter, so one backward pass of the
sum of the clients' losses gives every client its own gradient. All active clients have
taken the same number of steps, so SGD's first-step momentum and Adam's bias correction
are the same scalars for all of them; the update rules are torch.optim's, operation by
operation. Updates, SCAFFOLD extras and client states are built by
:func:`fedloom.client.training.finish_local`, as in the sequential engine.

Dropout masks are independent per client but drawn from a per-chunk generator, so they
differ from the sequential engine's (the run is still reproducible for a given config).
A model neither program handles (e.g. data-dependent Python control flow) falls back to
the sequential engine with one logged warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from fedloom.client.training import LocalResult, batch_order, finish_local, scaffold_controls
from fedloom.core.errors import ConfigError, EngineError
from fedloom.core.params import ParamSpec
from fedloom.core.seeding import derive_seed
from fedloom.core.types import ClientInstruction, ClientUpdate, TrainConfig
from fedloom.data.base import FederatedDataset, Split
from fedloom.engines._lockstep import LockstepProgram, LoweredProgram, UnsupportedModel, VmapProgram, slots_of
from fedloom.engines.base import Engine, ModelFn
from fedloom.engines.sequential import SequentialEngine

__all__ = ["DEFAULT_CPU_BUDGET", "DEFAULT_GPU_BUDGET", "VectorizedEngine", "lockstep_program"]

log = logging.getLogger("fedloom.engines.vectorized")

DEFAULT_CPU_BUDGET = 24 * 2**20
"""Default working-set budget of a chunk on CPU (bytes): about a last-level cache."""
DEFAULT_GPU_BUDGET = 2 * 2**30
"""Default working-set budget of a chunk on an accelerator (bytes)."""


def lockstep_program(
    model_fn: ModelFn, spec: ParamSpec, dataset: FederatedDataset, device: str | torch.device = "cpu"
) -> tuple[LockstepProgram | None, str]:
    """The lockstep program for ``model_fn``'s model, or ``(None, reason)`` where none applies.

    Tries the lowered program, then the ``torch.func`` one; each must also run one probe
    step on two examples of the first client.
    """
    device = torch.device(device)
    float_dtypes = {e.dtype for e in spec.entries if e.is_float}
    if float_dtypes - {spec.vector_dtype}:
        return None, f"float entries of dtypes {sorted(float_dtypes)} differ from the vector dtype {spec.vector_dtype}"
    first = next(iter(dataset.clients.values())).train
    probe = Split(first.x[:2], first.y[:2])
    reasons: list[str] = []
    for cls in (LoweredProgram, VmapProgram):
        try:
            program = cls(model_fn().to(device), spec)
            _probe(program, spec, probe, dataset.task.loss, device)
        except (UnsupportedModel, RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            reasons.append(f"{cls.kind}: {exc}")
            continue
        return program, ""
    return None, "; ".join(reasons)


def _probe(program: LockstepProgram, spec: ParamSpec, data: Split, loss: str, device: torch.device) -> None:
    k, n = 2, len(data)
    theta = torch.zeros(k, sum(s.numel for s in slots_of(spec).values()), dtype=spec.dtype, device=device)
    state = torch.zeros(k, spec.numel, dtype=spec.dtype, device=device)
    x = data.x.to(device).unsqueeze(0).expand(k, *data.x.shape)
    y = data.y.to(device).unsqueeze(0).expand(k, *data.y.shape)
    counts = torch.full((k,), float(n), dtype=spec.dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        program.step(theta, state, x, y, counts, [n] * k, loss, gen, torch.empty_like(theta))


class VectorizedEngine(Engine):
    """Trains a cohort in lockstep chunks (see the module docstring); same updates as ``sequential``.

    ``chunk_size`` fixes the number of clients trained together; by default it is the most
    whose working set (parameters, gradients, optimizer state, activations, data) fits
    ``memory_budget_bytes`` (default :data:`DEFAULT_CPU_BUDGET` on CPU,
    :data:`DEFAULT_GPU_BUDGET` on an accelerator).
    """

    name = "vectorized"

    def __init__(
        self,
        *,
        model_fn: ModelFn,
        dataset: FederatedDataset,
        spec: ParamSpec,
        device: str = "cpu",
        chunk_size: int | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        super().__init__(spec=spec)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError(f"must be an integer >= 1 or unset, got {chunk_size!r}", key="run.chunk_size")
        if memory_budget_bytes is not None and memory_budget_bytes < 1:
            raise ConfigError(f"must be > 0 or unset, got {memory_budget_bytes!r}", key="run.memory_budget_bytes")
        self.dataset = dataset
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        default = DEFAULT_CPU_BUDGET if self.device.type == "cpu" else DEFAULT_GPU_BUDGET
        self.memory_budget_bytes = memory_budget_bytes or default
        self._sequential = SequentialEngine(model_fn=model_fn, dataset=dataset, spec=spec, device=device)
        self._sequential.client_states = self.client_states
        self.program, reason = lockstep_program(model_fn, spec, dataset, self.device)
        self.fallback_reason: str | None = None if self.program is not None else reason
        if self.program is None:
            log.warning("the model cannot be vectorized; training clients sequentially: %s", reason)
        self._slots = slots_of(spec)
        self._cols = spec.trainable_slices()
        self._act_numel = 0
        if isinstance(self.program, LoweredProgram):
            sample_shape = tuple(next(iter(dataset.clients.values())).train.x.shape[1:])
            self._act_numel = self.program.activation_numel(sample_shape, spec, spec.dtype)

    @property
    def mode(self) -> str:
        """``lowered``, ``vmap`` or ``sequential`` (the fallback)."""
        return self.program.kind if self.program is not None else "sequential"

    def available_clients(self) -> list[str]:
        return self.dataset.client_ids

    def _split(self, cid: str) -> Split:
        try:
            return self.dataset.clients[cid].train
        except KeyError:
            raise EngineError(f"unknown client {cid!r}") from None

    def chunk_size_for(self, cfg: TrainConfig, max_examples: int) -> int:
        """Clients per chunk for ``cfg``: ``chunk_size`` if set, else what fits the memory budget."""
        if self.chunk_size is not None:
            return self.chunk_size
        p = sum(s.numel for s in self._slots.values())
        opt_states = 2 if cfg.optimizer == "adam" else int(cfg.momentum > 0.0)
        matrices = 2 + opt_states + int(cfg.scaffold)  # theta, grad, optimizer state, SCAFFOLD correction
        sample = self._split(self.dataset.client_ids[0]).x[0].numel()
        per_client = (
            self.spec.numel + p * matrices + 3 * self._act_numel * cfg.batch_size + sample * (max_examples + cfg.batch_size)
        ) * self.spec.dtype.itemsize
        return max(1, self.memory_budget_bytes // per_client)

    # ----------------------------------------------------------------- training
    def run_cohort(self, global_vec: torch.Tensor, instructions: Sequence[ClientInstruction]) -> Iterator[ClientUpdate]:
        if self.program is None:
            yield from self._sequential.run_cohort(global_vec, instructions)
            return
        g = global_vec.to(self.device)
        by_config: dict[TrainConfig, list[ClientInstruction]] = {}
        for ins in instructions:
            by_config.setdefault(ins.train, []).append(ins)
        for cfg, group in by_config.items():
            size = self.chunk_size_for(cfg, max(len(self._split(i.client_id)) for i in group))
            for start in range(0, len(group), size):
                for ins, result in self._train_chunk(g, cfg, group[start : start + size]):
                    self.client_states.put(ins.client_id, result.state)
                    yield result.update

    def _train_chunk(
        self, g: torch.Tensor, cfg: TrainConfig, chunk: list[ClientInstruction]
    ) -> list[tuple[ClientInstruction, LocalResult]]:
        assert self.program is not None
        device, dtype, spec = self.device, g.dtype, self.spec
        splits = [self._split(ins.client_id) for ins in chunk]
        for ins, split in zip(chunk, splits, strict=True):
            if len(split) == 0:
                raise ConfigError(f"client {ins.client_id!r} has no training data", key="data")
        orders = [batch_order(len(s), cfg, ins.seed) for ins, s in zip(chunk, splits, strict=True)]
        # Rows sorted by number of steps (longest first): the active clients are a prefix.
        rows = sorted(range(len(chunk)), key=lambda i: -len(orders[i]))
        k, b = len(chunk), cfg.batch_size
        steps = [len(orders[i]) for i in rows]
        horizon = steps[0]
        active = [sum(1 for s in steps if s > t) for t in range(horizon)]

        offsets = [0]
        for i in rows:
            offsets.append(offsets[-1] + len(splits[i]))
        xs = torch.cat([splits[i].x for i in rows]).to(device)
        ys = torch.cat([splits[i].y for i in rows]).to(device)
        index = torch.zeros(horizon, k, b, dtype=torch.long)
        counts = torch.zeros(horizon, k, dtype=torch.long)
        for r, i in enumerate(rows):
            for t, batch in enumerate(orders[i]):
                index[t, r, : len(batch)] = batch + offsets[r]
                index[t, r, len(batch) :] = offsets[r] + batch[0]
                counts[t, r] = len(batch)
        count_lists = counts.tolist()
        index, counts_f = index.to(device), counts.to(device=device, dtype=dtype)

        theta_g = torch.cat([g[c] for c in self._cols]) if self._cols else g.new_zeros(0)
        theta = theta_g.unsqueeze(0).repeat(k, 1)
        state = g.unsqueeze(0).repeat(k, 1)
        grad = torch.empty_like(theta)
        controls: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * k
        correction: torch.Tensor | None = None
        if cfg.scaffold:
            for r, i in enumerate(rows):
                controls[r] = scaffold_controls(spec, g, chunk[i], self.client_states.get(chunk[i].client_id))
            diffs = [c_server - c_local for c_server, c_local in controls]  # type: ignore[misc]
            correction = torch.stack([torch.cat([d[c] for c in self._cols]) for d in diffs])
        optimizer = _StackedOptimizer(cfg, theta)
        loss_sum = torch.zeros(k, dtype=torch.float64, device=device)

        seed = derive_seed("vectorized", *(ins.seed for ins in chunk))
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for t in range(horizon):
                ka = active[t]
                ix = index[t, :ka]
                th, gr, cnt = theta[:ka], grad[:ka], counts_f[t, :ka]
                losses = self.program.step(th, state[:ka], xs[ix], ys[ix], cnt, count_lists[t][:ka], cfg.loss, gen, gr)
                if cfg.proximal_mu > 0.0:
                    gr.add_(th - theta_g, alpha=cfg.proximal_mu)
                if correction is not None:
                    gr.add_(correction[:ka])
                optimizer.step(th, gr)
                loss_sum[:ka] += losses.to(torch.float64) * counts[t, :ka].to(device)

        col = 0
        for c in self._cols:
            state[:, c] = theta[:, col : col + c.stop - c.start]
            col += c.stop - c.start
        loss_sums = loss_sum.tolist()
        seen = counts.sum(0).tolist()
        results: list[tuple[ClientInstruction, LocalResult]] = [None] * k  # type: ignore[list-item]
        for r, i in enumerate(rows):
            ins = chunk[i]
            result = finish_local(
                spec,
                ins,
                state[r] - g,
                num_examples=len(splits[i]),
                num_steps=steps[r],
                loss_sum=loss_sums[r],
                seen=int(seen[r]),
                client_state=self.client_states.get(ins.client_id),
                controls=controls[r],
            )
            results[i] = (ins, result)
        return results

    def evaluate_clients(
        self, global_vec: torch.Tensor, client_ids: Sequence[str]
    ) -> Iterator[tuple[str, int, dict[str, float]]]:
        return self._sequential.evaluate_clients(global_vec, client_ids)


class _StackedOptimizer:
    """torch.optim.SGD / Adam's update rules (single-tensor path) on the rows of a (k, P) matrix.

    Every row stepped at step t has taken exactly t steps before, so SGD's first-step
    momentum buffer and Adam's bias corrections are scalars shared by all rows.
    """

    def __init__(self, cfg: TrainConfig, theta: torch.Tensor) -> None:
        self.cfg = cfg
        self.t = 0
        self.buf: torch.Tensor | None = None
        self.exp_avg: torch.Tensor | None = None
        self.exp_avg_sq: torch.Tensor | None = None
        if cfg.optimizer == "adam":
            self.exp_avg = torch.zeros_like(theta)
            self.exp_avg_sq = torch.zeros_like(theta)
        elif cfg.optimizer == "sgd":
            if cfg.momentum > 0.0:
                self.buf = torch.empty_like(theta)
        else:
            raise ConfigError(f"unknown optimizer {cfg.optimizer!r}", key="client.optimizer")

    def step(self, theta: torch.Tensor, grad: torch.Tensor) -> None:
        """Update the first ``len(theta)`` rows in place with their gradients ``grad``."""
        cfg, ka = self.cfg, theta.shape[0]
        self.t += 1
        if cfg.weight_decay != 0.0:
            grad = grad.add(theta, alpha=cfg.weight_decay)
        if self.exp_avg is not None and self.exp_avg_sq is not None:
            beta1, beta2 = cfg.betas
            exp_avg, exp_avg_sq = self.exp_avg[:ka], self.exp_avg_sq[:ka]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = float(self.t)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = cfg.lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(cfg.eps)
            theta.addcdiv_(exp_avg, denom, value=-step_size)
            return
        if self.buf is not None:
            buf = self.buf[:ka]
            if self.t == 1:
                buf.copy_(grad)
            else:
                buf.mul_(cfg.momentum).add_(grad)
            grad = grad.add(buf, alpha=cfg.momentum) if cfg.nesterov else buf
        theta.add_(grad, alpha=-cfg.lr)
