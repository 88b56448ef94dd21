"""vtprune: visual-token pruning for Hugging Face vision-language models, with debiased attention scores.

The public names in `__all__` load on first use (PEP 562): `import vtprune` (and the command line's `--help`)
does not import torch until something needs it. Every name not listed in `_HOMES` is a method class from
`vtprune.methods`."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {
    "Debias": ".debias",
    "Press": ".core.press",
    "Stage": ".core.stages",
    "StageSelection": ".core.stages",
    "Kept": ".core.stages",
}


def __getattr__(name: str):
    if name in __all__ and name != "__version__":
        value = getattr(importlib.import_module(_HOMES.get(name, ".methods"), __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vtprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Debias",
    "FastV",
    "PyramidDrop",
    "HiMAP",
    "SparseVLM",
    "TokenCarve",
    "ILLaVA",
    "VisionZip",
    "FasterVLM",
    "DART",
    "DivPrune",
    "Random",
    "Press",
    "Stage",
    "StageSelection",
    "Kept",
    "METHODS",
    "__version__",
]
