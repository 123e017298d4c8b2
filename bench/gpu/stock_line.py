"""Reads the stock reference's RESULT lines on stdin, prints them in lora_step.py's schema
(case, s_per_step, peak_gib, gpu, torch; mfu left to lora_step.py, which counts FLOPs)."""
import json
import sys

import torch

model = sys.argv[1]
for line in sys.stdin:
    if not line.startswith("RESULT "):
        continue
    d = json.loads(line[len("RESULT "):])
    out = {"case": f"stock_{model}_{d.pop('mode', '?')}", "s_per_step": d.pop("step_s_median", None),
           "peak_gib": d.pop("peak_mem_gib", None), "mfu": None,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    print(json.dumps({**out, **d}), flush=True)
