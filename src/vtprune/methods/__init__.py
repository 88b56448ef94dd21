"""Pruning methods, one file each. `METHODS` maps CLI names to classes."""

from .fastv import FastV
from .random import Random

METHODS = {"fastv": FastV, "random": Random}

__all__ = ["FastV", "Random", "METHODS"]
