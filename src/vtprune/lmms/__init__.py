"""vtprune's models for lmms-eval (>= 0.7, the entry-point group `lmms_eval.models`).

Each registered name wraps lmms-eval's own wrapper of that model family and runs its `generate()` inside a
vtprune press built from the vtprune part of `--model_args` (`options.PressOptions`):

    python -m lmms_eval --model vtprune_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=128,debias=both --tasks gqa

This module only lists the models (lmms-eval imports it to build its registry); the wrappers, which import
lmms-eval's model code, live in `llava_hf`, `qwen2_5_vl` and `video_llava`.
"""

from __future__ import annotations

#: lmms-eval model name -> (simple class path, chat class path or None)
MODELS: dict[str, tuple[str, str | None]] = {
    "vtprune_llava_hf": ("vtprune.lmms.llava_hf.LlavaHf", "vtprune.lmms.llava_hf.LlavaHfChat"),
    "vtprune_qwen2_5_vl": ("vtprune.lmms.qwen2_5_vl.Qwen2_5_VL", "vtprune.lmms.qwen2_5_vl.Qwen2_5_VLChat"),
    "vtprune_video_llava": ("vtprune.lmms.video_llava.VideoLLaVA", None),
}


def manifests() -> list:
    """The `ModelManifest`s lmms-eval's registry loads from the `lmms_eval.models` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id=name, simple_class_path=simple, chat_class_path=chat)
        for name, (simple, chat) in MODELS.items()
    ]


__all__ = ["MODELS", "manifests"]
