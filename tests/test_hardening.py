"""Issue 12: every mistake is a one-line error (exit code 2) before any model loads, the cases that used to fail
late or silently, the decode-time image token, the all-padding image, and the protected testbed checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, inputs_for, make_image, prompt
from typer.testing import CliRunner

import vtprune.apps.loading
from vtprune import Debias, FastV, PyramidDrop
from vtprune.cli import app

runner = CliRunner()


@pytest.fixture
def no_loading(monkeypatch):
    """Usage errors must come before any model loads: loading fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(vtprune.apps.loading, "load_model", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    make_image(120, 60).save(folder / "image.png")
    (folder / "notimage.png").write_text("hello")
    (folder / "bad.json").write_text("{not json")
    (folder / "list.json").write_text("[1, 2]")
    (folder / "badfield.json").write_text(json.dumps({"name": "x", "kind": "exp", "length": 10, "sigma": "a"}))
    (folder / "rows.jsonl").write_text("[1, 2]\n")
    (folder / "a_dir").mkdir()
    (folder / "a_dir" / "other.txt").write_text("not a checkpoint")
    return folder


def fill(args, files):
    """{name} in an argument: the path of that file of the `files` fixture."""
    out = []
    for arg in args:
        for path in files.iterdir():
            arg = arg.replace("{" + path.name + "}", str(path))
        out.append(arg)
    return out


def one_line_usage_error(result, *fragments):
    """Exit code 2, nothing on stdout, exactly one line on stderr that names the problem."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vtprune: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


RUN_CASES = [
    (["--keep", "0"], ["--keep 0: a count must be >= 1", "fraction in (0, 1]"]),
    (["--keep", "-3"], ["--keep -3: a count must be >= 1"]),
    (["--keep", "1.5"], ["--keep 1.5: a count must be a whole number"]),
    (["--keep", "abc"], ["'abc' is not a number"]),
    (["--keep", "8,,4"], ["one per stage separated by commas"]),
    (["--keep", "72,18"], ["FastV: keep=[72, 18] has 2 entries but there are 1 stages"]),
    (["--keep", "0.25,30", "--layer", "2,4"], ["mixes fractions (floats) and token counts (ints)"]),
    (["--layer", "9"], ["layer=9 is out of range; the model has 6 decoder layers"]),
    (["--layer", "2.5"], ["--layer '2.5': give a layer index"]),
    (["--budget", "600"], ["budget=600", "1..576"]),
    (["--budget", "128,64"], ["a budget is one number"]),
    (["--positions", "shuffled"], ["positions='shuffled'", "'original' or 'compact'"]),
    (["--seed", "3"], ["--seed: fastv takes no seed"]),
    (["--method", "nope"], ["--method 'nope': unknown method"]),
    (["--method", "random", "--profile", "auto"], ["random ranks without attention", "drop --profile"]),
    (["--no-debias", "--profile", "auto"], ["contradict"]),
    (["--profile", "missing.json"], ["profile file missing.json does not exist"]),
    (["--profile", "{bad.json}"], ["bad.json is not valid JSON (", "line 1, column 2"]),
    (["--profile", "{list.json}"], ["holds a JSON list, not a profile"]),
    (["--profile", "{badfield.json}"], ["not a valid vtprune profile: sigma='a' must be a number"]),
    (["--profile", "llava-1.5-7b/fastvv"], ["unknown profile", "Did you mean"]),
    (["--image", "{notimage.png}"], ["not an image vtprune can read"]),
    (["--image", "{a_dir}"], ["is a directory"]),
    (["--image", "missing.png"], ["'--image'", "does not exist", "vtprune run --help"]),
    (["--model", "/nonexistent"], ["--model /nonexistent: no such directory"]),
    (["--model", "{a_dir}"], ["has no config.json"]),
    (["--model", "{image.png}"], ["is a file"]),
    (["--device", "gpu"], ["--device 'gpu' is not a device"]),
    (["--dtype", "half"], ["--dtype: unknown dtype 'half'"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens 0: must be >= 1"]),
    (["--repeats", "0"], ["--repeats 0"]),
    (["--prompt", " "], ["--prompt is empty"]),
    (["--prompt", "<image> what colour ?"], ["contains the image placeholder"]),
]


@pytest.mark.parametrize("extra, fragments", RUN_CASES, ids=[" ".join(c[0]) for c in RUN_CASES])
def test_run_usage_errors_are_one_line_before_loading(no_loading, files, extra, fragments):
    extra = fill(extra, files)
    args = ["run", "--model", "testbed", "--image", str(files / "image.png"), "--prompt", "what colour ?", *extra]
    one_line_usage_error(runner.invoke(app, args), *fragments)


def test_hub_id_while_offline(no_loading, files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["run", "--model", "nobody-vtprune/not-a-cached-model", "--image", str(files / "image.png"),
                                 "--prompt", "x"])
    one_line_usage_error(result, "not in the local Hugging Face cache", "HF_HUB_OFFLINE")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(no_loading, files):
    result = runner.invoke(app, ["run", "--model", "testbed", "--image", str(files / "image.png"), "--prompt", "x",
                                 "--device", "cuda"])
    one_line_usage_error(result, "--device cuda: CUDA is not available", "use --device cpu")


def test_text_only_model_is_refused_from_its_config(no_loading, files, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    result = runner.invoke(app, ["run", "--model", str(tmp_path), "--image", str(files / "image.png"), "--prompt", "x"])
    one_line_usage_error(result, "is a LlamaForCausalLM model; vtprune supports LlavaForConditionalGeneration")


OTHER_CASES = [
    (["calibrate", "--model", "testbed", "--data", "testbed", "--out", "{a_dir}/p.json", "--method", "random"],
     ["nothing to calibrate"]),
    (["calibrate", "--model", "testbed", "--data", "testbed", "--out", "p.json", "--samples", "0"], ["--samples 0"]),
    (["calibrate", "--model", "testbed", "--data", "testbed", "--out", "{a_dir}"], ["is a directory: give a file name"]),
    (["calibrate", "--model", "testbed", "--data", "testbed", "--out", "p.json", "--split", "nope"], ["--split 'nope'"]),
    (["calibrate", "--model", "testbed", "--data", "{rows.jsonl}", "--out", "p.json"], ["rows.jsonl:1 holds a JSON list"]),
    (["calibrate", "--model", "testbed", "--data", "missing.jsonl", "--out", "p.json"], ["missing.jsonl does not exist"]),
    (["analyze", "--model", "testbed", "--data", "testbed", "--samples", "4", "--example", "9"], ["--example 9 is outside"]),
    (["analyze", "--model", "testbed", "--data", "testbed", "--profile", "{bad.json}"], ["not valid JSON"]),
    (["analyze", "--model", "testbed", "--data", "testbed", "--keep", "0"], ["--keep 0: a count must be >= 1"]),
    (["analyze", "--model", "testbed", "--data", "testbed", "--out-dir", "{image.png}"], ["is a file: give a directory"]),
    (["profiles", "--method", "nope"], ["unknown method"]),
    (["demo", "--keep", "0"], ["--keep 0: a count must be >= 1"]),
    (["demo", "--count", "0"], ["--count 0"]),
    (["testbed", "train", "--steps", "0"], ["--steps 0: must be >= 1"]),
    (["testbed", "train", "--out", "{a_dir}"], ["exists and is not a testbed checkpoint"]),
    (["testbed", "eval", "--path", "{a_dir}"], ["holds no testbed checkpoint"]),
    (["testbed", "eval", "--keeps", "all,2"], ["--keeps 2"]),
    (["testbed", "eval", "--n", "0"], ["--n 0"]),
    (["--nope"], ["No such option", "vtprune --help"]),
    (["runn"], ["No such command", "Did you mean 'run'"]),
]


@pytest.mark.parametrize("args, fragments", OTHER_CASES, ids=[" ".join(c[0][:3]) + " " + c[0][-1] for c in OTHER_CASES])
def test_other_usage_errors_are_one_line_before_loading(no_loading, files, args, fragments):
    args = fill(args, files)
    one_line_usage_error(runner.invoke(app, args), *fragments)


def test_dtype_applies_to_the_testbed():
    model, _ = vtprune.apps.loading.load_model("testbed", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = vtprune.apps.loading.load_model("testbed")  # auto: the testbed stays float32
    assert next(model.parameters()).dtype == torch.float32


def test_train_refuses_the_installed_package(no_loading):
    from vtprune.testbed.model import CHECKPOINT_DIR

    result = runner.invoke(app, ["testbed", "train", "--out", str(CHECKPOINT_DIR)])
    one_line_usage_error(result, "inside the installed vtprune package", "never written to")


def test_unexpected_failures_are_one_line_with_exit_1_and_debug_shows_them(monkeypatch):
    import vtprune.cli

    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(vtprune.cli, "_profile_groups", boom)
    result = runner.invoke(app, ["profiles"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "vtprune: error: RuntimeError: boom (rerun with --debug for the traceback)"
    result = runner.invoke(app, ["profiles", "--debug"])
    assert isinstance(result.exception, RuntimeError)


def test_version_and_bare_command():
    from vtprune import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"vtprune {__version__}"
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and "run" in result.stdout and "profiles" in result.stdout


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys, vtprune.cli; from vtprune.cli import app; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_profiles_fit_80_columns_and_json_lists_all():
    from vtprune.debias.profiles import builtin_profiles

    result = runner.invoke(app, ["profiles"], terminal_width=80)
    assert result.exit_code == 0
    assert "llava-1.5-7b/fastv" in result.stdout and "testbed/pdrop" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    from vtprune.methods import METHODS

    rows = [line.split() for line in result.stdout.split("Also built in")[0].splitlines()
            if line.strip().startswith(("llava-1.5-7b ", "testbed "))]
    assert rows and all(row[1] in METHODS for row in rows)  # profiles of methods vtprune lacks are listed apart
    every = runner.invoke(app, ["profiles", "--all"], terminal_width=80)
    assert every.exit_code == 0 and max(len(line) for line in every.stdout.splitlines()) <= 80
    data = json.loads(runner.invoke(app, ["profiles", "--json"]).stdout)
    assert {p["name"] for p in data} == {p.name for p in builtin_profiles()}


# --- the Python API ---------------------------------------------------------------------------------------------
def test_constructor_mistakes_fail_when_built(files):
    with pytest.raises(ValueError, match=r"FastV: keep=\[0.25, 30\] mixes fractions"):
        FastV(keep=[0.25, 30], layer=[2, 4])
    with pytest.raises(ValueError, match=r"FastV: keep=\[72, 18\] has 2 entries but there are 1 stages"):
        FastV(keep=[72, 18], layer=2)
    with pytest.raises(ValueError, match="mixes fractions"):
        PyramidDrop(keep=[0.25, 30, 10])
    with pytest.raises(TypeError, match="profile=123: give a built-in profile name"):
        Debias(profile=123)
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON \(.* at line 1, column 2\)"):
        Debias(profile=str(files / "bad.json"))
    with pytest.raises(ValueError, match="list.json holds a JSON list, not a profile"):
        Debias(profile=files / "list.json")
    with pytest.raises(ValueError, match="is a directory"):
        Debias(profile=files / "a_dir")


@pytest.mark.parametrize("sizes", [[120], (84, 84), 120], ids=["[120]", "(84, 84)", "120"])
def test_image_sizes_must_be_pairs(processor, model, sizes):
    with pytest.raises(ValueError, match="one \\(width, height\\)"):
        FastV(keep=4, debias=Debias(padding=True))(model, processor=processor, image_sizes=sizes)


def test_presses_do_not_nest(processor, model):
    inputs = inputs_for(processor, [make_image(64, 64)], [prompt()])
    with torch.no_grad(), FastV(keep=8)(model):
        with pytest.raises(RuntimeError, match=r"a press \(FastV\) is already active on this model: presses do not nest"):
            with FastV(keep=4, layer=3)(model):
                pass
        model(**inputs)  # the first press still works
    with pytest.raises(RuntimeError, match="boom"), FastV(keep=8)(model):
        raise RuntimeError("boom")
    with torch.no_grad(), FastV(keep=4, layer=3)(model):  # an exception left nothing behind
        model(**inputs)


def test_flex_attention_is_refused_up_front(processor):
    flex = build_model(processor, attn="flex_attention")
    with pytest.raises(ValueError, match="flex attention .* attn_implementation='sdpa'"):
        FastV(keep=8)(flex)


def test_image_token_emitted_while_decoding(processor, model):
    """A model that generates the image token id: decode steps are never pruned, and generation inside a press
    goes on as vanilla generate does (keeping every token, it is vanilla generate)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    image_token = model.config.image_token_id

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -1e9)
            forced[:, image_token] = 0.0
            return forced

    inputs = inputs_for(processor, [make_image(64, 64)], [prompt()])
    settings = dict(max_new_tokens=3, do_sample=False, logits_processor=LogitsProcessorList([Force()]))
    with torch.no_grad():
        vanilla = model.generate(**inputs, **settings)
        with FastV(keep=36)(model):
            everything = model.generate(**inputs, **settings)
        with FastV(keep=4)(model):
            pruned = model.generate(**inputs, **settings)
    n = inputs["input_ids"].shape[1]
    assert (vanilla[0, n:] == image_token).all()
    assert torch.equal(everything, vanilla) and (pruned[0, n:] == image_token).all()


def test_image_without_content_keeps_its_least_padded_tokens(processor, model):
    """1x400: every token of the 6x6 grid is mostly padding. The kept tokens are the least padded (the middle
    columns), not a padding corner chosen by position, and the selection says so."""
    from vtprune.adapters import adapter_for

    image = make_image(1, 400)
    inputs = inputs_for(processor, [image], [prompt()])
    adapter = adapter_for(model)
    fractions = adapter.padding_fractions(adapter.visual_layout(inputs["input_ids"]), [image.size], processor)[0]
    assert (fractions > 0.5).all()
    least = fractions.min()
    for press, count in ((FastV(keep=4, debias=Debias(padding=True)), 1),  # FastV lowers its count to the real tokens
                         (PyramidDrop(keep=[4, 2, 1], layer=[1, 2, 3], debias=Debias(padding=True)), 4)):
        with torch.no_grad(), press(model, processor=processor, image_sizes=[image.size]):
            model(**inputs)
        first = press.last_selection[0]
        kept = first.kept[0]
        assert len(kept) == count
        assert torch.allclose(fractions[kept], least.expand(count)), (kept.tolist(), fractions[kept].tolist())
        assert any("mostly padding" in note and "least-padded" in note for note in first.notes), first.notes


@pytest.mark.parametrize("name", ["sparsevlm", "fastervlm", "visionzip", "illava"])
def test_image_without_content_least_padded_rule_in_every_method(processor, model, name):
    """The same rule in the methods that do not use the default selection: SparseVLM's stages, the per-image
    budget of the vision-side methods (VisionZip's dominant tokens), iLLaVA's language-model stage."""
    from vtprune.adapters import adapter_for
    from vtprune.methods import METHODS

    image = make_image(1, 400)
    inputs = inputs_for(processor, [image], [prompt()])
    adapter = adapter_for(model)
    fractions = adapter.padding_fractions(adapter.visual_layout(inputs["input_ids"]), [image.size], processor)[0]
    least = torch.sort(fractions).values
    cls = METHODS[name]
    press = cls(budget=0.25, vit_layers=[], debias=Debias(padding=True)) if name == "illava" else \
        cls(budget=0.25, debias=Debias(padding=True))
    with torch.no_grad(), press(model, processor=processor, image_sizes=[image.size]):
        model(**inputs)
    first = press.last_selection[0]
    kept = first.kept[0]
    if name == "visionzip":  # the dominant tokens are kept; the contextual ones are merged from the rest
        kept = kept[torch.argsort(fractions[kept], stable=True)][: press.split(len(fractions))[0]]
    assert torch.allclose(torch.sort(fractions[kept]).values, least[: len(kept)]), (kept.tolist(), fractions[kept].tolist())


# --- the testbed checkpoint -----------------------------------------------------------------------------------------
def test_train_never_replaces_a_better_checkpoint_unless_forced(tmp_path):
    from vtprune.testbed.train import TrainConfig, check_output, train

    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "config.json").write_text("{}")
    recorded = {"metrics": {"all": 0.99}, "step": 1500, "val_size": 2, "seed": 0}
    (out / "training.json").write_text(json.dumps(recorded))
    cfg = TrainConfig(steps=1, batch_size=1, eval_every=1, val_size=2, warmup=1, vision_hidden=16, vision_layers=1,
                      text_hidden=32, text_layers=1, heads=2, extra_questions=0, caption=False, log_every=0)
    result = train(cfg, work_dir=tmp_path / "work", out=out, log=lambda message: None)
    assert not result.saved and result.existing == 0.99 and result.best["all"] < 0.99
    assert (out / "config.json").read_text() == "{}"  # untouched
    result = train(cfg, work_dir=tmp_path / "work2", out=out, log=lambda message: None, force=True)
    assert result.saved and json.loads((out / "training.json").read_text())["metrics"] == result.best
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    with pytest.raises(ValueError, match="inside the installed vtprune package"):
        check_output(Path(vtprune.__file__).parent / "testbed" / "checkpoint")


# --- run, calibrate and analyze end to end on a tiny checkpoint ------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, processor):
    path = tmp_path_factory.mktemp("tiny")
    build_model(processor).save_pretrained(path)
    processor.save_pretrained(path)
    make_image(120, 60).save(path / "image.png")
    return path


def test_run_json_has_both_runs_and_the_speedup(checkpoint):
    result = runner.invoke(app, ["run", "--model", str(checkpoint), "--image", str(checkpoint / "image.png"), "--prompt",
                                 "what is the colour ?", "--keep", "8", "--max-new-tokens", "2", "--repeats", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == str(checkpoint) and data["method"] == "fastv" and data["stages"][0]["keep"] == 8
    assert len(data["unpruned"]["prefill_ms_runs"]) == 2 and len(data["pruned"]["prefill_ms_runs"]) == 2
    assert data["unpruned"]["visual_tokens"] == 36 and data["pruned"]["visual_tokens"] == 8
    assert data["pruned"]["sequence_tokens"] == data["unpruned"]["sequence_tokens"] - 28
    assert data["speedup"] == pytest.approx(data["unpruned"]["prefill_ms"] / data["pruned"]["prefill_ms"])
    assert set(data["warmup_ms"]) == {"unpruned", "pruned"}


def test_processor_of_another_model_is_refused(checkpoint, tmp_path):
    from vtprune.testbed.model import build_processor

    build_model(__import__("conftest").build_processor()).save_pretrained(tmp_path)
    build_processor().save_pretrained(tmp_path)  # the testbed's: 168 px images, 144 tokens
    result = runner.invoke(app, ["run", "--model", str(tmp_path), "--image", str(checkpoint / "image.png"), "--prompt", "x"])
    one_line_usage_error(result, "makes 168x168 images but the model's vision tower takes 84x84")


def test_calibrate_resumes_and_reuses_and_names_the_model(checkpoint, processor, tmp_path):
    from vtprune.apps.calibration import calibrate
    from vtprune.apps.datasets import load_examples

    rows = [{"image": f"{i}.png", "text": "what is the colour of the circle ?"} for i in range(12)]
    for i in range(12):
        make_image(50 + 9 * i, 90 - 4 * i, seed=i).save(tmp_path / f"{i}.png")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "profile.json"
    args = ["calibrate", "--model", str(checkpoint), "--data", str(tmp_path / "data.jsonl"), "--samples", "12",
            "--out", str(out), "--batch-size", "1", "--layer", "2"]
    # an interrupted calibration: the first chunk (8 examples at batch size 1) is saved, then Ctrl-C
    model, loaded = vtprune.apps.loading.load_model(str(checkpoint))
    examples, _ = load_examples(str(tmp_path / "data.jsonl"), None, 12)
    done = []

    def interrupt(n):
        done.append(n)
        if sum(done) > 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(model, loaded, examples, FastV(layer=2), batch_size=1, state_path=out.with_name(out.name + ".partial.json"),
                  progress=interrupt)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resuming: 8 of 12 samples were done" in result.stderr and "(resumed)" in result.stdout
    profile = json.loads(out.read_text())
    assert profile["name"] == f"{checkpoint.name}/fastv/calibrated" and profile["extra"]["samples"] == 12
    again = runner.invoke(app, [*args, "--json"])
    assert again.exit_code == 0 and "reused:" in again.stderr
    assert json.loads(again.stdout)["outcome"] == "reused" and json.loads(out.read_text()) == profile


def test_calibrated_testbed_profile_is_named_testbed(processor):
    from vtprune.apps.calibration import calibrate

    model = build_model(processor)
    model.config.vtprune_model = "testbed"
    model.config._name_or_path = "/usr/lib/python3/site-packages/vtprune/testbed/checkpoint"
    examples = [type("E", (), {"image": make_image(80, 50, seed=i), "question": "what colour ?"})() for i in range(2)]
    result = calibrate(model, processor, examples, FastV(layer=2), batch_size=2)
    assert result.profile.name == "testbed/fastv/calibrated" and result.profile.model == "testbed"


def test_analyze_report_records_its_settings(checkpoint, tmp_path):
    for i in range(3):
        make_image(60 + 20 * i, 90, seed=i).save(tmp_path / f"{i}.png")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"image": f"{i}.png", "text": "what colour ?"}) for i in range(3)))
    result = runner.invoke(app, ["analyze", "--model", str(checkpoint), "--data", str(tmp_path / "data.jsonl"),
                                 "--samples", "3", "--keep", "8", "--layer", "2", "--out-dir", str(tmp_path / "out"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert json.loads(result.stdout) == report
    settings = report["settings"]
    assert settings["model"] == str(checkpoint) and settings["method"] == "fastv" and settings["layers"] == [2]
    assert settings["keep"] == [8] and settings["budget"] is None and settings["profile_name"] == "auto"
    assert settings["padding"] is True and settings["samples"] == 3


def test_analyze_resumes_after_an_interruption(checkpoint, tmp_path, monkeypatch):
    import vtprune.apps.runner

    for i in range(10):
        make_image(60 + 7 * i, 90, seed=i).save(tmp_path / f"{i}.png")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"image": f"{i}.png", "text": "what colour ?"}) for i in range(10)))
    args = ["analyze", "--model", str(checkpoint), "--data", str(tmp_path / "data.jsonl"), "--samples", "10",
            "--keep", "8", "--layer", "2", "--out-dir", str(tmp_path / "out"), "--batch-size", "1", "--json"]
    real = vtprune.apps.runner.run_examples
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(vtprune.apps.runner, "run_examples", interrupted)
    result = runner.invoke(app, args)
    assert result.exit_code == 130 and "interrupted: progress is saved in" in result.stderr
    assert (tmp_path / "out" / "report.partial.json").is_file()
    monkeypatch.setattr(vtprune.apps.runner, "run_examples", real)
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming: 8 of 10 examples were done" in resumed.stderr
    assert not (tmp_path / "out" / "report.partial.json").exists()
    fresh = runner.invoke(app, args)  # the same analysis in one go gives the same report
    assert json.loads(fresh.stdout)["sigma_attn"] == json.loads(resumed.stdout)["sigma_attn"]


def test_testbed_eval_resumes_finished_cells(tmp_path):
    from vtprune.testbed.benchmark import run_benchmark
    from vtprune.testbed.data import make_split
    from vtprune.testbed.model import load_testbed

    model, processor = load_testbed()
    questions = make_split("test", 4)
    state = tmp_path / "eval.partial.json"
    plan = dict(keeps=[None, 0.25], names=["FastV", "FastV+debias"], batch_size=4, state_path=state)

    def stop_at_third(done, total, name):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_benchmark(model, processor, questions, progress=stop_at_third, **plan)
    messages = []
    cells, bias = run_benchmark(model, processor, questions, log=messages.append, **plan)
    assert messages[0].startswith("resuming: 2 of 3 cells were done")
    assert [c.setting for c in cells] == ["unpruned", "FastV", "FastV+debias"] and cells[2].delta is not None
    assert len(bias) == 1
