"""The plugin's pure parts: options, token counts, the count check, the export's key names (no engine)."""

from __future__ import annotations

import pytest
import torch


def test_options_are_validated():
    from vtprune.vllm.options import PluginOptions

    class Config:
        vtprune = {"method": "fastervlm", "kepp": 3}

    with pytest.raises(ValueError, match="unknown option.*kepp"):
        PluginOptions.from_config(Config())
    with pytest.raises(ValueError, match="method='fastv'"):
        PluginOptions(method="fastv")
    with pytest.raises(ValueError, match="keep"):
        PluginOptions(keep=0)
    with pytest.raises(ValueError, match="VisionZip's options"):
        PluginOptions(method="fastervlm", dominant=10, contextual=2)


def test_tokens_per_image():
    from vtprune.vllm.options import PluginOptions

    assert PluginOptions(keep=36).tokens_per_image(144) == 36
    assert PluginOptions(keep=0.125).tokens_per_image(144) == 18
    assert PluginOptions(method="none").tokens_per_image(144) == 144
    assert PluginOptions(method="visionzip", dominant=30, contextual=6).tokens_per_image(144) == 36
    assert PluginOptions(method="visionzip", keep=64).tokens_per_image(576) == 64  # 54 (incl. [CLS]) + 10


def test_check_counts_refuses_a_mismatch():
    from vtprune.vllm.llava import check_counts

    embeddings = torch.zeros(2, 36, 8)
    check_counts(embeddings, torch.tensor([36, 36]))
    with pytest.raises(ValueError, match=r"\[37, 36\] image placeholders .* \[36, 36\] embeddings"):
        check_counts(embeddings, torch.tensor([37, 36]))
    check_counts([torch.zeros(5, 8), torch.zeros(7, 8)], torch.tensor([5, 7]))  # LLaVA-NeXT: a tensor per image
    with pytest.raises(ValueError, match=r"\[5, 8\] image placeholders .* \[5, 7\] embeddings"):
        check_counts([torch.zeros(5, 8), torch.zeros(7, 8)], torch.tensor([5, 8]))


def test_export_renames_only_the_vision_tower():
    from vtprune.vllm.export import vllm_key

    assert vllm_key("vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert vllm_key("vision_tower.vision_model.embeddings.x") == "vision_tower.vision_model.embeddings.x"
    assert vllm_key("language_model.model.norm.weight") == "language_model.model.norm.weight"


def test_request_options_override_the_model_options():
    from vtprune.vllm.options import PluginOptions

    model = PluginOptions(method="visionzip", dominant=30, contextual=6, debias_padding=False)
    assert model.with_request(None) is model
    assert model.with_request({"seed": 1}) == PluginOptions(method="visionzip", dominant=30, contextual=6,
                                                           debias_padding=False, seed=1)
    # a new budget or method drops the model's VisionZip counts
    assert model.with_request({"keep": 0.5}) == PluginOptions(method="visionzip", keep=0.5, debias_padding=False)
    assert model.with_request({"method": "divprune"}).dominant is None
    with pytest.raises(ValueError, match="vision_layer cannot be set per request"):
        model.with_request({"vision_layer": -3})
    with pytest.raises(ValueError, match="must be a JSON object"):
        model.with_request(0.5)
    with pytest.raises(ValueError, match="keep"):
        model.with_request({"keep": 1.5})


def test_options_encode_exactly():
    from vtprune.vllm.options import PluginOptions

    for options in (PluginOptions(keep=1), PluginOptions(keep=1.0), PluginOptions(method="random", seed=2**40 + 1),
                    PluginOptions(method="visionzip", dominant=30, contextual=6, padding_threshold=0.3)):
        assert PluginOptions.decode(options.encode()) == options
    assert PluginOptions.decode(PluginOptions(keep=1).encode()).keep.__class__ is int


def test_anyres_tokens_per_image():
    """LLaVA-NeXT: DivPrune keeps `keep` of the base and of the tiles apart, Random of both together; newlines stay."""
    from vtprune.vllm.options import PluginOptions

    assert PluginOptions(method="divprune", keep=0.5).anyres_tokens_per_image(16, 48, 6) == 8 + 24 + 6
    assert PluginOptions(method="divprune", keep=20).anyres_tokens_per_image(16, 48, 6) == 16 + 20 + 6
    assert PluginOptions(method="random", keep=0.25).anyres_tokens_per_image(16, 48, 6) == 16 + 6
    assert PluginOptions(method="none").anyres_tokens_per_image(16, 48, 6) == 16 + 48 + 6
    with pytest.raises(ValueError, match="does not run on LLaVA-NeXT"):
        PluginOptions(method="fastervlm").anyres_tokens_per_image(16, 48, 6)
