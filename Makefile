# Everything runs from .venv/ in the repo root; every install goes through constraints.txt
# (torch==2.13.0), because an unpinned torch pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test install install-operator crd reference lint bench clean system-packages chromium

$(BIN)/kubelora: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -e '.[trainer,operator,test,torchx]'
	@touch $@

install: $(BIN)/kubelora

demo: install
	$(BIN)/kubelora demo --nproc 2

# System tools the tests run for real: Prometheus and promtool (Debian's `prometheus`). Installed
# with apt when we are root and they are missing; otherwise the tests that need them fail and say so.
system-packages:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing prometheus (apt)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else \
	    echo "WARNING: prometheus/promtool missing and not root: run 'sudo apt-get install prometheus';" \
	         "the monitoring tests will fail"; \
	  fi; \
	fi

# The report tests render report.html in the system's chromium (headless, no browser download):
# installed with apt when running as root, else named loudly (the tests then fail saying so).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "*** chromium is missing: the report tests need it; install it (sudo apt-get install -y chromium)" >&2; \
	  fi; }

test: install system-packages chromium
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
