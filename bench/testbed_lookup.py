"""Where the shipped testbed model looks when it answers: the share of the last token's attention over the
visual tokens that lands on the object the question is about, per decoder layer and head.

    python bench/testbed_lookup.py [--n 400]

Questions addressed by region ("What shape is in the top left?") and by object ("What colour is the
triangle?") are compared; the object's patches are those its shape and colour cover, rendered through the processor's geometry (`vtprune.testbed.train.patch_targets`). A head that
ignores content would put about the object's area share on it. Eager attention on a tiny model, a minute on
2 CPU cores.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vtprune.testbed.data import COLOURS, SHAPES, make_split, prompt_for
from vtprune.testbed.model import load_testbed
from vtprune.testbed.train import patch_targets


def object_patches(sample) -> np.ndarray | None:
    """(G*G,) bool: the patches of the object the question is about (its shape and colour), or None for kinds
    without one object (counting, "is there")."""
    if sample.meta["kind"] not in ("colour_of_shape", "shape_in_region", "colour_in_region"):
        return None
    colour, shape = patch_targets(sample)
    box = tuple(sample.meta["evidence_box"])
    obj = next(o for o in sample.meta["objects"] if tuple(o["box"]) == box)
    return (shape == 1 + SHAPES.index(obj["shape"])) & (colour == 1 + list(COLOURS).index(obj["colour"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=400, help="test questions to look through")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, processor = load_testbed()
    model.set_attn_implementation("eager")  # a diagnostic: the full attention of a tiny model
    shares: dict[str, list[np.ndarray]] = {}
    areas: dict[str, list[float]] = {}
    for sample in make_split("test", args.n):
        mask = object_patches(sample)
        if mask is None or not mask.any():
            continue
        inputs = processor(images=[sample.image], text=[prompt_for(sample.question)], return_tensors="pt")
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions  # per layer (1, H, N, N)
        visual = inputs["input_ids"][0] == model.config.image_token_id
        target = torch.from_numpy(mask)
        per_layer = []
        for layer in attentions:
            to_visual = layer[0, :, -1, visual]  # (H, V)
            per_layer.append((to_visual[:, target].sum(-1) / to_visual.sum(-1)).numpy())
        kind = sample.meta["kind"]
        shares.setdefault(kind, []).append(np.stack(per_layer))  # (layers, H)
        areas.setdefault(kind, []).append(float(mask.mean()))

    table = Table(title="share of the last token's visual attention on the asked-about object (mean over questions; per layer, the best head)")
    table.add_column("question kind")
    table.add_column("n", justify="right")
    table.add_column("object area", justify="right")
    layers = next(iter(shares.values()))[0].shape[0]
    for layer in range(layers):
        table.add_column(f"layer {layer}", justify="right")
    for kind, values in sorted(shares.items()):
        mean = np.mean(values, axis=0)  # (layers, H)
        table.add_row(kind, str(len(values)), f"{np.mean(areas[kind]):.3f}", *(f"{row.max():.2f}" for row in mean))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
