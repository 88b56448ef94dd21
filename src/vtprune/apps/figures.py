"""Figures drawn from the results files that vtprune's own commands write, never by hand.

    python -m vtprune.apps.figures accuracy RESULTS [--settings A,B] [--out FIG.png]   # accuracy against budget
    python -m vtprune.apps.figures speed TABLE.md [TABLE.md ...] [--out FIG.png]      # time ratio against FLOP ratio
    python -m vtprune.apps.figures position REPORT.json [--out FIG.png]               # mean score against position
    python -m vtprune.apps.figures docs [--results docs/results] [--out docs/figures] # every figure of the docs

Inputs:

* accuracy: the JSON of `vtprune testbed eval --out FILE` or the Markdown of `vtprune testbed eval --markdown
  FILE` (its first table). One panel per method (plain and `+debias`, plus any `--settings`), or one panel
  with exactly `--settings`; 95% Wilson intervals as error bars, the unpruned model as a band. A CSV of the
  plotted numbers is written next to the PNG.
* speed: the Markdown of `python bench/prefill.py --markdown FILE` (one panel per file).
* position: the `report.json` of `vtprune analyze` (mean score per relative position with the fitted
  mu*exp(sigma*x), before and after debiasing).

Only matplotlib and numpy are needed (no torch): the docs build runs this in a small environment.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

PNG_METADATA = {"Software": None}  # no version string in the file: the same numbers give the same bytes


@dataclass(frozen=True)
class AccuracyCell:
    """One cell of an accuracy table: a setting at a budget (`keep` None: unpruned), in percent."""

    setting: str
    keep: float | None
    accuracy: float
    low: float
    high: float
    delta: tuple[float, float, float] | None = None  # paired difference to the setting's baseline (points)


class FigureInputError(ValueError):
    """A results file that is missing or not in the format its command writes."""


# ---------------------------------------------------------------------------------------------- reading


def read_accuracy(path: str | Path) -> tuple[list[AccuracyCell], dict]:
    """Cells (percent) and metadata of a `vtprune testbed eval` results file (.json from --out, .md from
    --markdown)."""
    path = Path(path)
    if not path.is_file():
        raise FigureInputError(f"{path}: no such file (write one with `vtprune testbed eval --out FILE.json`)")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
            cells = [
                AccuracyCell(
                    c["setting"],
                    c["keep"],
                    100 * c["accuracy"],
                    100 * c["ci"][0],
                    100 * c["ci"][1],
                    None if c.get("delta") is None else tuple(100 * v for v in c["delta"]),
                )
                for c in data["cells"]
            ]
        except (ValueError, KeyError, TypeError) as error:
            raise FigureInputError(f"{path}: not a `vtprune testbed eval --out` results file ({error})") from None
        return cells, dict(data.get("meta", {}))
    return _read_accuracy_markdown(path)


_NUMBER = r"[+-]?\d+(?:\.\d+)?"
_CELL = re.compile(
    rf"^({_NUMBER}) \[({_NUMBER}), ({_NUMBER})\](?:<br>\(({_NUMBER}) \[({_NUMBER}), ({_NUMBER})\]\))?"
    rf"(?:<br>{_NUMBER} tok/layer)?$"
)  # the last part: the setting's visual tokens per layer


def _read_accuracy_markdown(path: Path) -> tuple[list[AccuracyCell], dict]:
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Accuracy (%) on ")), None)
    if start is None:
        raise FigureInputError(
            f"{path}: no 'Accuracy (%) on N test questions' table (the format of "
            "`vtprune testbed eval --markdown FILE`)"
        )
    n = re.match(r"Accuracy \(%\) on (\d+) ", lines[start])
    table = _first_table(lines[start + 1 :])
    if not table or not table[0][0] == "setting":
        raise FigureInputError(f"{path}: the accuracy table has no 'setting' column")
    keeps = [_budget(label, path) for label in table[0][1:]]
    cells: list[AccuracyCell] = []
    for row in table[1:]:
        name = row[0]
        for keep, text in zip(keeps, row[1:]):
            if not text:
                continue
            match = _CELL.match(text)
            if match is None:
                raise FigureInputError(f"{path}: cannot read the cell {text!r} of row {name!r}")
            acc, low, high, d, dlo, dhi = (None if g is None else float(g) for g in match.groups())
            if name.startswith("unpruned"):
                cells.append(AccuracyCell("unpruned", None, acc, low, high))
                break
            cells.append(AccuracyCell(name, keep, acc, low, high, None if d is None else (d, dlo, dhi)))
    return cells, {"n": int(n.group(1)) if n else None}


def _first_table(lines: Sequence[str]) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table in `lines`, without its separator row."""
    rows: list[list[str]] = []
    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            break
    return rows


def _budget(label: str, path: Path) -> float:
    match = re.fullmatch(rf"budget ({_NUMBER})%", label)
    if match is None:
        raise FigureInputError(f"{path}: column {label!r} is not a budget like 'budget 50%'")
    return float(match.group(1)) / 100


@dataclass(frozen=True)
class SpeedRow:
    """One row of a `bench/prefill.py` table."""

    config: str
    time_ratio: float
    flop_ratio: float


def read_speed(path: str | Path) -> tuple[str, list[SpeedRow]]:
    """(title, rows) of the Markdown table `python bench/prefill.py --markdown FILE` writes."""
    path = Path(path)
    if not path.is_file():
        raise FigureInputError(f"{path}: no such file (write one with `python bench/prefill.py --markdown FILE`)")
    lines = path.read_text().splitlines()
    table = _first_table(lines)
    header = table[0] if table else []
    if "config" not in header or "time ratio" not in header or "FLOP ratio" not in header:
        raise FigureInputError(
            f"{path}: no table with 'config', 'time ratio' and 'FLOP ratio' columns (the format "
            "of `python bench/prefill.py --markdown FILE`)"
        )
    c, t, f = header.index("config"), header.index("time ratio"), header.index("FLOP ratio")
    rows = [SpeedRow(row[c], float(row[t]), float(row[f])) for row in table[1:]]
    return lines[0].rstrip("."), rows


def read_position_report(path: str | Path) -> dict:
    """The curves and fits of `vtprune analyze`'s report.json."""
    path = Path(path)
    if not path.is_file():
        raise FigureInputError(f"{path}: no such file (write one with `vtprune analyze ... --out-dir DIR`)")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        data = {}
    if not isinstance(data, dict) or "score_before" not in data.get("curves", {}):
        raise FigureInputError(f"{path}: no 'score_before' curve (not a `vtprune analyze` report.json)")
    return data


# ---------------------------------------------------------------------------------------------- drawing


def _save(fig, path: str | Path) -> Path:
    from ..io import atomic_open

    path = Path(path)
    with atomic_open(path, "wb") as handle:  # a temporary file in the folder (created if needed), then a rename
        fig.savefig(
            handle, dpi=110, bbox_inches="tight", metadata=PNG_METADATA, format=path.suffix.lstrip(".").lower() or "png"
        )
    plt.close(fig)
    return path


def _percent(keep: float) -> str:
    return f"{100 * keep:g}%"


def accuracy_panels(cells: Sequence[AccuracyCell], settings: Sequence[str] | None = None) -> list[list[str]]:
    """The settings of each panel: exactly `settings` (one panel), or per method its plain row and its
    `+debias` row, for every method that has both."""
    if settings:
        known = {c.setting for c in cells}
        missing = [s for s in settings if s not in known]
        if missing:
            raise FigureInputError(
                f"--settings: {', '.join(missing)} not in the results (they hold: "
                f"{', '.join(sorted(known - {'unpruned'}))})"
            )
        return [list(settings)]
    names = list(dict.fromkeys(c.setting for c in cells))
    return [[name, f"{name}+debias"] for name in names if f"{name}+debias" in names]


def plot_accuracy(
    cells: Sequence[AccuracyCell],
    path: str | Path,
    settings: Sequence[str] | None = None,
    title: str = "",
    columns: int = 4,
) -> Path:
    """Accuracy (%) against the budget (share of visual tokens kept, halving to the right) with 95% intervals;
    the unpruned model as a dashed line in its interval band; Random (when present) as a grey reference."""
    panels = accuracy_panels(cells, settings)
    if not panels:
        raise FigureInputError("no method has both a plain and a '+debias' row: name the rows with --settings")
    by = {(c.setting, c.keep): c for c in cells}
    unpruned = by.get(("unpruned", None))
    keeps = sorted({c.keep for c in cells if c.keep is not None}, reverse=True)
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(4.2 * columns if len(panels) > 1 else 7.0, 3.6 * rows if len(panels) > 1 else 4.4),
        squeeze=False,
        sharey=True,
    )
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
    for index, names in enumerate(panels):
        ax = axes[index // columns][index % columns]
        if unpruned is not None:
            ax.axhspan(unpruned.low, unpruned.high, color="grey", alpha=0.15, lw=0)
            ax.axhline(unpruned.accuracy, color="grey", ls="--", lw=1, label=f"unpruned {unpruned.accuracy:.1f}%")
        if ("Random", keeps[0]) in by and "Random" not in names:
            ax.plot(
                keeps,
                [by[("Random", k)].accuracy if ("Random", k) in by else np.nan for k in keeps],
                color="grey",
                ls=":",
                marker=".",
                lw=1,
                label="Random",
            )
        for number, name in enumerate(names):
            points = [by[(name, k)] for k in keeps if (name, k) in by]
            x = np.array([p.keep for p in points]) * (1.0 + 0.035 * (number - (len(names) - 1) / 2))  # side by side
            y = np.array([p.accuracy for p in points])
            err = np.array([[p.accuracy - p.low for p in points], [p.high - p.accuracy for p in points]])
            ax.errorbar(
                x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.6, color=colours[number % len(colours)], label=name
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(keeps, [_percent(k) for k in keeps])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_title(names[0] if len(panels) > 1 else (title or "Accuracy against budget"), fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
        if index % columns == 0:
            ax.set_ylabel("accuracy (%), 95% interval")
        if index // columns == rows - 1 or len(panels) == 1:
            ax.set_xlabel("visual tokens kept")
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    if len(panels) > 1 and title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def write_accuracy_csv(cells: Sequence[AccuracyCell], path: str | Path, settings: Sequence[str] | None = None) -> Path:
    """The plotted cells as CSV (percent): setting, budget, accuracy, interval, paired difference."""
    wanted = {name for panel in accuracy_panels(cells, settings) for name in panel} | {"unpruned", "Random"}
    from ..io import atomic_open

    path = Path(path)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["setting", "budget", "accuracy", "low", "high", "delta", "delta_low", "delta_high"])
        for c in cells:
            if c.setting in wanted:
                delta = [f"{v:.1f}" for v in c.delta] if c.delta else ["", "", ""]
                writer.writerow(
                    [
                        c.setting,
                        "all" if c.keep is None else _percent(c.keep),
                        f"{c.accuracy:.1f}",
                        f"{c.low:.1f}",
                        f"{c.high:.1f}",
                        *delta,
                    ]
                )
    return path


def _method_of(config: str) -> str:
    """'FastV 128 + debias' -> 'FastV' (the words before the budget)."""
    return re.split(r" \d", config, maxsplit=1)[0]


def plot_speed(tables: Sequence[tuple[str, Sequence[SpeedRow]]], path: str | Path) -> Path:
    """Time ratio (pruned / unpruned prefill time) against FLOP ratio, one panel per table; the diagonal is
    'time falls as the arithmetic does'. Debiased rows are hollow."""
    fig, axes = plt.subplots(1, len(tables), figsize=(5.4 * len(tables), 5.0), squeeze=False)
    for ax, (title, rows) in zip(axes[0], tables):
        methods = list(dict.fromkeys(_method_of(r.config) for r in rows if r.config != "unpruned"))
        colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
        for row in rows:
            if row.config == "unpruned" or "keys recomputed" in row.config:
                continue
            colour = colours[_method_of(row.config)]
            debiased = "debias" in row.config
            ax.scatter(
                row.flop_ratio,
                row.time_ratio,
                s=36,
                marker="s" if "auto" in row.config else "o",
                facecolors="none" if debiased else colour,
                edgecolors=colour,
                linewidths=1.4,
            )
        for method in methods:
            ax.scatter([], [], color=colours[method], label=method)
        ax.scatter([], [], facecolors="none", edgecolors="black", label="+ debias (hollow)")
        if any("auto" in r.config for r in rows):
            ax.scatter([], [], marker="s", facecolors="none", edgecolors="black", label="+ auto debias")
        top = max(1.1, max(r.time_ratio for r in rows) * 1.05)
        ax.plot([0, top], [0, top], color="grey", ls="--", lw=1, label="time ratio = FLOP ratio")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, top)
        ax.set_xlabel("FLOP ratio (pruned / unpruned)")
        ax.set_ylabel("prefill time ratio (pruned / unpruned)")
        ax.set_title(_wrap(title, 60), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def plot_position(report: dict, path: str | Path, title: str = "") -> Path:
    """Mean score per relative position x = i/L (real tokens; each image's scores divided by their mean) with
    the fitted mu*exp(sigma*x), before and after debiasing, on a log scale."""
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    styles = {"score_before": ("raw scores", "tab:red"), "score_after": ("debiased scores", "tab:blue")}
    for name, (label, colour) in styles.items():
        values = report["curves"].get(name)
        if values is None:
            continue
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        x = np.arange(len(y)) / max(len(y) - 1, 1)
        valid = np.isfinite(y) & (y > 0)
        ax.scatter(x[valid], y[valid], s=8, alpha=0.55, color=colour, label=f"{label}: mean per position")
        fit = report.get("fits", {}).get(name)
        if fit:
            ax.plot(
                x,
                fit["mu"] * np.exp(fit["sigma"] * x),
                color=colour,
                lw=2,
                label=f"fit mu·exp(sigma·x): sigma {fit['sigma']:+.2f}, R² {fit['r2']:.2f}",
            )
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("relative position x = i / L of the visual token (top row of the image -> bottom row)")
    ax.set_ylabel("score / the image's mean (log scale)")
    settings = report.get("settings", {})
    default = (
        f"{settings.get('model', '?')}, {settings.get('method', '?')}: mean score against position, "
        f"{report.get('samples', '?')} images"
    )
    ax.set_title(title or default, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- the docs' set

#: the figures of the docs: (output PNG, kind, inputs under the results folder, options)
DOCS_FIGURES: tuple[tuple[str, str, tuple[str, ...], dict], ...] = (
    (
        "testbed-lm-fastv.png",
        "accuracy",
        ("testbed-lm-fastv.json",),
        {"settings": ["FastV", "FastV+debias"], "title": "FastV on testbed-lm, plain and debiased (150 questions)"},
    ),
    (
        "testbed-lm-fastv-ablation.png",
        "accuracy",
        ("testbed-lm-table.md",),
        {
            "settings": ["FastV", "FastV+positional", "FastV+padding", "FastV+debias", "FastV+auto+padding"],
            "title": "FastV on testbed-lm: each correction alone and together (150 questions)",
        },
    ),
    (
        "testbed-lm-methods.png",
        "accuracy",
        ("testbed-lm-table.md",),
        {"title": "testbed-lm: every attention-based method, plain and debiased (150 questions)"},
    ),
    (
        "testbed-methods.png",
        "accuracy",
        ("testbed-table.md",),
        {"title": "the testbed: every attention-based method, plain and debiased (1000 questions)"},
    ),
    ("prefill-speed.png", "speed", ("prefill-h200-batch8.md", "prefill-cpu-4layers.md"), {}),
    (
        "testbed-lm-fastv-position.png",
        "position",
        ("analyze-testbed-lm-fastv.json",),
        {"title": "testbed-lm, FastV's scores (layer 1): mean against position, before and after debiasing"},
    ),
)


def draw(
    kind: str, inputs: Sequence[Path], out: Path, settings: Sequence[str] | None = None, title: str = ""
) -> list[Path]:
    """Draw one figure of `kind` from `inputs` into `out` (and, for accuracy, its CSV beside it)."""
    if kind == "accuracy":
        cells, _meta = read_accuracy(inputs[0])
        written = [plot_accuracy(cells, out, settings, title)]
        written.append(write_accuracy_csv(cells, out.with_suffix(".csv"), settings))
        return written
    if kind == "speed":
        return [plot_speed([read_speed(p) for p in inputs], out)]
    if kind == "position":
        return [plot_position(read_position_report(inputs[0]), out, title)]
    raise FigureInputError(f"unknown figure kind {kind!r}: accuracy, speed or position")


def draw_docs(results: Path, out: Path) -> list[Path]:
    """Every figure of the docs from the results files in `results` (see `docs/results/SOURCES.md`)."""
    written = []
    for name, kind, inputs, options in DOCS_FIGURES:
        written += draw(
            kind, [results / i for i in inputs], out / name, options.get("settings"), options.get("title", "")
        )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.apps.figures", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    accuracy = sub.add_parser("accuracy", help="accuracy against budget from `vtprune testbed eval` results")
    accuracy.add_argument("results", type=Path, help="the .json of --out or the .md of --markdown")
    accuracy.add_argument(
        "--settings",
        default="",
        help="comma-separated rows for one panel (default: one panel per method with a '+debias' row)",
    )
    accuracy.add_argument("--title", default="")
    accuracy.add_argument("--out", type=Path, default=Path("accuracy.png"))
    speed = sub.add_parser("speed", help="time ratio against FLOP ratio from `bench/prefill.py --markdown` tables")
    speed.add_argument("tables", type=Path, nargs="+")
    speed.add_argument("--out", type=Path, default=Path("speed.png"))
    position = sub.add_parser("position", help="mean score against position from `vtprune analyze`'s report.json")
    position.add_argument("report", type=Path)
    position.add_argument("--title", default="")
    position.add_argument("--out", type=Path, default=Path("position.png"))
    docs = sub.add_parser("docs", help="every figure of the docs from docs/results")
    docs.add_argument("--results", type=Path, default=Path("docs/results"))
    docs.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args(argv)
    try:
        if args.kind == "docs":
            written = draw_docs(args.results, args.out)
        elif args.kind == "accuracy":
            settings = [s.strip() for s in args.settings.split(",") if s.strip()] or None
            written = draw("accuracy", [args.results], args.out, settings, args.title)
        elif args.kind == "speed":
            written = draw("speed", args.tables, args.out)
        else:
            written = draw("position", [args.report], args.out, title=args.title)
    except FigureInputError as error:
        sys.stderr.write(f"vtprune.apps.figures: error: {error}\n")
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "AccuracyCell",
    "SpeedRow",
    "FigureInputError",
    "read_accuracy",
    "read_speed",
    "read_position_report",
    "plot_accuracy",
    "write_accuracy_csv",
    "plot_speed",
    "plot_position",
    "draw",
    "draw_docs",
    "DOCS_FIGURES",
]
