"""PNG plots of the biases and of what a press keeps (matplotlib, headless).

* `plot_score_vs_position`: mean score per relative position with the fitted exponential trend, before and
  after debiasing;
* `plot_score_heatmap`: the mean score on the image's patch grid;
* `plot_keep_frequency`: how often each patch is kept, before and after debiasing, side by side;
* `plot_selection`: images as the model sees them (padding included), kept patches bright, the rest dimmed,
  padding patches crossed out; one panel per selection (e.g. before/after debiasing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from ..debias.fit import ExpFit, relative_positions
from .calibration import PositionCurve

PAD_COLOUR = (122, 116, 104)  # CLIP's mean colour, what LLaVA pads with


def _save(fig, path: str | Path) -> Path:
    from ..io import atomic_open

    path = Path(path)
    with atomic_open(path, "wb") as handle:  # a temporary file, then a rename
        fig.savefig(handle, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return path


def plot_score_vs_position(
    curves: dict[str, PositionCurve], fits: dict[str, ExpFit], path: str | Path, title: str = ""
) -> Path:
    """Mean score vs x = i/L: `score_before` (and `score_after` when present), each with its fitted trend."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    styles = {"score_before": ("raw scores", "tab:red"), "score_after": ("debiased scores", "tab:blue")}
    for name, (label, colour) in styles.items():
        if name not in curves:
            continue
        curve = curves[name]
        x = relative_positions(curve.length)
        ax.scatter(
            x[curve.valid],
            curve.values[curve.valid],
            s=6,
            alpha=0.45,
            color=colour,
            label=f"{label}, mean per position",
        )
        if name in fits:
            fit = fits[name]
            ax.plot(
                x, fit(x), color=colour, lw=2, label=f"fit mu*exp(sigma x): sigma={fit.sigma:+.2f}, R^2={fit.r2:.2f}"
            )
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("relative position x = i / L (row-major: top of image -> bottom)")
    ax.set_ylabel("score / image mean over real tokens")
    ax.set_title(title or "Mean score vs position")
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def _grid_image(ax, curve: PositionCurve, title: str, vmin=None, vmax=None, cmap="viridis"):
    rows, cols = curve.grid
    values = np.ma.masked_invalid(curve.values.reshape(rows, cols))
    colormap = plt.get_cmap(cmap).with_extremes(bad="lightgrey")
    shown = ax.imshow(values, cmap=colormap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def plot_score_heatmap(curve: PositionCurve, path: str | Path, title: str = "") -> Path:
    """The mean (per-image normalised) score of each patch on the grid; grey: never a real token."""
    fig, ax = plt.subplots(figsize=(5, 4.4))
    shown = _grid_image(ax, curve, title or "Mean score per patch (raw)")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="score / image mean")
    return _save(fig, path)


def plot_keep_frequency(before: PositionCurve, after: PositionCurve | None, path: str | Path, title: str = "") -> Path:
    """Keep frequency per patch before (raw top-k) and after debiasing, on one colour scale."""
    panels = [("before debiasing (raw top-k)", before)] + ([("after debiasing", after)] if after is not None else [])
    vmax = max(float(np.nanmax(c.values)) for _, c in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 0.8, 4.4), squeeze=False)
    shown = None
    for ax, (label, curve) in zip(axes[0], panels):
        shown = _grid_image(ax, curve, label, vmin=0.0, vmax=vmax, cmap="magma")
    fig.colorbar(shown, ax=list(axes[0]), fraction=0.046, pad=0.04, label="share of images where kept")
    fig.suptitle(title or "How often each patch is kept")
    return _save(fig, path)


def model_view(image: Image.Image, geometry) -> Image.Image:
    """The image as the vision tower sees it: placed on the padded square canvas (`ImageGeometry.trace`)."""
    (height, width), (x0, y0, x1, y1) = geometry.trace(image.size)
    canvas = Image.new("RGB", (width, height), PAD_COLOUR)
    box = (round(x0), round(y0), round(x1), round(y1))
    if box[2] > box[0] and box[3] > box[1]:
        canvas.paste(image.convert("RGB").resize((box[2] - box[0], box[3] - box[1])), box[:2])
    return canvas


def draw_selection(
    ax, view: Image.Image, grid: tuple[int, int], kept: np.ndarray, padding: np.ndarray | None, title: str = ""
):
    """Draw `view` with its (rows*cols,) `kept` mask: kept patches bright, others dimmed, padding crossed."""
    rows, cols = grid
    pixels = np.asarray(view, dtype=np.float32) / 255.0
    height, width = pixels.shape[:2]
    cell_h, cell_w = height / rows, width / cols
    mask = np.kron(kept.reshape(rows, cols), np.ones((int(np.ceil(cell_h)), int(np.ceil(cell_w)))))[:height, :width]
    shaded = pixels * (0.25 + 0.75 * mask[..., None])
    ax.imshow(shaded, interpolation="nearest")
    if padding is not None:
        for index in np.flatnonzero(padding):
            r, c = divmod(int(index), cols)
            x0, y0 = c * cell_w, r * cell_h
            ax.plot([x0, x0 + cell_w], [y0, y0 + cell_h], color="tab:red", lw=0.6, alpha=0.7)
            ax.plot([x0, x0 + cell_w], [y0 + cell_h, y0], color="tab:red", lw=0.6, alpha=0.7)
    for index in np.flatnonzero(kept):
        r, c = divmod(int(index), cols)
        ax.add_patch(plt.Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, ec="yellow", lw=0.8))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def plot_selection(
    image: Image.Image,
    geometry,
    grid: tuple[int, int],
    selections: Sequence[tuple[str, np.ndarray]],
    padding: np.ndarray | None,
    path: str | Path,
    title: str = "",
) -> Path:
    """One panel per (label, kept indices (k,)) selection of one image's tokens; padding (rows*cols,) bool."""
    view = model_view(image, geometry)
    fig, axes = plt.subplots(1, len(selections), figsize=(3.6 * len(selections), 4.0), squeeze=False)
    for ax, (label, kept_indices) in zip(axes[0], selections):
        kept = np.zeros(grid[0] * grid[1], dtype=bool)
        kept[np.asarray(kept_indices, dtype=int)] = True
        draw_selection(ax, view, grid, kept, padding, f"{label}\n{int(kept.sum())} kept")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, "bright + yellow box: kept; dimmed: pruned; red cross: padding", ha="center", fontsize=8)
    return _save(fig, path)


__all__ = [
    "plot_score_vs_position",
    "plot_score_heatmap",
    "plot_keep_frequency",
    "plot_selection",
    "model_view",
    "draw_selection",
]
