"""``vtprune testbed ...`` commands: train the testbed model and evaluate a checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vtprune.testbed.model import CHECKPOINT_DIR

testbed_app = typer.Typer(help="The built-in testbed LLaVA: a small model trained on synthetic spatial VQA.")
console = Console()


@testbed_app.command("train")
def train_cmd(
    steps: int = typer.Option(2000, help="Optimizer steps in total (a resumed run continues to this)."),
    batch_size: int = typer.Option(32, help="Samples per step."),
    lr: float = typer.Option(1.5e-3, help="Peak AdamW learning rate (warmup then cosine)."),
    seed: int = typer.Option(0, help="Seed for initialisation and data."),
    eval_every: int = typer.Option(200, help="Validate (and save when improved) every N steps."),
    val_size: int = typer.Option(300, help="Validation questions."),
    workers: int = typer.Option(1, help="Data-generation worker processes (0: in the main process)."),
    work_dir: Path = typer.Option(Path("runs/testbed"), help="Resumable state (optimizer, step)."),
    out: Path = typer.Option(CHECKPOINT_DIR, help="Where the best model and processor are saved."),
) -> None:
    """Train the testbed model from scratch (or resume from WORK_DIR)."""
    from vtprune.testbed.train import TrainConfig, train

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
        console=console,
    ) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=loss)

        best = train(cfg, work_dir=work_dir, out=out, log=bar.console.print, progress=progress)
    console.print(f"best validation accuracy {best['all']:.3f}; model saved to {out}")


@testbed_app.command("eval")
def eval_cmd(
    n: int = typer.Option(1000, help="Test questions."),
    path: Path = typer.Option(CHECKPOINT_DIR, help="Checkpoint directory."),
    blind: bool = typer.Option(False, help="Replace every image by a flat grey one (text-only baseline)."),
) -> None:
    """Greedy exact-match accuracy of a checkpoint on the test split."""
    import torch

    from vtprune.testbed.data import make_split
    from vtprune.testbed.model import load_testbed
    from vtprune.testbed.train import accuracy, predict

    torch.set_num_threads(2)
    model, processor = load_testbed(path)
    test = make_split("test", n)
    metrics = accuracy(test, predict(model, processor, test, blind=blind))
    for k, v in metrics.items():
        console.print(f"{k:28s} {v:.3f}")
