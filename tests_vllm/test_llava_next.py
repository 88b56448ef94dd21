"""The plugin's LLaVA-NeXT (`VtpruneLlavaNextForConditionalGeneration`) against the real vLLM engine and vtprune's
transformers presses, on a tiny random LLaVA-NeXT (tiny_llava_next.py: 56-px tiles of 4x4 tokens, pinpoints up to
112x168) saved with save_pretrained and exported in vLLM's layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import engine, hf_answers, vllm_answers

NEXT = "VtpruneLlavaNextForConditionalGeneration"
LOGPROB_TOLERANCE = 2e-3
#: original (width, height) of the images: wide, tall, square, small, and sizes whose unpadding removes rows
SIZES = [(100, 80), (130, 70), (50, 160), (57, 91), (200, 61), (56, 56), (90, 140), (160, 50)]
QUESTIONS = ["what is the colour of the circle ?", "what shape is at the top left ?"]


class Sample(NamedTuple):
    image: object
    question: str


def _save_tiny_llava_next(directory: Path) -> None:
    """tiny_llava_next.py in a separate interpreter (tests/ has its own conftest module)."""
    script = Path(__file__).with_name("tiny_llava_next.py")
    subprocess.run([sys.executable, str(script), str(directory)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def next_checkpoints(tmp_path_factory):
    """(the saved transformers directory, its export in vLLM's layout)."""
    from vtprune.vllm.export import export

    root = tmp_path_factory.mktemp("llava-next")
    _save_tiny_llava_next(root / "hf")
    return root / "hf", str(export(str(root / "hf"), root / "vllm"))


@pytest.fixture(scope="module")
def next_processor(next_checkpoints):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(next_checkpoints[1])


@pytest.fixture(scope="module")
def next_model(next_checkpoints):
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(next_checkpoints[0], attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def next_samples():
    import torch
    from PIL import Image

    out = []
    for index, (width, height) in enumerate(SIZES):
        generator = torch.Generator().manual_seed(index)
        pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
        out.append(Sample(Image.fromarray(pixels), QUESTIONS[index % 2]))
    return out


def image_tokens(prompt_ids, processor) -> int:
    return prompt_ids.count(processor.tokenizer.convert_tokens_to_ids("<image>"))


def assert_same(ours, reference, counts, processor):
    """The same generated tokens, logprobs within tolerance, and `counts` image placeholders per prompt."""
    assert [image_tokens(a[2], processor) for a in ours] == counts
    assert [a[0] for a in ours] == [b[0] for b in reference]
    worst = max(abs(x - y) for a, b in zip(ours, reference) for x, y in zip(a[1], b[1]))
    assert worst < LOGPROB_TOLERANCE, worst


def test_llava_next_equals_the_transformers_presses(next_checkpoints, next_processor, next_model, next_samples,
                                                    monkeypatch):
    """Keep-all == vLLM's own LLaVA-NeXT == transformers; DivPrune and Random (model options, and per request)
    == vtprune.DivPrune / vtprune.Random(layer=0) in transformers; batched == sequential; the placeholders are
    the kept base and tile tokens plus every newline; FasterVLM is refused; one placeholder more than the model
    returns fails the request (vLLM would silently use the first embeddings)."""
    import vtprune
    from vtprune.adapters import adapter_for
    from vtprune.vllm.llava_next import VtpruneLlavaNextProcessingInfo

    checkpoint = next_checkpoints[1]
    adapter = adapter_for(next_model)
    tile_grids = [adapter.tile_layout(s.image.size[1], s.image.size[0]) for s in next_samples]
    unpruned = [16 + t["rows_u"] * (t["cols_u"] + 1) for t in tile_grids]
    with engine(checkpoint, None) as llm:
        stock = vllm_answers(llm, next_processor, next_samples)
    with engine(checkpoint, {"method": "divprune", "keep": 0.5}, NEXT) as llm:
        divprune = vllm_answers(llm, next_processor, next_samples)
        sequential = vllm_answers(llm, next_processor, next_samples[:4], one_by_one=True)
        kept_all = vllm_answers(llm, next_processor, next_samples, options={"method": "none"})
        random = vllm_answers(llm, next_processor, next_samples, options={"method": "random", "keep": 0.25, "seed": 3})
        divprune_count = vllm_answers(llm, next_processor, next_samples, options={"keep": 6})
        with pytest.raises(Exception) as refused:
            vllm_answers(llm, next_processor, next_samples[:1], options={"method": "fastervlm"})
        original = VtpruneLlavaNextProcessingInfo.get_num_image_tokens
        monkeypatch.setattr(VtpruneLlavaNextProcessingInfo, "get_num_image_tokens",
                            lambda self, **size: original(self, **size) + 1)
        with pytest.raises(Exception) as mismatch:
            vllm_answers(llm, next_processor, next_samples[:1], options={"seed": 5})  # not cached: a new request
    # keep-all
    assert [image_tokens(a[2], next_processor) for a in stock] == unpruned
    assert [a[0] for a in kept_all] == [a[0] for a in stock]
    assert max(abs(x - y) for a, b in zip(kept_all, stock) for x, y in zip(a[1], b[1])) < 1e-5
    assert_same(kept_all, hf_answers(next_model, next_processor, next_samples), unpruned, next_processor)
    # the presses
    half = [round(0.5 * 16) + max(1, round(0.5 * t["rows_u"] * t["cols_u"])) + t["rows_u"] for t in tile_grids]
    assert [image_tokens(a[2], next_processor) for a in divprune] == half
    assert_same(divprune, hf_answers(next_model, next_processor, next_samples, vtprune.DivPrune(keep=0.5)), half,
                next_processor)
    assert [a[0] for a in sequential] == [a[0] for a in divprune[:4]]
    assert_same(divprune_count, hf_answers(next_model, next_processor, next_samples, vtprune.DivPrune(keep=6)),
                [6 + min(6, t["rows_u"] * t["cols_u"]) + t["rows_u"] for t in tile_grids], next_processor)
    press = vtprune.Random(keep=0.25, layer=0, seed=3, positions="compact")
    quarter = [round(0.25 * (16 + t["rows_u"] * t["cols_u"])) + t["rows_u"] for t in tile_grids]
    assert [image_tokens(a[2], next_processor) for a in random] == quarter
    assert_same(random, hf_answers(next_model, next_processor, next_samples, press), quarter, next_processor)
    assert "does not run on VtpruneLlavaNextForConditionalGeneration" in str(refused.value)
    chain, error = [], mismatch.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("image placeholders but the pruned model returns" in text for text in chain), chain
