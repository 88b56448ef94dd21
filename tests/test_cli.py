"""The CLI on a tiny checkpoint saved with save_pretrained and loaded back with from_pretrained."""

from __future__ import annotations

import json

import pytest
from conftest import build_model, make_image
from typer.testing import CliRunner

from vtprune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, processor):
    path = tmp_path_factory.mktemp("tiny-llava")
    build_model(processor).save_pretrained(path)
    processor.save_pretrained(path)
    image = path / "image.png"
    make_image(120, 60).save(image)
    return path, image


@pytest.mark.parametrize("extra", [[], ["--no-debias"], ["--method", "random", "--keep", "0.5"]])
def test_run(checkpoint, extra):
    path, image = checkpoint
    args = ["run", "--model", str(path), "--image", str(image), "--prompt", "what is the colour ?",
            "--keep", "8", "--max-new-tokens", "3", "--repeats", "1", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "visual tokens" in result.output and "prefill" in result.output
    kept = "18" if "random" in extra else "8"
    assert f"36 -> {kept}" in result.output


def test_run_reports_padding_cap(checkpoint):
    path, image = checkpoint  # 120x60: a third of the 6x6 grid is padding, 24 real tokens
    result = runner.invoke(app, ["run", "--model", str(path), "--image", str(image), "--prompt", "x",
                                 "--keep", "30", "--max-new-tokens", "1", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "36 -> 24" in result.output


def test_profiles_lists_builtins():
    result = runner.invoke(app, ["profiles"])
    assert result.exit_code == 0, result.output
    assert "llava-1.5-7b/fastv" in result.output


def test_unknown_method(checkpoint):
    path, image = checkpoint
    result = runner.invoke(app, ["run", "--model", str(path), "--image", str(image), "--prompt", "x",
                                 "--method", "nope"])
    assert result.exit_code != 0
    assert "unknown method" in result.output


@pytest.fixture(scope="module")
def calibration_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    rows = [{"image": "broken.png", "text": "what shape ?"}]
    for i in range(6):
        make_image(40 + 23 * i, 100 - 9 * i, seed=i).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": "what is the colour of the circle ?"})
    (folder / "broken.png").write_bytes(b"nope")
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def test_calibrate_writes_a_profile_that_run_accepts(checkpoint, calibration_data, tmp_path):
    path, image = checkpoint
    out = tmp_path / "profile.json"
    result = runner.invoke(app, ["calibrate", "--model", str(path), "--method", "fastv", "--layer", "2",
                                 "--data", str(calibration_data / "data.jsonl"), "--images", str(calibration_data),
                                 "--samples", "6", "--out", str(out), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable" in result.output and "R^2" in result.output
    profile = json.loads(out.read_text())
    assert profile["kind"] == "exp" and profile["length"] == 36 and profile["method"] == "fastv"
    assert profile["layer"] == 2 and profile["query"] == "last" and profile["extra"]["samples"] == 6
    assert profile["extra"]["data_fingerprint"] and profile["extra"]["vtprune_version"]
    assert not (tmp_path / "profile.json.partial.json").exists()
    result = runner.invoke(app, ["run", "--model", str(path), "--image", str(image), "--prompt", "x", "--keep", "8",
                                 "--max-new-tokens", "1", "--repeats", "1", "--profile", str(out)])
    assert result.exit_code == 0, result.output
    assert "positional" in result.output


def test_calibrate_rejects_more_samples_than_data(checkpoint, calibration_data, tmp_path):
    path, _ = checkpoint
    result = runner.invoke(app, ["calibrate", "--model", str(path), "--data", str(calibration_data / "data.jsonl"),
                                 "--images", str(calibration_data), "--samples", "50", "--out", str(tmp_path / "p.json")])
    assert result.exit_code != 0
    assert "asked for 50 samples" in result.output


def test_analyze_writes_report_and_four_plots(checkpoint, calibration_data, tmp_path):
    path, _ = checkpoint
    result = runner.invoke(app, ["analyze", "--model", str(path), "--data", str(calibration_data / "data.jsonl"),
                                 "--images", str(calibration_data), "--samples", "6", "--keep", "0.25",
                                 "--out-dir", str(tmp_path), "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["samples"] == 6 and report["padding_kept_share"]["after"] == 0.0
    assert {"sigma_attn", "sigma_freq", "padding_score_share"} <= set(report)
    for name in ("score_vs_position", "score_heatmap", "keep_frequency", "selection"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000


@pytest.mark.parametrize("method", ["pdrop", "himap", "sparsevlm", "tokencarve", "illava", "visionzip", "fastervlm",
                                    "dart", "divprune"])
@pytest.mark.parametrize("debias", [True, False], ids=["debias", "no-debias"])
def test_run_each_method_on_the_testbed(tmp_path, method, debias):
    from vtprune.methods import METHODS

    if debias and METHODS[method].query is None:
        pytest.skip(f"{method} ranks without attention: no debiasing")
    from vtprune.testbed.data import make_sample

    image = tmp_path / "image.png"
    sample = make_sample("test", 0, 3)
    sample.image.save(image)
    args = ["run", "--model", "testbed", "--image", str(image), "--prompt", sample.question, "--method", method,
            "--budget", "0.25", "--max-new-tokens", "2", "--repeats", "1", *([] if debias else ["--no-debias"])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert ("testbed/" + method in result.output) == debias  # its calibrated profile, when debiasing
    assert "144 ->" in result.output


def test_methods_lists_the_registry():
    from vtprune.methods import METHODS

    result = runner.invoke(app, ["methods"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name, cls in METHODS.items():
        assert name in result.output and cls.__name__ in result.output


def test_readme_documents_every_method():
    from pathlib import Path

    from vtprune.methods import METHODS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, cls in METHODS.items():
        assert f"`{name}`" in readme and cls.__name__ in readme, f"README lacks method {name}"


def test_option_a_method_does_not_take_is_an_error_before_loading(checkpoint):
    path, image = checkpoint
    result = runner.invoke(app, ["run", "--model", "/nonexistent", "--image", str(image), "--prompt", "x",
                                 "--method", "fastv", "--seed", "3"])
    assert result.exit_code != 0
    assert "takes no seed" in result.output
