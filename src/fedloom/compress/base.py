"""The shared half of every compression stage: split trainable / buffers, validate, decode.

A subclass implements three things on the trainable part of the vector, P entries:
``_encode(rows (k, P), seeds, states) -> (tensors per client, meta)``, ``_layout(P) ->
{name: (dtype, shape)}`` (the exact tensors a payload must hold) and ``_decode(tensors, P)
-> (P,)``. Everything else — the buffers travelling exactly, the check of a payload's codec,
meta, tensor names, dtypes and shapes before anything is decoded, and the same code for the
broadcast model — is here, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import ClassVar

import torch

from fedloom.core.errors import InvalidUpdateError, PayloadError, StrategyError
from fedloom.core.types import ClientUpdate, JSONScalar, Payload
from fedloom.pipeline.base import ClientBatch, Stage, StageContext

__all__ = ["BUFFERS", "EncodingStage"]

BUFFERS = "buffers"
"""Payload tensor holding the non-trainable entries, exactly."""


class _PayloadError(Exception):
    """A payload does not match the codec; the message says how."""


class EncodingStage(Stage):
    """A stage whose client half turns dense deltas into payloads of codec :attr:`codec`."""

    supports_broadcast: ClassVar[bool] = True
    variable: ClassVar[frozenset[str]] = frozenset()
    """Payload tensors whose length depends on the data (a sparse codec's values): the layout
    check requires only their dtype and one dimension; ``_decode`` checks their length."""

    @property
    def codec(self) -> str:
        return self.name

    # ---------------------------------------------------------- subclass hooks
    def _meta(self, p: int) -> dict[str, JSONScalar]:
        """The metadata every payload of this stage carries for a vector of P trainable entries."""
        return {}

    def _layout(self, p: int, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        raise NotImplementedError

    def _encode(
        self, rows: torch.Tensor, seeds: list[int], states: list[dict[str, torch.Tensor]] | None
    ) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _decode(self, tensors: Mapping[str, torch.Tensor], p: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ halves
    def client(self, batch: ClientBatch, ctx: StageContext) -> None:
        if batch.deltas is None:
            raise StrategyError(f"stage {self.name!r}: the update is already encoded")
        mask = ctx.trainable.to(batch.deltas.device)
        rows, bufs = batch.deltas[:, mask], batch.deltas[:, ~mask]
        parts = self._encode(rows, batch.seeds, batch.states)
        meta = self._meta(rows.shape[1])
        batch.payloads = [
            Payload(self.codec, {**{k: v.cpu() for k, v in part.items()}, BUFFERS: bufs[i].cpu().clone()}, meta)
            for i, part in enumerate(parts)
        ]
        batch.deltas = None

    def server(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        if update.payload is None:
            raise self.reject(update, f"expected a payload of codec {self.codec!r}, got a dense delta")
        try:
            vec = self.decode_vector(update.payload, ctx)
        except _PayloadError as exc:
            raise self.reject(update, str(exc)) from None
        return replace(update, delta=vec, payload=None)

    # ---------------------------------------------------------------- payloads
    def decode_vector(self, payload: Payload, ctx: StageContext) -> torch.Tensor:
        """The full flat vector a payload encodes; :class:`_PayloadError` if it does not fit."""
        mask = ctx.trainable
        p = int(mask.sum())
        if payload.codec != self.codec:
            raise _PayloadError(f"payload codec is {payload.codec!r}, expected {self.codec!r}")
        want_meta = self._meta(p)
        if dict(payload.meta) != want_meta:
            raise _PayloadError(f"payload meta {dict(payload.meta)!r} does not match the codec's {want_meta!r}")
        layout = self._layout(p, ctx.dtype)
        layout[BUFFERS] = (ctx.dtype, (ctx.spec.numel - p,))
        names = set(payload.tensors)
        if names != set(layout):
            missing, extra = sorted(set(layout) - names), sorted(names - set(layout))
            raise _PayloadError(f"payload tensors differ from the codec's: missing {missing}, unexpected {extra}")
        for name, (dtype, shape) in layout.items():
            t = payload.tensors[name]
            if not isinstance(t, torch.Tensor):
                raise _PayloadError(f"payload[{name!r}] is not a tensor")
            if name in self.variable and t.dtype == dtype and t.dim() == 1 and t.numel() <= p:
                continue
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise _PayloadError(
                    f"payload[{name!r}] is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} (truncated or mis-sized?)"
                )
        try:
            trainable = self._decode(payload.tensors, p, ctx.dtype)
        except InvalidUpdateError as exc:
            raise _PayloadError(exc.reason) from None
        vec = torch.empty(ctx.spec.numel, dtype=ctx.dtype)
        vec[mask] = trainable.to(ctx.dtype)
        vec[~mask] = payload.tensors[BUFFERS]
        return vec

    def encode_model(self, params: torch.Tensor, ctx: StageContext, seed: int) -> Payload:
        """The global model encoded for the broadcast (one row, seeded by ``seed``)."""
        if not self.supports_broadcast:
            raise StrategyError(f"stage {self.name!r} cannot encode the broadcast model")
        mask = ctx.trainable.to(params.device)
        part = self._encode(params[mask].unsqueeze(0), [seed], None)[0]
        tensors = {**{k: v.cpu() for k, v in part.items()}, BUFFERS: params[~mask].cpu().clone()}
        return Payload(self.codec, tensors, self._meta(int(mask.sum())))

    def decode_model(self, payload: Payload, ctx: StageContext) -> torch.Tensor:
        """The broadcast model as clients receive it (raises :class:`PayloadError` if malformed)."""
        try:
            return self.decode_vector(payload, ctx)
        except _PayloadError as exc:
            raise PayloadError(f"broadcast stage {self.name!r}: {exc}") from None


def check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise InvalidUpdateError(f"{what} contains NaN or Inf")

