# `make demo` and `make test` work on a fresh clone: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	# openai 2.x, the last major on plain httpx, for the capture test of the httpx (not httpx2) path
	$(BIN)/python -m pip install --quiet --no-deps --target $(VENV)/legacy/openai2 'openai==2.54.0' tqdm
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict src/llm_spend

test: lint typecheck
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/guard.py
	$(BIN)/python bench/pg_cycles.py
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/pg_throughput.py
	$(BIN)/python bench/pricing.py
	$(BIN)/python bench/memory.py 200000

clean:
	rm -rf $(VENV) build dist src/*.egg-info
