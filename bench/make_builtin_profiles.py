"""Convert the published LLaVA-1.5-7B debiasing weights into vtprune's built-in profile file.

    python bench/make_builtin_profiles.py [../shared/reference/llava15_7b_published_profiles.json]

Writes src/vtprune/debias/profiles/llava-1.5-7b.json. Exponential weights w_i = exp(-decay * i) become
f(x) = exp(sigma * x) with sigma = 576 * decay; the FastV curve of weights w becomes the trend 1/w.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src/vtprune/debias/profiles/llava-1.5-7b.json"
SOURCE = (
    "Published debiasing weights of 'Attention Debiasing for Token Pruning in Vision-Language Models' "
    "(arXiv 2508.17807), Apache-2.0 code release; LLaVA-1.5-7B, 576 visual tokens (24x24, 336 px, pad-to-square)"
)
QUERY = {
    "fastv": "last",
    "tokencarve": "last",
    "pyramiddrop": "last_instruction",
    "sparsevlm": "text_raters",
    "himap": "text_after_image",
}
LENGTH = 576


def main(reference: Path) -> None:
    data = json.loads(reference.read_text())
    profiles, aliases = [], {}
    curve_weights = data["fastv_weight_curve"]["values"]
    profiles.append(
        {
            "name": "llava-1.5-7b/fastv",
            "kind": "curve",
            "length": len(curve_weights),
            "curve": [1.0 / w for w in curve_weights],
            "method": "fastv",
            "layer": 2,
            "query": QUERY["fastv"],
            "model": "llava-hf/llava-1.5-7b-hf",
            "source": SOURCE,
            "description": "FastV's published per-position curve (one for all benchmarks; not exponential).",
        }
    )
    for method, benchmarks in sorted(data["profiles"].items()):
        sigmas = []
        for benchmark, values in sorted(benchmarks.items()):
            sigma = LENGTH * values["decay_per_token"]
            sigmas.append(sigma)
            profiles.append(
                {
                    "name": f"llava-1.5-7b/{method}/{benchmark}",
                    "kind": "exp",
                    "length": LENGTH,
                    "sigma": sigma,
                    "mu": 1.0,
                    "method": method,
                    "layer": 2,
                    "query": QUERY[method],
                    "model": "llava-hf/llava-1.5-7b-hf",
                    "source": SOURCE,
                    "description": f"{method} on {benchmark}: published weights exp(-{values['decay_per_token']!r} * i).",
                }
            )
        # a method's default: the median sigma over its ten benchmarks (robust to one odd benchmark)
        median = statistics.median(sigmas)
        profiles.append(
            {
                "name": f"llava-1.5-7b/{method}/median",
                "kind": "exp",
                "length": LENGTH,
                "sigma": median,
                "mu": 1.0,
                "method": method,
                "layer": 2,
                "query": QUERY[method],
                "model": "llava-hf/llava-1.5-7b-hf",
                "source": SOURCE,
                "description": f"{method}: median sigma over the {len(sigmas)} published benchmark profiles.",
            }
        )
        aliases[f"llava-1.5-7b/{method}"] = f"llava-1.5-7b/{method}/median"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"profiles": profiles, "aliases": aliases}, indent=1))
    print(f"wrote {len(profiles)} profiles and {len(aliases)} aliases to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    default = ROOT.parent / "shared/reference/llava15_7b_published_profiles.json"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
