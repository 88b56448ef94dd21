"""VisionZip, FasterVLM, DivPrune (before the language model) and DART against independent oracles
(tests/oracles/, written from the official code by separate authors), the vanilla model, and batches."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, inputs_for, make_image, prompt
from oracles.dart import oracle_dart
from oracles.divprune import oracle_divprune
from oracles.fastervlm import oracle_fastervlm
from oracles.visionzip import oracle_visionzip

from vtprune import DART, Debias, DivPrune, FasterVLM, VisionZip

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, suppress_tokens=[4])


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model4(request, processor):
    return build_model(processor, attn=request.param, layers=4, seed=3)


def oracle(name, model, inputs, press, new_tokens=None, **kwargs):
    compact = press.positions == "compact"
    shifted = "shifted" if compact else "uncut"
    if name == "visionzip":
        return oracle_visionzip(model, inputs, dominant=press.dominant, contextual=press.contextual,
                                include_cls=press.include_cls, positions=press.positions, new_tokens=new_tokens,
                                new_token_positions=shifted, **kwargs)
    if name == "fastervlm":
        return oracle_fastervlm(model, inputs, keep=press.keep, positions=press.positions, new_tokens=new_tokens,
                                new_token_positions=shifted, **kwargs)
    if name == "divprune":
        return oracle_divprune(model, inputs, keep=press.keep, positions=press.positions, new_tokens=new_tokens,
                               new_token_positions=shifted, **kwargs)
    return oracle_dart(model, inputs, layer=press.layer, keep=0, per_pivot=press.per_pivot, pivot_image=press.pivot_image,
                       pivot_text=press.pivot_text, pivot_order=press.pivot_order, positions=press.positions,
                       new_tokens=new_tokens, **kwargs)


CASES = [
    ("visionzip", VisionZip(dominant=10, contextual=4)),
    ("visionzip", VisionZip(dominant=9, contextual=3, include_cls=False, positions="original")),
    ("fastervlm", FasterVLM(keep=9)),
    ("fastervlm", FasterVLM(keep=12, positions="original")),
    ("divprune", DivPrune(keep=8)),
    ("divprune", DivPrune(keep=11, positions="original")),
    ("dart", DART(per_pivot=2, pivot_text=3)),
    ("dart", DART(per_pivot=3, layer=1, pivot_order="ranked", positions="compact")),
]


@pytest.mark.parametrize("name, press", CASES, ids=[f"{n}-{p.positions}" for n, p in CASES])
def test_press_equals_oracle(processor, model4, name, press):
    images = [make_image(90, 140, seed=1)]
    inputs = inputs_for(processor, images, [prompt("what shape is at the top left ?")])
    with torch.no_grad(), press(model4):
        logits = model4(**inputs).logits
        selection = press.last_selection
        generated = model4.generate(**inputs, **GEN)
    with torch.no_grad():
        expected = oracle(name, model4, inputs, press)
    assert torch.equal(selection[0].kept[0], expected.kept[0]), (selection[0].kept[0], expected.kept[0])
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    if name == "dart" and press.positions == "compact":
        return  # DART's oracle has no compact decode numbering (the official code keeps original positions)
    new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
    for step, step_logits in enumerate(generated.logits):
        with torch.no_grad():
            reference = oracle(name, model4, inputs, press, new_tokens=new_tokens[:, :step])
        torch.testing.assert_close(step_logits, reference.logits[:, -1], atol=1e-4, rtol=0)


def test_two_images_are_pruned_each_to_their_own_budget(processor, model4):
    images = [make_image(90, 140, seed=1), make_image(140, 90, seed=2)]
    inputs = inputs_for(processor, images, ["USER: <image> <image>\nwhat is the colour of the circle ? ASSISTANT:"])
    for name, press in [("visionzip", VisionZip(dominant=7, contextual=3)), ("fastervlm", FasterVLM(keep=5)),
                        ("divprune", DivPrune(keep=6))]:
        with torch.no_grad(), press(model4):
            logits = model4(**inputs).logits
            kept = press.last_selection[0].kept[0]
        if name == "divprune":  # its oracle (like the official code) takes one image: vtprune applies it per image
            assert (kept < 36).sum() == (kept >= 36).sum() == 6
            continue
        with torch.no_grad():
            expected = oracle(name, model4, inputs, press)
        assert torch.equal(kept, expected.kept[0]), name
        assert (kept < 36).sum() == (kept >= 36).sum()  # the same number from each image
        torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, press", [("visionzip", VisionZip(dominant=10, contextual=4)), ("fastervlm", FasterVLM(keep=9))])
def test_padding_debiasing_of_cls_scores(processor, model4, name, press):
    """Not in the official code: padding marks zero the [CLS] scores before the top-k (checked with the oracles'
    padding option)."""
    image = make_image(150, 60, seed=4)
    inputs = inputs_for(processor, [image], [prompt("what is the colour of the circle ?")])
    press.debias = Debias(padding=True)
    with torch.no_grad(), press(model4, processor=processor, image_sizes=[image.size]):
        logits = model4(**inputs).logits
        selection = press.last_selection[0]
    padding = selection.padding[0]
    assert padding.any() and not padding[selection.kept[0]].any()
    with torch.no_grad():
        expected = oracle(name, model4, inputs, press, padding=padding)
    assert torch.equal(selection.kept[0], expected.kept[0])
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    press.debias = None


@pytest.mark.parametrize("press", [FasterVLM(keep=1.0), DivPrune(keep=1.0), DART(per_pivot=9, pivot_text=3),
                                   VisionZip(dominant=36, contextual=0, include_cls=False)],
                         ids=["fastervlm", "divprune", "dart", "visionzip"])
def test_keep_everything_equals_vanilla(processor, model4, press):
    inputs = inputs_for(processor, [make_image(120, 60, seed=2)], [prompt()])
    with torch.no_grad():
        vanilla = model4(**inputs).logits
        vanilla_gen = model4.generate(**inputs, **GEN)
        with press(model4):
            pruned = model4(**inputs).logits
            pruned_gen = model4.generate(**inputs, **GEN)
    assert len(press.last_selection[0].kept[0]) == 36
    torch.testing.assert_close(pruned, vanilla, atol=1e-5, rtol=0)
    assert torch.equal(pruned_gen.sequences, vanilla_gen.sequences)


@pytest.mark.parametrize("press", [VisionZip(dominant=10, contextual=4), FasterVLM(keep=9), DivPrune(keep=8),
                                   DART(per_pivot=2, pivot_text=2)], ids=["visionzip", "fastervlm", "divprune", "dart"])
def test_batch_equals_single_runs(processor, model4, press):
    images = [make_image(200, 60, seed=5), make_image(84, 84, seed=6), make_image(50, 160, seed=7)]
    texts = [prompt("what is the colour of the circle ?"), prompt("what shape is it"), prompt("what shape is in the bottom right ?")]
    inputs = inputs_for(processor, images, texts)
    with torch.no_grad(), press(model4):
        batch = model4.generate(**inputs, **GEN)
        batch_kept = [press.last_selection[0].kept[b] for b in range(3)]
    width = inputs["input_ids"].shape[1]
    for b, (image, text) in enumerate(zip(images, texts)):
        single_inputs = inputs_for(processor, [image], [text])
        with torch.no_grad(), press(model4):
            single = model4.generate(**single_inputs, **GEN)
        assert torch.equal(batch_kept[b], press.last_selection[0].kept[0])
        n = single_inputs["input_ids"].shape[1]
        assert torch.equal(batch.sequences[b, width:], single.sequences[0, n:])
        for x, y in zip(batch.logits, single.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("make, error, message", [
    (lambda: VisionZip(budget=64, dominant=10, contextual=2), ValueError, "not both"),
    (lambda: VisionZip(dominant=10), ValueError, "both dominant"),
    (lambda: VisionZip(dominant=1, contextual=2), ValueError, "keeps no patch"),
    (lambda: FasterVLM(keep=0), ValueError, "keep"),
    (lambda: FasterVLM(vision_layer=1.5), TypeError, "vision_layer"),
    (lambda: DivPrune(debias=Debias()), TypeError, "debias"),
    (lambda: DART(pivot_image=0), ValueError, "pivot_image"),
    (lambda: DART(layer=0), ValueError, "K >= 1"),
    (lambda: DART(pivot_order="random"), ValueError, "pivot_order"),
])
def test_bad_options_are_clear_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_vision_methods_need_the_vision_tower_to_run(processor, model4):
    inputs = inputs_for(processor, [make_image(90, 140, seed=1)], [prompt()])
    with torch.no_grad():
        features = model4.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    with pytest.raises(ValueError, match="pixel_values"), torch.no_grad(), FasterVLM(keep=9)(model4):
        model4(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], mm_encoder_outputs={"image": features})
