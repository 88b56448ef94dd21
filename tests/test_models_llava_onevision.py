"""LLaVA-OneVision: anyres_max images (tiles unpadded and resized, image_newline tokens never pruned), pooled video
frames (one newline per video, never pruned), keep-all == vanilla, FastV oracle with KV-cache decode, batches,
padding debiasing reported as not applying, refusals."""

from __future__ import annotations

import pytest
import torch
from families import OV_IMAGE, OV_VIDEO, build_llava_onevision, make_image, onevision_inputs
from oracles.onevision import oracle_logits

from vtprune import Debias, FastV, PyramidDrop, VisionZip
from vtprune.adapters import adapter_for

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
Q1, Q2 = [5, 6, 7, 8], [9, 10]


@pytest.fixture(scope="module")
def sdpa_model():
    return build_llava_onevision("sdpa")


@pytest.fixture(scope="module")
def eager_model():
    return build_llava_onevision("eager")


def _single(batch, b):
    keep = batch["attention_mask"][b].bool()
    out = {k: batch[k][b:b + 1, keep] for k in ("input_ids", "attention_mask")}
    images = [i for i in range(b + 1) if (batch["input_ids"][i] == OV_IMAGE).any()]
    if (batch["input_ids"][b] == OV_IMAGE).any():
        index = len(images) - 1
        out["pixel_values"] = batch["pixel_values"][index:index + 1]
        out["image_sizes"] = batch["image_sizes"][index:index + 1]
    videos = [i for i in range(b + 1) if (batch["input_ids"][i] == OV_VIDEO).any()]
    if (batch["input_ids"][b] == OV_VIDEO).any():
        out["pixel_values_videos"] = batch["pixel_values_videos"][len(videos) - 1:len(videos)]
    return out


@pytest.mark.parametrize("size, grid", [((100, 80), (4, 6)), ((112, 56), (4, 8))], ids=["resized", "not-resized"])
def test_layout_leaves_out_newlines(sdpa_model, size, grid):
    """The tile grid after unpadding and the anyres_max resize (100x80: 6x8 unpadded, over 2 tiles' worth, resized
    to 4x6; 112x56: 4x8 kept); the newline tokens (read from the encoded features) are not in the layout; a
    video's frames are 2x2 pooled segments and its closing newline is left out."""
    inputs = onevision_inputs(sdpa_model, [([make_image(*size)], 3, Q1)])
    layout = adapter_for(sdpa_model).visual_layout(inputs["input_ids"], inputs)
    segments = layout.segments[0]
    assert [(s.kind, s.grid) for s in segments] == [("base", (4, 4)), ("tiles", grid)] + [("frame", (2, 2))] * 3
    with torch.no_grad():
        image = sdpa_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
        video = sdpa_model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
    newline = (torch.cat([image, video]) == sdpa_model.model.image_newline).all(dim=-1)
    positions = torch.nonzero((inputs["input_ids"][0] == OV_IMAGE) | (inputs["input_ids"][0] == OV_VIDEO)).flatten()
    assert torch.equal(layout.positions[0], positions[~newline])
    assert int(newline.sum()) == grid[0] + 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_equals_vanilla(request, attn):
    model = request.getfixturevalue(f"{attn}_model")
    batch = onevision_inputs(model, [([make_image(100, 80, seed=1)], 0, Q1), ([make_image(60, 150, seed=2)], 0, Q2)])
    assert (batch["attention_mask"] == 0).any()
    for inputs in (_single(batch, 0), batch):
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
def test_fastv_equals_oracle(request, attn, kind):
    model = request.getfixturevalue(f"{attn}_model")
    sample = ([make_image(168, 120, seed=3)], 0, Q1) if kind == "image" else ([], 4, Q1)
    inputs = onevision_inputs(model, [sample], seed=4)
    press = FastV(keep=5, layer=2)
    with torch.no_grad(), press(model):
        logits = model(**inputs).logits
        kept = press.last_selection[0].kept[0]
        generated = model.generate(**inputs, **GEN)  # grids from the encoded features inside generate()
        assert torch.equal(press.last_selection[0].kept[0], kept)
    with torch.no_grad():
        expected, record = oracle_logits(model, inputs, [], fastv=(2, 5))
        assert torch.equal(record[0][1], kept), "the oracle's own FastV selection differs"
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
        for step, step_logits in enumerate(generated.logits):
            reference = oracle_logits(model, inputs, [(2, kept)], new_tokens[:, :step])[0][:, -1]
            torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("press", [FastV(keep=[8, 4], layer=[1, 3]), PyramidDrop(keep=[10, 6, 3], layer=[1, 2, 3])],
                         ids=["fastv", "pdrop"])
def test_batch_equals_singles(sdpa_model, press):
    samples = [([make_image(150, 60, seed=6)], 0, Q1), ([make_image(84, 84, seed=7)], 0, Q2), ([], 3, Q1)]
    batch = onevision_inputs(sdpa_model, samples, seed=8)
    with torch.no_grad(), press(sdpa_model):
        out = sdpa_model.generate(**batch, **GEN)
        kept = [[s.kept[b] for s in press.last_selection] for b in range(3)]
    width = batch["input_ids"].shape[1]
    for b in range(3):
        single = _single(batch, b)
        with torch.no_grad(), press(sdpa_model):
            one = sdpa_model.generate(**single, **GEN)
        assert all(torch.equal(x, s.kept[0]) for x, s in zip(kept[b], press.last_selection))
        n = single["input_ids"].shape[1]
        assert torch.equal(out.sequences[b, width:], one.sequences[0, n:])
        for x, y in zip(out.logits, one.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)


def test_refusals_and_bad_inputs_are_clear(sdpa_model):
    with pytest.raises(ValueError, match="Methods that work on this model.*fastv"):
        with VisionZip()(sdpa_model):
            pass
    inputs = onevision_inputs(sdpa_model, [([make_image(100, 80, seed=9)], 0, Q1)])
    wrong = dict(inputs, image_sizes=torch.tensor([[80, 300]]))
    with pytest.raises(ValueError, match="image_sizes describes 1 image"), torch.no_grad(), FastV(keep=4)(sdpa_model):
        sdpa_model(**wrong)
    missing = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="no image_sizes was passed"):
        adapter_for(sdpa_model).visual_layout(missing["input_ids"], missing)
    video = onevision_inputs(sdpa_model, [([], 2, Q1)])
    ids = video["input_ids"].clone()
    ids[0, torch.nonzero(ids[0] == OV_VIDEO).flatten()[0]] = 30  # one video token fewer
    with pytest.raises(ValueError, match="not F frames x 4 pooled tokens"):
        adapter_for(sdpa_model).visual_layout(ids, video)


def test_every_method_runs_or_refuses_clearly(sdpa_model):
    from vtprune.methods import METHODS

    inputs = onevision_inputs(sdpa_model, [([make_image(168, 120, seed=11)], 2, Q1)])
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


def test_cli_run_loads_a_saved_checkpoint(tmp_path):
    """`vtprune run --model DIR` on a directory laid out like a hub LLaVA-OneVision checkpoint (the processor
    built with an empty video slot, as without torchvision)."""
    import json

    from families import save_llava_onevision_checkpoint
    from typer.testing import CliRunner

    from vtprune.cli import app

    save_llava_onevision_checkpoint(tmp_path)
    make_image(100, 80).save(tmp_path / "image.png")
    result = CliRunner().invoke(app, ["run", "--model", str(tmp_path), "--image", str(tmp_path / "image.png"),
                                      "--prompt", "what is the colour ?", "--keep", "4", "--max-new-tokens", "2",
                                      "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    record, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("{"):])
    assert record["unpruned"]["visual_tokens"] == 16 + 24 and record["pruned"]["visual_tokens"] == 4
