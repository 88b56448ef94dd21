"""Aten ops dispatched by each batched selection function (`vtprune.core.selection`, `debias.fit.auto_trend`) at
batch 1 and 8, at LLaVA-1.5's geometry (576 visual tokens per image, budget 128), with the sync-type ops in their
own column, next to the current per-sample code run on each sample in turn where it is one function call.
Counts do not depend on the machine (a TorchDispatchMode counter).

    python bench/selection_ops.py [--markdown FILE]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from vtprune.adapters.base import VisualSegment
from vtprune.debias import Debias
from vtprune.methods.divprune import max_min_diverse
from vtprune.methods.sparsevlm import density_peak_clusters as density_peak_clusters_one
from vtprune.methods.tokencarve import TokenCarve
from vtprune.core.selection import (auto_trend, borda, carve_merge, count_ops, dart_select, illava_merge, information,
                               max_min_select, recycle, recycle_sizes, visionzip_select)

TOKENS, BUDGET, WIDTH, TEXT = 576, 128, 64, 30


def cases(batch: int, generator: torch.Generator):
    """(name, batched call, per-sample call or None) at this batch size."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    valid = torch.ones(batch, TOKENS, dtype=torch.bool)
    ranks = torch.arange(TOKENS).expand(batch, TOKENS)
    scores, features = rand(batch, TOKENS) + 0.01, randn(batch, TOKENS, WIDTH)
    segments = [VisualSegment(offset=0, length=TOKENS, grid=(24, 24), image_index=0)]
    yield ("auto debias (auto_trend)",
           lambda: auto_trend(scores, valid, ranks, torch.zeros(batch, 1, dtype=torch.long),
                              torch.full((batch, 1), TOKENS)),
           lambda: Debias._auto_trends(list(scores), list(ranks), [segments] * batch, [None] * batch))
    yield ("DivPrune (max_min_select)", lambda: max_min_select(features, valid, BUDGET),
           lambda: [max_min_diverse(f, BUDGET) for f in features])
    kept = torch.argsort(scores, dim=1, descending=True)[:, :303]  # SparseVLM's first stage at 128: 303 stay
    pruned = torch.ones(batch, TOKENS, dtype=torch.bool).scatter(1, kept, False)
    n, m = recycle_sizes(TOKENS - 303)

    def recycle_per_sample():
        for b in range(batch):
            order = torch.argsort(torch.where(pruned[b], scores[b].double(), float("-inf")), descending=True, stable=True)
            values = features[b, order[:n]]
            centres, assignment = density_peak_clusters_one(values, m)
            members = torch.zeros(n, m).scatter_(1, assignment[:, None], 1.0)
            (members.T @ values) / members.sum(dim=0)[:, None]

    yield "SparseVLM recycling (recycle)", lambda: recycle(scores, pruned, features, n, m), recycle_per_sample
    size = TOKENS + TEXT + 40
    slots = torch.randperm(size, generator=generator)
    dart_inputs = dict(
        units=torch.nn.functional.normalize(randn(batch, size, WIDTH), dim=-1), norms=rand(batch, size),
        prompt_positions=torch.arange(size).expand(batch, size), visual_slots=slots[:TOKENS].expand(batch, TOKENS),
        visual_valid=valid, text_slots=slots[TOKENS: TOKENS + TEXT].expand(batch, TEXT),
        text_valid=torch.ones(batch, TEXT, dtype=torch.bool), claims=BUDGET // 8)
    yield "DART official (dart_select)", lambda: dart_select(**dart_inputs), None
    yield "DART ranked (dart_select)", lambda: dart_select(**dart_inputs, pivot_order="ranked"), None
    keys = randn(batch, TOKENS, 16)
    yield ("VisionZip (visionzip_select)", lambda: visionzip_select(scores, valid, keys, features, 107, 20, 107, 20),
           None)

    def carve_per_sample():
        press = TokenCarve()
        for b in range(batch):
            fused = press._borda(scores[b], TokenCarve.information(features[b]))
            candidates = torch.argsort(fused, descending=True, stable=True)[: BUDGET * 3 // 2]
            TokenCarve._merge(features[b], ranks[b], candidates, BUDGET, features.dtype)

    yield ("TokenCarve (information, borda, carve_merge)",
           lambda: carve_merge(borda(scores, information(features, valid), valid), features, valid, BUDGET, BUDGET),
           carve_per_sample)
    yield "iLLaVA (illava_merge)", lambda: illava_merge(scores, valid, features, BUDGET, BUDGET), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", help="also write the table as markdown to this file")
    args = parser.parse_args()
    counts = {}
    for batch in (1, 8):
        for name, batched, per_sample in cases(batch, torch.Generator().manual_seed(0)):
            new = count_ops(batched)
            old = count_ops(per_sample) if per_sample is not None else None
            counts[name, batch] = (new.total, new.syncs, None if old is None else (old.total, old.syncs))
    names = list(dict.fromkeys(name for name, _ in counts))
    header = ["function", "ops B=1", "ops B=8", "sync ops B=1 / B=8", "per-sample code B=1", "per-sample code B=8"]
    rows = []
    for name in names:
        (one, sync_one, old_one), (eight, sync_eight, old_eight) = counts[name, 1], counts[name, 8]
        def old(value):
            return "-" if value is None else f"{value[0]:,} ({value[1]} sync)"
        rows.append([name, f"{one:,}", f"{eight:,}", f"{sync_one} / {sync_eight}", old(old_one), old(old_eight)])
    table = Table(title=f"aten ops per call, {TOKENS} visual tokens per image, budget {BUDGET}")
    for column in header:
        table.add_column(column, justify="left" if column == "function" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)
    if args.markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        with open(args.markdown, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
