"""What vtprune's pruned vLLM models share (LLaVA-1.5 in `llava.py`, LLaVA-NeXT in `llava_next.py`): the options of a
request, the fields the processor hands the model, the placeholder count and the count check.

* Options: the model's (`hf_overrides={"vtprune": {...}}`), overridden per request by
  `mm_processor_kwargs={"vtprune": {...}}` (`PluginOptions.with_request`); a bad value fails the request in the
  processor, before anything runs.
* Fields added to a request: per image the placeholder count K the processor used (`vtprune_tokens`) and the
  family's own per-image fields; the options themselves (`vtprune_options`, encoded), a field shared by the
  request's images, so vLLM never batches images with different options into one encoder call.
* The count check: vLLM does not compare a prompt's placeholders with the embeddings the model returns (with more
  placeholders it silently uses the first embeddings); the model compares them per image and fails the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from .options import PluginOptions

TOKENS_FIELD = "vtprune_tokens"
OPTIONS_FIELD = "vtprune_options"
#: the key of a request's options in its multimodal processor kwargs
REQUEST_KEY = "vtprune"


class VtpruneInfoMixin:
    """The options side of a processing info (put before vLLM's info class): the model's and a request's options,
    and the encoder-cache bound. Subclasses define `get_num_image_tokens(..., options=None)` (the placeholders)."""

    #: the methods this family runs, and the reason the others do not
    methods: tuple[str, ...] = ("fastervlm", "visionzip", "divprune", "random", "none")
    unsupported_reason = ""
    architecture = ""

    @cached_property
    def options(self) -> PluginOptions:
        return self.supported(PluginOptions.from_config(self.get_hf_config()))  # type: ignore[attr-defined]

    def request_options(self, mm_kwargs) -> PluginOptions:
        """The model's options overridden by a request's `mm_processor_kwargs["vtprune"]` (validated)."""
        return self.supported(self.options.with_request(mm_kwargs.get(REQUEST_KEY)))

    def supported(self, options: PluginOptions) -> PluginOptions:
        return check_method(options, self.methods, self.architecture, self.unsupported_reason)

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts):
        """The most placeholders any request can give an image (every token, plus VisionZip's [CLS]): vLLM sizes
        its encoder cache from this, and a request may keep more than the model's default."""
        size = self.get_image_size_with_most_features()
        unpruned = super().get_num_image_tokens(image_width=size.width, image_height=size.height)
        return {"image": unpruned + 1}


class VtpruneProcessorMixin:
    """The processor side (put before vLLM's multimodal processor class): K placeholders per image from the
    request's options, and the fields the model reads. Subclasses name their per-image fields in `image_fields`
    and compute them in `_image_fields`."""

    image_fields: tuple[str, ...] = ()
    #: the image fields (besides the token counts) that are host metadata, kept on the CPU
    cpu_fields: tuple[str, ...] = ()

    def _image_fields(self, sizes, options: PluginOptions) -> dict[str, torch.Tensor]:
        return {}

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[TOKENS_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        for name in self.image_fields:
            fields[name] = MultiModalFieldConfig.batched("image", keep_on_cpu=name in self.cpu_fields)
        images = len(hf_inputs.get(TOKENS_FIELD, ()))
        fields[OPTIONS_FIELD] = MultiModalFieldConfig.shared("image", images, keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        """K placeholders for each image (K from the request's options); an embedding input keeps its own count."""
        info = self.info
        options = info.request_options(hf_processor_mm_kwargs)
        image_token = info.get_hf_config().image_token_index

        def replacement(item_index: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                return [image_token] * images.get_feature_size(item_index)
            size = images.get_image_size(item_index)
            count = info.get_num_image_tokens(image_width=size.width, image_height=size.height, options=options)
            return [image_token] * count

        return [PromptReplacement(modality="image", target=[image_token], replacement=replacement)]

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        info = self.info
        options = info.request_options(hf_kwargs)  # a bad request fails here, before anything runs
        hf_kwargs = {key: value for key, value in hf_kwargs.items() if key != REQUEST_KEY}
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if "pixel_values" not in processed:
            return processed
        images = mm_items.get_items("image", ImageProcessorItems)
        sizes = [images.get_image_size(i) for i in range(images.get_count())]
        processed[TOKENS_FIELD] = torch.tensor(
            [info.get_num_image_tokens(image_width=s.width, image_height=s.height, options=options) for s in sizes]
        )
        processed.update(self._image_fields(sizes, options))
        processed[OPTIONS_FIELD] = options.encode()
        return processed


class VtpruneModelMixin:
    """The model side (put before vLLM's model class): reads the fields, prunes with the request's options
    (`_prune_images`, per family) and checks the counts."""

    image_fields: tuple[str, ...] = ()
    vtprune: PluginOptions
    architecture = ""

    def embed_multimodal(self, **kwargs):
        fields = {name: _stacked(kwargs.pop(name, None)) for name in (TOKENS_FIELD, OPTIONS_FIELD, *self.image_fields)}
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] == "image_embeds":  # given embeddings: their own count, unpruned
            return image_input["data"]
        if fields[TOKENS_FIELD] is None:
            raise ValueError(
                f"vtprune: the request carries no '{TOKENS_FIELD}': its image placeholders were not "
                f'made by vtprune\'s processor (serve with architectures ["{self.architecture}"])'
            )
        encoded = fields[OPTIONS_FIELD]
        options = self.vtprune if encoded is None else PluginOptions.decode(encoded)
        embeddings = self._prune_images(image_input, options, fields)
        check_counts(embeddings, fields[TOKENS_FIELD], self.architecture)
        return embeddings

    def _prune_images(self, image_input, options: PluginOptions, fields: dict):
        raise NotImplementedError


def check_method(options: PluginOptions, methods, architecture: str, reason: str) -> PluginOptions:
    """`options`, if its method runs on this architecture; else a one-line error naming the ones that do."""
    if options.method not in methods:
        raise ValueError(
            f"vtprune: method={options.method!r} does not run on {architecture} ({reason}); use one of "
            f"{', '.join(methods)}"
        )
    return options


def check_counts(
    embeddings: torch.Tensor | Sequence[torch.Tensor], placeholders: torch.Tensor, architecture: str = ""
) -> None:
    """Refuse images whose placeholder counts (N,) are not the rows of their embeddings ((N, K, D), or N tensors
    (K_i, D))."""
    counts = placeholders.reshape(-1).tolist()
    returned = [int(image.shape[0]) for image in embeddings]
    if counts != returned:
        raise ValueError(
            f"vtprune: the prompt holds {counts} image placeholders but the pruned model returns {returned} "
            "embeddings (per image); vLLM would silently use the first ones. The processor and the model must read "
            f'the same vtprune options: serve the model with hf_overrides {{"architectures": ["{architecture}"], '
            '"vtprune": {...}}, restart it after changing them, and set per-request options only in '
            "mm_processor_kwargs."
        )


def _stacked(value) -> torch.Tensor | None:
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.stack(list(value))


__all__ = [
    "OPTIONS_FIELD",
    "REQUEST_KEY",
    "TOKENS_FIELD",
    "VtpruneInfoMixin",
    "VtpruneModelMixin",
    "VtpruneProcessorMixin",
    "check_counts",
    "check_method",
]
