"""`vtprune demo`: the rule that picks the questions to draw, the measured summary (its numbers agree with the
answers), and the command on both shipped models."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.apps.demo import DEBIASED, PLAIN, differing_questions, run_demo, summary_lines

runner = CliRunner()


def test_rule_alternates_fixed_and_broken_in_test_order():
    #            0      1      2      3      4      5      6
    plain = [False, True, False, True, False, True, False]
    debiased = [True, False, True, False, False, True, True]
    differ = [True, True, True, True, True, False, True]
    # fixed (plain wrong, debiased right): 0, 2, 6; broke: 1, 3; both wrong but different: 4; 5 does not differ
    assert differing_questions(plain, debiased, differ, 3) == [0, 1, 2]
    assert differing_questions(plain, debiased, differ, 10) == [0, 1, 2, 3, 6, 4]
    assert differing_questions(plain, debiased, [False] * 7, 4) == []


@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), max_size=40), st.integers(1, 8))
def test_rule_properties(rows, count):
    # answers differ whenever exactly one is right, never when both are right, and maybe when both are wrong
    plain, debiased = [r[0] for r in rows], [r[1] for r in rows]
    differ = [p != d or (not p and not d and r[2]) for p, d, r in zip(plain, debiased, rows)]
    chosen = differing_questions(plain, debiased, differ, count)
    assert len(chosen) == len(set(chosen)) <= count
    assert all(differ[i] for i in chosen)
    fixed = [i for i in range(len(rows)) if differ[i] and debiased[i] and not plain[i]]
    broke = [i for i in range(len(rows)) if differ[i] and plain[i] and not debiased[i]]
    if fixed and broke and count >= 2:  # both directions shown when both occur
        assert fixed[0] in chosen and broke[0] in chosen
    assert len(chosen) == min(count, sum(differ))
    for kind in (fixed, broke):  # within a direction, test-split order
        picked = [i for i in chosen if i in kind]
        assert picked == kind[: len(picked)]


def test_summary_agrees_with_the_answers(tmp_path):
    from vtprune.apps.loading import load_model

    model, processor = load_model("testbed")
    result = run_demo(model, processor, model_name="testbed", keep=0.0625, profile="testbed/fastv", questions=12,
                      pictures=3, out_dir=tmp_path, batch_size=6)
    assert result.questions == 12 and set(result.accuracy) == {"unpruned", PLAIN, DEBIASED}
    for accuracy, low, high in result.accuracy.values():
        assert 0 <= low <= accuracy <= high <= 1
    # the paired difference is (fixed - broke) / questions: debiased right where plain was wrong, and the reverse
    assert result.delta[0] == pytest.approx((result.fixed - result.broke) / 12)
    assert result.delta[1] <= result.delta[0] <= result.delta[2]
    assert len(result.pictures) == min(3, result.differing)
    for picture in result.pictures:
        assert picture.answers[PLAIN] != picture.answers[DEBIASED] and picture.path.stat().st_size > 5000
    assert [p.number for p in result.pictures] == sorted(p.number for p in result.pictures)
    assert "12 held-out questions" in summary_lines(result)[0]


def test_demo_command_on_testbed_lm(tmp_path):
    from vtprune.testbed.lm import availability_problem

    problem = availability_problem()
    if problem:
        if os.environ.get("VTPRUNE_REQUIRE_TESTBED_LM") == "1":
            raise RuntimeError(problem)
        pytest.skip(problem)
    result = runner.invoke(app, ["demo", "--questions", "6", "--count", "2", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "testbed-lm, 6 held-out questions" in text and "(paired, 95%)" in text
    for name in ("unpruned", "FastV", "FastV + debias"):
        assert re.search(rf"{re.escape(name)} \d+\.\d% \[\d+\.\d, \d+\.\d\]", text)
    listed = re.findall(r"-> (\S+\.png)", text)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(os.path.basename(p) for p in listed)
    assert len(listed) <= 2


def test_demo_usage_errors():
    for args, fragment in ((["--model", "llava"], "--model llava"), (["--questions", "0"], "--questions 0")):
        result = runner.invoke(app, ["demo", *args])
        assert result.exit_code == 2 and fragment in result.output
