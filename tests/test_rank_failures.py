"""A failure on one rank reaches every rank at the next collective, with its reason, instead of
leaving the others waiting in a collective until the process-group timeout (60 min)."""
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

WORKER = Path(__file__).parent / "workers" / "fault_on_rank.py"


def test_nan_loss_on_one_rank_stops_all_ranks_with_the_reason(tmp_path, tiny_flux_dir, overfit_data):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
                                   "dataset": {"uri": str(overfit_data), "resolution": 32},
                                   "adapter": {"rank": 4},
                                   "training": {"steps": 40, "logEvery": 1, "seed": 1, "learningRate": 1e-3,
                                                "warmupSteps": 2, "lrScheduler": "cosine"},
                                   "output": {"uri": str(tmp_path / "out")}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KUBELORA_CACHE_DIR": str(tmp_path / "cache"),
           "FAULT": "nan"}
    # a hang would run into this timeout: the process-group timeout is an hour
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(WORKER), str(job)], env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "[train] step 2/40" in proc.stdout and "[train] step 3/40" not in proc.stdout, proc.stdout[-2000:]
    # the progress line shows the learning rate the step used (warmup: 1/2, then 2/2 of 1e-3) and
    # epochs over the whole dataset (1 usable item, 2 ranks: each step is 2 epochs)
    assert "step 1/40 | epoch 2 | " in proc.stdout and "| lr 5.00e-04 |" in proc.stdout, proc.stdout[-2000:]
    assert "step 2/40 | epoch 4 | " in proc.stdout and "| lr 1.00e-03 |" in proc.stdout, proc.stdout[-2000:]
    # both ranks stopped at step 3 with the same reason, naming the rank that diverged
    reason = "loss is not finite at step 3 (rank 1: nan); lower training.learningRate"
    assert proc.stderr.count(f"[error] {reason}") == 2, out[-3000:]  # one per rank (lines may interleave)
    assert proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-2000:]  # torchrun's summary of both workers
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_a_hung_rank_is_noticed_within_the_collective_timeout(tmp_path, tiny_flux_dir, overfit_data):
    """Rank 1 stops answering mid-training: rank 0's next collective times out after
    KUBELORA_DIST_TIMEOUT_MINUTES (6 s here; 15 min by default) instead of an hour, and the run ends."""
    import time
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
                                   "dataset": {"uri": str(overfit_data), "resolution": 32}, "adapter": {"rank": 4},
                                   "training": {"steps": 40, "logEvery": 1}, "output": {"uri": str(tmp_path / "out")}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KUBELORA_CACHE_DIR": str(tmp_path / "cache"),
           "FAULT": "hang", "KUBELORA_DIST_TIMEOUT_MINUTES": "0.1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kubelora_trainer", "launch", "--standalone", "--nproc-per-node=2",
                           str(WORKER), str(job)], env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and "[train] step 2/40" in proc.stdout, proc.stdout[-2000:]
    assert elapsed < 200, elapsed  # the sleeping rank would hold the run for 600 s
    assert "[error] rank 0:" in proc.stderr and "imed out" in proc.stderr, proc.stderr[-3000:]


def test_a_preempted_node_stops_its_peer_with_a_checkpoint_and_an_exit_code_the_job_ignores(
        tmp_path, tiny_flux_dir, overfit_data):
    """Two launchers (--nnodes 2), as two pods. Node 1's pod is preempted: the kubelet sends SIGTERM
    to its launcher. Every rank finishes its step, the checkpoint is written, node 1 exits 143 (its
    pod has the DisruptionTarget condition) and node 0, whose ranks were not signalled, exits 3, which
    the Job's podFailurePolicy ignores too (manifests.PEER_STOPPED_EXIT_CODE): the replacements
    resume without a gang restart or the backoff budget (the whole Job, tests/test_operator_e2e.py)."""
    import signal
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
                                   "dataset": {"uri": str(overfit_data), "resolution": 32}, "adapter": {"rank": 4},
                                   "training": {"steps": 2000, "logEvery": 1},
                                   # a sample due at every step: the one of the stopped step waits for the resume
                                   "samples": {"prompts": [{"prompt": "a red square", "width": 32, "height": 32,
                                                            "steps": 1}], "everySteps": 1, "atStart": False},
                                   "output": {"uri": str(tmp_path / "out")}}))
    from kubelora_trainer.dist import _free_port
    port = _free_port()
    procs = []
    for node in range(2):
        env = {**os.environ, "KUBELORA_CACHE_DIR": str(tmp_path / f"node{node}"), "KUBELORA_METRICS_PORT": "0",
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kubelora_trainer", "launch", "--nnodes=2", f"--node-rank={node}",
             "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
             "-m", "kubelora_trainer", "run", "--spec", str(job)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    log = []
    for line in procs[0].stdout:  # rank 0 logs the steps
        log.append(line)
        if "[train] step 3/2000" in line:
            procs[1].send_signal(signal.SIGTERM)
            break
    rest0, err0 = procs[0].communicate(timeout=300)
    out1, err1 = procs[1].communicate(timeout=300)
    out0 = "".join(log) + rest0
    assert procs[1].returncode == 128 + signal.SIGTERM, out1[-2000:] + err1[-3000:]
    # node 1 waited for node 0's store to close, then printed its cause once, last
    assert "[launch] node 0's rendezvous" in err1 and err1.count("stopped by SIGTERM after step") == 1, err1[-2000:]
    assert err1.strip().splitlines()[-1].startswith("[stopped] rank 1: stopped by SIGTERM"), err1[-2000:]
    assert procs[0].returncode == 3, out0[-2000:] + err0[-3000:]
    last = err0.strip().splitlines()[-1]
    assert last.startswith("[stopped] rank 0: stopped because a rank of another pod was told to stop"), err0[-2000:]
    assert "the checkpoint of step" in last and "[train] step 2000/2000" not in out0
    assert any((tmp_path / "out" / "checkpoints").glob("step-*/state/COMPLETE")), list((tmp_path / "out").rglob("*"))[:20]
    # the checkpoint came before the stopped step's samples, which its loop state leaves to the resume
    (state,) = (tmp_path / "out" / "checkpoints").glob("step-*/state")
    stopped = int(state.parent.name.removeprefix("step-"))
    assert torch.load(state / "rank-0.pt", weights_only=True)["sample_pending"] == stopped
    assert f"[samples] step {stopped - 1}:" in out0 and f"[samples] step {stopped}:" not in out0, out0[-2000:]


def test_a_rank_working_alone_keeps_its_peers_waiting_while_it_says_it_gets_on(tmp_path):
    """Stage-in: local rank 0 fetches the node's data while its peers wait at the phase barrier. A
    download that goes on for longer than $KUBELORA_PHASE_TIMEOUT_MINUTES but says it is getting on
    (storage.download calls dist.heartbeat after each object) is waited for; one that says nothing
    for that long ends the wait with the reason (it was: 2 hours from the start, whatever the
    progress, so a large dataset failed every retry)."""
    worker = Path(__file__).parent / "workers" / "phase_barrier.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KUBELORA_PHASE_TIMEOUT_MINUTES": "0.1"}

    def run(mode):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               str(worker), mode], env=env, capture_output=True, text=True, timeout=240)
    beats = run("beats")
    assert beats.returncode == 0 and "[met] rank 0" in beats.stdout and "[met] rank 1" in beats.stdout, \
        beats.stdout[-2000:] + beats.stderr[-2000:]
    silent = run("silent")
    assert silent.returncode != 0 and "[met] rank 1" not in silent.stdout, silent.stdout[-2000:]
    assert ("[timeout] rank 1: not every rank finished stage-in: for 0.1 minutes ($KUBELORA_PHASE_TIMEOUT_MINUTES) "
            "none of those still in it finished or said it was getting on") in silent.stdout, silent.stdout[-2000:]
