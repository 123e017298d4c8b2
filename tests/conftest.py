"""Shared fixtures: a real S3 server (SeaweedFS), a tiny Flux built offline."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS (a real, SigV4-enforcing S3 server) for the whole session."""
    from kubelora_trainer.local_s3 import SeaweedS3
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    return s3_server.endpoint


@pytest.fixture()
def s3(s3_endpoint, monkeypatch, tmp_path):
    """boto3 client on the S3 server, with the environment a trainer process would see."""
    from kubelora_trainer.local_s3 import ACCESS_KEY, SECRET_KEY
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_REGION": "us-east-1", "KUBELORA_CACHE_DIR": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from kubelora_trainer.storage import S3Settings, make_client
    client = make_client(S3Settings())
    client.env = env
    return client


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    from kubelora_trainer.models.flux.tiny import build_tiny_flux
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


def one_rank_env(monkeypatch) -> None:
    """For train.run in the test process: a group of one on a fresh port, set through monkeypatch so
    nothing is left behind (dist.init would otherwise write RANK and MASTER_PORT into os.environ for
    good, and every later trainer started by a test would inherit a port that is taken)."""
    from kubelora_trainer.dist import _free_port
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)


def run_trainer(manifest: Path, env: dict, nproc: int = 1, timeout: int = 300,
                launcher: bool = False) -> subprocess.CompletedProcess:
    """The real trainer program: under torchrun for nproc > 1 (launcher: through the pods' own
    launcher, `kubelora_trainer launch`, which prints a failure's cause once, last), else one
    plain process."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        run = ["kubelora_trainer", "launch"] if launcher else ["torch.distributed.run"]
        cmd = [sys.executable, "-m", *run, "--standalone", f"--nproc-per-node={nproc}",
               "-m", "kubelora_trainer", "run", "--spec", str(manifest)]
    else:
        cmd = [sys.executable, "-m", "kubelora_trainer", "run", "--spec", str(manifest)]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def the_one_error(proc: subprocess.CompletedProcess) -> str:
    """The run's only `[error]` line, which must be its last line of stderr."""
    errors = [line for line in proc.stderr.splitlines() if "[error]" in line]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


def write_overfit_data(d: Path) -> Path:
    """One captioned image to overfit, one without caption (skipped, counted), one unreadable
    (skipped, counted), in the new folder d."""
    from PIL import Image
    d.mkdir()
    im = Image.new("RGB", (48, 48), (245, 245, 245))
    im.paste((40, 60, 220), (8, 8, 40, 40))
    im.save(d / "good.png")
    (d / "good.txt").write_text("a blue square on a white background")
    im.save(d / "uncaptioned.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "broken.txt").write_text("never used")
    return d


@pytest.fixture()
def overfit_data(tmp_path) -> Path:
    return write_overfit_data(tmp_path / "data")
