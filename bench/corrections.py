"""Calibrate the positional corrections of `vtprune.debias.corrections` for testbed-lm's attention methods on the
VALIDATION split, write them as built-in profiles, and print how each leaves the kept tokens on that split.

For each method it runs the press (padding debiasing on, nothing cut) over `--samples` validation questions and
keeps the first stage's raw scores, then fits:

* exp (refit): the paper's mu*exp(sigma x) on these scores (for reference; "+debias" uses the shipped profile);
* tempered: that exponential ** alpha, alpha chosen so that the top-k keeps every image row equally often
  (`corrections.fit_alpha`, at 25% and 12.5%);
* curve: the mean score per position, smoothed over one grid row;
* rowcol: the row trend times the column trend.

The table shows, per correction and budget, on the validation questions: the row flatness of the kept tokens
(`corrections.keep_flatness`: 0 = every row kept equally often) and the evidence recall (the share of the
evidence object's tokens that the top-k keeps, for the questions that point at an object). Accuracy is judged
on the test split by `vtprune testbed eval` (settings `<Method>+tempered`, `+curve`, `+rowcol`, `+rowrank`,
`+rowmean`, `+auto+padding`).

    python bench/corrections.py --samples 512 --write --markdown docs/results/corrections-calibration.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vtprune.apps.calibration import data_fingerprint, profile_from_records
from vtprune.debias import Debias
from vtprune.debias.corrections import (corrected_profile, fit_alpha, row_flatness, row_mean, row_rank, rowcol_trend,
                                        top_k_real)
from vtprune.debias.profiles import load_profile
from vtprune.adapters.geometry import _axis_overlap, geometry_from_processor
from vtprune.methods import METHODS
from vtprune.apps.runner import run_examples
from vtprune.testbed.data import make_split
from vtprune.testbed.lm import load_testbed_lm

PROFILE_DIR = Path(__file__).resolve().parents[1] / "src" / "vtprune" / "debias" / "profiles"
KEEPS = (0.25, 0.125)


def evidence_masks(samples, geometry) -> np.ndarray:
    """(N, L) bool: the tokens that cover at least 30% of a patch with the evidence object's box (none for
    questions without one)."""
    rows, cols = geometry.grid
    out = np.zeros((len(samples), rows * cols), dtype=bool)
    for i, sample in enumerate(samples):
        box = sample.meta["evidence_box"]
        if box is None:
            continue
        w, h = sample.meta["size"]
        _, (x0, y0, x1, y1) = geometry.trace((w, h))
        sx, sy = (x1 - x0) / w, (y1 - y0) / h
        cover = torch.outer(_axis_overlap(y0 + box[1] * sy, y0 + box[3] * sy, rows, geometry.patch_size),
                            _axis_overlap(x0 + box[0] * sx, x0 + box[2] * sx, cols, geometry.patch_size))
        out[i] = (cover > 0.3).reshape(-1).numpy()
    return out


def per_request(kind: str, raw: np.ndarray, real: np.ndarray, grid) -> np.ndarray:
    """`row_rank` / `row_mean` on every image at once (one image per sample)."""
    n, length = raw.shape
    args = (torch.from_numpy(raw).float(), torch.ones(n, length, dtype=torch.bool),
            torch.arange(length).expand(n, length), torch.zeros(n, 1, dtype=torch.long),
            torch.full((n, 1), length), torch.full((n, 1), grid[1]), torch.from_numpy(~real))
    return (row_rank if kind == "rowrank" else row_mean)(*args).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="validation questions")
    parser.add_argument("--methods", default="fastv,pdrop,himap,sparsevlm,tokencarve,illava")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--write", action="store_true", help="write the profiles (into --profile-dir)")
    parser.add_argument("--profile-dir", type=Path, default=PROFILE_DIR, help="default: the package's built-in profiles")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    parser.add_argument("--measure-saved", action="store_true",
                        help="without --write: measure the built-in testbed-lm/<method>/<kind> profiles instead of the new fits")
    args = parser.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    model, processor = load_testbed_lm()
    vision = model.config.vision_config
    geometry = geometry_from_processor(processor.image_processor, patch_size=vision.patch_size, image_size=vision.image_size)
    samples = make_split("val", args.samples)
    evidence = evidence_masks(samples, geometry)
    table = Table(title=f"testbed-lm positional corrections on {args.samples} validation questions: row flatness "
                        "of the kept tokens (0 = every image row kept equally often) / evidence recall")
    for column in ("method", "correction", "alpha", *(f"{100 * k:g}%: flat / recall" for k in KEEPS)):
        table.add_column(column, justify="right")
    lines = ["| method | correction | alpha | " + " | ".join(f"{100 * k:g}%: flatness / evidence recall" for k in KEEPS) + " |",
             "|---|---|---|" + "---|" * len(KEEPS)]
    seen: dict = {}
    for method in [m.strip() for m in args.methods.split(",")]:
        shipped = load_profile(f"testbed-lm/{method}")
        key = (shipped.layer, shipped.query, shipped.extra.get("score_layer"))
        if key not in seen:  # methods scoring the same way (FastV, iLLaVA, TokenCarve) share one run
            press = METHODS[method].create(budget=0.25, debias=Debias(padding=True))
            seen[key] = run_examples(model, processor, samples, press, generate=False, dry_run=True,
                                     batch_size=args.batch_size).records
        records = seen[key]
        base, mean, fit = profile_from_records(records, name=f"testbed-lm/{method}/exp-val", method=method,
                                               layer=shipped.layer, query=shipped.query, model_name="testbed-lm",
                                               extra={"score_layer": shipped.extra.get("score_layer"), "split": "val",
                                                      "data_fingerprint": data_fingerprint(samples)})
        smoothed, _, _ = profile_from_records(records, name="tmp", method=method, layer=shipped.layer,
                                              query=shipped.query, model_name="testbed-lm", curve=True)
        row, col, grid = rowcol_trend(records)
        exp_trend = base.trend(base.length).double().numpy()
        alpha, measured = fit_alpha(records, exp_trend, KEEPS)
        info = {"split": "val", "samples": len(records), "score_layer": shipped.extra.get("score_layer"),
                "fit_objective": "keep_flatness at 25% and 12.5%", "flatness_by_alpha": measured}
        profiles = {
            "tempered": corrected_profile(base, name=f"testbed-lm/{method}/tempered", alpha=alpha, extra=info,
                                          description=f"{method}: (mu exp(sigma x)) ** {alpha:g}, sigma {base.sigma:+.2f} "
                                                      f"refit and alpha fitted on {len(records)} validation questions"),
            "curve": corrected_profile(base, name=f"testbed-lm/{method}/curve", kind="curve", curve=smoothed.curve,
                                       extra={"split": "val", "samples": len(records)},
                                       description=f"{method}: mean score per position, smoothed over one row, "
                                                   f"{len(records)} validation questions"),
            "rowcol": corrected_profile(base, name=f"testbed-lm/{method}/rowcol", kind="rowcol",
                                        curve=np.outer(row, col).reshape(-1), extra={"split": "val", "samples": len(records),
                                                                                     "rows": row.tolist(), "cols": col.tolist()},
                                        description=f"{method}: row trend x column trend, {len(records)} validation questions"),
        }
        if args.write:
            for kind, profile in profiles.items():
                profile.save(args.profile_dir / f"testbed-lm-{method}-{kind}.json")
        elif args.measure_saved:  # the table measures the profiles calibrated earlier (on their own questions)
            profiles = {kind: load_profile(f"testbed-lm/{method}/{kind}") for kind in profiles}
        # how each correction leaves the kept tokens on the validation questions
        raw = np.stack([r.raw for r in records]).astype(np.float64)
        real = ~np.stack([r.padding for r in records]) & np.isfinite(raw)
        candidates = {"padding only": (raw, 0.0), f"exp shipped (sigma {shipped.sigma:+.2f})":
                      (raw / shipped.trend(shipped.length).double().numpy(), 1.0),
                      f"exp refit on val (sigma {base.sigma:+.2f})": (raw / exp_trend, 1.0)}
        candidates.update({kind: (raw / p.trend(p.length).double().numpy(), p.alpha) for kind, p in profiles.items()})
        candidates.update({kind: (per_request(kind, raw, real, grid), None) for kind in ("rowrank", "rowmean")})
        has_evidence = evidence.any(1)
        for name, (scores, alpha_used) in candidates.items():
            cells = []
            for keep in KEEPS:
                kept = top_k_real(scores, real, keep)
                flat = row_flatness(kept, real, grid)
                recall = (kept & evidence)[has_evidence].sum() / max((evidence & real)[has_evidence].sum(), 1)
                cells.append(f"{flat:.3f} / {recall:.3f}")
            alpha_text = "" if alpha_used is None else f"{alpha_used:g}"
            table.add_row(method, name, alpha_text, *cells)
            lines.append(f"| {method} | {name} | {alpha_text} | " + " | ".join(cells) + " |")
    Console(width=160).print(table)
    if args.markdown:
        from vtprune.io import atomic_write_text

        atomic_write_text(args.markdown, "\n".join(lines) + "\n")



if __name__ == "__main__":
    main()
