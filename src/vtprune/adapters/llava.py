"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP tower, one fixed grid per image, Llama-style decoder."""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelAdapter, VisualLayout, VisualSegment


class LlavaAdapter(ModelAdapter):
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    def _read_patch_grid(self, config) -> None:
        """image_token_id (and video_token_id where the config has one), patch_size, image_size, and the square
        patch grid of one image: side, grid = (side, side). Shared by the LLaVA family's adapters."""
        vision = config.vision_config
        self.image_token_id = int(config.image_token_id)
        if getattr(config, "video_token_id", None) is not None:
            self.video_token_id = int(config.video_token_id)
        self.patch_size = int(vision.patch_size)
        self.image_size = int(vision.image_size)
        self.side = self.image_size // self.patch_size
        self.grid = (self.side, self.side)

    def __init__(self, model: nn.Module):
        super().__init__(model)  # self.base: the LlavaModel
        config = self.base.config
        self._read_patch_grid(config)
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} keeps the CLS token "
                "among the visual tokens, which has no place on the patch grid; vtprune supports 'default' "
                "(the LLaVA-1.5 setting)."
            )
        if not isinstance(config.vision_feature_layer, int):
            pass  # several feature layers are concatenated along channels: same tokens, same grid
        self.tokens_per_image = self.side * self.side
        self.rotary_fn = _rotary_fn_for(self.base.language_model)

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        return self.base.multi_modal_projector(features)

    @property
    def vision_tower(self) -> nn.Module:
        return self.base.vision_tower

    @property
    def vision_feature_layer(self) -> int:
        layer = self.base.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("the model concatenates several vision layers' features: vision stages do not apply")
        # hidden_states[i] is the output of layer i - 1 (index 0: the embeddings)
        return (layer + len(self.vision_layers) + 1 if layer < 0 else layer) - 1

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower = self.base.vision_tower
        encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
        if encoder is None or not hasattr(encoder, "layers"):
            raise ValueError(f"cannot find the encoder layers of the vision tower {type(tower).__name__}")
        return encoder.layers

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict | None = None) -> VisualLayout:
        is_image = input_ids == self.image_token_id  # (B, N)
        # the count, and where it is first reached: the last visual token
        count, last = is_image.cumsum(dim=1).max(dim=1)
        counts = self.read(count, last_visual=last, length=input_ids.shape[1])  # one synchronisation for the batch
        segments = []
        image_index = 0
        for b, count in enumerate(counts):
            if count % self.tokens_per_image:
                raise ValueError(
                    f"sample {b} has {count} image tokens (id {self.image_token_id}), not a multiple of "
                    f"{self.tokens_per_image} tokens per image ({self.grid[0]}x{self.grid[1]} grid): build the "
                    "prompt with the model's processor so that each <image> is expanded to its full grid."
                )
            sample_segments = []
            for k in range(count // self.tokens_per_image):
                sample_segments.append(
                    VisualSegment(
                        offset=k * self.tokens_per_image,
                        length=self.tokens_per_image,
                        grid=self.grid,
                        image_index=image_index,
                    )
                )
                image_index += 1
            segments.append(sample_segments)
        return VisualLayout(segments=segments, mask=is_image, counts=counts)

    def image_geometry(self, processor):
        """The `ImageGeometry` of `processor` for this model's vision tower (checked against its grid)."""
        from .geometry import geometry_from_processor

        geometry = geometry_from_processor(processor, patch_size=self.patch_size, image_size=self.image_size)
        if tuple(geometry.grid) != self.grid:
            raise ValueError(
                f"the processor's geometry gives a {geometry.grid} patch grid but the model has {self.grid}: "
                "pass the processor that belongs to this model."
            )
        return geometry

    def padding_fractions(self, layout: VisualLayout, image_sizes, processor) -> list[torch.Tensor]:
        from .geometry import padded_fraction

        geometry = self.image_geometry(processor)
        out = []
        for sample_segments in layout.segments:
            parts = [
                padded_fraction(geometry, tuple(image_sizes[seg.image_index])).reshape(-1) for seg in sample_segments
            ]
            out.append(torch.cat(parts) if parts else torch.zeros(0))
        return out


def _rotary_fn_for(language_model: nn.Module):
    """The RoPE function of the decoder's own modeling file (Llama, Mistral, Qwen2, ...)."""
    import importlib

    module = importlib.import_module(type(language_model).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(
            f"cannot find apply_rotary_pos_emb in {module.__name__}: the decoder {type(language_model).__name__} "
            "does not use standard RoPE, which vtprune's scoring needs."
        )
    return fn
