"""The launcher the pods and `kubelora run` start: through real torchrun, a worker's "bad input"
(exit 2) reaches the process's exit code, which torchrun alone turns into 1; the root cause is
printed once, last."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubelora_trainer import launch
from kubelora_trainer.launch import exit_code, root_cause


def test_exit_code_and_root_cause_from_the_workers_records():
    bad = [{"rank": 1, "code": 1, "message": "rank 0 failed: DatasetError", "peer": True},
           {"rank": 0, "code": 2, "message": "dataset /d: no usable items", "peer": False}]
    assert exit_code(1, bad) == 2 and exit_code(0, bad) == 0
    assert exit_code(1, [{"rank": 0, "code": 1, "message": "boom"}]) == 1 and exit_code(-9, []) == -9
    assert root_cause(bad) == "rank 0: dataset /d: no usable items" and root_cause([]) is None
    peers = [{"rank": 0, "code": 3, "message": "stopped because ..."}, {"rank": 1, "code": 3, "message": "..."}]
    assert exit_code(1, peers) == 3                                     # every rank stopped for a peer's signal
    assert exit_code(1, peers + [{"rank": 2, "code": 143, "message": "stopped by SIGTERM"}]) == 143
    assert exit_code(1, peers[:1] + [{"rank": 1, "code": 1, "message": "boom"}]) == 1   # a crash is a crash
    # every worker of the node finished (a signal reached torchrun after their last check): success
    done = [{"rank": r, "code": 0, "message": "finished"} for r in range(2)]
    assert exit_code(1, done, workers=2) == 0 and exit_code(1, done[:1], workers=2) == 1
    assert exit_code(1, done[:1] + [{"rank": 1, "code": 2, "message": "bad"}], workers=2) == 2
    assert root_cause(done[:1] + [{"rank": 1, "code": 1, "message": "boom", "peer": True}]) == "rank 1: boom"
    assert launch.nproc_of(["--nproc-per-node=8", "-m", "x"]) == 8 and launch.nproc_of(["--nproc_per_node", "2"]) == 2
    assert launch.nproc_of(["--nnodes", "2", "--nproc-per-node=8", "-m", "x"]) == 8
    assert launch.nproc_of(["--nproc-per-node=gpu"]) is None and launch.nproc_of(["-m", "x", "--nproc-per-node=3"]) is None


def test_torchrun_gives_the_workers_the_pods_grace_period_less_a_margin():
    """torchrun's own default (30 s from the forwarded SIGTERM to SIGKILL) would cut a large
    model's stop checkpoint short in a pod given 120 s or more."""
    assert launch.shutdown_timeout({launch.GRACE_ENV: "120"}) == 110
    assert launch.shutdown_timeout({launch.GRACE_ENV: "3600"}) == 3590
    assert launch.shutdown_timeout({launch.GRACE_ENV: "20"}) == 15     # a short grace keeps three quarters
    assert launch.shutdown_timeout({}) == launch.LOCAL_SHUTDOWN_SECONDS  # kubelora run, torchx: no pod
    from kubelora_operator.manifests import OperatorConfig, job
    from kubelora_trainer.spec import parse_spec
    spec = parse_spec({"model": {"type": "flux", "diffusersPath": "s3://bkt/m"}, "dataset": {"uri": "s3://bkt/d"},
                       "output": {"uri": "s3://bkt/o"}, "runPolicy": {"terminationGracePeriodSeconds": 900}})
    pod = job("j", "u", "ns", spec, OperatorConfig())["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env[launch.GRACE_ENV] == str(pod["terminationGracePeriodSeconds"]) == "900"
    assert env["KUBELORA_RUN_ID"] == "u"   # the job's uid: every attempt resumes its own checkpoints


def test_the_rendezvous_is_read_from_torchrun_s_arguments():
    from kubelora_trainer.command import launcher_args
    from kubelora_trainer.launch import rendezvous_of
    assert rendezvous_of(launcher_args(2, 8, 1, "job-0.job-workers", 29500, "/s.yaml")) == (1, "job-0.job-workers", 29500)
    assert rendezvous_of(["--node-rank", "3", "--master-addr", "h", "--master-port", "1", "-m", "x"]) == (3, "h", 1)
    assert rendezvous_of(["--standalone", "--nproc-per-node=2", "-m", "kubelora_trainer", "--node-rank=1"]) is None
    assert rendezvous_of(["--standalone", "--node-rank=2", "--master-addr=a", "--master-port=9"]) == (2, "a", 9)


def test_a_rendezvous_that_gives_up_is_one_line_naming_the_missing_nodes():
    """torch's static rendezvous waits 600 s by default, then node 0 exits 1 like a crash: the
    wait is set explicitly (command.py, 30 min) and its end becomes a cause naming how many nodes
    never joined (node 0) or that node 0 never answered (the others)."""
    from kubelora_trainer.command import RENDEZVOUS_TIMEOUT_SECONDS, launcher_args
    from kubelora_trainer.launch import rendezvous_timeout
    assert f"--rdzv-conf=timeout={RENDEZVOUS_TIMEOUT_SECONDS}" in launcher_args(2, 8, 0, "j-0.w", 29500, "/s.yaml")
    assert RENDEZVOUS_TIMEOUT_SECONDS >= 1800
    server = rendezvous_timeout("torch.distributed.DistStoreError: Timed out after 1801 seconds waiting for clients. "
                                "2/4 clients joined.")
    assert server.startswith("the rendezvous timed out after 1801 s: 2 of the 4 nodes never joined"), server
    client = rendezvous_timeout("torch.distributed.DistNetworkError: The client socket has timed out after 1800000ms "
                                "while trying to connect to (ft-0.ft-workers.ml.svc, 29500).")
    assert "after 1800 s: node 0's store at ft-0.ft-workers.ml.svc:29500 never answered" in client, client
    assert rendezvous_timeout("[E1127 socket.cpp:1028] [c10d] The client socket has timed out after 2000ms while "
                              "trying to connect to (h, 1).") is None      # torch's retry log, not the end
    assert rendezvous_timeout("[checkpoint] step 3 written") is None


def test_node_0_whose_peers_never_come_ends_with_the_rendezvous_line(tmp_path):
    """Through real torchrun (rendezvous timeout 2 s here): node 0 of 2, its peer never started."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "kubelora_trainer", "launch", "--nnodes=2", "--nproc-per-node=1",
                        "--node-rank=0", "--master-addr=127.0.0.1", f"--master-port={port}", "--rdzv-conf=timeout=2",
                        "-m", "kubelora_trainer", "run", "--spec", str(tmp_path / "never-read.yaml")],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("[error] the rendezvous timed out after ") and "1 of the 2 nodes never joined" in last, last


def test_a_stopped_node_waits_until_node_0_s_store_has_closed():
    """A replacement pod must not meet the old run's store, so a node > 0 that stopped with a
    checkpoint ends only when node 0's port no longer answers (here a real listening socket)."""
    import socket
    import threading
    import time

    from kubelora_trainer.launch import wait_until_closed
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    t0 = time.monotonic()
    assert wait_until_closed("127.0.0.1", port, 0.6) is False          # still open: gives up at the deadline
    assert time.monotonic() - t0 >= 0.6
    threading.Timer(0.5, server.close).start()
    assert wait_until_closed("127.0.0.1", port, 30) is True            # closed: returns at once after


def test_node_0s_address_is_the_one_it_had_during_the_run():
    """After a preemption node 0's replacement is a new pod with a new address behind the same
    name: a node > 0 waits for the old store at the address the name had during the run, and so
    is not held back by the replacement answering at the name (real sockets on two loopback
    addresses; the name's lookups are scripted: DNS cannot be changed here)."""
    import socket
    import threading
    import time

    from kubelora_trainer.launch import AddressWatch, wait_until_closed
    answers = iter(["127.0.0.2", "127.0.0.2"])
    looked_up = threading.Event()

    def resolve(name):
        assert name == "job-0.job-workers"
        try:
            return next(answers)
        except StopIteration:
            looked_up.set()
            raise OSError("no such host: the old pod is gone") from None
    watch = AddressWatch("job-0.job-workers", every=0.05, resolve=resolve)
    assert looked_up.wait(30)
    watch.stop()
    assert watch.last == "127.0.0.2"   # the newest answer survives the name's disappearance
    replacement = socket.create_server(("127.0.0.1", 0))   # node 0's new pod, at another address
    port = replacement.getsockname()[1]
    t0 = time.monotonic()
    assert wait_until_closed(watch.last, port, 30) is True and time.monotonic() - t0 < 5
    assert wait_until_closed("127.0.0.1", port, 0.3) is False  # the name's new address: still open
    replacement.close()


def test_the_trainer_and_the_operator_agree_on_the_exit_codes():
    from kubelora_operator import manifests
    from kubelora_trainer import exits
    assert (manifests.CONFIG_ERROR_EXIT_CODE, manifests.PEER_STOPPED_EXIT_CODE) == (exits.BAD_INPUT, exits.PEER_STOPPED)


@pytest.fixture()
def bad_input_job(tmp_path, tiny_flux_dir):
    (tmp_path / "empty").mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
                                   "dataset": {"uri": str(tmp_path / "empty"), "resolution": 32},
                                   "training": {"steps": 2}, "output": {"uri": str(tmp_path / "out")}}))
    return job


def _env(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "KUBELORA_CACHE_DIR": str(tmp_path / "cache")}


def test_bad_input_exits_2_through_real_torchrun(tmp_path, bad_input_job):
    worker = ["-m", "kubelora_trainer", "run", "--spec", str(bad_input_job)]
    plain = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            *worker], env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert plain.returncode == 1, plain.stderr[-2000:]  # what torchrun alone makes of a worker's exit 2
    p = subprocess.run([sys.executable, "-m", "kubelora_trainer", "launch", "--standalone", "--nproc-per-node=2",
                        *worker], env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("[error] rank ") and "no usable items" in last, p.stderr[-2000:]
    assert p.stderr.count("no usable items") == 1, p.stderr[-3000:]  # once for both ranks, last


def test_kubelora_run_exits_2_on_bad_input(tmp_path, bad_input_job):
    p = subprocess.run([sys.executable, "-m", "kubelora_trainer.cli", "run", str(bad_input_job), "--nproc", "1"],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith("[error] rank 0: dataset "), p.stderr[-2000:]


def test_torchruns_own_failure_report_is_left_out_and_the_trainers_lines_pass():
    """After torchrun's agent reports a failed worker, its traceback and ChildFailedError summary
    are dropped (counted); the trainer's own [..] lines before and after pass; the failure itself
    becomes one line naming the worker and its exit code or signal; verbose passes all."""
    from kubelora_trainer.launch import TorchrunFilter
    lines = ["[phase] stage-in", "some worker output",
             "E1127 04:51:15.951000 29387 torch/distributed/elastic/multiprocessing/api.py:1002] failed "
             "(exitcode: -9) local_rank: 0 (pid: 29405) of binary: /usr/bin/python",
             "Traceback (most recent call last):", "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
             "[0]:", "  rank      : 0 (local_rank: 0)", "[checkpoint] step 3 written", "====="]
    keep = TorchrunFilter()
    assert [text for ln in lines for ok, text in [keep.passes(ln)] if ok] == [
        "[phase] stage-in", "some worker output", "[launch] local rank 0 (pid 29405) exited with signal SIGKILL\n",
        "[checkpoint] step 3 written"]
    assert keep.dropped == 5 and keep.workers == ["local rank 0 (pid 29405) exited with signal SIGKILL"]
    keep = TorchrunFilter()
    sigint = ("W1127 04:51:15.951000 29387 torch/distributed/elastic/agent/server/api.py:753] Received "
              "Signals.SIGINT death signal, shutting down workers")
    assert not keep.passes(sigint)[0] and not keep.passes("torch.distributed.elastic.SignalException")[0]
    verbose = TorchrunFilter(verbose=True)
    assert all(verbose.passes(ln)[0] for ln in lines) and verbose.dropped == 0


def test_a_worker_killed_without_a_record_is_named_and_ctrl_c_before_training_is_a_stop(tmp_path):
    """Through the real launcher and torchrun: a worker the kernel kills (SIGKILL: no exit record)
    ends with its rank and signal as the cause; SIGINT before the training loop (which writes the
    records) ends as [stopped], not as an unexplained error; stderr piped into a reader that goes
    away does not hang the launcher."""
    script = tmp_path / "w.py"
    script.write_text("import os, signal, sys, time\n"
                      "mode = sys.argv[1]\n"
                      "if mode == 'kill':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                      "if mode == 'flood':\n"
                      "    for i in range(20000):\n        print('x' * 100, file=sys.stderr)\n    sys.exit(3)\n"
                      "if mode == 'slow-stop':  # a checkpoint that takes 20 s after SIGTERM\n"
                      "    signal.signal(signal.SIGTERM, lambda *a: (time.sleep(20), sys.exit(143)))\n"
                      "print('[phase] waiting', file=sys.stderr, flush=True)\n"
                      "time.sleep(120)\n")
    base = [sys.executable, "-m", "kubelora_trainer", "launch", "--nproc-per-node=1", "--standalone", str(script)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([*base, "kill"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1] == (
        "[error] local rank 0 (pid " + p.stderr.split("(pid ")[1].split(")")[0] + ") exited with signal SIGKILL"), p.stderr
    proc = subprocess.Popen([*base, "wait"], stderr=subprocess.PIPE, text=True, env=env)
    assert "[phase] waiting" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert err.strip().splitlines()[-1] == "[stopped] stopped by SIGINT before training began (no checkpoint written)", err
    # the pod's grace period reaches torchrun: with 4 s (3 s less the margin) a worker still writing its
    # checkpoint is killed after 3 s, not torchrun's default 30, and the last line says why
    proc = subprocess.Popen([*base, "slow-stop"], stderr=subprocess.PIPE, text=True,
                            env={**env, launch.GRACE_ENV: "4"})
    assert "[phase] waiting" in proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    err = proc.communicate(timeout=300)[1]
    assert err.strip().splitlines()[-1].startswith("[stopped] stopped by SIGTERM; the workers, still stopping after 3 s, "
                                                   "were killed"), err
    assert time.monotonic() - t0 < 15, "torchrun waited for the worker past the grace period"
    # a second signal (a second Ctrl-C, kill twice) while a worker writes its stop checkpoint: killed at once, torchrun
    # and the worker (which torchrun starts in a session of its own: it would outlive torchrun's own exit)
    proc = subprocess.Popen([*base, "slow-stop"], stderr=subprocess.PIPE, text=True, env=env)
    assert "[phase] waiting" in proc.stderr.readline()
    workers = [pid for pid in launch.children_of(launch.children_of(proc.pid)[0])]
    assert workers, "no worker found under torchrun"
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)  # the first signal reaches the worker, which starts its 20 s stop
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert time.monotonic() - t0 < 10, err
    assert "[launch] SIGTERM again: the workers are killed now, without a stop checkpoint" in err, err
    assert err.strip().splitlines()[-1] == "[stopped] stopped by SIGTERM, then killed by a second SIGTERM (no checkpoint " \
                                           "from this stop)", err
    for pid in workers:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]:
            assert time.monotonic() < deadline, f"worker {pid} outlived the launcher"
            time.sleep(0.1)
    # a reader that stops reading after one line: the launcher still drains the workers' stderr and ends
    flood = subprocess.Popen(f"{' '.join(base)} flood 2>&1 | head -1", shell=True, stdout=subprocess.PIPE, env=env)
    flood.communicate(timeout=300)


def test_a_trial_run_trains_n_steps_into_its_own_folder_under_the_output(tmp_path, monkeypatch, capsys):
    """kubelora run --steps N: the manifest (or a bare spec, named by its file) as N steps into
    <output.uri>/trial-N, trained again each time, warmup capped; the worker gets that manifest."""
    from kubelora_trainer import cli, launch
    from kubelora_trainer.spec import load_spec
    doc = {"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d"},
           "training": {"steps": 2000, "warmupSteps": 100, "lrScheduler": "cosine"}, "output": {"uri": "s3://bkt/run/"}}
    trial = cli.trial_manifest(doc, "my-job", 20)
    assert trial["metadata"] == {"name": "my-job"} and trial["kind"] == "LoRATrainingJob"
    assert trial["spec"]["training"] == {"steps": 20, "warmupSteps": 20, "lrScheduler": "cosine"}
    assert trial["spec"]["output"] == {"uri": "s3://bkt/run/trial-20", "onExisting": "overwrite"}
    assert doc["training"]["steps"] == 2000          # the original is not touched
    job = tmp_path / "my-spec.yaml"
    job.write_text(yaml.safe_dump(doc))
    seen = {}

    def fake_run(args, env):  # torchrun itself is tested elsewhere: what it would be given
        seen["spec"] = load_spec(args[args.index("--spec") + 1])
        seen["name"] = yaml.safe_load(open(args[args.index("--spec") + 1]))["metadata"]["name"]
        return 0
    monkeypatch.setattr(launch, "run", fake_run)
    assert cli.main(["run", str(job), "--steps", "5", "--nproc", "1"]) == 0
    assert seen["spec"].training.steps == 5 and seen["spec"].output.uri == "s3://bkt/run/trial-5"
    assert seen["name"] == "my-spec"                  # the bare spec's name, from its file, as without --steps
    assert "a 5-step trial of" in capsys.readouterr().out
    assert cli.main(["run", str(job), "--steps", "0"]) == 2
    capsys.readouterr()
    assert cli.main(["run", str(job), "--nproc", "0"]) == 2   # not "0 means the default"
    assert capsys.readouterr().err == "error: --nproc must be at least 1 (got 0)\n"
