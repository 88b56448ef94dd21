"""The engine against the vanilla model and against an independent oracle that drops tokens by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import CACHE_KWARG, build_model, inputs_for, make_image, prompt

import vtprune
from vtprune import Debias, FastV, Random

GEN = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)


def oracle_logits(model, inputs, stages, new_tokens=None):
    """Logits at every kept position, computed by running the decoder layers by hand and physically
    removing the visual tokens not kept. stages: [(layer, kept visual indices)], single sample, no padding."""
    base = model.model
    lm = base.language_model
    ids = inputs["input_ids"]
    if new_tokens is not None:
        ids = torch.cat([ids, new_tokens], dim=1)
    embeds = base.get_input_embeddings()(ids)
    image_features = torch.cat(list(base.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    is_image = ids[0] == model.config.image_token_id
    embeds[0, is_image] = image_features
    visual_rank = torch.full_like(ids[0], -1)
    visual_rank[is_image] = torch.arange(int(is_image.sum()))
    positions = torch.arange(ids.shape[1])
    hidden = embeds
    eager = model.config._attn_implementation == "eager"
    cuts = dict(stages)
    for index, layer in enumerate(lm.layers):
        if index in cuts:
            rank = visual_rank[positions]
            keep = (rank < 0) | torch.isin(rank, cuts[index])
            hidden, positions = hidden[:, keep], positions[keep]
        cos, sin = lm.rotary_emb(hidden, positions[None])
        n = hidden.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None] if eager else None
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions[None])
    return model.lm_head(lm.norm(hidden))


def stage_list(press):
    return [(s.layer, s.kept[0]) for s in press.last_selection]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_everything_equals_vanilla(processor, attn):
    model = build_model(processor, attn=attn)
    image = make_image(120, 60)
    inputs = inputs_for(processor, [image], [prompt()])
    with torch.no_grad():
        vanilla = model(**inputs).logits
        vanilla_gen = model.generate(**inputs, **GEN)
        press = FastV(keep=1.0, layer=2)
        with press(model):
            pruned = model(**inputs).logits
            pruned_gen = model.generate(**inputs, **GEN)
    torch.testing.assert_close(pruned, vanilla, atol=1e-5, rtol=0)
    assert torch.equal(pruned_gen.sequences, vanilla_gen.sequences)
    for a, b in zip(pruned_gen.logits, vanilla_gen.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "press",
    [FastV(keep=8, layer=2), FastV(keep=[16, 6], layer=[1, 3]), Random(keep=[20, 5], layer=[2, 3], seed=3)],
    ids=["fastv", "fastv-two-stage", "random-two-stage"],
)
def test_pruned_equals_oracle(processor, attn, press):
    model = build_model(processor, attn=attn)
    inputs = inputs_for(processor, [make_image(90, 140, seed=1)], [prompt("what shape is at the top left ?")])
    with torch.no_grad(), press(model):
        logits = model(**inputs).logits
        stages = stage_list(press)
        generated = model.generate(**inputs, **GEN)
        # generate's prefill makes the same selection as the plain forward
        assert all(torch.equal(a[1], b[1]) for a, b in zip(stage_list(press), stages))
    assert [len(k) for _, k in stages] == [s.keep if isinstance(s.keep, int) else None for s in press.stages()]
    with torch.no_grad():
        expected = oracle_logits(model, inputs, stages)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        # KV-cache generation == recomputing the pruned sequence from scratch at every step
        new_tokens = generated.sequences[:, inputs["input_ids"].shape[1] :]
        for step, step_logits in enumerate(generated.logits):
            reference = oracle_logits(model, inputs, stages, new_tokens[:, :step])[:, -1]
            torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)
            assert int(reference.argmax()) == int(new_tokens[0, step])


def test_fastv_selection_is_topk_of_eager_attention(processor, eager_model):
    inputs = inputs_for(processor, [make_image(100, 100, seed=2)], [prompt()])
    with torch.no_grad():
        attentions = eager_model(**inputs, output_attentions=True).attentions
    row = attentions[1][0, :, -1].mean(0)  # layer K-1 = 1, last query, head mean
    visual = inputs["input_ids"][0] == eager_model.config.image_token_id
    expected = torch.sort(torch.topk(row[visual], 10).indices).values
    press = FastV(keep=10, layer=2)
    with torch.no_grad(), press(eager_model):
        eager_model(**inputs)
    assert torch.equal(press.last_selection[0].kept[0], expected)
    torch.testing.assert_close(press.last_selection[0].scores[0], row[visual].float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batch_with_padding_equals_single_runs(processor, attn):
    model = build_model(processor, attn=attn)
    images = [make_image(200, 60, seed=5), make_image(84, 84, seed=6), make_image(50, 160, seed=7)]
    texts = [prompt("what is the colour of the circle ?"), prompt("yes"), prompt("what shape is in the bottom right ?")]
    debias = Debias(padding=True)
    press = FastV(keep=[16, 6], layer=[2, 3], debias=debias)
    inputs = inputs_for(processor, images, texts)
    assert (inputs["attention_mask"] == 0).any(), "the batch should need padding"
    with torch.no_grad(), press(model, processor=processor, image_sizes=[im.size for im in images]):
        batch = model.generate(**inputs, **GEN)
        batch_kept = [[s.kept[b] for s in press.last_selection] for b in range(3)]
    # padding debias lowers the keep count of padded images: samples keep different numbers of tokens
    assert len({len(k[0]) for k in batch_kept}) > 1
    width = inputs["input_ids"].shape[1]
    for b, (image, text) in enumerate(zip(images, texts)):
        single_inputs = inputs_for(processor, [image], [text])
        with torch.no_grad(), press(model, processor=processor, image_sizes=[image.size]):
            single = model.generate(**single_inputs, **GEN)
        assert all(torch.equal(x, y) for x, y in zip(batch_kept[b], [s.kept[0] for s in press.last_selection]))
        n = single_inputs["input_ids"].shape[1]
        assert torch.equal(batch.sequences[b, width:], single.sequences[0, n:])
        for x, y in zip(batch.logits, single.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)


def test_decode_steps_are_never_pruned(processor, model):
    inputs = inputs_for(processor, [make_image(64, 64)], [prompt()])
    press = FastV(keep=4, layer=2)
    with torch.no_grad(), press(model):
        out = model(**inputs, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.24
        n = inputs["input_ids"].shape[1]
        assert cache.layers[0].keys.shape[-2] == n
        assert cache.layers[2].keys.shape[-2] == n - 36 + 4
        next_token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
        model(input_ids=next_token, attention_mask=mask, **{CACHE_KWARG: cache})
        assert cache.layers[2].keys.shape[-2] == n - 36 + 4 + 1
        assert cache.layers[0].keys.shape[-2] == n + 1


def test_context_restores_model(processor, model):
    inputs = inputs_for(processor, [make_image(64, 64)], [prompt()])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(**inputs).logits
        with pytest.raises(RuntimeError, match="boom"):
            with FastV(keep=4)(model):
                model(**inputs)
                raise RuntimeError("boom")
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    modules = list(model.modules())
    assert not any(m._forward_pre_hooks for m in modules)


def test_selection_is_per_request(processor, model):
    press = FastV(keep=5)
    a = inputs_for(processor, [make_image(64, 64, seed=1)], [prompt()])
    b = inputs_for(processor, [make_image(64, 64, seed=2)], [prompt("yes")])
    with torch.no_grad(), press(model):
        model(**a)
        first = press.last_selection[0].kept[0]
        model(**b)
        second = press.last_selection[0].kept[0]
        model(**a)
        again = press.last_selection[0].kept[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_public_api_exports():
    assert {"FastV", "Random", "Debias"} <= set(vtprune.__all__)


def test_two_images_in_one_prompt(processor, model):
    images = [make_image(120, 60, seed=8), make_image(60, 120, seed=9)]
    text = "USER: <image> <image>\nwhat is the colour of the circle ? ASSISTANT:"
    inputs = inputs_for(processor, images, [text])
    press = FastV(keep=10, layer=2, debias=Debias(padding=True))
    with torch.no_grad(), press(model, processor=processor, image_sizes=[im.size for im in images]):
        logits = model(**inputs).logits
    selection = press.last_selection[0]
    assert selection.num_visual == [72]
    padding = selection.padding[0]
    # landscape image pads top/bottom rows, portrait pads left/right columns, each on its own 6x6 grid
    assert padding[:36].view(6, 6)[0].all() and not padding[:36].view(6, 6)[:, 0].all()
    assert padding[36:].view(6, 6)[:, 0].all() and not padding[36:].view(6, 6)[0].all()
    assert not padding[selection.kept[0]].any()
    with torch.no_grad():
        expected = oracle_logits(model, inputs, [(2, selection.kept[0])])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
