"""TokenCarve (and iLLaVA's language-model stage) against independent oracles (tests/oracles/, written from
the official code by separate authors): kept sets, merged values, logits, KV-cache decode (with TokenCarve's
trimmed early-layer cache), debiasing, keep-all, batches."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, inputs_for, make_image, prompt
from oracles.tokencarve import oracle_tokencarve

from vtprune import Debias, TokenCarve
from vtprune.debias.profiles import Profile

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, suppress_tokens=[4])


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model6(request, processor):
    return build_model(processor, attn=request.param, layers=6, seed=5)


def carve_oracle(model, inputs, press, **kwargs):
    keep = press.keep
    return oracle_tokencarve(model, inputs, layer=press.layer, keep=keep, candidates=int(keep / 2 * 3),
                             positions=press.positions, trim_cache=press.trim_cache,
                             debias_fused=press.debias_target == "fused", **kwargs)


@pytest.mark.parametrize("press", [TokenCarve(keep=12), TokenCarve(keep=10, layer=3, trim_cache=False),
                                   TokenCarve(keep=14, positions="compact", trim_cache=False)],
                         ids=["default", "layer3-untrimmed", "compact"])
def test_tokencarve_equals_oracle(processor, model6, press):
    inputs = inputs_for(processor, [make_image(90, 140, seed=1)], [prompt("what shape is at the top left ?")])
    with torch.no_grad(), press(model6):
        logits = model6(**inputs).logits
        kept = press.last_selection[0].kept[0]
        generated = model6.generate(**inputs, **GEN)
    with torch.no_grad():
        expected = carve_oracle(model6, inputs, press)
    assert torch.equal(kept, expected.kept[0])
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    if press.positions == "compact":
        return  # the oracle has no compact decode numbering (the official code keeps original positions)
    new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
    for step, step_logits in enumerate(generated.logits):
        with torch.no_grad():
            reference = carve_oracle(model6, inputs, press, new_tokens=new_tokens[:, :step])
        torch.testing.assert_close(step_logits, reference.logits[:, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("target", ["attention", "fused"])
def test_debiased_tokencarve_equals_oracle(processor, model6, target):
    image = make_image(150, 60, seed=4)
    inputs = inputs_for(processor, [image], [prompt("what is the colour of the circle ?")])
    profile = Profile(name="test", kind="exp", length=36, sigma=1.7, mu=0.3)
    press = TokenCarve(keep=12, debias=Debias(profile=profile, padding=True), debias_target=target)
    with torch.no_grad(), press(model6, processor=processor, image_sizes=[image.size]):
        logits = model6(**inputs).logits
        selection = press.last_selection[0]
    padding = selection.padding[0]
    with torch.no_grad():
        expected = carve_oracle(model6, inputs, press, weights=profile.weights(36), padding=padding)
    assert torch.equal(selection.kept[0], expected.kept[0])
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)


def test_tokencarve_trims_the_early_cache(processor, model6):
    inputs = inputs_for(processor, [make_image(90, 140, seed=1)], [prompt()])
    n = inputs["input_ids"].shape[1]
    with torch.no_grad(), TokenCarve(keep=12)(model6):
        out = model6(**inputs, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
    assert {layer.keys.shape[-2] for layer in cache.layers} == {n - 36 + 12}
    with torch.no_grad(), TokenCarve(keep=12, trim_cache=False)(model6):
        out = model6(**inputs, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
    assert [layer.keys.shape[-2] for layer in cache.layers][:3] == [n, n, n - 36 + 12]


def test_tokencarve_keep_everything_equals_vanilla(processor, model6):
    inputs = inputs_for(processor, [make_image(120, 60, seed=2)], [prompt()])
    press = TokenCarve(keep=1.0)
    with torch.no_grad():
        vanilla = model6(**inputs).logits
        vanilla_gen = model6.generate(**inputs, **GEN)
        with press(model6):
            pruned = model6(**inputs).logits
            pruned_gen = model6.generate(**inputs, **GEN)
    torch.testing.assert_close(pruned, vanilla, atol=1e-5, rtol=0)
    assert torch.equal(pruned_gen.sequences, vanilla_gen.sequences)


@pytest.mark.parametrize("trim", [True, False])
def test_tokencarve_batch_equals_single_runs(processor, model6, trim):
    images = [make_image(200, 60, seed=5), make_image(84, 84, seed=6), make_image(50, 160, seed=7)]
    texts = [prompt("what is the colour of the circle ?"), prompt("what shape is it"), prompt("what shape is in the bottom right ?")]
    press = TokenCarve(keep=12, trim_cache=trim, debias=Debias(profile="auto", padding=True))
    inputs = inputs_for(processor, images, texts)
    sizes = [im.size for im in images]
    with torch.no_grad(), press(model6, processor=processor, image_sizes=sizes):
        batch = model6.generate(**inputs, **GEN)
        batch_kept = [press.last_selection[0].kept[b] for b in range(3)]
    width = inputs["input_ids"].shape[1]
    for b, (image, text) in enumerate(zip(images, texts)):
        single_inputs = inputs_for(processor, [image], [text])
        with torch.no_grad(), press(model6, processor=processor, image_sizes=[image.size]):
            single = model6.generate(**single_inputs, **GEN)
        assert torch.equal(batch_kept[b], press.last_selection[0].kept[0])
        n = single_inputs["input_ids"].shape[1]
        assert torch.equal(batch.sequences[b, width:], single.sequences[0, n:])
        for x, y in zip(batch.logits, single.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("make, message", [
    (lambda: TokenCarve(keep=12, budget=64), "not both"),
    (lambda: TokenCarve(layer=0), "K >= 1"),
    (lambda: TokenCarve(av_weight=1.5), "av_weight"),
    (lambda: TokenCarve(debias_target="both"), "debias_target"),
])
def test_tokencarve_bad_options(make, message):
    with pytest.raises(ValueError, match=message):
        make()


from oracles.illava import oracle_illava  # noqa: E402

from vtprune import ILLaVA  # noqa: E402


@pytest.mark.parametrize("press", [ILLaVA(keep=12), ILLaVA(keep=[14, 6], layer=[2, 4]),
                                   ILLaVA(keep=10, layer=3, positions="compact")], ids=["default", "two-stage", "compact"])
def test_illava_equals_oracle(processor, model6, press):
    inputs = inputs_for(processor, [make_image(90, 140, seed=1)], [prompt("what shape is at the top left ?")])
    stages = press.stages(6)
    layers, keeps = [s.layer for s in stages], [s.keep for s in stages]
    with torch.no_grad(), press(model6):
        logits = model6(**inputs).logits
        kept = [s.kept[0] for s in press.last_selection]
        generated = model6.generate(**inputs, **GEN)
    with torch.no_grad():
        expected = oracle_illava(model6, inputs, layer=layers, keep=keeps, positions=press.positions)
    assert all(torch.equal(a, b) for a, b in zip(kept, expected.kept))
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    if press.positions == "compact":
        return  # the oracle numbers decoded tokens from the prompt length; vtprune's compact decode continues each segment
    new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
    for step, step_logits in enumerate(generated.logits):
        with torch.no_grad():
            reference = oracle_illava(model6, inputs, layer=layers, keep=keeps, positions=press.positions,
                                      new_tokens=new_tokens[:, :step])
        torch.testing.assert_close(step_logits, reference.logits[:, -1], atol=1e-4, rtol=0)


def test_debiased_illava_ranks_like_the_oracle(processor, model6):
    image = make_image(150, 60, seed=4)
    inputs = inputs_for(processor, [image], [prompt("what is the colour of the circle ?")])
    profile = Profile(name="test", kind="exp", length=36, sigma=1.7, mu=0.3)
    press = ILLaVA(keep=12, debias=Debias(profile=profile, padding=False))
    with torch.no_grad(), press(model6):
        logits = model6(**inputs).logits
        kept = press.last_selection[0].kept[0]
    with torch.no_grad():
        expected = oracle_illava(model6, inputs, layer=[2], keep=[12], weights=profile.weights(36))
    assert torch.equal(kept, expected.kept[0])
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    # with padding debiasing, padding tokens leave without being merged into the destination
    press = ILLaVA(keep=12, debias=Debias(profile=profile, padding=True))
    with torch.no_grad(), press(model6, processor=processor, image_sizes=[image.size]):
        model6(**inputs)
    selection = press.last_selection[0]
    assert not selection.padding[0][selection.kept[0]].any()


def test_illava_keep_everything_equals_vanilla(processor, model6):
    inputs = inputs_for(processor, [make_image(120, 60, seed=2)], [prompt()])
    with torch.no_grad():
        vanilla = model6(**inputs).logits
        with ILLaVA(keep=1.0)(model6):
            pruned = model6(**inputs).logits
    torch.testing.assert_close(pruned, vanilla, atol=1e-5, rtol=0)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model_vit(request, processor):
    return build_model(processor, attn=request.param, layers=6, seed=6, vision_layers=6)


@pytest.mark.parametrize("vit_layers, vit_merge, keep", [((1, 2, 3), 4, 12), ((0, 4), 6, 10)])
def test_illava_vision_stage_equals_oracle(processor, model_vit, vit_layers, vit_merge, keep):
    """Merging inside the vision tower's layers (after their attention) and then in the language model."""
    inputs = inputs_for(processor, [make_image(90, 140, seed=1)], [prompt("what shape is at the top left ?")])
    press = ILLaVA(keep=keep, layer=3, vit_layers=vit_layers, vit_merge=vit_merge)
    with torch.no_grad(), press(model_vit):
        logits = model_vit(**inputs).logits
        kept = [s.kept[0] for s in press.last_selection]
        generated = model_vit.generate(**inputs, **GEN)
    with torch.no_grad():
        expected = oracle_illava(model_vit, inputs, layer=3, keep=keep, vit_layers=list(vit_layers),
                                 vit_merge=vit_merge, decode_positions="lm_input")
    assert torch.equal(kept[0], expected.kept[len(vit_layers) - 1])  # what reaches the language model
    assert torch.equal(kept[1], expected.kept[-1])
    assert len(kept[0]) == 36 - len(vit_layers) * vit_merge
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
    for step, step_logits in enumerate(generated.logits):
        with torch.no_grad():
            reference = oracle_illava(model_vit, inputs, layer=3, keep=keep, vit_layers=list(vit_layers),
                                      vit_merge=vit_merge, decode_positions="lm_input", new_tokens=new_tokens[:, :step])
        torch.testing.assert_close(step_logits, reference.logits[:, -1], atol=1e-4, rtol=0)


def test_illava_vision_stage_batch_equals_singles(processor, model_vit):
    images = [make_image(200, 60, seed=5), make_image(84, 84, seed=6)]
    texts = [prompt("what is the colour of the circle ?"), prompt("what shape is in the bottom right ?")]
    press = ILLaVA(keep=10, layer=3, vit_layers=(1, 2), vit_merge=5)
    inputs = inputs_for(processor, images, texts)
    with torch.no_grad(), press(model_vit):
        batch = model_vit.generate(**inputs, **GEN)
        batch_kept = [press.last_selection[-1].kept[b] for b in range(2)]
    width = inputs["input_ids"].shape[1]
    for b, (image, text) in enumerate(zip(images, texts)):
        single_inputs = inputs_for(processor, [image], [text])
        with torch.no_grad(), press(model_vit):
            single = model_vit.generate(**single_inputs, **GEN)
        assert torch.equal(batch_kept[b], press.last_selection[-1].kept[0])
        n = single_inputs["input_ids"].shape[1]
        assert torch.equal(batch.sequences[b, width:], single.sequences[0, n:])
        for x, y in zip(batch.logits, single.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)
