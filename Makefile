# Set up and run everything on a machine that has only Python and make.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# torch is pinned: on this platform 2.13.0 resolves to a CPU build (a plain `torch` pulls CUDA).
TORCH ?= torch==2.13.0

.PHONY: install test train clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]" "$(TORCH)"
	touch $@

test: install
	$(BIN)/python -m pytest tests -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache

# The main job: the tiny MUDDFormer on the bundled Shakespeare corpus, on the CPU.
train: install
	$(BIN)/mudd train --preset tiny --out runs/tiny-mudd
