"""`vtprune reproduce`: the commands of every row (dry run), the results lmms-eval writes collected into one
table beside the published numbers, and a run through a stand-in for lmms-eval."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from vtprune.apps import reproduce as rep
from vtprune.cli import app

runner = CliRunner()
TASKS = ["gqa", "mmbench_en_dev", "mmbench_cn_dev", "mme", "mmvet", "pope", "scienceqa_img", "textvqa_val",
         "vizwiz_vqa_val", "vqav2_val"]
#: LLaVA-1.5-7B's published scores (LLaVA-1.5 paper) in lmms-eval's units (fractions, MME points, percentages)
LLAVA15 = {"gqa": ("exact_match", 0.620), "mmbench_en_dev": ("gpt_eval_score", 64.3),
           "mmbench_cn_dev": ("gpt_eval_score", 58.3), "mme": ("mme_perception_score", 1510.7),
           "mmvet": ("gpt_eval_score", 31.1), "pope": ("pope_f1_score", 0.859), "scienceqa_img": ("exact_match", 0.668),
           "textvqa_val": ("exact_match", 0.582), "vizwiz_vqa_val": ("exact_match", 0.500),
           "vqav2_val": ("exact_match", 0.785)}


def write_results(folder, scores: dict, stamp: str = "2026-01-01T00-00-00.000000") -> None:
    """A results file as lmms-eval 0.7.3 writes it (OUTPUT_PATH/<model>/<date>_results.json)."""
    results = {task: {"alias": task, f"{metric},none": value, f"{metric}_stderr,none": "N/A"}
               for task, (metric, value) in scores.items()}
    if "mme" in results:
        results["mme"]["mme_cognition_score,none"] = 355.7
    path = folder / "llava-hf__llava-1.5-7b-hf"
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{stamp}_results.json").write_text(json.dumps({"results": results, "config": {}}))


def test_dry_run_prints_every_row():
    result = runner.invoke(app, ["reproduce", "paper-llava15", "--dry-run"])
    assert result.exit_code == 0, result.output
    commands = [line for line in result.output.splitlines() if line.startswith("python -m lmms_eval")]
    assert len(commands) == 13  # the full model, six methods with and without debiasing
    for line in commands:
        assert f"--tasks {','.join(TASKS)}" in line and "--model vtprune_llava_hf" in line and "pad_to_square=True" in line
    for method in ("fastv", "himap", "illava", "pdrop", "tokencarve", "sparsevlm"):
        assert sum(f"method={method},budget=128,debias=none," in c for c in commands) == 1
        assert sum(f"method={method},budget=128,debias=both,profile=benchmark" in c for c in commands) == 1
    assert "method=none" in commands[0]
    for text in ("mmvet needs a GPT judge", "mmbench_en_dev needs OpenAI API", "mmbench_cn_dev needs", "submission server",
                 "(published average 62.5)", "(published average 63.1)"):
        assert text in result.output


def test_dry_run_options():
    result = runner.invoke(app, ["reproduce", "paper-llava15", "--dry-run", "--budget", "64", "--methods", "fastv",
                                 "--limit", "5", "--pretrained", "/models/llava", "--launcher", "accelerate launch -m lmms_eval"])
    assert result.exit_code == 0, result.output
    commands = [line for line in result.output.splitlines() if line.startswith("accelerate launch")]
    assert len(commands) == 3 and all("--limit 5" in c and "pretrained=/models/llava" in c for c in commands)
    assert "budget=64" in commands[1] and "published average" not in result.output


@pytest.mark.parametrize("args, message", [
    (["paper-videollava", "--dry-run", "--budget", "4096"], "--budget 4096: give a count of the model's 2048 visual tokens"),
    (["paper-x", "--dry-run"], "unknown table"),
    (["paper-llava15", "--dry-run", "--methods", "fastv,dart"], "dart not in paper-llava15"),
    (["paper-llava15", "--dry-run", "--budget", "0"], "--budget 0"),
])
def test_reproduce_usage_errors(args, message):
    result = runner.invoke(app, ["reproduce", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_collect_beside_the_published_numbers(tmp_path):
    write_results(tmp_path / "full", LLAVA15)
    write_results(tmp_path / "fastv", {t: (m, v * 0.9) for t, (m, v) in LLAVA15.items()})
    write_results(tmp_path / "fastv-debias", {t: (m, v * 0.95) for t, (m, v) in list(LLAVA15.items())[:4]})
    write_results(tmp_path / "fastv-debias", {"gqa": ("exact_match", 0.1)}, stamp="2025-01-01")
    old = next((tmp_path / "fastv-debias").rglob("2025-01-01_results.json"))
    os.utime(old, (1e9, 1e9))  # an older run: the newest file that has a task wins
    result = runner.invoke(app, ["reproduce", "paper-llava15", "--collect", "--out", str(tmp_path), "--methods", "fastv"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "table.md").read_text()
    assert "| Full model (576 tokens) | 62.0 | 64.3 | 58.3 | 75.5 | 31.1 | 85.9 | 66.8 | 58.2 | 50.0 | 78.5 | 63.1 | 63.1 | -0.0 |" in table
    assert "| FastV +debias | 58.9 | 61.1 | 55.4 | 71.8 |" in table and "(4/10)" in table
    data = json.loads((tmp_path / "table.json").read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert rows["Full model (576 tokens)"]["average"] == pytest.approx(63.0635)
    assert rows["FastV"]["average"] == pytest.approx(0.9 * 63.0635) and rows["FastV"]["published"] == 59.6
    assert rows["FastV +debias"]["average"] is None and rows["FastV +debias"]["scores"]["gqa"] == pytest.approx(58.9)
    assert "incomplete rows (no average yet): FastV +debias" in result.output
    assert "--model vtprune_llava_hf" in rows["FastV"]["command"]


def test_run_through_a_stand_in_for_lmms_eval(tmp_path):
    fake = tmp_path / "fake_lmms.py"
    fake.write_text(textwrap.dedent('''
        import json, pathlib, sys
        argv = sys.argv[1:]
        out = pathlib.Path(argv[argv.index("--output_path") + 1]) / "model"
        out.mkdir(parents=True, exist_ok=True)
        args = argv[argv.index("--model_args") + 1]
        value = 0.7 if "debias=both" in args else 0.6
        results = {t: {"exact_match,none": value, "gpt_eval_score,none": 100 * value, "pope_f1_score,none": value,
                       "mme_perception_score,none": 2000 * value} for t in argv[argv.index("--tasks") + 1].split(",")}
        (out / "x_results.json").write_text(json.dumps({"results": results}))
        (pathlib.Path(sys.argv[0]).parent / "calls.txt").open("a").write(args + "\\n")
    '''))
    args = ["reproduce", "paper-llava15", "--out", str(tmp_path / "out"), "--methods", "pdrop",
            "--launcher", f"{sys.executable} {fake}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 3 and "method=pdrop,budget=128,debias=both,profile=benchmark" in calls[2]
    data = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [r["average"] for r in data["rows"]] == [pytest.approx(60.0), pytest.approx(60.0), pytest.approx(70.0)]
    assert "| PyramidDrop | +10.0 | +1.1 |" in (tmp_path / "out" / "table.md").read_text()
    again = runner.invoke(app, args)  # finished rows are not run again
    assert again.exit_code == 0 and len((tmp_path / "calls.txt").read_text().splitlines()) == 3
    assert "results already in" in again.output


def test_model_args_build_the_paper_presses():
    from vtprune.lmms.options import PressOptions

    spec = rep.table("paper-llava15")
    for row in spec.rows:
        args = dict(part.split("=", 1) for part in rep.model_args(spec, row, budget=128).split(","))
        options = PressOptions.pop_from(args)
        assert set(args) == {"pretrained"} and options.pad_to_square is True
        press = options.press()
        assert (press is None) == (row.method is None)
        if press is not None:
            assert (press.debias is not None) == row.debias


def test_a_malformed_launcher_names_the_option():
    result = runner.invoke(app, ["reproduce", "paper-llava15", "--dry-run", "--launcher", "python -m 'lmms_eval"])
    assert result.exit_code == 2, result.output
    assert "--launcher" in result.output and "malformed" in result.output


@pytest.mark.parametrize("body, reason", [
    ("pass", "no results for"),  # exits 0 and writes nothing
    ("print('Traceback (most recent call last):'); print('ValueError: boom')", "its log reports an error"),
    ("import sys; sys.exit(3)", "exited with code 3"),
])
def test_a_failed_row_is_reported_and_exits_non_zero(tmp_path, body, reason):
    fake = tmp_path / "fake_lmms.py"
    fake.write_text(body + "\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["reproduce", "paper-llava15", "--out", str(out), "--methods", "fastv",
                                 "--launcher", f"{sys.executable} {fake}"])
    assert result.exit_code == 1, result.output
    assert "failed row" in result.output and reason in result.output and "Full model" in result.output
    assert (out / "full" / "lmms_eval.log").is_file()


def test_collect_reports_a_corrupt_results_file(tmp_path):
    write_results(tmp_path / "full", LLAVA15)
    bad = tmp_path / "fastv" / "model" / "broken_results.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"results": {"gqa": ')
    result = runner.invoke(app, ["reproduce", "paper-llava15", "--collect", "--out", str(tmp_path), "--methods", "fastv"])
    assert result.exit_code == 1, result.output
    assert "broken_results.json is not a readable lmms-eval results file" in result.output.replace("\n", "")


VIDEO_TASKS = ["videollava_msvd_qa", "videollava_msrvtt_qa", "videollava_tgif_qa", "videollava_activitynet_qa"]


def test_videollava_dry_run_prints_the_build_and_every_row():
    result = runner.invoke(app, ["reproduce", "paper-videollava", "--dry-run", "--data", "/data/GPT_Zero_Shot_QA"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert ("python -m vtprune.lmms.video_qa --root /data/GPT_Zero_Shot_QA --out vtprune-reproduce/tasks --tasks "
            + ",".join(VIDEO_TASKS)) in lines
    commands = [line for line in lines if line.startswith("python -m lmms_eval")]
    assert len(commands) == 7  # the full model, three methods with and without debiasing
    for line in commands:
        assert "--model vtprune_video_llava" in line and f"--tasks {','.join(VIDEO_TASKS)}" in line
        assert "--include_path vtprune-reproduce/tasks" in line and "pad_to_square" not in line
        assert "pretrained=LanguageBind/Video-LLaVA-7B-hf" in line
    for method in ("sparsevlm", "fastv", "pdrop"):
        assert sum(f"method={method},budget=0.25,debias=none" in c for c in commands) == 1  # 512 of 2048
        assert sum(f"method={method},budget=0.25,debias=both,profile=benchmark" in c for c in commands) == 1
    for text in ("(published average 58.2)", "(published average 57.3)", "videollava_tgif_qa needs a GPT judge",
                 "does not name the paper's three video QA sets"):
        assert text in result.output
    halved = runner.invoke(app, ["reproduce", "paper-videollava", "--dry-run", "--budget", "256", "--methods", "fastv"])
    assert "budget=0.125,debias=none" in halved.output and "published average" not in halved.output


def video_layout(root, questions: int = 2) -> None:
    """Video-LLaVA's evaluation layout for the four sets, with empty files standing in for the videos."""
    from vtprune.lmms.video_qa import SETS

    for qa_set in SETS.values():
        folder = root / qa_set.folder
        (folder / qa_set.videos).mkdir(parents=True)
        for i in range(questions):
            (folder / qa_set.videos / f"v{i}.mp4").write_bytes(b"")
        (folder / "test_q.json").write_text(json.dumps([{"video_name": f"v{i}", "question_id": i, "question": "what"}
                                                        for i in range(questions)]))
        (folder / "test_a.json").write_text(json.dumps([{"answer": "dog", "question_id": i} for i in range(questions)]))


def test_videollava_needs_the_judge_key_and_the_data(tmp_path, monkeypatch):
    fake = tmp_path / "fake_lmms.py"
    fake.write_text("raise SystemExit('must not run')\n")
    args = ["reproduce", "paper-videollava", "--out", str(tmp_path / "out"), "--launcher", f"{sys.executable} {fake}"]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "judged by a GPT model: set OPENAI_API_KEY" in result.output
    assert len(result.output.strip().splitlines()) == 1
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "give --data GPT_Zero_Shot_QA" in result.output
    result = runner.invoke(app, [*args, "--data", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "cannot read" in result.output and "test_q.json" in result.output


def test_videollava_run_through_a_stand_in_for_lmms_eval(tmp_path, monkeypatch):
    fake = tmp_path / "fake_lmms.py"
    fake.write_text(textwrap.dedent('''
        import json, pathlib, sys
        argv = sys.argv[1:]
        out = pathlib.Path(argv[argv.index("--output_path") + 1]) / "model"
        out.mkdir(parents=True, exist_ok=True)
        args = argv[argv.index("--model_args") + 1]
        include = pathlib.Path(argv[argv.index("--include_path") + 1])
        tasks = argv[argv.index("--tasks") + 1].split(",")
        assert all((include / f"{t}.yaml").is_file() and (include / f"{t}.jsonl").is_file() for t in tasks)
        value = 60.0 if "debias=both" in args else 55.0
        results = {t: {"gpt_eval_accuracy,none": value, "gpt_eval_score,none": 3.0} for t in tasks}
        (out / "x_results.json").write_text(json.dumps({"results": results}))
        (pathlib.Path(sys.argv[0]).parent / "calls.txt").open("a").write(args + "\\n")
    '''))
    video_layout(tmp_path / "data")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    result = runner.invoke(app, ["reproduce", "paper-videollava", "--out", str(tmp_path / "out"), "--methods", "fastv",
                                 "--data", str(tmp_path / "data"), "--launcher", f"{sys.executable} {fake}"])
    assert result.exit_code == 0, result.output
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 3 and "method=fastv,budget=0.25,debias=both,profile=benchmark" in calls[2]
    rows = json.loads((tmp_path / "out" / "table.json").read_text())["rows"]
    assert [r["average"] for r in rows] == [55.0, 55.0, 60.0] and rows[1]["published"] == 57.3
    assert "| FastV | +5.0 | +0.6 |" in (tmp_path / "out" / "table.md").read_text()


def test_videollava_model_args_build_presses_at_a_quarter_of_the_tokens():
    from vtprune.lmms.options import PressOptions

    spec = rep.table("paper-videollava")
    for row in spec.rows:
        args = dict(part.split("=", 1) for part in rep.model_args(spec, row, budget=512).split(","))
        options = PressOptions.pop_from(args)
        assert set(args) == {"pretrained"} and options.pad_to_square is None
        assert options.budget == (None if row.method is None else 0.25)
        press = options.press()
        assert (press is None) == (row.method is None) and (press is None or (press.debias is not None) == row.debias)
