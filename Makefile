# Two commands do all the set-up on a fresh machine:
#   make train   - creates .venv, installs, runs the tiny CPU job (examples/tiny/config.yaml)
#   make test    - creates .venv, installs, runs the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on machines without a GPU; on a cluster set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= examples/tiny/config.yaml
ARGS ?=
PY := $(VENV)/bin/python

.PHONY: install train test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

train: install
	$(VENV)/bin/mgrpo smoke $(CONFIG) $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
