"""From the ``[secure]`` config section to a checked :class:`~fedloom.secure.secagg.SecAggConfig`.

Secure aggregation hides every individual update from the server, so everything that needs
to see one is refused here with the reason, before a round runs: robust or contribution
rules (median, trimmed mean, Krum need each update; contribution weighting each norm),
strategies whose updates carry extras (SCAFFOLD's control variates would travel in the
clear), encoding stages (the protocol quantizes and masks the dense delta itself), and
central DP (its server checks each update's clip norm; distributed DP is the private
alternative under SecAgg).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedloom.core.errors import ConfigError
from fedloom.pipeline import Stage
from fedloom.secure.host import DropoutModel
from fedloom.secure.secagg import SecAggConfig
from fedloom.strategies.base import Strategy, SumAggregator

__all__ = ["plan_secure"]


def plan_secure(
    options: Mapping[str, object],
    *,
    strategy: Strategy,
    stages: Sequence[Stage],
    params: torch.Tensor,
    seed: int = 0,
) -> tuple[SecAggConfig, DropoutModel]:
    """The protocol's options and the simulated dropout model; ConfigError (key under ``secure``) if unsound."""
    opts = dict(options)
    dropout = opts.pop("dropout", None) or {}
    protocol = opts.pop("protocol", "secagg")
    if protocol not in ("secagg", "secagg+"):
        raise ConfigError(f"must be 'secagg' or 'secagg+', got {protocol!r}", key="secure.protocol")
    try:
        cfg = SecAggConfig(graph="complete" if protocol == "secagg" else "sparse", **opts)  # type: ignore[arg-type]
        drops = DropoutModel(rates=dict(dropout), seed=seed)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(exc.detail, key=f"secure.{exc.key}" if exc.key else "secure") from None
    except TypeError as exc:
        raise ConfigError(str(exc), key="secure") from None
    who = f"strategy {strategy.name!r}"
    if strategy.update_extras:
        raise ConfigError(f"{who} sends {list(strategy.update_extras)} with each update, which secure aggregation does not hide", key="secure")
    agg = strategy.aggregator(strategy.init(params), 1)
    if type(agg) is not SumAggregator:
        raise ConfigError(
            f"{who} aggregates with {type(agg).__name__}, which needs every individual update; "
            "secure aggregation gives the server only their sum",
            key="secure",
        )
    for st in stages:
        if getattr(st, "codec", None) is not None:
            raise ConfigError(f"stage {st.name!r} encodes the update; secure aggregation quantizes and masks it itself", key="secure")
        if st.name == "dp_central":
            raise ConfigError(
                "central DP checks each update's clip norm on the server, which secure aggregation hides; "
                "use local or sample-level DP with it",
                key="secure",
            )
    return cfg, drops
