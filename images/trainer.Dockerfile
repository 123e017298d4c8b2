# kubelora trainer: CUDA torch (pinned through constraints.txt) + diffusers/peft; the operator's
# Job runs `torchrun ... -m kubelora_trainer run --spec /etc/kubelora/spec.yaml` in it.
#   docker build -f images/trainer.Dockerfile -t ghcr.io/kubelora/trainer:0.1.0 .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# python3 comes with the pinned base image's Ubuntu release; apt versions are not pinned further.
# gcc, libc6-dev and python3-dev: torch.compile's Triton builds its kernel launcher with them at the
# first compiled step (training.compile, on by default on GPUs; compiling.py)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY trainer ./trainer
COPY operator ./operator
RUN pip install --no-cache-dir -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cu128 ".[trainer]"
# runs as the non-root user the operator's pod securityContext names
USER 1000
