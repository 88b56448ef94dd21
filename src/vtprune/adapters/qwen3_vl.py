"""Qwen3-VL (`Qwen3VLForConditionalGeneration`).

What differs from Qwen2.5-VL (whose adapter this one extends):

* Deepstack: the vision tower also returns features from some of its intermediate layers (three for the
  released checkpoints); the language model adds the i-th of them to the hidden states of the visual tokens
  after decoder layer i. The adapter hands them to the engine (`visual_additions`), which adds them itself after
  those layers to the visual tokens still present, by their original visual rank: a token dropped at layer 0 or
  inside the first layers gets no more additions, a kept token gets its own. Tokens a method inserts (merged
  tokens) get none.
* Videos: every frame (temporal group of 2 frames) is its own run between `<|vision_start|>` / `<|vision_end|>`,
  after a timestamp (`<1.0 seconds>`), with its own 3-D positions; inside generate() the frames of one video are
  grouped by the token count of the video's encoded features.
* 16-px patches (32 px per token after the 2x2 merge); interleaved mRoPE (the rotary table per token, gathered
  for the kept tokens as for Qwen2.5-VL); query and key norms in attention (scoring applies them).
"""

from __future__ import annotations

import torch

from .qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    family = "Qwen3-VL"
    adds_visual_features = True

    def visual_additions(self, kwargs: dict) -> tuple[dict, torch.Tensor, list[torch.Tensor]] | None:
        additions = kwargs.get("deepstack_visual_embeds")
        mask = kwargs.get("visual_pos_masks")
        if additions is None or mask is None:
            return None
        return dict(kwargs, deepstack_visual_embeds=None, visual_pos_masks=None), mask.bool(), list(additions)
