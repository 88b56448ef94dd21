"""Prefill time of a LLaVA-1.5-7B-shaped model: unpruned vs FastV keep 192/128/64 at layer 2, debias on/off.

Random weights (timing does not depend on them). On CPU the decoder is truncated in depth (default 4 layers,
full width; a 7B model does not fit in fp32 here); with --device cuda it runs at full depth (32 layers).
Image features are computed once and passed as `mm_encoder_outputs`, so the timing covers the language
model's prefill, which is what pruning changes. Prints measured time ratios next to FLOP-predicted ones and
the overhead of debiasing.

    python bench/prefill.py                    # CPU, 4 layers, fp32
    python bench/prefill.py --device cuda      # GPU, 32 layers, bf16
    python bench/prefill.py --repeats 5 --markdown prefill.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from vtprune import Debias, FastV

IMAGE_TOKEN = 32000
NUM_VISUAL = 576


def build_model(layers: int, dtype: torch.dtype, device: str) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=2, num_attention_heads=16, projection_dim=768,
    )  # the vision tower is outside the timed region; 2 layers keep set-up fast
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model.to(dtype).eval()


def prompt_ids(text_before: int = 5, text_after: int = 30) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(3, 31000, (text_before,), generator=generator)
    after = torch.randint(3, 31000, (text_after,), generator=generator)
    return torch.cat([torch.tensor([1]), before, torch.full((NUM_VISUAL,), IMAGE_TOKEN), after])[None]


def layer_flops(n: int, d: int = 4096, ffn: int = 11008) -> float:
    """Multiply-adds x2 of one Llama layer over n tokens: projections, MLP, and the attention matrix."""
    return 2 * n * (4 * d * d + 3 * d * ffn) + 4 * n * n * d


def predicted_ratio(total: int, kept: int, layer: int, depth: int) -> float:
    pruned = total - NUM_VISUAL + kept
    full = depth * layer_flops(total)
    return (layer * layer_flops(total) + (depth - layer) * layer_flops(pruned)) / full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=None, help="decoder depth (default 4 on CPU, 32 on GPU)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    depth = args.layers or (32 if on_gpu else 4)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(depth, dtype, args.device)
    ids = prompt_ids().to(args.device)
    pixel_values = torch.randn(1, 3, 336, 336, dtype=dtype, device=args.device)
    processor = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    image_size = (640, 427)  # a typical landscape photo: 4 of 24 rows at the top and bottom are padding
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_encoder_outputs={"image": features})

    def run_once(press=None, **press_kwargs) -> float:
        with torch.no_grad():
            if press is None:
                start = _now(on_gpu)
                model(**inputs, logits_to_keep=1)
            else:
                with press(model, **press_kwargs):
                    start = _now(on_gpu)
                    model(**inputs, logits_to_keep=1)
            return _now(on_gpu) - start

    debiases = {
        "debias": Debias(profile="llava-1.5-7b/fastv", padding=True),
        "auto debias": Debias(profile="auto", padding=True),
    }
    # (label, press or None, press kwargs)
    configs = [("unpruned", None, {})]
    for keep in (192, 128, 64):
        configs.append((f"FastV keep {keep}", FastV(keep=keep, layer=2), {}))
        for label, debias in debiases.items():
            configs.append((f"FastV keep {keep} + {label}", FastV(keep=keep, layer=2, debias=debias),
                            {"processor": processor, "image_sizes": [image_size]}))
    # interleaved rounds (round 0 warms up): slow drift of the machine affects every config alike
    times: dict[str, list[float]] = {label: [] for label, *_ in configs}
    for round_index in range(args.repeats + 1):
        for label, press, kwargs in configs:
            elapsed = run_once(press, **kwargs)
            if round_index:
                times[label].append(elapsed)
    median = {label: statistics.median(values) for label, values in times.items()}

    total = ids.shape[1]
    base = median["unpruned"]
    rows = []
    plain = base
    for label, press, _ in configs:
        kept = NUM_VISUAL if press is None else len(press.last_selection[0].kept[0])
        is_debiased = press is not None and press.debias is not None
        if press is not None and not is_debiased:
            plain = median[label]
        overhead = (median[label] - plain) / plain * 100 if is_debiased else None
        predicted = 1.0 if press is None else predicted_ratio(total, kept, 2, depth)
        rows.append((label, kept, median[label], overhead, median[label] / base, predicted))

    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    title = (f"Prefill, LLaVA-1.5-7B shape, {depth} decoder layers, {str(dtype).split('.')[-1]}, {total} tokens, "
             f"{device_name}, median of {args.repeats} interleaved rounds")
    columns = ("config", "visual kept", "prefill ms", "time ratio", "FLOP ratio", "debias overhead")
    cells = [
        (name, str(kept), f"{seconds * 1e3:.0f}", f"{ratio:.3f}", f"{predicted:.3f}",
         "" if overhead is None else f"{overhead:+.1f}%")
        for name, kept, seconds, overhead, ratio, predicted in rows
    ]
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)
    note = ("debias: padding (image 640x427, pad-to-square: 192 of 576 tokens are padding) + positional profile "
            "llava-1.5-7b/fastv; auto debias: padding + the per-request robust fit. Padding lowers the kept count to "
            "the real tokens when fewer, so those rows' FLOP ratio uses that count. Debias overhead: against plain "
            "FastV at the same keep.")
    print(note)
    if args.markdown:
        lines = [f"{title}.", "", "| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        lines += ["", note]
        with open(args.markdown, "w") as handle:
            handle.write("\n".join(lines) + "\n")


def _now(on_gpu: bool) -> float:
    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter()


if __name__ == "__main__":
    main()
