# `make demo` and `make test` each set everything up in .venv (torch 2.13.0 first, then aemt).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= demo_out

.PHONY: setup demo test bench clean

$(BIN)/aemt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/aemt

setup: $(BIN)/aemt

demo: setup
	$(BIN)/aemt demo --out $(OUT)

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/aemt bench --quick

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
