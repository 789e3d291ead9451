"""``make demo`` (fedloom.demo): its table fits 80 columns and shows what it computed, and its
one sentence says what the numbers show, whatever they are."""

from __future__ import annotations

import re

import pytest

from fedloom.demo import Row, main, summarize

COLUMNS = ("hospital", "test", "alone", "alone@all", "FL global", "FL+pers", "central")
NUM = r"\d+\.\d{3}"


def _row(alone: float, pers: float, *, alone_all: float | None = 2.0, fed: float = 1.5, central: float = 1.4) -> Row:
    return Row(test=100, alone=alone, alone_all=alone_all, fed=fed, pers=pers, central=central)


def _pooled(fed: float, central: float) -> Row:
    return Row(test=300, alone=1.0, alone_all=None, fed=fed, pers=1.0, central=central)


def test_the_sentence_follows_the_numbers() -> None:
    rows = {"A": _row(1.0, 0.9), "B": _row(2.0, 1.9), "C": _row(1.0, 0.995)}
    s = summarize(rows, _pooled(1.5, 1.45))
    assert s.startswith("Federated + personalized beats training alone at A and B (by 5.0–10.0%)")
    assert "matches it at C (within 1%)" in s
    assert "beats every hospital's own model (by 25.0%)" in s
    assert s.endswith("is within 3.4% of centralized on the pooled test set.")

    rows = {"A": _row(1.0, 1.05), "B": _row(1.0, 1.10, alone_all=1.2)}
    s = summarize(rows, _pooled(1.3, 1.0))
    assert s.startswith("Federated + personalized trails training alone at every hospital (by 5.0–10.0%)")
    assert "beats the own model of A (by 35.0%) but not that of B (by 8.3%)" in s
    assert s.endswith("trails centralized by 30.0% on the pooled test set.")

    rows = {"A": _row(1.0, 0.8, alone_all=1.1), "B": _row(1.0, 0.7, alone_all=1.15)}
    s = summarize(rows, _pooled(1.2, 1.25))
    assert s.startswith("Federated + personalized beats training alone at every hospital (by 20.0–30.0%)")
    assert "trails every hospital's own model (by 4.3–9.1%)" in s
    assert s.endswith("beats centralized by 4.0% on the pooled test set.")
    assert s.count(".") - len(re.findall(r"\d\.\d", s)) == 1  # one sentence


def _clause(sentence: str, hospitals: list[str]) -> dict[str, str]:
    """What the sentence's first clause says of each hospital: beats / matches / trails (training alone)."""
    first = sentence.split(";")[0]
    said: dict[str, str] = {}
    for verb, where in re.findall(r"(beats|matches|trails) (?:training alone|it) at ([^(]+) \(", first):
        names = hospitals if where.strip() == "every hospital" else re.split(r", | and ", where.strip())
        for n in names:
            said[n] = verb
    return said


def test_demo_prints_an_80_column_table_and_a_sentence_that_matches_it(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    res = main(["--rounds", "20", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines if "fedloom serve" not in line) <= 80  # the command is not wrapped: it is copied

    header = next(line for line in lines if "hospital" in line and "central" in line and "┃" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == list(COLUMNS)
    table: dict[str, list[str]] = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if line.startswith("│") and len(cells) == len(COLUMNS):
            table[cells[0]] = cells[1:]
    assert list(table) == [*res.hospitals, "all (pooled)"]
    for name, r in [*res.hospitals.items(), ("all (pooled)", res.pooled)]:
        shown = table[name]
        assert shown[0] == str(r.test)
        for cell, v in zip(shown[1:], [r.alone, r.alone_all, r.fed, r.pers, r.central], strict=True):
            assert cell == ("" if v is None else f"{v:.3f}")
            assert cell == "" or re.fullmatch(NUM, cell)
    assert res.pooled.test == sum(r.test for r in res.hospitals.values())

    # The sentence is printed once, follows from the result, and each claim holds for the printed numbers.
    assert res.sentence == summarize(res.hospitals, res.pooled)
    assert res.sentence.replace(" ", "") in out.replace("\n", "").replace(" ", "")
    said = _clause(res.sentence, list(res.hospitals))
    assert set(said) == set(res.hospitals)
    for name, verb in said.items():
        alone, pers = float(table[name][1]), float(table[name][4])
        gap = 100 * (pers - alone) / alone
        assert {"beats": gap < -0.9, "matches": abs(gap) <= 1.1, "trails": gap > 0.9}[verb], (name, verb, gap)
    fed, central = float(table["all (pooled)"][3]), float(table["all (pooled)"][5])
    second = res.sentence.split(";")[1]
    beaten = {h for h in res.hospitals if float(table[h][2]) > fed}  # own models the federated one beats on all patients
    if "beats every hospital's own model" in second:
        assert beaten == set(res.hospitals)
    elif "trails every hospital's own model" in second:
        assert not beaten
    else:
        m = re.search(r"beats the own models? of (.+?) \(by .*but not th(?:at|ose) of (.+?) \(", second)
        assert m is not None
        assert set(re.split(r", | and ", m.group(1))) == beaten
        assert set(re.split(r", | and ", m.group(2))) == set(res.hospitals) - beaten
    m = re.search(r"(is within|trails centralized by|beats centralized by) (\d+\.\d)%", res.sentence)
    assert m is not None
    gap = 100 * (fed - central) / central
    assert float(m.group(2)) == pytest.approx(abs(gap), abs=0.15)
    assert (m.group(1) == "beats centralized by") == (gap < 0)

    assert res.passes == 2  # 20 rounds x 10 steps x 64 samples per hospital ~ 1.6 passes over the pooled data
    assert (tmp_path / "demo" / "fedloom.db").exists()
    assert (tmp_path / "demo" / "history.json").exists()
    assert re.search(r"fedloom serve \S*fedloom\.db", out)
