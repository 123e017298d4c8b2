"""The real trainer under torchrun, with one fault injected (a stand-in for a diverging rank,
which cannot be produced on demand): from its 3rd micro-step on, rank 1's Flux loss is NaN.

    torchrun --nproc-per-node 2 tests/workers/nan_on_rank.py job.yaml
"""
import os
import sys

from kubelora_trainer.models.flux.family import FAMILY

_loss, _calls = FAMILY.loss, [0]


def nan_on_rank_1(*args, **kwargs):
    out = _loss(*args, **kwargs)
    _calls[0] += 1
    return out * float("nan") if os.environ["RANK"] == "1" and _calls[0] >= 3 else out


FAMILY.loss = nan_on_rank_1

if __name__ == "__main__":
    from kubelora_trainer.__main__ import main
    rc = main(["run", "--spec", sys.argv[1]])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
