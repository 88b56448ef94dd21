"""Bad input gets a clear error (or, for keep > visual tokens, a warning and a clamp)."""

from __future__ import annotations

import pytest
import torch
from conftest import inputs_for, make_image, prompt

from vtprune import Debias, FastV, Random


def test_no_visual_tokens(processor, model):
    inputs = processor.tokenizer(["USER: what is the colour ? ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match="no visual tokens in sample"):
        with FastV(keep=4)(model):
            model(**inputs)


@pytest.mark.parametrize("keep", [0, -3, 0.0, 1.5, float("nan")])
def test_bad_keep(model, keep):
    with pytest.raises(ValueError, match="keep"):
        FastV(keep=keep)(model)


def test_keep_not_a_number(model):
    with pytest.raises(TypeError, match="keep"):
        FastV(keep="64")(model)


def test_keep_more_than_visual_tokens_clamps_with_warning(processor, model):
    inputs = inputs_for(processor, [make_image(64, 64)], [prompt()])
    press = FastV(keep=1000)
    with pytest.warns(UserWarning, match="only 36 remain"), torch.no_grad(), press(model):
        model(**inputs)
    assert len(press.last_selection[0].kept[0]) == 36


def test_unknown_profile():
    with pytest.raises(ValueError, match="vtprune profiles"):
        Debias(profile="llava-1.5-7b/fastvv")


def test_curve_profile_length_mismatch(processor, model):
    inputs = inputs_for(processor, [make_image(64, 64)], [prompt()])
    press = FastV(keep=4, debias=Debias(profile="llava-1.5-7b/fastv", padding=False))
    with pytest.raises(ValueError, match="576.*36|36.*576"), torch.no_grad(), press(model):
        model(**inputs)


@pytest.mark.parametrize("layer", [4, 99])
def test_layer_out_of_range(model, layer):
    with pytest.raises(ValueError, match="out of range; the model has 4 decoder layers"):
        FastV(layer=layer)(model)


def test_fastv_cannot_prune_before_layer_0():
    with pytest.raises(ValueError, match="layer=0 is out of range: FastV scores with the attention inside layer K-1"):
        FastV(layer=0)


def test_stage_layers_must_increase(model):
    with pytest.raises(ValueError, match="increase"):
        FastV(layer=[3, 2], keep=[8, 4])(model)


def test_unsupported_model_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Supported model classes: LlavaForConditionalGeneration"):
        FastV()(llm)


def test_padding_debias_needs_geometry(model):
    with pytest.raises(ValueError, match="image_sizes"):
        FastV(debias=Debias(padding=True))(model)


def test_image_sizes_count_must_match(processor, model):
    inputs = inputs_for(processor, [make_image(64, 64)], [prompt()])
    press = FastV(keep=4, debias=Debias(padding=True))
    with pytest.raises(ValueError, match="image_sizes has 2 entries but the batch holds 1"):
        with torch.no_grad(), press(model, processor=processor, image_sizes=[(64, 64), (10, 10)]):
            model(**inputs)


def test_inputs_embeds_rejected(processor, model):
    inputs = inputs_for(processor, [make_image(64, 64)], [prompt()])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="input_ids"), torch.no_grad(), FastV(keep=4)(model):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_labels_rejected(processor, model):
    inputs = inputs_for(processor, [make_image(64, 64)], [prompt()])
    with pytest.raises(ValueError, match="labels"), FastV(keep=4)(model):
        model(**inputs, labels=inputs["input_ids"])


def test_random_takes_no_debias():
    with pytest.raises(TypeError):
        Random(debias=Debias())
