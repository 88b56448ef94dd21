"""lmms-eval's real pipeline (`python -m lmms_eval`, and `accelerate launch` with 2 CPU processes) on the example
task of `examples/lmms_task`, built from testbed questions, against `vtprune eval` on the same questions.

Needs the README's evaluation install (`pip install -e ".[eval]"` plus lmms-eval with --no-deps): skipped
where lmms-eval's CLI cannot be imported, unless VTPRUNE_REQUIRE_LMMS_PIPELINE=1 (CI's evaluation stage sets it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import lmms_eval.__main__  # noqa: F401  (the CLI's imports: datasets, sacrebleu, ...)
except ImportError as error:  # pragma: no cover - depends on the environment
    if os.environ.get("VTPRUNE_REQUIRE_LMMS_PIPELINE") == "1":
        raise
    pytest.skip(f"lmms-eval's CLI cannot be imported ({error}): pip install -e '.[eval]' && "
                "pip install --no-deps lmms-eval==0.7.3", allow_module_level=True)

from typer.testing import CliRunner

from vtprune.cli import app

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 6
MODEL_ARGS = "pretrained=testbed,method=fastv,budget=64,debias=both"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("build_task", ROOT / "examples" / "lmms_task" / "build_task.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    out = tmp_path_factory.mktemp("task")
    builder.build("testbed", out, task="vtprune_testbed", samples=QUESTIONS, max_new_tokens=8)
    return out


@pytest.fixture(scope="module")
def vtprune_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = CliRunner().invoke(app, ["eval", "--model", "testbed", "--data", "testbed", "--samples", str(QUESTIONS),
                                      "--methods", "fastv", "--budgets", "64", "--debias", "both",
                                      "--max-new-tokens", "8", "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    cells = json.loads((out / "results.json").read_text())["cells"]
    return next(c for c in cells if c["key"].startswith("fastv@64/both"))


def lmms_eval(prefix: list[str], task: Path, out: Path) -> tuple[dict, list[dict], str]:
    """Run lmms-eval's CLI; its results JSON, its logged samples (by doc_id) and its output (stdout + stderr)."""
    command = [*prefix, "--model", "vtprune_llava_hf", "--model_args", MODEL_ARGS, "--tasks", "vtprune_testbed",
               "--include_path", str(task), "--device", "cpu", "--batch_size", "1", "--output_path", str(out),
               "--log_samples"]
    run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900, cwd=out)
    assert run.returncode == 0, run.stderr[-3000:]
    results = list(out.rglob("*_results.json"))
    samples = list(out.rglob("*_samples_vtprune_testbed.jsonl"))
    assert len(results) == 1 and len(samples) == 1, (results, samples, run.stderr[-3000:])
    logged = [json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()]
    return json.loads(results[0].read_text()), sorted(logged, key=lambda s: s["doc_id"]), run.stdout + run.stderr


def answer(sample: dict) -> str:
    response = sample["filtered_resps"]
    return (response[0] if isinstance(response, list) else response).strip()


def check_against_vtprune(results: dict, samples: list[dict], cell: dict) -> None:
    assert [s["doc_id"] for s in samples] == list(range(QUESTIONS))
    assert [answer(s) for s in samples] == cell["answers"]
    assert [int(s["exact_match"]) for s in samples] == cell["correct"]
    assert results["results"]["vtprune_testbed"]["exact_match,none"] == pytest.approx(cell["accuracy"])
    records = [s["token_counts"][0]["vtprune"] for s in samples]
    for record in records:
        assert record["method"] == "fastv" and record["debias"] == "both" and record["profile"] == "testbed/fastv"
        assert record["pruned"] and record["visual_tokens"] == 144 and record["layers"] == [2]
    assert sum(r["kept"][-1] for r in records) / QUESTIONS == pytest.approx(cell["visual_tokens"])


def test_lmms_eval_cli_equals_vtprune_eval(task, vtprune_eval, tmp_path):
    results, samples, output = lmms_eval([sys.executable, "-m", "lmms_eval"], task, tmp_path)
    check_against_vtprune(results, samples, vtprune_eval)
    banner = next(line for line in output.splitlines() if line.startswith("vtprune_llava_hf: "))
    assert "before layer 2 keep" in banner and "testbed/fastv" in banner and "None" not in banner


def test_two_processes_equal_one(task, vtprune_eval, tmp_path):
    """accelerate launch: one replica per process (gloo on CPU), the questions split by rank, answers gathered."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                "29533", "-m", "lmms_eval"]
    results, samples, output = lmms_eval(launcher, task, tmp_path)
    assert "Running on rank 1" in output and "Running on rank 0" in output  # really two processes
    check_against_vtprune(results, samples, vtprune_eval)
