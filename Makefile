# decathlete: `make demo` runs the whole pipeline on a built-in dataset, `make test` runs the test suite,
# `make bench` runs the side-by-side benchmarks. Each target creates .venv and installs what it needs.
#
# PyTorch is pinned here, and only here. The default is the CPU build that lies on disk on our CPU machines; on a
# GPU machine choose a CUDA build, e.g.  make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The comparison systems (nnU-Net v2, MONAI, batchgeneratorsv2) live in their own environment, never in ours.
BENCH_VENV ?= .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
ONLY ?=
BENCH_ARGS ?=

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

$(BENCH_STAMP): benchmarks/requirements-reference.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BENCH_VENV)/bin/pip install --quiet -r benchmarks/requirements-reference.txt
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(BIN)/decathlete demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py $(if $(ONLY),--only $(ONLY)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .ruff_cache
