"""vLLM's LLaVA-1.5 with vtprune's before-the-language-model pruning (FasterVLM, VisionZip, DivPrune, Random).

Two pieces, registered together for the architecture `VtpruneLlavaForConditionalGeneration`:

* the processor side (`VtpruneLlavaProcessingInfo`, `VtpruneLlavaMultiModalProcessor`) puts K placeholders per
  image into the prompt instead of the tower's P patches, and adds two per-image fields to the request: the
  padded share of every patch (`vtprune.adapters.geometry.padded_fraction` from the image's original size and the HF
  processor's geometry) and the placeholder count K it used;
* the model side (`VtpruneLlavaForConditionalGeneration`) runs the tower, reads the [CLS] attention of the
  chosen vision layer from that layer's fused q/k/v projection (a forward hook), ranks and selects with
  `vtprune.core.selection`, and returns K embeddings per image. It refuses a request whose placeholder count is
  not the number of embeddings it returns (vLLM itself would silently use the first ones).

Everything is batched over the images of an encoder call (no loop over images).
"""

from __future__ import annotations

from functools import cached_property

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems

from ..adapters.geometry import geometry_from_processor, padded_fraction
from ..core.selection import max_min_select, rank_order, visionzip_select
from .options import PluginOptions, cls_attention, head_mean_keys, random_scores

ARCHITECTURE = "VtpruneLlavaForConditionalGeneration"
PADDING_FIELD = "vtprune_padding"
TOKENS_FIELD = "vtprune_tokens"


class VtpruneLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with K placeholders per image (K from the options and the tower's patch count)."""

    @cached_property
    def options(self) -> PluginOptions:
        return PluginOptions.from_config(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        patches = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.options.tokens_per_image(patches)

    @cached_property
    def geometry(self):
        """The HF processor's `ImageGeometry` (pad to square, resize, crop) for the tower's input and patches."""
        vision = self.get_hf_config().vision_config
        return geometry_from_processor(
            self.get_hf_processor().image_processor, patch_size=vision.patch_size, image_size=vision.image_size
        )


class VtpruneLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """LLaVA's multimodal processor, adding per image its patches' padded shares and its placeholder count."""

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[PADDING_FIELD] = MultiModalFieldConfig.batched("image")
        fields[TOKENS_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if "pixel_values" not in processed:
            return processed
        images = mm_items.get_items("image", ImageProcessorItems)
        sizes = [images.get_image_size(i) for i in range(images.get_count())]
        options = self.info.options
        vision = self.info.get_hf_config().vision_config
        side = vision.image_size // vision.patch_size
        if options.uses_cls and options.debias_padding:
            geometry = self.info.geometry
            padding = torch.stack([padded_fraction(geometry, (s.width, s.height)).reshape(-1) for s in sizes])
        else:
            padding = torch.zeros(len(sizes), side * side)
        processed[PADDING_FIELD] = padding
        processed[TOKENS_FIELD] = torch.tensor(
            [self.info.get_num_image_tokens(image_width=s.width, image_height=s.height) for s in sizes]
        )
        return processed


def check_counts(embeddings: torch.Tensor, placeholders: torch.Tensor) -> None:
    """Refuse a batch of images whose placeholder counts (N,) are not the rows of their embeddings (N, K, D)."""
    counts = placeholders.reshape(-1).tolist()
    if len(counts) != embeddings.shape[0] or any(count != embeddings.shape[1] for count in counts):
        raise ValueError(
            f"vtprune: the prompt holds {counts} image placeholders but the pruned model returns "
            f"{embeddings.shape[1]} embeddings for each of {embeddings.shape[0]} image(s); vLLM would silently use "
            "the first ones. The processor and the model must read the same vtprune options: serve the model "
            f'with hf_overrides {{"architectures": ["{ARCHITECTURE}"], "vtprune": {{...}}}} and restart it '
            "after changing them."
        )


@MULTIMODAL_REGISTRY.register_processor(
    VtpruneLlavaMultiModalProcessor, info=VtpruneLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VtpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA returning K pruned embeddings per image (see the module docstring); options in
    `config.vtprune` (`PluginOptions`)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = PluginOptions.from_config(self.config)
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError("vtprune: vision_feature_select_strategy must be 'default' (LLaVA-1.5: [CLS] dropped)")
        layers = self.vision_tower.vision_model.encoder.layers
        total = self.config.vision_config.num_hidden_layers
        index = self.vtprune.vision_layer + total if self.vtprune.vision_layer < 0 else self.vtprune.vision_layer
        if self.vtprune.uses_cls and not 0 <= index < len(layers):
            raise ValueError(
                f"vtprune: vision_layer={self.vtprune.vision_layer} is not one of the {len(layers)} "
                f"vision layers this model runs (of {total})"
            )
        self._score_layer = layers[index] if self.vtprune.uses_cls else None

    def embed_multimodal(self, **kwargs):
        padding = kwargs.pop(PADDING_FIELD, None)
        placeholders = kwargs.pop(TOKENS_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaImageEmbeddingInputs):  # given embeddings: their own count, unpruned
            return image_input["data"]
        if placeholders is None:
            raise ValueError(
                f"vtprune: the request carries no '{TOKENS_FIELD}': its image placeholders were not "
                f'made by vtprune\'s processor (serve with architectures ["{ARCHITECTURE}"])'
            )
        embeddings = self._process_image_input(image_input, _stacked(padding))
        check_counts(embeddings, _stacked(placeholders))
        return embeddings

    def _process_image_input(self, image_input, padding: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K, D) language-model embeddings of the N images, K kept per image."""
        captured: dict = {}
        hooks = []
        if self._score_layer is not None:
            hooks.append(
                self._score_layer.self_attn.qkv_proj.register_forward_hook(
                    lambda module, args, output: captured.__setitem__("qkv", output[0])
                )
            )
            hooks.append(
                self._score_layer.register_forward_hook(
                    lambda module, args, output: captured.__setitem__("output", output)
                )
            )
        try:
            features = self._process_image_pixels(image_input)  # (N, P, D_vision), [CLS] dropped
        finally:
            for hook in hooks:
                hook.remove()
        embeddings = self.multi_modal_projector(features)  # (N, P, D)
        return prune(
            self.vtprune,
            embeddings,
            features,
            captured,
            padding,
            num_heads=self.config.vision_config.num_attention_heads,
            project=self.multi_modal_projector,
        )


def _stacked(value) -> torch.Tensor | None:
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.stack(list(value))


def prune(
    options: PluginOptions,
    embeddings: torch.Tensor,
    features: torch.Tensor,
    captured: dict,
    padding: torch.Tensor | None,
    *,
    num_heads: int,
    project,
) -> torch.Tensor:
    """The kept embeddings (N, K, D) of N images: embeddings (N, P, D) projected, features (N, P, D_vision) the
    tower's output, captured["qkv"] (N, 1 + P, 3 D_vision) / captured["output"] (N, 1 + P, D_vision) the scoring
    layer's fused projection and output, padding (N, P) the patches' padded shares."""
    images, patches, _width = embeddings.shape
    device = embeddings.device
    valid = torch.ones(images, patches, dtype=torch.bool, device=device)
    if options.method == "none":
        return embeddings
    keep = options.tokens_per_image(patches)
    is_padding = share = None
    if options.uses_cls and options.debias_padding and padding is not None:
        share = padding.to(device=device, dtype=torch.float32)
        is_padding = share > options.padding_threshold
    if options.method == "divprune":
        indices, _ = max_min_select(embeddings, valid, keep)
        return _gather(embeddings, indices)
    if options.method == "random":
        order = rank_order(random_scores(images, patches, options.seed, device), valid)
        return _gather(embeddings, torch.sort(order[:, :keep], dim=1).values)
    scores = cls_attention(captured["qkv"], num_heads)  # (N, P)
    if is_padding is not None:  # Debias(padding=True): padding patches score 0 and rank after every real one
        scores = scores.masked_fill(is_padding, 0.0)
    if options.method == "fastervlm":
        order = rank_order(scores, valid, is_padding, share)
        return _gather(embeddings, torch.sort(order[:, :keep], dim=1).values)
    # visionzip: [CLS], the dominant patches in order, the merged contextual tokens (the press's order)
    dominant_count, contextual_count = options.split(patches)
    output = captured["output"]  # (N, 1 + P, D_vision) the scoring layer's output
    keys = head_mean_keys(captured["qkv"], num_heads)[:, 1:]
    dominant, _, _, merged, _ = visionzip_select(
        scores,
        valid,
        keys,
        output[:, 1:],
        dominant_count,
        contextual_count,
        dominant_count,
        contextual_count,
        is_padding,
        share,
    )
    parts = [project(output[:, :1]), _gather(embeddings, dominant)]
    if contextual_count:
        parts.append(project(merged))
    return torch.cat(parts, dim=1)


def _gather(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """values (N, P, D) at indices (N, K) -> (N, K, D)."""
    return torch.gather(values, 1, indices[:, :, None].expand(-1, -1, values.shape[-1]))


__all__ = [
    "ARCHITECTURE",
    "VtpruneLlavaForConditionalGeneration",
    "VtpruneLlavaMultiModalProcessor",
    "VtpruneLlavaProcessingInfo",
    "check_counts",
    "prune",
]
