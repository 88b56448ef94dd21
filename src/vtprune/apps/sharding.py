"""`vtprune eval` across processes: each process answers a shard of the questions with its own model replica,
and the shards are merged back into one result per setting, in question order.

Two ways to start the processes:

* `vtprune eval --processes N`: vtprune spawns N workers (CPU: the threads are divided among them; CUDA:
  worker k uses cuda:k modulo the visible devices);
* a launcher that starts the command once per process and sets RANK/WORLD_SIZE (`accelerate launch
  --num_processes N -m vtprune.cli eval ...`, `torchrun --nproc_per_node N ...`): each rank answers its shard,
  rank 0 gathers them (torch.distributed, gloo) and writes the results; the other ranks write nothing.

Question i goes to process i mod N. Every question is answered exactly as in a single process (same prompt,
same press, greedy), so answers and accuracy equal the single-process run for `--batch-size 1`; with larger
batches the batches hold other questions, as they would with another batch size. Timings are per process:
the merged prefill and decode times are the median of the processes' medians.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from .evaluation import CellResult, Question, Setting, add_deltas, run_grid


def launched() -> tuple[int, int] | None:
    """(rank, world size) when a launcher started this process as one of several, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world


def shard_indices(count: int, rank: int, world: int) -> list[int]:
    """The questions process `rank` of `world` answers: rank, rank + world, ..."""
    return list(range(rank, count, world))


def process_device(device: str, local_rank: int) -> str:
    """A process's device: a bare 'cuda' becomes its own GPU (local rank modulo the visible GPUs); an explicit
    index or any other device is kept."""
    if device != "cuda":
        return device
    import torch

    count = torch.cuda.device_count() or 1
    return f"cuda:{local_rank % count}"


def merge(shards: Sequence[Sequence[CellResult]], world: int, count: int) -> list[CellResult]:
    """One cell per setting from the shards (shard r, one cell per setting, holds questions r, r + world, ...;
    a process without questions has no cells), in question order; paired differences recomputed on the merged
    answers."""
    from .results import wilson

    def weighted(live, name):
        values = [(getattr(p, name), p.n) for p in live if getattr(p, name) is not None]
        return sum(v * n for v, n in values) / sum(n for _, n in values) if values else None

    def median_of(live, name):
        import numpy as np

        values = [getattr(p, name) for p in live if getattr(p, name) is not None]
        return float(np.median(values)) if values else None

    ranks = [rank for rank, shard in enumerate(shards) if shard]
    merged = []
    for parts in zip(*(shards[rank] for rank in ranks)):
        correct, answers = [0] * count, [""] * count
        for rank, part in zip(ranks, parts):
            for index, hit, answer in zip(shard_indices(count, rank, world), part.correct, part.answers):
                correct[index], answers[index] = hit, answer
        live = [p for p in parts if p.n]
        hits = sum(correct)
        notes = list(dict.fromkeys(note for p in parts for note in p.notes))
        notes.append(
            f"answered by {world} processes (question i by process i mod {world}); prefill and decode "
            "times are the median of the processes' medians"
        )
        first = parts[0]
        merged.append(
            replace(
                first,
                n=count,
                hits=hits,
                accuracy=hits / count if count else 0.0,
                ci=wilson(hits, count),
                visual_tokens=weighted(live, "visual_tokens"),
                equivalent=first.equivalent,
                prefill_ms=median_of(live, "prefill_ms"),
                decode_ms_per_token=median_of(live, "decode_ms_per_token"),
                peak_memory_mib=max(p.peak_memory_mib for p in parts),
                seconds=max(p.seconds for p in parts),
                requests=sum(p.requests for p in parts),
                correct=correct,
                answers=answers,
                notes=notes,
                delta=None,
                baseline=None,
            )
        )
    return add_deltas(merged)


def _run_shard(
    spec: str,
    device: str,
    dtype: str,
    pad_to_square: bool | None,
    threads: int | None,
    questions: Sequence[Question],
    settings: Sequence[Setting],
    batch_size: int,
    max_new_tokens: int,
    state_path: str | None,
    force: bool,
) -> tuple[list[dict], str]:
    """Load the model in this process and run the grid on `questions`; the cells as dicts and the dtype."""
    import torch
    from transformers.utils import logging as hf_logging

    from .loading import load_model, set_pad_to_square

    if threads is not None:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    model, processor = load_model(spec, device=device, dtype=dtype)
    if pad_to_square is not None:
        set_pad_to_square(processor, pad_to_square)
    cells = (
        run_grid(
            model,
            processor,
            questions,
            settings,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            state_path=state_path,
            force=force,
        )
        if questions
        else []
    )
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    return [asdict(c) for c in cells], dtype_name


def _worker(arguments: tuple) -> tuple[int, list[dict], str]:
    rank, *rest = arguments
    cells, dtype = _run_shard(*rest)
    return rank, cells, dtype


def _state(state_dir: Path | None, rank: int, world: int) -> str | None:
    return None if state_dir is None else str(Path(state_dir) / f"cells-{rank}-of-{world}.json")


def run_grid_sharded(
    spec: str,
    questions: Sequence[Question],
    settings: Sequence[Setting],
    *,
    processes: int,
    device: str,
    dtype: str,
    pad_to_square: bool | None = None,
    threads: int | None = None,
    batch_size: int = 1,
    max_new_tokens: int = 16,
    state_dir: Path | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[CellResult] | None, str | None]:
    """The grid over `questions`, answered by several processes and merged: (cells, dtype). Under a launcher
    (`launched()`) this process answers its own shard and rank 0 gathers the others' (the other ranks get
    (None, None)); otherwise `processes` workers are spawned."""
    count = len(questions)
    position = launched()
    if position is not None:
        import torch.distributed as dist

        rank, world = position
        local = process_device(device, int(os.environ.get("LOCAL_RANK", rank)))
        mine = [questions[i] for i in shard_indices(count, rank, world)]
        cells, dtype_name = _run_shard(
            spec,
            local,
            dtype,
            pad_to_square,
            threads,
            mine,
            settings,
            batch_size,
            max_new_tokens,
            _state(state_dir, rank, world),
            force,
        )
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        gathered: list = [None] * world
        dist.all_gather_object(gathered, cells)
        if rank != 0:
            return None, None
        shards = [[CellResult.from_dict(c) for c in part] for part in gathered]
        if progress is not None:
            progress(count * len(settings))
        return merge(shards, world, count), dtype_name
    import multiprocessing

    world = processes
    per_process = threads if threads is not None else max(1, (os.cpu_count() or 1) // world)
    jobs = [
        (
            rank,
            spec,
            process_device(device, rank),
            dtype,
            pad_to_square,
            per_process,
            [questions[i] for i in shard_indices(count, rank, world)],
            list(settings),
            batch_size,
            max_new_tokens,
            _state(state_dir, rank, world),
            force,
        )
        for rank in range(world)
    ]
    results: dict[int, list[CellResult]] = {}
    dtype_name = None
    with multiprocessing.get_context("spawn").Pool(world) as pool:
        for rank, cells, dtype in pool.imap_unordered(_worker, jobs):
            results[rank] = [CellResult.from_dict(c) for c in cells]
            dtype_name = dtype  # every process loads the model in the same dtype
            if log is not None:
                log(f"process {rank + 1} of {world} finished ({len(jobs[rank][6])} questions)")
            if progress is not None:
                progress(len(jobs[rank][6]) * len(settings))
    return merge([results[rank] for rank in range(world)], world, count), dtype_name


__all__ = ["launched", "shard_indices", "process_device", "merge", "run_grid_sharded"]
