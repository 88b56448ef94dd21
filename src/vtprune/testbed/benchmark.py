"""End-to-end accuracy of pruning and debiasing on the testbed model (`vtprune testbed eval`).

Greedy exact-match accuracy on the test split for each keep ratio x setting, with Wilson 95% intervals, the
paired difference to plain FastV at the same keep (mean of per-question differences +- 1.96 standard
errors), and the bias the model shows: the fitted sigma of the mean last-token attention vs position and the
share of padding tokens in FastV's top-k before and after debiasing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..debias import Debias
from ..methods import FastV, Random
from ..runner import run_examples
from .data import accuracy

#: keep ratios of the benchmark (None: no pruning); 0.0625 * 144 = 9 tokens ("6%")
KEEPS: tuple[float | None, ...] = (None, 0.5, 0.25, 0.125, 0.0625)
LAYER = 2
DEFAULT_PROFILE = "testbed/fastv"


def settings(profile: str = DEFAULT_PROFILE) -> dict[str, Callable[[float], object]]:
    """Setting name -> press factory for a keep ratio. "positional" uses the calibrated `profile`."""
    return {
        "FastV": lambda keep: FastV(keep=keep, layer=LAYER),
        "FastV+positional": lambda keep: FastV(keep=keep, layer=LAYER, debias=Debias(profile=profile, padding=False)),
        "FastV+padding": lambda keep: FastV(keep=keep, layer=LAYER, debias=Debias(padding=True)),
        "FastV+both": lambda keep: FastV(keep=keep, layer=LAYER, debias=Debias(profile=profile, padding=True)),
        "FastV+auto": lambda keep: FastV(keep=keep, layer=LAYER, debias=Debias(profile="auto", padding=False)),
        "FastV+auto+padding": lambda keep: FastV(keep=keep, layer=LAYER, debias=Debias(profile="auto", padding=True)),
        "Random": lambda keep: Random(keep=keep, layer=LAYER, seed=0),
    }


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion hits/n."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


@dataclass
class Cell:
    setting: str
    keep: float | None
    accuracy: float
    ci: tuple[float, float]
    n: int
    tokens_kept: float  # mean visual tokens kept per question
    by_half: dict[str, float]  # accuracy by where the evidence lies: top, bottom, none
    by_kind: dict[str, float] = field(default_factory=dict)  # accuracy by question kind (data.QUESTION_KINDS)
    delta_vs_fastv: tuple[float, float, float] | None = None  # (mean, low, high) paired difference
    seconds: float = 0.0
    correct: list[int] = field(default_factory=list, repr=False)


@dataclass
class BiasSummary:
    keep: float
    sigma_attn: float | None
    r2_attn: float | None
    sigma_freq_before: float | None
    sigma_freq_after: float | None
    padding_in_topk_before: float | None
    padding_in_topk_after: float | None


def evaluate(model, processor, samples: Sequence, press=None, batch_size: int = 50):
    """Answers and records of `samples` (testbed `Sample`s) under `press` (None: unpruned)."""
    return run_examples(model, processor, samples, press, generate=True, max_new_tokens=3, batch_size=batch_size)


def _cell(name, keep, samples, answers, records, seconds, visual) -> Cell:
    correct = [int(a == s.answer) for a, s in zip(answers, samples)]
    hits = sum(correct)
    groups = accuracy(samples, answers)
    kept = float(np.mean([len(r.kept) for r in records])) if records else (visual if keep is None else round(keep * visual))
    return Cell(
        setting=name, keep=keep, accuracy=hits / len(samples), ci=wilson(hits, len(samples)), n=len(samples),
        tokens_kept=kept, by_half={k[5:]: v for k, v in groups.items() if k.startswith("half/")},
        by_kind={k[5:]: v for k, v in groups.items() if k.startswith("kind/")}, seconds=seconds, correct=correct,
    )


def paired_delta(a: Sequence[int], b: Sequence[int]) -> tuple[float, float, float]:
    """Mean of a_i - b_i with a normal 95% interval."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return (float(d.mean()), float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se))


def run_benchmark(
    model,
    processor,
    samples: Sequence,
    *,
    keeps: Sequence[float | None] = KEEPS,
    names: Sequence[str] | None = None,
    profile: str = DEFAULT_PROFILE,
    batch_size: int = 50,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Cell], list[BiasSummary]]:
    """Every (keep, setting) cell, and the bias measured from the "FastV+both" runs."""
    from ..analysis import bias_report

    factories = settings(profile)
    names = list(names or factories)
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {list(factories)}")
    visual = None
    cells: list[Cell] = []
    bias: list[BiasSummary] = []
    for keep in keeps:
        baseline = None
        for name in (["unpruned"] if keep is None else names):
            press = None if keep is None else factories[name](keep)
            start = time.perf_counter()
            result = evaluate(model, processor, samples, press, batch_size=batch_size)
            seconds = time.perf_counter() - start
            if visual is None:
                visual = _visual_tokens(model)
            cell = _cell(name, keep, samples, result.answers, result.records, seconds, visual)
            if name == "FastV":
                baseline = cell
            elif baseline is not None:
                cell.delta_vs_fastv = paired_delta(cell.correct, baseline.correct)
            cells.append(cell)
            if log:
                log(f"keep {keep if keep is not None else 'all'} {name}: {cell.accuracy:.3f} ({seconds:.0f}s)")
            if name == "FastV+both" and result.records:
                report = bias_report(result.records)
                bias.append(BiasSummary(
                    keep=keep, sigma_attn=report.sigma_attn.before, r2_attn=report.r2_attn.before,
                    sigma_freq_before=report.sigma_freq.before, sigma_freq_after=report.sigma_freq.after,
                    padding_in_topk_before=report.padding_kept_share.before,
                    padding_in_topk_after=report.padding_kept_share.after,
                ))
    return cells, bias


def _visual_tokens(model) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def keep_label(keep: float | None) -> str:
    return "all" if keep is None else f"{100 * keep:g}%"


def markdown_tables(cells: Sequence[Cell], bias: Sequence[BiasSummary], n: int, profile: str) -> str:
    """The accuracy and bias tables as Markdown (README, closing notes)."""
    keeps = [k for k in dict.fromkeys(c.keep for c in cells) if k is not None]
    names = list(dict.fromkeys(c.setting for c in cells if c.keep is not None))
    by = {(c.setting, c.keep): c for c in cells}
    unpruned = by.get(("unpruned", None))
    lines = [f"Accuracy (%) on {n} test questions, 95% Wilson interval; in brackets below it, the paired "
             "difference to FastV at the same budget (points, 95% interval).", ""]
    header = "| setting | " + " | ".join(f"keep {keep_label(k)} ({_tokens(by, names, k)} tok)" for k in keeps) + " |"
    lines += [header, "|---" * (len(keeps) + 1) + "|"]
    if unpruned:
        lo, hi = unpruned.ci
        lines.append(f"| unpruned (144 tok) | {100 * unpruned.accuracy:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] |"
                     + " |" * (len(keeps) - 1))
    for name in names:
        row = [name]
        for keep in keeps:
            cell = by.get((name, keep))
            if cell is None:
                row.append("")
                continue
            lo, hi = cell.ci
            text = f"{100 * cell.accuracy:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
            if cell.delta_vs_fastv is not None:
                d, dlo, dhi = (100 * v for v in cell.delta_vs_fastv)
                text += f"<br>({d:+.1f} [{dlo:+.1f}, {dhi:+.1f}])"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Positional profile: `{profile}`; tokens kept are means (padding debiasing lowers the count for "
              "images with fewer real tokens).", ""]
    lines += ["Accuracy (%) by where the evidence lies (questions about one object; 'none': counting, 'no' answers):", ""]
    lines += ["| setting | keep | top | bottom | none |", "|---|---|---|---|---|"]
    for cell in cells:
        if cell.setting in ("unpruned", "FastV", "FastV+positional", "FastV+both", "FastV+auto+padding", "Random"):
            halves = " | ".join(f"{100 * cell.by_half.get(h, float('nan')):.1f}" for h in ("top", "bottom", "none"))
            lines.append(f"| {cell.setting} | {keep_label(cell.keep)} | {halves} |")
    kinds = list(dict.fromkeys(k for c in cells for k in c.by_kind))
    if kinds:
        lines += ["", "Accuracy (%) by question kind:", ""]
        lines += ["| setting | keep | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for cell in cells:
            if cell.setting in ("unpruned", "FastV", "FastV+both", "Random"):
                values = " | ".join(f"{100 * cell.by_kind.get(k, float('nan')):.1f}" for k in kinds)
                lines.append(f"| {cell.setting} | {keep_label(cell.keep)} | {values} |")
    if bias:
        lines += ["", "Bias on the testbed (FastV scores, layer 1's last-token attention; from the FastV+both runs):", ""]
        lines += ["| keep | sigma_attn (R^2) | sigma_freq before -> after | padding in top-k before -> after |",
                  "|---|---|---|---|"]
        for b in bias:
            lines.append(
                f"| {keep_label(b.keep)} | {_f(b.sigma_attn)} ({_f(b.r2_attn, '.2f')}) | {_f(b.sigma_freq_before)} -> "
                f"{_f(b.sigma_freq_after)} | {_pct(b.padding_in_topk_before)} -> {_pct(b.padding_in_topk_after)} |"
            )
    return "\n".join(lines)


def _tokens(by, names, keep) -> str:
    cell = by.get((names[0], keep)) if names else None
    return f"{cell.tokens_kept:.0f}" if cell else "?"


def _f(value, spec: str = "+.2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def save_results(path: str | Path, cells: Sequence[Cell], bias: Sequence[BiasSummary], meta: dict) -> Path:
    path = Path(path)
    data = {"meta": meta, "cells": [asdict(c) for c in cells], "bias": [asdict(b) for b in bias]}
    path.write_text(json.dumps(data, indent=1))
    return path


__all__ = ["KEEPS", "settings", "wilson", "paired_delta", "evaluate", "run_benchmark", "markdown_tables", "save_results"]
