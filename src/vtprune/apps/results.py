"""Statistics and saved progress shared by every accuracy run (`vtprune eval`, `vtprune testbed eval`).

* `wilson(hits, n)`: the Wilson score 95% interval of an accuracy.
* `paired_delta(a, b)`: the mean per-question difference of two settings answered on the same questions, with
  a normal 95% interval (the paired comparison is far tighter than comparing two intervals).
* `load_cells` / `save_cells`: finished cells of a grid in one JSON file, under a key (model and data
  fingerprints, settings) so that a rerun resumes only work done on the same model and questions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (low, high) of a proportion hits/n; (0, 1) when n == 0."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def paired_delta(a: Sequence[int], b: Sequence[int]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of a_i - b_i over the same questions with a normal 95% interval."""
    if len(a) != len(b):
        raise ValueError(
            f"paired difference of {len(a)} and {len(b)} answers: both settings must answer the same questions"
        )
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return (float(d.mean()), float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se))


def load_cells(path: str | Path | None, key: dict) -> dict[str, dict]:
    """The cells saved in `path` under `key` ({cell name: cell data}); empty when there is no file, it cannot
    be read, or it was written for another key (other model, data or settings)."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("cells"), dict):
        return {}
    return data["cells"]


def save_cells(path: str | Path, key: dict, cells: dict[str, dict]) -> None:
    """Write `cells` under `key` to `path` atomically (`io.atomic_write_json`: a temporary file, fsync, rename)."""
    from ..io import atomic_write_json

    atomic_write_json(path, {"key": key, "cells": cells}, indent=None)


def cells_problem(path: str | Path | None, key: dict) -> str | None:
    """Why the cells saved in `path` cannot be reused (they are replaced by the next `save_cells`): "is empty",
    "is truncated or not JSON", "holds no cells", "holds cells measured on another model, data or settings";
    None when there is no file or its cells are reused."""
    if path is None or not Path(path).is_file():
        return None
    try:
        text = Path(path).read_text()
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if not text.strip():
        return "is empty"
    try:
        data = json.loads(text)
    except ValueError:
        return "is truncated or not JSON"
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict):
        return "holds no cells"
    if data.get("key") != key:
        return "holds cells measured on another model, data or settings" if data["cells"] else None
    return None


__all__ = ["wilson", "paired_delta", "load_cells", "save_cells", "cells_problem"]
