"""The vtprune part of an lmms-eval `--model_args` string, parsed and checked without lmms-eval.

    --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=128,debias=both,profile=benchmark

method: a `vtprune methods` name, or none (the unpruned model; default). budget (a count of 576 or a
fraction) or keep (per stage; lists as [184,92,46] or 184;92;46), layer (likewise), positions
(original|compact). debias: none|positional|padding|both (default: both for methods that rank by attention,
none for the others). profile: benchmark (the published per-benchmark profile of the task being run where
vtprune ships one, else the model's default; the paper's setting), default (the model's built-in profile),
auto, a built-in name or a profile JSON path; a model without a built-in profile uses auto.
pad_to_square: pad images to a square before the processor resizes them (LLaVA-1.5's own preprocessing;
default True for LLaVA-1.5 models). Every other argument goes to the wrapped lmms-eval model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: model_args read by vtprune (the rest belongs to the wrapped lmms-eval model)
KEYS = ("method", "budget", "keep", "layer", "debias", "profile", "positions", "pad_to_square")
DEBIAS_MODES = ("none", "positional", "padding", "both")
#: lmms-eval task -> the benchmark name of the published LLaVA-1.5-7B profiles (llava-1.5-7b/<method>/<name>)
TASK_PROFILES = {
    "gqa": "gqa",
    "mmbench_en_dev": "mmbench",
    "mmbench_cn_dev": "mmbench_cn",
    "mme": "mme",
    "mmvet": "mmvet",
    "pope": "pope",
    "scienceqa_img": "scienceqa_img",
    "textvqa_val": "textvqa",
    "vizwiz_vqa_val": "vizwiz",
    "vqav2_val": "vqav2",
}


def _numbers(value, name: str):
    """An int/float, or a list of them from '[184,92,46]' / '184;92;46' (lmms-eval splits model_args on
    commas outside brackets); None stays None."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_numbers(v, name) for v in value]
    text = str(value).strip()
    parts = [p.strip() for p in re.split(r"[;,]", text.strip("[]() ")) if p.strip()]
    if not parts:
        raise ValueError(f"{name}={value!r}: give a number or a list such as [184,92,46]")
    out: list[int | float] = []
    for part in parts:
        try:
            out.append(int(part))
        except ValueError:
            try:
                out.append(float(part))
            except ValueError:
                raise ValueError(f"{name}={value!r}: {part!r} is not a number") from None
    return out[0] if len(out) == 1 and not text.startswith("[") else out


def _flag(value, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: give True or False")


@dataclass
class PressOptions:
    """The vtprune model_args of one lmms-eval model (see the module docstring)."""

    method: str = "none"
    budget: int | float | None = None
    keep: object = None
    layer: object = None
    debias: str | None = None
    profile: str = "benchmark"
    positions: str | None = None
    pad_to_square: bool | None = None
    _presses: dict = field(default_factory=dict, repr=False)

    @classmethod
    def pop_from(cls, args: dict) -> PressOptions:
        """Take vtprune's keys out of `args` (lmms-eval's parsed model_args) and check them."""
        values = {key: args.pop(key) for key in KEYS if key in args}
        options = cls(
            method=str(values.get("method", "none")).strip().lower(),
            budget=_numbers(values.get("budget"), "budget"),
            keep=_numbers(values.get("keep"), "keep"),
            layer=_numbers(values.get("layer"), "layer"),
            debias=None if values.get("debias") is None else str(values["debias"]).strip().lower(),
            profile=str(values.get("profile", "benchmark")).strip(),
            positions=values.get("positions"),
            pad_to_square=_flag(values.get("pad_to_square"), "pad_to_square"),
        )
        options.check()
        return options

    @property
    def prunes(self) -> bool:
        return self.method != "none"

    def check(self) -> None:
        """Every mistake as a one-line ValueError, before any model loads."""
        from ..methods import METHODS

        if not self.prunes:
            given = [k for k in ("budget", "keep", "layer", "positions") if getattr(self, k) is not None]
            if given or self.debias not in (None, "none"):
                raise ValueError(
                    f"method=none runs the unpruned model: drop {', '.join(given) or 'debias'} or name a method ({', '.join(METHODS)})"
                )
            return
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: unknown; choose from none, {', '.join(METHODS)}")
        if self.debias is not None and self.debias not in DEBIAS_MODES:
            raise ValueError(f"debias={self.debias!r}: use {', '.join(DEBIAS_MODES)}")
        if METHODS[self.method].query is None and self.debias not in (None, "none"):
            raise ValueError(
                f"method={self.method} ranks without attention: there is nothing to debias (use debias=none)"
            )
        if self.profile not in ("benchmark", "default", "auto"):
            from ..debias.profiles import load_profile

            load_profile(self.profile)
        self.press()  # the method's own checks (budget and keep, layers, positions)

    @property
    def debias_mode(self) -> str:
        from ..methods import METHODS

        if self.debias is not None:
            return self.debias
        return "both" if self.prunes and METHODS[self.method].query is not None else "none"

    def profile_name(self, config=None, task: str | None = None) -> str:
        """The positional profile for a model (its config) and an lmms-eval task: see the module docstring."""
        if self.profile not in ("benchmark", "default"):
            return self.profile
        from ..debias.profiles import _builtin_index, default_profile_name
        from ..methods import METHODS

        cls = METHODS[self.method]
        default = default_profile_name(config, cls.name, cls.profile_name) if config is not None else None
        if default is None:
            return "auto"
        if self.profile == "benchmark" and task in TASK_PROFILES:
            index = _builtin_index()
            base = index[default].name.rsplit("/", 1)[0] if index[default].name.count("/") >= 2 else default
            candidate = f"{base}/{TASK_PROFILES[task]}"
            if candidate in index:
                return candidate
        return default

    def press(self, config=None, task: str | None = None):
        """The press for a model (its config; None: no profile is resolved) and task; None for method=none.
        Presses are built once per profile."""
        if not self.prunes:
            return None
        from ..debias import Debias
        from ..methods import METHODS

        mode = self.debias_mode
        profile = self.profile_name(config, task) if mode in ("positional", "both") and config is not None else None
        if mode in ("positional", "both") and config is None:
            profile = "auto"  # only checking the options
        key = (mode, profile)
        if key not in self._presses:
            debias = (
                None
                if mode == "none"
                else Debias(
                    profile=profile if mode in ("positional", "both") else None, padding=mode in ("padding", "both")
                )
            )
            options = {"budget": self.budget, "keep": self.keep, "layer": self.layer, "positions": self.positions}
            press = METHODS[self.method].create(debias=debias, **options)
            if config is None:
                return press
            self._presses[key] = press
        return self._presses[key]

    def setting(self, config=None, task: str | None = None, num_layers: int | None = None) -> dict:
        """What really runs for a model (its config) and task: the method, its schedule (one {"layer", "keep"}
        per stage, from `budget`/`keep`/`layer` or the method's defaults, for `num_layers` decoder layers),
        positions, debiasing and the resolved positional profile."""
        if not self.prunes:
            return {"method": "none"}
        press = self.press(config, task)
        stages = press.stages(num_layers) if num_layers is not None else press.stages()
        debias = press.debias
        return {
            "method": self.method,
            "budget": self.budget,
            "schedule": [{"layer": stage.layer, "keep": stage.keep} for stage in stages],
            "positions": getattr(press, "positions", None),
            "debias": self.debias_mode,
            "profile": None
            if debias is None or debias.profile is None
            else (getattr(debias.loaded_profile, "name", None) or str(debias.profile)),
            "padding": bool(debias is not None and debias.padding),
        }

    def describe(self, config=None, task: str | None = None, num_layers: int | None = None) -> str:
        """One line for the banner: the effective schedule, positions and debiasing."""
        if not self.prunes:
            return "unpruned (method=none)"
        setting = self.setting(config, task, num_layers)
        schedule = ", ".join(
            f"before layer {s['layer']} keep "
            + (f"{s['keep']:.3g} of the visual tokens" if isinstance(s["keep"], float) else str(s["keep"]))
            for s in setting["schedule"]
        )
        budget = "" if self.budget is None else f" (budget {self.budget})"
        debias = (
            "off"
            if setting["debias"] == "none"
            else (
                f"{setting['debias']}: positional profile {setting['profile'] or 'off'}, padding "
                f"{'on' if setting['padding'] else 'off'}"
            )
        )
        return f"{self.method}{budget}: {schedule}; positions {setting['positions']}; debias {debias}"

    def slug(self) -> str:
        """A short name of the setting for file and folder names: fastv-b64-both, pdrop-k184.92.46-none, none."""
        if not self.prunes:
            return "none"
        parts = [self.method]
        if self.budget is not None:
            parts.append(f"b{self.budget}")
        if self.keep is not None:
            parts.append("k" + ".".join(str(k) for k in (self.keep if isinstance(self.keep, list) else [self.keep])))
        if self.layer is not None:
            parts.append("l" + ".".join(str(k) for k in (self.layer if isinstance(self.layer, list) else [self.layer])))
        parts.append(self.debias_mode)
        return "-".join(parts)


__all__ = ["KEYS", "DEBIAS_MODES", "TASK_PROFILES", "PressOptions"]
