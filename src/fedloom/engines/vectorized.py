"""The vectorized engine: a cohort's clients trained in lockstep as ONE batched computation.

Design. The clients of a chunk of the cohort keep their trainable parameters stacked in one
buffer, entry by entry (a ``(k, *shape)`` block per entry, see
:class:`~fedloom.engines._lockstep.SlotStack`), and their full states (buffers such as
BatchNorm statistics) as the rows of a ``(k, numel)`` matrix. At step t every client that
still has a batch takes one optimizer step: a lockstep program (:mod:`fedloom.engines._lockstep`) computes
all their losses and gradients at once — stacked-weight ``baddbmm`` / grouped convolutions
for models made of supported layers, ``torch.func.vmap`` for other buffer-free models — and
the optimizer is a few fused operations on the stacked buffers, and the gradient transforms
(FedProx's proximal term, SCAFFOLD's correction) are the very objects the sequential trainer
applies, run on the stacked gradients. After training, the update pipeline's client stages
run on the chunk's (clients x parameters) delta matrix in one operation each. Plain SGD (FedAvg's local solver) is fused further: each
Linear layer applies ``W -= lr * dW`` inside its weight-gradient product, so gradients never
go through memory. Cohorts are cut into chunks whose working set fits a memory budget (the
CPU cache by default), so weights stay cache-resident.

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
operation (the fused SGD step rounds once instead of twice: a last-bit difference).
Updates, SCAFFOLD extras and client states are built by
:func:`fedloom.client.training.finish_local`, as in the sequential engine.

Dropout masks are independent per client but drawn from a per-chunk generator (seeded by the
chunk's client ids and seeds), so they
differ from the sequential engine's (the run is still reproducible for a given config).

DP-SGD (``cfg.dp_clip_norm`` set; semantics in :mod:`fedloom.client.dpsgd`) replaces the
program's mean-loss gradient by the clipped, noised per-sample gradient sum of
:mod:`fedloom.engines._dpsgd`, over each client's Poisson batches (padded to the step's
largest batch; a batch may be empty), with each client's own noise generator: the noise is
the sequential engine's, number for number. Clients are still sorted by their (fixed)
number of steps, so the active clients stay a prefix.

A model neither program handles (e.g. data-dependent Python control flow) falls back to
the sequential engine with one logged warning.

Devices (:mod:`fedloom.engines._device`). The engine runs on ``device`` (``run.device``):
every client's training samples are moved there once, as one concatenated tensor that
chunks index; the step loop reads no device value back (no host synchronization per step);
on CUDA, chunks are sized from the free device memory. ``precision`` (``run.precision``):
``fp32`` (IEEE float32; the default), ``tf32`` (TF32 tensor-core products on CUDA) or
``bf16`` (the lockstep forward pass under bfloat16 autocast, float32 master weights,
gradients and updates). ``cuda_graphs`` (``run.cuda_graphs``) replays the lockstep step of
full chunks from a CUDA graph; the captured function is the one the eager loop runs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedloom.client.dpsgd import poisson_batches
from fedloom.client.training import LocalResult, active_transforms, batch_order, finish_local, personal_instruction
from fedloom.client.transforms import GradientTransform, start_vector
from fedloom.core.errors import ConfigError, EngineError
from fedloom.core.params import ParamSpec
from fedloom.core.seeding import derive_seed
from fedloom.core.types import ClientInstruction, ClientUpdate, Partial, Payload, PersonalEval, TrainConfig
from fedloom.data.base import FederatedDataset, Split
from fedloom.engines._device import (
    CudaGraphBackend,
    FreeBytesFn,
    GraphBackend,
    GraphedStep,
    ResidentData,
    autocast_scope,
    check_precision,
    chunk_size_from_free,
    cuda_free_bytes,
    precision_scope,
)
from fedloom.engines._dpsgd import ChunkPrivatizer, PerSampleClipper
from fedloom.engines._parallel import ChunkPool, default_threads
from fedloom.engines._partials import ShardSum, sum_checked
from fedloom.engines._lockstep import (
    LockstepProgram,
    LoweredProgram,
    SlotStack,
    VmapProgram,
    slots_of,
)
from fedloom.engines.base import Engine, ModelFn
from fedloom.engines.sequential import SequentialEngine
from fedloom.pipeline import Pipeline, StageContext
from fedloom.strategies.base import Aggregator

__all__ = [
    "DEFAULT_CPU_BUDGET",
    "DEFAULT_GPU_BUDGET",
    "PARALLEL_MIN_MACS",
    "LocalEngineName",
    "VectorizedEngine",
    "even_chunks",
    "local_engine",
    "lockstep_program",
]

log = logging.getLogger("fedloom.engines.vectorized")

DEFAULT_CPU_BUDGET = 64 * 2**20
"""Default working-set budget of a chunk on CPU (bytes). Measured on a 2-core Xeon (4 MiB L2 per
core), 2 chunk threads, cohort 100, E=1, B=10: the 2NN at 9 / 13 / 19 / 25 / 34 / 50 clients per
chunk ran 50k / 58k / 67k / 67k / 53k / 27k samples/s (this budget gives 25); the CNN at 1 / 2 / 4
clients 1.8k / 2.1k / 2.0k (it gives 2; bf16: 2.4k / 3.1k at 1 / 2). Smaller chunks pay per-operation overhead,
larger ones run out of cache."""
DEFAULT_GPU_BUDGET = 2 * 2**30
"""Default working-set budget of a chunk on an accelerator (bytes)."""
PARALLEL_MIN_MACS = 24_000_000
"""Forward multiply-accumulates a chunk's lockstep step must reach for another chunk thread to
pay (see :meth:`VectorizedEngine._least_chunks`). Measured on a 2-core Xeon, one step = B = 10
samples: the 2NN at 5 clients per chunk (9.9M) ran slower on 2 threads than one chunk of 10 on
one (34-35k vs 39-40k samples/s); at 13 (26M) and 25 (50M) 2 threads won (55-58k, 72-75k vs
46k for one thread); the CNN at 2 clients (245M) 1.9k vs 1.1k."""


def lockstep_program(
    model_fn: ModelFn, spec: ParamSpec, dataset: FederatedDataset, device: str | torch.device = "cpu"
) -> tuple[LockstepProgram | None, str]:
    """The lockstep program for ``model_fn``'s model, or ``(None, reason)`` where none applies.

    Tries the lowered program, then the ``torch.func`` one; each must also run one probe
    step on two examples of the dataset.
    """
    device = torch.device(device)
    float_dtypes = {e.dtype for e in spec.entries if e.is_float}
    if float_dtypes - {spec.vector_dtype}:
        return None, f"float entries of dtypes {sorted(float_dtypes)} differ from the vector dtype {spec.vector_dtype}"
    firsts = [c.train for c in list(dataset.clients.values())[:2]]
    probe = Split(torch.cat([s.x[:2] for s in firsts])[:2], torch.cat([s.y[:2] for s in firsts])[:2])
    reasons: list[str] = []
    for cls in (LoweredProgram, VmapProgram):
        try:
            program = cls(model_fn().to(device), spec)
            _probe(program, spec, probe, dataset.task.loss, device)
        except Exception as exc:  # noqa: BLE001 - whatever fails the probe falls back, with its reason logged
            reasons.append(f"{cls.kind}: {exc}")
            continue
        return program, ""
    return None, "; ".join(reasons)


def _probe(program: LockstepProgram, spec: ParamSpec, data: Split, loss: str, device: torch.device) -> None:
    k, n = 2, len(data)
    stack = SlotStack(slots_of(spec), k)
    theta = torch.zeros(stack.numel, dtype=spec.dtype, device=device)
    grad = torch.empty_like(theta)
    state = torch.zeros(k, spec.numel, dtype=spec.dtype, device=device)
    x = data.x.to(device).unsqueeze(0).expand(k, *data.x.shape)
    y = data.y.to(device).unsqueeze(0).expand(k, *data.y.shape)
    counts = torch.full((k,), float(n), dtype=spec.dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        program.step(stack.views(theta, k), stack.views(grad, k), state, x, y, counts, [n] * k, loss, gen)


LocalEngineName = Literal["auto", "vectorized", "sequential"]


def local_engine(
    name: LocalEngineName,
    *,
    model_fn: ModelFn,
    dataset: FederatedDataset,
    spec: ParamSpec,
    device: str = "cpu",
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    precision: str = "fp32",
    cuda_graphs: bool = False,
    threads: int | None = None,
) -> Engine:
    """The in-process engine ``name``; the one place ``auto`` is decided.

    ``auto`` probes the lockstep program once: the vectorized engine (given that program)
    where the model can be trained in lockstep, else the sequential engine, with the reason
    logged. The CLI, ``build_run`` and every Ray worker choose here. ``precision`` and
    ``cuda_graphs`` are the vectorized engine's (the sequential engine trains in float32).
    """
    check_precision(precision)
    if name == "sequential":
        return SequentialEngine(model_fn=model_fn, dataset=dataset, spec=spec, device=device)
    if name not in ("auto", "vectorized"):
        raise ConfigError(f"unknown in-process engine {name!r}; known: auto, vectorized, sequential", key="run.engine")
    program = None
    if name == "auto":
        program, reason = lockstep_program(model_fn, spec, dataset, device)
        if program is None:
            log.warning("the model cannot be vectorized; training clients sequentially: %s", reason)
            return SequentialEngine(model_fn=model_fn, dataset=dataset, spec=spec, device=device)
    return VectorizedEngine(
        model_fn=model_fn,
        dataset=dataset,
        spec=spec,
        device=device,
        chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        program=program,
        precision=precision,
        cuda_graphs=cuda_graphs,
        threads=threads,
    )


class VectorizedEngine(Engine):
    """Trains a cohort in lockstep chunks (see the module docstring); same updates as ``sequential``.

    ``chunk_size`` fixes the number of clients trained together; by default it is the most
    whose working set (see :meth:`chunk_size_for`) fits ``memory_budget_bytes`` (default
    :data:`DEFAULT_CPU_BUDGET` on CPU, :data:`DEFAULT_GPU_BUDGET` on an accelerator).
    Clients with different training configs train in different chunks; updates are yielded
    chunk by chunk. :attr:`mode` says which lockstep program runs (``sequential``: the
    fallback, with the reason in :attr:`fallback_reason`); federated evaluation is the
    sequential engine's.

    On CUDA, with neither ``chunk_size`` nor ``memory_budget_bytes`` set, the budget is half
    the free device memory (``free_bytes(device)``, by default
    :func:`~fedloom.engines._device.cuda_free_bytes`; passing ``free_bytes`` applies this rule
    on any device). The training samples of every client live on the device once
    (:class:`~fedloom.engines._device.ResidentData`, built here); chunks index them.
    ``precision`` (``fp32``, ``tf32``, ``bf16``; see :mod:`fedloom.engines._device`) sets the
    lockstep steps' arithmetic; DP-SGD chunks always train in float32. ``cuda_graphs``
    captures the lockstep step of full chunks (every client active, every batch full) in a
    CUDA graph and replays it, on CUDA only (``graph_backend`` substitutes the capture
    backend, e.g. :class:`~fedloom.engines._device.EagerGraphBackend` to run that path on
    CPU); programs that are not graph-safe (dropout, the vmap program) run eagerly.

    ``threads`` chunks train at once, each on its own worker thread with single-threaded
    kernels (:class:`~fedloom.engines._parallel.ChunkPool`; default: torch's intra-op thread
    count), and their updates are yielded in chunk order: the same updates, bit for bit,
    whatever ``threads`` is. Chunks are cut evenly (:func:`even_chunks`), on CPU into at least
    as many chunks as the machine has cores where each chunk's step still does
    :data:`PARALLEL_MIN_MACS` (the 2NN at a cohort of 10 on 2 cores: one chunk of 10, its steps
    being too small for two threads; at 100: four chunks of 25 from the memory budget). The
    vmap program and DP-SGD train one chunk at a time with torch's own intra-op threads.
    """

    name = "vectorized"
    partials = True

    def __init__(
        self,
        *,
        model_fn: ModelFn,
        dataset: FederatedDataset,
        spec: ParamSpec,
        device: str = "cpu",
        chunk_size: int | None = None,
        memory_budget_bytes: int | None = None,
        program: LockstepProgram | None = None,
        precision: str = "fp32",
        cuda_graphs: bool = False,
        free_bytes: FreeBytesFn | None = None,
        graph_backend: Callable[[], GraphBackend] | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(spec=spec)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"must be an integer >= 1 or unset, got {threads!r}", key="run.threads")
        self._pool = ChunkPool(threads if threads is not None else default_threads())
        # Cut a cohort into at least one chunk per core (CPU; cores of this machine, not
        # ``threads``, so the updates do not depend on the thread count): every core gets work.
        self._min_chunks = len(os.sched_getaffinity(0)) if torch.device(device).type == "cpu" else 1
        self.precision = check_precision(precision)
        if not isinstance(cuda_graphs, bool):
            raise ConfigError(f"must be true or false, got {cuda_graphs!r}", key="run.cuda_graphs")
        self.cuda_graphs = cuda_graphs
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ConfigError(f"must be an integer >= 1 or unset, got {chunk_size!r}", key="run.chunk_size")
        if memory_budget_bytes is not None and memory_budget_bytes < 1:
            raise ConfigError(f"must be > 0 or unset, got {memory_budget_bytes!r}", key="run.memory_budget_bytes")
        self.dataset = dataset
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self._model_fn = model_fn
        self._clipper: PerSampleClipper | None = None  # built at the first DP-SGD chunk
        default = DEFAULT_CPU_BUDGET if self.device.type == "cpu" else DEFAULT_GPU_BUDGET
        self.memory_budget_bytes = memory_budget_bytes or default
        # Chunks sized from the free device memory: on CUDA unless a budget is given, or wherever
        # a free-memory function is passed (tests give one on CPU).
        self._free_bytes: FreeBytesFn | None = free_bytes
        if free_bytes is None and memory_budget_bytes is None and self.device.type == "cuda":
            self._free_bytes = cuda_free_bytes
        self._sequential = SequentialEngine(model_fn=model_fn, dataset=dataset, spec=spec, device=device)
        self._sequential.client_states = self.client_states
        self._sequential.protocol_clients = self.protocol_clients
        reason = ""
        if program is None:  # not probed by the caller (local_engine probes once and passes it)
            program, reason = lockstep_program(model_fn, spec, dataset, self.device)
        self.program = program
        self.fallback_reason: str | None = None if self.program is not None else reason
        if self.program is None:
            log.warning("the model cannot be vectorized; training clients sequentially: %s", reason)
        self._slots = slots_of(spec)
        self._cols = spec.trainable_slices()
        offsets = {e.name: e.offset for e in spec.entries}
        self._slot_offsets = [(slot, offsets[name]) for name, slot in self._slots.items()]
        sample_shape = tuple(next(iter(dataset.clients.values())).train.x.shape[1:])
        self._sample_numel = math.prod(sample_shape)
        self._act_numel = 0
        self._macs: int | None = None  # forward multiply-accumulates per sample (lowered programs)
        if isinstance(self.program, LoweredProgram):
            self._act_numel = self.program.activation_numel(sample_shape, spec)
            self._macs = self.program.macs_per_sample(sample_shape, spec)
        # Every client's training samples on the device, once (chunks index them).
        self._data: ResidentData | None = None
        if self.program is not None:
            self._data = ResidentData.build(dataset, self.device)
        self._graph_backend: Callable[[], GraphBackend] | None = graph_backend
        if graph_backend is None and cuda_graphs:
            if self.device.type == "cuda":
                self._graph_backend = lambda: CudaGraphBackend(self.device)
            else:
                log.info("run.cuda_graphs applies on CUDA only; training on %s eagerly", self.device)
        self._stats_lock = threading.Lock()
        self._rejections: dict[str, str] = {}
        self.graph_replays = 0
        """Lockstep steps replayed from CUDA graphs so far (all chunks, all threads)."""
        self.graph_failure: str | None = None
        """Why a CUDA-graph capture failed (the steps then ran eagerly), if one did."""

    @property
    def threads(self) -> int:
        """How many chunks train at once."""
        return self._pool.threads

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

    def chunk_size_for(self, cfg: TrainConfig, transforms: Sequence[GradientTransform] = ()) -> int:
        """Clients per chunk for ``cfg``: ``chunk_size`` if set, else as many as fit the memory budget.

        The budget: ``memory_budget_bytes``; on CUDA without one (or given ``free_bytes``),
        :data:`~fedloom.engines._device.DEVICE_MEMORY_FRACTION` of the free device memory.

        A client's working set: its state row, its trainable parameters, gradients, optimizer
        state and per-client transform vectors (SCAFFOLD's correction), its batch and the
        activations (and their gradients); under DP-SGD also its per-sample gradients, for a
        Poisson batch of up to ``B + 3·sqrt(B)`` samples.
        """
        if self.chunk_size is not None:
            return self.chunk_size
        p = sum(s.numel for s in self._slots.values())
        opt_states = 2 if cfg.optimizer == "adam" else int(cfg.momentum > 0.0)
        per_client_vectors = sum(len(set(t.laid_out) - t.shared) for t in transforms)
        matrices = 2 + opt_states + per_client_vectors
        per_client = self.spec.numel + p * matrices + cfg.batch_size * (self._sample_numel + 3 * self._act_numel)
        if cfg.dpsgd:
            per_client += _dp_width(cfg.batch_size) * (p + self._sample_numel)
        per_client_bytes = per_client * self.spec.dtype.itemsize
        if self._free_bytes is not None:
            return chunk_size_from_free(self._free_bytes(self.device), per_client_bytes)
        return max(1, self.memory_budget_bytes // per_client_bytes)

    # ----------------------------------------------------------------- training
    def run_cohort(
        self,
        global_vec: torch.Tensor,
        instructions: Sequence[ClientInstruction],
        *,
        broadcast: Payload | None = None,
    ) -> Iterator[ClientUpdate]:
        # ``broadcast`` (an encoded global model for remote clients) is ignored: clients here read global_vec.
        if self.program is None:
            yield from self._sequential.run_cohort(global_vec, instructions)
            return
        g = global_vec.to(self.device)
        jobs = self._jobs(instructions)
        if self._pool.threads > 1 and not self._parallel_safe(jobs):
            # The vmap program's dropout and DP-SGD's clipper use shared state: one chunk at a
            # time, on the caller's thread with torch's own intra-op threads.
            for cfg, chunk in jobs:
                yield from self._finish_job(self._train_job(g, cfg, chunk))
            return
        for done in self._pool.ordered(lambda job: self._train_job(g, *job), jobs, intra_threads=self._intra(len(jobs))):
            yield from self._finish_job(done)

    def run_partials(
        self,
        global_vec: torch.Tensor,
        instructions: Sequence[ClientInstruction],
        *,
        aggregator: Aggregator,
        pipe: Pipeline,
        ctx: StageContext,
        max_examples: int | None = None,
    ) -> Iterator[tuple[Partial, int]]:
        """Each chunk's updates checked and summed on the thread that trained it: one partial per chunk.

        A chunk's job trains it, runs its client stages and adds its checked updates to a copy
        of the empty ``aggregator`` (:func:`~fedloom.engines._partials.sum_checked`), so the
        round loop's thread merges one float64 sum per chunk instead of checking and adding
        every update. Partials come in chunk order, so the aggregate is the same bits for any
        ``threads``. Refused updates are in :meth:`take_rejections`.
        """
        version = (instructions[0].model_version if instructions else 0) or 0

        def summed(updates: Iterable[ClientUpdate], clients: Sequence[ClientInstruction], source: str) -> ShardSum:
            return sum_checked(
                updates,
                expected={ins.client_id for ins in clients},
                aggregator=copy.deepcopy(aggregator),
                pipe=pipe,
                ctx=ctx,
                max_examples=max_examples,
                source=source,
                model_version=version,
            )

        if self.program is None:
            results: Iterable[ShardSum] = [summed(self._sequential.run_cohort(global_vec, instructions), instructions, "chunk-0")]
        else:
            g = global_vec.to(self.device)
            jobs = list(enumerate(self._jobs(instructions)))

            def job(item: tuple[int, tuple[TrainConfig, list[ClientInstruction]]]) -> ShardSum:
                i, (cfg, chunk) = item
                return summed(self._finish_job(self._train_job(g, cfg, chunk)), chunk, f"chunk-{i}")

            if self._pool.threads > 1 and not self._parallel_safe([j for _, j in jobs]):
                results = (job(item) for item in jobs)  # one chunk at a time (see run_cohort)
            else:
                results = self._pool.ordered(job, jobs, intra_threads=self._intra(len(jobs)))
        for done in results:
            self._rejections.update(done.rejected)
            if done.partial is not None:
                yield done.partial, done.nbytes

    def take_rejections(self) -> dict[str, str]:
        out, self._rejections = self._rejections, {}
        return out

    def _jobs(self, instructions: Sequence[ClientInstruction]) -> list[tuple[TrainConfig, list[ClientInstruction]]]:
        """The cohort as chunks: clients grouped by training config, transforms, stages and personal run.

        Within a group, clients are ordered by their number of training examples, most first
        (a stable sort: ties keep the cohort's order), so a chunk holds clients of about the same
        number of local steps: with unequal clients (a power law of sizes) no chunk steps on
        for one large client while its small ones are done, and each chunk's rows are already
        in the longest-first order its batch plan needs.
        """
        groups: dict[tuple, list[ClientInstruction]] = {}
        for ins in instructions:
            groups.setdefault((ins.train, ins.transforms, ins.stages, ins.personal), []).append(ins)
        jobs: list[tuple[TrainConfig, list[ClientInstruction]]] = []
        for (cfg, _, _, _), group in groups.items():
            group = sorted(group, key=lambda ins: -len(self._split(ins.client_id)))
            size = self.chunk_size_for(cfg, active_transforms(group[0]))
            jobs += [(cfg, chunk) for chunk in even_chunks(group, size, self._least_chunks(len(group), cfg))]
        return jobs

    def _intra(self, jobs: int) -> int:
        """Intra-op threads per chunk: the chunk threads left idle lent to fewer chunks than threads,
        where the program's steps give the same bits with any thread count (Linear chains)."""
        if jobs == 0 or jobs >= self._pool.threads or self.program is None or not self.program.thread_invariant:
            return 1
        return self._pool.threads // jobs

    def _least_chunks(self, n: int, cfg: TrainConfig) -> int:
        """How many chunks ``n`` clients are cut into at least: one per core where each still pays.

        A chunk's lockstep step holds the GIL for its Python work (~0.5 ms) and releases it in
        the kernels, so a chunk thread pays only when its step's products are large: at least
        :data:`PARALLEL_MIN_MACS` multiply-accumulates. Fewer chunks than cores then (the 2NN at
        a cohort of 10: one chunk of 10, not 5 + 5). From the model, batch size and core count
        only, never from timing or ``threads``.
        """
        if self._macs is None or self._min_chunks == 1:
            return self._min_chunks
        step = cfg.batch_size * self._macs  # a client's step (forward MACs)
        return max(1, min(self._min_chunks, n * step // PARALLEL_MIN_MACS))

    def _parallel_safe(self, jobs: Sequence[tuple[TrainConfig, list[ClientInstruction]]]) -> bool:
        """Whether chunks may train on several threads at once (the lowered program, no DP-SGD)."""
        return isinstance(self.program, LoweredProgram) and not any(cfg.dpsgd for cfg, _ in jobs)

    def _train_job(self, g: torch.Tensor, cfg: TrainConfig, chunk: list[ClientInstruction]) -> _ChunkDone:
        """Train one chunk (a worker thread's job): its results, the states to keep and the deltas."""
        results, deltas = self._train_chunk(g, cfg, chunk)
        states = [r.state for r in results]
        if chunk[0].personal:  # Ditto: the personal run in lockstep too, from the states just made
            for ins, st in zip(chunk, states, strict=True):
                self.client_states.put(ins.client_id, st)
            personal = [personal_instruction(ins) for ins in chunk]
            states = [r.state for r in self._train_chunk(g, cfg, personal)[0]]  # type: ignore[arg-type]
        return _ChunkDone(chunk, results, states, deltas)

    def _finish_job(self, done: _ChunkDone) -> list[ClientUpdate]:
        """The client stages on a trained chunk (the caller's thread, in chunk order)."""
        return self.finish_clients(done.chunk, [r.update for r in done.results], done.states, done.deltas)

    def close(self) -> None:
        self._pool.close()
        self._sequential.close()

    def _train_chunk(
        self, g: torch.Tensor, cfg: TrainConfig, chunk: list[ClientInstruction]
    ) -> tuple[list[LocalResult], torch.Tensor]:
        """Train a chunk in lockstep: each client's result, and all deltas as a (k, numel) matrix (chunk order)."""
        assert self.program is not None
        device, spec = self.device, self.spec
        splits = [self._split(ins.client_id) for ins in chunk]
        for ins, split in zip(chunk, splits, strict=True):
            if len(split) == 0:
                raise ConfigError(f"client {ins.client_id!r} has no training data", key="data")
        draw = poisson_batches if cfg.dpsgd else batch_order
        orders = [draw(len(s), cfg, ins.seed) for ins, s in zip(chunk, splits, strict=True)]
        # Poisson batches vary in size (and may be empty): pad to the largest one.
        width = max(1, max(len(b) for o in orders for b in o)) if cfg.dpsgd else cfg.batch_size
        data, offsets = self._chunk_data(chunk, splits)
        plan = _BatchPlan.build(data, offsets, orders, width, device, g.dtype)
        rows, steps, k = plan.rows, plan.steps, len(chunk)
        dp = None
        if cfg.dpsgd:
            if self._clipper is None:
                with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):  # init draws
                    self._clipper = PerSampleClipper(self._model_fn().to(device), spec)
            sizes = [len(splits[i]) for i in rows]
            dp = ChunkPrivatizer(self._clipper, cfg, [chunk[i] for i in rows], sizes, device, g.dtype)

        stack = SlotStack(self._slots, k)
        # Gradient transforms (the same code as the sequential trainer's): per-client vectors
        # stacked like theta, shared ones as a (1, *shape) view broadcasting over the chunk.
        transforms = active_transforms(chunk[0])
        starts = [start_vector(transforms, spec, g, chunk[i], self.client_states.get(chunk[i].client_id)) for i in rows]
        if any(s is not g for s in starts):  # personal layers: each client starts from its own values
            state = torch.stack(starts)
            theta = stack.stack(torch.stack([self._trainable(s) for s in starts]))
        else:
            theta_g = torch.cat([g[c] for c in self._cols]) if self._cols else g.new_zeros(0)
            theta = stack.stack(theta_g.unsqueeze(0).expand(k, -1))
            state = g.new_empty(k, g.numel()).copy_(g.expand(k, -1))
        grad = torch.empty_like(theta)
        prepared = [
            [t.prepare(spec, g, chunk[i], self.client_states.get(chunk[i].client_id)) for t in transforms] for i in rows
        ]
        one = SlotStack(self._slots, 1)
        stacked: list[dict[str, torch.Tensor]] = []
        for j, t in enumerate(transforms):
            bufs = {}
            for name in t.laid_out:
                if name in t.shared:
                    bufs[name] = one.stack(self._trainable(prepared[0][j][name]).unsqueeze(0))
                else:
                    bufs[name] = stack.stack(torch.stack([self._trainable(prepared[r][j][name]) for r in range(k)]))
            stacked.append(bufs)

        def laid(j: int, ka: int) -> dict[str, list[torch.Tensor]]:
            t = transforms[j]
            return {
                name: list((one.views(buf, 1) if name in t.shared else stack.views(buf, ka)).values())
                for name, buf in stacked[j].items()
            }

        optimizer = _StackedOptimizer(cfg, theta, stack)
        # Plain SGD (FedAvg's local solver): the program applies it, fused where it can.
        plain = (
            cfg.optimizer == "sgd" and cfg.momentum == 0.0 and cfg.weight_decay == 0.0 and not transforms and dp is None
        )
        sgd_lr = cfg.lr if plain else None
        loss_sum = torch.zeros(k, dtype=torch.float64, device=device)

        seed = derive_seed("vectorized", *(part for ins in chunk for part in (ins.client_id, ins.seed)))
        gen = torch.Generator(device=device).manual_seed(seed)
        program = self.program
        # DP-SGD's per-sample clipping and noise stay float32 (its sensitivity bound is the point).
        precision = self.precision if dp is None else "fp32"

        def lockstep(ix: torch.Tensor, cnt: torch.Tensor, counts: list[int], ka: int) -> None:
            """One lockstep step of the first ``ka`` rows: the eager step, and the one a CUDA graph captures."""
            params, grads = stack.views(theta, ka), stack.views(grad, ka)
            with autocast_scope(precision, device):
                losses = program.step(
                    params, grads, state[:ka], plan.x[ix], plan.y[ix], cnt, counts, cfg.loss, gen, sgd_lr
                )
            loss_sum[:ka] += losses.to(torch.float64) * cnt.to(torch.float64)

        graphed: GraphedStep | None = None
        if self._graph_backend is not None and dp is None and program.graph_safe and sum(plan.full) > 2:
            full = [width] * k
            graphed = GraphedStep(
                lambda ix, cnt: lockstep(ix, cnt, full, k), plan.index[0], plan.counts[0], self._graph_backend()
            )
        with _vmap_rng(program, seed, device), precision_scope(precision, device):
            for t, ka in enumerate(plan.active):
                cnt = plan.counts[t, :ka]
                counts = plan.count_lists[t][:ka]
                if dp is None:
                    if graphed is not None and plan.full[t]:
                        graphed(plan.index[t], cnt)
                    else:
                        lockstep(plan.index[t, :ka], cnt, counts, ka)
                    if sgd_lr is not None:
                        continue
                else:  # the privatized gradient; the loss is a sum over the real samples
                    params, grads = stack.views(theta, ka), stack.views(grad, ka)
                    ix = plan.index[t, :ka, : max(counts)]
                    loss_sum[:ka] += dp.step(params, grads, state[:ka], plan.x[ix], plan.y[ix], cnt).to(torch.float64)
                if transforms:
                    params, grads = stack.views(theta, ka), stack.views(grad, ka)
                    plist, glist = list(params.values()), list(grads.values())
                    for j, t in enumerate(transforms):
                        t.apply(plist, glist, laid(j, ka))
                optimizer.step(theta, grad, ka)
                if transforms:
                    for j, t in enumerate(transforms):
                        t.after_step(list(stack.views(theta, ka).values()), laid(j, ka))
        if graphed is not None and (graphed.replays or graphed.failed):
            with self._stats_lock:
                self.graph_replays += graphed.replays
                self.graph_failure = graphed.failed or self.graph_failure

        for slot, offset in self._slot_offsets:  # the trained entries into the state rows (one copy each)
            state[:, offset : offset + slot.numel] = theta[k * slot.col : k * (slot.col + slot.numel)].view(k, slot.numel)
        loss_sums = loss_sum.tolist()
        seen = [sum(c[r] for c in plan.count_lists) for r in range(k)]
        deltas = state.sub_(g)  # row r is chunk position rows[r]: put the rows in chunk order
        if rows != list(range(k)):
            order = [0] * k
            for r, i in enumerate(rows):
                order[i] = r
            deltas = deltas.index_select(0, torch.tensor(order, device=deltas.device))
        results: list[LocalResult] = [None] * k  # type: ignore[list-item]
        for r, i in enumerate(rows):
            ins = chunk[i]
            results[i] = finish_local(
                spec,
                ins,
                deltas[i],
                num_examples=len(splits[i]),
                num_steps=steps[r],
                loss_sum=loss_sums[r],
                seen=seen[r],
                client_state=self.client_states.get(ins.client_id),
                transforms=list(zip(transforms, prepared[r], strict=True)),
            )
        return results, deltas

    def _chunk_data(self, chunk: list[ClientInstruction], splits: list[Split]) -> tuple[ResidentData, list[int]]:
        """The samples a chunk indexes, and each chunk client's offset in them.

        The engine's resident copy; for a chunk with a client it does not hold (one added to
        the dataset later), the chunk's own splits concatenated on the device.
        """
        data = self._data
        if data is not None and all(
            data.sizes.get(ins.client_id) == len(s) for ins, s in zip(chunk, splits, strict=True)
        ):
            return data, [data.offsets[ins.client_id] for ins in chunk]
        offsets = [0]
        for s in splits[:-1]:
            offsets.append(offsets[-1] + len(s))
        own = ResidentData(
            x=torch.cat([s.x for s in splits]).to(self.device),
            y=torch.cat([s.y for s in splits]).to(self.device),
            offsets={},
            sizes={},
        )
        return own, offsets

    def _trainable(self, vec: torch.Tensor) -> torch.Tensor:
        """The trainable entries of a flat vector, in slot order."""
        return torch.cat([vec[c] for c in self._cols]) if self._cols else vec.new_zeros(0)

    def evaluate_clients(
        self, global_vec: torch.Tensor, client_ids: Sequence[str], *, personal: PersonalEval | None = None
    ) -> Iterator[tuple[str, int, dict[str, float]]]:
        return self._sequential.evaluate_clients(global_vec, client_ids, personal=personal)


@contextlib.contextmanager
def _vmap_rng(program: LockstepProgram, seed: int, device: torch.device) -> Iterator[None]:
    """The vmap program's dropout draws from the global RNG: seed a forked one for the chunk.

    The lowered program draws from the chunk's own generator and leaves the global RNG alone,
    so chunks on parallel threads never fork and restore it under each other.
    """
    if isinstance(program, LoweredProgram):
        yield
        return
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class _ChunkDone:
    """A trained chunk, in chunk order: its instructions, results, states to keep and deltas."""

    chunk: list[ClientInstruction]
    results: list[LocalResult]
    states: list[Mapping[str, torch.Tensor]]
    deltas: torch.Tensor


def even_chunks(group: Sequence[ClientInstruction], size: int, min_chunks: int = 1) -> list[list[ClientInstruction]]:
    """``group`` in order, cut into the fewest chunks of at most ``size`` clients (at least
    ``min_chunks`` if there are that many clients), sizes differing by at most one.

    (10 clients at most 9 per chunk: 5 + 5, not 9 + 1, so parallel chunks finish together.)
    """
    n = len(group)
    if n == 0:
        return []
    count = min(n, max(-(-n // max(1, size)), min_chunks))
    base, extra = divmod(n, count)
    out, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        out.append(list(group[start:stop]))
        start = stop
    return out


@dataclass(frozen=True)
class _BatchPlan:
    """A chunk's batches, step by step, as padded index tensors into its concatenated data.

    ``rows[r]`` is the chunk position of row r; rows are sorted by number of steps, longest
    first, so the ``active[t]`` clients that still step at t are rows ``[0, active[t])``.
    ``index[t, r]`` holds row r's sample indices at step t into ``x`` / ``y`` (the engine's
    resident data: chunk position i's samples start at ``offsets[i]``), padded to B by
    repeating its first sample (the client's first example for an empty batch);
    ``counts[t, r]`` (also ``count_lists``, on the host) its real batch size. ``full[t]``:
    every row steps at t with a full batch of B (the steps a CUDA graph may replay). Built
    on the host and moved to the device once per chunk: the step loop reads no device value.
    """

    rows: list[int]
    steps: list[int]
    active: list[int]
    full: list[bool]
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    counts: torch.Tensor
    count_lists: list[list[int]]

    @classmethod
    def build(
        cls,
        data: ResidentData,
        offsets: list[int],
        orders: list[list[torch.Tensor]],
        b: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> _BatchPlan:
        rows = sorted(range(len(orders)), key=lambda i: -len(orders[i]))
        steps = [len(orders[i]) for i in rows]
        horizon = steps[0]
        index = torch.zeros(horizon, len(rows), b, dtype=torch.long)
        counts = torch.zeros(horizon, len(rows), dtype=torch.long)
        pos = torch.arange(b)
        for r, i in enumerate(rows):
            batches = orders[i]
            n = len(batches)
            if n == 0:
                continue
            lens = torch.tensor([len(batch) for batch in batches], dtype=torch.long)
            counts[:n, r] = lens
            flat = torch.cat([batch.long() for batch in batches])
            if flat.numel() == 0:  # only empty (Poisson) batches: the client's first example
                index[:n, r] = offsets[i]
                continue
            starts = (lens.cumsum(0) - lens).unsqueeze(1)
            # Real samples in place, then padding that repeats the batch's first sample.
            src = torch.where(pos < lens.unsqueeze(1), starts + pos, starts).clamp_(max=flat.numel() - 1)
            local = flat[src]
            local[lens == 0] = 0
            index[:n, r] = local + offsets[i]
        count_lists = counts.tolist()
        active = [sum(1 for s in steps if s > t) for t in range(horizon)]
        k = len(rows)
        return cls(
            rows=rows,
            steps=steps,
            active=active,
            full=[a == k and all(c == b for c in cl) for a, cl in zip(active, count_lists, strict=True)],
            x=data.x,
            y=data.y,
            index=index.to(device),
            counts=counts.to(device=device, dtype=dtype),
            count_lists=count_lists,
        )


def _dp_width(b: int) -> int:
    """A generous bound on a Poisson batch of expected size ``b`` (for the memory estimate)."""
    return b + math.ceil(3 * math.sqrt(b))


class _StackedOptimizer:
    """torch.optim.SGD / Adam's update rules (single-tensor path), operation by operation.

    The parameters, gradients and optimizer states are :class:`SlotStack` buffers; a step
    updates the active clients' parts (lists of contiguous pieces, see :meth:`SlotStack.flat`).
    Every client stepped at step t has taken exactly t - 1 steps before, so SGD's first-step
    momentum buffer and Adam's bias corrections are scalars shared by all of them. The
    gradient buffer is rewritten by the next step, so it serves as scratch space here.
    """

    def __init__(self, cfg: TrainConfig, theta: torch.Tensor, stack: SlotStack) -> None:
        if cfg.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"unknown optimizer {cfg.optimizer!r}", key="client.optimizer")
        self.cfg = cfg
        self.stack = stack
        self.t = 0
        self.buf: torch.Tensor | None = None
        self.exp_avg: torch.Tensor | None = None
        self.exp_avg_sq: torch.Tensor | None = None
        if cfg.optimizer == "adam":
            self.exp_avg = torch.zeros_like(theta)
            self.exp_avg_sq = torch.zeros_like(theta)
        elif cfg.momentum > 0.0:
            self.buf = torch.empty_like(theta)

    def step(self, theta: torch.Tensor, grad: torch.Tensor, ka: int) -> None:
        """Update the first ``ka`` clients of ``theta`` with their gradients in ``grad``."""
        cfg, flat = self.cfg, self.stack.flat
        params, grads = flat(theta, ka), flat(grad, ka)
        self.t += 1
        if cfg.weight_decay != 0.0:
            torch._foreach_add_(grads, params, alpha=cfg.weight_decay)
        if self.exp_avg is not None and self.exp_avg_sq is not None:
            beta1, beta2 = cfg.betas
            exp_avg, exp_avg_sq = flat(self.exp_avg, ka), flat(self.exp_avg_sq, ka)
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            step = float(self.t)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = cfg.lr / bias_correction1
            denom = grads  # scratch: (exp_avg_sq.sqrt() / sqrt(bias_correction2)) + eps
            torch._foreach_copy_(denom, exp_avg_sq)
            torch._foreach_sqrt_(denom)
            torch._foreach_div_(denom, bias_correction2**0.5)
            torch._foreach_add_(denom, cfg.eps)
            torch._foreach_addcdiv_(params, exp_avg, denom, value=-step_size)
            return
        if self.buf is not None:
            buf = flat(self.buf, ka)
            if self.t == 1:
                torch._foreach_copy_(buf, grads)
            else:
                torch._foreach_mul_(buf, cfg.momentum)
                torch._foreach_add_(buf, grads)
            if cfg.nesterov:
                torch._foreach_add_(grads, buf, alpha=cfg.momentum)
            else:
                grads = buf
        torch._foreach_add_(params, grads, alpha=-cfg.lr)
