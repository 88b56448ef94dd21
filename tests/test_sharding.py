"""`vtprune eval` across processes (`vtprune.apps.sharding`): the shards' cells merge back into the single-process
result, question for question; `--processes 2` (two spawned workers) equals one process on the testbed."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.apps.evaluation import CellResult, add_deltas
from vtprune.apps.results import wilson
from vtprune.apps.sharding import merge, process_device, shard_indices

runner = CliRunner()


def cell(key, debias, correct, answers, tokens=10.0, prefill=5.0):
    hits = sum(correct)
    return CellResult(key=key, label=key, method="fastv", budget=64, debias=debias, profile=None, n=len(correct),
                      hits=hits, accuracy=hits / len(correct) if correct else 0.0, ci=wilson(hits, len(correct)),
                      visual_tokens=tokens, equivalent=20.0, prefill_ms=prefill, decode_ms_per_token=1.0,
                      peak_memory_mib=100.0, memory_kind="rss", seconds=1.0, batch_size=1, requests=len(correct),
                      correct=list(correct), answers=list(answers))


def test_shards_cover_every_question_once():
    for count in (0, 1, 5, 8):
        for world in (1, 2, 3):
            got = sorted(i for rank in range(world) for i in shard_indices(count, rank, world))
            assert got == list(range(count))


def test_merge_restores_question_order_and_recomputes_deltas():
    correct_plain, correct_both = [1, 0, 1, 1, 0], [1, 1, 1, 0, 0]
    answers = [f"a{i}" for i in range(5)]
    whole = add_deltas([cell("plain", "none", correct_plain, answers), cell("both", "both", correct_both, answers)])
    shards = []
    for rank in range(2):
        index = shard_indices(5, rank, 2)
        shards.append(add_deltas([cell("plain", "none", [correct_plain[i] for i in index], [answers[i] for i in index]),
                                  cell("both", "both", [correct_both[i] for i in index], [answers[i] for i in index],
                                       tokens=8.0 + rank)]))
    merged = merge(shards, 2, 5)
    for a, b in zip(whole, merged):
        assert (b.correct, b.answers, b.hits, b.n, b.accuracy, b.ci) == (a.correct, a.answers, a.hits, a.n, a.accuracy, a.ci)
        assert b.delta == a.delta and b.baseline == a.baseline
    assert merged[1].visual_tokens == (8.0 * 3 + 9.0 * 2) / 5  # the mean over questions, not over processes


def test_merge_skips_processes_without_questions():
    merged = merge([[cell("plain", "none", [1], ["x"])], []], 2, 1)
    assert merged[0].correct == [1] and merged[0].n == 1


def test_process_device():
    assert process_device("cpu", 3) == "cpu"
    assert process_device("cuda:1", 0) == "cuda:1"


def test_eval_in_two_processes_equals_one(tmp_path):
    args = ["eval", "--model", "testbed", "--data", "testbed", "--samples", "5", "--methods", "fastv", "--budgets",
            "64", "--debias", "none", "--max-new-tokens", "3", "--json"]
    results = []
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        result = runner.invoke(app, [*args, "--out", str(out), "--processes", str(processes), "--threads", "1"])
        assert result.exit_code == 0, result.output
        results.append(json.loads((out / "results.json").read_text()))
    one, two = results
    assert two["meta"]["processes"] == 2
    for a, b in zip(one["cells"], two["cells"]):
        assert a["key"] == b["key"]
        assert a["answers"] == b["answers"] and a["correct"] == b["correct"] and a["accuracy"] == b["accuracy"]
        assert a["visual_tokens"] == b["visual_tokens"]
    assert sorted((tmp_path / "p2").glob("cells-*-of-2.json"))  # each process's resumable state


def test_more_processes_than_questions_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["eval", "--model", "testbed", "--data", "testbed", "--samples", "2", "--processes",
                                 "3", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--processes 3" in result.output
