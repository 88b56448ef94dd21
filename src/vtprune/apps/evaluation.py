"""Accuracy, speed and memory of a grid of pruning settings on the user's own questions (`vtprune eval`).

Data: a LLaVA-style jsonl (`datasets.load_jsonl`) with an answer on every line, or `testbed` (the synthetic
generator's test split):

    {"image": "a.jpg", "text": "What colour is the car?", "answer": "red"}               exact match
    {"image": "a.jpg", "text": "What colour is the car?", "answers": ["red", "maroon"]}  exact match, any of them
    {"image": "a.jpg", "text": "Which animal?", "choices": ["cat", "dog"], "answer": "B"} multiple choice

Exact match compares `normalize`d texts (lower case, punctuation and articles dropped, number words as
digits). Multiple choice ("choices" or "options"; the answer a letter or one of the options' texts) appends
the lettered options and LLaVA-1.5's instruction to the question and accepts the predicted letter ("B",
"B.", "(B) dog", "The answer is B") or the text of exactly one option. A line without "choices" whose text
already lists options ("A. cat" lines) and whose answer is a letter is scored the same way, its prompt unchanged.

Grid: the unpruned model once, then every method x budget x debias mode ("none", "positional", "padding",
"both"); the attention-free methods (DART, DivPrune, Random) run with "none" only. Each setting is a cell:
accuracy with its Wilson interval, the paired difference of a debiased cell to the same method and budget
without debiasing, the visual tokens left, prefill ms and decode ms per token (medians over requests: CUDA
events on a GPU, wall time elsewhere) and peak memory (CUDA max allocated, or the process RSS sampled every
10 ms). Finished cells are saved under a key of the model, data and generation settings, so an interrupted
or extended grid resumes.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .results import cells_problem, load_cells, paired_delta, save_cells, wilson

#: the debias modes of the grid
DEBIAS_MODES = ("none", "positional", "padding", "both")
#: LLaVA-1.5's multiple-choice instruction (its ScienceQA / MMBench prompts)
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])
}
_ARTICLES = {"a", "an", "the"}


# --- questions and scoring ------------------------------------------------------------------------------
@dataclass
class Question:
    """One question with its accepted answers. `question` is the prompt's text after the image (options
    included for multiple choice); `answers` the accepted answers (for multiple choice: the letter);
    `choices` the options (None: exact match)."""

    image: Image.Image
    question: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "choice" if self.choices is not None else "exact"

    def correct(self, prediction: str | None) -> bool:
        """Whether `prediction` (the model's decoded answer) is right."""
        if prediction is None:
            return False
        if self.choices is not None:
            return choice_letter(prediction, self.choices) == self.answers[0]
        return normalize(prediction) in {normalize(a) for a in self.answers}


def normalize(text: str) -> str:
    """Lower case; thousands separators, punctuation (not decimal points) and articles dropped; number words
    zero..ten as digits; single spaces. 'The Red car.' -> 'red car', 'Two' -> '2', '1,000' -> '1000'."""
    text = str(text).lower().strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"[^\w\s.]", " ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    return " ".join(_NUMBER_WORDS.get(word, word) for word in text.split() if word not in _ARTICLES)


def choice_letter(prediction: str, choices: Sequence[str]) -> str | None:
    """The option a prediction picks: a leading letter ('B', 'B.', '(B) dog'), 'answer is B', or the text of
    exactly one option; None when it picks none (or several)."""
    valid = LETTERS[: len(choices)]
    text = prediction.strip()
    match = re.match(r"^\(?([A-Z])\)?(?=[.:)\s]|$)", text)
    if match and match.group(1) in valid:
        return match.group(1)
    match = re.search(r"answer is:?\s*\(?([A-Z])\b", text)
    if match and match.group(1) in valid:
        return match.group(1)
    said = normalize(text)
    hits = [LETTERS[i] for i, choice in enumerate(choices) if normalize(choice) == said]
    return hits[0] if len(hits) == 1 else None


def _listed_choices(text: str) -> tuple[str, ...] | None:
    """Options listed in a question's text as 'A. cat' / 'B) dog' lines, in order from A; None if there are
    fewer than two."""
    found = re.findall(r"^\s*([A-Z])[.)]\s+(.+?)\s*$", text, flags=re.MULTILINE)
    options: list[str] = []
    for letter, option in found:
        if letter != LETTERS[len(options)]:
            break
        options.append(option)
    return tuple(options) if len(options) >= 2 else None


def question_from_row(image, text: str, answer, answers, choices, where: str) -> Question:
    """A `Question` from one jsonl row's fields; a ValueError naming `where` (file:line) when the answer is
    missing or does not fit the choices."""
    accepted: list[str] = []
    if answers is not None:
        if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int, float)) for a in answers):
            raise ValueError(f'{where}: "answers" must be a non-empty list of strings')
        accepted = [str(a) for a in answers]
    if answer is not None:
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise ValueError(f'{where}: "answer" must be a string, got {answer!r}')
        accepted.insert(0, str(answer))
    if not accepted:
        raise ValueError(f'{where} has no "answer" (or "answers"): vtprune eval needs the correct answer on every line')
    listed = None
    if choices is not None:
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, (str, int, float)) for c in choices)
        ):
            raise ValueError(f'{where}: "choices" must be a list of at least two options')
        if len(choices) > len(LETTERS):
            raise ValueError(f"{where}: {len(choices)} choices; at most {len(LETTERS)} (A-Z)")
        options = tuple(str(c) for c in choices)
        prompt = (
            text + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(options)) + "\n" + CHOICE_INSTRUCTION
        )
    else:
        listed = _listed_choices(text) if len(accepted[0].strip()) == 1 and accepted[0].strip().isupper() else None
        options, prompt = listed, text
    if options is None:
        return Question(image=image, question=text, answers=tuple(accepted))
    gold = accepted[0].strip()
    if gold.upper() in LETTERS[: len(options)] and len(gold) == 1:
        letter = gold.upper()
    else:
        matches = [LETTERS[i] for i, c in enumerate(options) if normalize(c) == normalize(gold)]
        if len(matches) != 1:
            raise ValueError(
                f"{where}: answer {gold!r} is neither a letter A-{LETTERS[len(options) - 1]} nor exactly one of the "
                f"choices {list(options)}"
            )
        letter = matches[0]
    return Question(image=image, question=prompt, answers=(letter,), choices=options)


def load_questions(
    data: str, images: str | Path | None = None, samples: int | None = None, split: str = "test"
) -> list[Question]:
    """The questions of a jsonl file (image paths relative to `images`, default the file's folder; the first
    `samples`, all when None), or of the testbed's `split` (`data="testbed"`, `samples` required)."""
    if samples is not None and samples < 1:
        raise ValueError(f"--samples must be positive, got {samples}")
    if data == "testbed":
        from .datasets import check_testbed_samples, testbed_split

        check_testbed_samples(samples)
        return [
            Question(image=s.image, question=s.question, answers=(s.answer,), meta=dict(s.meta))
            for s in testbed_split(split, samples or 100)
        ]
    from .datasets import load_jsonl

    examples, _ = load_jsonl(data, images, samples)
    out = []
    for example in examples:
        meta = example.meta
        where = f"{data}:{meta.get('line')}"
        choices = meta.get("choices", meta.get("options"))
        out.append(
            question_from_row(example.image, example.question, example.answer, meta.get("answers"), choices, where)
        )
        out[-1].meta = dict(meta)
    return out


def questions_fingerprint(questions: Sequence[Question]) -> str:
    """sha1 over every question's image, prompt and accepted answers."""
    from .calibration import data_fingerprint

    digest = hashlib.sha1(data_fingerprint(questions).encode())
    for q in questions:
        digest.update(repr((q.answers, q.choices)).encode())
    return digest.hexdigest()[:16]


# --- the grid ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One cell of the grid: a registered method (None: the unpruned model) at a budget (a count of 576 or
    a fraction, the methods' `budget=`), debiased as `debias` with the positional `profile` (a built-in name,
    a JSON path or "auto"; used by "positional" and "both")."""

    method: str | None = None
    budget: int | float | None = None
    debias: str = "none"
    profile: str | None = None

    def __post_init__(self) -> None:
        if self.debias not in DEBIAS_MODES:
            raise ValueError(f"debias {self.debias!r}: use {', '.join(DEBIAS_MODES)}")
        if self.debias in ("positional", "both") and not self.profile:
            raise ValueError(f"debias {self.debias!r} needs a positional profile (a name, a JSON path or 'auto')")

    @property
    def key(self) -> str:
        """A stable name: 'unpruned', 'fastv@128/none', 'fastv@128/both[llava-1.5-7b/fastv]'."""
        if self.method is None:
            return "unpruned"
        key = f"{self.method}@{self.budget:g}/{self.debias}"
        return key + (f"[{self.profile}]" if self.debias in ("positional", "both") else "")

    @property
    def label(self) -> str:
        if self.method is None:
            return "unpruned"
        from ..methods import METHODS

        name = METHODS[self.method].__name__ if self.method in METHODS else self.method
        return f"{name} {self.budget:g}" + ("" if self.debias == "none" else f" +{self.debias}")

    def debias_object(self):
        """The `Debias` of this cell, or None."""
        from ..debias import Debias

        positional = self.profile if self.debias in ("positional", "both") else None
        if self.debias == "none":
            return None
        return Debias(profile=positional, padding=self.debias in ("padding", "both"))

    def press(self):
        """The press of this cell (None for the unpruned model)."""
        if self.method is None:
            return None
        from ..methods import method as method_class

        return method_class(self.method).create(budget=self.budget, debias=self.debias_object())


def build_grid(
    methods: Sequence[str], budgets: Sequence[int | float], debias: Sequence[str], profile_for: Callable[[str], str]
) -> tuple[list[Setting], list[str]]:
    """The unpruned setting, then every method x budget x debias mode (methods that rank without attention:
    "none" only); notes say what was left out. profile_for(method) gives the positional profile."""
    from ..methods import method as method_class

    for mode in debias:
        if mode not in DEBIAS_MODES:
            raise ValueError(f"--debias {mode!r}: use {', '.join(DEBIAS_MODES)}")
    settings, notes = [Setting()], []
    for name in methods:
        cls = method_class(name)
        for budget in budgets:
            for mode in debias:
                if mode != "none" and cls.query is None:
                    continue
                profile = profile_for(name) if mode in ("positional", "both") else None
                settings.append(Setting(name, budget, mode, profile))
        if cls.query is None and any(mode != "none" for mode in debias):
            notes.append(f"{name} ranks without attention: it runs without debiasing only")
    return list(dict.fromkeys(settings)), notes


# --- measuring ---------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    """The process's resident set size now (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class Meter:
    """Times every forward of `model` inside the block and measures peak memory.

    A forward whose input is longer than one token is a prefill (the first forward of each `generate()`),
    one of a single token a decode step. On CUDA the times come from CUDA events (read after one
    synchronisation at the end) and the peak from `torch.cuda.max_memory_allocated`; elsewhere from wall time
    and the process RSS sampled every 10 ms (or, without /proc, the process's lifetime peak RSS)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.prefill_ms: list[float] = []
        self.decode_ms: list[float] = []
        self.peak_bytes: int = 0
        self.memory_kind = "cuda max allocated" if self.cuda else "process RSS (sampled)"
        self._open: list = []
        self._marks: list = []
        self._handles: list = []
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _before(self, module, args, kwargs):
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        length = tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else 1
        self._open.append(("prefill" if length > 1 else "decode", self._now()))

    def _after(self, module, args, output):
        if self._open:
            kind, start = self._open.pop()
            self._marks.append((kind, start, self._now()))

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            rss = _rss_bytes()
            if rss is not None:
                self.peak_bytes = max(self.peak_bytes, rss)

    def __enter__(self) -> Meter:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            rss = _rss_bytes()
            if rss is None:
                import resource
                import sys

                self.memory_kind = "process peak RSS (lifetime)"
                scale = 1 if sys.platform == "darwin" else 1024
                self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            else:
                self.peak_bytes = rss
                self._sampler = threading.Thread(target=self._sample, daemon=True)
                self._sampler.start()
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            rss = _rss_bytes()
            self.peak_bytes = max(self.peak_bytes, rss or 0)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.memory_kind.endswith("(lifetime)"):
            import resource
            import sys

            scale = 1 if sys.platform == "darwin" else 1024
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        for kind, start, end in self._marks:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            (self.prefill_ms if kind == "prefill" else self.decode_ms).append(ms)


@dataclass
class CellResult:
    """One measured setting. accuracy and ci in [0, 1]; delta: (mean, low, high) paired difference to
    `baseline` (the same method and budget without debiasing), in [-1, 1]; visual_tokens: mean visual tokens
    after the last stage; equivalent: visual tokens per decoder layer, averaged; prefill_ms: median per
    request (a batch of `batch_size`); decode_ms_per_token: median decode step; peak_memory_mib: as
    `memory_kind` says."""

    key: str
    label: str
    method: str | None
    budget: int | float | None
    debias: str
    profile: str | None
    n: int
    hits: int
    accuracy: float
    ci: tuple[float, float]
    visual_tokens: float | None
    equivalent: float | None
    prefill_ms: float | None
    decode_ms_per_token: float | None
    peak_memory_mib: float
    memory_kind: str
    seconds: float
    batch_size: int
    requests: int
    correct: list[int] = field(default_factory=list, repr=False)
    answers: list[str] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)
    delta: tuple[float, float, float] | None = None
    baseline: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> CellResult:
        cell = cls(**data)
        cell.ci = (cell.ci[0], cell.ci[1])  # JSON gives lists
        cell.delta = None if cell.delta is None else (cell.delta[0], cell.delta[1], cell.delta[2])
        return cell


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


def measure(
    model,
    processor,
    questions: Sequence[Question],
    setting: Setting,
    *,
    batch_size: int = 1,
    max_new_tokens: int = 16,
    progress: Callable[[int], None] | None = None,
) -> CellResult:
    """Answer every question with `setting`'s press (greedy), score, time and measure the run."""
    from ..adapters import adapter_for
    from .runner import run_examples

    press = setting.press()
    adapter = adapter_for(model)
    per_image = getattr(adapter, "tokens_per_image", None)
    start = time.perf_counter()
    with Meter(model) as meter:
        result = run_examples(
            model,
            processor,
            questions,
            press,
            generate=True,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
        )
    seconds = time.perf_counter() - start
    correct = [int(q.correct(a)) for q, a in zip(questions, result.answers)]
    hits = sum(correct)
    equivalent = None
    if press is not None and result.final_tokens:
        visual = float(np.mean(result.final_tokens))
        if per_image:
            equivalent = press.equivalent_tokens(per_image, len(adapter.decoder_layers))
    else:
        visual = float(per_image) if per_image else None
        equivalent = visual
    notes = []
    if meter.prefill_ms and len(meter.prefill_ms) != math.ceil(len(questions) / batch_size):
        notes.append(f"{len(meter.prefill_ms)} prefills timed for {math.ceil(len(questions) / batch_size)} requests")
    return CellResult(
        key=setting.key,
        label=setting.label,
        method=setting.method,
        budget=setting.budget,
        debias=setting.debias,
        profile=setting.profile if setting.debias in ("positional", "both") else None,
        n=len(questions),
        hits=hits,
        accuracy=hits / len(questions),
        ci=wilson(hits, len(questions)),
        visual_tokens=visual,
        equivalent=equivalent,
        prefill_ms=_median(meter.prefill_ms),
        decode_ms_per_token=_median(meter.decode_ms),
        peak_memory_mib=meter.peak_bytes / 2**20,
        memory_kind=meter.memory_kind,
        seconds=seconds,
        batch_size=batch_size,
        requests=math.ceil(len(questions) / batch_size),
        correct=correct,
        answers=[a or "" for a in result.answers],
        notes=notes,
    )


def run_key(model, questions: Sequence[Question], *, batch_size: int, max_new_tokens: int) -> dict:
    """What saved cells must share to be reused: model weights, questions and answers, generation settings,
    device and dtype (timings and memory depend on them)."""
    from .. import __version__
    from .calibration import model_fingerprint

    parameter = next(model.parameters())
    return {
        "model": model_fingerprint(model),
        "data": questions_fingerprint(questions),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "device": parameter.device.type,
        "dtype": str(parameter.dtype),
        "vtprune": __version__,
    }


def warm_up(model, processor, question: Question) -> None:
    """One unpruned generate() (not timed): the first forward of a process is slower than the next ones."""
    from .runner import run_examples

    run_examples(model, processor, [question], None, generate=True, max_new_tokens=2, batch_size=1)


def run_grid(
    model,
    processor,
    questions: Sequence[Question],
    settings: Sequence[Setting],
    *,
    batch_size: int = 1,
    max_new_tokens: int = 16,
    state_path: str | Path | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[CellResult]:
    """Measure every setting (`measure`), in order; cells saved in `state_path` by an earlier run of the same
    model, questions and generation settings are reused unless `force` (progress still advances over them).
    Adds the paired differences (`add_deltas`)."""
    key = run_key(model, questions, batch_size=batch_size, max_new_tokens=max_new_tokens)
    saved = {} if force else load_cells(state_path, key)
    problem = None if force else cells_problem(state_path, key)
    if log and problem:
        log(f"note: {state_path} {problem}: it is replaced by this run's cells (write to another --out to keep it)")
    reused = [s for s in settings if s.key in saved]
    if reused and log:
        log(
            f"resuming: {len(reused)} of {len(settings)} settings were measured in an earlier run ({state_path}); "
            "--force measures them again"
        )
    cells = []
    warmed = False
    for setting in settings:
        if setting.key in saved:
            cells.append(CellResult.from_dict(saved[setting.key]))
            if progress is not None:
                progress(len(questions))
            continue
        if not warmed:
            warm_up(model, processor, questions[0])
            warmed = True
        cell = measure(
            model,
            processor,
            questions,
            setting,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        cells.append(cell)
        if state_path is not None:
            saved[setting.key] = asdict(cell)
            save_cells(state_path, key, saved)
        if log:
            log(f"{cell.label}: {100 * cell.accuracy:.1f}% ({cell.seconds:.0f} s)")
    return add_deltas(cells)


def add_deltas(cells: list[CellResult]) -> list[CellResult]:
    """Set each debiased cell's paired difference to the same method and budget without debiasing."""
    plain = {(c.method, c.budget): c for c in cells if c.method is not None and c.debias == "none"}
    for cell in cells:
        base = plain.get((cell.method, cell.budget))
        if cell.debias != "none" and base is not None:
            cell.delta, cell.baseline = paired_delta(cell.correct, base.correct), base.key
    return cells


# --- reporting ----------------------------------------------------------------------------------------------
CSV_COLUMNS = (
    "key",
    "method",
    "budget",
    "debias",
    "profile",
    "n",
    "accuracy",
    "ci_low",
    "ci_high",
    "delta",
    "delta_low",
    "delta_high",
    "baseline",
    "visual_tokens",
    "equivalent",
    "prefill_ms",
    "decode_ms_per_token",
    "prefill_speedup",
    "peak_memory_mib",
    "memory_kind",
    "batch_size",
    "seconds",
)


def speedup(cell: CellResult, cells: Sequence[CellResult]) -> float | None:
    """The unpruned cell's median prefill time over this cell's (> 1: faster)."""
    base = next((c for c in cells if c.method is None), None)
    if base is None or not base.prefill_ms or not cell.prefill_ms:
        return None
    return base.prefill_ms / cell.prefill_ms


def csv_rows(cells: Sequence[CellResult]) -> list[dict]:
    rows = []
    for c in cells:
        delta = c.delta or (None, None, None)
        rows.append(
            {
                "key": c.key,
                "method": c.method or "",
                "budget": "" if c.budget is None else c.budget,
                "debias": c.debias,
                "profile": c.profile or "",
                "n": c.n,
                "accuracy": c.accuracy,
                "ci_low": c.ci[0],
                "ci_high": c.ci[1],
                "delta": delta[0],
                "delta_low": delta[1],
                "delta_high": delta[2],
                "baseline": c.baseline or "",
                "visual_tokens": c.visual_tokens,
                "equivalent": c.equivalent,
                "prefill_ms": c.prefill_ms,
                "decode_ms_per_token": c.decode_ms_per_token,
                "prefill_speedup": speedup(c, cells),
                "peak_memory_mib": c.peak_memory_mib,
                "memory_kind": c.memory_kind,
                "batch_size": c.batch_size,
                "seconds": c.seconds,
            }
        )
    return rows


def write_results(out_dir: str | Path, cells: Sequence[CellResult], meta: dict) -> tuple[Path, Path]:
    """results.json (settings, every cell with its per-question answers and scores) and results.csv (one row
    per cell) in `out_dir`, each written atomically."""
    from ..io import atomic_open, atomic_write_json

    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / "results.json", out_dir / "results.csv"
    atomic_write_json(json_path, {"meta": meta, "cells": [asdict(c) for c in cells]})
    with atomic_open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in csv_rows(cells):
            writer.writerow(
                {k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
    return json_path, csv_path


def table_rows(cells: Sequence[CellResult]) -> list[tuple[str, ...]]:
    """Rows of the printed table: setting, accuracy % [95% CI], paired difference (points, 95%), visual
    tokens (after the last stage / per decoder layer, averaged), prefill ms (speed-up over unpruned),
    decode ms/token, peak MiB."""
    rows: list[tuple[str, ...]] = []
    for c in cells:
        accuracy = f"{100 * c.accuracy:.1f} [{100 * c.ci[0]:.1f}, {100 * c.ci[1]:.1f}]"
        delta = "" if c.delta is None else f"{100 * c.delta[0]:+.1f} [{100 * c.delta[1]:+.1f}, {100 * c.delta[2]:+.1f}]"
        tokens = "" if c.visual_tokens is None else f"{c.visual_tokens:.0f}"
        if c.equivalent is not None and c.method is not None:
            tokens += f" / {c.equivalent:.0f}"
        gain = speedup(c, cells)
        prefill = (
            ""
            if c.prefill_ms is None
            else f"{c.prefill_ms:.1f}" + ("" if gain is None or c.method is None else f" ({gain:.2f}x)")
        )
        decode = "" if c.decode_ms_per_token is None else f"{c.decode_ms_per_token:.1f}"
        rows.append((c.label, accuracy, delta, tokens, prefill, decode, f"{c.peak_memory_mib:.0f}"))
    return rows


TABLE_COLUMNS = (
    "setting",
    "accuracy % [95% CI]",
    "vs no debias (pts)",
    "visual tokens (last / per layer)",
    "prefill ms",
    "decode ms/tok",
    "peak MiB",
)


def markdown_table(cells: Sequence[CellResult]) -> str:
    """The printed table as Markdown (README, notes)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|---" * len(TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(cells)]
    return "\n".join(lines)


__all__ = [
    "DEBIAS_MODES",
    "CHOICE_INSTRUCTION",
    "Question",
    "normalize",
    "choice_letter",
    "question_from_row",
    "load_questions",
    "Setting",
    "build_grid",
    "Meter",
    "CellResult",
    "measure",
    "run_grid",
    "add_deltas",
    "write_results",
    "table_rows",
    "markdown_table",
    "TABLE_COLUMNS",
    "csv_rows",
    "speedup",
]
