"""Prefill time of a LLaVA-1.5-7B-shaped model: unpruned vs every registered method at budgets 192/128/64,
debias on/off, and FastV with its scoring keys recomputed instead of reused. `--model-shape` times other families
at their 7B checkpoints' real shapes instead (FastV and PyramidDrop by default, without debiasing).

Random weights (timing does not depend on them). On CPU the decoder is truncated in depth (default 4 layers,
full width; a 7B model does not fit in fp32 here) and multi-stage schedules move to the same relative depth
(`Press.stages(num_layers)`), so CPU rows measure per-layer costs; with --device cuda the model runs at full
depth (32 layers) with the published schedules. Rows of methods that prune in the language model get the image
features precomputed (`mm_encoder_outputs`): their timing covers the language model, which is what they
change. Methods that read the vision tower (VisionZip, FasterVLM) need it to run: with `--with-vision` every
row includes the vision tower (2 layers on CPU, CLIP-L's 24 on a GPU), so all rows stay comparable.
Prints measured time ratios next to FLOP-predicted ones (from the tokens each layer really processed) and the
overhead of debiasing.

    python bench/prefill.py                    # CPU, 4 layers, fp32
    python bench/prefill.py --device cuda      # GPU, 32 layers, bf16
    python bench/prefill.py --repeats 5 --markdown prefill.md --methods fastv,pdrop
    python bench/prefill.py --model-shape qwen2.5-vl-7b|llava-next-7b|video-llava-7b --repeats 3
    python bench/prefill.py --model-shape testbed-lm [--compile default]   # the shipped model, every method

Other shapes (random weights; decoder hidden size, MLP width, attention and KV heads and depth of the released
7B checkpoints; the image features precomputed with a 1-2 layer vision tower of the real width, since the rows
time the language model, which is what FastV and PyramidDrop change; budgets are fractions b/576 of the
sample's visual tokens, so "192" keeps a third as it does on LLaVA-1.5):

* qwen2.5-vl-7b: Qwen2.5-VL-7B (28 layers, 3584 wide, MLP 18944, 28 heads / 4 KV heads, mRoPE), one 672x672
  image = a 48x48 patch grid = 576 visual tokens after the 2x2 merge (`--qwen-grid 64`: 896x896, 1,024 tokens).
* llava-next-7b: LLaVA-v1.6-Vicuna-7B (32 layers, 4096, 11008, 32 heads), one 672x672 image through the anyres
  processor (pinpoints of the checkpoint): base image (576) + 2x2 tiles of 24x24 (2304) = 2880 visual tokens, plus
  48 `image_newline` tokens that are never pruned.
* video-llava-7b: Video-LLaVA-7B (Vicuna-7B decoder), one video of 8 frames x (256 patches + the frame's [CLS]
  token, which is never pruned) = 2048 visual tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from vtprune import Debias, FastV
from vtprune.debias.profiles import builtin_aliases, builtin_profiles
from vtprune.methods import METHODS

IMAGE_TOKEN = 32000
NUM_VISUAL = 576


def build_model(layers: int, dtype: torch.dtype, device: str, vision_layers: int = 2) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=vision_layers, num_attention_heads=16, projection_dim=768,
    )
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


def layer_flops(n: int, d: int = 4096, ffn: int = 11008, kv: int | None = None) -> float:
    """Multiply-adds x2 of one Llama-style layer over n tokens: q/o and k/v projections (k/v of width `kv`,
    default d), the gated MLP, and the attention matrix."""
    kv = d if kv is None else kv
    return 2 * n * (2 * d * d + 2 * d * kv + 3 * d * ffn) + 4 * n * n * d


def tokens_per_layer(press, total: int, depth: int, num_visual: int = NUM_VISUAL) -> list[int]:
    """Tokens each decoder layer processed in the press's last request (visual tokens cut at each stage)."""
    counts, present, text = [], num_visual, total - num_visual
    stages = {s.layer: len(s.kept[0]) + s.extra[0] for s in press.last_selection}
    for layer in range(depth):
        present = stages.get(layer, present)
        counts.append(text + present)
    return counts


def predicted_ratio(press, total: int, depth: int, num_visual: int = NUM_VISUAL, dims: dict | None = None) -> float:
    """FLOPs of the pruned prefill / the unpruned one (scoring costs not counted)."""
    dims = dims or {}
    return (sum(layer_flops(n, **dims) for n in tokens_per_layer(press, total, depth, num_visual))
            / (depth * layer_flops(total, **dims)))


# --- other model shapes ----------------------------------------------------------------------------------------
#: shape -> (title, full depth, decoder dims for the FLOP count)
SHAPES = {
    "qwen2.5-vl-7b": ("Qwen2.5-VL-7B shape", 28, dict(d=3584, ffn=18944, kv=512)),
    "llava-next-7b": ("LLaVA-NeXT-7B (v1.6 Vicuna) shape", 32, dict(d=4096, ffn=11008, kv=4096)),
    "video-llava-7b": ("Video-LLaVA-7B shape", 32, dict(d=4096, ffn=11008, kv=4096)),
}
VICUNA = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
              num_key_value_heads=32, max_position_embeddings=4096)
CLIP_L = dict(patch_size=14, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, projection_dim=768,
              num_hidden_layers=2)


def _prompt(token: int, count: int, around: tuple[int, ...] = ()) -> torch.Tensor:
    """bos, 5 text tokens, `count` placeholders (between the `around` start/end tokens, if given), 30 text tokens."""
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(3, 31000, (5,), generator=generator)
    after = torch.randint(3, 31000, (30,), generator=generator)
    start, end = (torch.tensor(around[:1]), torch.tensor(around[1:])) if around else (torch.tensor([]), torch.tensor([]))
    return torch.cat([torch.tensor([1]), before, start, torch.full((count,), token), end, after]).long()


def build_shape(shape: str, depth: int, dtype: torch.dtype, device: str, batch: int, qwen_grid: int = 48):
    """(model, inputs, visual tokens per sample) for one of SHAPES, image/video features precomputed; qwen_grid: the
    Qwen2.5-VL image's patch-grid side (even; visual tokens = qwen_grid**2 / 4 after the 2x2 merge)."""
    generator = torch.Generator().manual_seed(0)
    if shape == "qwen2.5-vl-7b":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=depth,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
        vision = dict(depth=1, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[0])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                                  video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
        model = model.to(dtype).eval()
        grid = torch.tensor([[1, qwen_grid, qwen_grid]] * batch, device=device)
        pixels = torch.randn(batch * qwen_grid * qwen_grid, 3 * 2 * 14 * 14, generator=generator).to(device, dtype)
        with torch.no_grad():
            features = model.model.get_image_features(pixels, grid, return_dict=True)
        visual = qwen_grid * qwen_grid // 4
        ids = _prompt(151655, visual, around=(151652, 151653))[None].expand(batch, -1).contiguous().to(device)
        types = (ids == 151655).int()
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                      image_grid_thw=grid, mm_encoder_outputs={"image": features})
        return model, inputs, visual
    from transformers import CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(num_hidden_layers=depth, **VICUNA)
    if shape == "llava-next-7b":
        import numpy as np
        from PIL import Image
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=336, **CLIP_L), text_config=text,
                                 image_token_id=32000, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints)
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(config)
        model = model.to(dtype).eval()
        processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                               image_grid_pinpoints=pinpoints)
        array = np.random.default_rng(0).integers(0, 255, (672, 672, 3), dtype=np.uint8)  # the 2x2 pinpoint
        out = processor(images=[Image.fromarray(array)] * batch, return_tensors="pt")
        sizes = out["image_sizes"].to(device)
        with torch.no_grad():
            features = model.model.get_image_features(out["pixel_values"].to(device, dtype), sizes, return_dict=True)
        count = int(features.pooler_output[0].shape[0])  # base + unpadded tiles + newline tokens
        ids = _prompt(32000, count)[None].expand(batch, -1).contiguous().to(device)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_sizes=sizes,
                      mm_encoder_outputs={"image": features})
        from vtprune.adapters import adapter_for

        return model, inputs, adapter_for(model).visual_layout(ids, inputs).num_visual[0]
    if shape == "video-llava-7b":
        from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

        config = VideoLlavaConfig(vision_config=CLIPVisionConfig(image_size=224, **CLIP_L), text_config=text,
                                  image_token_id=32000, video_token_id=32001, vision_feature_layer=-2,
                                  vision_feature_select_strategy="default")
        with torch.device(device):
            model = VideoLlavaForConditionalGeneration(config)
        model = model.to(dtype).eval()
        frames = torch.randn(batch, 8, 3, 224, 224, generator=generator).to(device, dtype)
        with torch.no_grad():
            features = model.model.get_video_features(frames, return_dict=True)
        ids = _prompt(32001, 8 * 257)[None].expand(batch, -1).contiguous().to(device)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_encoder_outputs={"video": features})
        return model, inputs, 8 * 256
    raise ValueError(f"unknown --model-shape {shape!r}: use llava-1.5-7b or one of {', '.join(SHAPES)}")


def main_shape(args) -> None:
    """Unpruned vs FastV/PyramidDrop (plain) at the budgets, for a --model-shape other than LLaVA-1.5."""
    title_name, full_depth, dims = SHAPES[args.model_shape]
    on_gpu = args.device.startswith("cuda")
    depth = args.layers or (full_depth if on_gpu else 4)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    model, inputs, visual = build_shape(args.model_shape, depth, dtype, args.device, args.batch, args.qwen_grid)
    runner = compiled_runner(model, args)
    methods = args.methods.split(",") if args.methods else ["fastv", "pdrop"]
    budgets = [int(b) for b in args.budgets.split(",")]
    configs = budget_configs(methods, budgets)

    title = (f"Prefill, {title_name}, {depth} decoder layers, {str(dtype).split('.')[-1]}, batch {args.batch} x "
             "{total} tokens ({visual} visual), features precomputed")
    note = ("Budgets b/576: the fraction of the sample's visual tokens the published LLaVA-1.5 budget b keeps. "
            "FLOP ratios from the tokens each layer really processed (scoring not counted). Visual per layer: "
            "visual tokens averaged over the decoder layers.")
    title = time_and_report(model, runner, inputs, configs, args, on_gpu, depth, visual, dims, title, note)
    if args.decode:
        decode_table(model, runner, inputs, [(label, press, {}) for label, press in configs], args.decode, on_gpu,
                     f"Decode after the prefill, {title}")


def time_and_report(model, runner, inputs, configs, args, on_gpu: bool, depth: int, visual: int, dims: dict,
                    title: str, note: str) -> str:
    """Time `configs` ((label, press or None), plain presses) with `time_configs`, print the table (time ratio
    against FLOP ratio), write it as Markdown to --markdown, and return the full title. `title` may name
    {total} and {visual}."""

    def run_once(press=None, **_) -> float:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "positions='compact' does not apply" on Qwen-VL, every call
            if press is None:
                start = _now(on_gpu)
                runner(**inputs, logits_to_keep=1)
            else:
                with press(model):
                    start = _now(on_gpu)
                    runner(**inputs, logits_to_keep=1)
            return _now(on_gpu) - start

    times = time_configs(model, inputs, [(label, press, {}) for label, press in configs], args, on_gpu, run_once)
    median = {label: statistics.median(values) for label, values in times.items()}
    total = inputs["input_ids"].shape[1]
    columns = ("config", "visual kept (last stage)", "visual per layer", "prefill ms", "time ratio", "FLOP ratio")
    cells = []
    for label, press in configs:
        if press is None:
            kept, per_layer, predicted = visual, float(visual), 1.0
        else:
            last = press.last_selection[-1]
            kept = len(last.kept[0]) + last.extra[0]
            per_layer = sum(tokens_per_layer(press, total, depth, visual)) / depth - (total - visual)
            predicted = predicted_ratio(press, total, depth, visual, dims)
        cells.append((label, str(kept), f"{per_layer:.0f}", f"{median[label] * 1e3:.1f}",
                      f"{median[label] / median['unpruned']:.3f}", f"{predicted:.3f}"))
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads{_clock_name()}"
    rounds = "rounds, compiled per config" if args.compile else "interleaved rounds"
    title = f"{title.format(total=total, visual=visual)}, {device_name}, median of {args.repeats} {rounds}"
    print_table(title, columns, cells)
    print(note)
    if args.markdown:
        lines = [f"{title}.", "", "| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells] + ["", note]
        with open(args.markdown, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return title


def main_testbed_lm(args) -> None:
    """Unpruned vs every registered method (plain) at the budgets, on the shipped testbed-lm (SmolLM2-135M decoder,
    30 layers, 144 visual tokens), its vision tower included in every row, one held-out test question."""
    from vtprune.apps.loading import build_inputs
    from vtprune.testbed.data import make_split
    from vtprune.testbed.lm import load_testbed_lm

    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise SystemExit(f"--device {args.device}: use cpu or cuda")
    on_gpu = args.device.startswith("cuda")
    model, processor = load_testbed_lm()
    model = model.to(args.device).eval()
    depth = len(model.model.language_model.layers)
    sample = make_split("test", 1)[0]
    inputs = build_inputs(processor, [sample.image] * args.batch, [sample.question] * args.batch, device=args.device)
    visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    text = model.config.text_config
    dims = dict(d=text.hidden_size, ffn=text.intermediate_size,
                kv=text.num_key_value_heads * (text.hidden_size // text.num_attention_heads))
    runner = compiled_runner(model, args)
    methods = args.methods.split(",") if args.methods else [m for m in METHODS if m != "random"]
    budgets = [int(b) for b in args.budgets.split(",")]
    configs = budget_configs(methods, budgets)

    mode = f"torch.compile (mode {args.compile}), one config after another" if args.compile else "eager"
    title = (f"Prefill, testbed-lm (shipped weights), {depth} decoder layers, float32, {mode}, batch {args.batch} x "
             "{total} tokens ({visual} visual), vision tower included")
    note = ("Budgets b/576: the fraction of the sample's visual tokens the published LLaVA-1.5 budget b keeps (of 144 "
            "here). FLOP ratios from the tokens each decoder layer really processed (scoring and vision tower not "
            "counted). Visual per layer: visual tokens averaged over the decoder layers.")
    time_and_report(model, runner, inputs, configs, args, on_gpu, depth, visual, dims, title, note)


class FastVRecomputedKeys(FastV):
    """FastV scoring with keys recomputed from the scoring layer's input (vtprune before it reused the keys
    the layer projects anyway): the cost the reuse removes."""

    def select(self, ctx):
        ctx.inputs[ctx.stage.score_layer].projected_keys = None
        return super().select(ctx)


def print_table(title: str, columns, cells) -> None:
    """The right-aligned rich table of a run (cells: rows of strings), at least 120 columns wide."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=None, help="decoder depth (default 4 on CPU, 32 on GPU)")
    parser.add_argument("--qwen-grid", type=int, default=48, help="qwen2.5-vl-7b: the image's patch-grid side, even "
                        "(48: a 672x672 image, 576 visual tokens; 64: 896x896, 1,024)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="identical prompts per prefill")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU only, with --threads 1: time by the process's CPU time (time.process_time) instead "
                             "of wall time, so that other processes on a shared machine do not count")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    parser.add_argument("--model-shape", default="llava-1.5-7b", choices=["llava-1.5-7b", *SHAPES, "testbed-lm"],
                        help="the model whose real shapes are timed (default LLaVA-1.5-7B); testbed-lm: the shipped "
                        "model itself, real weights, on a held-out test question")
    parser.add_argument("--methods", default=None,
                        help="registered methods to time (default: all but random; fastv,pdrop for other shapes)")
    parser.add_argument("--budgets", default="192,128,64", help="budgets (visual tokens of 576, as the papers count)")
    parser.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                        help="time torch.compile(model, mode=...) (round 0 compiles every config)")
    parser.add_argument("--decode", type=int, default=0,
                        help="also time N generated tokens per config and report the KV-cache bytes after prefill")
    parser.add_argument("--plain", action="store_true",
                        help="LLaVA-1.5 shape: only the plain rows (no debias rows, no recomputed keys)")
    parser.add_argument("--with-vision", action="store_true",
                        help="time the vision tower too in every row (needed for vision-side methods)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if args.device != "cpu" or torch.get_num_threads() != 1:
            parser.error("--cpu-time times one CPU thread: use it with --device cpu --threads 1")
        global _CLOCK
        _CLOCK = time.process_time
    if args.model_shape == "testbed-lm":
        return main_testbed_lm(args)
    if args.model_shape != "llava-1.5-7b":
        if args.with_vision:
            parser.error("--with-vision applies to the LLaVA-1.5 shape only (vision-side methods are refused on the others)")
        return main_shape(args)
    if args.methods is None:
        args.methods = ",".join(m for m in METHODS if m != "random")
    on_gpu = args.device.startswith("cuda")
    depth = args.layers or (32 if on_gpu else 4)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)

    needs_vision = any(METHODS[name]().vision_layers() for name in args.methods.split(","))
    with_vision = args.with_vision or needs_vision
    model = build_model(depth, dtype, args.device, vision_layers=(24 if on_gpu else 2) if with_vision else 2)
    ids = prompt_ids().to(args.device).expand(args.batch, -1).contiguous()
    pixel_values = torch.randn(args.batch, 3, 336, 336, dtype=dtype, device=args.device)
    processor = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    image_size = (640, 427)  # a typical landscape photo: 4 of 24 rows at the top and bottom are padding
    if with_vision:  # every row runs the vision tower (vision-side methods read it)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values)
    else:
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_encoder_outputs={"image": features})

    runner = compiled_runner(model, args)

    def run_once(press=None, **press_kwargs) -> float:
        with torch.no_grad():
            if press is None:
                start = _now(on_gpu)
                runner(**inputs, logits_to_keep=1)
            else:
                with press(model, **press_kwargs):
                    start = _now(on_gpu)
                    runner(**inputs, logits_to_keep=1)
            return _now(on_gpu) - start

    budgets = [int(b) for b in args.budgets.split(",")]
    geometry = {"processor": processor, "image_sizes": [image_size] * args.batch}
    # (label, press or None, press kwargs, baseline label for the debias overhead)
    configs = [("unpruned", None, {}, None)]
    for budget in budgets:
        for name in args.methods.split(","):
            cls = METHODS[name]
            label = f"{cls.__name__} {budget}"
            configs.append((label, cls(budget=budget), {}, None))
            if cls.query is None or args.plain:
                continue  # ranks without attention: nothing to debias
            profile = f"llava-1.5-7b/{cls.profile_name or cls.name}"
            if profile not in {p.name for p in builtin_profiles()} | set(builtin_aliases()):
                profile = None  # no published profile (iLLaVA, the vision-side methods): padding only
            configs.append((f"{label} + debias", cls(budget=budget, debias=Debias(profile=profile, padding=True)),
                            geometry, label))
            if name == "fastv":
                configs.append((f"{label} + auto debias", cls(budget=budget, debias=Debias(profile="auto", padding=True)),
                                geometry, label))
                configs.append((f"{label}, keys recomputed", FastVRecomputedKeys(budget=budget), {}, label))
        configs.append((f"Random {budget}", METHODS["random"](budget=budget), {}, None))
    times = time_configs(model, inputs, [(label, press, kwargs) for label, press, kwargs, _ in configs], args, on_gpu,
                         run_once)
    median = {label: statistics.median(values) for label, values in times.items()}

    total = ids.shape[1]
    base = median["unpruned"]
    rows = []
    for label, press, _, baseline in configs:
        kept = NUM_VISUAL if press is None else len(press.last_selection[-1].kept[0]) + press.last_selection[-1].extra[0]
        equivalent = NUM_VISUAL if press is None else sum(tokens_per_layer(press, total, depth)) / depth - (total - NUM_VISUAL)
        overhead = (median[label] - median[baseline]) / median[baseline] * 100 if baseline else None
        predicted = 1.0 if press is None else predicted_ratio(press, total, depth)
        rows.append((label, kept, equivalent, median[label], overhead, median[label] / base, predicted))

    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads{_clock_name()}"
    vision_note = f", vision tower included ({len(model.model.vision_tower.encoder.layers)} layers)" if with_vision else ""
    title = (f"Prefill, LLaVA-1.5-7B shape{vision_note}, {depth} decoder layers, {str(dtype).split('.')[-1]}, batch {args.batch} x {total} tokens, "
             f"{device_name}, median of {args.repeats} "
             f"{'rounds, compiled per config' if args.compile else 'interleaved rounds'}")
    columns = ("config", "visual kept (last stage)", "visual per layer", "prefill ms", "time ratio", "FLOP ratio",
               "overhead vs plain")
    cells = [
        (name, str(kept), f"{equivalent:.0f}", f"{seconds * 1e3:.1f}", f"{ratio:.3f}", f"{predicted:.3f}",
         "" if overhead is None else f"{overhead:+.1f}%")
        for name, kept, equivalent, seconds, overhead, ratio, predicted in rows
    ]
    print_table(title, columns, cells)
    if args.decode:
        decode_table(model, runner, inputs, [c for c in configs if "debias" not in c[0] and "recomputed" not in c[0]],
                     args.decode, on_gpu, f"Decode after the prefill, {title}")
    note = ("debias: padding (image 640x427, pad-to-square: 192 of 576 tokens are padding) + the method's published "
            "positional profile (llava-1.5-7b/<method>; padding only for methods without one); auto debias: padding + the per-request robust fit. FastV's "
            "padding debiasing lowers its kept count to the real tokens when fewer; FLOP ratios use the tokens each "
            "layer really processed. Overhead: against the same method and budget without debiasing (or, for "
            "'keys recomputed', against FastV reusing the scoring layer's keys). Visual per layer: visual tokens "
            "averaged over the decoder layers.")
    print(note)
    if args.markdown:
        lines = [f"{title}.", "", "| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        lines += ["", note]
        with open(args.markdown, "w") as handle:
            handle.write("\n".join(lines) + "\n")


def time_configs(model, inputs, configs, args, on_gpu: bool, run_once) -> dict[str, list[float]]:
    """Prefill seconds per config label: eager in interleaved rounds (round 0 warms up; slow drift of the machine
    affects every config alike); compiled one config after another, each press attached before its own fresh
    compile (dynamo does not guard on module hooks: a graph traced without a press's hooks would ignore them),
    round 0 compiling."""
    times: dict[str, list[float]] = {label: [] for label, *_ in configs}
    if not args.compile:
        for round_index in range(args.repeats + 1):
            for label, press, kwargs in configs:
                elapsed = run_once(press, **kwargs)
                if round_index:
                    times[label].append(elapsed)
        return times
    for label, press, kwargs in configs:
        torch._dynamo.reset()
        compiled = torch.compile(model, mode=None if args.compile == "default" else args.compile)
        with torch.no_grad(), warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if press is not None:
                stack.enter_context(press(model, **kwargs))
            for round_index in range(args.repeats + 1):
                start = _now(on_gpu)
                compiled(**inputs, logits_to_keep=1)
                if round_index:
                    times[label].append(_now(on_gpu) - start)
                else:
                    compile_seconds = _now(on_gpu) - start
        # progress (a compiled table takes minutes per config on a CPU), so a cut-short run still says something
        print(f"{label}: compiled in {compile_seconds:.0f} s, median {statistics.median(times[label]) * 1e3:.1f} ms",
              file=sys.stderr, flush=True)
    return times


def budget_configs(methods: list[str], budgets: list[int]) -> list[tuple[str, object]]:
    """The unpruned row, then each method at each published LLaVA-1.5 budget b (of 576), as (label, press)."""
    configs: list[tuple[str, object]] = [("unpruned", None)]
    for budget in budgets:
        for name in methods:
            cls = METHODS[name]
            configs.append((f"{cls.__name__} {budget}/576", cls(budget=budget / 576)))
    return configs


def compiled_runner(model, args):
    """The model, or torch.compile(model, mode=args.compile) (a press attaches to the model either way)."""
    if not args.compile:
        return model
    return torch.compile(model, mode=None if args.compile == "default" else args.compile)


def decode_table(model, runner, inputs, configs, tokens: int, on_gpu: bool, title: str) -> None:
    """KV-cache bytes after the prefill and decode ms per token over `tokens` generated tokens, per config."""
    cells = []
    for label, press, kwargs, *_ in configs:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = press(model, **kwargs) if press is not None else None
            if session is not None:
                session.__enter__()
            try:
                out = runner(**inputs, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
                options = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                runner.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm up
                start = _now(on_gpu)
                runner.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                prefill = _now(on_gpu) - start
                start = _now(on_gpu)
                runner.generate(**inputs, **options)
                total = _now(on_gpu) - start
            finally:
                if session is not None:
                    session.__exit__(None, None, None)
        cells.append((label, f"{kv_bytes / 2**20:.1f}", f"{(total - prefill) / (tokens - 1) * 1e3:.2f}"))
    print_table(title, ("config", "KV cache after prefill (MiB)", f"decode ms/token ({tokens} tokens)"), cells)


#: the clock timings read: wall time, or the process's CPU time (--cpu-time)
_CLOCK = time.perf_counter


def _clock_name() -> str:
    return ", the process's CPU time" if _CLOCK is time.process_time else ""


def _now(on_gpu: bool) -> float:
    if on_gpu:
        torch.cuda.synchronize()
    return _CLOCK()


if __name__ == "__main__":
    main()
