"""Gradient transforms: the algorithm-specific part of a local step, written once.

A transform edits the gradients between backward and the optimizer step. It is applied by
both backends of local training — :func:`fedloom.client.training.train_local` (one client,
tensors shaped like the parameters) and the vectorized engine's lockstep program (k clients,
the same tensors stacked as ``(k, *shape)``) — with the same code: :meth:`apply` uses only
elementwise operations, and the vectors it reads come laid out like the parameters (for one
client) or stacked like them (for a chunk; a vector in :attr:`shared` is the same for every
client and broadcasts as ``(1, *shape)``).

* :class:`Proximal` — FedProx (Li et al. 2020): ``g += mu · (w − w_global)``, the gradient of
  ``(mu/2)·||w − w_global||²``.
* :class:`ScaffoldCorrection` — SCAFFOLD (Karimireddy et al. 2020, option II): ``g += c − c_i``;
  after K steps at learning rate η the client sets ``c_i⁺ = c_i − c + (x − y_i)/(K·η)``, sends
  ``extras["control_delta"] = c_i⁺ − c_i`` and keeps ``c_i⁺`` as client state.

* :class:`DynamicRegularization` — FedDyn (Acar et al. 2021): ``g += α · (w − w_global) − g_i``,
  the gradient of ``−⟨g_i, w⟩ + (α/2)·||w − w_global||²``; after training the client sets
  ``g_i ← g_i − α · (w − w_global)`` (the delta) and keeps it as client state
  (:data:`FEDDYN_GRAD`); nothing extra travels up.

* :class:`PruneMask` — magnitude pruning (:mod:`fedloom.cutting.magnitude`): ``g *= m`` and,
  after the optimizer step, ``w *= m`` (so momentum, weight decay or Adam cannot move a pruned
  weight: it stays exactly zero).

* :class:`PersonalLayers` — FedPer (Arivazhagan et al. 2019): the parameters named by
  ``layers`` never leave the client. Training starts from the global vector with those entries
  replaced by the client's own (:meth:`GradientTransform.start`); afterwards the client keeps
  its new values as client state (:data:`PERSONAL_PARAMS`) and sends zeros in their place, so
  the server's average never moves them.

* :class:`DittoPersonal` — Ditto (Li et al. 2021): the transform of the *personal* local run
  (``ClientInstruction.personal``) that follows the usual one. It starts from the client's
  personal model v_k (client state :data:`DITTO_MODEL`; the global model the first time), adds
  ``lam · (v − w)`` to each gradient (the pull toward the global model w), and keeps the
  result as the new v_k; that run's update is never sent.

``start`` is the hook for transforms that change where local training starts (personal
layers); ``after_step`` is the hook for transforms that act on the parameters after the optimizer
(the pruning mask). Sample-level DP-SGD is not a
transform: it changes how each backend computes the gradient (:mod:`fedloom.client.dpsgd`),
and the transforms then edit the privatized gradient (post-processing). An instruction names its
transforms as recipes (:class:`~fedloom.core.types.ComponentSpec`); :func:`build_transforms`
makes them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedloom.core.bits import packed_len, unpack
from fedloom.core.errors import ConfigError
from fedloom.core.keys import (
    CLIENT_CONTROL,
    CONTROL_DELTA,
    DITTO,
    DITTO_MODEL,
    FEDDYN,
    FEDDYN_GRAD,
    PERSONAL,
    PERSONAL_PARAMS,
    PROXIMAL,
    PRUNE,
    PRUNE_MASK,
    SCAFFOLD,
    SERVER_CONTROL,
)
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ComponentSpec

__all__ = [
    "TRANSFORMS",
    "DittoPersonal",
    "DynamicRegularization",
    "GradientTransform",
    "PersonalLayers",
    "Proximal",
    "PruneMask",
    "ScaffoldCorrection",
    "build_transforms",
    "personal_mask",
    "start_vector",
]


Vectors = Mapping[str, torch.Tensor]
Laid = Mapping[str, Sequence[torch.Tensor]]


class GradientTransform:
    """Base of the gradient transforms; subclasses are frozen dataclasses (fields = options)."""

    name: ClassVar[str] = "transform"
    laid_out: ClassVar[tuple[str, ...]] = ()
    """Names of the :meth:`prepare` vectors :meth:`apply` reads, laid out like the parameters."""
    shared: ClassVar[frozenset[str]] = frozenset()
    """Names among :attr:`laid_out` that are the same for every client of a round."""

    def prepare(
        self, spec: ParamSpec, global_vec: torch.Tensor, instruction: ClientInstruction, client_state: Vectors
    ) -> dict[str, torch.Tensor]:
        """Flat full-length vectors this client needs this round (default: none)."""
        return {}

    def start(
        self, spec: ParamSpec, global_vec: torch.Tensor, instruction: ClientInstruction, client_state: Vectors
    ) -> torch.Tensor | None:
        """The vector local training starts from instead of ``global_vec`` (None: the global one).

        The delta is still taken against ``global_vec``.
        """
        return None

    def apply(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], vecs: Laid) -> None:
        """Edit ``grads`` in place (elementwise, so it works stacked and unstacked)."""

    def after_step(self, params: Sequence[torch.Tensor], vecs: Laid) -> None:
        """Edit the parameters in place after the optimizer step (default: nothing)."""

    def finish(
        self,
        spec: ParamSpec,
        instruction: ClientInstruction,
        delta: torch.Tensor,
        num_steps: int,
        vecs: Vectors,
        state: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Extras for the update after training; may update the client ``state`` in place."""
        return {}

    def recipe(self) -> ComponentSpec:
        return ComponentSpec.of(self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Proximal(GradientTransform):
    """FedProx's proximal term with coefficient ``mu`` > 0 (Li et al. 2020)."""

    name: ClassVar[str] = PROXIMAL
    laid_out: ClassVar[tuple[str, ...]] = ("anchor",)
    shared: ClassVar[frozenset[str]] = frozenset({"anchor"})
    mu: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.mu, bool) or not isinstance(self.mu, (int, float)) or not (math.isfinite(self.mu) and self.mu > 0):
            raise ConfigError(f"must be a finite number > 0, got {self.mu!r}", key="mu")

    def prepare(self, spec, global_vec, instruction, client_state):  # type: ignore[no-untyped-def]
        return {"anchor": global_vec}

    def apply(self, params, grads, vecs):  # type: ignore[no-untyped-def]
        diffs = torch._foreach_sub([p.detach() for p in params], list(vecs["anchor"]))
        torch._foreach_add_(list(grads), diffs, alpha=self.mu)


@dataclass(frozen=True)
class ScaffoldCorrection(GradientTransform):
    """SCAFFOLD's control-variate correction and option-II update of c_i (Karimireddy et al. 2020)."""

    name: ClassVar[str] = SCAFFOLD
    laid_out: ClassVar[tuple[str, ...]] = ("correction",)

    def prepare(self, spec, global_vec, instruction, client_state):  # type: ignore[no-untyped-def]
        device = global_vec.device
        try:
            c_server = instruction.payload[SERVER_CONTROL].to(device=device, dtype=global_vec.dtype)
        except KeyError:
            raise ConfigError(f"SCAFFOLD needs the server control variate {SERVER_CONTROL!r} in the payload", key="strategy") from None
        spec.check_vector(c_server)
        prev = client_state.get(CLIENT_CONTROL)
        c_local = torch.zeros_like(global_vec) if prev is None else prev.to(device=device, dtype=global_vec.dtype)
        spec.check_vector(c_local)
        return {"c_server": c_server, "c_local": c_local, "correction": c_server - c_local}

    def apply(self, params, grads, vecs):  # type: ignore[no-untyped-def]
        torch._foreach_add_(list(grads), list(vecs["correction"]))

    def finish(self, spec, instruction, delta, num_steps, vecs, state):  # type: ignore[no-untyped-def]
        mask = spec.trainable_mask(delta.device)
        # c_i+ - c_i = -c + (x - y_i) / (K * lr)  on trainable entries, 0 on buffers.
        c_delta = torch.where(
            mask, -vecs["c_server"] - delta / (num_steps * instruction.train.lr), torch.zeros_like(delta)
        )
        state[CLIENT_CONTROL] = vecs["c_local"] + c_delta
        return {CONTROL_DELTA: c_delta}


@dataclass(frozen=True)
class PruneMask(GradientTransform):
    """Keep pruned weights at exactly zero: mask the gradients, and the weights after each step."""

    name: ClassVar[str] = PRUNE
    laid_out: ClassVar[tuple[str, ...]] = ("mask",)
    shared: ClassVar[frozenset[str]] = frozenset({"mask"})

    def prepare(self, spec, global_vec, instruction, client_state):  # type: ignore[no-untyped-def]
        bits = instruction.payload.get(PRUNE_MASK)
        if bits is None:
            raise ConfigError(f"pruning needs the mask {PRUNE_MASK!r} in the payload", key="pruning")
        if bits.dtype != torch.uint8 or tuple(bits.shape) != (packed_len(spec.numel, 1),):
            raise ConfigError(
                f"payload {PRUNE_MASK!r} is {bits.dtype} {tuple(bits.shape)}, expected uint8 ({packed_len(spec.numel, 1)},)",
                key="pruning",
            )
        keep = unpack(bits.cpu(), 1, spec.numel)
        return {"mask": keep.to(device=global_vec.device, dtype=global_vec.dtype)}

    def apply(self, params, grads, vecs):  # type: ignore[no-untyped-def]
        torch._foreach_mul_(list(grads), list(vecs["mask"]))

    def after_step(self, params, vecs):  # type: ignore[no-untyped-def]
        torch._foreach_mul_([p.data for p in params], list(vecs["mask"]))


@dataclass(frozen=True)
class DynamicRegularization(GradientTransform):
    """FedDyn's linear and quadratic penalty and the update of the client's g_i (Acar et al. 2021).

    ``alpha`` >= 0 (α = 0 with g_i = 0 is plain local training; the FedDyn strategy requires
    α > 0). The client state :data:`FEDDYN_GRAD` (zeros before the client's first round) is
    g_i; buffers are not regularized and their entries of g_i stay zero.
    """

    name: ClassVar[str] = FEDDYN
    laid_out: ClassVar[tuple[str, ...]] = ("anchor", "linear")
    shared: ClassVar[frozenset[str]] = frozenset({"anchor"})
    alpha: float = 0.01

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (math.isfinite(a) and a >= 0):
            raise ConfigError(f"must be a finite number >= 0, got {a!r}", key="alpha")

    def prepare(self, spec, global_vec, instruction, client_state):  # type: ignore[no-untyped-def]
        prev = client_state.get(FEDDYN_GRAD)
        g_i = torch.zeros_like(global_vec) if prev is None else prev.to(device=global_vec.device, dtype=global_vec.dtype)
        spec.check_vector(g_i)
        return {"anchor": global_vec, "linear": g_i}

    def apply(self, params, grads, vecs):  # type: ignore[no-untyped-def]
        diffs = torch._foreach_sub([p.detach() for p in params], list(vecs["anchor"]))
        torch._foreach_add_(list(grads), diffs, alpha=self.alpha)
        torch._foreach_sub_(list(grads), list(vecs["linear"]))

    def finish(self, spec, instruction, delta, num_steps, vecs, state):  # type: ignore[no-untyped-def]
        g_i = vecs["linear"]
        # g_i <- g_i - alpha * (theta_i - theta_global) on trainable entries; buffers keep 0.
        state[FEDDYN_GRAD] = torch.where(spec.trainable_mask(delta.device), g_i - self.alpha * delta, g_i)
        return {}


@functools.lru_cache(maxsize=32)
def personal_mask(spec: ParamSpec, layers: str) -> torch.Tensor:
    """Boolean mask (numel,) of the entries of the parameters whose names start with one of ``layers``
    (comma-separated prefixes); a prefix that names nothing is a keyed :class:`ConfigError`."""
    prefixes = [p.strip() for p in layers.split(",") if p.strip()]
    if not prefixes:
        raise ConfigError("names no layer", key="personalization.layers")
    mask = torch.zeros(spec.numel, dtype=torch.bool)
    for prefix in prefixes:
        hits = [e for e in spec.entries if e.trainable and (e.name == prefix or e.name.startswith(prefix + "."))]
        if not hits:
            names = sorted({e.name.rsplit(".", 1)[0] for e in spec.entries if e.trainable})
            raise ConfigError(f"the model has no parameters under {prefix!r}; its layers: {names}", key="personalization.layers")
        for e in hits:
            mask[e.offset : e.stop] = True
    return mask


@dataclass(frozen=True)
class PersonalLayers(GradientTransform):
    """Personal layers (FedPer): ``layers`` (comma-separated name prefixes) stay on the client."""

    name: ClassVar[str] = PERSONAL
    layers: str = ""

    def start(self, spec, global_vec, instruction, client_state):  # type: ignore[no-untyped-def]
        own = client_state.get(PERSONAL_PARAMS)
        if own is None:  # first round: the global (initial) values
            return None
        mask = personal_mask(spec, self.layers).to(global_vec.device)
        v = global_vec.clone()
        v[mask] = own.to(device=v.device, dtype=v.dtype)
        return v

    def prepare(self, spec, global_vec, instruction, client_state):  # type: ignore[no-untyped-def]
        return {"global_personal": global_vec[personal_mask(spec, self.layers).to(global_vec.device)]}

    def finish(self, spec, instruction, delta, num_steps, vecs, state):  # type: ignore[no-untyped-def]
        mask = personal_mask(spec, self.layers).to(delta.device)
        state[PERSONAL_PARAMS] = (vecs["global_personal"] + delta[mask]).detach().clone()
        delta[mask] = 0  # in place: the engines' delta matrix sees it too
        return {}


@dataclass(frozen=True)
class DittoPersonal(GradientTransform):
    """Ditto's personal run: from v_k, gradients plus ``lam · (v − w_global)``; v_k kept as client state."""

    name: ClassVar[str] = DITTO
    laid_out: ClassVar[tuple[str, ...]] = ("anchor",)
    shared: ClassVar[frozenset[str]] = frozenset({"anchor"})
    lam: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"must be a finite number >= 0, got {self.lam!r}", key="personalization.ditto_lambda")

    def start(self, spec, global_vec, instruction, client_state):  # type: ignore[no-untyped-def]
        own = client_state.get(DITTO_MODEL)
        return None if own is None else own.to(device=global_vec.device, dtype=global_vec.dtype)

    def prepare(self, spec, global_vec, instruction, client_state):  # type: ignore[no-untyped-def]
        return {"anchor": global_vec}

    def apply(self, params, grads, vecs):  # type: ignore[no-untyped-def]
        if self.lam:
            diffs = torch._foreach_sub([p.detach() for p in params], list(vecs["anchor"]))
            torch._foreach_add_(list(grads), diffs, alpha=self.lam)

    def finish(self, spec, instruction, delta, num_steps, vecs, state):  # type: ignore[no-untyped-def]
        state[DITTO_MODEL] = (vecs["anchor"] + delta).detach().clone()  # delta is against the global model
        return {}


def start_vector(
    transforms: Sequence[GradientTransform],
    spec: ParamSpec,
    global_vec: torch.Tensor,
    instruction: ClientInstruction,
    client_state: Vectors,
) -> torch.Tensor:
    """Where this client's local training starts: ``global_vec``, or what a transform's :meth:`~GradientTransform.start` says."""
    start = global_vec
    for t in transforms:
        s = t.start(spec, start, instruction, client_state)
        if s is not None:
            start = s
    return start


TRANSFORMS: dict[str, type[GradientTransform]] = {
    PERSONAL: PersonalLayers,
    DITTO: DittoPersonal,
    PROXIMAL: Proximal,
    SCAFFOLD: ScaffoldCorrection,
    PRUNE: PruneMask,
    FEDDYN: DynamicRegularization,
}
"""Name -> transform class (read-only by convention)."""

_BUILT: dict[ComponentSpec, GradientTransform] = {}


def build_transforms(recipes: Sequence[ComponentSpec]) -> list[GradientTransform]:
    """The transforms an instruction's recipes name, in order (built once per recipe)."""
    out = []
    for r in recipes:
        t = _BUILT.get(r)
        if t is None:
            cls = TRANSFORMS.get(r.name)
            if cls is None:
                raise ConfigError(f"unknown gradient transform {r.name!r}; known: {sorted(TRANSFORMS)}", key="transforms")
            try:
                t = _BUILT[r] = cls(**r.kwargs)
            except TypeError as exc:
                raise ConfigError(f"transform {r.name!r}: {exc}", key="transforms") from None
        out.append(t)
    return out
