# Every target works on a fresh machine: `.venv` is created on first use.
# torch==2.13.0 is installed first (a local CPU wheel here); the project's own
# requirement (torch>=2.4) is then already satisfied, so no CUDA build is pulled.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-lowest bench example lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh

# The whole suite: lint, format check, types, then the tests.
test: $(STAMP)
	$(VENV)/bin/ruff check nexttools tests benchmarks examples
	$(VENV)/bin/ruff format --check nexttools tests benchmarks examples
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

# The tests against the lowest versions pyproject.toml declares (.ci/lowest_constraints.py), in their
# own venv; torch stays at the development pin.
LOWEST_VENV := .venv-lowest
LOWEST_STAMP := $(LOWEST_VENV)/.installed

$(LOWEST_STAMP): pyproject.toml .ci/lowest_constraints.py
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOWEST_VENV)/bin/python .ci/lowest_constraints.py > $(LOWEST_VENV)/constraints.txt
	$(LOWEST_VENV)/bin/python -m pip install -q -c $(LOWEST_VENV)/constraints.txt -e '.[test]'
	touch $(LOWEST_STAMP)

# The torchrun tests are left out: torch is the same pin in both venvs, and they add a minute.
test-lowest: $(LOWEST_STAMP)
	$(LOWEST_VENV)/bin/python -m pytest -q -m "not slow and not torchrun"

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# The TRL GRPO example (examples/trl_grpo/) in its own venv: TRL is never a core dependency.
EXAMPLE_VENV := .venv-examples
EXAMPLE_STAMP := $(EXAMPLE_VENV)/.installed

$(EXAMPLE_STAMP): pyproject.toml
	test -x $(EXAMPLE_VENV)/bin/python || $(PYTHON) -m venv $(EXAMPLE_VENV)
	$(EXAMPLE_VENV)/bin/python -m pip install -q --upgrade pip
	$(EXAMPLE_VENV)/bin/python -m pip install -q torch==2.13.0
	$(EXAMPLE_VENV)/bin/python -m pip install -q -e '.[test,examples]'
	touch $(EXAMPLE_STAMP)

# A reduced in-place measurement (1 seed, 4 arms, budget 80): about 10 minutes on 2 cores.
example: $(EXAMPLE_STAMP)
	$(EXAMPLE_VENV)/bin/python -m examples.trl_grpo.sweep --out trl-inplace --arms reduced --budget 80

lint: $(STAMP)
	$(VENV)/bin/ruff check nexttools tests benchmarks examples
	$(VENV)/bin/ruff format --check nexttools tests benchmarks examples

clean:
	rm -rf $(VENV) $(EXAMPLE_VENV) $(LOWEST_VENV) demo-run nexttools-run trl-grpo-run trl-inplace .pytest_cache
