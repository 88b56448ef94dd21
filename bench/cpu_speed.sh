#!/usr/bin/env bash
# The issue-18 CPU prefill tables in one run (batch 1, one thread each, so that two tables can share a 2-core
# machine): testbed-lm (the shipped model) eager and compiled at 192/128/64 for every method (compiled: a fresh
# compile per row, timed by CPU time as rows cannot interleave; the log prints each row as it is done), and the
# LLaVA-1.5-7B shape (4 decoder layers, vision tower included) eager at 192/128/64 and compiled at 128 (FastV,
# PyramidDrop). Writes Markdown tables and logs to $OUT (default bench/cpu_speed_out).
#     bash bench/cpu_speed.sh [testbed|7b|all]
set -u
cd "$(dirname "$0")"
OUT=${OUT:-cpu_speed_out}
WHICH=${1:-all}
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one bench/prefill.py table
  local name=$1
  shift
  echo "=== $name ($(date +%T))"
  python prefill.py --threads 1 --markdown "$OUT/$name.md" "$@" > "$OUT/$name.log" 2>&1
  echo "    exit $? ($(date +%T))"
}
if [ "$WHICH" != 7b ]; then
  run testbed_lm_eager --model-shape testbed-lm --repeats 3
  run testbed_lm_compiled --model-shape testbed-lm --repeats 5 --budgets 128,64,192 --compile default --cpu-time
fi
if [ "$WHICH" != testbed ]; then
  run llava15_eager --plain --with-vision --repeats 2
  run llava15_compiled --plain --with-vision --repeats 3 --budgets 128,64,192 --compile default --cpu-time
fi
echo "tables in $OUT/*.md"
