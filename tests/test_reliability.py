"""Reliability II (issue 19): beams and num_return_sequences with every debiasing option, `last_selection` per
thread, the image-size convention, extreme profiles, tiny budgets, budgets up to the full count."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import inputs_for, make_image, prompt

from vtprune import Debias, FastV
from vtprune.methods import METHODS

GEN = dict(max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("debias", [None, Debias(padding=True), Debias(profile="auto", padding=True),
                                    Debias(profile="auto", padding=False)], ids=["none", "padding", "both", "positional"])
@pytest.mark.parametrize("expand", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)], ids=["beams", "returns"])
def test_beams_work_with_every_debias_option(processor, model, debias, expand):
    images = [make_image(64, 40, seed=1), make_image(30, 64, seed=2)]
    inputs = inputs_for(processor, images, [prompt(), prompt("yes")])
    press = FastV(keep=6, debias=debias)
    with torch.no_grad(), press(model, processor=processor, images=images):
        out = model.generate(**inputs, **GEN, **expand)
    assert out.shape[0] == 2 * expand.get("num_return_sequences", 1)
    first = press.last_selection[0]
    assert len(first.kept) == 4  # two beams per sample
    if debias is not None and debias.padding:  # each beam keeps its own image's geometry
        assert torch.equal(first.padding[0], first.padding[1]) and torch.equal(first.padding[2], first.padding[3])
        assert not torch.equal(first.padding[0], first.padding[2])
    with torch.no_grad(), press(model, processor=processor, images=images[:1]):
        single = model.generate(**inputs_for(processor, images[:1], [prompt()]), **GEN, **expand)
    assert torch.equal(press.last_selection[0].kept[0], first.kept[0])
    assert single.shape[0] == expand.get("num_return_sequences", 1)


def test_image_sizes_not_a_multiple_is_still_an_error(processor, model):
    images = [make_image(64, 40, seed=1), make_image(30, 64, seed=2), make_image(50, 50, seed=3)]
    inputs = inputs_for(processor, images, [prompt()] * 3)
    press = FastV(keep=6, debias=Debias(padding=True))
    with pytest.raises(ValueError, match="image_sizes has 2 entries but the batch holds 3"):
        with torch.no_grad(), press(model, processor=processor, image_sizes=[im.size for im in images[:2]]):
            model(**inputs)


def test_last_selection_is_per_thread(processor, model):
    press = FastV(keep=5)
    images = [make_image(64, 64, seed=s) for s in range(2)]
    texts = [prompt(), prompt("what shape is at the top ?")]
    expected = []
    for image, text in zip(images, texts):
        with torch.no_grad(), press(model, processor=processor, images=[image]):
            model(**inputs_for(processor, [image], [text]))
        expected.append(press.last_selection[0].kept[0].clone())
    assert not torch.equal(expected[0], expected[1])
    models = [model, type(model)(model.config).eval()]
    models[1].load_state_dict(model.state_dict())
    wrong, errors = [], []

    def work(i):
        try:
            inputs = inputs_for(processor, [images[i]], [texts[i]])
            for _ in range(6):
                with torch.no_grad(), press(models[i], processor=processor, images=[images[i]]):
                    models[i](**inputs)
                if not torch.equal(press.last_selection[0].kept[0], expected[i]):
                    wrong.append(i)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not wrong


def test_images_and_image_sizes_must_agree(processor, model):
    image = make_image(64, 40)
    with pytest.raises(ValueError, match="disagrees with the sizes of images="):
        FastV(keep=4, debias=Debias(padding=True))(model, processor=processor, images=[image], image_sizes=[(40, 64)])
    with pytest.raises(ValueError, match="not a PIL image"):
        FastV(keep=4)(model, processor=processor, images=[(64, 40)])


def test_llava_next_reads_and_checks_the_processors_image_sizes():
    from families import build_llava_next, build_llava_next_processor
    from families import make_image as next_image

    processor = build_llava_next_processor()
    model = build_llava_next(processor, "sdpa")
    image = next_image(100, 60, seed=3)  # width 100, height 60: processor image_sizes [[60, 100]]
    inputs = processor(images=[image], text=[prompt()], return_tensors="pt", padding=True)
    assert inputs["image_sizes"].tolist() == [[60, 100]]
    press = FastV(keep=[20, 8], layer=[2, 3], debias=Debias(padding=True, padding_threshold=0.3))
    kept = []
    for given in (dict(images=[image]), dict(image_sizes=[image.size]), {}):  # {}: read from the inputs
        with torch.no_grad(), press(model, processor=processor, **given):
            model(**inputs)
        kept.append((press.last_selection[0].kept[0], press.last_selection[0].padding[0]))
    assert all(k[1] is not None for k in kept)  # the geometry was known in all three
    for other in kept[1:]:
        assert torch.equal(other[0], kept[0][0]) and torch.equal(other[1], kept[0][1])
    with pytest.raises(ValueError, match=r"is \(height, width\).*PIL's \(width, height\)"):
        with torch.no_grad(), press(model, processor=processor, image_sizes=[(60, 100)]):
            model(**inputs)
    with pytest.raises(ValueError, match="disagrees with the processor's image_sizes"):
        with torch.no_grad(), press(model, processor=processor, image_sizes=[(99, 60)]):
            model(**inputs)


# --- budgets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("budget", [1.0, 576], ids=["fraction", "count"])
def test_full_budget_prunes_nothing(processor, model, name, budget):
    """budget=1.0 (or all 576) keeps every visual token: the logits are the vanilla model's, for every method."""
    press = METHODS[name].create(budget=budget)
    image = make_image(60, 90, seed=4)
    inputs = inputs_for(processor, [image], [prompt()])
    with torch.no_grad():
        vanilla = model(**inputs).logits
        with press(model, processor=processor, images=[image]):
            pruned = model(**inputs).logits
    final = press.last_selection[-1]
    assert len(final.kept[0]) + final.extra[0] == final.num_visual[0]
    torch.testing.assert_close(pruned, vanilla, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["pdrop", "himap", "sparsevlm", "visionzip"])
@pytest.mark.parametrize("num_layers, num_visual", [(32, 576), (40, 576), (24, 2880), (6, 144)])
def test_budgets_above_the_published_ones_are_reached(name, num_layers, num_visual):
    """Property over budgets: above the largest published budget the visual tokens per decoder layer reach the
    budget (within one token of rounding per stage), never fall below the largest published schedule's, and grow
    with the budget up to every token at the full count."""
    import numpy as np

    from vtprune.core.budgets import equivalent_share

    cls = METHODS[name]
    top = {"pdrop": 128, "himap": 128, "sparsevlm": 192, "visionzip": 192}[name]
    floor = cls(budget=top).equivalent_tokens(num_visual, num_layers)
    previous = 0.0
    for budget in sorted({*np.random.default_rng(0).integers(top + 1, 577, 25).tolist(), top + 1, 575, 576}):
        press = cls(budget=int(budget))
        target = budget / 576 * num_visual
        stages = press.stages(num_layers)
        plain = equivalent_share([s.layer for s in stages], [s.keep for s in stages], num_layers) * num_visual
        if name == "visionzip":
            plain = press.equivalent_tokens(num_visual, num_layers)
        if target >= floor:  # reachable on this depth
            assert abs(plain - target) <= len(stages) + (name == "visionzip") + 1e-6, (budget, plain, target)
        else:
            assert plain >= target
        assert press.equivalent_tokens(num_visual, num_layers) >= previous - 1e-6
        previous = press.equivalent_tokens(num_visual, num_layers)
    assert previous == num_visual
    assert cls(budget=1.0).equivalent_tokens(num_visual, num_layers) == num_visual


@pytest.mark.parametrize("name", ["fastv", "tokencarve", "illava", "random", "dart", "divprune", "fastervlm"])
@pytest.mark.parametrize("budget", [1, 1e-7], ids=["one", "tiny"])
def test_tiny_budgets_run(processor, model, name, budget):
    """The smallest budgets keep at least one token and run (TokenCarve's merge raised IndexError at keep 1)."""
    image = make_image(64, 64, seed=5)
    inputs = inputs_for(processor, [image], [prompt()])
    press = METHODS[name].create(budget=budget)
    with torch.no_grad(), press(model, processor=processor, images=[image]):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    final = press.last_selection[-1]
    assert 1 <= len(final.kept[0]) + final.extra[0] <= 16


def test_tokencarve_keeps_one_token(processor, model):
    from vtprune import TokenCarve

    image = make_image(64, 64, seed=5)
    press = TokenCarve(keep=1)
    with torch.no_grad(), press(model, processor=processor, images=[image]):
        model(**inputs_for(processor, [image], [prompt()]))
    assert len(press.last_selection[-1].kept[0]) == 1
