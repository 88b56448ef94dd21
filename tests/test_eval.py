"""`vtprune eval`: scoring, the grid, timing hooks, resumable cells, the CLI on the testbed; the warning for
padding debiasing with a processor that never pads; `set_pad_to_square`."""

from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch
from conftest import IMAGE_PX, build_processor, inputs_for, make_image, prompt
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.apps.evaluation import (
    Meter,
    Question,
    Setting,
    build_grid,
    choice_letter,
    normalize,
    question_from_row,
)
from vtprune.apps.results import paired_delta

runner = CliRunner()


# --- scoring ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The Red car.", "red car"), ("Two", "2"), ("1,000", "1000"), ("3.5 meters", "3.5 meters"), ("  yes! ", "yes"),
    ("A dog's toy", "dog s toy"),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("B.", "B"), ("(B) dog", "B"), ("B) dog", "B"), ("The answer is C", "C"), ("dog", "B"),
    ("Dog.", "B"), ("E", None), ("I think so", None), ("cat or dog", None), ("", None),
])
def test_choice_letter(prediction, letter):
    assert choice_letter(prediction, ["cat", "dog", "bird"]) == letter


def test_questions_from_rows():
    image = make_image(20, 10)
    exact = question_from_row(image, "What colour?", "Red", None, None, "f:1")
    assert exact.kind == "exact" and exact.correct("red.") and not exact.correct("blue") and not exact.correct(None)
    several = question_from_row(image, "How many?", None, ["2", "two dogs"], None, "f:2")
    assert several.correct("Two") and several.correct("two dogs") and not several.correct("3")
    choice = question_from_row(image, "Which animal?", "dog", None, ["cat", "dog"], "f:3")
    assert choice.kind == "choice" and choice.answers == ("B",)
    assert choice.question == "Which animal?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
    assert choice.correct("B") and choice.correct("dog") and not choice.correct("A")
    listed = question_from_row(image, "Which animal?\nA. cat\nB. dog\nAnswer with the letter.", "A", None, None, "f:4")
    assert listed.kind == "choice" and listed.choices == ("cat", "dog") and listed.question.startswith("Which animal?\nA.")
    assert listed.correct("A.") and not listed.correct("B")


@pytest.mark.parametrize("answer, answers, choices, message", [
    (None, None, None, 'f:7 has no "answer"'),
    ("E", None, ["cat", "dog"], "neither a letter A-B nor exactly one of the choices"),
    ("x", None, ["cat"], "at least two options"),
    (None, [], None, "non-empty list"),
    (["a"], None, None, "must be a string"),
])
def test_question_errors(answer, answers, choices, message):
    with pytest.raises(ValueError, match=message):
        question_from_row(make_image(4, 4), "q", answer, answers, choices, "f:7")


def test_paired_delta_needs_the_same_questions():
    assert paired_delta([1, 1, 0], [1, 0, 0])[0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same questions"):
        paired_delta([1, 0], [1])


# --- the grid ----------------------------------------------------------------------------------------------
def test_grid():
    settings, notes = build_grid(["fastv", "random"], [128, 64], ["none", "both", "padding"], lambda m: f"P/{m}")
    keys = [s.key for s in settings]
    assert keys[0] == "unpruned"
    assert "fastv@128/both[P/fastv]" in keys and "fastv@64/padding" in keys and "random@64/none" in keys
    assert not any(k.startswith("random") and not k.endswith("/none") for k in keys)
    assert len(keys) == 1 + 2 * 3 + 2 and len(set(keys)) == len(keys)
    assert notes == ["random ranks without attention: it runs without debiasing only"]
    both = next(s for s in settings if s.key == "fastv@128/both[P/fastv]")
    assert both.label == "FastV 128 +both"
    with pytest.raises(ValueError, match="debias 'half'"):
        build_grid(["fastv"], [128], ["half"], lambda m: "auto")
    with pytest.raises(ValueError, match="needs a positional profile"):
        Setting("fastv", 128, "positional")


def test_setting_presses():
    from vtprune import FastV

    assert Setting().press() is None
    press = Setting("fastv", 64, "positional", "auto").press()
    assert isinstance(press, FastV) and press.debias.profile == "auto" and not press.debias.padding
    assert Setting("fastv", 64, "padding").press().debias.profile is None
    assert Setting("fastv", 64, "none").press().debias is None


# --- measuring ---------------------------------------------------------------------------------------------
def test_meter_times_prefill_and_decode(model, processor):
    inputs = inputs_for(processor, [make_image(120, 60), make_image(60, 90, 1)], [prompt(), prompt("a b")])
    with Meter(model) as meter, torch.no_grad():
        for _ in range(2):
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert len(meter.prefill_ms) == 2 and len(meter.decode_ms) == 6  # one prefill and 3 decode steps per call
    assert all(ms > 0 for ms in meter.prefill_ms + meter.decode_ms)
    assert meter.peak_bytes > 2**20 and meter.memory_kind == "process RSS (sampled)"
    assert not model._forward_hooks and not model._forward_pre_hooks  # hooks removed


# --- padding debiasing with a processor that never pads ------------------------------------------------------
def test_warns_once_when_the_processor_never_pads(model):
    from vtprune import Debias, FastV
    from vtprune.core.engine import _NEVER_PADS_WARNED

    cropping = build_processor(do_pad=False)
    images = [make_image(120, 60)]
    inputs = inputs_for(cropping, images, [prompt()])
    press = FastV(keep=8, layer=2, debias=Debias(padding=True))
    _NEVER_PADS_WARNED.clear()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            with press(model, processor=cropping, image_sizes=[im.size for im in images]):
                model(**inputs)
    messages = [str(w.message) for w in caught if "does not pad" in str(w.message)]
    assert len(messages) == 1, messages
    assert "LlavaImageProcessorPil does not pad images (do_pad=False" in messages[0]
    assert "Debias(padding=False)" in messages[0]
    padding = build_processor(do_pad=True)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with press(model, processor=padding, image_sizes=[im.size for im in images]):
            model(**inputs_for(padding, images, [prompt()]))
    assert not [w for w in caught if "does not pad" in str(w.message)]


def test_set_pad_to_square():
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from vtprune.adapters.geometry import geometry_from_processor
    from vtprune.apps.loading import set_pad_to_square

    base = build_processor(do_pad=False)
    clip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX},
                                 image_mean=[0.1, 0.2, 0.3])
    processor = LlavaProcessor(image_processor=clip, tokenizer=base.tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)

    def pads(p):
        return geometry_from_processor(p, patch_size=14, image_size=IMAGE_PX).pads

    assert not pads(processor)
    assert set_pad_to_square(processor, True) is processor and pads(processor)
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil"
    assert list(processor.image_processor.image_mean) == [0.1, 0.2, 0.3]  # the normalisation carried over
    pixels = processor(images=[make_image(120, 60)], text=[prompt()], return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (IMAGE_PX, IMAGE_PX)
    set_pad_to_square(processor, False)
    assert not pads(processor)
    assert not pads(set_pad_to_square(build_processor(do_pad=False), False))
    assert pads(set_pad_to_square(build_processor(do_pad=False), True))


# --- the command line on the testbed ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """A jsonl of testbed questions on disk: exact-match lines, one with several answers, multiple choice."""
    from vtprune.testbed.data import make_split

    folder = tmp_path_factory.mktemp("qa")
    (folder / "images").mkdir()
    lines = []
    for i, sample in enumerate(make_split("test", 6)):
        sample.image.save(folder / "images" / f"{i}.png")
        row = {"image": f"{i}.png", "text": sample.question, "answer": sample.answer}
        if i == 4:
            row = {"image": f"{i}.png", "text": sample.question, "answers": ["nothing", sample.answer]}
        if i == 5:
            row = {"image": f"{i}.png", "text": sample.question, "choices": ["zzz", sample.answer], "answer": "B"}
        lines.append(json.dumps(row))
    (folder / "qa.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_eval_cli_on_the_testbed(qa, tmp_path):
    out = tmp_path / "out"
    args = ["eval", "--model", "testbed", "--data", str(qa / "qa.jsonl"), "--images", str(qa / "images"),
            "--methods", "fastv,random", "--budgets", "64", "--debias", "none,both", "--max-new-tokens", "3",
            "--out", str(out), "--threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "unpruned" in result.output and "results.csv" in result.output
    assert "random ranks without attention" in result.output
    table = (out / "results.md").read_text()  # the printed table (wrapped at 80 columns here)
    for text in ("| unpruned |", "| FastV 64 +both |", "| Random 64 |", "accuracy % [95% CI]", "prefill ms", "peak MiB"):
        assert text in table
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["kinds"] == {"exact": 5, "choice": 1}
    assert data["meta"]["profiles"] == {"fastv@64/both[testbed/fastv]": "testbed/fastv"}
    cells = {c["key"]: c for c in data["cells"]}
    assert list(cells) == ["unpruned", "fastv@64/none", "fastv@64/both[testbed/fastv]", "random@64/none"]
    from vtprune.apps.evaluation import load_questions

    questions = load_questions(str(qa / "qa.jsonl"), qa / "images")
    for cell in cells.values():  # accuracy is the scoring of the recorded answers
        assert cell["correct"] == [int(q.correct(a)) for q, a in zip(questions, cell["answers"])]
        assert cell["accuracy"] == pytest.approx(sum(cell["correct"]) / 6)
        assert cell["prefill_ms"] > 0 and cell["decode_ms_per_token"] > 0 and cell["peak_memory_mib"] > 0
        assert cell["requests"] == 6
    assert cells["unpruned"]["visual_tokens"] == 144
    assert cells["fastv@64/none"]["visual_tokens"] == 16  # 64 of 576 = 1/9 of the testbed's 144
    both = cells["fastv@64/both[testbed/fastv]"]
    assert both["baseline"] == "fastv@64/none" and both["delta"][0] == pytest.approx(
        (sum(both["correct"]) - sum(cells["fastv@64/none"]["correct"])) / 6)
    assert cells["fastv@64/none"]["delta"] is None
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["key"] for r in rows] == list(cells) and float(rows[0]["prefill_speedup"]) == 1.0

    again = runner.invoke(app, args)  # everything saved: nothing measured again
    assert again.exit_code == 0, again.output
    assert "resuming: 4 of 4 settings" in again.output
    assert json.loads((out / "results.json").read_text())["cells"][1]["answers"] == cells["fastv@64/none"]["answers"]


def test_eval_cli_testbed_data_and_json(tmp_path):
    result = runner.invoke(app, ["eval", "--model", "testbed", "--data", "testbed", "--samples", "4", "--methods",
                                 "pdrop", "--budgets", "0.25", "--debias", "padding", "--max-new-tokens", "2",
                                 "--out", str(tmp_path), "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    start = result.stdout.index("{")
    data = json.loads(result.stdout[start:])
    assert [c["key"] for c in data["cells"]] == ["unpruned", "pdrop@0.25/padding"]
    assert data["cells"][1]["delta"] is None  # no undebiased cell to pair with


@pytest.mark.parametrize("extra, message", [
    (["--debias", "none,half"], "--debias 'half'"),
    (["--methods", "fastv,nope"], "unknown method"),
    (["--budgets", "128,0"], "--budgets 0"),
    (["--budgets", "128,"], "separated by commas"),
    (["--profile", "missing.json"], "--profile"),
    (["--profile", "none", "--debias", "both"], "contradicts"),
    (["--batch-size", "0"], "--batch-size 0"),
])
def test_eval_usage_errors(qa, tmp_path, extra, message):
    result = runner.invoke(app, ["eval", "--model", "testbed", "--data", str(qa / "qa.jsonl"), "--out", str(tmp_path),
                                 *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_eval_data_without_answers(tmp_path):
    make_image(30, 20).save(tmp_path / "a.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "a.png", "text": "what?"}) + "\n")
    result = runner.invoke(app, ["eval", "--model", "testbed", "--data", str(tmp_path / "q.jsonl"), "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert 'has no "answer"' in result.output and "q.jsonl:1" in result.output


def test_question_is_an_example():
    """A `Question` is what the runner takes (image + question)."""
    q = Question(image=make_image(8, 8), question="q", answers=("a",))
    assert q.image.size == (8, 8) and q.question == "q" and q.kind == "exact"
