"""vtprune's own named models and question sets ("testbed", "testbed-lm"): a small registry that the applications
consult, so that loading, the datasets and the demo never import the testbed package.

A provider registers its names when its module is imported (`vtprune.testbed.model`, `.lm`, `.data` do, at their
end); `named_model` and `named_data` import the module a built-in name lives in on first use, by its name (as
vLLM's plugins are found), so the dependency points from the testbed to this interface, never back."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NamedModel:
    """A model vtprune ships, loaded by name.

    checkpoint_dir: the directory whose config.json describes it (what records and `inspect_model` read);
    problem(): why it cannot load here (one sentence naming the fix), or None;
    load(attn_implementation): (model, processor), float32, eval mode."""

    name: str
    checkpoint_dir: Path
    problem: Callable[[], str | None]
    load: Callable[..., tuple[Any, Any]]


@dataclass(frozen=True)
class NamedData:
    """A question set vtprune generates, by name: make_split(split, n) -> the first n samples of a split (each with
    `image`, `question`, `answer`, `meta`)."""

    name: str
    make_split: Callable[..., Sequence[Any]]


#: where each built-in name registers itself; imported on first use
MODEL_HOMES = {"testbed": "vtprune.testbed.model", "testbed-lm": "vtprune.testbed.lm"}
DATA_HOMES = {"testbed": "vtprune.testbed.data"}

_MODELS: dict[str, NamedModel] = {}
_DATA: dict[str, NamedData] = {}


def register_model(model: NamedModel) -> None:
    _MODELS[model.name] = model


def register_data(data: NamedData) -> None:
    _DATA[data.name] = data


def named_model(name: str) -> NamedModel | None:
    """The model registered as `name` (importing its built-in home on first use), or None for any other spec."""
    if name not in _MODELS and name in MODEL_HOMES:
        importlib.import_module(MODEL_HOMES[name])
    return _MODELS.get(name)


def named_data(name: str) -> NamedData | None:
    """The question set registered as `name` (importing its built-in home on first use), or None."""
    if name not in _DATA and name in DATA_HOMES:
        importlib.import_module(DATA_HOMES[name])
    return _DATA.get(name)


__all__ = [
    "DATA_HOMES",
    "MODEL_HOMES",
    "NamedData",
    "NamedModel",
    "named_data",
    "named_model",
    "register_data",
    "register_model",
]
