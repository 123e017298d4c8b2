#!/usr/bin/env bash
# GPU benchmark, run on a lent GPU machine through the device tool (see docs/benchmarks.md):
#   carry: [".stock", ".whl"]   command: bash bench/gpu/run.sh
# Installs the carried wheels (diffusers, torchao, pydantic...) into /tmp/site, then runs kubelora's
# own step (bench/gpu/lora_step.py) and the stock reference (../shared/bench, copied to .stock) on
# the same card, one JSON line per case to $OUT/results.jsonl (written as each case ends).
# CASES: "runner:model:mode[:VAR=VAL,...]" items; runner kubelora or stock; the optional fourth field sets
# environment for that case alone (ATTN=flash|cudnn, HY_CAPTIONS=varied, PROFILE=1, ASYNC=1, SYNCS=1: bench/gpu/lora_step.py;
# PER=seconds: that case's time limit, 150 by default). Stock cases take no fourth field.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/trainer OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, peft, diffusers; print(torch.__version__, peft.__version__, diffusers.__version__)" | tee -a "$OUT/gpu.txt"
# the next run's questions (docs/benchmarks.md, sixth run): the memory plan, now counting compiled
# blocks at 88% of their eager saves (decisions.md 61), against the peaks it predicts, for Flux at
# 26 GiB (the <= 0.45 s at <= 26 GiB target) and HunyuanVideo at 30 GiB (<= 1.2 s at <= 30 GiB), then
# the stock Flux step and kubelora's fp8 one on the same machine; about 6 minutes. Apart:
# kubelora:hunyuan:compile_gc_fp8:ATTN=flash (flash against cuDNN in one run),
# kubelora:hunyuan:compile_gc_fp8:HY_CAPTIONS=varied,PER=170 (masks reach cuDNN's attention) and
# kubelora:flux:eager_nogc_fp8:ATTN=cudnn (decision 6's crash). After the cases, BLOCKS (the
# bench/gpu/fp8_block.py variants; empty: none) runs: by default what LoRA's path costs in a compiled
# block, peft's share of it, and whether one GEMM for the A matrices on a shared input pays (a minute)
CASES=${CASES:-"kubelora:flux:compile_auto_fp8:BUDGET_GIB=26 kubelora:hunyuan:compile_auto_fp8:BUDGET_GIB=30 stock:flux:bf16_compile_nogc kubelora:flux:compile_nogc_fp8"}
for c in $CASES; do
  IFS=: read -r runner model mode extra <<<"$c"
  log="/tmp/${runner}_${model}_${mode}_${extra//[^A-Za-z0-9]/_}.err"
  if [ "$runner" = stock ]; then
    timeout ${PER:-150} python3 .stock/stock_lora_step.py "$mode" 2>"$log" | python3 bench/gpu/stock_line.py "$model" \
      | tee -a "$OUT/results.jsonl"
  else
    (  # the fourth field's VAR=VAL words, for this case alone (PER too)
      # shellcheck disable=SC2046
      [ -n "${extra:-}" ] && export $(tr ',' ' ' <<<"$extra")
      timeout "${PER:-150}" python3 bench/gpu/lora_step.py "$model" "$mode" 2>"$log" \
        | grep RESULT | sed 's/^RESULT //' | tee -a "$OUT/results.jsonl"
    )
  fi
  { echo "== $c"; tail -n 40 "$log"; } >>"$OUT/logs.txt"
  tail -n 2 "$log"
done
BLOCKS=${BLOCKS-"fp8_fast fp8_lora fp8_lora_plain fp8_lora_fusedA"}
if [ -n "$BLOCKS" ]; then
  # shellcheck disable=SC2086
  timeout 240 python3 bench/gpu/fp8_block.py $BLOCKS 2>/tmp/fp8_block.err | tee -a "$OUT/blocks.jsonl"  # ms a block
  { echo "== fp8_block $BLOCKS"; tail -n 40 /tmp/fp8_block.err; } >>"$OUT/logs.txt"
fi
