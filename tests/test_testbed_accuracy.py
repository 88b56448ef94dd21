"""Regression guard on the shipped testbed model: accuracy on a fixed 200-question test subset, unpruned and
with debiased FastV keeping 25% of the visual tokens, must stay above floors set from the measurement in the
README (measured value minus a margin of a few questions, for numerical differences between machines)."""

from __future__ import annotations

import pytest
import torch

from vtprune.testbed.model import CHECKPOINT_DIR

# measured on the shipped checkpoint (python -m pytest tests/test_testbed_accuracy.py -s prints them)
MEASURED = {"unpruned": 0.67, "fastv_debiased_25": 0.69}
MARGIN = 0.03  # 6 of 200 questions

pytestmark = pytest.mark.skipif(not (CHECKPOINT_DIR / "config.json").is_file(), reason="no testbed checkpoint")


@pytest.fixture(scope="module")
def testbed():
    from vtprune.testbed.model import load_testbed

    torch.set_num_threads(min(4, torch.get_num_threads()))
    return load_testbed()


@pytest.fixture(scope="module")
def questions():
    from vtprune.testbed.data import make_split

    return make_split("test", 200)


def accuracy(testbed, questions, press):
    from vtprune.testbed.benchmark import evaluate

    model, processor = testbed
    answers = evaluate(model, processor, questions, press).answers
    return sum(a == q.answer for a, q in zip(answers, questions)) / len(questions)


def test_unpruned_accuracy(testbed, questions):
    value = accuracy(testbed, questions, None)
    print(f"unpruned accuracy on 200 test questions: {value:.3f}")
    assert value >= MEASURED["unpruned"] - MARGIN


def test_debiased_fastv_at_25_percent(testbed, questions):
    from vtprune import Debias, FastV

    press = FastV(keep=0.25, layer=2, debias=Debias(profile="testbed/fastv", padding=True))
    value = accuracy(testbed, questions, press)
    print(f"debiased FastV (25%) accuracy on 200 test questions: {value:.3f}")
    assert value >= MEASURED["fastv_debiased_25"] - MARGIN


def test_every_benchmark_setting_builds_its_press():
    """`vtprune testbed eval` must not fail late on a setting whose options a method does not take."""
    from vtprune.testbed.benchmark import KEEPS, default_settings

    for setting in default_settings():
        for keep in KEEPS[1:]:
            press = setting.press(keep)
            if setting.options:
                assert all(getattr(press, key) == value for key, value in setting.options)
            if setting.positions:
                assert press.positions == setting.positions


def test_testbed_lm_offers_the_original_numbering_of_the_compact_methods():
    """Issue 23's position comparison: on testbed-lm `--settings` may name each compact-numbered method at the
    original numbering, plain and debiased, with testbed-lm's own profile."""
    from vtprune.testbed.benchmark import selectable_for

    offered = {s.name: s for s in selectable_for("testbed-lm")}
    for name, method in [("PyramidDrop", "pdrop"), ("SparseVLM", "sparsevlm"), ("VisionZip", "visionzip"),
                         ("FasterVLM", "fastervlm")]:
        plain, debiased = offered[f"{name}@original"], offered[f"{name}@original+debias"]
        assert plain.baseline == name and debiased.baseline == f"{name}@original"
        press = debiased.press(0.25, model="testbed-lm")
        assert press.positions == "original" and press.debias.profile == f"testbed-lm/{method}"
