"""Tiny random-config models of the non-LLaVA-1.5 families and their inputs, built offline.

Processors of families with a video slot cannot be constructed without torchvision (see
/work/shared/ENVIRONMENT.md), so prompts are assembled here the way the processors do it: the image processor
(PIL class) gives pixel values and grids, the placeholder is expanded to the model's token count by hand.
"""

from __future__ import annotations

import torch
from conftest import build_tokenizer, make_image  # noqa: F401  (re-exported for the tests)

WORDS = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]


def sharpen(layers) -> None:
    """Random init gives near-uniform attention; sharpen q/k so scores and selections are distinctive."""
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)


# --- Qwen2.5-VL ---------------------------------------------------------------------------------------------
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END, QWEN_PAD = 150, 151, 152, 153, 0


def build_qwen2_5_vl(attn: str = "sdpa", layers: int = 4, seed: int = 0, sliding: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=QWEN_PAD, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    if sliding:  # alternate full and sliding-window layers: two attention masks
        text.update(use_sliding_window=True, sliding_window=12, max_window_layers=layers,
                    layer_types=["full_attention", "sliding_attention"] * (layers // 2))
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END, pad_token_id=QWEN_PAD, bos_token_id=1, eos_token_id=2,
    )
    config.text_config.bos_token_id, config.text_config.eos_token_id = 1, 2
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    sharpen(model.model.language_model.layers)
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = QWEN_PAD
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = 1
    return model.eval()


def qwen_image_processor(patch: int = 14):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = 2 * patch
    return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2,
                                    size={"shortest_edge": unit * unit * 12, "longest_edge": unit * unit * 30})


def qwen_inputs(samples, *, seed: int = 0, patch: int = 14, timestamps: bool = False) -> dict:
    """Left-padded inputs for samples [(images, videos, question_ids)], images as PIL images, videos as
    (t, h, w) patch grids (random patches; t temporal groups of 2 frames). Text before the visual tokens, the
    question after; the last token is a fixed "assistant" word. `patch`: 14 (Qwen2/2.5-VL) or 16 (Qwen3-VL);
    `timestamps`: each video frame in its own start/end run after a timestamp word (Qwen3-VL's video prompt)."""
    processor = qwen_image_processor(patch)
    rows, pixel_values, image_grids, video_values, video_grids = [], [], [], [], []
    generator = torch.Generator().manual_seed(seed)
    for images, videos, question in samples:
        row = [1, 30, 31]
        if images:
            out = processor(images=images, return_tensors="pt")
            pixel_values.append(out["pixel_values"])
            for t, h, w in out["image_grid_thw"].tolist():
                image_grids.append([t, h, w])
                row += [QWEN_START] + [QWEN_IMAGE] * (t * h * w // 4) + [QWEN_END]
        for t, h, w in videos:
            video_grids.append([t, h, w])
            video_values.append(torch.randn(t * h * w, 3 * 2 * patch * patch, generator=generator))
            if timestamps:
                for frame in range(t):
                    row += [60 + frame, 61] + [QWEN_START] + [QWEN_VIDEO] * (h * w // 4) + [QWEN_END]
            else:
                row += [QWEN_START] + [QWEN_VIDEO] * (t * h * w // 4) + [QWEN_END]
        rows.append(row + list(question) + [40, 41])
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[QWEN_PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == QWEN_IMAGE] = 1
    types[input_ids == QWEN_VIDEO] = 2
    inputs = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types}
    if pixel_values:
        inputs["pixel_values"] = torch.cat(pixel_values)
        inputs["image_grid_thw"] = torch.tensor(image_grids)
    if video_values:
        inputs["pixel_values_videos"] = torch.cat(video_values)
        inputs["video_grid_thw"] = torch.tensor(video_grids)
    return inputs


def select(inputs: dict, b: int) -> dict:
    """Sample b of a batch built by `qwen_inputs`, without its batch padding."""
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b : b + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for key, grid, token in (("pixel_values", "image_grid_thw", QWEN_IMAGE), ("pixel_values_videos", "video_grid_thw", QWEN_VIDEO)):
        if key not in inputs:
            continue
        sizes = inputs[grid].prod(dim=1).tolist()
        tokens = (inputs["input_ids"] == token).sum(dim=1).tolist()
        # images of earlier samples come first
        before = sum(tokens[:b]) * 4
        mine = tokens[b] * 4
        start = 0
        first = None
        for i, size in enumerate(sizes):
            if start == before and first is None:
                first = i
            start += size
        if mine == 0:
            continue
        count, total, last = 0, 0, first
        while total < mine:
            total += sizes[last]
            last += 1
        offset = sum(sizes[:first])
        out[key] = inputs[key][offset : offset + total]
        out[grid] = inputs[grid][first:last]
    return out


def build_qwen3_vl(attn: str = "sdpa", layers: int = 4, seed: int = 0, deepstack: int = 3):
    """A tiny Qwen3-VL: 16-px patches, interleaved mRoPE, q/k norms, `deepstack` vision layers whose features are
    added after the first `deepstack` decoder layers (made large enough to change the decoder's output)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, pad_token_id=QWEN_PAD, bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(depth=deepstack + 1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=list(range(deepstack))),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END, pad_token_id=QWEN_PAD, bos_token_id=1, eos_token_id=2,
    )
    config.text_config.bos_token_id, config.text_config.eos_token_id = 1, 2
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    sharpen(model.model.language_model.layers)
    with torch.no_grad():  # deepstack mergers large enough that their features matter
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.mul_(4.0)
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = QWEN_PAD
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = 1
    return model.eval()


QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_qwen2_5_vl_checkpoint(path, version: str = "2.5") -> None:
    """A directory laid out like a hub Qwen2.5-VL (version "2.5") or Qwen3-VL ("3") checkpoint (model, tokenizer
    with the Qwen special tokens, image processor, processor_config.json, chat template), written without building
    the full processor (which needs torchvision here)."""
    import json

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    model = build_qwen2_5_vl() if version == "2.5" else build_qwen3_vl()
    cls = type(model)
    config = model.config
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = cls(config).eval()
    sharpen(model.model.language_model.layers)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    qwen_image_processor(14 if version == "2.5" else 16).save_pretrained(path)
    processor_class = "Qwen2_5_VLProcessor" if version == "2.5" else "Qwen3VLProcessor"
    (path / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}))
    (path / "chat_template.jinja").write_text(QWEN_TEMPLATE)


# --- LLaVA-NeXT ---------------------------------------------------------------------------------------------
NEXT_TILE = 56  # 4x4 tokens per tile of 14-px patches
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168]]


def build_llava_next_processor():
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": NEXT_TILE}, crop_size={"height": NEXT_TILE, "width": NEXT_TILE},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_llava_next(processor, attn: str = "sdpa", layers: int = 4, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(image_size=NEXT_TILE, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=NEXT_PINPOINTS)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():  # a distinctive newline vector (random init leaves it at zero)
        model.model.image_newline.normal_()
    sharpen(model.model.language_model.layers)
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None
    return model.eval()


# --- Video-LLaVA --------------------------------------------------------------------------------------------
VL_PX = 56  # 4x4 patches per image or frame


def build_video_llava(attn: str = "sdpa", layers: int = 4, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=VL_PX, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    text = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_id=150, video_token_id=151,
                              vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config)
    sharpen(model.model.language_model.layers)
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def video_llava_inputs(samples, seed: int = 0) -> dict:
    """samples: [(number of images, number of frames (0: no video), question ids)]; random pixels; left-padded.
    As the processor does: each <image> is 16 tokens, a video of F frames F x 17 (the frame [CLS] kept)."""
    generator = torch.Generator().manual_seed(seed)
    rows, images, videos = [], [], []
    for count, frames, question in samples:
        row = [1, 30, 31]
        for _ in range(count):
            images.append(torch.randn(3, VL_PX, VL_PX, generator=generator))
            row += [150] * 16 + [32]
        if frames:
            videos.append(torch.randn(frames, 3, VL_PX, VL_PX, generator=generator))
            row += [151] * (17 * frames) + [33]
        rows.append(row + list(question) + [40, 41])
    width = max(len(r) for r in rows)
    out = {"input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
           "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}
    if images:
        out["pixel_values_images"] = torch.stack(images)
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)
    return out


def save_video_llava_checkpoint(path) -> None:
    """A directory laid out like a hub Video-LLaVA checkpoint (model, tokenizer with <image>/<video>, image
    processor, processor_config.json, chat template), written without building the full processor (its video
    slot needs torchvision here)."""
    import json

    from transformers import VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    config = build_video_llava().config
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = VideoLlavaForConditionalGeneration(config).eval()
    sharpen(model.model.language_model.layers)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    VideoLlavaImageProcessor(size={"shortest_edge": VL_PX}, crop_size={"height": VL_PX, "width": VL_PX}).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "VideoLlavaProcessor", "patch_size": 14, "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1}))
    (path / "chat_template.jinja").write_text(
        "{% for message in messages %}{{ message['role'] }}: {% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %} "
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


# --- LLaVA-OneVision ----------------------------------------------------------------------------------------
OV_PX = 56  # 4x4 SigLIP patches per tile (no [CLS]); frames pooled to 2x2
OV_PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 168]]
OV_IMAGE, OV_VIDEO = 150, 151


def build_llava_onevision(attn: str = "sdpa", layers: int = 4, seed: int = 0, max_patches: int = 2):
    """A tiny LLaVA-OneVision: SigLIP tower ("full" features), Qwen2 decoder, anyres_max_`max_patches`."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(image_size=OV_PX, patch_size=14, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4)
    text = Qwen2Config(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=OV_IMAGE,
                                  video_token_id=OV_VIDEO, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=OV_PINPOINTS,
                                  vision_aspect_ratio=f"anyres_max_{max_patches}")
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    sharpen(model.model.language_model.layers)
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def onevision_image_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(size={"height": OV_PX, "width": OV_PX}, image_grid_pinpoints=OV_PINPOINTS)


def onevision_inputs(model, samples, seed: int = 0) -> dict:
    """Left-padded inputs for samples [(images, frames (0: no video), question ids)], as the processor lays them
    out (one image per sample: tiled; each image's token count read from the model's own encoded features, so not
    from vtprune's arithmetic); videos: random frames, F x 4 pooled tokens + 1 newline."""
    processor = onevision_image_processor()
    generator = torch.Generator().manual_seed(seed)
    rows, pixel_values, sizes, videos = [], [], [], []
    for images, frames, question in samples:
        row = [1, 30, 31]
        for image in images:
            out = processor(images=[image], return_tensors="pt")
            with torch.no_grad():
                count = model.model.get_image_features(out["pixel_values"], out["image_sizes"]).pooler_output[0].shape[0]
            pixel_values.append(out["pixel_values"][0])
            sizes.append(out["image_sizes"][0])
            row += [OV_IMAGE] * count + [32]
        if frames:
            videos.append(torch.randn(frames, 3, OV_PX, OV_PX, generator=generator))
            row += [OV_VIDEO] * (frames * 4 + 1) + [33]
        rows.append(row + list(question) + [40, 41])
    width = max(len(r) for r in rows)
    out = {"input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
           "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}
    if pixel_values:
        patches = max(p.shape[0] for p in pixel_values)
        out["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros(patches - p.shape[0], *p.shape[1:])]) for p in pixel_values])
        out["image_sizes"] = torch.stack(sizes)
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)
    return out


def save_llava_onevision_checkpoint(path) -> None:
    """A directory laid out like a hub LLaVA-OneVision checkpoint (model, tokenizer with <image>/<video>, image
    processor, processor_config.json, chat template), written without building the full processor (its video
    slot needs torchvision here)."""
    import json

    from transformers import LlavaOnevisionForConditionalGeneration

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    model = build_llava_onevision()
    config = model.config
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    sharpen(model.model.language_model.layers)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    onevision_image_processor().save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": OV_PX // 14 * (OV_PX // 14),
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_2"}))
    (path / "chat_template.jinja").write_text(
        "{% for message in messages %}{{ message['role'] }}: {% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %} "
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
