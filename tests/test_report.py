"""The per-round line and table fit 80 columns and show what matters first."""

from __future__ import annotations

from rich.console import Console

from fedloom.core.history import History, RoundRecord
from fedloom.report import fmt, ordered_metrics, round_line, round_table, short_name


def _rec(rnd: int, metrics: dict[str, float]) -> RoundRecord:
    return RoundRecord(round=rnd, metrics=metrics, clients=["a", "b"], num_examples=10, bytes_down=3_000_000, bytes_up=1_500_000, seconds=1.25)


METRICS = {
    "train_loss": 0.5, "test_auprc": 0.61, "test_recall_at_1fpr": 0.4, "test_loss": 0.2, "dp_epsilon": 3.25,
    "dp_epsilon_round": 0.5, "fed_auprc": 0.6, "fed_recall_at_1fpr": 0.41, "fed_loss": 0.21,
}  # fmt: skip


def test_order_names_and_format() -> None:
    heads = ("auprc", "recall_at_1fpr", "loss")
    order = ordered_metrics(list(METRICS), heads)
    assert order[:5] == ["test_auprc", "dp_epsilon", "test_recall_at_1fpr", "test_loss", "train_loss"]
    assert [short_name(n) for n in ("test_accuracy", "dp_epsilon", "fed_mae", "train_loss")] == ["acc", "ε", "fed mae", "train loss"]
    assert fmt(0.98765) == "0.9877" and fmt(12345.6) == "12345.6" and fmt(2e-5) == "2.00e-05" and fmt(3e7) == "3.00e+07"


def test_round_line_fits_and_keeps_the_first_metrics() -> None:
    line = round_line(_rec(12, METRICS), ("auprc", "recall_at_1fpr", "loss"), 80)
    assert len(line) <= 80
    assert line.startswith("round   12    2 cl   1.25 s auprc 0.6100 ε 3.2500")


def test_table_fits_80_columns_and_names_what_it_left_out() -> None:
    h = History([_rec(r, METRICS) for r in range(1, 41)])
    table, left = round_table(h, ("auprc", "recall_at_1fpr", "loss"), title="t", width=80)
    console = Console(width=200, record=True)
    console.print(table)
    lines = console.export_text().splitlines()
    assert max(len(x) for x in lines) <= 80
    assert "ε" in lines[2] and "auprc" in lines[2] and "MB down/up" in lines[2]
    assert left and set(left) <= set(METRICS)
    assert len([x for x in lines if x.startswith("│")]) <= 26  # at most 25 sampled rounds plus the last


def test_the_client_table_shows_each_clients_global_and_personalized_headline_within_80_columns() -> None:
    from rich.console import Console

    from fedloom.report import client_table

    cm = {f"hospital-{c}": {"fed_mae": 1.0 + i, "pers_mae": 0.5 + i, "fed_rmse": 2.0, "pers_rmse": 1.0} for i, c in enumerate("ABC")}
    h = History([RoundRecord(1, {}, [], 0, 0, 0, 0.1), RoundRecord(2, {}, [], 0, 0, 0, 0.1, client_metrics=cm)])
    table = client_table(h, ("mae", "rmse"))
    assert table is not None
    assert [c.header for c in table.columns] == ["client", "fed mae", "pers mae", "fed rmse", "pers rmse"]
    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "hospital-C" in text and "2.5000" in text  # C's personalized MAE
    assert client_table(History([RoundRecord(1, {}, [], 0, 0, 0, 0.1)]), ("mae",)) is None
