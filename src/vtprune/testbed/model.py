"""The testbed model: a small, real LLaVA (CLIP vision tower + Llama decoder) and its processor.

Everything is built offline: the tokenizer is a word-level ``tokenizers`` model over the
synthetic question/answer vocabulary, the image processor is ``LlavaImageProcessorPil`` with
``do_pad=True`` (pad to square with the mean colour, then resize). The trained weights ship in
``CHECKPOINT_DIR`` and load through the ordinary ``from_pretrained`` code paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vtprune.apps.models import NamedModel, register_model
from vtprune.testbed.data import ANSWER_VOCAB, all_question_texts, prompt_for

CHECKPOINT_DIR: Path = Path(__file__).resolve().parent / "checkpoint"

IMAGE_SIZE = 168
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 12 x 12 = 144 visual tokens
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)

CHAT_TEMPLATE = (  # message content as a list of parts, or as one string with the <image> placeholder
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% else %} ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every prompt/answer word; ``<image>`` is a special token, BOS is prepended."""
    words: list[str] = []
    for text in [prompt_for(q).replace(IMAGE_TOKEN, "") for q in all_question_texts()] + list(ANSWER_VOCAB):
        for w in _words(text):
            if w not in words:
                words.append(w)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=512,
    )


def build_processor() -> LlavaProcessor:
    """LLaVA processor: PIL image processor padding to square, word-level tokenizer, chat template."""
    image_processor = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_model(
    processor: LlavaProcessor,
    *,
    vision_hidden: int = 128,
    vision_layers: int = 4,
    text_hidden: int = 192,
    text_layers: int = 6,
    heads: int = 4,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A randomly initialised small LLaVA matching ``processor`` (grid, vocabulary, special tokens)."""
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        rope_theta=10000.0,  # type: ignore[call-arg]  # not in the signature; LlamaConfig takes it at run time
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    config.vtprune_model = "testbed"  # lets Debias(profile="default") pick the testbed's calibrated profiles
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return model


def load_testbed(
    path: str | Path | None = None, *, attn_implementation: str | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load the shipped (or a given) testbed checkpoint with ``from_pretrained``, float32, eval mode."""
    path = Path(path) if path is not None else CHECKPOINT_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no testbed checkpoint at {path}; train one with `vtprune testbed train`")
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, **kwargs)
    processor = AutoProcessor.from_pretrained(path, backend="pil")
    model.eval()
    return cast(LlavaForConditionalGeneration, model), processor


def _checkpoint_problem() -> str | None:
    if not (CHECKPOINT_DIR / "config.json").is_file():
        return f"the testbed checkpoint is missing from the installed package ({CHECKPOINT_DIR}): reinstall vtprune"
    return None


register_model(
    NamedModel("testbed", CHECKPOINT_DIR, _checkpoint_problem, lambda attn_implementation=None: load_testbed())
)
