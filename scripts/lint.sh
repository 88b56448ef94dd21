#!/usr/bin/env bash
# Lint, format check and type check of src/ (configured in pyproject.toml: [tool.ruff], [tool.mypy]).
#   scripts/lint.sh              # ruff and mypy on PATH; `python` is the project's interpreter (vtprune's dependencies)
#   scripts/lint.sh --venv DIR   # create/reuse a virtual environment DIR with the pinned ruff and mypy first (PyPI)
# mypy type-checks against the torch, transformers and numpy of the project's interpreter (--python-executable),
# so they are not installed a second time. All three checks run; the script fails if any of them does.
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF_VERSION=0.17.6
MYPY_VERSION=2.4.1
project_python="$(command -v python)"
if [[ "${1:-}" == "--venv" ]]; then
    venv="${2:?--venv needs a directory}"
    [[ -x "$venv/bin/python" ]] || python -m venv "$venv"
    "$venv/bin/pip" install -q "ruff==${RUFF_VERSION}" "mypy==${MYPY_VERSION}"
    export PATH="$venv/bin:$PATH"
fi
failed=()
echo "== ruff check src" && ruff check src || failed+=("ruff check")
echo "== ruff format --check src" && ruff format --check src || failed+=("ruff format --check (run: ruff format src)")
echo "== mypy (with $project_python)" && mypy --python-executable "$project_python" || failed+=("mypy")
if (( ${#failed[@]} )); then
    echo "lint failed: ${failed[*]}" >&2
    exit 1
fi
echo "lint passed"
