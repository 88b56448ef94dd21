#!/usr/bin/env bash
# Build the documentation site in strict mode: any warning, broken link or missing anchor fails the build.
#   scripts/build_docs.sh            # in an environment with docs/requirements.txt and vtprune (--no-deps is enough)
#   scripts/build_docs.sh --venv DIR # create/reuse a virtual environment DIR for it first (PyPI only)
# It redraws every figure of the docs from docs/results (python -m vtprune.apps.figures docs), then runs
# `mkdocs build --strict` into site/. Neither torch nor transformers is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--venv" ]]; then
    venv="${2:?--venv needs a directory}"
    [[ -x "$venv/bin/python" ]] || python -m venv "$venv"
    "$venv/bin/pip" install -q -r docs/requirements.txt
    "$venv/bin/pip" install -q --no-deps -e .
    export PATH="$venv/bin:$PATH"
fi
export MPLBACKEND=Agg
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" python -m vtprune.apps.figures docs --results docs/results --out docs/figures
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --clean
echo "docs built in $(pwd)/site"
