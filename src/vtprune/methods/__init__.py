"""Pruning methods, one file each, and the registry every command enumerates: `METHODS` maps a method's
name (CLI `--method`) to its press class."""

from __future__ import annotations

from ..core.press import Press
from .dart import DART
from .divprune import DivPrune
from .fastervlm import FasterVLM
from .fastv import FastV
from .himap import HiMAP
from .illava import ILLaVA
from .pdrop import PyramidDrop
from .random import Random
from .sparsevlm import SparseVLM
from .tokencarve import TokenCarve
from .visionzip import VisionZip

METHODS: dict[str, type[Press]] = {
    cls.name: cls
    for cls in (FastV, PyramidDrop, HiMAP, SparseVLM, TokenCarve, ILLaVA, VisionZip, FasterVLM, DART, DivPrune, Random)
}


def method(name: str) -> type[Press]:
    """The press class registered as `name`, or an error listing the known names."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def attention_methods() -> list[str]:
    """Names of the methods that rank by attention (what debiasing and calibration apply to)."""
    return [name for name, cls in METHODS.items() if cls.query is not None]


__all__ = [
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
    "METHODS",
    "method",
    "attention_methods",
]
