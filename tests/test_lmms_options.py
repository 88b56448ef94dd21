"""The vtprune part of lmms-eval's --model_args (no lmms-eval needed): parsing, checks, profiles per task."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vtprune.lmms.options import TASK_PROFILES, PressOptions

LLAVA15 = SimpleNamespace(_name_or_path="llava-hf/llava-1.5-7b-hf")
TESTBED = SimpleNamespace(_name_or_path="/x/checkpoint", vtprune_model="testbed")


def test_vtprune_keys_are_taken_out():
    args = {"pretrained": "x", "method": "pdrop", "keep": "[184,92,46]", "layer": "2;10;20", "device_map": "auto",
            "pad_to_square": "False"}
    options = PressOptions.pop_from(args)
    assert args == {"pretrained": "x", "device_map": "auto"}
    assert options.keep == [184, 92, 46] and options.layer == [2, 10, 20] and options.pad_to_square is False
    assert [s.layer for s in options.press().stages()] == [2, 10, 20]
    assert PressOptions.pop_from({"method": "fastv", "keep": 0.25}).keep == 0.25
    assert PressOptions.pop_from({}).press() is None and not PressOptions.pop_from({}).prunes


def test_debias_defaults_by_method():
    assert PressOptions.pop_from({"method": "fastv"}).debias_mode == "both"
    assert PressOptions.pop_from({"method": "dart"}).debias_mode == "none"
    assert PressOptions.pop_from({"method": "fastv", "debias": "padding"}).press(TESTBED).debias.profile is None


@pytest.mark.parametrize("method, task, expected", [
    ("pdrop", "gqa", "llava-1.5-7b/pyramiddrop/gqa"),
    ("himap", "mmbench_cn_dev", "llava-1.5-7b/himap/mmbench_cn"),
    ("sparsevlm", "vizwiz_vqa_val", "llava-1.5-7b/sparsevlm/vizwiz"),
    ("tokencarve", "some_other_task", "llava-1.5-7b/tokencarve"),
    ("fastv", "gqa", "llava-1.5-7b/fastv"),  # one published curve for every benchmark
    ("illava", "gqa", "auto"),  # no published profile
])
def test_published_profile_per_benchmark(method, task, expected):
    options = PressOptions.pop_from({"method": method, "budget": 128})
    assert options.profile_name(LLAVA15, task) == expected
    press = options.press(LLAVA15, task)
    assert press.debias.padding and (press.debias.profile == expected)


def test_every_paper_benchmark_has_profiles():
    from vtprune.debias.profiles import builtin_profiles

    names = {p.name for p in builtin_profiles()}
    for method in ("pyramiddrop", "himap", "sparsevlm", "tokencarve"):
        for benchmark in TASK_PROFILES.values():
            assert f"llava-1.5-7b/{method}/{benchmark}" in names


def test_other_profile_choices():
    assert PressOptions.pop_from({"method": "pdrop", "profile": "default"}).profile_name(LLAVA15, "gqa") == "llava-1.5-7b/pyramiddrop"
    assert PressOptions.pop_from({"method": "fastv"}).profile_name(TESTBED, "gqa") == "testbed/fastv"
    assert PressOptions.pop_from({"method": "fastv"}).profile_name(SimpleNamespace(_name_or_path="m"), "gqa") == "auto"
    options = PressOptions.pop_from({"method": "fastv", "profile": "llava-1.5-7b/himap/gqa"})
    assert options.profile_name(TESTBED, "pope") == "llava-1.5-7b/himap/gqa"
    assert options.press(LLAVA15, "gqa") is options.press(LLAVA15, "pope")  # built once per profile


@pytest.mark.parametrize("args, message", [
    ({"method": "nope"}, "unknown"),
    ({"method": "fastv", "debias": "half"}, "debias='half'"),
    ({"method": "dart", "debias": "both"}, "ranks without attention"),
    ({"method": "fastv", "keep": "a,b"}, "is not a number"),
    ({"method": "fastv", "budget": 128, "keep": 64}, "not both"),
    ({"keep": 64}, "method=none runs the unpruned model"),
    ({"method": "fastv", "profile": "nope/x"}, "unknown profile"),
    ({"method": "fastv", "pad_to_square": "sometimes"}, "pad_to_square"),
])
def test_mistakes(args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PressOptions.pop_from(dict(args))
