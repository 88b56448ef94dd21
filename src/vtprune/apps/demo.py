"""`vtprune demo`: what debiasing changes, measured in about a minute on a CPU.

testbed-lm (the shipped small LLaVA on the pretrained SmolLM2-135M, whose attention has the recency bias and the
padding sink of the paper) answers the first N held-out test questions (default 48) three ways, each as one
batch: unpruned, with FastV keeping a quarter of the visual tokens, and with the same FastV debiased (padding
plus the model's calibrated positional profile). It reports each accuracy with its 95% Wilson interval and the
paired difference debiased - plain with its 95% interval, and draws the questions whose two FastV answers differ,
chosen by a fixed rule (`differing_questions`), never by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..debias import Debias
from ..methods import FastV
from .results import paired_delta, wilson
from .runner import RunResult, run_examples

PLAIN, DEBIASED = "FastV", "FastV + debias"


@dataclass
class DemoPicture:
    """One drawn question: its number in the test split, the question, the true answer, each setting's answer,
    whether debiasing fixed (+1) or broke (-1) the answer (0: both wrong), and the PNG."""

    number: int
    question: str
    truth: str
    answers: dict[str, str]
    direction: int
    path: Path


@dataclass
class DemoResult:
    model: str
    keep: float
    profile: str
    questions: int
    accuracy: dict[str, tuple[float, float, float]]  # setting -> (accuracy, low, high), fractions
    delta: tuple[float, float, float]  # paired difference debiased - plain (mean, low, high), fractions
    differing: int  # questions on which the two FastV answers differ
    fixed: int  # ... of which debiasing answers right and plain FastV wrong
    broke: int  # ... and the reverse
    pictures: list[DemoPicture] = field(default_factory=list)
    kept_tokens: dict[str, float] = field(default_factory=dict)  # setting -> mean visual tokens kept
    visual_tokens: int = 0


def differing_questions(
    plain: Sequence[bool], debiased: Sequence[bool], answers_differ: Sequence[bool], count: int
) -> list[int]:
    """The rule that picks the questions to draw: among the questions whose two FastV answers differ, in
    test-split order, alternately the next one debiasing fixed (plain wrong, debiased right) and the next one
    it broke (plain right, debiased wrong), starting with a fixed one, while both kinds remain; then the rest of
    whichever kind remains; then differing questions both answer wrongly. At most `count`."""
    fixed = [i for i, d in enumerate(answers_differ) if d and debiased[i] and not plain[i]]
    broke = [i for i, d in enumerate(answers_differ) if d and plain[i] and not debiased[i]]
    neither = [i for i, d in enumerate(answers_differ) if d and not plain[i] and not debiased[i]]
    chosen: list[int] = []
    while (fixed or broke) and len(chosen) < count:
        for queue in (fixed, broke):
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen + neither[: count - len(chosen)]


def demo_presses(keep: float, profile: str, layer: int = 2) -> dict[str, FastV | None]:
    """The three settings: unpruned, FastV at `keep`, and the same FastV debiased (padding + `profile`)."""
    return {
        "unpruned": None,
        PLAIN: FastV(keep=keep, layer=layer),
        DEBIASED: FastV(keep=keep, layer=layer, debias=Debias(profile=profile, padding=True)),
    }


def run_demo(
    model,
    processor,
    *,
    model_name: str,
    keep: float = 0.25,
    profile: str,
    questions: int = 48,
    pictures: int = 4,
    out_dir: Path,
    batch_size: int = 48,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Answer the first `questions` test questions with each setting (batches of `batch_size`), measure, and
    write up to `pictures` PNGs of differing questions into `out_dir` (`differing_questions` picks them)."""
    from .datasets import testbed_split

    samples = testbed_split("test", questions)
    runs: dict[str, RunResult] = {}
    for name, press in demo_presses(keep, profile).items():
        if progress is not None:
            progress(name)
        runs[name] = run_examples(
            model, processor, samples, press, generate=True, max_new_tokens=3, batch_size=batch_size
        )
    correct = {name: [int(a == s.answer) for a, s in zip(run.answers, samples)] for name, run in runs.items()}
    accuracy = {name: (sum(c) / len(c), *wilson(sum(c), len(c))) for name, c in correct.items()}
    plain, debiased = correct[PLAIN], correct[DEBIASED]
    differ = [a != b for a, b in zip(runs[PLAIN].answers, runs[DEBIASED].answers)]
    chosen = differing_questions([bool(c) for c in plain], [bool(c) for c in debiased], differ, pictures)
    drawn = [_draw(model, processor, samples[i], i, runs, out_dir) for i in sorted(chosen)]
    visual = len(runs[PLAIN].records[0].raw) if runs[PLAIN].records else 0
    return DemoResult(
        model=model_name,
        keep=keep,
        profile=profile,
        questions=len(samples),
        accuracy=accuracy,
        delta=paired_delta(debiased, plain),
        differing=sum(differ),
        fixed=sum(1 for d, p, q in zip(differ, plain, debiased) if d and q and not p),
        broke=sum(1 for d, p, q in zip(differ, plain, debiased) if d and p and not q),
        pictures=drawn,
        visual_tokens=visual,
        kept_tokens={
            name: sum(len(r.kept) for r in run.records) / len(run.records) for name, run in runs.items() if run.records
        },
    )


def _draw(model, processor, sample, index: int, runs: dict[str, RunResult], out_dir: Path) -> DemoPicture:
    """The image as the model sees it, once per FastV setting: its kept tokens bright, padding crossed out."""
    from ..adapters import adapter_for
    from .plots import plot_selection

    answers = {name: run.answers[index] or "" for name, run in runs.items()}
    plain_right, debiased_right = answers[PLAIN] == sample.answer, answers[DEBIASED] == sample.answer
    direction = 1 if debiased_right and not plain_right else -1 if plain_right and not debiased_right else 0
    record = runs[DEBIASED].records[index]
    segment = record.segments[0]
    padding = record.padding[: segment.length] if record.padding is not None else None
    mark = {True: "right", False: "wrong"}
    panels = [
        (f"{name}: '{answers[name]}' ({mark[answers[name] == sample.answer]})", runs[name].records[index].kept)
        for name in (PLAIN, DEBIASED)
    ]
    verdict = {1: "debiasing fixed the answer", -1: "debiasing broke the answer", 0: "both wrong"}[direction]
    title = (
        f"test question {index + 1}: {sample.question} (answer: {sample.answer}; unpruned: "
        f"'{answers['unpruned']}')\n{verdict}"
    )
    path = plot_selection(
        sample.image,
        adapter_for(model).image_geometry(processor),
        segment.grid,
        panels,
        padding,
        out_dir / f"question_{index + 1}.png",
        title,
    )
    return DemoPicture(index + 1, sample.question, sample.answer, answers, direction, path)


def summary_lines(result: DemoResult) -> list[str]:
    """The demo's report: one summary line, then one line on the differing answers."""

    def pct(value: float) -> str:
        return f"{100 * value:.1f}"

    parts = []
    for name, (acc, low, high) in result.accuracy.items():
        parts.append(f"{name} {pct(acc)}% [{pct(low)}, {pct(high)}]")
    d, dlo, dhi = result.delta
    budget = (
        f"{100 * result.keep:g}% of {result.visual_tokens} visual tokens"
        if result.visual_tokens
        else f"keep {result.keep:g}"
    )
    lines = [
        f"{result.model}, {result.questions} held-out questions, FastV keeping {budget}: "
        + "; ".join(parts)
        + f"; debiasing {100 * d:+.1f} points [{100 * dlo:+.1f}, {100 * dhi:+.1f}] (paired, 95%)",
        f"the two FastV answers differ on {result.differing} questions: debiasing fixed {result.fixed} and broke "
        f"{result.broke}",
    ]
    return lines


__all__ = [
    "DemoPicture",
    "DemoResult",
    "PLAIN",
    "DEBIASED",
    "differing_questions",
    "demo_presses",
    "run_demo",
    "summary_lines",
]
