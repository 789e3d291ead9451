"""The Ray engine: a cohort sharded over the workers of a Ray cluster.

Design. The engine starts ``num_workers`` Ray actors (:class:`ShardWorker`), spread over the
cluster's nodes, each reserving ``cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs). The
federated dataset is put in Ray's object store ONCE, when the engine starts; every actor
reads it from there and builds an in-process engine over it — the vectorized engine, or the
sequential one where the model cannot be trained in lockstep (the choice of
:func:`~fedloom.engines.vectorized.local_engine`, as for ``--engine auto``).

Each round, :meth:`RayEngine.run_cohort` puts the global vector in the object store once,
cuts the cohort's instructions into ``num_workers`` contiguous shards and sends shard i to
actor i together with the client states (SCAFFOLD's c_i, ...) of the shard's clients: the
driver owns the :class:`~fedloom.engines.base.ClientStateStore`, so checkpoints and resumes
see every client's state, and a worker keeps none between calls. Actors answer with a Ray
streaming generator, one ``(update, client state, worker pid)`` per client as their engine
yields it, and the driver yields each update as soon as it arrives from any worker
(``ray.wait``): the server aggregates in a stream, and the driver fetches one update at a
time, never a whole shard. Federated evaluation is sharded the same way.

The updates are the in-process engine's up to float rounding (the vectorized engine's
chunks differ when the cohort is split). They arrive in completion order; a streaming
aggregate sums them in that order, so two runs may differ in the last bits. ``ordered=True``
drains the shards in cohort order instead (all shards still train at once; shard i+1's
updates are yielded after shard i's), which makes the aggregate independent of timing.

``ray`` is an optional dependency (``pip install 'fedloom[ray]'``); it is imported only
when an engine is built, so importing this module never needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

from fedloom.core.errors import ConfigError, EngineError, FedloomError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ClientUpdate, Partial, Payload, PersonalEval, tensor_bytes
from fedloom.data.base import FederatedDataset
from fedloom.engines._partials import sum_checked
from fedloom.engines.base import Engine, ModelFn
from fedloom.engines.vectorized import VectorizedEngine, local_engine
from fedloom.pipeline import Pipeline, StageContext
from fedloom.strategies.base import Aggregator

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["InnerEngine", "RayEngine", "ShardWorker", "import_ray", "shard"]

log = logging.getLogger("fedloom.engines.ray")

InnerEngine = Literal["auto", "vectorized", "sequential"]
_INNER = ("auto", "vectorized", "sequential")

T = TypeVar("T")


def import_ray() -> ModuleType:
    """The ``ray`` module, or an :class:`EngineError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise EngineError(
            f"the ray engine needs Ray, which is not installed ({exc}); install it with: pip install 'fedloom[ray]'"
        ) from None
    return ray


def shard(items: Sequence[T], n: int) -> list[list[T]]:
    """``items`` cut into at most ``n`` contiguous, non-empty shards whose sizes differ by at most one."""
    if n < 1:
        raise ValueError(f"need n >= 1 shards, got {n}")
    q, r = divmod(len(items), n)
    shards: list[list[T]] = []
    start = 0
    for i in range(n):
        size = q + (1 if i < r else 0)
        if size:
            shards.append(list(items[start : start + size]))
        start += size
    return shards


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _cpu_update(update: ClientUpdate) -> ClientUpdate:
    """``update`` with its tensors on the CPU (the driver may have no accelerator)."""
    delta = update.delta
    if (delta is None or delta.device.type == "cpu") and all(t.device.type == "cpu" for t in update.extras.values()):
        return update  # (a payload's tensors are on the CPU already: encoding stages put them there)
    return dataclasses.replace(
        update, delta=None if delta is None else delta.cpu(), extras={k: v.cpu() for k, v in update.extras.items()}
    )


class ShardWorker:
    """The work of one Ray actor: an in-process engine over the (shared) federated dataset.

    Without Ray it is a plain class (``RayEngine`` wraps it with ``ray.remote``). ``inner``
    picks the engine: ``vectorized``, ``sequential``, or ``auto`` — vectorized where the
    model can be trained in lockstep, else sequential. The worker keeps no client state
    between calls: the driver sends the shard's states with each call and gets them back.
    """

    def __init__(
        self,
        *,
        model_fn: ModelFn,
        dataset: FederatedDataset,
        spec: ParamSpec,
        device: str = "cpu",
        chunk_size: int | None = None,
        memory_budget_bytes: int | None = None,
        inner: InnerEngine = "auto",
        num_threads: int = 1,
    ) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.engine: Engine = local_engine(
            inner,
            model_fn=model_fn,
            dataset=dataset,
            spec=spec,
            device=device,
            chunk_size=chunk_size,
            memory_budget_bytes=memory_budget_bytes,
        )

    @property
    def mode(self) -> str:
        """The inner engine's mode: ``lowered`` or ``vmap`` (vectorized) or ``sequential``."""
        return self.engine.mode if isinstance(self.engine, VectorizedEngine) else "sequential"

    def info(self) -> tuple[int, str, str]:
        """``(pid, Ray node id, mode)`` of this worker (node id ``""`` outside Ray)."""
        node = ""
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return os.getpid(), node, self.mode

    def run_shard(
        self,
        global_vec: torch.Tensor,
        instructions: Sequence[ClientInstruction],
        states: Mapping[str, Mapping[str, torch.Tensor]],
    ) -> Iterator[tuple[ClientUpdate, dict[str, torch.Tensor], int]]:
        """Train a shard; yield ``(update, client state after training, pid)`` per client, on the CPU."""
        store = self.engine.client_states
        store.load_tensors({})
        for cid, state in states.items():
            store.put(cid, state)
        pid = os.getpid()
        try:
            for update in self.engine.run_cohort(global_vec, instructions):
                state = {k: v.cpu() for k, v in store.get(update.client_id).items()}
                yield _cpu_update(update), state, pid
        finally:
            store.load_tensors({})

    def run_shard_partial(
        self,
        global_vec: torch.Tensor,
        instructions: Sequence[ClientInstruction],
        states: Mapping[str, Mapping[str, torch.Tensor]],
        aggregator: Aggregator,
        pipe: Pipeline,
        ctx: StageContext,
        max_examples: int | None,
    ) -> tuple[Partial | None, dict[str, str], dict[str, dict[str, torch.Tensor]], int, int]:
        """Train a shard and sum it here: ``(partial, rejections, client states, pid, the clients' update bytes)``.

        Each update is checked as the round loop checks it (its cohort and round, the stages'
        server halves, :meth:`~fedloom.pipeline.Pipeline.check`) before ``aggregator`` adds it.
        """
        store = self.engine.client_states
        store.load_tensors({})
        for cid, state in states.items():
            store.put(cid, state)
        try:
            shard_sum = sum_checked(
                self.engine.run_cohort(global_vec, instructions),
                expected={ins.client_id for ins in instructions},
                aggregator=aggregator,
                pipe=pipe,
                ctx=ctx,
                max_examples=max_examples,
                source=f"worker-{os.getpid()}",
                model_version=(instructions[0].model_version if instructions else 0) or 0,
                prepare=_cpu_update,
            )
            out_states = {ins.client_id: {k: v.cpu() for k, v in store.get(ins.client_id).items()} for ins in instructions}
        finally:
            store.load_tensors({})
        partial, rejected, nbytes = shard_sum.partial, shard_sum.rejected, shard_sum.nbytes
        pid = os.getpid()
        return partial, rejected, {k: v for k, v in out_states.items() if v}, pid, nbytes

    def evaluate_shard(
        self,
        global_vec: torch.Tensor,
        client_ids: Sequence[str],
        personal: PersonalEval | None = None,
        states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> list[tuple[str, int, dict[str, float]]]:
        """Federated evaluation of a shard's clients (those without a test split are skipped);
        ``personal``: each client's own model, from its ``states`` (read only)."""
        store = self.engine.client_states
        store.load_tensors({})
        for cid, state in (states or {}).items():
            store.put(cid, state)
        try:
            return list(self.engine.evaluate_clients(global_vec, client_ids, personal=personal))
        finally:
            store.load_tensors({})


class RayEngine(Engine):
    """Shards each cohort over Ray actors, each running an in-process engine (module docstring).

    ``address`` is the cluster to use: ``None`` starts a local Ray instance in this process
    (stopped again by :meth:`close`); a string connects to a running cluster — ``"auto"``
    (the one started on this machine with ``ray start``), ``"HOST:6379"`` (its GCS) or
    ``"ray://HOST:10001"`` (Ray Client) — and :meth:`close` disconnects, leaving the cluster
    up. If this process is already connected to Ray, that connection is used as it is and
    left open. ``init_options`` go to ``ray.init`` (``runtime_env``, ``num_cpus``,
    ``include_dashboard``, ...). Every node needs the same fedloom and torch as the driver.

    ``num_workers`` actors (default: the cluster's CPUs // ``cpus_per_worker``, at least 1)
    are placed with Ray's ``SPREAD`` strategy; each uses ``cpus_per_worker`` torch threads.
    ``gpus_per_worker`` defaults to 0 on ``device="cpu"`` and to ``1 / num_workers`` (all
    workers share one GPU) otherwise. ``chunk_size`` and ``memory_budget_bytes`` are the
    workers' vectorized engines' settings; ``inner`` picks their engine (``auto``,
    ``vectorized``, ``sequential``). ``ordered`` yields the shards' updates in cohort order
    rather than as they arrive (a timing-independent aggregate, see the module docstring).
    ``startup_timeout_s`` bounds the wait for the actors (a cluster without the resources
    asked for raises :class:`EngineError` instead of hanging).

    After construction, :attr:`worker_pids` and :attr:`worker_nodes` say where the actors
    run and :attr:`mode` which engine they run; after each :meth:`run_cohort`,
    :attr:`last_worker_pids` maps every client of that cohort to the pid that trained it.
    """

    name = "ray"
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
        address: str | None = None,
        num_workers: int | None = None,
        cpus_per_worker: int = 1,
        gpus_per_worker: float | None = None,
        inner: InnerEngine = "auto",
        ordered: bool = False,
        init_options: Mapping[str, Any] | None = None,
        startup_timeout_s: float = 300.0,
    ) -> None:
        super().__init__(spec=spec)
        if num_workers is not None and not _positive_int(num_workers):
            raise ConfigError(f"must be an integer >= 1 or unset, got {num_workers!r}", key="run.ray_workers")
        if not _positive_int(cpus_per_worker):
            raise ConfigError(f"cpus_per_worker must be an integer >= 1, got {cpus_per_worker!r}")
        if gpus_per_worker is not None and not gpus_per_worker >= 0:
            raise ConfigError(f"gpus_per_worker must be >= 0, got {gpus_per_worker!r}")
        if inner not in _INNER:
            raise ConfigError(f"inner must be one of {_INNER}, got {inner!r}")
        if chunk_size is not None and not _positive_int(chunk_size):
            raise ConfigError(f"must be an integer >= 1 or unset, got {chunk_size!r}", key="run.chunk_size")
        ray = import_ray()
        self.dataset = dataset
        self.device = device
        self.ordered = ordered
        self.last_worker_pids: dict[str, int] = {}
        self.driver_bytes = 0
        """Tensor bytes the driver has received from the workers (updates or partials, and client states)."""
        self._rejections: dict[str, str] = {}
        self.worker_pids: tuple[int, ...] = ()
        self.worker_nodes: tuple[str, ...] = ()
        self._actors: list[Any] = []
        self._owns_ray = False
        self._closed = False

        if ray.is_initialized():
            if address is not None:
                log.info("ray is already initialized in this process; using that connection, not %r", address)
        else:
            options = dict(init_options or {})
            options.setdefault("address", "local" if address is None else address)
            try:
                ray.init(**options)
            except Exception as exc:  # noqa: BLE001 - any failure to reach the cluster is one clear error
                where = "a local Ray instance" if address is None else f"the Ray cluster at {address!r}"
                raise EngineError(f"cannot start or connect to {where}: {exc}") from exc
            self._owns_ray = True
        try:
            self._start_workers(
                ray,
                model_fn=model_fn,
                num_workers=num_workers,
                cpus_per_worker=cpus_per_worker,
                gpus_per_worker=gpus_per_worker,
                chunk_size=chunk_size,
                memory_budget_bytes=memory_budget_bytes,
                inner=inner,
                startup_timeout_s=startup_timeout_s,
            )
        except BaseException:
            self.close()
            raise

    def _start_workers(
        self,
        ray: ModuleType,
        *,
        model_fn: ModelFn,
        num_workers: int | None,
        cpus_per_worker: int,
        gpus_per_worker: float | None,
        chunk_size: int | None,
        memory_budget_bytes: int | None,
        inner: InnerEngine,
        startup_timeout_s: float,
    ) -> None:
        resources = ray.cluster_resources()
        if num_workers is None:
            num_workers = max(1, int(resources.get("CPU", 1) // cpus_per_worker))
        if gpus_per_worker is None:
            gpus_per_worker = 0.0 if torch.device(self.device).type == "cpu" else 1.0 / num_workers
        self._dataset_ref = ray.put(self.dataset)  # once: every actor reads the same object
        actor_cls = ray.remote(ShardWorker)
        for _ in range(num_workers):
            actor = actor_cls.options(
                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, scheduling_strategy="SPREAD"
            ).remote(
                model_fn=model_fn,
                dataset=self._dataset_ref,
                spec=self.spec,
                device=self.device,
                chunk_size=chunk_size,
                memory_budget_bytes=memory_budget_bytes,
                inner=inner,
                num_threads=cpus_per_worker,
            )
            self._actors.append(actor)
        try:
            infos = ray.get([a.info.remote() for a in self._actors], timeout=startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise EngineError(
                f"{num_workers} ray workers of {cpus_per_worker} CPU(s) and {gpus_per_worker:g} GPU(s) each did not "
                f"start within {startup_timeout_s:g} s; the cluster has {dict(resources)} (set run.ray_workers lower?)"
            ) from None
        except ray.exceptions.RayError as exc:
            raise EngineError(f"a ray worker failed to start: {exc}") from exc
        self.worker_pids = tuple(pid for pid, _, _ in infos)
        self.worker_nodes = tuple(node for _, node, _ in infos)
        self._mode = infos[0][2]
        log.info(
            "ray engine: %d workers (%s) on %d node(s)", len(self._actors), self._mode, len(set(self.worker_nodes))
        )

    @property
    def num_workers(self) -> int:
        """The number of Ray actors."""
        return len(self._actors)

    @property
    def mode(self) -> str:
        """The workers' engine: ``lowered`` or ``vmap`` (vectorized) or ``sequential``."""
        return self._mode

    def available_clients(self) -> list[str]:
        return self.dataset.client_ids

    def _check_open(self) -> ModuleType:
        if self._closed or not self._actors:
            raise EngineError("the ray engine is closed")
        return import_ray()

    def _check_clients(self, client_ids: Sequence[str]) -> None:
        for cid in client_ids:
            if cid not in self.dataset.clients:
                raise EngineError(f"unknown client {cid!r}")

    @staticmethod
    def _get(ray: ModuleType, ref: Any) -> Any:
        """``ray.get(ref)``, with a worker's fedloom error re-raised as itself, others as EngineError."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, FedloomError):
                raise cause from exc
            raise EngineError(f"a ray worker failed: {cause!r}") from exc
        except ray.exceptions.RayError as exc:
            raise EngineError(f"a ray worker was lost: {exc}") from exc

    # ----------------------------------------------------------------- training
    def run_cohort(
        self,
        global_vec: torch.Tensor,
        instructions: Sequence[ClientInstruction],
        *,
        broadcast: Payload | None = None,
    ) -> Iterator[ClientUpdate]:
        # ``broadcast`` (an encoded global model for remote clients) is ignored: clients here read global_vec.
        ray = self._check_open()
        self._check_clients([ins.client_id for ins in instructions])
        self.last_worker_pids = {}
        if not instructions:
            return
        g_ref = ray.put(global_vec.detach().cpu())  # once per round, read by every worker
        # a round protocol's client sessions live here, in the driver: workers train, the driver seals
        by_id = {ins.client_id: ins for ins in instructions}
        sent = [dataclasses.replace(ins, protocol=None) if ins.protocol is not None else ins for ins in instructions]
        streams = []
        for actor, part in zip(self._actors, shard(sent, len(self._actors)), strict=False):
            states = {ins.client_id: dict(s) for ins in part if (s := self.client_states.get(ins.client_id))}
            streams.append(actor.run_shard.options(num_returns="streaming").remote(g_ref, part, states))
        for update, state, pid in self._drain(ray, streams):
            self.driver_bytes += update.nbytes + sum(tensor_bytes(t) for t in state.values())
            self.client_states.put(update.client_id, state)
            self.last_worker_pids[update.client_id] = pid
            yield from self.seal([by_id[update.client_id]], [update])

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
        """Each worker checks and sums its shard and sends one partial: ``(partial, its clients' update bytes)``.

        The driver receives one model-sized float64 sum per worker instead of one update per
        client; updates a worker refused are in :meth:`take_rejections`.
        """
        ray = self._check_open()
        self._check_clients([ins.client_id for ins in instructions])
        self.last_worker_pids = {}
        if not instructions:
            return
        g_ref = ray.put(global_vec.detach().cpu())
        pending = []
        for actor, part in zip(self._actors, shard(list(instructions), len(self._actors)), strict=False):
            states = {ins.client_id: dict(s) for ins in part if (s := self.client_states.get(ins.client_id))}
            pending.append(actor.run_shard_partial.remote(g_ref, part, states, aggregator, pipe, ctx, max_examples))
        if self.ordered:
            results = (self._get(ray, ref) for ref in pending)
        else:
            results = self._wait_each(ray, pending)
        for partial, rejected, states, pid, nbytes in results:
            self._rejections.update(rejected)
            for cid, st in states.items():
                self.driver_bytes += sum(tensor_bytes(t) for t in st.values())
                self.client_states.put(cid, st)
            if partial is None:
                continue
            self.driver_bytes += partial.nbytes
            self.last_worker_pids.update(dict.fromkeys(partial.client_ids, pid))
            yield partial, nbytes

    def _wait_each(self, ray: ModuleType, pending: list[Any]) -> Iterator[Any]:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield self._get(ray, ready[0])

    def take_rejections(self) -> dict[str, str]:
        out, self._rejections = self._rejections, {}
        return out

    def _drain(self, ray: ModuleType, streams: list[Any]) -> Iterator[Any]:
        """The items of Ray streaming generators: as they arrive, or stream by stream if ``ordered``."""
        if self.ordered:
            for stream in streams:
                for ref in stream:
                    yield self._get(ray, ref)
            return
        pending = list(streams)
        while pending:
            ready, _ = ray.wait(pending, num_returns=1)
            stream = ready[0]
            try:
                ref = next(stream)
            except StopIteration:
                pending.remove(stream)
                continue
            yield self._get(ray, ref)

    def evaluate_clients(
        self, global_vec: torch.Tensor, client_ids: Sequence[str], *, personal: PersonalEval | None = None
    ) -> Iterator[tuple[str, int, dict[str, float]]]:
        ray = self._check_open()
        self._check_clients(client_ids)
        if not client_ids:
            return
        g_ref = ray.put(global_vec.detach().cpu())
        pending = []
        for actor, part in zip(self._actors, shard(list(client_ids), len(self._actors)), strict=False):
            states = {c: dict(s) for c in part if (s := self.client_states.get(c))} if personal is not None else None
            pending.append(actor.evaluate_shard.remote(g_ref, part, personal, states))
        if self.ordered:
            for ref in pending:
                yield from self._get(ray, ref)
            return
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield from self._get(ray, ready[0])

    def close(self) -> None:
        """Kill the actors; shut Ray down if this engine started it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            import ray
        except ImportError:
            return
        if ray.is_initialized():
            for actor in self._actors:
                try:
                    ray.kill(actor)
                except Exception as exc:  # noqa: BLE001 - an actor already gone is fine
                    log.debug("ray.kill failed: %s", exc)
        self._actors = []
        self._dataset_ref = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False
