"""Lean machinery: a press's extra aten ops per prefill do not grow with the batch, a fixed-budget prefill reads
nothing back from the device beyond the prompt's layout, and a compiled model with a press active gives the
eager outputs without recompiling between requests."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, inputs_for, make_image, prompt
from torch._dynamo.utils import counters

from vtprune import FastV, HiMAP, PyramidDrop, Random
from vtprune.methods import DART, DivPrune, FasterVLM, ILLaVA, SparseVLM, TokenCarve, VisionZip
from vtprune.core.selection.opcount import OpCounter


def _count(model, inputs, press=None) -> OpCounter:
    counter = OpCounter(count_tolist=True)
    with torch.no_grad():
        if press is None:
            with counter:
                model(**inputs)
        else:
            with press(model), counter:
                model(**inputs)
    return counter


@pytest.fixture(scope="module")
def model(processor):
    return build_model(processor, layers=6)


def _batch(processor, size):
    return inputs_for(processor, [make_image(120, 60)] * size, [prompt()] * size)


PRESSES = {
    "fastv": lambda: FastV(keep=8, layer=2),
    "pdrop": lambda: PyramidDrop(keep=[24, 12, 6], layer=[1, 3, 4]),
    "himap": lambda: HiMAP(keep=[12, 6], layer=[2, 4]),
    "random": lambda: Random(keep=8, layer=2),
    "fastervlm": lambda: FasterVLM(keep=8),
    "divprune": lambda: DivPrune(keep=8),
    "visionzip": lambda: VisionZip(dominant=8, contextual=4),
    "sparsevlm": lambda: SparseVLM(keep=[24, 12, 6], layer=[1, 3, 4]),
    "illava": lambda: ILLaVA(keep=8, layer=2),
    "tokencarve": lambda: TokenCarve(keep=8, layer=2),
    "dart": lambda: DART(per_pivot=2, pivot_text=2),
}


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_extra_ops_do_not_grow_with_the_batch(processor, model, name):
    extra = {}
    for size in (1, 4):
        inputs = _batch(processor, size)
        extra[size] = _count(model, inputs, PRESSES[name]()).total - _count(model, inputs).total
    assert extra[1] > 0
    assert extra[4] <= 1.1 * extra[1], extra


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_fixed_budget_prefill_reads_only_the_layout_from_the_device(processor, model, name):
    """One read per request: the adapter counts each sample's visual tokens, and the same transfer brings whether
    the batch has padding and where each sample's last visual token is (the instruction tokens that HiMAP queries,
    SparseVLM's raters are chosen among and DART's text pivots come from, when nothing is padded)."""
    inputs = _batch(processor, 3)
    syncs = _count(model, inputs, PRESSES[name]()).syncs - _count(model, inputs).syncs
    assert syncs <= 1


def test_the_layout_read_carries_the_tokens_after_the_last_visual_token(model):
    """`ModelAdapter.read` with the visual mask: per sample, the tokens after its last visual token, in the one
    transfer; without engine facts to carry, nothing more is read."""
    from vtprune.adapters import adapter_for

    adapter = adapter_for(model)
    image, text = adapter.image_token_id, 5
    per_image = adapter.tokens_per_image
    rows = [
        [text] * 3 + [image] * per_image + [text] * 4,
        [text] * 1 + [image] * per_image + [text] * 6,
        [image] * per_image + [text] * 7,
    ]
    input_ids = torch.tensor(rows)
    with adapter.carrying(torch.ones(3, dtype=torch.long)):
        layout = adapter.visual_layout(input_ids)
    assert layout.num_visual == [per_image] * 3
    assert adapter.carried == [1, 1, 1] and adapter.carried_tail == [4, 6, 7]
    with adapter.carrying(None):  # no engine facts: the counts alone
        adapter.visual_layout(input_ids)
    assert adapter.carried is None and adapter.carried_tail is None


def test_compiled_model_with_a_press_matches_eager_and_does_not_recompile(processor):
    model = build_model(processor, layers=4)
    first, second = (inputs_for(processor, [make_image(120, 60, seed=seed)], [prompt()]) for seed in (0, 5))
    press = FastV(keep=8, layer=2)
    options = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad(), press(model):
        eager = [model(**first).logits, model(**second).logits]
        eager_tokens = model.generate(**second, **options)
    torch._dynamo.reset()
    # the compiled forward, so that generate (which calls the model itself, not a torch.compile wrapper) uses it
    model.forward = torch.compile(model.forward, backend="aot_eager")
    try:
        with torch.no_grad(), press(model):
            model(**first)  # compiles
            model.generate(**first, **options)  # compiles the decode steps
            torch._dynamo.config.error_on_recompile = True
            outputs = [model(**first).logits, model(**second).logits]
            tokens = model.generate(**second, **options)
    finally:
        torch._dynamo.config.error_on_recompile = False
    for got, expected in zip(outputs, eager):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(tokens, eager_tokens)


#: methods whose compiled model has more graphs than the unpruned one, and why
EXTRA_GRAPHS = {"random": "its scores are drawn from a torch.Generator seeded per stage, which dynamo cannot create"}


@pytest.fixture(scope="module")
def compile_setup(processor):
    """A 5-layer model (the fewest PRESSES runs on), two requests of the same shapes, and how many graphs the
    compiled unpruned model has."""
    model = build_model(processor, layers=5)
    requests = [inputs_for(processor, [make_image(120, 60, seed=seed)], [prompt()]) for seed in (0, 5)]
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        torch.compile(model, backend="eager")(**requests[0])
    return model, requests, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_compiled_model_with_any_press_matches_eager_in_the_unpruned_graphs(compile_setup, name):
    """Every press traces inside the model's own graphs (a graph break among the decoder layers made dynamo run the
    layer loop eagerly and compile each layer apart, up to its cache limit), records its selection, and requests
    of the same shapes run without recompiling."""
    model, requests, unpruned_graphs = compile_setup
    press = PRESSES[name]()
    with torch.no_grad(), press(model):
        eager = [model(**inputs).logits for inputs in requests]
        eager_kept = [kept for stage in press.last_selection for kept in stage.kept]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")  # dynamo alone: its graphs, breaks and guards
    with torch.no_grad(), press(model), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        compiled(**requests[0])  # compiles
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            outputs = [compiled(**inputs).logits for inputs in requests]
        kept = [kept for stage in press.last_selection for kept in stage.kept]
    for got, expected in zip(outputs, eager):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert len(kept) == len(eager_kept) and all(torch.equal(a, b) for a, b in zip(kept, eager_kept))
    if name in EXTRA_GRAPHS:
        assert graphs > unpruned_graphs, f"{name} now compiles like the others: remove it from EXTRA_GRAPHS"
    else:
        assert graphs <= unpruned_graphs, f"{name}: {graphs} graphs, the unpruned model {unpruned_graphs}"


def test_inductor_compiled_press_matches_eager(processor):
    model = build_model(processor, layers=3)
    inputs = inputs_for(processor, [make_image(120, 60)], [prompt()])
    press = FastV(keep=8, layer=2)
    with torch.no_grad(), press(model):
        eager = model(**inputs).logits
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad(), press(model):
        got = compiled(**inputs).logits
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["dart", "himap", "sparsevlm"])
def test_instruction_counts_from_the_layout_read_match_single_runs(processor, model, name):
    """An unpadded batch whose samples have different instruction lengths (the image at different places): the
    presses that use the instruction tokens keep, in one read, what each sample keeps alone."""
    from vtprune.adapters import adapter_for

    adapter = adapter_for(model)
    image, per_image = adapter.image_token_id, adapter.tokens_per_image
    text = [7, 11, 13, 17, 19, 23, 29, 31, 37]
    rows = [
        text[:3] + [image] * per_image + text[3:],
        text[:1] + [image] * per_image + text[1:],
        [image] * per_image + text,
    ]
    pixels = inputs_for(processor, [make_image(120, 60, seed=s) for s in range(3)], [prompt()] * 3)["pixel_values"]
    batch = dict(
        input_ids=torch.tensor(rows), attention_mask=torch.ones(3, len(rows[0]), dtype=torch.long), pixel_values=pixels
    )
    press = PRESSES[name]()
    counter = OpCounter(count_tolist=True)
    with torch.no_grad(), press(model), counter:
        model(**batch)
    assert counter.syncs - _count(model, batch).syncs <= 1
    kept = [[s.kept[b] for s in press.last_selection] for b in range(3)]
    for b in range(3):
        single = {key: value[b : b + 1] for key, value in batch.items()}
        with torch.no_grad(), press(model):
            model(**single)
        assert all(torch.equal(x, s.kept[0]) for x, s in zip(kept[b], press.last_selection))
