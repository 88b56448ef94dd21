"""Qwen2.5-VL: dynamic-resolution grids, 3-D mRoPE positions for kept tokens (prefill and decode), images and
videos, no padding, vision-side methods refused, per-layer-type masks."""

from __future__ import annotations

import pytest
import torch
from families import QWEN_IMAGE, build_qwen2_5_vl, make_image, qwen_inputs, select
from oracles.mrope import oracle_logits

from vtprune import Debias, FastV, PyramidDrop, Random
from vtprune.adapters import adapter_for
from vtprune.methods import METHODS

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
Q1, Q2 = [5, 6, 7, 8], [9, 10]


@pytest.fixture(scope="module")
def sdpa_model():
    return build_qwen2_5_vl("sdpa")


@pytest.fixture(scope="module")
def eager_model():
    return build_qwen2_5_vl("eager")


def _models(request, attn):
    return request.getfixturevalue(f"{attn}_model")


def test_layout_images_and_video_frames(sdpa_model):
    inputs = qwen_inputs([([make_image(120, 60), make_image(56, 112, seed=1)], [(2, 4, 6)], Q1)])
    layout = adapter_for(sdpa_model).visual_layout(inputs["input_ids"], inputs)
    grids = inputs["image_grid_thw"].tolist()
    segments = layout.segments[0]
    assert [s.kind for s in segments] == ["image", "image", "frame", "frame"]
    assert [s.grid for s in segments[:2]] == [(h // 2, w // 2) for _, h, w in grids]
    assert [(s.grid, s.frame, s.part) for s in segments[2:]] == [((2, 3), 0, 2), ((2, 3), 1, 2)]
    assert sum(s.length for s in segments) == layout.num_visual[0]
    assert [s.offset for s in segments] == [0, segments[0].length, segments[0].length + segments[1].length,
                                            segments[0].length + segments[1].length + 6]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_equals_vanilla_batch_and_single(request, attn):
    model = _models(request, attn)
    samples = [([make_image(120, 60, seed=1)], [], Q1), ([make_image(60, 150, seed=2)], [], Q2)]
    batch = qwen_inputs(samples)
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
def test_fastv_equals_oracle_with_mrope_positions(request, attn, kind):
    model = _models(request, attn)
    sample = ([make_image(140, 84, seed=3)], [], Q1) if kind == "image" else ([], [(2, 4, 6)], Q1)
    inputs = qwen_inputs([sample], seed=4)
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
        new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
        for step, step_logits in enumerate(generated.logits):  # decode: positions continue from rope_deltas
            reference = oracle_logits(model, inputs, [(2, kept)], new_tokens[:, :step])[0][:, -1]
            torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)


def test_layer0_cut_and_two_stages_equal_oracle(sdpa_model):
    """Random at the language model's input (the LM-input path with 3-D positions, generate's 4-row ones) and a
    two-stage schedule."""
    inputs = qwen_inputs([([make_image(112, 112, seed=5)], [], Q2)])
    for press in (Random(keep=6, layer=0, seed=1), Random(keep=[10, 4], layer=[1, 3], seed=2)):
        with torch.no_grad(), press(sdpa_model):
            logits = sdpa_model(**inputs).logits
            stages = [(s.layer, s.kept[0]) for s in press.last_selection]
            generated = sdpa_model.generate(**inputs, **GEN)
        with torch.no_grad():
            torch.testing.assert_close(logits[:, -1], oracle_logits(sdpa_model, inputs, stages)[0][:, -1], atol=1e-4, rtol=0)
            new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
            for step, step_logits in enumerate(generated.logits):
                reference = oracle_logits(sdpa_model, inputs, stages, new_tokens[:, :step])[0][:, -1]
                torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("press", [FastV(keep=[8, 4], layer=[1, 3]), PyramidDrop(keep=[10, 6, 3], layer=[1, 2, 3])],
                         ids=["fastv", "pdrop"])
def test_batch_equals_singles(sdpa_model, press):
    samples = [([make_image(150, 60, seed=6)], [], Q1), ([make_image(84, 84, seed=7)], [], Q2),
               ([], [(2, 4, 4)], Q1)]
    batch = qwen_inputs(samples, seed=8)
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


def test_pdrop_compact_keeps_3d_positions_and_says_so(sdpa_model):
    inputs = qwen_inputs([([make_image(112, 84, seed=9)], [], Q1)])
    press = PyramidDrop(keep=[10, 6, 3], layer=[1, 2, 3])
    with pytest.warns(UserWarning, match="compact.*does not apply"), torch.no_grad(), press(sdpa_model):
        logits = sdpa_model(**inputs).logits
    assert any("3-D mRoPE" in note for note in press.last_selection[0].notes)
    stages = [(s.layer, s.kept[0]) for s in press.last_selection]
    with torch.no_grad():
        torch.testing.assert_close(logits[:, -1], oracle_logits(sdpa_model, inputs, stages)[0][:, -1], atol=1e-4, rtol=0)


def test_sliding_window_layers_get_their_own_mask():
    model = build_qwen2_5_vl("eager", sliding=True)
    inputs = qwen_inputs([([make_image(140, 140, seed=10)], [], Q1)])
    with torch.no_grad():
        vanilla = model(**inputs).logits
        with FastV(keep=1.0, layer=1)(model):
            kept_all = model(**inputs).logits
    torch.testing.assert_close(kept_all, vanilla, atol=1e-5, rtol=0)


def test_every_method_runs_or_refuses_clearly(sdpa_model):
    inputs = qwen_inputs([([make_image(168, 112, seed=11)], [], Q1)])
    ran, refused = [], []
    for name, cls in METHODS.items():
        press = cls()
        try:
            with torch.no_grad(), press(sdpa_model):
                sdpa_model.generate(**inputs, max_new_tokens=2, do_sample=False)
            ran.append(name)
        except ValueError as error:
            assert "Methods that work on this model" in str(error) and "fastv" in str(error), str(error)
            refused.append(name)
    assert {"visionzip", "fastervlm"} <= set(refused)
    assert {"fastv", "pdrop", "sparsevlm", "dart", "divprune", "random"} <= set(ran)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.pop("image_grid_thw"), "no image_grid_thw was passed"),
        (lambda i: i.__setitem__("image_grid_thw", i["image_grid_thw"] * torch.tensor([[1, 2, 1]])), "describes 1 image"),
        (lambda i: i.__setitem__("image_grid_thw", torch.tensor([1, 4, 4])), "must have shape"),
    ],
    ids=["missing-grid", "wrong-grid", "grid-shape"],
)
def test_bad_grid_inputs_are_clear_errors(sdpa_model, change, message):
    inputs = qwen_inputs([([make_image(112, 56, seed=12)], [], Q1)])
    change(inputs)
    with pytest.raises(ValueError, match=message), torch.no_grad(), FastV(keep=4)(sdpa_model):
        sdpa_model(**inputs)


def test_visual_tokens_counted_from_grid(sdpa_model):
    inputs = qwen_inputs([([make_image(120, 60)], [], Q1)])
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert int((inputs["input_ids"] == QWEN_IMAGE).sum()) == t * h * w // 4


def test_cli_run_loads_a_saved_checkpoint(tmp_path):
    """`vtprune run --model DIR` on a directory laid out like the hub checkpoint: the real loading path
    (AutoModelForImageTextToText, the processor built without torchvision's video processor, chat template)."""
    from families import save_qwen2_5_vl_checkpoint
    from typer.testing import CliRunner

    from vtprune.cli import app

    save_qwen2_5_vl_checkpoint(tmp_path)
    make_image(140, 84).save(tmp_path / "image.png")
    result = CliRunner().invoke(app, ["run", "--model", str(tmp_path), "--image", str(tmp_path / "image.png"),
                                      "--prompt", "what is the colour ?", "--keep", "4", "--max-new-tokens", "2",
                                      "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    import json

    record, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("{"):])
    assert record["unpruned"]["visual_tokens"] == 15 and record["pruned"]["visual_tokens"] == 4
    assert any("padding debiasing does not apply" in note for note in record["notes"])
