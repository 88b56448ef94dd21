"""Built-in profiles reproduce the published weights; profiles round-trip through JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vtprune.debias.profiles import Profile, builtin_aliases, builtin_profiles, load_profile

REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/llava15_7b_published_profiles.json"


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.exists():
        pytest.skip("shared/reference is not beside this checkout")
    return json.loads(REFERENCE.read_text())


def test_every_builtin_loads_and_is_attributed():
    profiles = builtin_profiles()
    published = [p for p in profiles if p.name.startswith("llava-1.5-7b/")]
    assert len(published) >= 41
    for profile in profiles:
        assert load_profile(profile.name) is profile
        assert profile.trend(profile.length).shape == (profile.length,)
        if profile in published:
            assert "2508.17807" in profile.source
        else:  # the testbed models' own (testbed, testbed-lm), written by `vtprune calibrate`
            assert profile.name.startswith(("testbed/", "testbed-lm/")) and profile.source == "calibrated with vtprune"
            assert profile.model == profile.name.split("/")[0]
            assert profile.extra["samples"] > 0 and profile.extra["data_fingerprint"]


def test_fastv_curve_is_the_published_weights(reference):
    weights = torch.tensor(reference["fastv_weight_curve"]["values"])
    profile = load_profile("llava-1.5-7b/fastv")
    assert profile.kind == "curve" and profile.length == 576
    torch.testing.assert_close(profile.weights(576), weights, rtol=1e-5, atol=1e-6)


def test_exponential_profiles_match_published_weights(reference):
    for method, benchmarks in reference["profiles"].items():
        for benchmark, values in benchmarks.items():
            profile = load_profile(f"llava-1.5-7b/{method}/{benchmark}")
            published = torch.exp(-values["decay_per_token"] * torch.arange(576, dtype=torch.float64)).float()
            torch.testing.assert_close(profile.weights(576), published, rtol=1e-6, atol=0)
            # full double precision: 5-digit decays were off by ~1e-5 in the weights, enough to flip near-ties
            assert abs(profile.sigma - 576 * values["decay_per_token"]) < 1e-12


def test_exponential_resamples_on_relative_position():
    profile = load_profile("llava-1.5-7b/pyramiddrop/gqa")
    expected = torch.exp(profile.sigma * torch.arange(144, dtype=torch.float64) / 144).float()
    torch.testing.assert_close(profile.trend(144), expected)


def test_curve_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match="576 visual tokens, but the image has 144"):
        load_profile("llava-1.5-7b/fastv").trend(144)


def test_aliases_resolve_to_median_profiles():
    aliases = builtin_aliases()
    assert aliases["llava-1.5-7b/pyramiddrop"] == "llava-1.5-7b/pyramiddrop/median"
    assert load_profile("llava-1.5-7b/pyramiddrop").name == "llava-1.5-7b/pyramiddrop/median"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean llava-1.5-7b/fastv"):
        load_profile("llava-1.5-7b/fast")


def test_json_round_trip_keeps_extra_fields(tmp_path):
    profile = Profile(name="mine", kind="exp", length=144, sigma=0.8, mu=0.002, method="fastv", layer=2,
                      query="last", model="testbed", source="calibrated", extra={"r2": 0.97, "samples": 256})
    loaded = load_profile(profile.save(tmp_path / "mine.json"))
    assert loaded == profile
    curve = Profile(name="c", kind="curve", length=3, curve=(1.0, 2.0, 3.0))
    assert load_profile(curve.save(tmp_path / "c.json")).curve == (1.0, 2.0, 3.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="exp", length=10, sigma=float("nan")), "finite sigma"),
        (dict(kind="curve", length=3, curve=(1.0, 0.0, 2.0)), "positive"),
        (dict(kind="curve", length=3, curve=(1.0, 2.0)), "needs 3 values"),
        (dict(kind="spline", length=3), "kind"),
        (dict(kind="exp", length=0, sigma=1.0), "length"),
    ],
)
def test_invalid_profiles(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Profile(name="bad", **kwargs)


def test_missing_file():
    with pytest.raises(ValueError, match="does not exist"):
        load_profile("/nonexistent/profile.json")


def test_default_profile_of_a_model_and_method():
    from types import SimpleNamespace

    from vtprune.debias.profiles import default_profile_name

    testbed = SimpleNamespace(vtprune_model="testbed", _name_or_path="/somewhere/checkpoint")
    llava = SimpleNamespace(_name_or_path="llava-hf/llava-1.5-7b-hf")
    other = SimpleNamespace(_name_or_path="my-own-vlm")
    assert default_profile_name(testbed, "pdrop", "pyramiddrop") == "testbed/pdrop"
    assert default_profile_name(llava, "pdrop", "pyramiddrop") == "llava-1.5-7b/pyramiddrop"
    assert load_profile(default_profile_name(llava, "sparsevlm")).method == "sparsevlm"
    assert default_profile_name(other, "fastv") is None
    assert default_profile_name(testbed, "random") is None


def test_debias_default_profile_resolves_per_model(model):
    from vtprune import Debias, FastV, PyramidDrop
    from vtprune.testbed.model import load_testbed

    testbed, _ = load_testbed()
    with PyramidDrop(debias=Debias(profile="default", padding=False))(testbed) as session:
        assert session.debias.loaded_profile.name == "testbed/pdrop"
    with pytest.raises(ValueError, match="no built-in positional profile for fastv"):
        FastV(debias=Debias(profile="default", padding=False))(model)
