"""Running a model over many (image, question) examples, with or without a press, in batches.

One loop serves calibration, bias analysis and accuracy evaluation: it builds the inputs with the model's
processor, enters the press once per batch (with that batch's image sizes, for padding debiasing), runs a
prefill or `generate()`, and turns the press's first-stage selection into one `ScoreRecord` per example.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..adapters.base import VisualSegment
from ..core.press import Press
from .loading import build_inputs, check_input_length


class Example(Protocol):
    """Anything with an RGB PIL `image` and a `question` (the testbed's `Sample`, `datasets.Example`)."""

    image: Any
    question: str


@dataclass
class ScoreRecord:
    """What the first pruning stage saw and did for one example. Arrays run over the example's visual tokens
    (V,) in prompt order; `segments` say which of them belong to which image (offset, length, grid).

    raw: the method's scores before debiasing. debiased: after (None when the press does not debias).
    padding: which tokens are padding (None when unknown: no padding debiasing).
    kept: indices kept by the press (with its debiasing). kept_raw: the top-`keep` of `raw`, what the
    press would keep without debiasing (same count `keep`, no padding cap).
    """

    raw: np.ndarray
    debiased: np.ndarray | None
    padding: np.ndarray | None
    kept: np.ndarray
    kept_raw: np.ndarray
    keep: int
    segments: list[VisualSegment] = field(default_factory=list)


@dataclass
class RunResult:
    """answers: per example, the decoded answer (None for prefill-only runs). records: per example, the first
    stage's `ScoreRecord` (empty without a press, or for presses that do not score, e.g. Random)."""

    answers: list[str | None]
    records: list[ScoreRecord]
    final_tokens: list[int] = field(default_factory=list)  # per example, visual tokens after the last stage


@torch.no_grad()
def run_examples(
    model: nn.Module,
    processor,
    examples: Sequence[Example],
    press: Press | None = None,
    *,
    generate: bool = True,
    max_new_tokens: int = 3,
    batch_size: int = 16,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Run `examples` through `model` (with `press` active, if given), `batch_size` at a time.

    generate: greedy `generate()` with `max_new_tokens` (answers are decoded and stripped); False runs the
    prefill only (calibration, analysis). dry_run: the press decides and records but cuts nothing.
    progress(n) is called after each batch with its size.
    """
    device = next(model.parameters()).device
    answers: list[str | None] = []
    records: list[ScoreRecord] = []
    final_tokens: list[int] = []
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start : start + batch_size])
        images = [example.image for example in batch]
        inputs = build_inputs(processor, images, [example.question for example in batch], device=str(device))
        check_input_length(
            model,
            inputs,
            max_new_tokens if generate else 0,
            [_where(example, start + i) for i, example in enumerate(batch)],
        )
        inputs = {k: v.to(model.dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}
        sizes = [image.size for image in images]
        session = (
            press(model, processor=processor, image_sizes=sizes, dry_run=dry_run)
            if press is not None
            else nullcontext()
        )
        with session:
            if generate:
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                answers += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
            else:
                model(**inputs, logits_to_keep=1)
                answers += [None] * len(batch)
        if press is not None and press.last_selection:
            last = press.last_selection[-1]
            final_tokens += [len(kept) + extra for kept, extra in zip(last.kept, last.extra)]
            if press.last_selection[0].scores[0] is not None:
                records += records_from_selection(press)
        if progress is not None:
            progress(len(batch))
    return RunResult(answers=answers, records=records, final_tokens=final_tokens)


def _where(example, index: int) -> str:
    """How an error names an example: its jsonl line when known, else its index."""
    meta = getattr(example, "meta", None) or {}
    return f"the question on line {meta['line']} of the data" if "line" in meta else f"question {index}"


def timed_prefill(model: nn.Module, inputs: dict) -> float:
    """Milliseconds of one prefill forward of `inputs` (last position's logits only), synchronised on CUDA."""
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(**inputs, logits_to_keep=1)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@dataclass
class Answer:
    """One question answered by `answer_one`: the text, the prefill time (ms) and the press's selection."""

    text: str
    prefill_ms: float
    selection: list  # press.last_selection ([] without a press)


@torch.no_grad()
def answer_one(
    model: nn.Module, processor, image, question: str, press: Press | None = None, *, max_new_tokens: int = 32
) -> Answer:
    """Answer `question` about `image` (greedy), timing a separate prefill (with `press` active, if given)."""
    device = next(model.parameters()).device
    inputs = build_inputs(processor, [image], [question], device=str(device))
    check_input_length(model, inputs, max_new_tokens, ["the question"])
    inputs = {k: v.to(model.dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}
    with press(model, processor=processor, image_sizes=[image.size]) if press is not None else nullcontext():
        prefill_ms = timed_prefill(model, inputs)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    return Answer(text=text, prefill_ms=prefill_ms, selection=list(press.last_selection) if press is not None else [])


@dataclass
class Comparison:
    """One question answered unpruned and with a press (`compare_one`), with prefill timings.

    warmup_ms: the first (cold) unpruned and pruned forwards, not counted; unpruned_ms / pruned_ms: every timed
    prefill (interleaved rounds); sequence_tokens: the prompt's tokens, and after the press's last cut."""

    unpruned: Answer
    pruned: Answer
    warmup_ms: tuple[float, float]
    unpruned_ms: list[float]
    pruned_ms: list[float]
    sequence_tokens: tuple[int, int]

    @property
    def unpruned_median(self) -> float:
        return float(np.median(self.unpruned_ms))

    @property
    def pruned_median(self) -> float:
        return float(np.median(self.pruned_ms))

    @property
    def speedup(self) -> float:
        """Median unpruned prefill time over median pruned prefill time (> 1: the press is faster)."""
        return self.unpruned_median / self.pruned_median


@torch.no_grad()
def compare_one(
    model: nn.Module, processor, image, question: str, press: Press, *, repeats: int = 5, max_new_tokens: int = 32
) -> Comparison:
    """Answer `question` about `image` unpruned and with `press`; time the prefill of each after a warm-up (one
    forward of each, reported apart: the first forward of a process is slow), then `repeats` interleaved
    rounds, so that both see the same machine state."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time at least one prefill")
    device = next(model.parameters()).device
    inputs = build_inputs(processor, [image], [question], device=str(device))
    check_input_length(model, inputs, max_new_tokens, ["the question"])
    inputs = {k: v.to(model.dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}

    def session(pruned: bool):
        return press(model, processor=processor, image_sizes=[image.size]) if pruned else nullcontext()

    def prefill(pruned: bool) -> float:
        with session(pruned):
            return timed_prefill(model, inputs)

    warmup = (prefill(False), prefill(True))
    unpruned_ms, pruned_ms = [], []
    for _ in range(repeats):
        unpruned_ms.append(prefill(False))
        pruned_ms.append(prefill(True))
    selection = list(press.last_selection)
    answers = []
    for pruned in (False, True):
        with session(pruned):
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(
            processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
        )
    length = int(inputs["input_ids"].shape[1])
    final = selection[-1]
    after = length - final.num_visual[0] + len(final.kept[0]) + final.extra[0]
    return Comparison(
        unpruned=Answer(answers[0], float(np.median(unpruned_ms)), []),
        pruned=Answer(answers[1], float(np.median(pruned_ms)), selection),
        warmup_ms=warmup,
        unpruned_ms=unpruned_ms,
        pruned_ms=pruned_ms,
        sequence_tokens=(length, after),
    )


def record_to_json(record: ScoreRecord) -> dict:
    """A `ScoreRecord` as JSON-able data (nan as None), for saved progress."""

    def floats(values):
        return None if values is None else [None if not np.isfinite(v) else float(v) for v in values]

    return {
        "raw": floats(record.raw),
        "debiased": floats(record.debiased),
        "padding": None if record.padding is None else record.padding.astype(int).tolist(),
        "kept": record.kept.tolist(),
        "kept_raw": record.kept_raw.tolist(),
        "keep": int(record.keep),
        "segments": [[s.offset, s.length, list(s.grid), s.image_index] for s in record.segments],
    }


def check_record(record: ScoreRecord) -> ScoreRecord:
    """A ValueError when a record read back from saved progress does not hold together (arrays of different
    lengths, segments outside the visual tokens, kept indices out of range); the record otherwise."""
    length = len(record.raw)
    for name in ("debiased", "padding"):
        values = getattr(record, name)
        if values is not None and len(values) != length:
            raise ValueError(f"{name} has {len(values)} values for {length} visual tokens")
    for segment in record.segments:
        if segment.offset < 0 or segment.length < 1 or segment.offset + segment.length > length:
            raise ValueError(f"segment ({segment.offset}, {segment.length}) lies outside the {length} visual tokens")
    for name in ("kept", "kept_raw"):
        values = getattr(record, name)
        if len(values) and (values.min() < 0 or values.max() >= length):
            raise ValueError(f"{name} holds indices outside the {length} visual tokens")
    return record


def record_from_json(data: dict) -> ScoreRecord:
    """The inverse of `record_to_json` (checked by `check_record`)."""

    def floats(values):
        return None if values is None else np.array([np.nan if v is None else v for v in values], dtype=np.float32)

    return check_record(
        ScoreRecord(
            raw=floats(data["raw"]),
            debiased=floats(data["debiased"]),
            padding=None if data["padding"] is None else np.array(data["padding"], dtype=bool),
            kept=np.array(data["kept"], dtype=np.int64),
            kept_raw=np.array(data["kept_raw"], dtype=np.int64),
            keep=int(data["keep"]),
            segments=[
                VisualSegment(offset=o, length=n, grid=tuple(g), image_index=i) for o, n, g, i in data["segments"]
            ],
        )
    )


def records_from_selection(press: Press) -> list[ScoreRecord]:
    """One `ScoreRecord` per sample of the press's last request (its first stage)."""
    first = press.last_selection[0]
    out = []
    for b, raw in enumerate(first.scores):
        keep = first.keep[b]
        raw_np = raw.cpu().numpy()
        out.append(
            ScoreRecord(
                raw=raw_np,
                debiased=None if first.debiased[b] is None else first.debiased[b].cpu().numpy(),
                padding=None if first.padding[b] is None else first.padding[b].cpu().numpy(),
                kept=first.kept[b].cpu().numpy(),
                kept_raw=np.sort(np.argsort(-raw_np, kind="stable")[:keep]),
                keep=keep,
                segments=list(first.segments[b]) if first.segments else [],
            )
        )
    return out


__all__ = [
    "Example",
    "ScoreRecord",
    "RunResult",
    "Answer",
    "Comparison",
    "run_examples",
    "answer_one",
    "compare_one",
    "records_from_selection",
    "record_to_json",
    "record_from_json",
]
