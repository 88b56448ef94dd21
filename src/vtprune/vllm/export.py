"""Export a vtprune-loadable LLaVA (`testbed`, `testbed-lm`, a local LLaVA-1.5 or LLaVA-NeXT directory) in the layout
vLLM loads.

    python -m vtprune.vllm.export testbed-lm OUT_DIR

transformers 5 saves a LLaVA's CLIP tower as `vision_tower.embeddings...`, `vision_tower.encoder...`; vLLM 0.32's
LLaVA and LLaVA-NeXT loaders expect `vision_tower.vision_model.*` (the CLIPVisionModel layout of transformers 4). The export
saves the model and its processor with `save_pretrained` and renames those keys; nothing else changes. The
directory is written next to OUT_DIR and renamed into place when complete.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

VISION_PREFIX = "vision_tower."
VLLM_VISION_PREFIX = "vision_tower.vision_model."
#: the transformers classes the plugin serves
SERVED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


def vllm_key(key: str) -> str:
    """The name vLLM 0.32 gives a saved LLaVA weight: `vision_tower.X` -> `vision_tower.vision_model.X`."""
    if key.startswith(VISION_PREFIX) and not key.startswith(VLLM_VISION_PREFIX):
        return VLLM_VISION_PREFIX + key[len(VISION_PREFIX) :]
    return key


def export(spec: str, out: str | Path) -> Path:
    """Load `spec` with `vtprune.apps.loading.load_model`, write it to `out` in vLLM's layout; returns `out`."""
    from safetensors.torch import load_file, save_file

    from ..apps.loading import load_model

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new directory or remove it")
    model, processor = load_model(spec)
    if type(model).__name__ not in SERVED:
        raise ValueError(
            f"{spec} is a {type(model).__name__}: the vLLM plugin serves LLaVA-1.5 and LLaVA-NeXT models "
            f"({', '.join(SERVED)})"
        )
    temporary = out.with_name(out.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    for file in sorted(temporary.glob("*.safetensors")):
        tensors = load_file(file)
        save_file({vllm_key(k): v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})
    index = temporary / "model.safetensors.index.json"
    if index.is_file():
        import json

        data = json.loads(index.read_text())
        data["weight_map"] = {vllm_key(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=1))
    if out.exists():
        out.rmdir()
    temporary.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m vtprune.vllm.export MODEL OUT_DIR   (MODEL: testbed, testbed-lm or a LLaVA-1.5 or "
            "LLaVA-NeXT directory)",
            file=sys.stderr,
        )
        return 2
    try:
        path = export(argv[0], argv[1])
    except (FileExistsError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    import json

    next_model = json.loads((path / "config.json").read_text())["architectures"] == [SERVED[1]]
    architecture, method = (
        ("VtpruneLlavaNextForConditionalGeneration", "divprune")
        if next_model
        else ("VtpruneLlavaForConditionalGeneration", "fastervlm")
    )
    print(
        f'wrote {path} (serve it with: vllm serve {path} --hf-overrides \'{{"architectures": ["{architecture}"], '
        f'"vtprune": {{"method": "{method}", "keep": 0.25}}}}\')'
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
