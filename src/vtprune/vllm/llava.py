"""vLLM's LLaVA-1.5 with vtprune's before-the-language-model pruning (FasterVLM, VisionZip, DivPrune, Random).

Two pieces, registered together for the architecture `VtpruneLlavaForConditionalGeneration`:

* the processor side (`VtpruneLlavaProcessingInfo`, `VtpruneLlavaMultiModalProcessor`) reads the request's options
  (the model's, overridden by the request's `mm_processor_kwargs={"vtprune": {...}}`), puts K placeholders per
  image into the prompt instead of the tower's P patches, and adds three fields to the request: per image the
  padded share of every patch (`vtprune.adapters.geometry.padded_fraction` from the image's original size and the HF
  processor's geometry) and the placeholder count K it used, and the options themselves (a field shared by the
  request's images: vLLM never batches images with different options into one encoder call);
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
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..adapters.geometry import geometry_from_processor, padded_fraction
from ..core.selection import max_min_select, rank_order, visionzip_select
from .common import VtpruneInfoMixin, VtpruneModelMixin, VtpruneProcessorMixin, check_counts
from .options import PluginOptions, cls_attention, head_mean_keys, random_scores

ARCHITECTURE = "VtpruneLlavaForConditionalGeneration"
PADDING_FIELD = "vtprune_padding"


class VtpruneLlavaProcessingInfo(VtpruneInfoMixin, LlavaProcessingInfo):
    """LLaVA's processing info with K placeholders per image (K from the options and the tower's patch count)."""

    architecture = ARCHITECTURE

    def get_num_image_tokens(self, *, image_width: int, image_height: int, options: PluginOptions | None = None) -> int:
        patches = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return (options or self.options).tokens_per_image(patches)

    @cached_property
    def geometry(self):
        """The HF processor's `ImageGeometry` (pad to square, resize, crop) for the tower's input and patches."""
        vision = self.get_hf_config().vision_config
        return geometry_from_processor(
            self.get_hf_processor().image_processor, patch_size=vision.patch_size, image_size=vision.image_size
        )


class VtpruneLlavaMultiModalProcessor(VtpruneProcessorMixin, LlavaMultiModalProcessor):
    """LLaVA's multimodal processor with the request's options (`VtpruneProcessorMixin`), adding per image its
    patches' padded shares."""

    image_fields = (PADDING_FIELD,)

    def _image_fields(self, sizes, options: PluginOptions) -> dict[str, torch.Tensor]:
        vision = self.info.get_hf_config().vision_config
        side = vision.image_size // vision.patch_size
        if options.uses_cls and options.debias_padding:
            geometry = self.info.geometry
            padding = torch.stack([padded_fraction(geometry, (s.width, s.height)).reshape(-1) for s in sizes])
        else:
            padding = torch.zeros(len(sizes), side * side)
        return {PADDING_FIELD: padding}


@MULTIMODAL_REGISTRY.register_processor(
    VtpruneLlavaMultiModalProcessor, info=VtpruneLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VtpruneLlavaForConditionalGeneration(VtpruneModelMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA returning K pruned embeddings per image (see the module docstring); options in
    `config.vtprune` (`PluginOptions`), per request in `mm_processor_kwargs["vtprune"]`."""

    architecture = ARCHITECTURE
    image_fields = (PADDING_FIELD,)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = PluginOptions.from_config(self.config)
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError("vtprune: vision_feature_select_strategy must be 'default' (LLaVA-1.5: [CLS] dropped)")
        self._score_layer = score_layer(self.vision_tower.vision_model.encoder.layers, self.config, self.vtprune)

    def _prune_images(self, image_input, options: PluginOptions, fields: dict) -> torch.Tensor:
        return self._process_image_input(image_input, fields[PADDING_FIELD], options)

    def _process_image_input(
        self, image_input, padding: torch.Tensor | None = None, options: PluginOptions | None = None
    ) -> torch.Tensor:
        """(N, K, D) language-model embeddings of the N images, K kept per image."""
        options = options or self.vtprune
        captured: dict = {}
        hooks = []
        if options.uses_cls:
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
            options,
            embeddings,
            features,
            captured,
            padding,
            num_heads=self.config.vision_config.num_attention_heads,
            project=self.multi_modal_projector,
        )


def score_layer(layers, config, options: PluginOptions):
    """The vision layer (of the `layers` vLLM runs) whose [CLS] attention ranks the patches."""
    total = config.vision_config.num_hidden_layers
    index = options.vision_layer + total if options.vision_layer < 0 else options.vision_layer
    if not 0 <= index < len(layers):
        raise ValueError(
            f"vtprune: vision_layer={options.vision_layer} is not one of the {len(layers)} vision layers this "
            f"model runs (of {total})"
        )
    return layers[index]


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
    "PADDING_FIELD",
    "VtpruneLlavaForConditionalGeneration",
    "VtpruneLlavaMultiModalProcessor",
    "VtpruneLlavaProcessingInfo",
    "check_counts",
    "prune",
]
