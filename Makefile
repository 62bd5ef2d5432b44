# `make demo`, `make lint` and `make test` each create (or update) the virtualenv in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-all lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

# Two test processes (the CI machine has 2 cores), both running the Examples:
# of the library's docstrings (--doctest-modules blaq_jax) too.
# `make test` and `make test-fast` compile with XLA's backend (LLVM)
# optimization off: the same graphs, compiled in about 60% of the time, which
# is most of the suite's. The bit-for-bit equalities between graphs
# (`bit_exact`) run at XLA's default level, as users compile. `make test-all`
# compiles everything at the default level and adds the slow cases.
# `make test-fast` (the inner loop) leaves out the end-to-end and the
# multi-device tests (examples, benchmarks, other processes, sharding).
# Compiled graphs are cached in .cache/jax-tests.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal
FAST_XLA := XLA_FLAGS="--xla_backend_optimization_level=0 $(XLA_FLAGS)"

test: $(STAMP)
	$(FAST_XLA) $(PYTEST) -m "not slow and not bit_exact" tests --doctest-modules blaq_jax
	$(PYTEST) -m "bit_exact and not slow" tests

test-fast: $(STAMP)
	$(FAST_XLA) $(PYTEST) -m "not slow and not end_to_end and not multi_device" tests --doctest-modules blaq_jax

test-all: $(STAMP)
	$(PYTEST) tests --doctest-modules blaq_jax

# ruff, then pyrefly's type check of blaq_jax/ (configured in pyproject.toml),
# resolving imports in this virtualenv.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pyrefly check --python-interpreter-path $(PY)

clean:
	rm -rf $(VENV) .pytest_cache .cache/jax-tests
