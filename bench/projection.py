"""The projected 2x8-GPU step efficiency (trainer/kubelora_trainer/scaling.py) of every GPU
benchmark row in bench/results/*.jsonl: 400 Gb/s per GPU at 80% of line rate, one micro-batch per
optimizer step (the worst case for replicate; accumulation only helps it).

    python bench/projection.py [bench/results/2026-11-26-h100.jsonl ...]   # a Markdown table
"""
import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from kubelora_trainer.scaling import project  # noqa: E402


def rows(paths):
    for p in paths:
        for line in Path(p).read_text().splitlines():
            r = json.loads(line)
            if r.get("s_per_step") and r.get("lora_m") and r.get("params_b"):
                yield Path(p).name, r


def main(paths):
    print("| results file | case | s/step | LoRA grads MB | replicate: efficiency | shard (bf16 base): overlapped / serial |")
    print("|---|---|---|---|---|---|")
    for name, r in rows(paths):
        grads = r["lora_m"] * 1e6 * 4                 # fp32 LoRA gradients
        weights = r["params_b"] * 1e9 * 2              # what FSDP2 would gather, bf16
        rep = project(r["s_per_step"], grads, weights, "replicate")
        sh = project(r["s_per_step"], grads, weights, "shard")
        print(f"| {name} | {r['case']} | {r['s_per_step']:.3f} | {grads / 1e6:.0f} | {rep.efficiency_serial:.1%} "
              f"| {sh.efficiency_overlapped:.1%} / {sh.efficiency_serial:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(glob.glob(str(Path(__file__).parent / "results" / "*.jsonl"))))
