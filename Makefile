# The two set-up commands of the README: `make demo` (the whole loop) and `make test`.
# Each creates the virtual environment and installs genloop on its own.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean prometheus

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
# HTTP, so the other core works meanwhile; a file's module fixtures stay in one worker.
# The slowest tests are listed at the end: the CI budget is 40 minutes on two cores.
test: $(STAMP) prometheus
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=25

# Lint and import order (ruff), then types (mypy); both configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .genloop
