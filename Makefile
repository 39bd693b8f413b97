# Every target bootstraps .venv on first use, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the releases this project is tested with (on the CPU machines they lie on disk).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DATA_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo demo-full test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev,tensorboard]"
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST from Debian (offline); falls back to torchvision's download at run time if absent.
data:
	@if [ ! -d $(DATA_DIR) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "note: $(DATA_DIR) missing; install Debian's dataset-fashion-mnist or set VITDISTILL_DATA"; fi; \
	fi

demo: setup data
	$(VENV)/bin/vitdistill demo

demo-full: setup data
	$(VENV)/bin/vitdistill demo --full

test: setup data
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
