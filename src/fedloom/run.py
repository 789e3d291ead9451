"""Turn a validated :class:`~fedloom.core.config.RunConfig` into a ready :class:`Run`.

This is the one place that wires dataset, model, strategy, engine, store and evaluation
together, for the CLI, the demo, the benchmarks and the Python API alike (an app: layer 1 of
DESIGN.md). The deployment side (``engine="remote"``) is imported only when asked for, so a
simulation imports no gRPC.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedloom.client.evaluate import evaluate_vector
from fedloom.client.transforms import personal_mask
from fedloom.core.config import RunConfig
from fedloom.core.errors import ConfigError, DataError
from fedloom.core.keys import DITTO, PERSONAL
from fedloom.core.params import ParamSpec
from fedloom.core.seeding import derive_seed
from fedloom.core.types import ComponentSpec, PersonalEval, TrainConfig
from fedloom.cutting.magnitude import MagnitudePruner
from fedloom.data.base import FederatedDataset
from fedloom.data.registry import load_dataset
from fedloom.engines.base import Engine
from fedloom.engines.ray import RayEngine
from fedloom.engines.vectorized import local_engine
from fedloom.federation.buffered import BufferPolicy
from fedloom.federation.callbacks import Callback
from fedloom.federation.hierarchy import Hierarchy, edges_of
from fedloom.federation.loop import Federation
from fedloom.federation.timing import LatencyModel
from fedloom.models.registry import build_model
from fedloom.pipeline import Pipeline, build_stage
from fedloom.store import RunHandle, Store
from fedloom.strategies.base import Strategy
from fedloom.strategies.registry import build_strategy

if TYPE_CHECKING:
    from fedloom.privacy.plan import PrivacyPlan

__all__ = ["ENGINES", "Run", "build_engine", "build_hierarchy", "build_loggers", "build_personal", "build_pipeline", "build_pruner", "build_run", "build_schedule", "initial_model"]

ENGINES = ("auto", "sequential", "vectorized", "ray")


@dataclass
class Run:
    """Everything a run needs, built from one config."""

    config: RunConfig
    dataset: FederatedDataset
    model_fn: Callable[[], nn.Module]
    spec: ParamSpec
    strategy: Strategy
    engine: Engine
    federation: Federation
    privacy: PrivacyPlan | None = None

    def global_model(self) -> nn.Module:
        """A fresh module holding the current global parameters."""
        model = self.model_fn()
        self.spec.load_into(model, self.federation.state.params)
        return model


def initial_model(model_fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    """The initial global model: built under a seed derived from the run seed, RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init") % (2**63))
        return model_fn()


def build_engine(
    name: str,
    *,
    model_fn: Callable[[], nn.Module],
    dataset: FederatedDataset,
    spec: ParamSpec,
    device: str,
    chunk_size: int | None = None,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    precision: str = "fp32",
    cuda_graphs: bool = False,
    threads: int | None = None,
) -> Engine:
    """The simulation engine called ``name``.

    ``auto`` picks the fastest that applies: ``vectorized`` when the model can be trained in
    lockstep, else ``sequential`` (decided once, by :func:`~fedloom.engines.vectorized.local_engine`).
    ``chunk_size`` overrides the vectorized engine's automatic chunk size. ``ray`` shards
    cohorts over ``ray_workers`` Ray workers (default: one per CPU) of the cluster at
    ``ray_address`` (default: a local Ray instance started in this process). ``precision``
    and ``cuda_graphs`` are the vectorized engine's (``run.precision``, ``run.cuda_graphs``), as is
    ``threads`` (``run.threads``: chunks trained at once).
    """
    if name in ("auto", "sequential", "vectorized"):
        return local_engine(
            name,  # type: ignore[arg-type]
            model_fn=model_fn,
            dataset=dataset,
            spec=spec,
            device=device,
            chunk_size=chunk_size,
            precision=precision,
            cuda_graphs=cuda_graphs,
            threads=threads,
        )
    if name == "ray":
        return RayEngine(
            model_fn=model_fn,
            dataset=dataset,
            spec=spec,
            device=device,
            chunk_size=chunk_size,
            address=ray_address,
            num_workers=ray_workers,
        )
    raise ConfigError(f"engine {name!r} is not available in simulation; known: {ENGINES}", key="run.engine")


def build_pipeline(cfg: RunConfig) -> Pipeline:
    """The update pipeline of ``[[pipeline]]`` and ``[broadcast]`` (errors name ``pipeline.<i>.<key>``).

    With ``[pruning]`` (and ``send_sparse``), the ``sparse`` codec is added for the uplink when
    no stage encodes updates (and neither local DP nor secure aggregation fills every entry), and for the broadcast
    when none is configured: the pruned weights' zeros are not sent.
    """
    stages = tuple(build_stage(st.name, st.options(), key=f"pipeline.{i}") for i, st in enumerate(cfg.pipeline))
    down = build_stage(cfg.broadcast.name, cfg.broadcast.options(), key="broadcast") if cfg.broadcast else None
    if cfg.pruning is not None and cfg.pruning.send_sparse:
        local_noise = cfg.privacy is not None and cfg.privacy.mode == "local"  # noised deltas have no zeros
        secure = cfg.secure is not None  # secure aggregation masks the dense delta: every entry travels
        if not local_noise and not secure and not any(getattr(st, "codec", None) is not None for st in stages):
            stages = (*stages, build_stage("sparse", {}, key="pruning.send_sparse"))
        if down is None:
            down = build_stage("sparse", {}, key="pruning.send_sparse")
    return Pipeline(stages, broadcast_stage=down)


def build_pruner(cfg: RunConfig) -> MagnitudePruner | None:
    """The ``[pruning]`` table's pruner (None without one)."""
    if cfg.pruning is None:
        return None
    p = cfg.pruning
    return MagnitudePruner(
        sparsity=p.sparsity, start=p.start, end=p.end, every=p.every, scope=p.scope, include_bias=p.include_bias
    )


def build_schedule(cfg: RunConfig, *, remote: bool) -> tuple[BufferPolicy | None, LatencyModel | None]:
    """The ``[buffer]`` closing policy and the ``[latency]`` model (refusing what they cannot run with)."""
    buffer = None
    if cfg.buffer is not None:
        b = cfg.buffer
        if cfg.privacy is not None:
            raise ConfigError(
                "buffered rounds cannot run with [privacy]: the accountant models synchronous rounds of sampled cohorts",
                key="buffer",
            )
        if remote and cfg.deploy.over_selection > 0:
            raise ConfigError("over_selection is the first-m closing policy; remove it for buffered rounds", key="deploy.over_selection")
        buffer = BufferPolicy(
            size=b.size,
            concurrency=b.concurrency if b.concurrency is not None else 3 * b.size,
            max_staleness=b.max_staleness,
            staleness=b.staleness,
            exponent=b.exponent,
            hinge=b.hinge,
        )
    latency = None
    if cfg.latency is not None:
        if remote:
            raise ConfigError("[latency] simulates client latencies; deployed clients take the time they take", key="latency")
        lat = cfg.latency
        latency = LatencyModel(lat.kind, median=lat.median, sigma=lat.sigma, jitter=lat.jitter, speeds=lat.speeds, seed=cfg.run.seed)
    return buffer, latency


def build_personal(cfg: RunConfig, spec: ParamSpec, train: TrainConfig) -> PersonalEval | None:
    """The ``[personalization]`` table: the personal-layer recipe and the personalized evaluation."""
    p = cfg.personalization
    if p is None:
        return None
    transforms: tuple[ComponentSpec, ...] = ()
    if p.layers:
        recipe = ComponentSpec.of(PERSONAL, layers=",".join(p.layers))
        personal_mask(spec, recipe.kwargs["layers"])  # a name the model lacks: a keyed error now, not mid-run
        transforms = (recipe,)
    if p.ditto_lambda is not None:
        transforms = (*transforms, ComponentSpec.of(DITTO, lam=p.ditto_lambda))
    lr = p.finetune_lr if p.finetune_lr is not None else train.lr
    return PersonalEval(steps=p.finetune_steps, train=replace(train, lr=lr), transforms=transforms, seed=derive_seed(cfg.run.seed, "personal"))


def build_hierarchy(cfg: RunConfig, clients: list[str] | None) -> Hierarchy | None:
    """The ``[hierarchy]`` table's edges (``clients``: the simulated population; None in a deployment)."""
    if cfg.hierarchy is None:
        return None
    if cfg.privacy is not None and cfg.hierarchy.kappa > 1:
        raise ConfigError("with [privacy], edges must forward their clients' sums every round: kappa = 1", key="hierarchy.kappa")
    return edges_of(cfg.hierarchy.edges, clients, cfg.hierarchy.kappa)


def build_loggers(cfg: RunConfig) -> list[Callback]:
    """The ``[tracking]`` loggers (TensorBoard, MLflow) as round callbacks."""
    from fedloom.federation.loggers import MLflowLogger, TensorBoardLogger  # their libraries load lazily

    t = cfg.tracking
    out: list[Callback] = []
    if t.tensorboard is not None:
        out.append(TensorBoardLogger(Path(t.tensorboard) / cfg.run.name, config=cfg.identity()))
    if t.mlflow_uri is not None:
        out.append(
            MLflowLogger(tracking_uri=t.mlflow_uri, experiment=t.mlflow_experiment, run_name=cfg.run.name, config=cfg.identity())
        )
    return out


def build_run(cfg: RunConfig, *, engine: str | None = None, fresh: bool = False, edge: str | None = None) -> Run:
    """Build dataset, model, strategy, engine and the :class:`Federation` for ``cfg``.

    Engine ``remote`` starts the gRPC server of ``[deploy]`` and trains on the clients that
    connect to it (``fedloom server``); the dataset is then the server's view
    (``load_dataset(..., server_only=True)``: the task, the server's test split and the client
    ids; the clients' data is loaded only if something reads it, which the server never does). With ``run.store`` set, the run is opened in that :class:`Store` and resumes from its
    latest checkpoint if the store holds it with the same config; ``fresh`` starts it over.
    ``edge`` (with ``engine="remote"``): build edge ``edge``'s side of a hierarchical deployment
    (``fedloom edge``): its server admits only its roster, and its federation only runs
    :meth:`~fedloom.federation.loop.Federation.edge_round`.
    """
    engine_name = engine or cfg.run.engine
    remote = engine_name == "remote"
    try:  # a deployed server trains on its clients' data, not on a copy of its own
        dataset = load_dataset(cfg.data.name, seed=cfg.run.seed, server_only=remote, **cfg.data.options())
    except DataError as exc:
        raise ConfigError(str(exc), key="data") from None
    task = dataset.task

    def model_fn() -> nn.Module:
        return build_model(cfg.model.name, task, **cfg.model.options())

    model = initial_model(model_fn, cfg.run.seed)
    spec = ParamSpec.from_module(model)
    init_vec = spec.module_vector(model)

    train = cfg.client.train_config(task.loss)
    strategy = build_strategy(
        cfg.strategy.name,
        train=train,
        fraction=cfg.strategy.fraction,
        min_clients=cfg.strategy.min_clients,
        seed=cfg.run.seed,
        sampling=cfg.strategy.sampling,
        **cfg.strategy.options(),
    )
    pipeline = build_pipeline(cfg)
    privacy: PrivacyPlan | None = None
    if cfg.privacy is not None:
        from fedloom.privacy.plan import plan_privacy

        privacy = plan_privacy(
            cfg.privacy,
            strategy=strategy,
            train=train,
            user_stages=pipeline.stages,
            rounds=cfg.run.rounds,
            population=None if remote else len(dataset.clients),
            client_examples=None if remote else [len(c.train) for c in dataset.clients.values()],
            deployed=remote,
            run_seed=cfg.run.seed,
            min_updates=cfg.run.min_updates,
            round_retries=cfg.deploy.round_retries if remote else 0,
            over_selection=cfg.deploy.over_selection if remote else 0.0,
            has_buffers=[n for n, _ in model.named_buffers()],
            secure=cfg.secure.protocol if cfg.secure is not None else None,
            cohort=cfg.deploy.min_clients if remote else strategy.sampler.cohort_size(len(dataset.clients)),
            ring_bits=(30 if cfg.secure.protocol == "ckks" else cfg.secure.modulus_bits) if cfg.secure is not None else 32,
            numel=spec.numel,
        )
        strategy = replace(strategy, train=privacy.train)
        pipeline = Pipeline((privacy.stage, *pipeline.stages), broadcast_stage=pipeline.broadcast_stage)
    secure = None
    if cfg.secure is not None:
        from fedloom.secure.plan import plan_secure

        if remote and cfg.secure.dropout:
            raise ConfigError("simulated dropouts are for simulation; deployed clients drop out on their own", key="secure.dropout")
        secure, drops = plan_secure(
            cfg.secure.model_dump(exclude_unset=True), strategy=strategy, stages=pipeline.stages, params=init_vec, seed=cfg.run.seed
        )
    adversary = None
    if cfg.attack is not None:
        from fedloom.attacks import plan_attack

        a = cfg.attack
        adversary, dataset = plan_attack(
            a.name,
            a.options(),
            dataset=dataset,
            fraction=a.fraction,
            clients=a.clients,
            knowledge=a.knowledge,
            seed=cfg.run.seed,
            stages=pipeline.stages,
            secure=cfg.secure is not None,
            remote=remote,
        )
    hierarchy = build_hierarchy(cfg, None if remote else list(dataset.clients))
    roster: frozenset[str] | None = None
    roster_name = "this run"
    if edge is not None:
        if not remote or hierarchy is None or edge not in hierarchy.edges:
            known = sorted(hierarchy.edges) if hierarchy is not None else []
            raise ConfigError(f"{edge!r} is not an edge of [hierarchy] (edges: {known})", key="hierarchy.edges")
        roster, roster_name = frozenset(hierarchy.edges[edge]), f"edge {edge!r}"
    elif remote and hierarchy is not None:
        roster, roster_name = frozenset(hierarchy.edges), "the root (its clients are the edges)"
    if remote:
        from fedloom.server.deploy import run_info, start_remote_engine  # gRPC: only for a deployment

        eng: Engine = start_remote_engine(
            cfg.deploy,
            spec=spec,
            dtype=init_vec.dtype,
            info=run_info(
                cfg.model.name, cfg.model.options(), task,
                max_message_bytes=secure.wire_bytes(spec.numel) if secure is not None else 0,
            ),  # fmt: skip
            roster=roster,
            roster_name=roster_name,
        )
    else:
        eng = build_engine(
            engine_name,
            model_fn=model_fn,
            dataset=dataset,
            spec=spec,
            device=cfg.run.device,
            chunk_size=cfg.run.chunk_size,
            ray_address=cfg.run.ray_address,
            ray_workers=cfg.run.ray_workers,
            precision=cfg.run.precision,
            cuda_graphs=cfg.run.cuda_graphs,
            threads=cfg.run.threads,
        )
        if secure is not None:
            eng.protocol_clients.drop = drops

    evaluator = None
    if dataset.server_test is not None:
        eval_model = model_fn()
        test = dataset.server_test

        def evaluator(vec: torch.Tensor) -> dict[str, float]:
            return evaluate_vector(eval_model, spec, vec.cpu(), test, task)

    buffer, latency = build_schedule(cfg, remote=remote)
    personal = build_personal(cfg, spec, strategy.train)
    store: Store | None = None
    handle: RunHandle | None = None
    if cfg.run.store is not None:
        store = Store.open(cfg.run.store, keep_checkpoints=cfg.run.keep_checkpoints)
        handle = store.start_or_resume_run(cfg.run.name, cfg.identity(), fresh=fresh)
    federation = Federation(
        strategy=strategy,
        engine=eng,
        spec=spec,
        initial=init_vec,
        evaluate=evaluator,
        eval_every=cfg.run.eval_every,
        federated_eval_every=cfg.run.federated_eval_every,
        min_updates=cfg.run.min_updates,
        store=store,
        run_handle=handle,
        checkpoint_every=cfg.run.checkpoint_every,
        over_selection=cfg.deploy.over_selection if remote else 0.0,
        round_retries=cfg.deploy.round_retries if remote else 0,
        pipeline=pipeline,
        pruner=build_pruner(cfg),
        callbacks=build_loggers(cfg),
        secure=secure,
        adversary=adversary,
        buffer=buffer,
        latency=latency,
        hierarchy=hierarchy,
        personal=personal,
        personal_eval_every=cfg.personalization.eval_every if cfg.personalization is not None else 0,
    )
    return Run(cfg, dataset, model_fn, spec, strategy, eng, federation, privacy)
