"""Command line: `vtprune run`, `vtprune profiles` (and the testbed commands)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Visual-token pruning with debiased attention.")
console = Console()


def _default_profile(model, method: str) -> str | None:
    """Built-in positional profile when the loaded model is the one it was published for."""
    name = str(getattr(model.config, "_name_or_path", "")).lower()
    if "llava-1.5-7b" in name:
        return f"llava-1.5-7b/{method}"
    return None


def make_press(method: str, keep: float, layer: int, debias, seed: int = 0):
    from .methods import METHODS

    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose from {', '.join(METHODS)}", param_hint="--method")
    keep_value: int | float = int(keep) if float(keep).is_integer() and keep >= 1 else float(keep)
    cls = METHODS[method]
    if method == "random":
        return cls(keep=keep_value, layer=layer, seed=seed)
    return cls(keep=keep_value, layer=layer, debias=debias)


@app.command()
def run(
    model_path: str = typer.Option(..., "--model", help="local model directory, hub id, or 'testbed'"),
    image: Path = typer.Option(..., "--image", exists=True, dir_okay=False, help="image file"),
    prompt: str = typer.Option(..., "--prompt", help="question about the image"),
    method: str = typer.Option("fastv", "--method", help="pruning method: fastv, random"),
    keep: float = typer.Option(64, "--keep", help="visual tokens to keep: a count, or a fraction in (0, 1)"),
    layer: int = typer.Option(2, "--layer", help="decoder layer before which tokens are pruned"),
    no_debias: bool = typer.Option(False, "--no-debias", help="rank by raw attention scores"),
    profile: Optional[str] = typer.Option(
        None, "--profile", help="positional profile: built-in name (see `vtprune profiles`) or JSON path"
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16"),
) -> None:
    """Answer a question about an image with a pruned model; print the answer, tokens and prefill time."""
    import torch
    from PIL import Image

    from .debias import Debias
    from .loading import build_inputs, load_model

    model, processor = load_model(model_path, device=device, dtype=dtype)
    picture = Image.open(image).convert("RGB")
    inputs = build_inputs(processor, [picture], [prompt], device=device)
    inputs = {k: v.to(model.dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}
    debias = None
    if not no_debias and method != "random":
        profile = profile or _default_profile(model, method)
        debias = Debias(profile=profile, padding=True)
    press = make_press(method, keep, layer, debias)
    with torch.no_grad(), press(model, processor=processor, image_sizes=[picture.size]):
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        prefill_ms = (time.perf_counter() - start) * 1e3
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    selection = press.last_selection
    table = Table(show_header=False)
    table.add_row("answer", answer.strip())
    table.add_row("method", f"{method} (layer {layer})")
    table.add_row(
        "debias",
        "off"
        if debias is None
        else f"padding on, positional {debias.loaded_profile.name if debias.loaded_profile else 'off (no --profile)'}",
    )
    table.add_row("visual tokens", f"{selection[0].num_visual[0]} -> {len(selection[-1].kept[0])}")
    table.add_row("prefill", f"{prefill_ms:.1f} ms")
    console.print(table)


@app.command()
def profiles() -> None:
    """List the built-in positional debiasing profiles."""
    from .debias.profiles import builtin_profiles

    table = Table(title="built-in profiles (arXiv 2508.17807, LLaVA-1.5-7B)")
    for column in ("name", "kind", "L", "sigma", "layer", "query"):
        table.add_column(column)
    for p in builtin_profiles():
        sigma = f"{p.sigma:.3f}" if p.sigma is not None else "-"
        table.add_row(p.name, p.kind, str(p.length), sigma, str(p.layer), str(p.query))
    console.print(table)


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
