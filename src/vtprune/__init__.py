"""vtprune: visual-token pruning for Hugging Face vision-language models, with debiased attention scores.

The public names below load on first use (PEP 562), so that `import vtprune` (and the command line's
`--help`) does not import torch until something needs it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Debias": ".debias", "FastV": ".methods", "PyramidDrop": ".methods", "HiMAP": ".methods",
    "SparseVLM": ".methods", "Random": ".methods", "METHODS": ".methods", "Press": ".press", "Stage": ".stages",
    "StageSelection": ".stages", "Kept": ".stages",
}

if TYPE_CHECKING:  # for type checkers and IDEs
    from .debias import Debias
    from .methods import METHODS, FastV, HiMAP, PyramidDrop, Random, SparseVLM
    from .press import Press
    from .stages import Kept, Stage, StageSelection


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vtprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["Debias", "FastV", "PyramidDrop", "HiMAP", "SparseVLM", "Random", "Press", "Stage", "StageSelection", "Kept", "METHODS", "__version__"]
