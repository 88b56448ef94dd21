"""Qwen3-VL: everything Qwen2.5-VL needs (grids, 3-D mRoPE positions kept for kept tokens in prefill and decode,
no padding, vision-side methods refused) plus the deepstack features added to the visual tokens after the first
decoder layers, which must follow the kept tokens (cuts at layer 0 and inside those layers), and videos whose
frames are separate runs after timestamps."""

from __future__ import annotations

import pytest
import torch
from families import build_qwen3_vl, make_image, qwen_inputs, select
from oracles.mrope import oracle_logits

from vtprune import Debias, FastV, PyramidDrop, Random
from vtprune.adapters import adapter_for

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
Q1, Q2 = [5, 6, 7, 8], [9, 10]


def inputs_for(samples, seed=0):
    return qwen_inputs(samples, seed=seed, patch=16, timestamps=True)


@pytest.fixture(scope="module")
def sdpa_model():
    return build_qwen3_vl("sdpa")


@pytest.fixture(scope="module")
def eager_model():
    return build_qwen3_vl("eager")


def _models(request, attn):
    return request.getfixturevalue(f"{attn}_model")


def _check_decode(model, inputs, stages, generated):
    new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
    for step, step_logits in enumerate(generated.logits):  # positions continue from rope_deltas
        reference = oracle_logits(model, inputs, stages, new_tokens[:, :step])[0][:, -1]
        torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)


def test_layout_timestamped_video_frames_in_forward_and_generate(sdpa_model):
    """Frames of one video are separate runs (timestamps between them): one video, one segment per frame, from
    video_grid_thw in a forward and from the encoded features' sizes and 3-D positions inside generate()."""
    inputs = inputs_for([([make_image(130, 70)], [(3, 4, 6)], Q1)])
    layout = adapter_for(sdpa_model).visual_layout(inputs["input_ids"], inputs)
    segments = layout.segments[0]
    assert [(s.kind, s.grid, s.frame, s.part) for s in segments[1:]] == [("frame", (2, 3), f, 1) for f in range(3)]
    press = FastV(keep=6, layer=2)
    with torch.no_grad(), press(sdpa_model):
        sdpa_model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert press.last_selection[0].segments[0] == segments


def test_deepstack_changes_the_output(sdpa_model):
    """The test model's deepstack features matter, so the tests below would see them misplaced."""
    inputs = inputs_for([([make_image(140, 84, seed=3)], [], Q1)])
    with torch.no_grad():
        vanilla = sdpa_model(**inputs).logits
        saved = sdpa_model.model.language_model._deepstack_process
        sdpa_model.model.language_model._deepstack_process = lambda hidden, *_: hidden
        try:
            without = sdpa_model(**inputs).logits
        finally:
            sdpa_model.model.language_model._deepstack_process = saved
    assert (vanilla - without).abs().max() > 0.1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_equals_vanilla_batch_and_single(request, attn):
    model = _models(request, attn)
    samples = [([make_image(120, 60, seed=1)], [], Q1), ([make_image(60, 150, seed=2)], [], Q2)]
    batch = inputs_for(samples)
    assert (batch["attention_mask"] == 0).any()
    for inputs in (select(batch, 0), batch):
        with torch.no_grad():
            vanilla = model(**inputs).logits
            vanilla_gen = model.generate(**inputs, **GEN)
            with pytest.warns(UserWarning, match="padding debiasing does not apply"), \
                    FastV(keep=1.0, layer=2, debias=Debias(padding=True))(model):
                pruned = model(**inputs).logits
                pruned_gen = model.generate(**inputs, **GEN)
        torch.testing.assert_close(pruned, vanilla, atol=1e-5, rtol=0)
        assert torch.equal(pruned_gen.sequences, vanilla_gen.sequences)
        for a, b in zip(pruned_gen.logits, vanilla_gen.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_fastv_inside_deepstack_layers_equals_oracle(request, attn, kind):
    """FastV at layer 2: deepstack adds after layers 0, 1 and 2, so the addition after layer 2 must go to the kept
    tokens only."""
    model = _models(request, attn)
    sample = ([make_image(140, 84, seed=3)], [], Q1) if kind == "image" else ([], [(2, 4, 6)], Q1)
    inputs = inputs_for([sample], seed=4)
    press = FastV(keep=5, layer=2)
    with torch.no_grad(), press(model):
        logits = model(**inputs).logits
        kept = press.last_selection[0].kept[0]
        generated = model.generate(**inputs, **GEN)
        assert torch.equal(press.last_selection[0].kept[0], kept)
    with torch.no_grad():
        expected, record = oracle_logits(model, inputs, [], fastv=(2, 5))
        assert torch.equal(record[0][1], kept), "the oracle's own FastV selection differs"
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        _check_decode(model, inputs, [(2, kept)], generated)


def test_layer0_cut_and_two_stages_equal_oracle(sdpa_model):
    """Random at the language model's input (every deepstack addition on the kept tokens only), and two stages
    inside and after the deepstack layers; prefill and decode."""
    inputs = inputs_for([([make_image(112, 112, seed=5)], [(2, 2, 4)], Q2)])
    for press in (Random(keep=6, layer=0, seed=1), Random(keep=[10, 4], layer=[1, 3], seed=2)):
        with torch.no_grad(), press(sdpa_model):
            logits = sdpa_model(**inputs).logits
            stages = [(s.layer, s.kept[0]) for s in press.last_selection]
            generated = sdpa_model.generate(**inputs, **GEN)
        with torch.no_grad():
            torch.testing.assert_close(logits[:, -1], oracle_logits(sdpa_model, inputs, stages)[0][:, -1], atol=1e-4, rtol=0)
            _check_decode(sdpa_model, inputs, stages, generated)


@pytest.mark.parametrize("press", [FastV(keep=[8, 4], layer=[1, 3]), PyramidDrop(keep=[10, 6, 3], layer=[1, 2, 3])],
                         ids=["fastv", "pdrop"])
def test_batch_equals_singles(sdpa_model, press):
    samples = [([make_image(150, 60, seed=6)], [], Q1), ([make_image(84, 84, seed=7)], [], Q2),
               ([], [(2, 4, 4)], Q1)]
    batch = inputs_for(samples, seed=8)
    with torch.no_grad(), press(sdpa_model):
        out = sdpa_model.generate(**batch, **GEN)
        kept = [[s.kept[b] for s in press.last_selection] for b in range(3)]
    width = batch["input_ids"].shape[1]
    for b in range(3):
        single = select(batch, b)
        with torch.no_grad(), press(sdpa_model):
            one = sdpa_model.generate(**single, **GEN)
        assert all(torch.equal(x, s.kept[0]) for x, s in zip(kept[b], press.last_selection))
        n = single["input_ids"].shape[1]
        assert torch.equal(out.sequences[b, width:], one.sequences[0, n:])
        for x, y in zip(out.logits, one.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)


def test_vision_side_refused_and_bad_grid_is_clear(sdpa_model):
    from vtprune.methods import METHODS

    inputs = inputs_for([([make_image(112, 56, seed=12)], [], Q1)])
    for name in ("visionzip", "fastervlm"):
        with pytest.raises(ValueError, match="Methods that work on this model.*fastv"):
            with METHODS[name]()(sdpa_model):
                pass
    inputs["image_grid_thw"] = inputs["image_grid_thw"] * torch.tensor([[1, 2, 1]])
    with pytest.raises(ValueError, match="describes 1 image"), torch.no_grad(), FastV(keep=4)(sdpa_model):
        sdpa_model(**inputs)


def test_cli_run_loads_a_saved_checkpoint(tmp_path):
    """`vtprune run --model DIR` on a directory laid out like a hub Qwen3-VL checkpoint."""
    import json

    from families import save_qwen2_5_vl_checkpoint
    from typer.testing import CliRunner

    from vtprune.cli import app

    save_qwen2_5_vl_checkpoint(tmp_path, version="3")
    make_image(160, 96).save(tmp_path / "image.png")
    result = CliRunner().invoke(app, ["run", "--model", str(tmp_path), "--image", str(tmp_path / "image.png"),
                                      "--prompt", "what is the colour ?", "--keep", "4", "--max-new-tokens", "2",
                                      "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    record, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("{"):])
    assert record["unpruned"]["visual_tokens"] == 15 and record["pruned"]["visual_tokens"] == 4
    assert any("padding debiasing does not apply" in note for note in record["notes"])


def test_qwen3_5_is_refused_with_the_reason():
    """Qwen3.5's linear-attention layers: refused with why, naming the supported classes."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    config = Qwen3_5Config(
        text_config=dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64),
    )
    model = Qwen3_5ForConditionalGeneration(config)
    assert "linear_attention" in model.config.text_config.layer_types
    with pytest.raises(ValueError, match="Gated DeltaNet linear-attention.*Supported model classes: .*Qwen3VL"):
        FastV(keep=4)(model)


def test_every_method_runs_or_refuses_clearly(sdpa_model):
    from vtprune.methods import METHODS

    inputs = inputs_for([([make_image(192, 128, seed=11)], [], Q1)])
    ran, refused = [], []
    for name, cls in METHODS.items():
        try:
            with torch.no_grad(), cls()(sdpa_model):
                sdpa_model.generate(**inputs, max_new_tokens=2, do_sample=False)
            ran.append(name)
        except ValueError as error:
            assert "Methods that work on this model" in str(error) and "fastv" in str(error), str(error)
            refused.append(name)
    assert set(refused) == {"visionzip", "fastervlm"}
    assert set(ran) == set(METHODS) - {"visionzip", "fastervlm"}
