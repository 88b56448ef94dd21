"""Where pruning's extra time goes on a GPU: host-device synchronisations, CPU time in vtprune's hooks, and
prefill wall time at several batch sizes, for a LLaVA-1.5-7B-shaped model (random weights).

    python bench/overhead.py --device cuda [--batches 1,8] [--layers 32]
    python bench/overhead.py --ops [--methods fastv,pdrop] [--markdown ops.md]   # CPU op counts, any machine

`--ops` counts the aten ops one prefill dispatches (a TorchDispatchMode) on a tiny random LLaVA with
LLaVA-1.5's geometry (576 visual tokens, 8 decoder layers, vision tower included) at budget 128, after one
warm-up prefill: the extra ops
each press adds over the unpruned forward at batch 1 and 8, per stage, and the ops that force a host sync
(item/tolist, nonzero, boolean indexing, ...). The counts do not depend on the machine.

At batch 1 a 7B prefill of ~600 tokens on a recent GPU is bound by Python/kernel-launch time rather than by
arithmetic, so cutting tokens cannot pay off there and any host synchronisation the engine adds shows
directly; larger batches (or more visual tokens) are arithmetic-bound. The table makes that visible.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table

from prefill import build_model, prompt_ids
from vtprune.methods import METHODS
from vtprune.core.selection.opcount import OpCounter


def count_syncs(fn) -> tuple[int, list[tuple[str, int]]]:
    """Host-device synchronisations during fn() (CUDA only), counted through torch's sync debug mode, and the
    source lines that caused the most of them."""
    from collections import Counter

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = Counter(f"{w.filename.split('site-packages/')[-1].split('src/')[-1]}:{w.lineno}" for w in syncs)
    return len(syncs), sites.most_common(6)


def count_ops(model, inputs, press=None) -> tuple[int, int]:
    """(ops, sync-type ops) of one prefill (`press` active, or unpruned), at steady state: after one warm-up
    prefill of the same shapes (what a press caches per layout, such as its debiasing tables, is made once)."""
    counter = OpCounter(count_tolist=True)  # tolist reads a CPU tensor without an op, but syncs on a GPU
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if press is None:
            model(**inputs, logits_to_keep=1)
            with counter:
                model(**inputs, logits_to_keep=1)
        else:
            with press(model):
                model(**inputs, logits_to_keep=1)
                with counter:
                    model(**inputs, logits_to_keep=1)
    return counter.total, counter.syncs


def tiny_llava(layers: int = 8):
    """A tiny random LLaVA with LLaVA-1.5's geometry: 336 px images, 14 px patches (576 visual tokens), [CLS]."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from prefill import IMAGE_TOKEN

    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    text = LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def main_ops(args) -> None:
    """The op table: extra aten ops per press over the unpruned prefill, at batch 1 and 8 (CPU, any machine)."""
    from vtprune import Debias

    model = tiny_llava(args.layers or 8)
    depth = len(model.model.language_model.layers)
    batches = [int(b) for b in args.batches.split(",")]
    inputs = {}
    for batch in batches:
        ids = prompt_ids().expand(batch, -1).contiguous()
        pixels = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(0))
        inputs[batch] = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    base = {batch: count_ops(model, inputs[batch]) for batch in batches}
    names = args.methods.split(",") if args.methods else list(METHODS)
    configs = []
    for name in names:
        cls = METHODS[name]
        configs.append((cls.__name__, cls(budget=128)))
        if cls.query is not None and args.auto:
            configs.append((f"{cls.__name__} + auto", cls(budget=128, debias=Debias(profile="auto", padding=False))))
    columns = ["press", "stages"] + [f"extra ops b{b}" for b in batches] + [f"per stage b{b}" for b in batches]
    columns += [f"sync ops b{b}" for b in batches] + [f"b{batches[-1]} / b{batches[0]}"]
    cells = []
    for label, press in configs:
        stages = len(press.stages(depth)) + len(press.vision_stages(2))
        counts = {batch: count_ops(model, inputs[batch], press) for batch in batches}
        extra = {batch: counts[batch][0] - base[batch][0] for batch in batches}
        syncs = {batch: counts[batch][1] - base[batch][1] for batch in batches}
        ratio = extra[batches[-1]] / max(extra[batches[0]], 1)
        cells.append([label, str(stages)] + [f"{extra[b]:,}" for b in batches]
                     + [f"{extra[b] / stages:,.0f}" for b in batches] + [str(syncs[b]) for b in batches] + [f"{ratio:.2f}"])
    title = (f"aten ops per prefill, tiny LLaVA with LLaVA-1.5's geometry (576 visual tokens, {depth} decoder layers, "
             f"vision tower included), budget 128; unpruned: " + ", ".join(f"{base[b][0]:,} at batch {b}" for b in batches))
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    Console(width=160).print(table)
    if args.markdown:
        lines = [f"{title}.", "", "| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        with open(args.markdown, "w") as handle:
            handle.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", default="fastv,pdrop,himap,sparsevlm,random")
    parser.add_argument("--trace", action="store_true", help="print the profiler's top CPU ops at batch 1")
    parser.add_argument("--where", action="store_true", help="print the source lines that synchronise most")
    parser.add_argument("--ops", action="store_true", help="count aten ops per press on CPU (the op table) instead")
    parser.add_argument("--auto", action="store_true", help="with --ops: also every attention method + auto debiasing")
    parser.add_argument("--markdown", default=None, help="with --ops: also write the table as Markdown")
    args = parser.parse_args()
    if args.ops:
        args.layers = None if args.layers == 32 else args.layers
        args.methods = None if args.methods == parser.get_default("methods") else args.methods
        return main_ops(args)
    on_gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = build_model(args.layers, dtype, args.device)
    configs = [("unpruned", None)] + [(f"{METHODS[m].__name__} 128", METHODS[m](budget=128)) for m in args.methods.split(",")]
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = prompt_ids().to(args.device).expand(batch, -1).contiguous()
        pixel_values = torch.randn(batch, 3, 336, 336, dtype=dtype, device=args.device)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_encoder_outputs={"image": features})

        def prefill(press):
            with torch.no_grad():
                if press is None:
                    model(**inputs, logits_to_keep=1)
                else:
                    with press(model):
                        model(**inputs, logits_to_keep=1)

        times = {label: [] for label, _ in configs}
        for round_index in range(args.repeats + 1):
            for label, press in configs:
                if on_gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                prefill(press)
                if on_gpu:
                    torch.cuda.synchronize()
                if round_index:
                    times[label].append(time.perf_counter() - start)
        for label, press in configs:
            syncs, sites = count_syncs(lambda: prefill(press)) if on_gpu else (None, [])
            if args.where and sites:
                print(f"batch {batch} {label}: {syncs} syncs, most at {sites}")
            rows.append((batch, label, statistics.median(times[label]) * 1e3, syncs))
        if args.trace and batch == 1:
            from torch.profiler import ProfilerActivity, profile

            for label, press in configs[:2]:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
                with profile(activities=activities) as prof:
                    prefill(press)
                print(f"--- {label}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    base = {b: ms for b, label, ms, _ in rows if label == "unpruned"}
    table = Table(title=f"prefill overhead, {args.layers} layers, {str(dtype).split('.')[-1]}, "
                        f"{torch.cuda.get_device_name() if on_gpu else 'CPU'}, median of {args.repeats}")
    for column in ("batch", "config", "prefill ms", "time ratio", "host syncs"):
        table.add_column(column, justify="right")
    for batch, label, ms, syncs in rows:
        table.add_row(str(batch), label, f"{ms:.1f}", f"{ms / base[batch]:.3f}", "" if syncs is None else str(syncs))
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
