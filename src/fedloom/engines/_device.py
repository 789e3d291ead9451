"""Device support of the vectorized engine: precision modes, resident data, chunk sizing, CUDA graphs.

* :func:`check_precision` / :func:`precision_scope`: ``run.precision``. ``fp32`` — IEEE
  float32 everywhere (on CUDA the engine's matmuls and convolutions are held to IEEE
  float32 while it trains: torch's default lets cuDNN convolutions use TF32). ``tf32`` — on
  CUDA, float32 matmuls and convolutions run on TF32 tensor cores (10-bit mantissa
  products, float32 accumulation); on CPU the same as ``fp32``. ``bf16`` — the lockstep
  forward pass runs under ``torch.autocast(device_type, dtype=torch.bfloat16)``; the
  backward pass runs outside autocast, in the dtypes the forward chose; the loss, the
  master weights (the clients' stacked parameters), their gradients, the optimizer and
  the gradient transforms stay float32. The TF32 switches are process-wide: they are set
  while at least one engine step runs (reference-counted, so engine threads nest) and
  restored after the last one.
* :class:`ResidentData`: a dataset's training samples moved to the device ONCE — one
  concatenated ``x`` / ``y`` plus each client's offset — which chunks index instead of
  concatenating their clients' splits per chunk.
* :func:`chunk_size_from_free`: on CUDA, with no ``chunk_size`` / ``memory_budget_bytes``
  set, clients per chunk from the free device memory (:func:`cuda_free_bytes`, injectable).
* :class:`GraphedStep`: CUDA-graph capture and replay of a step function whose shapes
  repeat. The captured callable is the very function the eager loop calls; on CPU (and
  in tests) an eager "graph" backend replays by calling it, exercising the same static
  input buffers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from fedloom.core.errors import ConfigError
from fedloom.data.base import FederatedDataset

__all__ = [
    "DEVICE_MEMORY_FRACTION",
    "PRECISIONS",
    "CudaGraphBackend",
    "EagerGraphBackend",
    "FreeBytesFn",
    "GraphBackend",
    "GraphedStep",
    "Precision",
    "ResidentData",
    "autocast_dtype",
    "check_precision",
    "chunk_size_from_free",
    "cuda_free_bytes",
    "precision_scope",
]

log = logging.getLogger("fedloom.engines.vectorized")

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")

DEVICE_MEMORY_FRACTION = 0.5
"""Share of the free device memory a chunk's estimated working set may take (the rest: the
allocator's slack, autograd's saved tensors beyond the estimate, other work on the GPU)."""

FreeBytesFn = Callable[[torch.device], int]


def check_precision(value: object) -> str:
    """``value`` if it is a known precision mode, else a :class:`ConfigError` naming ``run.precision``."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ConfigError(f"unknown precision {value!r}; known: {', '.join(PRECISIONS)}", key="run.precision")
    return value


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype of the autocast region the caller is in on ``device_type``, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


# ----------------------------------------------------------------- TF32 switches
_tf32_lock = threading.Lock()
_tf32_users = 0
_tf32_saved: tuple[object, object] | None = None


def _tf32_get() -> tuple[object, object]:
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision") and hasattr(c, "conv") and hasattr(c.conv, "fp32_precision"):
        return m.fp32_precision, c.conv.fp32_precision
    return m.allow_tf32, c.allow_tf32


def _tf32_set(values: tuple[object, object]) -> None:
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision") and hasattr(c, "conv") and hasattr(c.conv, "fp32_precision"):
        m.fp32_precision, c.conv.fp32_precision = values  # type: ignore[assignment]
    else:
        m.allow_tf32, c.allow_tf32 = values  # type: ignore[assignment]


def _tf32_values(on: bool) -> tuple[object, object]:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        mode = "tf32" if on else "ieee"
        return mode, mode
    return on, on


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    """Hold the CUDA TF32 switches at ``on`` while inside (reference-counted across threads)."""
    global _tf32_users, _tf32_saved
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_saved = _tf32_get()
        _tf32_users += 1
        _tf32_set(_tf32_values(on))  # engines of different modes in parallel threads: the last to enter wins
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users -= 1
            if _tf32_users == 0 and _tf32_saved is not None:
                _tf32_set(_tf32_saved)
                _tf32_saved = None


def precision_scope(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The TF32 switches of ``precision`` for the engine's work on ``device`` (a no-op off CUDA)."""
    if device.type != "cuda" or precision == "bf16":
        return contextlib.nullcontext()
    return _tf32(precision == "tf32")


def autocast_scope(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The autocast region of one lockstep forward pass: bfloat16 under ``bf16``, else nothing.

    The cast cache is off: weights change every step, and the step may be captured in a CUDA graph.
    """
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)  # type: ignore[return-value]


# ----------------------------------------------------------------- resident data
@dataclass(frozen=True)
class ResidentData:
    """All clients' training samples on the device: ``x`` / ``y`` concatenated in client order.

    Client ``cid``'s samples are rows ``[offsets[cid], offsets[cid] + sizes[cid])``, in its
    split's order, so a chunk's batch of local indices ``i`` is ``x[offsets[cid] + i]``.
    """

    x: torch.Tensor
    y: torch.Tensor
    offsets: dict[str, int]
    sizes: dict[str, int]

    @classmethod
    def build(cls, dataset: FederatedDataset, device: torch.device) -> ResidentData:
        """One copy of ``dataset``'s train splits on ``device`` (one host concatenation, one transfer)."""
        offsets: dict[str, int] = {}
        sizes: dict[str, int] = {}
        xs, ys = [], []
        at = 0
        for cid, client in dataset.clients.items():
            split = client.train
            offsets[cid], sizes[cid] = at, len(split)
            at += len(split)
            xs.append(split.x)
            ys.append(split.y)
        x = torch.cat(xs) if xs else torch.empty(0)
        y = torch.cat(ys) if ys else torch.empty(0)
        if device.type != "cpu":
            x, y = x.to(device), y.to(device)
        return cls(x=x, y=y, offsets=offsets, sizes=sizes)

    @property
    def nbytes(self) -> int:
        """Bytes of the resident copy."""
        return self.x.numel() * self.x.element_size() + self.y.numel() * self.y.element_size()


# ----------------------------------------------------------------- chunk sizing
def cuda_free_bytes(device: torch.device) -> int:
    """Free bytes on a CUDA ``device``: the driver's free memory plus what torch's allocator holds unused."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


def chunk_size_from_free(free_bytes: int, per_client_bytes: int, fraction: float = DEVICE_MEMORY_FRACTION) -> int:
    """Clients whose working sets (``per_client_bytes`` each) fit ``fraction`` of ``free_bytes`` (at least 1)."""
    if per_client_bytes < 1:
        raise ValueError(f"per_client_bytes must be >= 1, got {per_client_bytes}")
    return max(1, int(free_bytes * fraction) // per_client_bytes)


# ----------------------------------------------------------------- CUDA graphs
class GraphBackend(Protocol):
    """Captures a zero-argument function into something that replays it."""

    def warmup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once for real before capture (lazy initialization, kernel selection)."""

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record ``fn`` (without running it) and return the replay; raises when capture fails."""


class EagerGraphBackend:
    """The CPU stand-in: warm-up runs ``fn``, "capture" records nothing and replay calls ``fn``."""

    def warmup(self, fn: Callable[[], None]) -> None:
        fn()

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        return fn


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph``: warm-up on a side stream, capture, ``replay``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def warmup(self, fn: Callable[[], None]) -> None:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            fn()
        return graph.replay


class GraphedStep:
    """A step ``fn(index, counts)`` run through static input buffers and replayed from one capture.

    ``index`` (a step's padded sample indices, fixed shape) and ``counts`` are copied into
    static buffers; the first ``warmup`` calls run ``fn`` on them for real through the
    backend's warm-up, the next one captures ``fn`` and replays it, later calls replay.
    Should capture fail, :attr:`failed` holds the reason and every later call runs ``fn``
    eagerly (the step that failed runs eagerly too, so no step is lost).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], None],
        index: torch.Tensor,
        counts: torch.Tensor,
        backend: GraphBackend,
        warmup: int = 2,
    ) -> None:
        self.fn = fn
        self.index = torch.empty_like(index)
        self.counts = torch.empty_like(counts)
        self.backend = backend
        self.warmup = warmup
        self.calls = 0
        self.replays = 0
        self.failed: str | None = None
        self._replay: Callable[[], None] | None = None

    def _static(self) -> None:
        self.fn(self.index, self.counts)

    def __call__(self, index: torch.Tensor, counts: torch.Tensor) -> None:
        if self.failed is not None:
            self.fn(index, counts)
            return
        self.index.copy_(index)
        self.counts.copy_(counts)
        self.calls += 1
        if self._replay is None and self.calls <= self.warmup:
            self.backend.warmup(self._static)
            return
        if self._replay is None:
            try:
                self._replay = self.backend.capture(self._static)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA-graph capture of the lockstep step failed; running it eagerly: %s", self.failed)
                self.fn(index, counts)
                return
        self._replay()
        self.replays += 1
