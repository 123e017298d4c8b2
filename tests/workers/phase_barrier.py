"""Run under torchrun by tests/test_rank_failures.py: rank 0 works alone on a phase (as local
rank 0 fetches the data in stage-in) for longer than $KUBELORA_PHASE_TIMEOUT_MINUTES, saying it is
getting on (argv[1] "beats") or not ("silent"); every rank then meets at the phase's barrier. A
rank whose wait ended prints "[timeout] <why>" and exits 3.

    KUBELORA_PHASE_TIMEOUT_MINUTES=0.1 torchrun --nproc-per-node 2 tests/workers/phase_barrier.py beats
"""
import os
import sys
import time

from kubelora_trainer import dist


def main(mode: str) -> None:
    env = dist.init()
    dist.HEARTBEAT_SECONDS = 0.5
    if env.rank == 0:
        for _ in range(24):  # 12 s, twice the 6 s timeout
            time.sleep(0.5)
            if mode == "beats":
                dist.heartbeat()
    try:
        dist.phase_barrier("stage-in")
    except RuntimeError as e:
        print(f"[timeout] rank {env.rank}: {e}", flush=True)
        os._exit(3)
    print(f"[met] rank {env.rank}", flush=True)
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
