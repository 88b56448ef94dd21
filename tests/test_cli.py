"""The CLI on a tiny checkpoint saved with save_pretrained and loaded back with from_pretrained."""

from __future__ import annotations

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
            "--keep", "8", "--max-new-tokens", "3", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "visual tokens" in result.output and "prefill" in result.output
    kept = "18" if "random" in extra else "8"
    assert f"36 -> {kept}" in result.output


def test_run_reports_padding_cap(checkpoint):
    path, image = checkpoint  # 120x60: a third of the 6x6 grid is padding, 24 real tokens
    result = runner.invoke(app, ["run", "--model", str(path), "--image", str(image), "--prompt", "x",
                                 "--keep", "30", "--max-new-tokens", "1"])
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
