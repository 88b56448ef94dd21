"""`python -m vtprune.apps.figures`: it reads back exactly what `vtprune testbed eval` (--out JSON and --markdown),
`bench/prefill.py --markdown` and `vtprune analyze` write, draws PNGs, and rejects other files with one line."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from vtprune.apps import figures
from vtprune.testbed.benchmark import Cell, markdown_tables, save_results


def _cells() -> list[Cell]:
    rng = np.random.default_rng(0)
    cells = [Cell("unpruned", None, 0.9, (0.85, 0.94), 100, 144.0, {}, {})]
    for name, baseline in (("FastV", None), ("FastV+debias", "FastV"), ("Random", None)):
        for keep in (0.5, 0.25, 0.125, 0.0625):
            acc = float(rng.uniform(0.3, 0.9))
            delta = None if baseline is None else tuple(float(v) for v in sorted(rng.uniform(-0.2, 0.2, 3)))
            cells.append(Cell(name, keep, acc, (acc - 0.05, acc + 0.04), 100, keep * 144, {}, {}, delta, baseline,
                              equivalent=keep * 144))
    return cells


def test_accuracy_json_and_markdown_read_back_the_same_numbers(tmp_path):
    cells = _cells()
    save_results(tmp_path / "r.json", cells, [], {"n": 100})
    (tmp_path / "r.md").write_text(markdown_tables(cells, [], 100, "testbed-lm"))
    from_json, meta = figures.read_accuracy(tmp_path / "r.json")
    from_md, meta_md = figures.read_accuracy(tmp_path / "r.md")
    assert meta["n"] == meta_md["n"] == 100
    assert [(c.setting, c.keep) for c in from_json] == [(c.setting, c.keep) for c in from_md] == [(c.setting, c.keep) for c in cells]
    for a, b, truth in zip(from_json, from_md, cells):
        assert a.accuracy == pytest.approx(100 * truth.accuracy) and b.accuracy == pytest.approx(100 * truth.accuracy, abs=0.05)
        assert (a.low, a.high) == pytest.approx((100 * truth.ci[0], 100 * truth.ci[1]))
        assert (b.low, b.high) == pytest.approx((100 * truth.ci[0], 100 * truth.ci[1]), abs=0.05)
        assert (a.delta is None) == (b.delta is None) == (truth.delta is None)
        if truth.delta:
            assert b.delta == pytest.approx(tuple(100 * v for v in truth.delta), abs=0.05)


def test_accuracy_figure_and_csv(tmp_path):
    cells = _cells()
    save_results(tmp_path / "r.json", cells, [], {"n": 100})
    written = figures.draw("accuracy", [tmp_path / "r.json"], tmp_path / "acc.png", ["FastV", "FastV+debias"])
    assert written[0].stat().st_size > 10000
    rows = list(csv.DictReader(written[1].open()))
    assert {r["setting"] for r in rows} == {"unpruned", "FastV", "FastV+debias", "Random"}
    fastv = next(r for r in rows if r["setting"] == "FastV" and r["budget"] == "25%")
    assert float(fastv["accuracy"]) == pytest.approx(100 * next(c.accuracy for c in cells if (c.setting, c.keep) == ("FastV", 0.25)), abs=0.05)
    # default panels: every method with a '+debias' row
    assert figures.accuracy_panels(figures.read_accuracy(tmp_path / "r.json")[0]) == [["FastV", "FastV+debias"]]
    with pytest.raises(figures.FigureInputError, match="PyramidDrop"):
        figures.draw("accuracy", [tmp_path / "r.json"], tmp_path / "x.png", ["PyramidDrop"])


def test_speed_and_position(tmp_path):
    table = tmp_path / "prefill.md"
    table.write_text("Prefill, a test.\n\n| config | prefill ms | time ratio | FLOP ratio |\n|---|---:|---:|---:|\n"
                     "| unpruned | 10 | 1.000 | 1.000 |\n| FastV 64 | 5 | 0.500 | 0.400 |\n"
                     "| FastV 64 + debias | 5 | 0.520 | 0.400 |\n\nnote\n")
    title, rows = figures.read_speed(table)
    assert title == "Prefill, a test" and [r.time_ratio for r in rows] == [1.0, 0.5, 0.52]
    assert figures.draw("speed", [table], tmp_path / "speed.png")[0].stat().st_size > 10000

    from vtprune.apps.analysis import BeforeAfter, BiasReport
    from vtprune.apps.calibration import PositionCurve
    from vtprune.debias.fit import fit_exponential

    x = np.linspace(0, 1, 16)
    before, after = np.exp(4 * x) / np.exp(4 * x).mean(), np.ones(16)
    curves = {"score_before": PositionCurve(before, np.ones(16), (4, 4)), "score_after": PositionCurve(after, np.ones(16), (4, 4))}
    fits = {name: fit_exponential(c.values, x) for name, c in curves.items()}
    blank = BeforeAfter(None, None)
    report = BiasReport(8, 4.0, 16.0, blank, blank, blank, blank, blank, curves=curves, fits=fits)
    report.save(tmp_path / "report.json")
    data = figures.read_position_report(tmp_path / "report.json")
    assert data["fits"]["score_before"]["sigma"] == pytest.approx(4.0, abs=1e-3)
    assert figures.draw("position", [tmp_path / "report.json"], tmp_path / "pos.png")[0].stat().st_size > 10000


def test_wrong_files_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "other.md").write_text("# nothing here\n")
    assert figures.main(["accuracy", str(tmp_path / "other.md")]) == 2
    assert figures.main(["speed", str(tmp_path / "missing.md")]) == 2
    assert figures.main(["position", str(tmp_path / "other.md")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("vtprune.apps.figures: error: ") for line in errors)
    assert "vtprune testbed eval --markdown" in errors[0] and "bench/prefill.py" in errors[1]
