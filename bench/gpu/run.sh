#!/usr/bin/env bash
# GPU benchmark, run on a lent GPU machine through the device tool (see docs/benchmarks.md):
#   carry: [".stock", ".whl"]   command: bash bench/gpu/run.sh
# Installs the carried wheels (diffusers, torchao, pydantic...) into /tmp/site, runs the stock
# reference beside kubelora's own step on the same card, JSON lines to $OUT/results.jsonl.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/trainer OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, peft, diffusers; print(torch.__version__, peft.__version__, diffusers.__version__)" | tee -a "$OUT/gpu.txt"
for m in ${STOCK_MODES:-bf16_compile_nogc}; do
  timeout ${PER:-150} python3 .stock/stock_lora_step.py $m 2>"$OUT/stock_$m.err" | grep RESULT | tee -a "$OUT/results.jsonl"
done
for m in ${MODES:-compile_nogc eager_nogc compile_gc}; do
  timeout ${PER:-150} python3 bench/gpu/flux_step.py $m 2>"$OUT/kubelora_$m.err" | grep RESULT | tee -a "$OUT/results.jsonl"
  tail -n 3 "$OUT/kubelora_$m.err"
done
