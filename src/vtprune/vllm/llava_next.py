"""vLLM's LLaVA-NeXT with vtprune's before-the-language-model pruning (DivPrune, Random), registered as
`VtpruneLlavaNextForConditionalGeneration`.

An image reaches the language model as vLLM's (and transformers') anyres layout: the base image's S x S tokens,
then the unpadded tile grid, `rows` rows of `cols` tokens, each row closed by an `image_newline` token. What is
pruned is what vtprune's LLaVA-NeXT adapter calls visual tokens: the base tokens and the tile tokens; the newline
tokens are never ranked and always kept, in place (`vtprune.adapters.llava_next`). So an image keeps

* DivPrune: `keep` of its base tokens and `keep` of its tile tokens, each chosen apart (one max-min problem per
  segment, as `vtprune.DivPrune`), plus its `rows` newlines;
* Random: `keep` of its base and tile tokens together (as `vtprune.Random(layer=0)`), plus its newlines;

the kept tokens in their order. FasterVLM and VisionZip do not run on LLaVA-NeXT: vtprune does not define them
there (its adapter refuses vision-side methods: the tower's [CLS] attention, one per tile, has no one-to-one map
onto the re-laid, unpadded anyres grid yet), and the plugin implements only what a press defines. Padding
debiasing acts only on those two methods' [CLS] scores, so it does not apply here.

The processor puts K placeholders per image (K from the image size, the options and the pinpoints) and hands the
model each image's unpadded tile grid (rows, cols); see `common.py` for the options and the count check.
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.vision import get_num_selected_vision_tokens
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..core.selection import max_min_select, rank_order
from ..core.stages import resolve_keep
from .common import VtpruneInfoMixin, VtpruneModelMixin, VtpruneProcessorMixin, check_method
from .options import PluginOptions, random_scores

ARCHITECTURE = "VtpruneLlavaNextForConditionalGeneration"
GRID_FIELD = "vtprune_grid"
METHODS = ("divprune", "random", "none")
UNSUPPORTED = (
    "vtprune defines FasterVLM and VisionZip on LLaVA-1.5 only: the tower's [CLS] attention, one per tile, has no "
    "one-to-one map onto LLaVA-NeXT's unpadded anyres grid in vtprune yet"
)


class VtpruneLlavaNextProcessingInfo(VtpruneInfoMixin, LlavaNextProcessingInfo):
    """LLaVA-NeXT's processing info with K placeholders per image (base, unpadded tiles and newlines, pruned)."""

    architecture = ARCHITECTURE
    methods = METHODS
    unsupported_reason = UNSUPPORTED

    def anyres_grid(self, *, image_width: int, image_height: int) -> tuple[int, int, int]:
        """(base tokens, rows, cols) of an image: the base image's tokens and its unpadded tile grid (as vLLM's
        `get_num_image_tokens` counts them)."""
        config = self.get_hf_config()
        encoder = self.get_vision_encoder_info()
        base = get_num_selected_vision_tokens(
            encoder.get_num_image_tokens(image_width=image_width, image_height=image_height),
            config.vision_feature_select_strategy,
        )
        tile_rows, tile_cols = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        tiles, rows = self._get_num_unpadded_features(
            original_height=image_height,
            original_width=image_width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=tile_rows,
            num_patch_width=tile_cols,
        )
        return base, rows, tiles // rows

    def get_num_image_tokens(self, *, image_width: int, image_height: int, options: PluginOptions | None = None) -> int:
        base, rows, cols = self.anyres_grid(image_width=image_width, image_height=image_height)
        return (options or self.options).anyres_tokens_per_image(base, rows * cols, rows)


class VtpruneLlavaNextMultiModalProcessor(VtpruneProcessorMixin, LlavaNextMultiModalProcessor):
    """LLaVA-NeXT's multimodal processor with the request's options (`VtpruneProcessorMixin`), adding per image its
    unpadded tile grid (rows, cols)."""

    image_fields = (GRID_FIELD,)
    cpu_fields = (GRID_FIELD,)

    def _image_fields(self, sizes, options: PluginOptions) -> dict[str, torch.Tensor]:
        grids = [self.info.anyres_grid(image_width=s.width, image_height=s.height)[1:] for s in sizes]
        return {GRID_FIELD: torch.tensor(grids, dtype=torch.long).reshape(len(sizes), 2)}


@MULTIMODAL_REGISTRY.register_processor(
    VtpruneLlavaNextMultiModalProcessor, info=VtpruneLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VtpruneLlavaNextForConditionalGeneration(VtpruneModelMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT returning each image's kept tokens and its newlines (see the module docstring); options in
    `config.vtprune` (`PluginOptions`), per request in `mm_processor_kwargs["vtprune"]`."""

    architecture = ARCHITECTURE
    image_fields = (GRID_FIELD,)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = check_method(PluginOptions.from_config(self.config), METHODS, ARCHITECTURE, UNSUPPORTED)
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError("vtprune: vision_feature_select_strategy must be 'default' (the [CLS] token dropped)")
        vision = self.config.vision_config
        self._base_tokens = (vision.image_size // vision.patch_size) ** 2

    def _prune_images(self, image_input, options: PluginOptions, fields: dict) -> list[torch.Tensor]:
        merged = list(self._process_image_input(image_input))  # N tensors (T_i, D): base, tile rows + newlines
        return prune_anyres(options, merged, fields[GRID_FIELD], self._base_tokens)


def prune_anyres(
    options: PluginOptions, images: list[torch.Tensor], grids: torch.Tensor, base: int
) -> list[torch.Tensor]:
    """The kept embeddings of N LLaVA-NeXT images: images N tensors (T_i, D), each `base` base-image tokens then
    rows_i rows of cols_i tile tokens each closed by a newline token; grids (N, 2) long on the CPU (rows_i, cols_i).
    Returns N tensors (K_i, D): the kept base and tile tokens and every newline, in their order."""
    if options.method == "none":
        return images
    device = images[0].device
    grid = [(int(rows), int(cols)) for rows, cols in grids.tolist()]
    tiles = [rows * cols for rows, cols in grid]
    visual = [base + count for count in tiles]  # the tokens vtprune ranks, per image
    width = max(visual)
    padded = torch.nn.utils.rnn.pad_sequence(images, batch_first=True)  # (N, T, D)
    count, length = padded.shape[:2]
    cols = torch.tensor([c for _, c in grid], device=device)[:, None]  # (N, 1)
    # where each visual token (base, then tiles row by row) sits in its image's sequence
    index = torch.arange(width, device=device)[None]  # (1, V)
    tile_index = (index - base).clamp(min=0)
    slot = torch.where(index < base, index, base + tile_index // cols * (cols + 1) + tile_index % cols)
    valid = index < torch.tensor(visual, device=device)[:, None]  # (N, V)
    slot = torch.where(valid, slot, length)  # beyond an image: a spare column
    if options.method == "divprune":
        kept = _divprune_kept(options, padded, slot, base, tiles)
    else:
        kept = _random_kept(options, valid, visual)
    # the sequence mask: kept visual tokens and every newline
    position = torch.arange(length, device=device)[None]  # (1, T)
    after_base = position - base
    lengths = torch.tensor([base + rows * (c + 1) for rows, c in grid], device=device)[:, None]
    mask = (after_base >= 0) & (position < lengths) & (after_base % (cols + 1) == cols)  # the newlines
    mask = torch.cat([mask, torch.zeros(count, 1, dtype=torch.bool, device=device)], dim=1)
    mask = mask.scatter(1, torch.where(kept & valid, slot, length), True)[:, :length]
    return list(torch.split(padded[mask], mask.sum(dim=1).tolist()))


def _divprune_kept(options: PluginOptions, padded: torch.Tensor, slot: torch.Tensor, base: int, tiles: list[int]):
    """(N, V) bool: DivPrune's picks, one max-min problem per segment (base image, tiles) as `vtprune.DivPrune`."""
    count, _, dim = padded.shape
    device = padded.device
    width = max(2, base, max(tiles))  # the press's problem width (the nearest-other search needs 2 columns)
    gathered = torch.gather(
        torch.cat([padded, padded.new_zeros(count, 1, dim)], dim=1), 1, slot[..., None].expand(-1, -1, dim)
    )  # (N, V, D) the visual tokens
    problems = torch.zeros(2 * count, width, dim, dtype=padded.dtype, device=device)
    problems[:count, :base] = gathered[:, :base]
    problems[count:, : max(tiles)] = gathered[:, base : base + max(tiles)]
    lengths = torch.tensor([base] * count + tiles, device=device)
    valid = torch.arange(width, device=device)[None] < lengths[:, None]  # (2N, W)
    counts = [resolve_keep(options.keep, base, base, warn=False)] * count
    counts += [resolve_keep(options.keep, n, n, warn=False) for n in tiles]
    picks, chosen = max_min_select(problems, valid, max(counts), torch.tensor(counts, device=device))
    offset = torch.tensor([0] * count + [base] * count, device=device)[:, None]
    visual = slot.shape[1]
    columns = torch.where(chosen, picks + offset, visual)  # the visual index of each pick; dropped: a spare column
    rows = torch.arange(2 * count, device=device)[:, None] % count
    kept = torch.zeros(count, visual + 1, dtype=torch.bool, device=device)
    kept[rows.expand_as(columns), columns] = True
    return kept[:, :visual]


def _random_kept(options: PluginOptions, valid: torch.Tensor, visual: list[int]):
    """(N, V) bool: Random's picks over each image's base and tile tokens together, as `vtprune.Random(layer=0)`
    (its scores drawn per token count, the same for every image of that count)."""
    device = valid.device
    scores = torch.zeros(valid.shape, device=device)
    for number in sorted(set(visual)):  # one draw per distinct token count, as the press draws them
        rows = torch.tensor([n == number for n in visual], device=device)
        draw = random_scores(1, number, options.seed, device)[0]
        scores[rows, :number] = draw
    order = rank_order(scores, valid)  # (N, V) best first, invalid last
    rank = torch.argsort(order, dim=1)  # each token's place in that order
    keep = torch.tensor([resolve_keep(options.keep, n, n, warn=False) for n in visual], device=device)
    return rank < keep[:, None]


__all__ = [
    "ARCHITECTURE",
    "GRID_FIELD",
    "VtpruneLlavaNextForConditionalGeneration",
    "VtpruneLlavaNextMultiModalProcessor",
    "VtpruneLlavaNextProcessingInfo",
    "prune_anyres",
]
