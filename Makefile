# Set-up, tests and the demo. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: setup test test-floor test-all lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@# Install the CPU torch build from disk when no torch is present (a plain `torch` pulls CUDA wheels).
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python -m pip install -q -e ".[dev,ray,serve]"
	@# bubblewrap gives the code sandbox network/PID isolation; best effort (needs apt and root).
	@command -v bwrap >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -q bubblewrap >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1)) || true)
	@touch $@

setup: $(VENV)/.installed

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m "not gpu and not slow" -q

lint: setup
	@# both checks run, so one log shows every problem; either failing fails the target
	@rc=0; $(BIN)/ruff check . || rc=1; $(BIN)/python scripts/check_layers.py || rc=1; exit $$rc

# The oldest transformers we support (pyproject: transformers>=5.17, the GPU images' version), overlaid on the
# venv in .floor/ (with the huggingface_hub it needs): the engine, cache-keyword and trainer tests run on it.
FLOOR_PKGS ?= transformers==5.17.0 "huggingface-hub>=1.5,<2.0"
FLOOR_TESTS ?= tests/rollouts/test_cache_keyword.py tests/rollouts/test_engine.py tests/rollouts/test_engine_fast.py \
	tests/rollouts/test_stop_reasons.py tests/trainer/test_rl_math_end_to_end.py tests/trainer/test_checkpoint_hf.py \
	tests/rollouts/test_rollout_worker.py
test-floor: setup
	@[ -d .floor/transformers ] || $(BIN)/python -m pip install -q --target .floor --no-deps $(FLOOR_PKGS)
	@PYTHONPATH=$(CURDIR)/.floor $(BIN)/python -c "import transformers as t; assert t.__version__ == '5.17.0', t.__version__; print('floor: transformers', t.__version__)"
	PYTHONPATH=$(CURDIR)/.floor TRITON_INTERPRET=1 $(BIN)/python -m pytest -m "not gpu and not slow" -q -p no:cacheprovider $(FLOOR_TESTS)

test-all: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python examples/demo.py

bench: setup
	$(BIN)/python benchmarks/kernels_bench.py && $(BIN)/python benchmarks/rollout.py

clean:
	rm -rf $(VENV) runs .pytest_cache
