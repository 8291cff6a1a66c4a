# The two set-up commands of the README: `make demo` (the whole loop) and `make test`.
# Each creates the virtual environment and installs genloop on its own.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean prometheus

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (from local disk here): an unpinned resolve would pull CUDA wheels.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/genloop demo

# The tests run the real Prometheus and promtool (Debian's package, Prometheus 2.x).
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus)

# Two workers, a test file each at a time: much of the suite waits on subprocesses, Serve rollouts and
# HTTP, so the other core works meanwhile; a file's module fixtures stay in one worker; files with slow
# tests go first (tests/conftest.py), not xdist's order by test count. Trained test
# models are kept in .test-cache/ (GENLOOP_TEST_CACHE moves it): a later run on this machine reuses them.
# The slowest tests are listed at the end: the budget is 15 minutes on two cores.
test: $(STAMP) prometheus
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# The inner loop, before every commit: unit tests, the API over a fake engine, the engine on a tiny
# model; no Ray cluster (under 3 minutes on two cores).
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit --durations=10

# Lint and import order (ruff), then types (mypy); both configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .genloop
