"""PyramidDrop, HiMAP and SparseVLM against independent oracles (tests/oracles/, written from the published
code by hand, separately from the presses), the vanilla model, and themselves in batches."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, inputs_for, make_image, prompt
from oracles.himap import oracle_himap
from oracles.pdrop import oracle_pdrop
from oracles.sparsevlm import oracle_sparsevlm

from vtprune import Debias, HiMAP, PyramidDrop, SparseVLM
from vtprune.debias.profiles import Profile

# random models may emit the image token; the oracles would count it as one (vtprune never prunes decode steps)
GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, suppress_tokens=[4])
LAYERS = 6


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model6(request, processor):
    return build_model(processor, attn=request.param, layers=LAYERS, seed=1)


def run_oracle(name, model, inputs, layers, keeps, positions, **kwargs):
    if name == "pdrop":
        return oracle_pdrop(model, inputs, layers=layers, keeps=keeps, positions=positions,
                            new_token_positions="shifted" if positions == "compact" else "uncut", **kwargs)
    if name == "himap":
        return oracle_himap(model, inputs, layers=layers, keeps=keeps, positions=positions, **kwargs)
    return oracle_sparsevlm(model, inputs, layers=layers, keeps=keeps, positions=positions, clamp=False,
                            decode_positions="cache_length" if positions == "compact" else "prompt_length", **kwargs)


CASES = [
    ("pdrop", PyramidDrop, [2, 3, 4], [20, 9, 3], "compact"),
    ("pdrop", PyramidDrop, [1, 3, 5], [24, 12, 6], "original"),
    ("himap", HiMAP, [2, 4], [20, 9], "original"),
    ("himap", HiMAP, [1, 3], [16, 10], "compact"),
    ("sparsevlm", SparseVLM, [2, 3, 5], [20, 9, 3], "compact"),
    ("sparsevlm", SparseVLM, [1, 3, 4], [24, 12, 5], "original"),
]


@pytest.mark.parametrize("name, cls, layers, keeps, positions", CASES, ids=[f"{c[0]}-{c[4]}" for c in CASES])
def test_press_equals_oracle(processor, model6, name, cls, layers, keeps, positions):
    image = make_image(90, 140, seed=1)
    inputs = inputs_for(processor, [image], [prompt("what shape is at the top left ?")])
    press = cls(keep=keeps, layer=layers, positions=positions)
    with torch.no_grad(), press(model6):
        logits = model6(**inputs).logits
        selection = press.last_selection
        generated = model6.generate(**inputs, **GEN)
    with torch.no_grad():
        expected = run_oracle(name, model6, inputs, layers, keeps, positions)
    for stage, (ours, theirs) in enumerate(zip(selection, expected.kept)):
        assert torch.equal(ours.kept[0], theirs), f"stage {stage}: {ours.kept[0].tolist()} != {theirs.tolist()}"
        present = ~torch.isnan(expected.scores[stage])
        torch.testing.assert_close(ours.scores[0][present], expected.scores[stage][present], atol=1e-5, rtol=1e-4)
    if name == "sparsevlm":
        assert [s.extra[0] for s in selection] == [len(st["clusters"]) for st in expected.extra["stages"]]
        assert all(s.extra[0] > 0 for s in selection)  # recycling happened at every stage
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    if name == "himap" and positions == "compact":
        return  # HiMAP's oracle has no compact decode numbering (the official code has original positions)
    # KV-cache generation == recomputing the pruned sequence with the generated tokens appended
    new_tokens = generated.sequences[:, inputs["input_ids"].shape[1]:]
    for step, step_logits in enumerate(generated.logits):
        with torch.no_grad():
            reference = run_oracle(name, model6, inputs, layers, keeps, positions, new_tokens=new_tokens[:, :step])
        torch.testing.assert_close(step_logits, reference.logits[:, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, cls, layers, keeps, positions", CASES[::2], ids=[c[0] for c in CASES[::2]])
def test_debiased_press_equals_debiased_oracle(processor, model6, name, cls, layers, keeps, positions):
    """Positional weights and the padding mask applied where the paper's patch applies them (first stage)."""
    image = make_image(150, 60, seed=4)  # landscape: top and bottom rows are padding
    inputs = inputs_for(processor, [image], [prompt("what is the colour of the circle ?")])
    profile = Profile(name="test", kind="exp", length=36, sigma=1.7, mu=0.3)
    press = cls(keep=keeps, layer=layers, positions=positions, debias=Debias(profile=profile, padding=True))
    with torch.no_grad(), press(model6, processor=processor, image_sizes=[image.size]):
        logits = model6(**inputs).logits
        selection = press.last_selection
    padding = selection[0].padding[0]
    assert padding.any() and not padding.all()
    weights = profile.weights(36)
    with torch.no_grad():
        expected = run_oracle(name, model6, inputs, layers, keeps, positions, weights=weights, padding=padding)
    for ours, theirs in zip(selection, expected.kept):
        assert torch.equal(ours.kept[0], theirs)
    # padding is kept only where the budget needs more tokens than there are real ones (keep count not lowered)
    real_kept = int((~padding[selection[0].kept[0]]).sum())
    assert real_kept == min(keeps[0], int((~padding).sum()))
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls", [PyramidDrop, HiMAP, SparseVLM])
def test_keep_everything_equals_vanilla(processor, model6, cls):
    inputs = inputs_for(processor, [make_image(120, 60, seed=2)], [prompt()])
    stages = len(cls().stages(LAYERS))
    press = cls(keep=[1.0] * stages, layer=[1, 2, 3][:stages], positions="compact")
    with torch.no_grad():
        vanilla = model6(**inputs).logits
        vanilla_gen = model6.generate(**inputs, **GEN)
        with press(model6):
            pruned = model6(**inputs).logits
            pruned_gen = model6.generate(**inputs, **GEN)
    torch.testing.assert_close(pruned, vanilla, atol=1e-5, rtol=0)
    assert torch.equal(pruned_gen.sequences, vanilla_gen.sequences)
    for a, b in zip(pruned_gen.logits, vanilla_gen.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("press", [
    PyramidDrop(keep=[16, 8, 4], layer=[2, 3, 4]),
    HiMAP(keep=[16, 8], layer=[2, 4]),
    SparseVLM(keep=[16, 8, 4], layer=[2, 3, 4]),
    SparseVLM(keep=[16, 8, 4], layer=[2, 3, 4], positions="original"),
], ids=["pdrop", "himap", "sparsevlm", "sparsevlm-original"])
def test_batch_equals_single_runs(processor, model6, press):
    images = [make_image(200, 60, seed=5), make_image(84, 84, seed=6), make_image(50, 160, seed=7)]
    texts = [prompt("what is the colour of the circle ?"), prompt("yes"), prompt("what shape is in the bottom right ?")]
    press.debias = Debias(profile="auto", padding=True) if press.positions == "compact" else None
    inputs = inputs_for(processor, images, texts)
    assert (inputs["attention_mask"] == 0).any()
    sizes = [im.size for im in images]
    with torch.no_grad(), press(model6, processor=processor, image_sizes=sizes):
        batch = model6.generate(**inputs, **GEN)
        batch_kept = [[s.kept[b] for s in press.last_selection] for b in range(3)]
    width = inputs["input_ids"].shape[1]
    for b, (image, text) in enumerate(zip(images, texts)):
        single_inputs = inputs_for(processor, [image], [text])
        with torch.no_grad(), press(model6, processor=processor, image_sizes=[image.size]):
            single = model6.generate(**single_inputs, **GEN)
        assert all(torch.equal(x, y) for x, y in zip(batch_kept[b], [s.kept[0] for s in press.last_selection]))
        n = single_inputs["input_ids"].shape[1]
        assert torch.equal(batch.sequences[b, width:], single.sequences[0, n:])
        for x, y in zip(batch.logits, single.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("make, error, message", [
    (lambda: PyramidDrop(keep=[10, 20, 5], layer=[2, 3, 4]), ValueError, "must not grow"),
    (lambda: PyramidDrop(keep=[10, 5], layer=[2, 3, 4]), ValueError, "2 entries but there are 3 stages"),
    (lambda: PyramidDrop(budget=0), ValueError, "budget"),
    (lambda: PyramidDrop(budget=700), ValueError, "1..576"),
    (lambda: PyramidDrop(budget=1.5), ValueError, r"\(0, 1\]"),
    (lambda: PyramidDrop(budget=64, keep=[8, 4, 2]), ValueError, "not both"),
    (lambda: HiMAP(layer=[2]), ValueError, "two stage layers"),
    (lambda: HiMAP(layer=[0, 4], keep=[10, 5]), ValueError, "layers must be >= 1"),
    (lambda: SparseVLM(layer=[3, 2, 5], keep=[10, 5, 2]), ValueError, "increase"),
    (lambda: SparseVLM(recycle="yes"), TypeError, "recycle"),
    (lambda: SparseVLM(layer=[3.0, 7, 16]), TypeError, "layer"),
    (lambda: HiMAP(positions="shuffled"), ValueError, "positions"),
])
def test_bad_schedules_and_options_are_clear_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_default_schedules_out_of_range_for_a_small_model(model6):
    with pytest.raises(ValueError, match="out of range; the model has 6 decoder layers"):
        PyramidDrop(layer=[2, 10, 20], keep=[20, 10, 5])(model6)
    # the default layers move to the same relative depth instead
    assert [s.layer for s in PyramidDrop().stages(LAYERS)] == [2, 3, 4]
    assert [s.layer for s in SparseVLM().stages(LAYERS)] == [3, 4, 5]
    assert [s.layer for s in HiMAP().stages(LAYERS)] == [2, 3]


def test_published_schedules_and_equivalent_tokens():
    assert [round(s.keep * 576) for s in SparseVLM(budget=128).stages()] == [303, 110, 36]
    assert [round(s.keep * 576) for s in SparseVLM(budget=192).stages()] == [300, 200, 110]
    assert [round(s.keep * 576) for s in SparseVLM(budget=64).stages()] == [66, 30, 17]
    assert [(s.layer, s.score_layer) for s in SparseVLM().stages()] == [(3, 2), (7, 6), (16, 15)]
    assert [(s.layer, round(s.keep * 576), s.score_layer) for s in PyramidDrop().stages()] == [
        (2, 184, 2), (10, 92, 10), (20, 46, 20)]
    assert [(s.layer, round(s.keep * 576), s.score_layer) for s in HiMAP().stages()] == [(2, 115, 1), (8, 90, 7)]
    assert PyramidDrop(budget=128).equivalent_tokens() == 128.0
    assert abs(HiMAP().equivalent_tokens() - (2 * 576 + 6 * 115 + 24 * 90) / 32) < 1e-9
    # SparseVLM counts its recycled clusters: 303+9, 110+7, 36+3 tokens after its stages
    assert abs(SparseVLM().equivalent_tokens() - (3 * 576 + 4 * 312 + 9 * 117 + 16 * 39) / 32) < 1e-9
    # between published budgets the schedule interpolates; budgets scale with the model's tokens
    between = [s.keep * 576 for s in SparseVLM(budget=160).stages()]
    assert 300 <= between[0] <= 303 and 110 < between[1] < 200
    assert SparseVLM(budget=0.25).stages()[0].keep == SparseVLM(budget=144).stages()[0].keep
