"""Calibration: fit the positional trend of a method's scores on a data set and write a profile.

The published code never released how its curves were fitted; vtprune's procedure, stated so it can be
checked:

1. run the model with the method's own scorer (first stage, no debiasing) on N examples;
2. per image, divide the score vector (L,) by its mean over the image's real (non-padding) tokens, so every
   image weighs the same whatever share of attention went to vision;
3. average per position i over images, over real tokens only: padding has its own bias (the attention sink)
   and is handled by padding debiasing, so it must not bend the positional trend;
4. fit f(x) = mu * exp(sigma * x), x = i/L, by least squares (`fit.fit_exponential`); report R^2 and residuals.

`--curve` keeps a smoothed version of the mean curve as a per-position profile (the exponential fit fills
positions no real token ever occupied).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..debias.fit import ExpFit, fit_exponential, relative_positions
from ..debias.profiles import OWN_MODELS, Profile


@dataclass
class PositionCurve:
    """A per-position statistic over the visual tokens of one image (L,), pooled over many images.

    values: the statistic (nan where no image had a real token), count: how many images contributed.
    grid: the (rows, cols) patch grid of the images (rows * cols == L).
    """

    values: np.ndarray
    count: np.ndarray
    grid: tuple[int, int]

    @property
    def length(self) -> int:
        return len(self.values)

    @property
    def valid(self) -> np.ndarray:
        return self.count > 0

    def fit(self) -> ExpFit:
        """Least-squares fit of mu*exp(sigma*x) on the positions with data (x = i/L)."""
        x = relative_positions(self.length)
        return fit_exponential(self.values[self.valid], x[self.valid])


def _images(records, which: str):
    """Yield (values (L,), real (L,) bool, segment) per image of every record; `which` names a record field."""
    for record in records:
        values = getattr(record, which)
        if values is None:
            raise ValueError(f"the records hold no {which!r} scores: run the press with debiasing to get them")
        for segment in record.segments:
            part = slice(segment.offset, segment.offset + segment.length)
            real = np.ones(segment.length, dtype=bool) if record.padding is None else ~record.padding[part]
            real &= np.isfinite(values[part])
            yield values[part], real, segment


def _check_length(segment, length: int | None) -> int:
    if length is not None and segment.length != length:
        raise ValueError(
            f"images have different numbers of visual tokens ({length} and {segment.length}): positional "
            "statistics need one fixed grid; calibrate on images the processor maps to the same grid."
        )
    return segment.length


def mean_score_curve(records, which: str = "raw") -> PositionCurve:
    """Mean score per position over real tokens, each image normalised by its mean over real tokens.

    which: "raw" (before debiasing) or "debiased"."""
    total = count = None
    grid, length = None, None
    for values, real, segment in _images(records, which):
        length = _check_length(segment, length)
        if total is None:
            total, count, grid = np.zeros(length), np.zeros(length), segment.grid
        scale = values[real].mean() if real.any() else 0.0
        if scale <= 0:
            continue  # an image with no positive real score says nothing about the trend
        total[real] += values[real] / scale
        count[real] += 1
    if total is None:
        raise ValueError("no scored images: the records are empty")
    with np.errstate(invalid="ignore", divide="ignore"):
        return PositionCurve(values=np.where(count > 0, total / np.maximum(count, 1), np.nan), count=count, grid=grid)


def keep_frequency(records, which: str = "kept") -> PositionCurve:
    """How often each position is kept, among the images where it is a real token.

    which: "kept" (the press's selection, with its debiasing) or "kept_raw" (top-k of the raw scores)."""
    kept_total = count = None
    grid, length = None, None
    for record in records:
        kept = np.zeros(len(record.raw), dtype=bool)
        kept[getattr(record, which)] = True
        real_all = np.ones(len(record.raw), dtype=bool) if record.padding is None else ~record.padding
        for segment in record.segments:
            length = _check_length(segment, length)
            if kept_total is None:
                kept_total, count, grid = np.zeros(length), np.zeros(length), segment.grid
            part = slice(segment.offset, segment.offset + segment.length)
            real = real_all[part]
            kept_total[real] += kept[part][real]
            count[real] += 1
    if kept_total is None:
        raise ValueError("no scored images: the records are empty")
    with np.errstate(invalid="ignore", divide="ignore"):
        return PositionCurve(
            values=np.where(count > 0, kept_total / np.maximum(count, 1), np.nan), count=count, grid=grid
        )


def smooth_curve(curve: PositionCurve, fit: ExpFit, window: int | None = None) -> np.ndarray:
    """(L,) positive curve: a centred moving average of the mean curve (window defaults to one grid row),
    positions without data taken from the exponential fit."""
    length = curve.length
    window = window or curve.grid[1]
    filled = np.where(curve.valid, curve.values, fit(relative_positions(length)))
    half = window // 2
    padded = np.pad(filled, half, mode="edge")
    smoothed = np.convolve(padded, np.ones(window) / window, mode="valid")[:length]
    floor = 1e-6 * max(float(np.nanmax(smoothed)), 1e-12)
    return np.maximum(smoothed, floor)


def data_fingerprint(examples: Sequence) -> str:
    """sha1 over every example's image pixels, size and question (identifies the calibration data)."""
    digest = hashlib.sha1()
    for example in examples:
        image = example.image
        digest.update(repr(image.size).encode())
        digest.update(image.tobytes())
        digest.update(example.question.encode())
    return digest.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """sha1 over the model's class, name and a sample of every parameter tensor (cheap: <= 64 values each),
    so that saved calibration progress is never resumed with other weights."""
    digest = hashlib.sha1(type(model).__name__.encode())
    digest.update(str(getattr(model.config, "_name_or_path", "")).encode())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            flat = parameter.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()[:16]


def profile_from_records(
    records,
    *,
    name: str,
    method: str,
    layer: int,
    query: str | None,
    model_name: str | None,
    curve: bool = False,
    extra: dict | None = None,
) -> tuple[Profile, PositionCurve, ExpFit]:
    """Fit a profile on `records` (first-stage raw scores). Returns the profile, the mean curve and the fit."""
    mean = mean_score_curve(records, "raw")
    fit = mean.fit()
    info = {
        "r2": fit.r2,
        "samples": len(records),
        "images": int(mean.count.max()),
        "grid": list(mean.grid),
        "mean_curve": [None if not np.isfinite(v) else float(v) for v in mean.values],
        "residuals": [float(v) for v in fit.residuals],
        "procedure": "per-image scores / mean over real tokens; mean per position over real tokens; "
        "least-squares fit of mu*exp(sigma*i/L)",
    }
    info.update(extra or {})
    profile = Profile(
        name=name,
        kind="curve" if curve else "exp",
        length=mean.length,
        sigma=float(fit.sigma),
        mu=float(fit.mu) if fit.mu > 0 else 1.0,
        curve=tuple(float(v) for v in smooth_curve(mean, fit)) if curve else None,
        method=method,
        layer=layer,
        query=query,
        model=model_name,
        source="calibrated with vtprune",
        description=f"{method} at layer {layer}, {len(records)} samples, R^2 {fit.r2:.3f}",
        extra=info,
    )
    return profile, mean, fit


@dataclass
class Calibration:
    """The result of `calibrate`: the profile, the mean score curve it was fitted on, and the fit; `resumed`:
    how many examples came from saved progress instead of being run."""

    profile: Profile
    curve: PositionCurve
    fit: ExpFit
    records: list
    resumed: int = 0


def model_label(model) -> str:
    """How records name a model: "testbed" or "testbed-lm" for vtprune's own models (not their install path),
    else the name or path it was loaded from."""
    config = model.config
    if getattr(config, "vtprune_model", None) in OWN_MODELS:
        return config.vtprune_model
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


def calibration_settings(model, examples: Sequence, press, *, padding: bool = True) -> dict:
    """What a calibration's records depend on (model weights, data, method, layer, padding): saved progress is
    resumed, and a written profile reused, only when these match."""
    from ..adapters import adapter_for

    stage = press.validate(len(adapter_for(model).decoder_layers))[0]
    method = getattr(press, "name", "") or type(press).__name__.lower()
    return {
        "fingerprint": data_fingerprint(examples),
        "model": model_fingerprint(model),
        "method": method,
        "layer": stage.layer,
        "score_layer": stage.score_layer,
        "padding": padding,
        "padding_threshold": press.padding_threshold(),
        "samples": len(examples),
    }


def read_saved_records(state_path, field: str, expected, decode, other: str) -> tuple[list, str | None]:
    """Records saved in `state_path` under `field` == `expected` (decoded by `decode`, each checked), and why
    none could be used: None when there is no file; else "is empty", "is truncated or not JSON", "holds progress
    {other}" (saved with other settings) or "holds a malformed record (...)"."""
    import json
    from pathlib import Path

    state = Path(state_path)
    if not state.is_file():
        return [], None
    try:
        text = state.read_text()
    except OSError as error:
        return [], f"cannot be read ({error.strerror})"
    if not text.strip():
        return [], "is empty"
    try:
        saved = json.loads(text)
    except ValueError:
        return [], "is truncated or not JSON"
    if not isinstance(saved, dict) or not isinstance(saved.get("records"), list):
        return [], "is not vtprune progress (no list of records)"
    if saved.get(field) != expected:
        return [], f"holds progress {other}"
    try:
        records = [decode(record) for record in saved["records"]]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        return [], f"holds a malformed record ({type(error).__name__}: {error})"
    return records, None


def read_progress(state_path, settings: dict) -> tuple[list, str | None]:
    """The records of a calibration saved in `state_path` for exactly `settings`, and why none could be used
    (`read_saved_records`)."""
    return read_saved_records(state_path, "settings", settings, _record_from_json, "made with other settings")


def saved_progress(state_path, settings: dict) -> int | None:
    """How many examples the progress saved in `state_path` holds for exactly `settings` (0: unusable or saved
    with other settings, so it will be replaced; None: no saved progress)."""
    records, problem = read_progress(state_path, settings)
    return len(records) if records or problem else None


def reusable(profile: Profile, settings: dict, *, curve: bool, name: str | None) -> bool:
    """Whether `profile` (read back from a calibration's output) was calibrated with exactly `settings`, as
    a profile of the requested kind and name."""
    return (
        profile.extra.get("calibration") == settings
        and profile.kind == ("curve" if curve else "exp")
        and (name is None or profile.name == name)
    )


def check_calibratable(press) -> None:
    """Refuse presses whose ranking uses no attention (no positional trend to calibrate)."""
    if getattr(press, "query", None) is None:
        raise ValueError(
            f"{type(press).__name__} ranks tokens without attention scores: there is no positional trend to "
            "calibrate. Calibrate an attention-based method (e.g. fastv)."
        )


def calibrate(
    model,
    processor,
    examples: Sequence,
    press,
    *,
    batch_size: int = 8,
    curve: bool = False,
    padding: bool = True,
    name: str | None = None,
    method: str | None = None,
    state_path=None,
    progress=None,
    model_name: str | None = None,
) -> Calibration:
    """Fit the positional trend of `press`'s first-stage scores on `examples` (see the module docstring).

    press: the method as it will run: it runs in dry-run mode (nothing is cut) and its first stage's raw
        attention-derived scores (before debiasing) are fitted; its own debiasing does not change them.
    padding: exclude padding tokens from the fit (needs the processor's geometry; False for processors
        vtprune cannot model). state_path: a JSON file where progress is saved after each chunk, so an
        interrupted calibration resumes (only if it was started on the same model, data and settings).
    progress(n): called after each batch with the number of examples it finished (once first with the count
        resumed from `state_path`, if any).
    model_name: how the profile names the model (default `model_label`: "testbed", or the path or hub id it
        was loaded from); the default profile name is `<last part of it>/<method>/calibrated`.
    """
    from pathlib import Path

    from .. import __version__
    from ..adapters import adapter_for
    from ..io import atomic_write_json
    from .runner import run_examples

    if not examples:
        raise ValueError("no calibration examples")
    check_calibratable(press)
    stage = press.validate(len(adapter_for(model).decoder_layers))[0]
    settings = calibration_settings(model, examples, press, padding=padding)
    method = method or settings["method"]
    fingerprint = settings["fingerprint"]
    records: list = []
    state = Path(state_path) if state_path is not None else None
    if state is not None:
        records = read_progress(state, settings)[0][: len(examples)]
    resumed = len(records)
    if progress is not None and records:
        progress(len(records))
    chunk = max(batch_size, 8 * batch_size)
    for start in range(len(records), len(examples), chunk):
        part = examples[start : start + chunk]
        found = run_examples(
            model, processor, part, press, generate=False, batch_size=batch_size, dry_run=True, progress=progress
        ).records
        if not padding:  # padding tokens stay in the fit
            for record in found:
                record.padding = None
        records += found
        if state is not None:
            atomic_write_json(
                state, {"settings": settings, "records": [_record_to_json(r) for r in records]}, indent=None
            )
    config = model.config
    model_name = model_name or model_label(model)
    profile, mean, fit = profile_from_records(
        records,
        name=name or f"{Path(model_name).name or 'model'}/{method}/calibrated",
        method=method,
        layer=stage.layer,
        query=type(press).query,
        model_name=model_name,
        curve=curve,
        extra={
            "revision": getattr(config, "_commit_hash", None),
            "score_layer": stage.score_layer,
            "padding_excluded": padding,
            "data_fingerprint": fingerprint,
            "vtprune_version": __version__,
            "calibration": settings,
        },
    )
    return Calibration(profile=profile, curve=mean, fit=fit, records=records, resumed=resumed)


def _record_to_json(record) -> dict:
    return {
        "raw": [None if not np.isfinite(v) else float(v) for v in record.raw],
        "padding": None if record.padding is None else record.padding.astype(int).tolist(),
        "segments": [[s.offset, s.length, list(s.grid), s.image_index] for s in record.segments],
    }


def _record_from_json(data: dict):
    from ..adapters.base import VisualSegment
    from .runner import ScoreRecord, check_record

    raw = np.array([np.nan if v is None else v for v in data["raw"]], dtype=np.float32)
    empty = np.zeros(0, dtype=np.int64)
    return check_record(
        ScoreRecord(
            raw=raw,
            debiased=None,
            padding=None if data["padding"] is None else np.array(data["padding"], dtype=bool),
            kept=empty,
            kept_raw=empty,
            keep=0,
            segments=[
                VisualSegment(offset=o, length=n, grid=tuple(g), image_index=i) for o, n, g, i in data["segments"]
            ],
        )
    )


__all__ = [
    "PositionCurve",
    "Calibration",
    "calibrate",
    "calibration_settings",
    "saved_progress",
    "read_progress",
    "read_saved_records",
    "reusable",
    "model_label",
    "check_calibratable",
    "mean_score_curve",
    "keep_frequency",
    "smooth_curve",
    "data_fingerprint",
    "model_fingerprint",
    "profile_from_records",
]
