#!/usr/bin/env bash
# GPU benchmark, run on a lent GPU machine through the device tool (see docs/benchmarks.md):
#   carry: [".stock", ".whl"]   command: bash bench/gpu/run.sh
# Installs the carried wheels (diffusers, torchao, pydantic...) into /tmp/site, then runs kubelora's
# own step (bench/gpu/lora_step.py) and the stock reference (../shared/bench, copied to .stock) on
# the same card, one JSON line per case to $OUT/results.jsonl (written as each case ends).
# CASES: "runner:model:mode" items; runner kubelora or stock.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/trainer OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, peft, diffusers; print(torch.__version__, peft.__version__, diffusers.__version__)" | tee -a "$OUT/gpu.txt"
# the next run's questions (docs/benchmarks.md, fourth run): the memory plan with fp8 now that
# checkpointing works around fp8 GEMMs, Flux fp8 with checkpointing, training.cpuOffload on a GPU,
# and the stock Flux step for the ratio; about 2 minutes a case
CASES=${CASES:-"kubelora:hunyuan:compile_auto_fp8 kubelora:flux:compile_gc_fp8 kubelora:hunyuan:compile_gc_off stock:flux:bf16_compile_nogc"}
for c in $CASES; do
  IFS=: read -r runner model mode <<<"$c"
  log="/tmp/${runner}_${model}_${mode}.err"
  if [ "$runner" = stock ]; then
    timeout ${PER:-150} python3 .stock/stock_lora_step.py "$mode" 2>"$log" | python3 bench/gpu/stock_line.py "$model" \
      | tee -a "$OUT/results.jsonl"
  else
    timeout ${PER:-150} python3 bench/gpu/lora_step.py "$model" "$mode" 2>"$log" | grep RESULT | sed 's/^RESULT //' | tee -a "$OUT/results.jsonl"
  fi
  { echo "== $c"; tail -n 40 "$log"; } >>"$OUT/logs.txt"
  tail -n 2 "$log"
done
