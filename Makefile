# Every target works on a fresh machine: `.venv` is created on first use.
# torch==2.13.0 is installed first (a local CPU wheel here); the project's own
# requirement (torch>=2.4) is then already satisfied, so no CUDA build is pulled.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

lint: $(STAMP)
	$(VENV)/bin/ruff check nexttools tests benchmarks examples
	$(VENV)/bin/ruff format --check nexttools tests benchmarks examples

clean:
	rm -rf $(VENV) demo-run nexttools-run .pytest_cache
