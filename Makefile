# The two commands of the README: `make train` (the embedded default) and `make test`.
# Both create .venv and install mmkit into it first, so they work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,lmms,slurm]'
	touch $@

train: setup
	$(BIN)/python -m mmkit.train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)
