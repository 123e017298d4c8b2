"""The torchx component (kubelora_trainer/torchx_components.py) with real torchx: a tiny Flux run
through `torchx run -s local_cwd` (local paths, CPU), and dry-runs for the slurm and kubernetes
schedulers whose per-node command is the one the operator's pods run (kubelora_trainer.command)."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torchx", reason="the torchx extra: pip install -c constraints.txt -e '.[torchx]'")

from kubelora_trainer.command import node_command  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPONENT = REPO / "trainer" / "kubelora_trainer" / "torchx_components.py"


def _manifest(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump({"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRATrainingJob",
                                    "metadata": {"name": "tx"}, "spec": spec}))
    return path


def _cluster_manifest(tmp_path) -> Path:
    return _manifest(tmp_path / "job.yaml", model={"type": "flux", "diffusersPath": "s3://models/flux-dev"},
                     dataset={"uri": "s3://data/shapes"}, output={"uri": "s3://out/run1"},
                     resources={"nodes": 2, "gpusPerNode": 8})


def _master(cmd: list[str]) -> str:
    """The --master-addr value: a shell expansion of the scheduler's rank-0 host variable."""
    addr = next(a for a in cmd if a.startswith("--master-addr=")).split("=", 1)[1]
    assert re.fullmatch(r"\$\{[A-Z0-9_]+:=localhost\}", addr), addr
    return addr


def test_the_operators_pods_run_the_shared_node_command():
    from kubelora_operator import manifests
    command, args = manifests.trainer_command()
    assert command + args == node_command("$(PET_NNODES)", "$(PET_NPROC_PER_NODE)", "$(PET_NODE_RANK)",
                                          "$(PET_MASTER_ADDR)", "$(PET_MASTER_PORT)", "/etc/kubelora/spec.yaml")


def test_slurm_dryrun_runs_the_node_command_on_each_node(tmp_path):
    from torchx.runner import get_runner
    from kubelora_trainer.torchx_components import train
    job = _cluster_manifest(tmp_path)
    script = get_runner().dryrun(train(str(job)), "slurm", cfg={}).request.materialize()
    assert script.count("#SBATCH") == 3 and "--gpus-per-task=8" in script  # 2 nodes (a het job), 8 GPUs each
    cmds = [shlex.split(shlex.split(c)[0]) for c in re.findall(r"bash -c ('[^']*')", script)]
    assert len(cmds) == 2
    for rank, cmd in enumerate(cmds):
        assert cmd == node_command(2, 8, rank, _master(cmd), 29500, str(job))


def test_kubernetes_dryrun_runs_the_node_command_in_each_pod(tmp_path):
    from torchx.runner import get_runner
    from kubelora_trainer.torchx_components import train
    job = _cluster_manifest(tmp_path)
    app = train(str(job), image="reg/trainer:1", container_manifest="/etc/kubelora/spec.yaml")
    resource = get_runner().dryrun(app, "kubernetes", cfg={"queue": "gpus"}).request.resource
    assert resource["kind"] == "Job" and resource["apiVersion"].startswith("batch.volcano.sh/")
    assert resource["spec"]["queue"] == "gpus"
    tasks = resource["spec"]["tasks"]
    assert len(tasks) == 2
    for rank, task in enumerate(tasks):
        c = task["template"].spec.containers[0]
        assert c.image == "reg/trainer:1" and c.command[:2] == ["bash", "-c"]
        cmd = shlex.split(c.command[2])
        assert cmd == node_command(2, 8, rank, _master(cmd), 29500, "/etc/kubelora/spec.yaml")
        assert c.resources.limits["nvidia.com/gpu"] == "8"
        # the run's identity, the same in every retry of the app: a retry resumes its checkpoints
        run = {e.name: e.value for e in c.env}["KUBELORA_RUN_ID"]
        assert run and "$" not in run and "{" not in run, run


def test_the_manifests_image_retries_and_cache_size_are_applied_and_the_rest_is_said(tmp_path, capsys):
    """Without --image and --max_retries the component takes resources.image and
    runPolicy.backoffLimit (before: the default image and no retries, whatever the manifest said);
    the cluster-only settings torchx does not apply are named in one note on stderr (cacheSize
    among them: it sizes a pod's fresh emptyDir, and a node's cache folder here may hold earlier runs)."""
    from kubelora_trainer.disk import CACHE_LIMIT_ENV
    from kubelora_trainer.torchx_components import DEFAULT_IMAGE, train
    job = _manifest(tmp_path / "job.yaml", model={"type": "flux", "diffusersPath": "s3://models/flux-dev"},
                    dataset={"uri": "s3://data/shapes"}, output={"uri": "s3://out/run1"},
                    resources={"image": "reg/trainer:2", "cacheSize": "2Gi", "tolerations": [{"key": "gpu"}]},
                    runPolicy={"backoffLimit": 5, "suspend": True})
    role = train(str(job)).roles[0]
    assert (role.image, role.max_retries) == ("reg/trainer:2", 5) and CACHE_LIMIT_ENV not in role.env
    assert capsys.readouterr().err.splitlines() == [
        "[kubelora] note: runPolicy.suspend, resources.tolerations, resources.cacheSize are for a cluster and not "
        "applied on torchx (the operator's pods apply them)"]
    role = train(str(job), image="reg/other:1", max_retries=0).roles[0]   # what the command line says wins
    assert (role.image, role.max_retries) == ("reg/other:1", 0)
    assert train(str(_cluster_manifest(tmp_path))).roles[0].image == DEFAULT_IMAGE
    assert capsys.readouterr().err.count("note:") == 1   # the second call's; the plain manifest sets nothing of a cluster's


def test_the_documented_kubernetes_command_dry_runs_through_the_torchx_cli(tmp_path):
    """docs/torchx.md's command, as written, through torchx's own CLI (the test above calls the
    runner, which takes no workspace: without `--workspace ""` the CLI builds a Docker image)."""
    import subprocess
    import sys
    from pathlib import Path
    doc = (Path(__file__).parent.parent / "docs" / "torchx.md").read_text()
    start = doc.index("torchx run -s kubernetes")
    command = doc[start:doc.index("```", start)].replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:2] == ["torchx", "run"] and "--workspace" in argv
    _cluster_manifest(tmp_path)  # job.yaml, as the command names it
    torchx = Path(sys.executable).parent / "torchx"
    p = subprocess.run([str(torchx), "run", "--dryrun", *argv[2:]], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert "claimName: jobs-pvc" in out and "kubelora_trainer launch" in out and "Docker" not in out, out[-2000:]


def test_a_bad_manifest_is_refused_before_anything_is_launched(tmp_path):
    from kubelora_trainer.spec import SpecError
    from kubelora_trainer.torchx_components import train
    with pytest.raises(SpecError, match="spec.output: required field is missing"):
        train(str(_manifest(tmp_path / "bad.yaml", model={"type": "flux", "diffusersPath": "/m"},
                            dataset={"uri": "/d"})))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchx_run_local_cwd_trains_a_tiny_flux(tmp_path, tiny_flux_dir, overfit_data):
    """`torchx run -s local_cwd <component> --manifest job.yaml`: the real torchx CLI, the launcher
    and torchrun, 2 steps of a tiny Flux on CPU from local paths (no S3)."""
    out = tmp_path / "out"
    job = _manifest(tmp_path / "job.yaml", model={"type": "flux", "diffusersPath": str(tiny_flux_dir), "dtype": "float32"},
                    dataset={"uri": str(overfit_data), "resolution": 32}, adapter={"rank": 4},
                    training={"steps": 2, "logEvery": 1}, output={"uri": str(out)},
                    resources={"nodes": 1, "gpusPerNode": 0})
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", "--wait", "--log",
         f"{COMPONENT}:train", "--manifest", str(job), "--master_port", str(_free_port()),
         "--env", f"KUBELORA_CACHE_DIR={tmp_path / 'cache'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["artifacts"] and (out / "lora.safetensors").exists()
    assert json.loads((out / "status" / "progress.json").read_text()).get("runId"), "no run id: a retry would not resume"
