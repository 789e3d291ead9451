"""The data a deployed client trains on: ``--data FILE.npz`` or ``--data CONFIG.toml``.

A real site passes its own ``.npz`` file (:func:`fedloom.data.local.load_npz`). For demos
and tests, a run config names a generated or bundled dataset, and the client takes the
partition named by its id (``--partition`` to choose another): the same split the
simulation of that config gives that client, so deployment and simulation can be compared.
"""

from __future__ import annotations

from pathlib import Path

from fedloom.core.config import load_config
from fedloom.core.errors import DataError
from fedloom.data.base import ClientData
from fedloom.data.local import load_npz
from fedloom.data.registry import load_dataset

__all__ = ["load_site_data"]


def load_site_data(spec: str, partition: str) -> ClientData:
    """Load this site's data from ``spec`` (see the module docstring)."""
    path = Path(spec)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.suffix == ".toml":
        cfg = load_config(path)
        dataset = load_dataset(cfg.data.name, seed=cfg.run.seed, **cfg.data.options())
        try:
            return dataset.clients[partition]
        except KeyError:
            ids = dataset.client_ids
            shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
            raise DataError(f"{path} has no client partition {partition!r}; it has {shown}") from None
    raise DataError(f"--data must be a .npz file or a .toml run config, got {spec!r}")
