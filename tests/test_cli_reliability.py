"""Reliability II (issue 19) at the command line: every case ends in a clear error (exit code 2 for usage, 1 for
runtime failures, the option or file named) or in correct behaviour; outputs are written atomically and locked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import build_model, make_image
from PIL import Image
from typer.testing import CliRunner

from vtprune.cli import app

runner = CliRunner()


def flat(text: str) -> str:
    """`text` without whitespace: rich wraps (and folds long paths in) status lines at the console width."""
    return "".join(text.split())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, processor):
    path = tmp_path_factory.mktemp("tiny-llava-19")
    build_model(processor).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """An upright RGB picture, its EXIF-rotated copy, and a grey picture as 8-bit and 16-bit PNGs."""
    folder = tmp_path_factory.mktemp("pictures")
    upright = make_image(120, 60, seed=3)
    upright.save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": stored turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.png", exif=exif)
    grey = np.asarray(upright.convert("L"))
    Image.fromarray(grey).save(folder / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16.png")
    return folder


def run_json(checkpoint, image, *extra):
    result = runner.invoke(app, ["run", "--model", str(checkpoint), "--image", str(image), "--prompt",
                                 "what is the colour of the circle ?", "--keep", "8", "--max-new-tokens", "3",
                                 "--repeats", "1", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("given, copy", [("grey16.png", "grey8.png"), ("rotated.png", "upright.png")],
                         ids=["16-bit", "exif"])
def test_images_are_answered_as_their_8_bit_upright_copies(checkpoint, pictures, given, copy):
    a, b = run_json(checkpoint, pictures / given), run_json(checkpoint, pictures / copy)
    assert a["image_size"] == b["image_size"]
    for run in ("unpruned", "pruned"):
        assert a[run]["answer"] == b[run]["answer"]
    assert a["pruned"]["kept"] == b["pruned"]["kept"]


def test_read_image_scales_every_grey_mode(pictures):
    from vtprune.apps.images import read_image, to_rgb

    expected = np.asarray(read_image(pictures / "grey8.png"))
    grey = np.asarray(Image.open(pictures / "grey8.png"))
    assert np.array_equal(np.asarray(read_image(pictures / "grey16.png")), expected)
    for image in (Image.fromarray(grey.astype(np.int32) * 257),  # "I" holding 16-bit values
                  Image.fromarray(grey.astype(np.float32) / 255),  # "F" in [0, 1]
                  Image.frombytes("I;16B", grey.shape[::-1], (grey.astype(">u2") * 257).tobytes())):
        assert np.array_equal(np.asarray(to_rgb(image)), expected), image.mode
    dark = Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16))  # a dark 16-bit image stays dark
    assert np.asarray(to_rgb(dark)).max() == round(1000 * 255 / 65535)


def test_decompression_bomb_is_one_line_naming_file_and_limit(checkpoint, pictures, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    result = runner.invoke(app, ["run", "--model", str(checkpoint), "--image", str(pictures / "upright.png"),
                                 "--prompt", "x"])
    assert result.exit_code == 2
    assert "upright.png" in result.output and "decompression-bomb limit of 2,000 pixels" in result.output
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": str(pictures / "upright.png"), "text": "x", "answer": "y"}))
    result = runner.invoke(app, ["eval", "--model", str(checkpoint), "--data", str(tmp_path / "qa.jsonl"),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "qa.jsonl:1" in result.output and "upright.png" in result.output and "2,000 pixels" in result.output


@pytest.mark.parametrize("args, code, message", [
    (["--seed", "99999999999999999999", "--method", "random"], 2, "--seed 99999999999999999999: give an integer in 0.."),
    (["--threads", "100000"], 2, "--threads 100000: give 1 to"),
    (["--layer", "-1", "--method", "pdrop"], 2, "--layer -1: layers count from 0"),
    (["--layer", "-1", "--method", "random"], 2, "--layer -1: layers count from 0"),
    (["--prompt", "what \udcff ?"], 2, "--prompt: not valid UTF-8"),
    (["--prompt", " "], 2, "--prompt is empty"),
    (["--max-new-tokens", "100000"], 2, "--max-new-tokens 100000: the model has 512 positions"),
    (["--prompt", "colour " * 600], 2, "the question: the prompt is"),
    (["--method", "tokencarve", "--keep", "1"], 0, "36 -> 1"),
    (["--method", "tokencarve", "--budget", "0.0000001"], 0, "36 -> 1"),
], ids=["seed", "threads", "layer-pdrop", "layer-random", "utf8", "empty", "max-new-tokens", "too-long", "tokencarve-1",
        "tokencarve-tiny"])
def test_run_options(checkpoint, pictures, args, code, message):
    base = ["run", "--model", str(checkpoint), "--image", str(pictures / "upright.png"), "--prompt", "what ?",
            "--max-new-tokens", "2", "--repeats", "1"]
    result = runner.invoke(app, base + args)
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())
    if code:
        assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_a_runtime_value_error_is_exit_code_1(checkpoint, pictures, monkeypatch):
    import vtprune.apps.runner

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(vtprune.apps.runner, "compare_one", broken)
    result = runner.invoke(app, ["run", "--model", str(checkpoint), "--image", str(pictures / "upright.png"),
                                 "--prompt", "what ?"])
    assert result.exit_code == 1
    assert "ValueError: operands could not be broadcast together" in result.output


def test_extreme_profile_is_refused(checkpoint, pictures, tmp_path):
    path = tmp_path / "steep.json"
    path.write_text(json.dumps({"name": "steep", "kind": "exp", "length": 36, "sigma": -200.0}))
    result = runner.invoke(app, ["run", "--model", str(checkpoint), "--image", str(pictures / "upright.png"),
                                 "--prompt", "what ?", "--profile", str(path)])
    assert result.exit_code == 2
    assert "sigma=-200 is outside [-50, 50]" in result.output


def test_extreme_sigma_debiases_without_inf():
    import torch

    from vtprune.adapters.base import VisualSegment
    from vtprune.debias import Debias
    from vtprune.debias.profiles import Profile

    for sigma in (-50.0, 50.0):
        debias = Debias(profile=Profile(name="edge", kind="exp", length=576, sigma=sigma), padding=False)
        scores = torch.rand(576) * 1e-3 + 1e-6
        out = debias.apply(scores, torch.arange(576), [VisualSegment(0, 576, (24, 24), 0)], None)
        assert torch.isfinite(out).all() and (out > 0).all() and len(set(out.tolist())) == 576


@pytest.fixture
def qa(pictures, tmp_path):
    def write(rows):
        path = tmp_path / "qa.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        return path
    return write


def test_eval_refuses_an_empty_question(checkpoint, pictures, qa, tmp_path):
    data = qa([{"image": str(pictures / "upright.png"), "text": "what ?", "answer": "red"},
               {"image": str(pictures / "upright.png"), "text": " <image> ", "answer": "red"}])
    result = runner.invoke(app, ["eval", "--model", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "qa.jsonl:2: the question" in result.output and "is empty" in result.output


def test_eval_refuses_a_question_longer_than_the_positions(checkpoint, pictures, qa, tmp_path):
    data = qa([{"image": str(pictures / "upright.png"), "text": "colour " * 600, "answer": "red"}])
    result = runner.invoke(app, ["eval", "--model", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "o"),
                                 "--max-new-tokens", "2"])
    assert result.exit_code == 2
    assert "line 1 of the data: the prompt is" in result.output and "512 positions" in result.output


@pytest.mark.parametrize("command", ["eval", "calibrate", "analyze", "demo"])
def test_unwritable_outputs_fail_before_any_model_loads(checkpoint, pictures, qa, tmp_path, monkeypatch, command):
    import vtprune.apps.loading

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(vtprune.apps.loading, "load_model", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data = qa([{"image": str(pictures / "upright.png"), "text": "what ?", "answer": "red"}])
    common = ["--model", str(checkpoint), "--data", str(data), "--samples", "1"]
    args = {"eval": ["eval", *common, "--out", str(blocker / "out")],
            "calibrate": ["calibrate", *common, "--out", str(blocker / "p.json")],
            "analyze": ["analyze", *common, "--out-dir", str(blocker / "out")],
            "demo": ["demo", "--out-dir", str(blocker / "out")]}[command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert str(blocker) in result.output and ("--out" in result.output)


def test_calibrate_creates_nested_output_folders(checkpoint, pictures, qa, tmp_path):
    data = qa([{"image": str(pictures / "upright.png"), "text": "what ?"}] * 2)
    out = tmp_path / "new" / "nested" / "p.json"
    result = runner.invoke(app, ["calibrate", "--model", str(checkpoint), "--data", str(data), "--samples", "2",
                                 "--out", str(out), "--batch-size", "1", "--layer", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["kind"] == "exp"
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("content, message", [("", "is empty"), ('{"settings": {', "is truncated or not JSON")])
def test_calibrate_names_an_unusable_state_file(checkpoint, pictures, qa, tmp_path, content, message):
    data = qa([{"image": str(pictures / "upright.png"), "text": "what ?"}] * 2)
    out = tmp_path / "p.json"
    (tmp_path / "p.json.partial.json").write_text(content)
    result = runner.invoke(app, ["calibrate", "--model", str(checkpoint), "--data", str(data), "--samples", "2",
                                 "--out", str(out), "--batch-size", "1", "--layer", "2"])
    assert result.exit_code == 0, result.output
    assert flat(f"p.json.partial.json {message}; starting over") in flat(result.output)
    assert "other settings" not in result.output


def test_analyze_resumes_past_a_malformed_state_record(checkpoint, pictures, qa, tmp_path):
    data = qa([{"image": str(pictures / "upright.png"), "text": "what ?"}] * 2)
    out = tmp_path / "report"
    args = ["analyze", "--model", str(checkpoint), "--data", str(data), "--samples", "2", "--out-dir", str(out),
            "--batch-size", "1", "--layer", "2", "--keep", "8"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    report = json.loads((out / "report.json").read_text())
    # a state file with the right key but a record missing "raw": the run names it and starts over
    import vtprune.cli as cli

    seen = {}
    original = cli._analyze_records

    def capture(model, processor, examples, press, batch_size, state):
        from vtprune.apps.calibration import data_fingerprint, model_fingerprint

        key = {"model": model_fingerprint(model), "data": data_fingerprint(examples), "press": repr(press)}
        state.write_text(json.dumps({"key": key, "records": [{"debiased": None}]}))
        seen["state"] = state
        return original(model, processor, examples, press, batch_size, state)

    cli._analyze_records = capture
    try:
        second = runner.invoke(app, args)
    finally:
        cli._analyze_records = original
    assert second.exit_code == 0, second.output
    assert flat("holds a malformed record (KeyError: 'raw')") in flat(second.output)
    assert json.loads((out / "report.json").read_text())["settings"] == report["settings"]


# --- concurrency ----------------------------------------------------------------------------------------------
EVAL = ["eval", "--model", "testbed", "--data", "testbed", "--samples", "3", "--methods", "fastv", "--debias", "none",
        "--max-new-tokens", "2", "--threads", "1"]


def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vtprune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_evals_on_one_out(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "cells.json").write_text('{"key": {"model": ')  # a truncated file from elsewhere: named, replaced
    first = _cli(*EVAL, "--budgets", "0.25", "--out", str(out))
    lock = out / ".vtprune.lock"
    deadline = time.time() + 120
    while not (lock.is_file() and str(first.pid) in lock.read_text()) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    second = runner.invoke(app, [*EVAL, "--budgets", "0.125", "--out", str(out)])
    assert second.exit_code == 1
    assert f"--out {out} is in use by another vtprune run, pid {first.pid}" in " ".join(second.output.split())
    assert "--wait" in second.output
    waited = runner.invoke(app, [*EVAL, "--budgets", "0.125", "--out", str(out), "--wait"])
    assert waited.exit_code == 0, waited.output
    assert first.wait(timeout=300) == 0, first.communicate()
    assert flat("is truncated or not JSON") in flat(first.stderr.read())
    assert flat("waiting for pid") in flat(waited.output) and flat("resuming: 1 of 2 settings") in flat(waited.output)
    cells = json.loads((out / "cells.json").read_text())["cells"]
    assert set(cells) == {"unpruned", "fastv@0.25/none", "fastv@0.125/none"}  # nothing lost
    results = json.loads((out / "results.json").read_text())
    assert [c["key"] for c in results["cells"]] == ["unpruned", "fastv@0.125/none"]
    assert not lock.exists()


def test_kill_9_during_writes_leaves_a_readable_file_and_a_lock_that_is_taken_over(tmp_path):
    from vtprune.io import OutputLock

    state = tmp_path / "state.json"
    script = textwrap.dedent(f"""
        import itertools
        from vtprune.io import OutputLock, atomic_write_json
        lock = OutputLock({str(tmp_path)!r}, option="--out").acquire()
        print("locked", flush=True)
        for i in itertools.count():
            atomic_write_json({str(state)!r}, {{"i": i, "records": [list(range(200))] * 200}})
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "locked"
    deadline = time.time() + 60
    while not state.is_file() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert json.loads(state.read_text())["records"][0][-1] == 199
    notes = []
    with OutputLock(tmp_path, option="--out", note=notes.append):
        assert len(notes) == 1 and f"left by pid {writer.pid}" in notes[0] and "no longer running" in notes[0]
    assert not (tmp_path / ".vtprune.lock").exists()


@pytest.mark.parametrize("args, message", [
    (["testbed", "eval", "--n", "99999999999999"], "--n 99999999999999: the testbed generates at most 100,000"),
    (["calibrate", "--model", "testbed", "--data", "testbed", "--samples", "99999999999999", "--out", "p.json"],
     "--samples 99999999999999: the testbed generates at most 100,000"),
    (["eval", "--model", "testbed", "--data", "testbed", "--samples", "99999999999999"], "at most 100,000"),
    (["testbed", "eval", "--n", "2", "--out", "BLOCKER/r.json"], "--out BLOCKER/r.json: cannot create or write"),
    (["testbed", "eval", "--n", "2", "--markdown", "BLOCKER/r.md"], "--markdown BLOCKER/r.md: cannot create"),
], ids=["testbed-n", "calibrate-samples", "eval-samples", "testbed-out", "testbed-markdown"])
def test_more_usage_errors_before_any_work(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BLOCKER").write_text("")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
