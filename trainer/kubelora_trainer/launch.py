"""The launcher every pod (and `kubelora run`) starts: torchrun, with the workers' own exit reason.

    python -m kubelora_trainer launch --nnodes=2 --nproc-per-node=8 --node-rank=0 \
        --master-addr=job-0.job-workers --master-port=29500 -m kubelora_trainer run --spec spec.yaml

torchrun exits 1 whatever its workers exited with, so a bad manifest or dataset would be retried
on GPUs. The workers record why they stopped (exits.py); this launcher exits 2 when any of them
found bad input, prints the root cause once, last (after torchrun's own summary), writes it to the
container's termination message, and forwards SIGINT/SIGTERM to torchrun and its workers so none
is orphaned.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .exits import BAD_INPUT, EXIT_DIR_ENV, PEER_STOPPED

TERMINATION_LOG = "/dev/termination-log"


def read_records(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("rank-*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return out


def exit_code(torchrun_rc: int, records: list[dict], workers: int | None = None) -> int:
    """The pod's exit code: 0 on success, also when every one of this node's `workers` recorded
    that it finished (a signal that reached torchrun after the workers' last check makes torchrun
    exit 1 although the run is done); 2 when a worker found bad input (so the Job fails at once
    instead of retrying); 128 + signal when a worker stopped on one (checkpoint written);
    PEER_STOPPED when the workers stopped only because a rank of another pod did (the Job's
    podFailurePolicy ignores it); else torchrun's code."""
    if torchrun_rc == 0:
        return 0
    if workers and len(records) == workers and all(r.get("code") == 0 for r in records):
        return 0
    records = [r for r in records if r.get("code") != 0]
    if any(r.get("code") == BAD_INPUT for r in records):
        return BAD_INPUT
    stopped = [r["code"] for r in records if (r.get("code") or 0) > 128]  # stopped on a signal, checkpoint written
    if stopped:
        return max(stopped)
    if records and all(r.get("code") == PEER_STOPPED for r in records):
        return PEER_STOPPED
    return torchrun_rc or 1


def root_cause(records: list[dict]) -> str | None:
    """The reason to print last: a rank's own failure before a peer's report of it."""
    records = [r for r in records if r.get("code") != 0]  # a worker that finished says nothing of the failure
    own = [r for r in records if not r.get("peer")]
    first = (own or records or [None])[0]
    return f"rank {first['rank']}: {first['message']}" if first else None


_STORE_WAIT = re.compile(r"Timed out after (\d+) seconds waiting for clients\. (\d+)/(\d+) clients joined")
_STORE_REACH = re.compile(r"DistNetworkError: The client socket has timed out after (\d+)ms while trying to connect "
                          r"to \((.+), (\d+)\)")


def rendezvous_timeout(line: str) -> str | None:
    """The cause to report when torchrun's static rendezvous gave up (command.py sets how long it
    waits), from the exception line torchrun's agent prints: node 0's store saw only some nodes
    join ("Timed out after 1801 seconds waiting for clients. 1/2 clients joined.": node 0 counts
    itself), or another node never reached node 0's store. Either way pods of the gang never
    started (not scheduled, no free GPUs, an image that does not pull): not a crash of the
    training. None for any other line. Pure."""
    m = _STORE_WAIT.search(line)
    if m:
        waited, joined, world = int(m[1]), int(m[2]), int(m[3])
        return (f"the rendezvous timed out after {waited} s: {world - joined} of the {world} nodes never joined node "
                f"0's store (only {joined} did); their pods were not scheduled or never started (see the job's "
                "status; schedule the gang together, e.g. with Kueue)")
    m = _STORE_REACH.search(line)
    if m:
        return (f"the rendezvous timed out after {int(m[1]) // 1000} s: node 0's store at {m[2]}:{m[3]} never "
                "answered (1 node missing at least: node 0's pod was not scheduled or never started; see the job's "
                "status; schedule the gang together, e.g. with Kueue)")
    return None


class TorchrunFilter:
    """Which stderr lines reach the log. Once torchrun's agent reports a failed worker or a
    received signal, what it prints next is its own traceback and ChildFailedError summary (about
    30 lines that make every bad manifest look like a crash): from there only the trainer's own
    lines ("[checkpoint] ...", "[error] ...") pass; the launcher prints the root cause last. Each
    worker failure torchrun reports becomes one line of its own ("[launch] local rank 0 (pid 12)
    exited with SIGKILL"), kept in `workers` for a cause when no worker recorded one (killed by
    the kernel, crashed in native code). KUBELORA_LAUNCH_VERBOSE=1 passes everything."""
    TRIGGER = re.compile(r"^[EW]\d{4} .*torch/distributed/elastic/.*(failed \(exitcode|death signal)")
    FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")
    OURS = re.compile(r"^\[[a-z][a-z0-9 -]*\]")

    def __init__(self, verbose: bool = False):
        self.verbose, self.tripped, self.dropped, self.workers = verbose, False, 0, []
        self.rendezvous: str | None = None  # the rendezvous gave up: why (rendezvous_timeout)

    def passes(self, line: str) -> tuple[bool, str]:
        """(forward it, the text to forward)."""
        self.rendezvous = rendezvous_timeout(line) or self.rendezvous
        if self.verbose:
            return True, line
        failed = self.FAILED.search(line) if self.TRIGGER.search(line) else None
        if failed:
            self.tripped = True
            code, rank, pid = int(failed[1]), failed[2], failed[3]
            how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"code {code}"
            self.workers.append(f"local rank {rank} (pid {pid}) exited with {how}")
            return True, f"[launch] {self.workers[-1]}\n"
        if self.TRIGGER.search(line):
            self.tripped = True
        if self.tripped and not self.OURS.match(line):
            self.dropped += 1
            return False, line
        return True, line


def _forward(stream, keep: TorchrunFilter) -> None:
    """Copy the workers' and torchrun's stderr through the filter until EOF. A write that fails
    (stderr piped into `head`) does not stop the reading: a full pipe would block every worker."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    broken = False
    for raw in iter(stream.readline, b""):
        ok, text = keep.passes(raw.decode("utf-8", "replace"))
        if not ok or broken:
            continue
        try:
            if out is not None:
                out.write(text.encode("utf-8", "replace"))
                out.flush()
            else:
                sys.stderr.write(text)
        except (OSError, ValueError):
            broken = True
    stream.close()


def run(torchrun_args: list[str], env: dict | None = None) -> int:
    import threading
    folder = Path(tempfile.mkdtemp(prefix="kubelora-exit-"))
    child_env = {**(env if env is not None else os.environ), EXIT_DIR_ENV: str(folder)}
    child_env.setdefault(SHUTDOWN_TIMEOUT_ENV, str(shutdown_timeout(child_env)))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args], env=child_env,
                            start_new_session=True, stderr=subprocess.PIPE)
    keep = TorchrunFilter(verbose=child_env.get(VERBOSE_ENV) == "1")
    pump = threading.Thread(target=_forward, args=(proc.stderr, keep), daemon=True)
    pump.start()

    forwarded = []

    def forward(signum, _frame):
        forwarded.append((signum, time.monotonic()))
        if len(forwarded) > 1:  # a second signal (Ctrl-C again): the workers are killed now, not stopped
            print(f"[launch] {signal.Signals(signum).name} again: the workers are killed now, without a stop "
                  "checkpoint", file=sys.stderr, flush=True)
            for pid in [*children_of(proc.pid), proc.pid]:  # torchrun starts each worker in a session of its own
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        try:  # the first: torchrun stops the workers, which write their stop checkpoint
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    rdzv = rendezvous_of(torchrun_args)
    master = AddressWatch(rdzv[1]) if rdzv and rdzv[0] > 0 else None
    try:
        rc = proc.wait()
        ended = time.monotonic()  # before the master-close wait and the pump's join
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _reap(proc.pid)
        pump.join(timeout=30)  # the workers are gone: their and torchrun's last lines, then EOF
        if master:
            master.stop()
    records = read_records(folder)
    shutil.rmtree(folder, ignore_errors=True)
    code = exit_code(rc, records, nproc_of(torchrun_args))
    if (code > 128 or code == PEER_STOPPED) and master:
        # stopped with a checkpoint, and this pod will be replaced at once: its replacement must
        # not meet node 0's old store (still open while node 0 writes the checkpoint's marker) and
        # wait there for a run that is over, so this pod ends only once that store has closed. The
        # store is watched at the address node 0's name had during the run: node 0's replacement
        # (a new pod, a new address) answering at the name does not hold this pod back.
        t0 = time.monotonic()
        limit = master_wait(float(os.environ.get(MASTER_WAIT_ENV, "60")), child_env,
                            forwarded[0][1] if forwarded else None, t0)
        addr = master.last or rdzv[1]
        closed = wait_until_closed(addr, rdzv[2], limit)
        where = rdzv[1] if addr == rdzv[1] else f"{rdzv[1]} ({addr})"
        print(f"[launch] node 0's rendezvous {where}:{rdzv[2]} " + (f"closed after {time.monotonic() - t0:.1f} s"
              if closed else f"still open after {limit:.0f} s") + "; this node's pod ends now", file=sys.stderr,
              flush=True)
    if code != 0:  # the root cause, once, last
        if keep.dropped:
            print(f"[launch] torchrun's own report of the stop left out ({keep.dropped} lines; "
                  f"{VERBOSE_ENV}=1 shows it)", file=sys.stderr, flush=True)
        cause = root_cause(records)
        stopped = code > 128 or code == PEER_STOPPED
        if cause is None and forwarded:  # no worker recorded its stop: before the loop (which checkpoints
            stopped = True            # on a signal), or killed by torchrun while still writing one
            name, limit = signal.Signals(forwarded[0][0]).name, int(child_env[SHUTDOWN_TIMEOUT_ENV])
            if len(forwarded) > 1:
                cause = (f"stopped by {name}, then killed by a second {signal.Signals(forwarded[1][0]).name} "
                         "(no checkpoint from this stop)")
            elif ended - forwarded[0][1] >= limit:
                cause = (f"stopped by {name}; the workers, still stopping after {limit} s, were killed (no checkpoint "
                         f"from this stop: {SHUTDOWN_TIMEOUT_ENV}, from the pod's grace period, is too short)")
            else:
                cause = f"stopped by {name} before training began (no checkpoint written)"
        elif cause is None:
            cause = keep.rendezvous or "; ".join(keep.workers) or f"torchrun exited with code {rc}"
        print(f"[{'stopped' if stopped else 'error'}] {cause}", file=sys.stderr, flush=True)
        _termination_message(cause)
    return code


MASTER_WAIT_ENV = "KUBELORA_MASTER_CLOSE_WAIT_SECONDS"
# torchrun kills the workers this long after forwarding them a SIGTERM (its own default: 30 s, too
# short for a large model's checkpoint); set from the pod's grace period (GRACE_ENV, the operator
# sets it to terminationGracePeriodSeconds) less STOP_MARGIN_SECONDS for the launcher's last lines,
# else LOCAL_SHUTDOWN_SECONDS. A value set in the environment is kept.
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
GRACE_ENV = "KUBELORA_STOP_GRACE_SECONDS"
STOP_MARGIN_SECONDS = 10
LOCAL_SHUTDOWN_SECONDS = 600


def master_wait(limit: float, env: dict, signaled_at: float | None, now: float) -> float:
    """How long a stopped node waits for node 0's old store to close: limit, and for a pod told to
    stop (signaled_at), no longer than its grace period leaves (less 3 s to exit), so it ends with
    its own exit code rather than the kubelet's SIGKILL (137) after its worker's linger. Pure."""
    try:
        grace = float(env[GRACE_ENV])
    except (KeyError, ValueError):
        return limit
    if signaled_at is None:
        return limit
    return max(0.0, min(limit, grace - (now - signaled_at) - 3))


def shutdown_timeout(env: dict) -> int:
    """Seconds torchrun gives the workers between the signal it forwards and SIGKILL. Pure."""
    try:
        grace = int(env[GRACE_ENV])
    except (KeyError, ValueError):
        return LOCAL_SHUTDOWN_SECONDS
    return max(1, grace - min(STOP_MARGIN_SECONDS, grace // 4))
VERBOSE_ENV = "KUBELORA_LAUNCH_VERBOSE"


def nproc_of(torchrun_args: list[str]) -> int | None:
    """--nproc-per-node (--nproc_per_node) as a number, when given so. Pure."""
    value = _options(torchrun_args).get("--nproc-per-node", "")
    return int(value) if value.isdigit() else None


def _options(torchrun_args: list[str]) -> dict[str, str]:
    """torchrun's own options ({--k: v}; --k=v or --k v; a flag alone: ""), up to the worker's
    arguments. Pure."""
    found, i = {}, 0
    while i < len(torchrun_args):
        a = torchrun_args[i]
        if a in ("-m", "--module") or not a.startswith("--"):
            break  # the worker's own arguments follow
        key, eq, value = a.partition("=")
        if not eq and i + 1 < len(torchrun_args) and not torchrun_args[i + 1].startswith("-"):
            value, i = torchrun_args[i + 1], i + 1  # "--k v"; a flag alone ("--standalone") takes none
        found[key.replace("_", "-")] = value
        i += 1
    return found


def rendezvous_of(torchrun_args: list[str]) -> tuple[int, str, int] | None:
    """(node rank, master address, master port) from torchrun's arguments (--k=v or --k v), when
    all three are there. Pure."""
    found = _options(torchrun_args)
    try:
        return int(found["--node-rank"]), found["--master-addr"], int(found["--master-port"])
    except (KeyError, ValueError):
        return None


class AddressWatch:
    """The address a host name resolves to, looked up every `every` seconds in a thread while the
    run lasts; `last`: the newest answer (None before the first). resolve: injectable (tests)."""

    def __init__(self, name: str, every: float = 10.0, resolve=None):
        import socket
        import threading
        self.name, self.last = name, None
        self._resolve = resolve or (lambda n: socket.getaddrinfo(n, None, type=socket.SOCK_STREAM)[0][4][0])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True, name="master-address")
        self._thread.start()

    def _loop(self, every: float) -> None:
        while True:
            try:
                self.last = self._resolve(self.name)
            except (OSError, IndexError):
                pass  # not resolvable (yet, or any more): keep the newest answer
            if self._stop.wait(every):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def wait_until_closed(addr: str, port: int, seconds: float) -> bool:
    """Wait (at most seconds) until nothing accepts connections at addr:port; True once closed."""
    import socket
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=1.0):
                pass
        except OSError:
            return True
        time.sleep(0.2)
    return False


def children_of(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux /proc; none elsewhere)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after the command name, which may hold spaces
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(d.name))
    return out


def _reap(pgid: int) -> None:
    """Kill what is left of torchrun's process group. torchrun starts each worker in a session of
    its own, so this does not reach them: torchrun itself stops its workers when it ends (on a
    signal the launcher forwards, or when a worker fails), which the Ctrl-C test checks."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _termination_message(text: str) -> None:
    """What `kubectl describe pod` shows as the container's termination message (in a pod)."""
    if os.path.exists(TERMINATION_LOG) and os.access(TERMINATION_LOG, os.W_OK):
        try:
            Path(TERMINATION_LOG).write_text(text[:4000])
        except OSError:
            pass
