"""Independent reference for LLaVA-OneVision (1-D positions): image and video features from the model's own
encoders; which tokens are newlines (never pruned) is read from the features (rows equal to the model's
`image_newline`), not from vtprune's layout arithmetic; the decoder runs by hand (`anyres.run_1d`) with the visual
tokens not kept physically removed. Single sample, no batch padding."""

from __future__ import annotations

import torch

from .anyres import run_1d


def oracle_logits(model, inputs, stages, new_tokens=None, fastv=None):
    base = model.model
    prompt = inputs["input_ids"]
    ids = prompt if new_tokens is None else torch.cat([prompt, new_tokens], dim=1)
    hidden = base.get_input_embeddings()(ids)
    visual = torch.zeros(ids.shape[1], dtype=torch.bool)
    for key, token, encode in (
        ("pixel_values", model.config.image_token_id, lambda: base.get_image_features(inputs["pixel_values"], inputs["image_sizes"])),
        ("pixel_values_videos", model.config.video_token_id, lambda: base.get_video_features(inputs["pixel_values_videos"])),
    ):
        if key not in inputs:
            continue
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in encode().pooler_output])
        where = ids[0] == token
        hidden[0, where] = features
        newline = (features == base.image_newline).all(dim=-1)
        visual[torch.nonzero(where).flatten()[~newline]] = True
    return run_1d(model, hidden, visual, prompt.shape[1], stages, fastv)
