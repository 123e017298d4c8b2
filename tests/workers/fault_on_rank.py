"""The real trainer under torchrun, with one fault injected on rank 1 from its 3rd micro-step on (a
stand-in for a diverging or hung rank, which cannot be produced on demand): FAULT=nan makes its
Flux loss NaN, FAULT=hang makes it stop answering (it sleeps).

    FAULT=nan torchrun --nproc-per-node 2 tests/workers/fault_on_rank.py job.yaml
"""
import os
import sys
import time

from kubelora_trainer.models.flux.family import FAMILY

_loss, _calls = FAMILY.loss, [0]


def faulty(*args, **kwargs):
    out = _loss(*args, **kwargs)
    _calls[0] += 1
    if os.environ["RANK"] == "1" and _calls[0] >= 3:
        if os.environ["FAULT"] == "hang":
            time.sleep(600)
        return out * float("nan")
    return out


FAMILY.loss = faulty

if __name__ == "__main__":
    from kubelora_trainer.__main__ import main
    rc = main(["run", "--spec", sys.argv[1]])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
