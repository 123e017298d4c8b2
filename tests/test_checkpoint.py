"""Checkpoints and resume, through the real launcher and torchrun on 2 ranks: Ctrl-C writes a
checkpoint at the next step and leaves no worker behind; the same command again resumes from it
and ends with the same adapter as an uninterrupted run (dropout on, so RNG states matter); a
finished output is not trained again; old checkpoints are pruned."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kubelora_trainer.checkpoint import Schedule, complete_steps
from kubelora_trainer.train import RunError, resume_plan


def test_complete_steps_and_resume_plan():
    names = ["step-2/state/COMPLETE", "step-2/state/.metadata", "step-4/state/__0_0.distcp", "step-6/state/COMPLETE",
             "step-6/transformer/adapter_model.safetensors"]
    assert complete_steps(names) == [2, 6]  # step 4 has no marker: incomplete
    assert resume_plan("resume", False, None) == "train" and resume_plan("resume", False, 6) == "resume"
    assert resume_plan("resume", True, 6) == "done" and resume_plan("overwrite", True, 6) == "train"
    with pytest.raises(RunError, match="output.uri already holds checkpoints up to step 6; .*onExisting"):
        resume_plan("fail", False, 6)
    # an earlier attempt of this run left them (own_output): resumed or kept whatever onExisting says
    for mode in ("resume", "overwrite", "fail"):
        assert resume_plan(mode, False, 6, own="checkpoint") == "resume"
        assert resume_plan(mode, True, 6, own="finished") == "done"
        assert resume_plan(mode, True, 6, own="checkpoint") == "resume"  # another run's result, our checkpoints
    s = Schedule(steps=3, minutes=None)
    assert [s.due(i) for i in range(1, 7)] == [False, False, True, False, False, True]


def _job(path: Path, tiny_flux_dir, data, output, **training):
    path.write_text(yaml.safe_dump({
        "model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
        "dataset": {"uri": str(data), "resolution": 32},
        "adapter": {"rank": 4, "dropout": 0.1},
        "training": {"steps": 8, "logEvery": 1, "checkpointEverySteps": 2, "learningRate": 3e-3, "seed": 3,
                     "lrScheduler": "cosine", "warmupSteps": 2, **training},
        "output": {"uri": output}}))
    return path


def _run(job, env, interrupt_after: str | None = None, nproc: int = 2):
    p = subprocess.Popen([sys.executable, "-m", "kubelora_trainer.cli", "run", str(job), "--nproc", str(nproc)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in p.stdout:
        out.append(line)
        if interrupt_after and interrupt_after in line:
            p.send_signal(signal.SIGINT)   # Ctrl-C to the launcher
            interrupt_after = None
    return p.wait(timeout=300), "".join(out)


def _workers_of(job: Path) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(job).encode() in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return found


def test_ctrl_c_checkpoints_then_the_same_command_resumes_to_the_same_adapter(s3, tmp_path, tiny_flux_dir):
    from kubelora_trainer.storage import download, list_keys
    from kubelora_trainer.synthetic import build_synthetic_dataset
    from safetensors.torch import load_file
    data = build_synthetic_dataset(tmp_path / "data", n=4, size=32)
    s3.create_bucket(Bucket="ckpt")
    env = {**os.environ, **s3.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    ref = _job(tmp_path / "ref.yaml", tiny_flux_dir, data, str(tmp_path / "ref-out"))
    rc, out = _run(ref, env)
    assert rc == 0, out[-3000:]

    job = _job(tmp_path / "job.yaml", tiny_flux_dir, data, "s3://ckpt/run")
    rc, out = _run(job, env, interrupt_after="[checkpoint] step 2 written")
    assert rc == 130, out[-3000:]
    stopped_at = int(out.split("stopped by SIGINT after step ")[1].split(";")[0])
    assert stopped_at >= 2 and out.strip().splitlines()[-1].startswith("[stopped] rank ")
    assert "ChildFailedError" not in out and "SignalException" not in out, out[-3000:]  # torchrun's report left out
    assert _workers_of(job) == [], "a worker outlived Ctrl-C"
    # what crashed saves leave: a rank file of step 8 (which the resume writes again) from a run with more
    # ranks, and an unfinished step below the newest complete checkpoint
    stale = ["run/checkpoints/step-8/state/rank-7.pt", "run/checkpoints/step-5/state/rank-0.pt"]
    for key in stale:
        s3.put_object(Bucket="ckpt", Key=key, Body=b"left by a crashed save")
    rc, out = _run(job, env)
    assert rc == 0, out[-3000:]
    keys = list_keys("s3://ckpt/run", client=s3)
    assert not [k for k in keys if "run/" + k in stale], keys   # cleared by the save, pruned
    assert f"[resume] from the checkpoint of step {stopped_at}" in out and f"[train] step {stopped_at}/8" not in out
    assert "[done] s3://ckpt/run/lora.safetensors" in out and "; report s3://ckpt/run/report.html (" in out, out[-2000:]
    import json
    progress = json.loads(s3.get_object(Bucket="ckpt", Key="run/status/progress.json")["Body"].read())
    assert progress["resumedFrom"] == stopped_at and progress["phase"] == "Succeeded", progress  # the operator shows it

    got = load_file(str(download("s3://ckpt/run/lora.safetensors", tmp_path / "got", client=s3, log=lambda m: None)))
    want = load_file(str(tmp_path / "ref-out" / "lora.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # checkpointKeep (2): only the newest complete checkpoints stay; no copy is left in the node's cache
    assert complete_steps(list_keys("s3://ckpt/run/checkpoints", client=s3)) == [6, 8]
    assert list((Path(s3.env["KUBELORA_CACHE_DIR"]) / "checkpoints").glob("*/step-*")) == []

    # a finished output is not trained again; onExisting: fail refuses it
    rc, out = _run(job, env)
    assert rc == 0 and "already holds a finished run" in out and "[phase] train" not in out, out[-2000:]
    assert "; report s3://ckpt/run/report.html (" in out
    rc, out = _run(_job(tmp_path / "job.yaml", tiny_flux_dir, data, "s3://ckpt/run") and
                   _fail_on_existing(tmp_path / "job.yaml"), env)
    assert rc == 2 and "output.uri already holds a finished run (manifest.json)" in out, out[-2000:]


def _fail_on_existing(path: Path) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc["output"]["onExisting"] = "fail"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_failed_export_is_retried_from_the_last_step_without_training_again(s3, s3_server, tmp_path, tiny_flux_dir):
    """The last step of a LoRA run is always checkpointed, though the schedule would not write one
    (every 30 minutes): the artifact's upload fails past its retries (503 from a fault proxy in
    front of the real S3 server), the run exits 1 (the Job retries it), and the retry resumes at
    the last step and only exports."""
    from s3_fault_proxy import FaultProxy

    from kubelora_trainer.synthetic import build_synthetic_dataset
    data = build_synthetic_dataset(tmp_path / "data", n=4, size=32)
    s3.create_bucket(Bucket="final-ckpt")
    job = _job(tmp_path / "job.yaml", tiny_flux_dir, data, "s3://final-ckpt/run", steps=3, checkpointEverySteps=None)
    proxy = FaultProxy(s3_server.endpoint).start()
    try:
        env = {**os.environ, **s3.env, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "2",
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KUBELORA_METRICS_PORT": "0"}
        # every upload of the LoRA fails (one PUT, or for a large file a .part key first)
        for key in ("run/lora.safetensors", "run/.lora.safetensors.*"):
            proxy.fail(ops=("PutObject", "CreateMultipartUpload"), key=key)
        rc, out = _run(job, env, nproc=1)
        assert rc == 1, out[-3000:]
        assert "[checkpoint] step 3 written" in out and "[train] step 3/3" in out, out[-3000:]
        assert out.strip().splitlines()[-1].startswith("[error] rank 0: ") and "lora.safetensors" in out, out[-3000:]
        assert out.count("[error]") == 1, out[-3000:]   # the cause once, last
        proxy.clear()
        rc, out = _run(job, env, nproc=1)
    finally:
        proxy.stop()
    assert rc == 0, out[-3000:]
    assert "[resume] from the checkpoint of step 3" in out and "[train] step" not in out, out[-3000:]
    assert s3.head_object(Bucket="final-ckpt", Key="run/lora.safetensors")["ContentLength"] > 0
    import json
    progress = json.loads(s3.get_object(Bucket="final-ckpt", Key="run/status/progress.json")["Body"].read())
    assert (progress["phase"], progress["step"], progress["resumedFrom"]) == ("Succeeded", 3, 3), progress  # was step 0
    assert progress["loss"] is not None, progress


def _spec(**over):
    from kubelora_trainer.spec import LoRATrainingJobSpec
    doc = {"model": {"type": "flux", "diffusersPath": "/m"}, "dataset": {"uri": "/d", "resolution": 32},
           "adapter": {"rank": 4}, "training": {"steps": 8, "weightDecay": 0.01, "betas": [0.9, 0.99]},
           "output": {"uri": "s3://bkt/run"}}
    for path, v in over.items():
        *parts, last = path.split("__")
        cur = doc
        for p in parts:
            cur = cur.setdefault(p, {})
        cur[last] = v
    return LoRATrainingJobSpec.model_validate(doc)


def test_a_changed_training_setting_is_named_and_refused_on_resume():
    from kubelora_trainer.checkpoint import changed_fields, fingerprint, resume_refusal
    old = fingerprint(_spec())
    # what may change between attempts is not in the fingerprint
    same = _spec(training__checkpointEverySteps=5, training__checkpointKeep=4, training__logEvery=10,
                 training__gradientCheckpointing=True, training__sharding="shard", dataset__cacheUri="s3://bkt/cache",
                 output__onExisting="resume", resources__nodes=3, samples={"prompts": [{"prompt": "x"}]},
                 storage={"endpoint": "http://other:9000"})
    assert changed_fields(old, fingerprint(same)) == []
    assert resume_refusal(old, fingerprint(same), 6, 8, "s3://bkt/run") is None
    new = fingerprint(_spec(training__weightDecay=0.1, training__betas=[0.9, 0.999], adapter__rank=8,
                            dataset__uri="/small", model__dtype="float32"))
    assert changed_fields(old, new) == [
        ("model.dtype", "bfloat16", "float32"), ("adapter.rank", 4, 8), ("dataset.uri", "/d", "/small"),
        ("training.weightDecay", 0.01, 0.1), ("training.betas", [0.9, 0.99], [0.9, 0.999])]
    why = resume_refusal(old, new, 6, 8, "s3://bkt/run/")
    assert why.startswith("output.uri holds checkpoints (newest: step 6) of a run with other settings "
                          "(model.dtype: \"bfloat16\" -> \"float32\"; adapter.rank: 4 -> 8; "), why
    assert "training.betas: [0.9, 0.99] -> [0.9, 0.999]" in why
    assert "another output.uri, or set output.onExisting: overwrite" in why and "s3://bkt/run/checkpoints/" in why
    # a field only one side knows (another trainer version) is not a change; sources compare item by item
    assert changed_fields({"training": {"steps": 8, "gone": 1}}, {"training": {"steps": 8, "added": 2}}) == []
    assert changed_fields({"dataset": {"sources": [{"uri": "/a", "repeats": 1}]}},
                          {"dataset": {"sources": [{"uri": "/a", "repeats": 2}]}}) == [
        ("dataset.sources.0.repeats", 1, 2)]
    # a checkpoint beyond training.steps, with or without a fingerprint; none without one is resumed as before
    assert "step 12, beyond training.steps (8): the run that wrote it had training.steps 12" in resume_refusal(
        fingerprint(_spec(training__steps=12)), fingerprint(_spec()), 12, 8, "s3://bkt/run")
    assert "beyond training.steps (8)" in resume_refusal(None, old, 9, 8, "s3://bkt/run")
    assert resume_refusal(None, old, 8, 8, "s3://bkt/run") is None
    # more steps with a constant learning rate trains the same run longer; a decaying schedule would change
    assert resume_refusal(old, fingerprint(_spec(training__steps=20)), 6, 20, "s3://bkt/run") is None
    cosine = fingerprint(_spec(training__lrScheduler="cosine"))
    assert "training.steps (the cosine learning-rate schedule depends on it): 8 -> 20" in resume_refusal(
        cosine, fingerprint(_spec(training__lrScheduler="cosine", training__steps=20)), 6, 20, "s3://bkt/run")
    # a smaller micro-batch with more accumulation (what an out-of-memory failure asks for) is the same step
    micro2 = fingerprint(_spec(training__microBatchSize=2, training__gradientAccumulationSteps=2))
    assert resume_refusal(micro2, fingerprint(_spec(training__microBatchSize=1, training__gradientAccumulationSteps=4)),
                          6, 8, "s3://bkt/run") is None
    why = resume_refusal(micro2, fingerprint(_spec(training__microBatchSize=1, training__gradientAccumulationSteps=2)),
                         6, 8, "s3://bkt/run")
    assert "training.microBatchSize x training.gradientAccumulationSteps (samples per step and rank): 4 -> 2" in why


def test_a_finished_run_with_other_settings_is_refused_not_reported_done():
    """A finished run in output.uri answers this spec only when it was trained with the same
    settings (its manifest.json's spec): else nothing would be trained and the old LoRA would pass
    for this spec's. Knobs that do not change the result may differ."""
    from kubelora_trainer.checkpoint import finished_refusal, fingerprint, fingerprint_of
    from kubelora_trainer.spec import dump_spec
    old = fingerprint_of(dump_spec(_spec()))
    assert old == fingerprint(_spec())
    assert finished_refusal(old, fingerprint(_spec(training__logEvery=3, training__compile=True)), "/o") is None
    assert finished_refusal(None, fingerprint(_spec(adapter__rank=16)), "/o") is None  # a manifest without a spec
    why = finished_refusal(old, fingerprint(_spec(adapter__rank=16, training__learningRate=5e-4)), "/o")
    assert why.startswith("output.uri holds a finished run trained with other settings (adapter.rank: 4 -> 16; "
                          "training.learningRate: "), why
    assert "another output.uri, or set output.onExisting: overwrite" in why
    # fewer steps (or more for a run that cannot go on: extends() said no) is not that run either
    assert "training.steps: 8 -> 6" in finished_refusal(old, fingerprint(_spec(training__steps=6)), "/o")
    assert "samples per step and rank): 1 -> 2" in finished_refusal(
        old, fingerprint(_spec(training__microBatchSize=2)), "/o")


def test_a_finished_lora_run_given_more_steps_goes_on_from_its_last_step():
    from kubelora_trainer.train import extends
    done = {"metrics": {"steps": 8}}
    assert extends(done, [4, 8], _spec(training__steps=12))
    assert extends(done, [8, 10], _spec(training__steps=12))      # the extension checkpointed, then was stopped
    assert extends(done, [8, 12], _spec(training__steps=12))      # ... or died before its manifest.json
    assert not extends(done, [4, 8], _spec(training__steps=8))                 # finished: nothing to do
    assert not extends(done, [4], _spec(training__steps=12))                   # its last step is not there
    assert not extends(done, [4, 8], _spec(training__steps=12, adapter={"type": "full"}))
    assert not extends({}, [4, 8], _spec(training__steps=12))


def test_another_number_of_ranks_keeps_the_loss_history():
    from kubelora_trainer.checkpoint import loop_for_world
    two = {"world": 2, "gen": "g", "sampler": {}, "losses": [1.0, 0.9]}
    assert loop_for_world(two, None, 2) is two
    assert loop_for_world(two, None, 4) == {"losses": [1.0, 0.9]}    # rank 1 of 4: its own file
    assert loop_for_world(None, two, 4) == {"losses": [1.0, 0.9]}    # rank 3 of 4: rank 0's
    assert loop_for_world(None, None, 4) is None
    assert loop_for_world({**two, "micro": 2}, None, 2, 2)["sampler"] == {}      # same layout: all of it
    assert loop_for_world({**two, "micro": 2}, None, 2, 1) == {"losses": [1.0, 0.9]}  # another micro-batch
    evals = [{"step": 0, "loss": 1.2}]     # the held-out evaluations' records go along with the losses
    assert loop_for_world(None, {**two, "evals": evals}, 4) == {"losses": [1.0, 0.9], "evals": evals}


def test_resume_refuses_changed_settings_skips_a_corrupt_checkpoint_and_overwrite_clears_old_ones(tmp_path, tiny_flux_dir):
    """One process, a local output.uri: the staging copies in the cache are gone after each run; a
    changed learningRate is refused before stage-in, naming the field; a truncated newest
    checkpoint is skipped for the older one, which resumes to the same adapter as the run that
    wrote them; onExisting: overwrite deletes the old run's checkpoints before training."""
    from kubelora_trainer.synthetic import build_synthetic_dataset
    from safetensors.torch import load_file
    data = build_synthetic_dataset(tmp_path / "data", n=4, size=32)
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "KUBELORA_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "KUBELORA_METRICS_PORT": "0"}
    staged = lambda: sorted(str(p.relative_to(cache)) for p in (cache / "checkpoints").glob("*/step-*"))  # noqa: E731
    job = _job(tmp_path / "job.yaml", tiny_flux_dir, data, str(out), steps=4)
    rc, log = _run(job, env, nproc=1)
    assert rc == 0 and staged() == [], (staged(), log[-3000:])
    assert json.loads((out / "checkpoints/step-4/state/spec.json").read_text())["training"]["learningRate"] == 3e-3
    first = load_file(str(out / "lora.safetensors"))
    # the finished run is not this spec's result: refused (was: "[done] ... nothing to train", exit 0)
    rc, log = _run(_job(tmp_path / "lr.yaml", tiny_flux_dir, data, str(out), steps=4, learningRate=1e-3), env, nproc=1)
    assert rc == 2 and "holds a finished run trained with other settings (training.learningRate: 0.003 -> 0.001)" in log, \
        log[-3000:]
    assert log.count("[error]") == 1 and "[done]" not in log, log[-3000:]
    (out / "manifest.json").unlink()   # as if the run had died before its export

    rc, log = _run(_job(tmp_path / "lr.yaml", tiny_flux_dir, data, str(out), steps=4, learningRate=1e-3), env, nproc=1)
    assert rc == 2 and "(training.learningRate: 0.003 -> 0.001); resuming would mix them" in log, log[-3000:]
    assert log.count("[error]") == 1 and log.strip().splitlines()[-1].startswith("[error] "), log[-3000:]  # once, last
    assert "output.onExisting: overwrite" in log and "[phase] stage-in" not in log, log[-3000:]

    shard = out / "checkpoints/step-4/state/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rc, log = _run(job, env, nproc=1)
    assert rc == 0, log[-3000:]
    assert "[resume] warning: the checkpoint of step 4 cannot be loaded (rank 0: " in log, log[-3000:]
    assert "[resume] from the checkpoint of step 2\n" in log and staged() == [], (staged(), log[-3000:])
    assert "[resume] deleting the unreadable checkpoint(s) of step 4" in log  # then written again
    again = load_file(str(out / "lora.safetensors"))
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=1e-5, atol=1e-6, msg=k)

    # the finished run given more steps goes on from its last step, not "done", where its schedule allows:
    # this one decays (cosine), so the new steps would follow another curve and are refused
    doc = yaml.safe_load(job.read_text())
    assert doc["training"]["lrScheduler"] == "cosine"
    doc["training"]["steps"] = 5
    job.write_text(yaml.safe_dump(doc))
    rc, log = _run(job, env, nproc=1)
    assert rc == 2 and "training.steps (the cosine learning-rate schedule depends on it): 4 -> 5" in log, log[-3000:]
    assert log.count("[error]") == 1 and log.strip().splitlines()[-1].startswith("[error] "), log[-3000:]

    # overwrite, 3 steps: without deleting the old ones first, pruning would keep the old step 4 over the new 2
    doc["training"]["steps"], doc["output"]["onExisting"] = 3, "overwrite"
    job.write_text(yaml.safe_dump(doc))
    rc, log = _run(job, env, nproc=1)
    assert rc == 0 and "deleting the earlier run's checkpoints (steps 2, 4)" in log, log[-3000:]
    assert complete_steps([str(p.relative_to(out / "checkpoints")) for p in out.rglob("COMPLETE")]) == [2, 3]

    # an attempt of the same run (the operator's KUBELORA_RUN_ID: the job's uid) after a preemption: its
    # own output is kept or resumed whatever onExisting says (was: overwrite trained it all again, fail
    # failed the Job for good); another run's is still overwritten
    run = {**env, "KUBELORA_RUN_ID": "uid-1"}
    rc, log = _run(job, run, nproc=1)
    assert rc == 0 and "deleting the earlier run's checkpoints (steps 2, 3)" in log, log[-3000:]  # not its own
    assert json.loads((out / "manifest.json").read_text())["runId"] == "uid-1"
    assert json.loads((out / "checkpoints/step-3/state/spec.json").read_text())["runId"] == "uid-1"
    rc, log = _run(job, run, nproc=1)   # the pod died after the export (in the metrics linger)
    assert rc == 0 and "the finished result is this run's own (an earlier attempt of it), so it is kept" in log, \
        log[-3000:]
    assert "deleting" not in log and "[phase] stage-in" not in log, log[-3000:]
    (out / "manifest.json").unlink()    # ... or before it
    doc["output"]["onExisting"] = "fail"
    job.write_text(yaml.safe_dump(doc))
    rc, log = _run(job, run, nproc=1)
    assert rc == 0 and "the checkpoint of step 3 is this run's own (an earlier attempt of it), so it is resumed" in log, \
        log[-3000:]
    assert "[resume] from the checkpoint of step 3" in log and "deleting" not in log, log[-3000:]


def test_running_out_of_memory_while_restoring_is_not_a_corrupt_checkpoint():
    """An older step would be tried and the newer ones deleted: only unreadable files do that; a
    failure of the machine stops the run with its error instead (retried, the checkpoint kept)."""
    import errno
    from kubelora_trainer.checkpoint import _not_the_files
    assert isinstance(_not_the_files(torch.OutOfMemoryError("CUDA out of memory")), torch.OutOfMemoryError)
    assert _not_the_files(OSError(errno.ENOSPC, "No space left on device")) is not None
    assert _not_the_files(EOFError("Ran out of input")) is None
    assert _not_the_files(RuntimeError("PytorchStreamReader failed reading zip archive")) is None
    # the disk or mount failing (an NFS output.uri read in place), a GPU or a peer: not the files
    assert isinstance(_not_the_files(OSError(errno.EIO, "Input/output error")), OSError)
    assert isinstance(_not_the_files(OSError(errno.ESTALE, "Stale file handle")), OSError)
    assert _not_the_files(RuntimeError("CUDA error: an illegal memory access was encountered")) is not None
    assert _not_the_files(torch.distributed.DistNetworkError("Connection reset by peer")) is not None
    assert _not_the_files(FileNotFoundError(errno.ENOENT, "No such file", "__0_0.distcp")) is None  # the files


def test_a_setting_the_model_resolves_is_compared_once_the_model_has_loaded():
    """model.causalTemporalPositioning unset is decided by the loaded LTX-Video checkpoint: before
    loading it is not compared; after, the value the model uses is compared with the checkpoint's,
    a checkpoint from before the setting existed counting as uniform (false), what it trained."""
    from kubelora_trainer.checkpoint import changed_fields, fingerprint, resolved_refusal
    ltx = lambda **kw: _spec(model={"type": "ltx-video", "diffusersPath": "/m", **kw})  # noqa: E731
    causal = fingerprint(ltx(causalTemporalPositioning=True))
    assert changed_fields(causal, fingerprint(ltx())) == []                       # unset: not yet known
    assert changed_fields(causal, fingerprint(ltx(causalTemporalPositioning=False))) == [
        ("model.causalTemporalPositioning", True, False)]                         # set: compared at once
    now = {"model.causalTemporalPositioning": True}
    assert resolved_refusal(causal, now, 6, "/o") is None
    old = fingerprint(ltx())
    del old["model"]["causalTemporalPositioning"]                                # an older trainer's checkpoint
    why = resolved_refusal(old, now, 6, "/o")
    assert "(model.causalTemporalPositioning: false -> true): set them to the checkpoint's values" in why, why
    assert resolved_refusal(old, {"model.causalTemporalPositioning": False}, 6, "/o") is None
    assert resolved_refusal(None, now, 6, "/o") is None


def test_a_layout_change_keeps_deferred_samples_and_goes_on_from_the_next_epoch():
    """Another number of ranks or micro-batch (a common change: the out-of-memory message advises a
    smaller micro-batch): the samples a stop deferred stay due, the data order goes on from the epoch
    after the one under way (not from epoch 0 again), and the noise generator and dropout RNG get
    a stream of their own for the step, not step 1's again. A rank file left by an earlier save of the
    same step with more ranks is not taken for this checkpoint's (rank 0's file says 2 ranks)."""
    from kubelora_trainer import buckets as bk
    from kubelora_trainer.checkpoint import loop_for_world
    from kubelora_trainer.train import LoopState
    mid = {"world": 2, "micro": 1, "step": 6, "gen": "g", "losses": [1.0, 0.9], "sample_pending": 6,
           "sampler": {"epoch": 3, "pos": 2, "carry_in": []}}
    got = loop_for_world(None, mid, 4, 1)
    assert got == {"losses": [1.0, 0.9], "sample_pending": 6, "step": 6, "epoch": 4}, got
    assert loop_for_world(None, {**mid, "sampler": {"epoch": 3, "pos": 0, "carry_in": []}}, 4)["epoch"] == 3
    stale = {**mid, "world": 4, "sampler": {"epoch": 9, "pos": 1, "carry_in": []}}
    assert loop_for_world(stale, mid, 4, 1) == got          # rank 2 of 4 with a stale rank-2.pt: rank 0's history
    assert loop_for_world(mid, mid, 2, 1) is mid            # the same layout: all of it

    space = bk.SampleSpace(((32, 32, 1),), (1,), (1,), (0.0,))

    def fresh():
        torch.manual_seed(11)
        return LoopState(torch.Generator().manual_seed(5), bk.BucketSampler(space, 1, 1, 4, 0))
    before = fresh().gen.get_state()
    state = fresh()
    assert state.load(got) is False
    assert state.sample_pending == 6 and state.losses == [1.0, 0.9] and state.sampler.epoch == 4
    assert state.sampler.pos == 0 and not torch.equal(state.gen.get_state(), before)


    assert torch.initial_seed() != 11
    again = fresh()
    again.load(got)  # the same on every attempt
    assert torch.equal(again.gen.get_state(), state.gen.get_state())


def test_a_position_taken_in_other_data_goes_on_from_the_next_epoch():
    """Items added or removed under the same dataset URIs between attempts: the saved position's unit
    indices are another plan's (carried samples could name units that no longer exist: an
    IndexError at every retry), so the data order goes on from the next epoch; the same data resumes
    exactly; a position saved before positions named their space is taken as before."""
    from kubelora_trainer import buckets as bk
    from kubelora_trainer.train import LoopState
    big = bk.SampleSpace(((32, 32, 1),) * 5, (1,) * 5, (1,) * 5, (0.0,) * 5)
    small = bk.SampleSpace(((32, 32, 1),) * 3, (1,) * 3, (1,) * 3, (0.0,) * 3)
    ran = bk.BucketSampler(big, 1, 2, 1, 0)
    for _ in range(3):   # 5 samples in batches of 2: a batch carried across epochs
        ran.next_batch()
    saved = {"gen": torch.Generator().get_state(), "torch_rng": torch.get_rng_state(), "losses": [1.0],
             "sampler": ran.state_dict()}
    assert saved["sampler"]["space"] == big.digest() != small.digest()
    state = LoopState(torch.Generator(), bk.BucketSampler(small, 1, 2, 1, 0))
    assert state.load(saved) is False
    assert (state.sampler.epoch, state.sampler.pos, state.sampler.carry_in) == (ran.epoch + 1, 0, [])
    assert all(u < 3 for _ in range(6) for u, _ in state.sampler.next_batch())
    same = LoopState(torch.Generator(), bk.BucketSampler(big, 1, 2, 1, 0))
    assert same.load(saved) is True and same.sampler.next_batch() == ran.next_batch()
    older = {**saved, "sampler": {k: v for k, v in saved["sampler"].items() if k != "space"}}
    assert LoopState(torch.Generator(), bk.BucketSampler(big, 1, 2, 1, 0)).load(older) is True


def test_a_generator_state_saved_on_another_kind_of_device_is_reseeded_not_crashed_on():
    """A GPU run's checkpoint resumed on a CPU (or back): the noise generator's state is another
    device's (16 bytes for CUDA's, 5056 for the CPU's; set_state raised at every retry), so it is
    seeded afresh from its seed and the step; the data order resumes exactly."""
    from kubelora_trainer import buckets as bk
    from kubelora_trainer.train import LoopState, reseeded
    space = bk.SampleSpace(((32, 32, 1),) * 4, (1,) * 4, (1,) * 4, (0.0,) * 4)
    ran = bk.BucketSampler(space, 1, 2, 1, 0)
    ran.next_batch()
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's get_state() gives
    saved = {"step": 7, "gen": cuda_state, "torch_rng": torch.get_rng_state(), "losses": [1.0],
             "sampler": ran.state_dict()}
    state = LoopState(torch.Generator().manual_seed(5), bk.BucketSampler(space, 1, 2, 1, 0))
    assert state.load(saved) is True and state.sampler.next_batch() == ran.next_batch()
    assert torch.equal(state.gen.get_state(), torch.Generator().manual_seed(reseeded(5, 7)).get_state())


def test_prune_deletes_saves_that_never_completed_below_the_newest_complete_one():
    from kubelora_trainer.checkpoint import to_prune
    names = ["step-2/state/COMPLETE", "step-2/state/rank-0.pt", "step-3/state/rank-0.pt",
             "step-4/state/COMPLETE", "step-6/state/COMPLETE", "step-7/state/__0_0.distcp"]
    assert to_prune(names, keep=2) == [2, 3]    # 7 may be a save under way: left
    assert to_prune(names, keep=5) == [3]
    assert to_prune(["step-3/state/rank-0.pt"], keep=1) == []   # nothing complete: nothing pruned


def test_a_run_resumed_after_its_last_step_reports_its_samples_and_step(tmp_path):
    """Resumed after its last step (a LoRA run always checkpoints it, so a failed export or upload is
    retried without training): no step runs, yet report.html and the manifest list the samples written
    before, and progress.json says the last step with its loss, not 0."""
    from pathlib import Path
    from types import SimpleNamespace as NS

    from kubelora_trainer import buckets as bk
    from kubelora_trainer import samples, train
    from kubelora_trainer.progress import Meter
    spec = _spec(samples={"everySteps": 4, "prompts": [{"prompt": "a cat"}, {"prompt": "a dog"}]})
    sampler = samples.Sampler(spec, None, {}, [{"index": 0}, {"index": 1}], "job", None, {}, Path(tmp_path))
    space = bk.SampleSpace(((32, 32, 1),), (1,), (1,), (0.0,))
    state = train.LoopState(torch.Generator(), bk.BucketSampler(space, 1, 1, 1, 0), losses=[0.5] * 8)
    tr = NS(spec=spec, env=NS(device=torch.device("cpu"), world=1, is_main=True, rank=0), state=state,
            comps=NS(denoiser=torch.nn.Linear(2, 2)), sampling=sampler, evaluation=None)
    prog = train.first_progress(8, 9, 1, 4, state.losses)
    train._train_steps(tr, 9, Meter(8, 1), prog)
    assert [(r["step"], r["prompt"]) for r in sampler.records] == [(s, p) for s in (0, 4, 8) for p in (0, 1)]
    assert (prog.step, prog.loss, prog.epoch, prog.resumedFrom) == (8, 0.5, 2, 8)
    assert (prog.samples, prog.sampleStep) == (6, 8)
    assert train.first_progress(8, 1, 1, 4, []).step == 0


def test_a_local_io_error_while_checkpointing_is_classified_not_failed_for_good():
    """checkpoint.os_error: an I/O error of the machine (EIO, ESTALE, a network filesystem's
    timeout) while a checkpoint is written, uploaded to a local output.uri or fetched is transient
    (the run is retried from the previous checkpoint); a full disk is bad input naming the fix; a
    permission error is bad input (was: every OSError bad input, exit 2: the Job failed for good)."""
    import errno
    from kubelora_trainer import checkpoint, disk, exits
    for code in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT):
        e = checkpoint.os_error(OSError(code, os.strerror(code), "/out/checkpoints/step-4/state/x"))
        assert e.transient and exits.code_of(e) == exits.FAILED, code
    full = checkpoint.os_error(OSError(errno.ENOSPC, "No space left on device", "/out/x"))
    assert isinstance(full, disk.NoRoom) and exits.code_of(full) == exits.BAD_INPUT
    denied = checkpoint.os_error(OSError(errno.EACCES, "Permission denied", "/out/x"))
    assert not denied.transient and exits.code_of(denied) == exits.BAD_INPUT and "Permission denied" in str(denied)


def test_claims_on_a_runs_checkpoints_in_the_bucket(s3, tmp_path):
    """checkpoint.claim_attempt / check_attempt against the real S3 server and a local folder: the
    newest claim wins; an older attempt is Superseded (bad input: not retried), naming the newer
    one's host; a run with no claim of its own, or no claim there yet, goes on."""
    from kubelora_trainer import checkpoint, exits, storage
    s3.create_bucket(Bucket="claims")
    settings = storage.S3Settings()
    for out in ("s3://claims/run", str(tmp_path / "run")):
        with pytest.raises(checkpoint.Superseded, match="the claim of this run's checkpoints .* is gone"):
            checkpoint.check_attempt(out, settings, "mine")    # cleared by a newer attempt (overwrite)
        old = checkpoint.claim_attempt(out, settings)
        checkpoint.check_attempt(out, settings, old)
        new = checkpoint.claim_attempt(out, settings)
        assert new != old
        checkpoint.check_attempt(out, settings, new)
        checkpoint.check_attempt(out, settings, None)
        with pytest.raises(checkpoint.Superseded, match=r"a newer attempt of this run \(on .+, since .+\) writes the "
                                                        r"checkpoints under .+/checkpoints: this one stops") as e:
            checkpoint.check_attempt(out, settings, old)
        assert exits.code_of(e.value) == exits.BAD_INPUT
        assert checkpoint.complete_steps(storage.list_keys(f"{out}/checkpoints", settings)) == []  # not a step
        # a claim that is not this trainer's JSON object: another's, not a crash outside the barrier
        storage.upload(_write(tmp_path / "odd", b"[1]"), f"{out}/checkpoints/{checkpoint.ATTEMPT}", settings)
        with pytest.raises(checkpoint.Superseded):
            checkpoint.check_attempt(out, settings, new)
    # a local read error of the machine is transient (ESTALE on a network filesystem), not a failed Job
    import errno
    from unittest import mock
    with mock.patch.object(Path, "read_bytes", side_effect=OSError(errno.ESTALE, "Stale file handle")):
        with pytest.raises(storage.StorageError) as e:
            storage.read_object(str(tmp_path / "run" / "checkpoints" / checkpoint.ATTEMPT), settings)
    assert e.value.transient and exits.code_of(e.value) == exits.FAILED


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_an_older_attempt_still_running_stops_before_it_writes_beside_the_newer_one(tmp_path, tiny_flux_dir):
    """A pod cut off from the API server but not from the store keeps training after the operator
    made a new attempt (or the same manifest runs twice on one machine): the new attempt claims the
    run's checkpoints when it starts training, and the old one stops at its next checkpoint, before
    its marker or prune, with one error naming the newer attempt (exit 2: not retried); the new one
    trains on from the old one's newest complete checkpoint. Two real trainer processes."""
    from kubelora_trainer.synthetic import build_synthetic_dataset
    data = build_synthetic_dataset(tmp_path / "data", n=2, size=32)
    out = tmp_path / "out"
    job = _job(tmp_path / "job.yaml", tiny_flux_dir, data, str(out), steps=100000, checkpointEverySteps=10,
               lrScheduler="constant", warmupSteps=0, checkpointKeep=100)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KUBELORA_METRICS_PORT": "0"}
    cmd = [sys.executable, "-m", "kubelora_trainer", "run", "--spec", str(job)]
    old = subprocess.Popen(cmd, env={**base, "KUBELORA_CACHE_DIR": str(tmp_path / "cache-old")},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    new = None
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("checkpoints/step-*/state/COMPLETE")):
            assert old.poll() is None and time.monotonic() < deadline, old.communicate()[1][-3000:]
            time.sleep(0.5)
        new = subprocess.Popen(cmd, env={**base, "KUBELORA_CACHE_DIR": str(tmp_path / "cache-new")},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            rc = old.wait(timeout=300)
        except subprocess.TimeoutExpired:
            new.kill()
            raise AssertionError("the old attempt went on: " + new.communicate()[1][-3000:]) from None
        err = old.communicate()[1]
        assert rc == 2, err[-3000:]
        errors = [ln for ln in err.splitlines() if "[error]" in ln]
        assert len(errors) == 1 and "a newer attempt of this run" in errors[0], err[-3000:]
        assert new.poll() is None  # the new attempt trains on
    finally:
        for p in (old, new):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=60)


def test_a_signal_during_a_checkpoint_makes_it_the_stop_checkpoint(tmp_path, tiny_flux_dir, monkeypatch, capsys):
    """SIGTERM while a scheduled checkpoint is being written (a large one takes a while): the run
    stops right after it, with that checkpoint as the stop checkpoint (was: one more step and a
    second checkpoint, which could outlast the grace period). In this process, one rank; the signal
    is sent from inside the save, as it would arrive then."""
    from conftest import one_rank_env
    from kubelora_trainer import checkpoint, train
    from kubelora_trainer.spec import LoRATrainingJobSpec
    from kubelora_trainer.synthetic import build_synthetic_dataset
    data = build_synthetic_dataset(tmp_path / "data", n=2, size=32)
    job = _job(tmp_path / "job.yaml", tiny_flux_dir, data, str(tmp_path / "out"), steps=8, checkpointEverySteps=2)
    spec = LoRATrainingJobSpec.model_validate(yaml.safe_load(job.read_text()))
    one_rank_env(monkeypatch)
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBELORA_METRICS_PORT", "0")
    save = checkpoint.save

    def slow_save(step, *a, **k):
        save(step, *a, **k)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)   # arrives while step 4's checkpoint is being written
    monkeypatch.setattr(checkpoint, "save", slow_save)
    rc = train.run(spec, "stop-in-save")
    out = capsys.readouterr()
    assert rc == 128 + signal.SIGTERM, out.err[-3000:]
    assert "[train] step 4/8" in out.out and "[train] step 5/8" not in out.out, out.out[-3000:]
    assert complete_steps_in(tmp_path / "out") == [2, 4]
    assert "stopped by SIGTERM after step 4" in out.err


def complete_steps_in(out: Path) -> list[int]:
    return complete_steps([p.relative_to(out / "checkpoints").as_posix() for p in (out / "checkpoints").rglob("*")
                           if p.is_file()])


def test_a_signal_during_the_last_steps_evaluation_of_a_full_fine_tune_stops_with_its_checkpoint(
        tmp_path, tiny_flux_dir, monkeypatch, capsys):
    """SIGTERM after the last step's own check, while its evaluation runs: a full fine-tune keeps no
    last-step checkpoint otherwise, and its export would race the grace period with no state to
    resume; now it writes the last step's checkpoint and stops (the next attempt exports)."""
    from conftest import one_rank_env
    from kubelora_trainer import train
    from kubelora_trainer.spec import LoRATrainingJobSpec
    from kubelora_trainer.synthetic import build_synthetic_dataset
    data = build_synthetic_dataset(tmp_path / "data", n=2, size=32)
    spec = LoRATrainingJobSpec.model_validate({
        "model": {"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
        "dataset": {"uri": str(data), "resolution": 32}, "adapter": {"type": "full"},
        "training": {"steps": 3, "logEvery": 1, "learningRate": 1e-4, "checkpointEverySteps": 100},
        "output": {"uri": str(tmp_path / "out")}})
    one_rank_env(monkeypatch)
    monkeypatch.setenv("KUBELORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBELORA_METRICS_PORT", "0")
    evaluate = train.maybe_evaluate

    def signalled(tr, step, *a, **k):
        evaluate(tr, step, *a, **k)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(train, "maybe_evaluate", signalled)
    rc = train.run(spec, "stop-at-end")
    out = capsys.readouterr()
    assert rc == 128 + signal.SIGTERM, out.err[-3000:]
    assert "[train] step 3/3" in out.out and "[phase] export" not in out.out, out.out[-3000:]
    assert complete_steps_in(tmp_path / "out") == [3] and "stopped by SIGTERM after step 3" in out.err
