# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates or reuses .venv and installs only when pyproject.toml changed (a second run skips it).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; set TORCH=torch==<version> (with your index) for a CUDA machine.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fewstep-installed

.PHONY: install demo test test-all bench lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fewstep demo

test: $(STAMP)
	$(BIN)/python -m pytest -n auto --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -n auto --durations=15 --runslow

bench: $(STAMP)
	$(BIN)/fewstep bench --suite quick

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf runs .pytest_cache .ruff_cache
