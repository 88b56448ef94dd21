"""Where pruning's extra time goes on a GPU: host-device synchronisations, CPU time in vtprune's hooks, and
prefill wall time at several batch sizes, for a LLaVA-1.5-7B-shaped model (random weights).

    python bench/overhead.py --device cuda [--batches 1,8] [--layers 32]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", default="fastv,pdrop,himap,sparsevlm,random")
    parser.add_argument("--trace", action="store_true", help="print the profiler's top CPU ops at batch 1")
    parser.add_argument("--where", action="store_true", help="print the source lines that synchronise most")
    args = parser.parse_args()
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
