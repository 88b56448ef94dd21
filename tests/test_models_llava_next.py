"""LLaVA-NeXT: anyres tiles, image_newline tokens (never pruned, never ranked), unpadding and the padding left in
the tiles (pixel truth), keep-all == vanilla, FastV oracle, KV-cache decode, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import prompt
from families import NEXT_TILE, build_llava_next, build_llava_next_processor, make_image
from oracles.anyres import oracle_logits
from PIL import Image

from vtprune import Debias, FastV, PyramidDrop, VisionZip
from vtprune.adapters import adapter_for

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def next_processor():
    return build_llava_next_processor()


@pytest.fixture(scope="module")
def sdpa_model(next_processor):
    return build_llava_next(next_processor, "sdpa")


@pytest.fixture(scope="module")
def eager_model(next_processor):
    return build_llava_next(next_processor, "eager")


def inputs_for(processor, images, texts):
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def test_layout_leaves_out_newlines(next_processor, sdpa_model):
    image = make_image(100, 80)  # best 112x112: 8x8 tile tokens, unpadded to 6 rows
    inputs = inputs_for(next_processor, [image], [prompt()])
    adapter = adapter_for(sdpa_model)
    layout = adapter.visual_layout(inputs["input_ids"], inputs)
    base, tiles = layout.segments[0]
    assert (base.kind, base.grid, base.length) == ("base", (4, 4), 16)
    assert (tiles.kind, tiles.grid) == ("tiles", (6, 8))
    image_tokens = int((inputs["input_ids"] == sdpa_model.config.image_token_id).sum())
    assert image_tokens == 16 + 6 * 9 and layout.num_visual[0] == 16 + 48
    with torch.no_grad():
        features = sdpa_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    newline = (features == sdpa_model.model.image_newline).all(dim=-1)
    image_positions = torch.nonzero(inputs["input_ids"][0] == sdpa_model.config.image_token_id).flatten()
    assert torch.equal(layout.positions[0], image_positions[~newline])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_equals_vanilla(request, next_processor, attn):
    model = request.getfixturevalue(f"{attn}_model")
    images = [make_image(100, 80, seed=1), make_image(60, 150, seed=2)]
    texts = [prompt(), prompt("yes")]
    for batch in ([images[:1], texts[:1]], [images, texts]):
        inputs = inputs_for(next_processor, *batch)
        with torch.no_grad():
            vanilla = model(**inputs).logits
            vanilla_gen = model.generate(**inputs, **GEN)
            with FastV(keep=1.0, layer=2)(model):
                pruned = model(**inputs).logits
                pruned_gen = model.generate(**inputs, **GEN)
        torch.testing.assert_close(pruned, vanilla, atol=1e-5, rtol=0)
        assert torch.equal(pruned_gen.sequences, vanilla_gen.sequences)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_equals_oracle_and_decodes(request, next_processor, attn):
    model = request.getfixturevalue(f"{attn}_model")
    inputs = inputs_for(next_processor, [make_image(130, 70, seed=3)], [prompt("what shape is at the top left ?")])
    press = FastV(keep=12, layer=2)
    with torch.no_grad(), press(model):
        logits = model(**inputs).logits
        kept = press.last_selection[0].kept[0]
        generated = model.generate(**inputs, **GEN)
    with torch.no_grad():
        expected, record, newline = oracle_logits(model, inputs, [], fastv=(2, 12))
        assert torch.equal(record[0][1], kept)
        assert len(logits[0]) == len(expected[0]) and newline.any()
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
        for step, step_logits in enumerate(generated.logits):
            reference = oracle_logits(model, inputs, [(2, kept)], new_tokens[:, :step])[0][:, -1]
            torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)


def test_batch_with_padding_debias_equals_singles(next_processor, sdpa_model):
    images = [make_image(57, 91, seed=5), make_image(56, 56, seed=6), make_image(50, 160, seed=7)]
    texts = [prompt(), prompt("yes"), prompt("what shape is in the bottom right ?")]
    # unpadding removes whole padded feature rows; what is left is partly padding (a low threshold marks it)
    press = FastV(keep=[20, 8], layer=[2, 3], debias=Debias(padding=True, padding_threshold=0.3))
    inputs = inputs_for(next_processor, images, texts)
    with torch.no_grad(), press(sdpa_model, processor=next_processor, image_sizes=[im.size for im in images]):
        batch = sdpa_model.generate(**inputs, **GEN)
        kept = [[s.kept[b] for s in press.last_selection] for b in range(3)]
        padding = press.last_selection[0].padding
    assert any(p is not None and p.any() for p in padding), "some tile tokens should be mostly padding"
    width = inputs["input_ids"].shape[1]
    for b, (image, text) in enumerate(zip(images, texts)):
        single = inputs_for(next_processor, [image], [text])
        with torch.no_grad(), press(sdpa_model, processor=next_processor, image_sizes=[image.size]):
            one = sdpa_model.generate(**single, **GEN)
        assert all(torch.equal(x, s.kept[0]) for x, s in zip(kept[b], press.last_selection))
        assert not press.last_selection[0].padding[0][press.last_selection[0].kept[0]].any()
        n = single["input_ids"].shape[1]
        assert torch.equal(batch.sequences[b, width:], one.sequences[0, n:])
        for x, y in zip(batch.logits, one.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)


SENTINEL = (255, 0, 255)


@pytest.mark.parametrize("size", [(100, 80), (130, 70), (50, 160), (57, 91), (200, 61), (56, 56)])
def test_tile_padding_matches_pixels(next_processor, sdpa_model, size):
    """Pixel truth: a sentinel-coloured image through the real processor; the tiles are reassembled into the
    padded canvas, each 14-px patch's share of black (the pad) measured, the model's unpadding applied, and the
    result compared with the adapter's padded shares."""
    image_processor = next_processor.image_processor
    out = image_processor(Image.new("RGB", size, SENTINEL), return_tensors="np")
    pixels = out["pixel_values"][0]  # (1 + tiles, 3, T, T)
    adapter = adapter_for(sdpa_model)
    width, height = size
    tiles = adapter.tile_layout(height, width)
    rows_t, cols_t = tiles["rows"] // 4, tiles["cols"] // 4
    canvas = np.concatenate([np.concatenate(list(pixels[1 + r * cols_t: 1 + (r + 1) * cols_t]), axis=2)
                             for r in range(rows_t)], axis=1)  # (3, H, W)
    mean, std = np.array(image_processor.image_mean), np.array(image_processor.image_std)
    palette = np.stack([(np.array(rgb) / 255 - mean) / std for rgb in (SENTINEL, (0, 0, 0))])
    is_pad = (((canvas[None] - palette[:, :, None, None]) ** 2).sum(1)).argmin(0) == 1
    grid = is_pad.reshape(tiles["rows"], 14, tiles["cols"], 14).mean(axis=(1, 3))
    grid = grid[tiles["top"]: tiles["top"] + tiles["rows_u"], tiles["left"]: tiles["left"] + tiles["cols_u"]]
    predicted = adapter.tile_padding(height, width)
    assert predicted.shape == grid.shape
    assert np.abs(predicted.numpy() - grid).max() <= 2.0 / 14 + 1e-6, (size, predicted, grid)
    base = pixels[0]  # the base image: squashed, no padding
    base_pad = (((base[None] - palette[:, :, None, None]) ** 2).sum(1)).argmin(0) == 1
    assert base_pad.mean() == 0
    assert pixels.shape[-1] == NEXT_TILE


def test_methods_and_refusals(next_processor, sdpa_model):
    inputs = inputs_for(next_processor, [make_image(100, 80, seed=8)], [prompt()])
    with torch.no_grad(), PyramidDrop(keep=[30, 15, 6], layer=[1, 2, 3])(sdpa_model):
        sdpa_model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="Methods that work on this model: .*fastv"):
        VisionZip()(sdpa_model)


@pytest.mark.parametrize(
    "change, message",
    [(lambda i: i.pop("image_sizes"), "no image_sizes was passed"),
     (lambda i: i.__setitem__("image_sizes", torch.tensor([[300, 80]])), "describes 1 image")],
    ids=["missing", "wrong"],
)
def test_bad_image_sizes_are_clear_errors(next_processor, sdpa_model, change, message):
    inputs = inputs_for(next_processor, [make_image(100, 80, seed=9)], [prompt()])
    change(inputs)
    with pytest.raises(ValueError, match=message), torch.no_grad(), FastV(keep=8)(sdpa_model):
        sdpa_model(**inputs)


def test_cli_run_on_a_saved_checkpoint(tmp_path, next_processor, sdpa_model):
    from typer.testing import CliRunner

    from vtprune.cli import app

    sdpa_model.save_pretrained(tmp_path)
    next_processor.save_pretrained(tmp_path)
    make_image(100, 80).save(tmp_path / "image.png")
    result = CliRunner().invoke(app, ["run", "--model", str(tmp_path), "--image", str(tmp_path / "image.png"),
                                      "--prompt", "what is the colour ?", "--keep", "10", "--max-new-tokens", "2",
                                      "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "64 -> 10" in result.output
