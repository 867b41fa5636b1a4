# The README's two commands: `make demo` (main job) and `make test` (test suite).
# Each creates/refreshes a local virtual environment in .venv and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rexmol-installed
# CPU build of torch compatible with 2.13.0; see README "GPU install" for CUDA users.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: venv demo test test-slow bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rexmol demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
