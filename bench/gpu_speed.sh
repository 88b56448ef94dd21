#!/usr/bin/env bash
# The issue-18 GPU table in one run (about 6-7 minutes on one H100/H200; each step has its own time limit, so
# a slow step loses its own rows only). Writes Markdown tables and logs to $OUT (default bench/gpu_speed_out):
#   LLaVA-1.5-7B shape, full depth, bf16: every method at 192/128/64 (+ debias), batch 1 and 8, eager;
#   FastV/PyramidDrop 128 compiled with CUDA graphs (mode="reduce-overhead") at batch 1;
#   KV-cache bytes after prefill and decode ms per token over 256 tokens (FastV, PyramidDrop, HiMAP 128);
#   the long-input shapes (LLaVA-NeXT 2,880 visual tokens, Video-LLaVA 2,048, Qwen2.5-VL 1,024) at batch 1.
#     bash bench/gpu_speed.sh            # then read $OUT/*.md; $OUT/card.txt names the GPU
set -u
cd "$(dirname "$0")"
OUT=${OUT:-gpu_speed_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/card.txt"
LM_METHODS=fastv,pdrop,himap,sparsevlm,tokencarve,dart,divprune,random

run() {  # run NAME SECONDS ARGS...: one bench/prefill.py table
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" python prefill.py --device cuda --markdown "$OUT/$name.md" "$@" > "$OUT/$name.log" 2>&1
  echo "    exit $? ($(date +%T))"
}

run llava15_b1 90 --batch 1 --repeats 3 --with-vision
run llava15_b8 120 --batch 8 --repeats 3 --with-vision
run llava15_b1_compiled 90 --batch 1 --repeats 5 --compile reduce-overhead --methods fastv,pdrop --budgets 128
run llava15_b8_compiled 60 --batch 8 --repeats 3 --compile default --methods fastv --budgets 128
run llava15_decode 60 --batch 1 --repeats 1 --methods fastv,pdrop,himap --budgets 128 --decode 256
run next_b1 45 --model-shape llava-next-7b --batch 1 --repeats 3 --methods $LM_METHODS
run video_b1 45 --model-shape video-llava-7b --batch 1 --repeats 3 --methods $LM_METHODS
run qwen_b1 45 --model-shape qwen2.5-vl-7b --qwen-grid 64 --batch 1 --repeats 3 --methods $LM_METHODS  # 1,024 visual tokens
echo "tables in $OUT/*.md"
