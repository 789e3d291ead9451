"""From the ``[secure]`` config section to a checked SecAgg or CKKS configuration.

Secure aggregation hides every individual update from the server, so everything that needs
to see one is refused here (for SecAgg and CKKS alike) with the reason, before a round runs: robust or contribution
rules (median, trimmed mean, Krum need each update; contribution weighting each norm),
strategies whose updates carry extras (SCAFFOLD's control variates would travel in the
clear), encoding stages (the protocol quantizes and masks the dense delta itself), and
central DP (its server checks each update's clip norm; distributed DP is the private
alternative under SecAgg: its stage's Skellam encoding then replaces the levels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from fedloom.core.errors import ConfigError
from fedloom.pipeline import Stage
from fedloom.secure.host import PROTOCOLS, DropoutModel, SecureConfig
from fedloom.strategies.base import Strategy, SumAggregator

__all__ = ["plan_secure"]


def plan_secure(
    options: Mapping[str, object],
    *,
    strategy: Strategy,
    stages: Sequence[Stage],
    params: torch.Tensor,
    seed: int = 0,
) -> tuple[SecureConfig, DropoutModel]:
    """The protocol's options and the simulated dropout model; ConfigError (key under ``secure``) if unsound."""
    opts = dict(options)
    dropout = opts.pop("dropout", None) or {}
    protocol = opts.pop("protocol", "secagg")
    if protocol not in ("secagg", "secagg+", "ckks"):
        raise ConfigError(f"must be 'secagg', 'secagg+' or 'ckks', got {protocol!r}", key="secure.protocol")
    only = ("poly_modulus_degree",) if protocol != "ckks" else ("threshold", "neighbours", "modulus_bits")
    for k in only:
        if opts.get(k) is not None:
            raise ConfigError(f"is not an option of protocol {protocol!r}", key=f"secure.{k}")
        opts.pop(k, None)
    try:
        cfg: SecureConfig
        if protocol == "ckks":
            from fedloom.secure.ckks import CkksConfig

            cfg = CkksConfig(**opts)  # type: ignore[arg-type]
            stage_names = PROTOCOLS["ckks"][2]
        else:
            from fedloom.secure.secagg import SecAggConfig

            cfg = SecAggConfig(graph="complete" if protocol == "secagg" else "sparse", **opts)  # type: ignore[arg-type]
            stage_names = PROTOCOLS["secagg"][2]
        drops = DropoutModel(rates=dict(dropout), seed=seed, stages=stage_names)  # type: ignore[arg-type]
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
    dp = [st for st in stages if st.name == "dp_distributed"]
    if dp:  # distributed DP: its encoding (L2 clip, integer grid, Skellam noise share) replaces the levels
        cfg = replace(cfg, encoding=dp[0].encoding(params.numel()))  # type: ignore[attr-defined, type-var]
    return cfg, drops
