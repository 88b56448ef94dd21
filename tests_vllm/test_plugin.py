"""vtprune's vLLM plugin against the real vLLM engine and vtprune's transformers presses (testbed-lm)."""

from __future__ import annotations

import math

import pytest

from conftest import NUM_QUESTIONS, engine, hf_answers, vllm_answers

IMAGE_TOKEN = 49152  # testbed-lm's <image> id (checked below against the processor)
LOGPROB_TOLERANCE = 2e-3  # float32 on both sides; vLLM's CPU attention kernels vs transformers' sdpa


def presses():
    """(plugin options, the transformers press with the same method, budget and compact positions)."""
    import vtprune

    return {
        "fastervlm-50%-debiased": ({"method": "fastervlm", "keep": 72, "debias_padding": True},
                                   vtprune.FasterVLM(keep=72, debias=vtprune.Debias(padding=True))),
        "fastervlm-25%": ({"method": "fastervlm", "keep": 36, "debias_padding": False}, vtprune.FasterVLM(keep=36)),
        "visionzip-25%-debiased": ({"method": "visionzip", "dominant": 30, "contextual": 6, "debias_padding": True},
                                   vtprune.VisionZip(dominant=30, contextual=6, debias=vtprune.Debias(padding=True))),
        "divprune-12.5%": ({"method": "divprune", "keep": 18}, vtprune.DivPrune(keep=18)),
        "random-25%": ({"method": "random", "keep": 36, "seed": 3},
                       vtprune.Random(keep=36, layer=0, seed=3, positions="compact")),
    }


def assert_same(ours, reference, kept_tokens):
    """Same generated tokens, logprobs within tolerance, and the same prompt with kept_tokens image tokens."""
    mismatches = [i for i, (a, b) in enumerate(zip(ours, reference)) if a[0] != b[0]]
    assert not mismatches, f"{len(mismatches)} of {len(ours)} answers differ, e.g. sample {mismatches[0]}: " \
                           f"{ours[mismatches[0]][0]} vs {reference[mismatches[0]][0]}"
    worst = max(abs(x - y) for a, b in zip(ours, reference) for x, y in zip(a[1], b[1]))
    assert worst < LOGPROB_TOLERANCE, worst
    for a, b in zip(ours, reference):
        assert a[2].count(IMAGE_TOKEN) == kept_tokens
        assert [t for t in a[2] if t != IMAGE_TOKEN] == [t for t in b[2] if t != IMAGE_TOKEN]


def test_image_token_id(processor):
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN


@pytest.mark.parametrize("name", list(presses()))
def test_equals_the_transformers_press(name, checkpoint, processor, samples, hf_model):
    """>= 40 questions: the plugin's answers and logprobs equal vtprune's press (same method, budget, compact
    positions) in transformers."""
    from vtprune.vllm.options import PluginOptions

    options, press = presses()[name]
    reference = hf_answers(hf_model, processor, samples, press)
    with engine(checkpoint, options) as llm:
        ours = vllm_answers(llm, processor, samples)
    assert len(ours) == NUM_QUESTIONS
    assert_same(ours, reference, PluginOptions(**options).tokens_per_image(144))


def test_keep_all_equals_unpruned_vllm(checkpoint, processor, samples, hf_model):
    """FasterVLM keeping every token == vLLM's own LLaVA == transformers unpruned."""
    with engine(checkpoint, None) as llm:
        stock = vllm_answers(llm, processor, samples)
    with engine(checkpoint, {"method": "fastervlm", "keep": 1.0}) as llm:
        kept_all = vllm_answers(llm, processor, samples)
    assert [a[0] for a in kept_all] == [a[0] for a in stock]
    assert max(abs(x - y) for a, b in zip(kept_all, stock) for x, y in zip(a[1], b[1])) < 1e-5
    assert_same(kept_all, hf_answers(hf_model, processor, samples), 144)


def test_batched_sequential_and_chunked_prefill_agree(checkpoint, processor, samples):
    """The same pruned answers whether requests come together, one by one, or prefilled in 16-token chunks."""
    options = {"method": "fastervlm", "keep": 36, "debias_padding": True}
    with engine(checkpoint, options) as llm:
        batched = vllm_answers(llm, processor, samples)
        sequential = vllm_answers(llm, processor, samples[:12], one_by_one=True)
    with engine(checkpoint, options, enable_chunked_prefill=True, max_num_batched_tokens=16) as llm:
        chunked = vllm_answers(llm, processor, samples)
    assert [a[0] for a in sequential] == [a[0] for a in batched[:12]]
    assert [a[0] for a in chunked] == [a[0] for a in batched]
    worst = max(abs(x - y) for a, b in zip(chunked, batched) for x, y in zip(a[1], b[1]))
    assert worst < LOGPROB_TOLERANCE and all(math.isfinite(x) for a in chunked for x in a[1])


def test_a_placeholder_count_mismatch_is_refused(checkpoint, processor, samples, monkeypatch):
    """If the prompt holds more placeholders than the model returns embeddings, the request fails (vLLM itself
    would silently fill them with the first embeddings)."""
    from vtprune.vllm.llava import VtpruneLlavaProcessingInfo

    with engine(checkpoint, {"method": "fastervlm", "keep": 36}) as llm:
        original = VtpruneLlavaProcessingInfo.get_num_image_tokens
        monkeypatch.setattr(VtpruneLlavaProcessingInfo, "get_num_image_tokens",
                            lambda self, **size: original(self, **size) + 1)
        with pytest.raises(Exception) as caught:
            vllm_answers(llm, processor, samples[:1])
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("37 image placeholders" in text or "[37]" in text for text in chain), chain


def test_per_request_options(checkpoint, processor, samples, hf_model):
    """A request's mm_processor_kwargs {"vtprune": {...}} overrides the model's options for that request only: its
    answers equal the press at the request's budget (here more than the model's default), requests with different
    options in one batch each get their own, and a bad option fails the request with a one-line error."""
    import vtprune

    wider = vtprune.FasterVLM(keep=72, debias=vtprune.Debias(padding=True))
    reference = hf_answers(hf_model, processor, samples, wider)
    with engine(checkpoint, {"method": "fastervlm", "keep": 36, "debias_padding": True}) as llm:
        default = vllm_answers(llm, processor, samples)
        per_request = vllm_answers(llm, processor, samples, options={"keep": 0.5})
        mixed = vllm_answers(llm, processor, samples, options=[{"keep": 0.5} if i % 2 else None
                                                               for i in range(len(samples))])
        divprune = vllm_answers(llm, processor, samples[:8], options={"method": "divprune", "keep": 18})
        refused = {}
        for name, bad in {"keep": {"keep": 0}, "vision_layer": {"vision_layer": -3}, "kepp": {"kepp": 3}}.items():
            with pytest.raises(Exception) as caught:
                vllm_answers(llm, processor, samples[:1], options=bad)
            refused[name] = str(caught.value)
    assert_same(per_request, reference, 72)
    assert all(a[2].count(IMAGE_TOKEN) == 36 for a in default)
    assert max(abs(x - y) for a, b in zip(default, per_request) for x, y in zip(a[1], b[1])) > 1e-3
    assert_same(mixed[1::2], reference[1::2], 72)
    assert [a[0] for a in mixed[::2]] == [a[0] for a in default[::2]]
    assert all(a[2].count(IMAGE_TOKEN) == 36 for a in mixed[::2])
    assert_same(divprune, hf_answers(hf_model, processor, samples[:8], vtprune.DivPrune(keep=18)), 18)
    assert "keep" in refused["keep"]
    assert "cannot be set per request" in refused["vision_layer"]
    assert "kepp" in refused["kepp"]
