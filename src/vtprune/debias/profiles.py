"""Positional debiasing profiles: the trend f(i/L) that attention scores are divided by.

A profile is either exponential, f(x) = mu * exp(sigma * x) with x = i / L, a per-position curve of L
values, or a 2-D "rowcol" profile (a row trend times a column trend, stored as its L values); `alpha` tempers
any of them, f ** alpha (1, the default, as published; `debias.corrections` fits it). Built-in profiles (package data, `vtprune profiles`) are the weights published with arXiv
2508.17807 for LLaVA-1.5-7B, and the testbed model's own, written by `vtprune calibrate` (the same JSON
format; a built-in file holds either one profile or {"profiles": [...], "aliases": {...}}).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

FORMAT = "vtprune-profile/1"


#: the steepest exponential trend a profile may have, |sigma| (published and calibrated ones lie within 7): its
#: weights then span exp(50) ~ 5e21, which float32 scores (max ~3e38) divide by without overflow or underflow
SIGMA_LIMIT = 50.0
#: the range of mu and of a curve's values (and the largest ratio of a curve's values: exp(SIGMA_LIMIT))
SCALE_LIMITS = (1e-20, 1e20)


def check_trend_range(profile: Profile) -> None:
    """Refuse a profile whose trend float32 debiasing cannot represent (inf/nan or ties by token order): |sigma|
    above `SIGMA_LIMIT`, mu or curve values outside `SCALE_LIMITS`, a curve spanning more than exp(SIGMA_LIMIT)."""
    low, high = SCALE_LIMITS
    name = profile.name
    if profile.kind == "exp" and abs(profile.alpha * profile.sigma) > SIGMA_LIMIT:
        raise ValueError(
            f"profile {name!r}: sigma={profile.sigma:g} is outside [-{SIGMA_LIMIT:g}, {SIGMA_LIMIT:g}]: its weights would "
            f"span exp({abs(profile.sigma):g}), beyond what float32 scores can be divided by (published and calibrated "
            "profiles lie within 7); check the fit, or use profile='auto'"
        )
    if not low <= profile.mu <= high:
        raise ValueError(
            f"profile {name!r}: mu={profile.mu:g} is outside [{low:g}, {high:g}]: rescale the profile (only "
            "the shape of the trend matters)"
        )
    if profile.kind in ("curve", "rowcol"):
        smallest, largest = min(profile.curve), max(profile.curve)
        if smallest < low or largest > high or largest / smallest > math.exp(SIGMA_LIMIT):
            raise ValueError(
                f"profile {name!r}: curve values from {smallest:g} to {largest:g}: they must lie in [{low:g}, {high:g}] and "
                f"span at most exp({SIGMA_LIMIT:g}) (float32 scores are divided by them)"
            )


@dataclass(frozen=True)
class Profile:
    """A positional trend. `curve` holds the trend f (not the weights 1/f) for curve profiles; `extra`
    keeps any further metadata (fit quality, sample count, data fingerprint, ...)."""

    name: str
    kind: Literal["exp", "curve", "rowcol"]
    length: int
    sigma: float | None = None
    mu: float = 1.0
    curve: tuple[float, ...] | None = None
    method: str | None = None
    layer: int | None = None
    query: str | None = None
    model: str | None = None
    source: str = ""
    description: str = ""
    extra: dict = field(default_factory=dict)
    alpha: float = 1.0  # tempering: the trend is f ** alpha

    def __post_init__(self) -> None:
        if self.kind not in ("exp", "curve", "rowcol"):
            raise ValueError(f"profile {self.name!r}: kind must be 'exp', 'curve' or 'rowcol', got {self.kind!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 4:
            raise ValueError(f"profile {self.name!r}: alpha={self.alpha!r} must be a number in [0, 4] (1: untempered)")
        if not isinstance(self.length, int) or self.length <= 0:
            raise ValueError(f"profile {self.name!r}: length must be a positive int, got {self.length!r}")
        if self.kind == "exp" and (self.sigma is None or not math.isfinite(self.sigma)):
            raise ValueError(f"profile {self.name!r}: an exponential profile needs a finite sigma")
        if not (math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"profile {self.name!r}: mu must be positive and finite")
        if self.kind in ("curve", "rowcol"):
            if self.curve is None or len(self.curve) != self.length:
                raise ValueError(f"profile {self.name!r}: a {self.kind} profile needs {self.length} values")
            if not all(math.isfinite(v) and v > 0 for v in self.curve):
                raise ValueError(f"profile {self.name!r}: curve values must be positive and finite")
        check_trend_range(self)

    def trend(self, length: int) -> torch.Tensor:
        """(length,) float32 trend f(i/L) for a sample with `length` visual tokens per image."""
        if self.kind == "exp":
            x = torch.arange(length, dtype=torch.float64) / length
            return (self.mu * torch.exp(self.sigma * x)).pow(self.alpha).float()
        if length != self.length:
            raise ValueError(
                f"profile {self.name!r} is a per-position curve for {self.length} visual tokens, but the image "
                f"has {length}: calibrate a profile for this model (`vtprune calibrate`) or use an "
                "exponential profile, which is resampled on x = i/L."
            )
        return torch.tensor(self.curve, dtype=torch.float64).pow(self.alpha).float()

    def weights(self, length: int) -> torch.Tensor:
        """(length,) multiplicative weights 1/f, normalised so that weights[0] == 1."""
        trend = self.trend(length)
        return trend[0] / trend

    def to_dict(self) -> dict:
        data = {"format": FORMAT, **asdict(self)}
        data["curve"] = list(self.curve) if self.curve is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        extra = dict(values.pop("extra", None) or {})
        extra.update({k: v for k, v in data.items() if k not in known and k != "format"})
        if values.get("curve") is not None:
            try:
                values["curve"] = tuple(float(v) for v in values["curve"])
            except (TypeError, ValueError):
                raise ValueError("curve must be a list of numbers") from None
        missing = {"name", "kind", "length"} - set(values)
        if missing:
            raise ValueError(f"profile data lacks {sorted(missing)}")
        for key in ("sigma", "mu", "alpha"):
            value = values.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{key}={value!r} must be a number")
        if not isinstance(values["name"], str):
            raise ValueError(f"name={values['name']!r} must be a string")
        return cls(**values, extra=extra)

    def save(self, path: str | os.PathLike) -> Path:
        from ..io import atomic_write_json

        return atomic_write_json(path, self.to_dict())


@lru_cache(maxsize=1)
def _builtin_index() -> dict[str, Profile]:
    profiles: dict[str, Profile] = {}
    folder = resources.files("vtprune.debias") / "profiles"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text())
        for item in data.get("profiles", [data]):  # a collection, or one calibrated profile
            profile = Profile.from_dict(item)
            profiles[profile.name] = profile
        for alias, target in data.get("aliases", {}).items():
            profiles[alias] = profiles[target]
    return profiles


#: `config.vtprune_model` of the models vtprune ships: their profiles are `<model>/<method>`, and records name
#: them by it rather than by their install path
OWN_MODELS = ("testbed", "testbed-lm")


def builtin_profiles() -> list[Profile]:
    """All built-in profiles (aliases not repeated), sorted by name."""
    return sorted({id(p): p for p in _builtin_index().values()}.values(), key=lambda p: p.name)


def builtin_aliases() -> dict[str, str]:
    return {name: p.name for name, p in _builtin_index().items() if name != p.name}


def default_profile_name(config, method: str, profile_name: str | None = None) -> str | None:
    """The built-in positional profile of a model (its config) and method, if vtprune ships one: the
    testbed's calibrated `testbed/<method>` (`testbed-lm/<method>` for testbed-lm), or the published
    `llava-1.5-7b/<method>` for LLaVA-1.5-7B checkpoints (recognised by name). `profile_name`: the method's name in
    the published profiles."""
    if getattr(config, "vtprune_model", None) in OWN_MODELS:
        candidate = f"{config.vtprune_model}/{method}"
    elif "llava-1.5-7b" in str(getattr(config, "_name_or_path", "")).lower():
        candidate = f"llava-1.5-7b/{profile_name or method}"
    else:
        return None
    return candidate if candidate in _builtin_index() else None


def load_profile(spec: str | os.PathLike | Profile) -> Profile:
    """A built-in name, a path to a profile JSON, or a `Profile` (returned as is)."""
    if isinstance(spec, Profile):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"profile={spec!r}: give a built-in profile name (`vtprune profiles`), a path to a profile JSON, a "
            "Profile, 'auto', 'default' or None"
        )
    index = _builtin_index()
    if isinstance(spec, str) and spec in index:
        return index[spec]
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        return _read_profile_file(path)
    close = difflib.get_close_matches(str(spec), list(index), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown profile {str(spec)!r}.{hint} `vtprune profiles` lists the built-in names; a path to a "
        "profile JSON works too."
    )


def _read_profile_file(path: Path) -> Profile:
    """The one profile in a profile JSON; every problem is a ValueError naming the file."""
    if path.is_dir():
        raise ValueError(f"profile file {path} is a directory: give the profile JSON inside it")
    if not path.is_file():
        raise ValueError(f"profile file {path} does not exist: check the path, or write one with `vtprune calibrate`")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"profile file {path} is not a text (JSON) file") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"profile file {path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None
    except OSError as error:
        raise ValueError(f"cannot read profile file {path}: {error.strerror or error}") from None
    expected = 'a JSON object such as {"name": ..., "kind": "exp", "length": 576, "sigma": 1.2} (`vtprune calibrate` writes one)'
    if not isinstance(data, dict):
        raise ValueError(f"profile file {path} holds a JSON {type(data).__name__}, not a profile: expected {expected}")
    if "profiles" in data:
        items = data["profiles"]
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ValueError(f'profile file {path}: "profiles" must be a list of profile objects')
        names = [str(item.get("name", "?")) for item in items]
        if len(names) != 1:
            raise ValueError(f"{path} holds {len(names)} profiles ({', '.join(names)}); give a file with one")
        data = items[0]
    try:
        return Profile.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"profile file {path} is not a valid vtprune profile: {error}") from None
