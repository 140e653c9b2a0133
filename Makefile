# deblend: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

# Deblend the bundled sample tiles into out/ with the default method.
run: $(STAMP)
	$(BIN)/deblend run data/ -o out/ --overwrite

# The whole test suite (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check deblend tests pipelines

clean:
	rm -rf $(VENV) out
