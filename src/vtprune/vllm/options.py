"""The plugin's options (read from the model config's `vtprune` entry, set with vLLM's `hf_overrides`) and the small
pure functions the pruned model needs besides `vtprune.core.selection` and `vtprune.adapters.geometry`. No vLLM import here.

    hf_overrides={"architectures": ["VtpruneLlavaForConditionalGeneration"],
                  "vtprune": {"method": "fastervlm", "keep": 36, "debias_padding": true}}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

import torch

from ..core.stages import resolve_keep, validate_keep

METHODS = ("fastervlm", "visionzip", "divprune", "random", "none")
#: the methods that rank by the vision tower's [CLS] attention (the only ones padding debiasing acts on)
CLS_METHODS = ("fastervlm", "visionzip")
#: the options a request may set in its multimodal processor kwargs, `{"vtprune": {...}}` (all but vision_layer:
#: the layer the model hooks is fixed when it loads)
REQUEST_OPTIONS = ("method", "keep", "dominant", "contextual", "debias_padding", "padding_threshold", "seed")
#: VisionZip's published split of each budget of 576 tokens: (dominant incl. [CLS], contextual)
VISIONZIP_SPLITS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}


@dataclass(frozen=True)
class PluginOptions:
    """method: fastervlm | visionzip | divprune | random | none (keep every token: the unpruned model).
    keep: visual tokens kept per image, a count (int) or a fraction (float in (0, 1]) of the image's tokens; for
        VisionZip the dominant patches, [CLS] and contextual tokens are counted apart (`dominant`, `contextual`).
    dominant, contextual: VisionZip's counts per image ([CLS] included in dominant, as the press counts it);
        default: `keep` split in VisionZip's published proportion 54:10 (its 64-token setting).
    debias_padding: rank patches that are mostly padding (more than padding_threshold of their pixels, from
        the image's original size and the processor's pad-to-square geometry) after every real one
        (FasterVLM, VisionZip: the [CLS] scores), as `vtprune.Debias(padding=True)` does.
    vision_layer: the vision-tower layer whose [CLS] attention ranks the patches (default -2, as the presses).
    seed: Random's seed."""

    method: str = "fastervlm"
    keep: int | float = 0.25
    dominant: int | None = None
    contextual: int | None = None
    debias_padding: bool = True
    padding_threshold: float = 0.5
    vision_layer: int = -2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"vtprune: method={self.method!r} is not one of {', '.join(METHODS)}")
        validate_keep(self.keep, "vtprune keep")
        for name in ("vision_layer", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"vtprune: {name}={value!r} must be an int")
        if not isinstance(self.debias_padding, bool):
            raise ValueError(f"vtprune: debias_padding={self.debias_padding!r} must be true or false")
        if (
            isinstance(self.padding_threshold, bool)
            or not isinstance(self.padding_threshold, (int, float))
            or math.isnan(self.padding_threshold)
            or not 0.0 <= self.padding_threshold < 1.0
        ):
            raise ValueError(f"vtprune: padding_threshold={self.padding_threshold!r} must lie in [0, 1)")
        if (self.dominant is None) != (self.contextual is None):
            raise ValueError("vtprune: give both dominant and contextual (VisionZip's counts per image), or neither")
        if self.dominant is not None:
            if self.method != "visionzip":
                raise ValueError(f"vtprune: dominant/contextual are VisionZip's options, not {self.method}'s")
            for name in ("dominant", "contextual"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"vtprune: {name}={value!r} must be a count >= 0")
            if self.dominant < 2:
                raise ValueError(f"vtprune: dominant={self.dominant} keeps no patch (it counts the [CLS] token)")

    @classmethod
    def from_config(cls, hf_config) -> PluginOptions:
        """The options in `hf_config.vtprune` (a dict; absent: the defaults); unknown keys are an error."""
        raw = getattr(hf_config, "vtprune", None) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"vtprune: hf_overrides 'vtprune' must be a JSON object, got {raw!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"vtprune: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**raw)

    def with_request(self, raw) -> PluginOptions:
        """These options overridden by a request's `mm_processor_kwargs["vtprune"]` (a dict; None: unchanged). A
        request that sets `keep` or another method drops the model's VisionZip counts (`dominant`, `contextual`)."""
        if raw is None:
            return self
        if not isinstance(raw, dict):
            raise ValueError(f"vtprune: the request's mm_processor_kwargs 'vtprune' must be a JSON object, got {raw!r}")
        refused = sorted(set(raw) - set(REQUEST_OPTIONS))
        if refused:
            raise ValueError(
                f"vtprune: option(s) {', '.join(refused)} cannot be set per request (per request: "
                f"{', '.join(REQUEST_OPTIONS)}; vision_layer only per model, in hf_overrides)"
            )
        merged = asdict(self)
        if "dominant" not in raw and ("keep" in raw or raw.get("method", self.method) != "visionzip"):
            merged.update(dominant=None, contextual=None)
        merged.update(raw)
        return PluginOptions(**merged)

    def encode(self) -> torch.Tensor:
        """The options as a (bytes,) uint8 tensor (JSON): how the processor hands a request's options to the model
        (a multimodal field; `decode` reads it back exactly)."""
        return torch.tensor(list(json.dumps(asdict(self), sort_keys=True).encode()), dtype=torch.uint8)

    @classmethod
    def decode(cls, encoded: torch.Tensor) -> PluginOptions:
        """The options `encode` wrote."""
        return cls(**json.loads(bytes(encoded.reshape(-1).tolist()).decode()))

    @property
    def uses_cls(self) -> bool:
        return self.method in CLS_METHODS

    def split(self, num_patches: int) -> tuple[int, int]:
        """VisionZip's (dominant patches, contextual tokens) for an image of `num_patches` ([CLS] not counted),
        clamped as `methods.visionzip.VisionZip.split` clamps them."""
        if self.dominant is not None:
            dominant, contextual = self.dominant, self.contextual
        else:
            total = resolve_keep(self.keep, num_patches, num_patches, warn=False)
            contextual = round(total * 10 / 64)
            dominant = total - contextual
        patches = max(1, min(num_patches, dominant - 1))
        return patches, max(0, min(contextual, num_patches - patches))

    def anyres_tokens_per_image(self, base: int, tiles: int, rows: int) -> int:
        """The embeddings one LLaVA-NeXT image gets: `base` tokens of the base image, `tiles` of the unpadded anyres
        grid, `rows` newline tokens (always kept: vtprune's LLaVA-NeXT adapter never ranks them). DivPrune keeps
        `keep` of the base image and of the tiles apart (one problem per segment, as `vtprune.DivPrune`), Random
        `keep` of all of them together (as `vtprune.Random`)."""
        if self.method == "divprune":
            return (
                resolve_keep(self.keep, base, base, warn=False)
                + resolve_keep(self.keep, tiles, tiles, warn=False)
                + rows
            )
        if self.method == "random":
            return resolve_keep(self.keep, base + tiles, base + tiles, warn=False) + rows
        if self.method == "none":
            return base + tiles + rows
        raise ValueError(f"vtprune: method={self.method!r} does not run on LLaVA-NeXT")

    def tokens_per_image(self, num_patches: int) -> int:
        """The embeddings (and so the placeholders) one image of `num_patches` tokens gets."""
        if self.method == "none":
            return num_patches
        if self.method == "visionzip":
            patches, contextual = self.split(num_patches)
            return 1 + patches + contextual
        return resolve_keep(self.keep, num_patches, num_patches, warn=False)


def random_scores(images: int, count: int, seed: int, device=None) -> torch.Tensor:
    """(images, count) float32: the scores `methods.random.Random` draws for a sample made of one image of `count`
    tokens at its first stage (a generator seeded with `seed`, 2 * count draws, the first count used), the same
    for every image."""
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    draw = torch.rand(2 * count, generator=generator, device=device)[:count]
    return draw.expand(images, count)


def cls_attention(qkv: torch.Tensor, num_heads: int, cls_index: int = 0, first_patch: int = 1) -> torch.Tensor:
    """(N, P) float32: the [CLS] token's attention to each patch inside a ViT layer, averaged over heads, from the
    layer's fused q/k/v projection output qkv (N, T, 3 * D) (softmax over all T tokens, scale head_dim ** -0.5,
    as `adapters.base.ModelAdapter.vision_attention` recomputes it)."""
    images, length, width = qkv.shape
    head_dim = width // 3 // num_heads
    query, key, _ = qkv.chunk(3, dim=-1)
    query = query[:, cls_index].reshape(images, num_heads, 1, head_dim)
    key = key.reshape(images, length, num_heads, head_dim).transpose(1, 2)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * head_dim**-0.5  # (N, H, 1, T)
    return torch.softmax(logits, dim=-1)[:, :, 0, first_patch:].mean(dim=1)


def head_mean_keys(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(N, T, head_dim): the keys of every token averaged over heads, from the fused qkv (N, T, 3 * D)."""
    images, length, width = qkv.shape
    key = qkv.chunk(3, dim=-1)[1]
    return key.reshape(images, length, num_heads, width // 3 // num_heads).mean(dim=2)


__all__ = ["METHODS", "REQUEST_OPTIONS", "PluginOptions", "cls_attention", "head_mean_keys", "random_scores"]
