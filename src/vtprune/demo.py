"""`vtprune demo`: the testbed model answers a few bundled questions unpruned, with FastV, and with debiased
FastV; a table of answers and a PNG per example showing what each press kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .debias import Debias
from .methods import FastV
from .runner import Answer, answer_one


def demo_samples(count: int = 4):
    """The bundled questions: the first test-split questions about one object, half with the evidence in the
    top half of the image and half in the bottom half (a fixed rule, not picked by outcome)."""
    from .testbed.data import make_sample

    wanted = {"top": count // 2, "bottom": count - count // 2}
    chosen, index = [], 0
    while any(wanted.values()):
        sample = make_sample("test", 0, index)
        half = sample.meta["evidence_half"]
        if sample.meta["kind"] != "count" and wanted.get(half, 0) > 0:
            chosen.append(sample)
            wanted[half] -= 1
        index += 1
    return chosen


@dataclass
class DemoRow:
    question: str
    truth: str
    evidence: str
    results: dict[str, Answer]
    picture: Path


def run_demo(model, processor, *, keep: float, profile: str | None, out_dir: Path, layer: int = 2, count: int = 4) -> list[DemoRow]:
    """Answer the bundled questions with each setting; write one PNG per example into `out_dir`."""
    from .adapters import adapter_for
    from .plots import plot_selection

    geometry = adapter_for(model).image_geometry(processor)
    presses = {
        "unpruned": None,
        "FastV": FastV(keep=keep, layer=layer),
        "FastV + debias": FastV(keep=keep, layer=layer, debias=Debias(profile=profile, padding=True)),
    }
    samples = demo_samples(count)
    answer_one(model, processor, samples[0].image, samples[0].question, max_new_tokens=1)  # warm-up for timings
    rows = []
    for number, sample in enumerate(samples, start=1):
        results = {name: answer_one(model, processor, sample.image, sample.question, press, max_new_tokens=3)
                   for name, press in presses.items()}
        first = results["FastV + debias"].selection[0]
        segment = first.segments[0][0]
        padding = first.padding[0].cpu().numpy() if first.padding[0] is not None else None
        panels = [(f"{name}: '{results[name].text}'", results[name].selection[-1].kept[0].cpu().numpy())
                  for name in ("FastV", "FastV + debias")]
        title = f"{sample.question}  (answer: {sample.answer}; evidence in the {sample.meta['evidence_half']} half)"
        picture = plot_selection(sample.image, geometry, segment.grid, panels,
                                 padding[: segment.length] if padding is not None else None,
                                 out_dir / f"example_{number}.png", title)
        rows.append(DemoRow(sample.question, sample.answer, sample.meta["evidence_half"], results, picture))
    return rows


__all__ = ["demo_samples", "run_demo", "DemoRow"]
