# Set up and run everything on a machine that has only Python and make.
#   make install / test / train   the tested versions, exactly as pinned in requirements.lock
#   make lock                      re-resolve requirements.lock from pyproject.toml (newest versions its ranges allow)
#   make test-latest               a fresh venv with the newest versions the ranges allow; the upstream-API tests
#   make test-oldest               a fresh venv with the oldest versions the ranges allow; the upstream-API tests
#   make test-transformers         the upstream-API tests under each of TRANSFORMERS_VERSIONS, the rest as locked
#   make lint                      ruff's lint and format checks (pinned RUFF; `make format` applies the formatter)
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
LOCK = requirements.lock
# torch is the CPU build (a plain `torch` from PyPI is a multi-GB CUDA build). pip finds it through the
# find-links it is configured with where the wheel is on local disk, otherwise on PyTorch's CPU index.
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
LOCAL_WHEELS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
PIP_TORCH_SOURCE ?= $(if $(LOCAL_WHEELS),--find-links $(LOCAL_WHEELS),--extra-index-url $(TORCH_INDEX))
UV_TORCH_SOURCE ?= $(if $(LOCAL_WHEELS),--find-links $(LOCAL_WHEELS),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)
UV ?= uv==0.13.9
RUFF ?= ruff==0.17.6
MYPY ?= mypy==2.4.1
TOOLS = .venv-tools
UPSTREAM_TESTS = $(BIN)/python -m pytest tests -q -m upstream
SHOW_VERSIONS = $(BIN)/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|tokenizers|safetensors|lm.eval|huggingface.hub|accelerate|numpy|triton)=='

.PHONY: install test train lint format lock test-latest test-oldest test-transformers clean

install: $(VENV)/.installed

# A new venv each time the lock changes, so that nothing outside the lock survives.
$(VENV)/.installed: $(LOCK) pyproject.toml Makefile
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_TORCH_SOURCE) -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

test: install lint
	$(BIN)/python -m pytest tests -q

# The main job: the tiny MUDDFormer on the bundled Shakespeare corpus, on the CPU.
train: install
	$(BIN)/mudd train --preset tiny --out runs/tiny-mudd

$(TOOLS)/.installed: Makefile
	rm -rf $(TOOLS)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q "$(UV)" "$(RUFF)" "$(MYPY)"
	touch $@

# mypy checks the model core (pyproject.toml [tool.mypy]) against the packages of the project's venv.
lint: $(TOOLS)/.installed install
	$(TOOLS)/bin/ruff check .
	$(TOOLS)/bin/ruff format --check .
	$(TOOLS)/bin/mypy --python-executable $(BIN)/python

format: $(TOOLS)/.installed
	$(TOOLS)/bin/ruff check --fix .
	$(TOOLS)/bin/ruff format .

# Every package pinned, for the Python that runs make; `lowest` is the same with the oldest allowed versions.
lock: $(TOOLS)/.installed
	echo "$(TORCH)" | $(TOOLS)/bin/uv pip compile pyproject.toml - --all-extras $(UV_TORCH_SOURCE) \
	    --python $(PYTHON) --custom-compile-command "make lock" -o $(LOCK)

requirements-oldest.txt: pyproject.toml $(TOOLS)/.installed
	echo "$(TORCH)" > $@.torch
	$(TOOLS)/bin/uv pip compile pyproject.toml --all-extras --resolution lowest-direct --override $@.torch \
	    $(UV_TORCH_SOURCE) --python $(PYTHON) --no-header --no-annotate -o $@
	rm -f $@.torch

test-latest: VENV = .venv-latest
test-latest:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_TORCH_SOURCE) "$(TORCH)"
	$(BIN)/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,eval]" "$(TORCH)"
	$(SHOW_VERSIONS)
	$(UPSTREAM_TESTS)

test-oldest: VENV = .venv-oldest
test-oldest: requirements-oldest.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_TORCH_SOURCE) -r requirements-oldest.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(SHOW_VERSIONS)
	$(UPSTREAM_TESTS)

# The first and last 5.x releases we know, the last one before the cache was renamed, and one between.
TRANSFORMERS_VERSIONS ?= 5.0.0 5.12.1 5.23.0 5.24.0
test-transformers: VENV = .venv-transformers
test-transformers:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_TORCH_SOURCE) -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	for version in $(TRANSFORMERS_VERSIONS); do \
	    $(BIN)/python -m pip install -q "transformers==$$version" && $(SHOW_VERSIONS) && $(UPSTREAM_TESTS) || exit 1; \
	done

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-transformers $(TOOLS) requirements-oldest.txt build *.egg-info src/*.egg-info .pytest_cache
