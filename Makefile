# Everything runs from .venv/ in the repo root; every install goes through constraints.txt
# (torch==2.13.0), because an unpinned torch pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test install install-operator crd reference lint bench clean

$(BIN)/kubelora: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -e '.[trainer,operator,test,torchx]'
	@touch $@

install: $(BIN)/kubelora

demo: install
	$(BIN)/kubelora demo --nproc 2

test: install
	$(BIN)/python -m pytest -q tests

crd: install
	$(BIN)/kubelora crd --out crds/loratrainingjobs.kubelora.dev.yaml
	$(BIN)/kubelora crd --out charts/kubelora/crds/loratrainingjobs.kubelora.dev.yaml

bench: install
	$(BIN)/python bench/cpu_throughput.py

clean:
	rm -rf $(VENV) .demo .pytest_cache

reference: install
	$(BIN)/python -m kubelora_trainer.reference > docs/reference.md
