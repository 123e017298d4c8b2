"""How a trainer process ends. Each rank prints its root cause as one `[error]` line and records
it (exit code and reason) in $KUBELORA_EXIT_DIR, which the launcher (launch.py) reads after
torchrun has exited: torchrun turns a worker's exit code 2 (bad input) into 1, so without the
record a pod could not tell "bad input, do not retry" from a crash."""
from __future__ import annotations

import json
import os
import sys

EXIT_DIR_ENV = "KUBELORA_EXIT_DIR"
BAD_INPUT = 2   # the Job's podFailurePolicy fails the Job at once on this exit code
FAILED = 1      # anything else, a transient storage fault included: the Job retries, the run resumes
# stopped with a checkpoint because a rank of another pod was told to stop (its pod preempted,
# evicted or drained): the Job's podFailurePolicy ignores it as it ignores the disruption itself,
# so the replacement pods resume without spending runPolicy.backoffLimit or a gang restart
PEER_STOPPED = 3


# the errors that mean bad input (a spec, data, model or storage problem a retry cannot fix), by
# class name so this module imports nothing of the trainer
BAD_INPUT_ERRORS = {"RunError", "DatasetError", "StorageError", "AdapterError", "ModelError", "SpecError",
                    "FileNotFoundError",
                    "OutOfMemoryError"}  # torch's, on a GPU: the same step (or sample) would run out again


def code_of(error: BaseException) -> int:
    """BAD_INPUT for a failure the trainer recognises as bad input, unless the error says it is
    transient (storage.StorageError.transient: the object store or the network failed); FAILED for
    that and for anything else (a crash), so the Job retries it
    and resumes rather than failing for good."""
    if getattr(error, "transient", False):
        return FAILED
    names = {c.__name__ for c in type(error).__mro__}
    return BAD_INPUT if names & BAD_INPUT_ERRORS else FAILED


def fail(code: int, message: str, peer: bool = False) -> int:
    """Record the root cause for the launcher, which prints it once, last, for all ranks; without
    a launcher (plain torchrun or one process) print it here. Returns code."""
    if not record(code, message, peer):
        print(f"[error] {message}", file=sys.stderr, flush=True)
    return code


def record(code: int, message: str, peer: bool = False) -> bool:
    """True when the launcher will read it."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return False
    rank = os.environ.get("RANK", "0")
    path = os.path.join(folder, f"rank-{rank}.json")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump({"rank": int(rank), "code": code, "message": message, "peer": peer}, f)
        os.replace(path + ".tmp", path)
        return True
    except OSError:
        return False  # the exit code still says it; print the reason here then
