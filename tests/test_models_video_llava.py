"""Video-LLaVA: images and videos (frames of 16 patches + the frame [CLS], which is never pruned), per-frame
segments, the positional axis of a video, keep-all == vanilla, FastV oracle with KV-cache decode, batches."""

from __future__ import annotations

import pytest
import torch
from families import build_video_llava, video_llava_inputs
from oracles.anyres import run_1d

from vtprune import Debias, FastV, PyramidDrop, VisionZip
from vtprune.adapters import adapter_for

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
Q = [5, 6, 7]


@pytest.fixture(scope="module")
def sdpa_model():
    return build_video_llava("sdpa")


@pytest.fixture(scope="module")
def eager_model():
    return build_video_llava("eager")


def oracle(model, inputs, stages=(), new_tokens=None, fastv=None):
    """Embeds by hand (the image tower for images, the video tower for frames, whose first token per frame is
    its [CLS]) and runs `oracles.anyres.run_1d` with the frame [CLS] tokens kept."""
    base = model.model
    prompt = inputs["input_ids"]
    ids = prompt if new_tokens is None else torch.cat([prompt, new_tokens], dim=1)
    hidden = base.get_input_embeddings()(ids)
    visual = torch.zeros(ids.shape[1], dtype=torch.bool)
    if "pixel_values_images" in inputs:
        features = base.get_image_features(inputs["pixel_values_images"]).pooler_output.flatten(0, 1)
        where = ids[0] == model.config.image_token_id
        hidden[0, where] = features
        visual |= where
    if "pixel_values_videos" in inputs:
        frames = base.get_video_features(inputs["pixel_values_videos"]).pooler_output  # (F, 17, D), [CLS] first
        where = ids[0] == model.config.video_token_id
        hidden[0, where] = frames.flatten(0, 1)
        patch = torch.ones(frames.shape[:2], dtype=torch.bool)
        patch[:, 0] = False
        visual[where] = patch.flatten()
    return run_1d(model, hidden, visual, prompt.shape[1], list(stages), fastv)


def test_layout_frames_without_cls(sdpa_model):
    inputs = video_llava_inputs([(1, 3, Q)])
    layout = adapter_for(sdpa_model).visual_layout(inputs["input_ids"], inputs)
    segments = layout.segments[0]
    assert [(s.kind, s.frame, s.length) for s in segments] == [("image", 0, 16)] + [("frame", f, 16) for f in range(3)]
    assert layout.num_visual[0] == 16 + 48
    video = torch.nonzero(inputs["input_ids"][0] == 151).flatten()
    assert not torch.isin(video[::17], layout.positions[0]).any()  # each frame's [CLS] token stays out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_equals_vanilla(request, attn):
    model = request.getfixturevalue(f"{attn}_model")
    for inputs in (video_llava_inputs([(1, 2, Q)]), video_llava_inputs([(0, 2, Q), (1, 2, [5])], seed=1)):
        with torch.no_grad():
            vanilla = model(**inputs).logits
            vanilla_gen = model.generate(**inputs, **GEN)
            with FastV(keep=1.0, layer=2)(model):
                pruned = model(**inputs).logits
                pruned_gen = model.generate(**inputs, **GEN)
        torch.testing.assert_close(pruned, vanilla, atol=1e-5, rtol=0)
        assert torch.equal(pruned_gen.sequences, vanilla_gen.sequences)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_on_video_equals_oracle_and_decodes(request, attn):
    model = request.getfixturevalue(f"{attn}_model")
    inputs = video_llava_inputs([(0, 4, Q)], seed=2)  # 4 frames x 16 patches: keep 16 of 64 (the paper's 1/4)
    press = FastV(keep=16, layer=2)
    with torch.no_grad(), press(model):
        logits = model(**inputs).logits
        kept = press.last_selection[0].kept[0]
        generated = model.generate(**inputs, **GEN)
    with torch.no_grad():
        expected, record = oracle(model, inputs, fastv=(2, 16))
        assert torch.equal(record[0][1], kept)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
        for step, step_logits in enumerate(generated.logits):
            reference = oracle(model, inputs, [(2, kept)], new_tokens[:, :step])[0][:, -1]
            torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)


def test_batch_equals_singles_and_video_axis(sdpa_model):
    samples = [(0, 3, Q), (1, 0, [5]), (0, 3, [6, 7])]
    batch = video_llava_inputs(samples, seed=3)
    for axis in ("video", "frame"):
        press = FastV(keep=[12, 6], layer=[2, 3], debias=Debias(profile="auto", padding=False, video_axis=axis))
        with torch.no_grad(), press(sdpa_model):
            out = sdpa_model.generate(**batch, **GEN)
            kept = [press.last_selection[0].kept[b] for b in range(3)]
            debiased = press.last_selection[0].debiased[0]
        width = batch["input_ids"].shape[1]
        singles = [video_llava_inputs([s], seed=0) for s in samples]
        # the same pixels as in the batch: rebuild each single from the batch's tensors
        images = list(batch.get("pixel_values_images", []))
        videos = list(batch.get("pixel_values_videos", []))
        for b, (count, frames, _) in enumerate(samples):
            single = singles[b]
            if count:
                single["pixel_values_images"] = torch.stack([images.pop(0) for _ in range(count)])
            if frames:
                single["pixel_values_videos"] = videos.pop(0)[None]
            with torch.no_grad(), press(sdpa_model):
                one = sdpa_model.generate(**single, **GEN)
            assert torch.equal(kept[b], press.last_selection[0].kept[0])
            n = single["input_ids"].shape[1]
            assert torch.equal(out.sequences[b, width:], one.sequences[0, n:])
        if axis == "video":
            video_debiased = debiased
    assert not torch.allclose(video_debiased, debiased), "the two axes should debias a video differently"


def test_methods_and_refusals(sdpa_model):
    inputs = video_llava_inputs([(1, 2, Q)])
    with torch.no_grad(), PyramidDrop(keep=[0.5, 0.25, 0.1], layer=[1, 2, 3])(sdpa_model):
        sdpa_model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="Methods that work on this model: .*fastv"):
        VisionZip()(sdpa_model)


def test_more_frames_than_tokens_is_a_clear_error(sdpa_model):
    inputs = video_llava_inputs([(0, 2, Q)])
    inputs["pixel_values_videos"] = torch.cat([inputs["pixel_values_videos"]] * 2, dim=1)  # 4 frames, 2 frames' tokens
    with pytest.raises(ValueError, match="more frames than tokens"), torch.no_grad(), FastV(keep=8)(sdpa_model):
        sdpa_model(**inputs)
    inputs = video_llava_inputs([(0, 2, Q)])
    inputs["input_ids"] = inputs["input_ids"][:, 1:]  # a token of the video dropped
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    inputs["input_ids"][0, 5] = 5
    with pytest.raises(ValueError, match="not a multiple of 17 per frame"), torch.no_grad(), FastV(keep=8)(sdpa_model):
        sdpa_model(**inputs)


def test_cli_run_loads_a_saved_checkpoint(tmp_path):
    """`vtprune run --model DIR` on a directory laid out like a hub Video-LLaVA checkpoint (the processor built
    with an empty video slot, as without torchvision): an image prompt, 16 visual tokens, 4 kept."""
    import json

    from conftest import make_image
    from families import save_video_llava_checkpoint
    from typer.testing import CliRunner

    from vtprune.cli import app

    save_video_llava_checkpoint(tmp_path)
    make_image(100, 80).save(tmp_path / "image.png")
    result = CliRunner().invoke(app, ["run", "--model", str(tmp_path), "--image", str(tmp_path / "image.png"),
                                      "--prompt", "what is the colour ?", "--keep", "4", "--max-new-tokens", "2",
                                      "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    record, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("{"):])
    assert record["unpruned"]["visual_tokens"] == 16 and record["pruned"]["visual_tokens"] == 4
