"""Run outputs: ``history.json``, ``model.safetensors`` and ``metrics.png``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedloom.core.history import History

__all__ = ["load_model_file", "plot_history", "save_model", "write_run_outputs"]


def save_model(model: nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """Save a module's state_dict as safetensors (shared storage is copied apart)."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def load_model_file(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors state_dict written by :func:`save_model` into ``model`` (strict)."""
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def plot_history(history: History, path: str | Path, *, title: str = "") -> None:
    """One panel per metric, value against round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = history.metric_names()
    if not names:
        names = []
    n = max(len(names), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        pts = history.series(name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run_outputs(out: str | Path, *, history: History, model: nn.Module, config: dict, title: str = "") -> Path:
    """Write history.json, model.safetensors, metrics.png and config.json into ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    history.save_json(d / "history.json")
    save_model(model, d / "model.safetensors", metadata={"config": json.dumps(config)})
    plot_history(history, d / "metrics.png", title=title)
    (d / "config.json").write_text(json.dumps(config, indent=1))
    return d


