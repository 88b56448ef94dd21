"""End-to-end accuracy of pruning and debiasing on vtprune's testbed models (`vtprune testbed eval`): the
small testbed, or testbed-lm (the same task on SmolLM2-135M-Instruct).

Greedy exact-match accuracy on the test split for each budget x setting, with Wilson 95% intervals, the
paired difference to the setting's baseline at the same budget (mean of per-question differences +- 1.96
standard errors; a debiased method against the same method without debiasing, the other position numbering
against the method's own), and the bias each method shows: the fitted sigma of its mean first-stage score vs
position and the share of padding tokens in its top-k before and after debiasing.

Settings come from the method registry (`vtprune.methods.METHODS`): every attention-based method plain and
debiased (padding + the model's calibrated profile of the method), FastV's ablations, each method with the other position
numbering, and Random. Budgets use each method's `budget=` (its published schedule, scaled; see README).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..apps.results import cells_problem, load_cells, paired_delta, save_cells, wilson
from ..apps.runner import run_examples
from ..debias import Debias
from ..methods import METHODS
from .data import accuracy

#: budgets of the benchmark (None: no pruning); 0.0625 = 9 of the testbed's 144 tokens ("6%")
KEEPS: tuple[float | None, ...] = (None, 0.5, 0.25, 0.125, 0.0625)
DEBIAS = {  # setting suffix -> Debias factory given the method's calibrated profile name
    "debias": lambda profile: Debias(profile=profile, padding=True),
    "positional": lambda profile: Debias(profile=profile, padding=False),
    "padding": lambda profile: Debias(padding=True),
    "auto+padding": lambda profile: Debias(profile="auto", padding=True),
    # issue 23's corrections beyond the exponential, each with padding, paired with the paper's "+debias"
    "tempered": lambda profile: Debias(profile=f"{profile}/tempered", padding=True),
    "curve": lambda profile: Debias(profile=f"{profile}/curve", padding=True),
    "rowcol": lambda profile: Debias(profile=f"{profile}/rowcol", padding=True),
    "rowrank": lambda profile: Debias(profile="rowrank", padding=True),
    "rowmean": lambda profile: Debias(profile="rowmean", padding=True),
}
#: the positional corrections compared with the paper's exponential on testbed-lm (`bench/corrections.py`
#: calibrates the profiled ones on the validation split)
CORRECTIONS = ("tempered", "curve", "rowcol", "rowrank", "rowmean")


@dataclass(frozen=True)
class Setting:
    """One row of the benchmark: a registered method, how it is debiased, its position numbering, and the
    row its paired difference is taken against."""

    name: str
    method: str
    debias: str | None = None  # a key of DEBIAS
    positions: str | None = None  # None: the method's official numbering
    baseline: str | None = None
    options: tuple[tuple[str, object], ...] = ()  # further press options, e.g. (("debias_target", "fused"),)

    def press(self, budget: float, model: str = "testbed"):
        """The press at `budget`; debiased settings use `model`'s calibrated profile `<model>/<method>`."""
        cls = METHODS[self.method]
        debias = None if self.debias is None else DEBIAS[self.debias](f"{model}/{self.method}")
        return cls.create(budget=budget, debias=debias, positions=self.positions, **dict(self.options))


def label(method: str) -> str:
    return METHODS[method].__name__


def _method_rows(debias_kinds: Sequence[str]) -> list[Setting]:
    """Every registered method but Random plain, and each attention-based one also `+<kind>` for each of
    `debias_kinds` (keys of DEBIAS), paired with its plain row."""
    out = []
    for name, cls in METHODS.items():
        if name == "random":
            continue
        out.append(Setting(label(name), name))
        if cls.query is not None:
            out += [Setting(f"{label(name)}+{kind}", name, kind, baseline=label(name)) for kind in debias_kinds]
    return out


def default_settings() -> list[Setting]:
    """Every registered method plain, the attention-based ones also debiased, FastV's ablations, the other
    position numbering per method (debiased too where the official numbering is compact), and Random."""
    out = _method_rows(["debias"])
    out += [
        Setting(f"FastV+{kind}", "fastv", kind, baseline="FastV") for kind in ("positional", "padding", "auto+padding")
    ]
    # TokenCarve's paper debiases the attention ranking only; debiasing the fused ranking is the alternative
    out.append(
        Setting(
            "TokenCarve+debias(fused)",
            "tokencarve",
            "debias",
            baseline="TokenCarve",
            options=(("debias_target", "fused"),),
        )
    )
    for name, cls in METHODS.items():
        if name == "random":
            continue
        official = cls().positions
        other = "compact" if official == "original" else "original"
        out.append(Setting(f"{label(name)}@{other}", name, positions=other, baseline=label(name)))
        if official == "compact" and cls.query is not None:  # does debiasing help with the model's own numbering?
            out.append(
                Setting(
                    f"{label(name)}@{other}+debias", name, "debias", positions=other, baseline=f"{label(name)}@{other}"
                )
            )
    out.append(Setting("Random", "random"))
    return out


def lm_settings() -> list[Setting]:
    """testbed-lm's table: every registered method plain, and each attention-based one debiased four ways
    (positional only, padding only, both, and the uncalibrated positional fit "auto" with padding), all at the
    methods' official position numbering, and Random."""
    return [*_method_rows(["positional", "padding", "debias", "auto+padding"]), Setting("Random", "random")]


def correction_settings() -> list[Setting]:
    """testbed-lm's corrections comparison: each of the paper's six attention methods with each correction of
    `CORRECTIONS` (padding on), paired with the method's "+debias" (the paper's exponential with padding); the
    calibrated kinds only where `bench/corrections.py` wrote the method's profile (FastV and PyramidDrop)."""
    from ..debias.profiles import builtin_profiles

    shipped = {profile.name for profile in builtin_profiles()}
    return [
        Setting(f"{label(name)}+{kind}", name, kind, baseline=f"{label(name)}+debias")
        for name in ("fastv", "pdrop", "himap", "sparsevlm", "tokencarve", "illava")
        for kind in CORRECTIONS
        if kind in ("rowrank", "rowmean") or f"testbed-lm/{name}/{kind}" in shipped
    ]


def position_settings() -> list[Setting]:
    """testbed-lm's position comparison (issue 23): each method whose official numbering is compact, at the
    original numbering, plain (paired with the method) and, for the attention-based ones, debiased (paired with
    the plain original row): the `@original` rows of the small testbed's table."""
    return [s for s in default_settings() if "@original" in s.name]


def selectable_for(model: str) -> list[Setting]:
    """The settings `--settings` may name for `model`: its default rows, and for testbed-lm the corrections and
    the position comparison."""
    if model != "testbed-lm":
        return settings_for(model)
    return settings_for(model) + correction_settings() + position_settings()


def settings_for(model: str) -> list[Setting]:
    """The default rows of `model`'s table ("testbed" or "testbed-lm")."""
    return lm_settings() if model == "testbed-lm" else default_settings()


def settings() -> dict[str, Setting]:
    """Every known setting by name (both models' tables)."""
    return {s.name: s for s in default_settings() + lm_settings() + correction_settings()}


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
    delta: tuple[float, float, float] | None = None  # (mean, low, high) paired difference to the baseline
    baseline: str | None = None
    equivalent: float | None = None  # visual tokens per decoder layer, averaged (the model's own depth)
    seconds: float = 0.0
    correct: list[int] = field(default_factory=list, repr=False)


@dataclass
class BiasSummary:
    method: str
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
    kept = (
        float(np.mean([len(r.kept) for r in records]))
        if records
        else (visual if keep is None else round(keep * visual))
    )
    return Cell(
        setting=name,
        keep=keep,
        accuracy=hits / len(samples),
        ci=wilson(hits, len(samples)),
        n=len(samples),
        tokens_kept=kept,
        by_half={k[5:]: v for k, v in groups.items() if k.startswith("half/")},
        by_kind={k[5:]: v for k, v in groups.items() if k.startswith("kind/")},
        seconds=seconds,
        correct=correct,
    )


def run_benchmark(
    model,
    processor,
    samples: Sequence,
    *,
    keeps: Sequence[float | None] = KEEPS,
    names: Sequence[str] | None = None,
    batch_size: int = 50,
    log: Callable[[str], None] | None = None,
    state_path: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    saved_only: bool = False,
) -> tuple[list[Cell], list[BiasSummary]]:
    """Every (budget, setting) cell, and the bias measured from each method's debiased runs.

    state_path: a JSON file where every finished cell is saved, so that an interrupted benchmark resumes (only
    cells of the same model and questions are reused; `log` says how many). progress(done, total, name) is
    called before each cell and at the end. saved_only: measure nothing; only the cells saved in `state_path`
    (the others are left out: assembles the tables of runs made with different settings or budgets)."""
    from ..adapters import adapter_for
    from ..apps.analysis import bias_report
    from ..apps.calibration import data_fingerprint, model_fingerprint

    table = settings()
    names = list(names or [s.name for s in settings_for(model_name(model))])
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {list(table)}")
    num_layers = len(adapter_for(model).decoder_layers)
    visual = _visual_tokens(model)
    cells: list[Cell] = []
    bias: list[BiasSummary] = []
    plan = [(keep, name) for keep in keeps for name in (["unpruned"] if keep is None else names)]
    key = {"model": model_fingerprint(model), "data": data_fingerprint(samples)} if state_path is not None else None
    problem = cells_problem(state_path, key)
    if problem and log:
        log(f"note: {state_path} {problem}; starting over")
    saved = _load_state(state_path, key)
    resumed = [item for item in plan if _cell_key(*item) in saved]
    if resumed and log:
        log(f"resuming: {len(resumed)} of {len(plan)} cells were done in an earlier run ({state_path})")
    finished = 0
    for keep in keeps:
        done: dict[str, Cell] = {}
        for name in ["unpruned"] if keep is None else names:
            if progress is not None:
                progress(finished, len(plan), f"{name} {keep_label(keep)}")
            finished += 1
            if _cell_key(keep, name) in saved:
                cell, summary = saved[_cell_key(keep, name)]
                setting = table.get(name)
                if (
                    cell.delta is None and setting is not None and setting.baseline in done
                ):  # measured before its baseline
                    cell.baseline = setting.baseline
                    cell.delta = paired_delta(cell.correct, done[setting.baseline].correct)
                done[name] = cell
                cells.append(cell)
                bias += [summary] if summary is not None else []
                continue
            if saved_only:
                continue
            setting = table.get(name)
            press = None if keep is None else setting.press(keep, model_name(model))
            start = time.perf_counter()
            result = evaluate(model, processor, samples, press, batch_size=batch_size)
            seconds = time.perf_counter() - start
            cell = _cell(name, keep, samples, result.answers, result.records, seconds, visual)
            if press is not None:
                cell.equivalent = press.equivalent_tokens(visual, num_layers)
                cell.tokens_kept = float(np.mean(result.final_tokens))
            else:
                cell.equivalent = float(visual)
            if setting is not None and setting.baseline in done:
                cell.baseline = setting.baseline
                cell.delta = paired_delta(cell.correct, done[setting.baseline].correct)
            done[name] = cell
            cells.append(cell)
            if log:
                log(f"budget {keep if keep is not None else 'all'} {name}: {cell.accuracy:.3f} ({seconds:.0f}s)")
            summary = None
            if (
                setting is not None
                and setting.debias == "debias"
                and setting.positions is None
                and not setting.options
                and result.records
            ):  # one summary per method: its plain debiased setting
                report = bias_report(result.records)
                summary = BiasSummary(
                    method=setting.method,
                    keep=keep,
                    sigma_attn=report.sigma_attn.before,
                    r2_attn=report.r2_attn.before,
                    sigma_freq_before=report.sigma_freq.before,
                    sigma_freq_after=report.sigma_freq.after,
                    padding_in_topk_before=report.padding_kept_share.before,
                    padding_in_topk_after=report.padding_kept_share.after,
                )
                bias.append(summary)
            if state_path is not None:
                saved[_cell_key(keep, name)] = (cell, summary)
                _save_state(state_path, key, saved)
    if progress is not None:
        progress(finished, len(plan), "done")
    return cells, bias


def _cell_key(keep: float | None, name: str) -> str:
    return f"{name}@{keep}"


def _load_state(path, key) -> dict:
    """Cells saved by an earlier run with the same `key` (model and questions), by `_cell_key`."""
    out = {}
    for name, item in load_cells(path, key).items():
        try:
            cell = Cell(**item["cell"])
            cell.ci = (cell.ci[0], cell.ci[1])  # JSON gives lists
            cell.delta = None if cell.delta is None else (cell.delta[0], cell.delta[1], cell.delta[2])
            out[name] = (cell, None if item["bias"] is None else BiasSummary(**item["bias"]))
        except (KeyError, TypeError, ValueError) as error:  # a malformed cell is measured again
            warnings.warn(
                f"{path}: cell {name} is malformed ({type(error).__name__}: {error}); measuring it again", stacklevel=2
            )
    return out


def _save_state(path, key, saved: dict) -> None:
    save_cells(
        path,
        key,
        {
            name: {"cell": asdict(cell), "bias": None if summary is None else asdict(summary)}
            for name, (cell, summary) in saved.items()
        },
    )


def model_name(model) -> str:
    """ "testbed" or "testbed-lm" (the prefix of the model's calibrated profiles)."""
    return getattr(model.config, "vtprune_model", None) or "testbed"


def _visual_tokens(model) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def keep_label(keep: float | None) -> str:
    return "all" if keep is None else f"{100 * keep:g}%"


def markdown_tables(cells: Sequence[Cell], bias: Sequence[BiasSummary], n: int, model: str = "testbed") -> str:
    """The accuracy, tokens and bias tables as Markdown (README, closing notes)."""
    keeps = [k for k in dict.fromkeys(c.keep for c in cells) if k is not None]
    names = list(dict.fromkeys(c.setting for c in cells if c.keep is not None))
    by = {(c.setting, c.keep): c for c in cells}
    unpruned = by.get(("unpruned", None))
    lines = [
        f"Accuracy (%) on {n} test questions, 95% Wilson interval; below it, in brackets, the paired "
        "difference to the row's baseline at the same budget (points, 95% interval): a debiased method "
        "against the same method undebiased, `@original`/`@compact` against the method's own numbering; "
        "last, the setting's visual tokens per decoder layer (tok/layer, averaged: what it costs).",
        "",
    ]
    lines += [
        "| setting | " + " | ".join(f"budget {keep_label(k)}" for k in keeps) + " |",
        "|---" * (len(keeps) + 1) + "|",
    ]
    if unpruned:
        lo, hi = unpruned.ci
        lines.append(
            f"| unpruned ({unpruned.tokens_kept:.0f} tok) | {100 * unpruned.accuracy:.1f} [{100 * lo:.1f}, "
            f"{100 * hi:.1f}] |" + " |" * (len(keeps) - 1)
        )
    for name in names:
        row = [name]
        for keep in keeps:
            cell = by.get((name, keep))
            if cell is None:
                row.append("")
                continue
            lo, hi = cell.ci
            text = f"{100 * cell.accuracy:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
            if cell.delta is not None:
                d, dlo, dhi = (100 * v for v in cell.delta)
                text += f"<br>({d:+.1f} [{dlo:+.1f}, {dhi:+.1f}])"
            if cell.equivalent is not None:
                text += f"<br>{cell.equivalent:.1f} tok/layer"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Visual tokens after the last stage (mean) / per decoder layer averaged over the model's layers:", ""]
    lines += [
        "| setting | " + " | ".join(f"budget {keep_label(k)}" for k in keeps) + " |",
        "|---" * (len(keeps) + 1) + "|",
    ]
    for name in names:
        if "@" in name or "+" in name:
            continue  # same schedule as the method's row
        row = [name] + [
            f"{by[(name, k)].tokens_kept:.1f} / {by[(name, k)].equivalent:.1f}" if (name, k) in by else ""
            for k in keeps
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Accuracy (%) by where the evidence lies (questions about one object; 'none': counting, 'no' answers):",
        "",
    ]
    lines += ["| setting | budget | top | bottom | none |", "|---|---|---|---|---|"]
    for cell in cells:
        if "@" not in cell.setting and ("+" not in cell.setting or cell.setting.endswith("+debias")):
            halves = " | ".join(f"{100 * cell.by_half.get(h, float('nan')):.1f}" for h in ("top", "bottom", "none"))
            lines.append(f"| {cell.setting} | {keep_label(cell.keep)} | {halves} |")
    kinds = list(dict.fromkeys(k for c in cells for k in c.by_kind))
    if kinds:
        lines += ["", "Accuracy (%) by question kind:", ""]
        lines += ["| setting | budget | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for cell in cells:
            if cell.setting in ("unpruned", "Random") or (
                cell.setting in names and "+" not in cell.setting and "@" not in cell.setting
            ):
                values = " | ".join(f"{100 * cell.by_kind.get(k, float('nan')):.1f}" for k in kinds)
                lines.append(f"| {cell.setting} | {keep_label(cell.keep)} | {values} |")
    if bias:
        lines += [
            "",
            f"Bias on {model} (each method's first-stage scores, from its +debias runs; profile `{model}/<method>`):",
            "",
        ]
        lines += [
            "| method | budget | sigma_attn (R^2) | sigma_freq before -> after | padding in top-k before -> after |",
            "|---|---|---|---|---|",
        ]
        for b in bias:
            lines.append(
                f"| {label(b.method)} | {keep_label(b.keep)} | {_f(b.sigma_attn)} ({_f(b.r2_attn, '.2f')}) | "
                f"{_f(b.sigma_freq_before)} -> {_f(b.sigma_freq_after)} | {_pct(b.padding_in_topk_before)} -> "
                f"{_pct(b.padding_in_topk_after)} |"
            )
    return "\n".join(lines)


def _f(value, spec: str = "+.2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def save_results(path: str | Path, cells: Sequence[Cell], bias: Sequence[BiasSummary], meta: dict) -> Path:
    from ..io import atomic_write_json

    data = {"meta": meta, "cells": [asdict(c) for c in cells], "bias": [asdict(b) for b in bias]}
    return atomic_write_json(path, data)


__all__ = [
    "KEEPS",
    "Setting",
    "default_settings",
    "lm_settings",
    "correction_settings",
    "position_settings",
    "selectable_for",
    "settings_for",
    "settings",
    "wilson",
    "paired_delta",
    "evaluate",
    "run_benchmark",
    "markdown_tables",
    "save_results",
]
