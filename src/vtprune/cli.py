"""Command line: `vtprune run`, `vtprune profiles` (and the testbed commands)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Visual-token pruning with debiased attention.")
console = Console()


def default_profile(model_spec: str, model, method: str) -> str | None:
    """The built-in positional profile for this model and method, if there is one: the published LLaVA-1.5-7B
    profiles, or the testbed's calibrated ones."""
    from .debias.profiles import default_profile_name
    from .methods import method as method_class

    cls = method_class(method)
    return default_profile_name(model.config, cls.name, cls.profile_name)


def number_option(text: str | None, option: str):
    """A count or fraction (`8`, `0.25`), or a comma-separated schedule of them (`192,64`); None stays None.
    Whole numbers >= 1 are token counts, values in (0, 1) fractions."""
    if text is None:
        return None
    values = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not a number", param_hint=option) from None
        values.append(int(value) if value.is_integer() and value >= 1 else value)
    return values[0] if len(values) == 1 else values


def layer_option(text: str | None):
    """`2` or `2,10,20`; None stays None (the method's default layers)."""
    if text is None:
        return None
    try:
        values = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give a layer index or a comma-separated list of them", param_hint="--layer") from None
    return values[0] if len(values) == 1 else values


def keep_option(keep: float) -> int | float:
    """--keep as the press takes it: whole numbers >= 1 are token counts, values in (0, 1) fractions."""
    return int(keep) if float(keep).is_integer() and keep >= 1 else float(keep)


def make_press(method: str, *, debias=None, **options):
    """The registered method `method` built from the generic options (None: the method's default)."""
    from .methods import method as method_class

    try:
        cls = method_class(method)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--method") from None
    if cls.query is None:
        debias = None  # nothing to debias
    try:
        return cls.create(debias=debias, **options)
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error)) from None


def _methods_help() -> str:
    from .methods import METHODS

    return ", ".join(METHODS)


@app.command()
def run(
    model_path: str = typer.Option(..., "--model", help="local model directory, hub id, or 'testbed'"),
    image: Path = typer.Option(..., "--image", exists=True, dir_okay=False, help="image file"),
    prompt: str = typer.Option(..., "--prompt", help="question about the image"),
    method: str = typer.Option("fastv", "--method", help="pruning method (see `vtprune methods`)"),
    budget: Optional[float] = typer.Option(
        None, "--budget", help="token budget as the papers label it: a count of 576 or a fraction (e.g. 0.25)"
    ),
    keep: Optional[str] = typer.Option(
        None, "--keep", help="visual tokens kept per stage: a count or a fraction, or a list (192,64)"
    ),
    layer: Optional[str] = typer.Option(None, "--layer", help="layer(s) before which tokens are pruned (default: the method's)"),
    positions: Optional[str] = typer.Option(None, "--positions", help="original or compact (default: the method's)"),
    no_debias: bool = typer.Option(False, "--no-debias", help="rank by raw attention scores"),
    profile: Optional[str] = typer.Option(
        None, "--profile", help="positional profile: built-in name (see `vtprune profiles`), JSON path or 'auto'"
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the random method"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16"),
) -> None:
    """Answer a question about an image with a pruned model; print the answer, tokens and prefill time."""
    from PIL import Image

    from .debias import Debias
    from .loading import load_model
    from .runner import answer_one

    options = dict(budget=keep_option(budget) if budget is not None else None, keep=number_option(keep, "--keep"),
                   layer=layer_option(layer), positions=positions, seed=seed)
    press = make_press(method, **options)  # checks the options before the model loads
    model, processor = load_model(model_path, device=device, dtype=dtype)
    picture = Image.open(image).convert("RGB")
    debias = None
    if not no_debias and press.query is not None:
        profile = profile or default_profile(model_path, model, method)
        debias = Debias(profile=profile, padding=True)
        press = make_press(method, debias=debias, **options)
    result = answer_one(model, processor, picture, prompt, press, max_new_tokens=max_new_tokens)
    selection = result.selection
    stages = ", ".join(f"{s.layer}" for s in selection)
    table = Table(show_header=False)
    table.add_row("answer", result.text)
    table.add_row("method", f"{press.name} (layers {stages}, positions {press.positions})")
    table.add_row("debias", "off" if debias is None else debias.describe())
    final = selection[-1]
    table.add_row("visual tokens", f"{selection[0].num_visual[0]} -> {len(final.kept[0]) + final.extra[0]}")
    table.add_row("prefill", f"{result.prefill_ms:.1f} ms")
    console.print(table)


def result_tokens(model) -> int:
    """Visual tokens per image of an unpruned LLaVA-style model."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


@app.command()
def demo(
    keep: float = typer.Option(0.125, "--keep", help="visual tokens kept: a fraction (0.125 = 18 of 144) or a count"),
    out_dir: Path = typer.Option(Path("vtprune-demo"), "--out-dir", help="where the PNGs go"),
    profile: Optional[str] = typer.Option(None, "--profile", help="positional profile (default: the testbed's calibrated one)"),
    count: int = typer.Option(4, "--count", help="number of bundled questions"),
) -> None:
    """The main job, offline: the shipped testbed model answers bundled questions unpruned, with FastV and with
    debiased FastV; prints a table and writes a PNG per example with the kept tokens."""
    import torch

    from .demo import run_demo
    from .loading import load_model

    torch.set_num_threads(min(4, torch.get_num_threads()))
    model, processor = load_model("testbed")
    profile = profile or default_profile("testbed", model, "fastv") or "auto"
    rows = run_demo(model, processor, keep=keep_option(keep), profile=profile, out_dir=out_dir, count=count)
    table = Table(title=f"vtprune demo: testbed LLaVA, FastV at layer 2, keep {keep:g}, debias = padding + {profile}")
    for column in ("#", "question (answer)", "setting", "answer", "tokens", "prefill ms"):
        table.add_column(column, justify="right" if column in ("#", "tokens", "prefill ms") else "left")
    for number, row in enumerate(rows, start=1):
        for index, (name, result) in enumerate(row.results.items()):
            mark = "[green]✓[/green]" if result.text == row.truth else "[red]✗[/red]"
            tokens = str(len(result.selection[-1].kept[0])) if result.selection else str(result_tokens(model))
            question = f"{row.question} ({row.truth})\n[dim]evidence: {row.evidence} half[/dim]" if index == 0 else ""
            table.add_row(str(number) if index == 0 else "", question, name, f"{result.text} {mark}", tokens,
                          f"{result.prefill_ms:.1f}", end_section=index == len(row.results) - 1)
    console.print(table)
    console.print(f"pictures of the kept tokens: {', '.join(str(r.picture) for r in rows)}")


@app.command()
def methods() -> None:
    """List the pruning methods (the registry every command uses) with their defaults."""
    from .methods import METHODS
    from .press import REFERENCE_LAYERS, REFERENCE_TOKENS

    table = Table(title="pruning methods (defaults for LLaVA-1.5-7B: 32 layers, 576 visual tokens)")
    for column in ("--method", "class", "what it ranks by", "stages (layer: kept)", "positions", "debiasable"):
        table.add_column(column, no_wrap=column in ("--method", "class"))
    for name, cls in METHODS.items():
        press = cls()
        stages = ", ".join(
            f"{s.layer}: {round(s.keep * REFERENCE_TOKENS) if isinstance(s.keep, float) else s.keep}"
            for s in press.stages(REFERENCE_LAYERS)
        )
        table.add_row(name, cls.__name__, cls.summary, stages, press.positions, "yes" if cls.query else "no")
    console.print(table)


@app.command()
def profiles() -> None:
    """List the built-in positional debiasing profiles."""
    from .debias.profiles import builtin_profiles

    table = Table(title="built-in positional profiles")
    table.add_column("name", no_wrap=True)  # names are copied into --profile: never break them
    for column in ("kind", "L", "sigma", "layer", "query", "source"):
        table.add_column(column)
    for p in builtin_profiles():
        sigma = f"{p.sigma:.3f}" if p.sigma is not None else "-"
        source = "arXiv 2508.17807" if "2508.17807" in p.source else p.source
        table.add_row(p.name, p.kind, str(p.length), sigma, str(p.layer), str(p.query), source)
    console.print(table)


def _progress(total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console,
    )


def _load_data(data: str, images: Optional[Path], samples: int, split: str):
    from .datasets import load_examples

    try:
        with warnings.catch_warnings():  # reported below, once
            warnings.simplefilter("ignore", UserWarning)
            examples, report = load_examples(data, images, samples, split=split)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--data/--images/--samples") from None
    if report.unreadable:
        console.print(f"[yellow]skipped {len(report.unreadable)} unreadable image(s)[/yellow], e.g. {report.unreadable[0][0]}")
    return examples


DATA_HELP = "calibration data: a LLaVA-style jsonl ({'image': path, 'text': question} per line) or 'testbed'"


@app.command()
def calibrate(
    model_path: str = typer.Option(..., "--model", help="local model directory, hub id, or 'testbed'"),
    method: str = typer.Option("fastv", "--method", help="attention-based method whose scores are calibrated"),
    layer: Optional[str] = typer.Option(None, "--layer", help="the method's pruning layer(s) (default: the method's); its first stage is calibrated"),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    images: Optional[Path] = typer.Option(None, "--images", help="folder the jsonl's image paths are relative to"),
    samples: int = typer.Option(256, "--samples", help="examples to use (the first N)"),
    split: str = typer.Option("val", "--split", help="testbed split for --data testbed"),
    out: Path = typer.Option(..., "--out", help="profile JSON to write"),
    curve: bool = typer.Option(False, "--curve", help="store a smoothed per-position curve (used instead of the exp fit)"),
    name: Optional[str] = typer.Option(None, "--name", help="profile name (default MODEL/METHOD/calibrated)"),
    no_padding: bool = typer.Option(False, "--no-padding", help="do not exclude padding tokens from the fit"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
) -> None:
    """Fit the positional trend f(x)=mu*exp(sigma*x) of a method's scores on data; write a profile JSON.

    Progress is saved beside OUT (OUT.partial.json): rerunning the same command resumes."""
    from .calibration import calibrate as run_calibration
    from .loading import load_model

    press = make_press(method, layer=layer_option(layer))
    if press.query is None:
        raise typer.BadParameter(f"{method} ranks without attention: nothing to calibrate", param_hint="--method")
    examples = _load_data(data, images, samples, split)
    model, processor = load_model(model_path, device=device, dtype=dtype)
    state = out.with_name(out.name + ".partial.json")
    with _progress(len(examples), "calibrate") as bar:
        task = bar.add_task("calibrate", total=len(examples))
        result = run_calibration(
            model, processor, examples, press, batch_size=batch_size, curve=curve, padding=not no_padding,
            name=name, method=method, state_path=state, progress=lambda n: bar.advance(task, n),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    result.profile.save(out)
    state.unlink(missing_ok=True)
    table = Table(title=f"calibrated profile {result.profile.name}", show_header=False)
    for key, value in (
        ("method / layer / query", f"{method} / {result.profile.layer} / {result.profile.query}"),
        ("samples", str(len(result.records))),
        ("visual tokens per image (L)", str(result.profile.length)),
        ("fit", f"mu={result.fit.mu:.4g}  sigma={result.fit.sigma:+.4f}  R^2={result.fit.r2:.3f}"),
        ("residual RMS", f"{float(np.sqrt(np.mean(result.fit.residuals ** 2))):.4f}"),
        ("kind", result.profile.kind),
        ("written", str(out)),
    ):
        table.add_row(key, value)
    console.print(table)


@app.command()
def analyze(
    model_path: str = typer.Option(..., "--model", help="local model directory, hub id, or 'testbed'"),
    method: str = typer.Option("fastv", "--method"),
    layer: Optional[str] = typer.Option(None, "--layer", help="pruning layer(s) (default: the method's)"),
    budget: Optional[float] = typer.Option(None, "--budget", help="token budget (count of 576 or fraction); default 0.25 unless --keep"),
    keep: Optional[str] = typer.Option(None, "--keep", help="visual tokens kept per stage: a count or a fraction, or a list"),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    images: Optional[Path] = typer.Option(None, "--images"),
    samples: int = typer.Option(256, "--samples"),
    split: str = typer.Option("val", "--split"),
    profile: str = typer.Option("auto", "--profile", help="positional debiasing: built-in name, JSON path, 'auto' or 'none'"),
    no_padding: bool = typer.Option(False, "--no-padding", help="turn padding debiasing off"),
    out_dir: Path = typer.Option(Path("analysis"), "--out-dir", help="where report.json and the PNGs go"),
    example: int = typer.Option(0, "--example", help="index of the example drawn in selection.png"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
) -> None:
    """Measure a method's positional and padding bias before/after debiasing; write report.json and plots."""
    from .adapters import adapter_for
    from .analysis import bias_report
    from .debias import Debias
    from .loading import load_model
    from .plots import plot_keep_frequency, plot_score_heatmap, plot_score_vs_position, plot_selection
    from .runner import run_examples

    if make_press(method).query is None:
        raise typer.BadParameter(f"{method} uses no attention scores: nothing to analyse", param_hint="--method")
    debias = Debias(profile=None if profile == "none" else profile, padding=not no_padding)
    keep_value = number_option(keep, "--keep")
    budget_value = keep_option(budget) if budget is not None else (0.25 if keep_value is None else None)
    press = make_press(method, debias=debias, layer=layer_option(layer), keep=keep_value, budget=budget_value)
    examples = _load_data(data, images, samples, split)
    if not 0 <= example < len(examples):
        raise typer.BadParameter(f"--example {example} is outside the {len(examples)} examples", param_hint="--example")
    model, processor = load_model(model_path, device=device, dtype=dtype)
    with _progress(len(examples), "analyze") as bar:
        task = bar.add_task("analyze", total=len(examples))
        result = run_examples(model, processor, examples, press, generate=False, batch_size=batch_size,
                              dry_run=True, progress=lambda n: bar.advance(task, n))
    report = bias_report(result.records)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.save(out_dir / "report.json")
    first = press.validate(len(adapter_for(model).decoder_layers))[0]
    amount = f"budget {budget_value:g}" if budget_value is not None else f"keep {keep}"
    label = f"{method}, first stage at layer {first.layer}, {amount}, {debias.describe()}, {len(examples)} samples"
    plot_score_vs_position(report.curves, report.fits, out_dir / "score_vs_position.png", f"Mean score vs position ({label})")
    plot_score_heatmap(report.curves["score_before"], out_dir / "score_heatmap.png", "Mean raw score per patch")
    plot_keep_frequency(report.curves["freq_before"], report.curves.get("freq_after"), out_dir / "keep_frequency.png",
                        f"Keep frequency ({label})")
    record = result.records[example]
    segment = record.segments[0]
    part = slice(segment.offset, segment.offset + segment.length)
    inside = lambda kept: kept[(kept >= segment.offset) & (kept < segment.offset + segment.length)] - segment.offset  # noqa: E731
    plot_selection(
        examples[example].image, adapter_for(model).image_geometry(processor), segment.grid,
        [("raw scores (no debiasing)", inside(record.kept_raw)), ("debiased", inside(record.kept))],
        None if record.padding is None else record.padding[part], out_dir / "selection.png",
        f"{examples[example].question}",
    )
    table = Table(title=f"bias of {label}")
    for column in ("metric", "before", "after"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for row in report.rows():
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {out_dir / 'report.json'} and 4 plots in {out_dir}")


def _mount_testbed() -> None:
    try:
        from .testbed.cli import testbed_app
    except ImportError:
        return
    app.add_typer(testbed_app, name="testbed", help="The small model trained and shipped by vtprune.")


_mount_testbed()


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
