"""What a person reads after each round and at the end of a run, within 80 columns.

The per-round line and the final table show the metrics that matter first — the task's
headline test metric, the privacy ε, the sparsity of a pruned model, the simulated clock and mean staleness of asynchronous runs, the other test metrics, the training loss, federated evaluation — under short
names (``acc`` for ``test_accuracy``, ``ε`` for ``dp_epsilon``), and as many as fit the
terminal's width; the rest are named in one line below the table (all of them are in
``history.json`` and ``metrics.png``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.table import Table

from fedloom.core.history import History, RoundRecord

__all__ = ["client_table", "fmt", "ordered_metrics", "round_line", "round_table", "short_name"]

_SHORT = {
    "accuracy": "acc",
    "loss": "loss",
    "mae": "mae",
    "rmse": "rmse",
    "auprc": "auprc",
    "auroc": "auroc",
    "f1": "f1",
}
_FIXED = {"sparsity": "sparse", "dp_epsilon": "ε", "dp_epsilon_round": "ε/round", "dp_clip_norm": "clip C", "dp_unclipped": "unclipped", "train_loss": "train loss", "clock_s": "clock s", "staleness_mean": "stale"}


def fmt(v: float) -> str:
    """A metric value in at most 8 characters."""
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    a = abs(v)
    if a != 0.0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    return f"{v:.4f}" if a < 1000 else f"{v:.1f}"


def short_name(metric: str) -> str:
    """``test_accuracy`` -> ``acc``, ``fed_mae`` -> ``fed mae``, ``dp_epsilon`` -> ``ε``."""
    if metric in _FIXED:
        return _FIXED[metric]
    for prefix, shown in (("test_", ""), ("fed_", "fed "), ("pers_", "pers "), ("train_", "train ")):
        if metric.startswith(prefix):
            rest = metric[len(prefix) :]
            return shown + _SHORT.get(rest, rest)
    return metric


def ordered_metrics(names: Sequence[str], headline: Sequence[str]) -> list[str]:
    """``names`` by importance: the headline test metric, ε, the pruned sparsity, the other test metrics, training loss, federated ones, the rest."""
    heads = [f"test_{m}" for m in headline]
    first = [*heads[:1], "dp_epsilon", "sparsity", "clock_s", "staleness_mean", *heads[1:], "train_loss", *(f"{p}_{m}" for m in headline for p in ("fed", "pers"))]
    rank = {n: i for i, n in enumerate(first)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), list(names).index(n)))


def round_line(rec: RoundRecord, headline: Sequence[str], width: int = 80) -> str:
    """One round as one line of at most ``width`` characters."""
    head = f"round {rec.round:4d} {len(rec.clients):4d} cl {rec.seconds:6.2f} s"
    tail = f" rej {len(rec.rejected)}" if rec.rejected else ""
    if rec.status != "ok":
        tail += f" {rec.status}"
    parts = []
    used = len(head) + len(tail)
    for n in ordered_metrics(list(rec.metrics), headline):
        item = f" {short_name(n)} {fmt(rec.metrics[n])}"
        if used + len(item) > width:
            break
        parts.append(item)
        used += len(item)
    return head + "".join(parts) + tail


def round_table(history: History, headline: Sequence[str], *, title: str, width: int = 80, max_rows: int = 25) -> tuple[Table, list[str]]:
    """The per-round table with the columns that fit ``width``, and the names of those left out."""
    names = ordered_metrics(history.metric_names(), headline)
    step = max(1, math.ceil(len(history) / max_rows))
    rows = [rec for i, rec in enumerate(history) if i % step == 0 or i == len(history) - 1]

    def col_width(header: str, cells: list[str]) -> int:
        return max([len(header), *map(len, cells)]) + 3  # padding and the separator

    fixed = [("round", [str(r.round) for r in rows]), ("cl", [str(len(r.clients)) for r in rows])]
    fixed.append(("MB down/up", [f"{r.bytes_down / 1e6:.1f}/{r.bytes_up / 1e6:.1f}" for r in rows]))
    used = 1 + sum(col_width(h, c) for h, c in fixed)
    shown: list[str] = []
    for n in names:
        cells = [fmt(r.metrics[n]) if n in r.metrics else "" for r in rows]
        w = col_width(short_name(n), cells)
        if used + w > width:
            continue
        shown.append(n)
        used += w
    table = Table(title=title)
    table.add_column("round", justify="right")
    table.add_column("cl", justify="right")
    for n in shown:
        table.add_column(short_name(n), justify="right")
    table.add_column("MB down/up", justify="right")
    for r in rows:
        table.add_row(
            str(r.round),
            str(len(r.clients)),
            *[fmt(r.metrics[n]) if n in r.metrics else "" for n in shown],
            f"{r.bytes_down / 1e6:.1f}/{r.bytes_up / 1e6:.1f}",
        )
    return table, [n for n in names if n not in shown]


def client_table(history: History, headline: Sequence[str], *, width: int = 80, max_rows: int = 30) -> Table | None:
    """Each client's own evaluation in the last round that has one: the global model (``fed``)
    and its personalized model (``pers``) on the client's test split, for the headline metrics
    that fit ``width``; None when no round evaluated per client."""
    rec = next((r for r in reversed(history.records) if r.client_metrics), None)
    if rec is None:
        return None
    names = sorted({k for m in rec.client_metrics.values() for k in m})
    pairs = [m for m in headline if f"fed_{m}" in names or f"pers_{m}" in names]
    cols: list[str] = []
    used = max(len("client"), *(len(c) for c in rec.client_metrics)) + 4
    for m in pairs:
        for n in (f"fed_{m}", f"pers_{m}"):
            if n in names and used + 12 <= width:
                cols.append(n)
                used += 12
    table = Table(title=f"round {rec.round}, each client's test split: fed = global, pers = its own model")
    table.add_column("client")
    for n in cols:
        table.add_column(short_name(n), justify="right")
    clients = sorted(rec.client_metrics)
    for cid in clients[:max_rows]:
        m = rec.client_metrics[cid]
        table.add_row(cid, *[fmt(m[n]) if n in m else "" for n in cols])
    if len(clients) > max_rows:
        table.add_row(f"... {len(clients) - max_rows} more in history.json", *[""] * len(cols))
    return table
