# `make demo`, `make lint` and `make test` each create (or update) the virtualenv in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

# Two test processes (the CI machine has 2 cores); `make test-all` adds the slow cases.
# Both also run the Examples: of the library's docstrings (--doctest-modules blaq_jax).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow" tests --doctest-modules blaq_jax

test-all: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal tests --doctest-modules blaq_jax

# ruff, then pyrefly's type check of blaq_jax/ (configured in pyproject.toml),
# resolving imports in this virtualenv.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pyrefly check --python-interpreter-path $(PY)

clean:
	rm -rf $(VENV) .pytest_cache
