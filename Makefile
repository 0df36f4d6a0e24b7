# featpipe developer entry points. `make test` and `make demo` set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tested versions of every package (see docs in README "Installs are locked"): `make venv`, CI and
# every extra install through it. pyproject.toml keeps compatible ranges for `pip install featpipe`.
LOCK ?= constraints.txt
PIP := $(BIN)/python -m pip install -c $(LOCK)

BACKENDS_STAMP := $(VENV)/.backends

.PHONY: venv demo test test-slow test-ray test-hub test-browser test-mlflow lint format test-backends bench gpu-bench clean lock

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e ".[dev]"
	touch $(STAMP)

# The main job on the built-in sample data: write clips, extract features (offline: a
# deterministic random InceptionV3), train a GRU, evaluate it on the test split, predict one clip, and
# end with the path of the run's report.html (one page to open in a browser).
demo: venv
	$(BIN)/featpipe sample-data data
	$(BIN)/featpipe extract --backbone inceptionv3 --data data --weights none
	$(BIN)/featpipe train --head gru --cache cache/inceptionv3.h5 --quiet
	$(BIN)/featpipe evaluate models/latest --split test
	$(BIN)/featpipe predict data/test/grow/grow_test_000.mp4 --model models/latest
	$(BIN)/featpipe report models/latest

# The suite a change must pass (about 13 minutes on 2 CPU cores): every test but those marked slow,
# ray, backends, hub, browser or mlflow, which have targets of their own. CI (.ci/run) runs them all.
test: venv
	$(BIN)/python -m pytest -m "not slow and not ray and not backends and not hub and not browser and not mlflow"

# The tests marked slow (about 25 minutes on 2 CPU cores): quality bars (accuracy on the sample and
# hard sets, tune's retrained best), subprocess kill and signal tests, cross-process determinism,
# the notebook run and the all-backbones sweep.
test-slow: venv
	$(BIN)/python -m pytest -m "slow and not ray and not backends and not hub and not browser and not mlflow"

# `featpipe extract --engine ray` on a real local two-node Ray cluster (loopback only): installs
# the ray extra into the venv, then runs the tests marked ray (a few minutes).
RAY_STAMP := $(VENV)/.ray

$(RAY_STAMP): $(STAMP)
	$(PIP) -e ".[dev,ray]"
	touch $(RAY_STAMP)

test-ray: $(RAY_STAMP)
	$(BIN)/python -m pytest -m ray tests/test_ray_engine.py

# The keras-hub foundation backbones (clip-b16, clip-l14, siglip2-b16, dinov2-b14, videoprism-b,
# --backbone hub:PRESET) and zero-shot: installs the hub extra (keras-hub, tensorflow-text) into the venv, then
# runs the tests marked hub (tiny random presets written by keras-hub, one full-size clip-b16 and one
# full-size videoprism-b chunk with --weights none; offline, about 4 minutes on 2 cores).
HUB_STAMP := $(VENV)/.hub

$(HUB_STAMP): $(STAMP)
	$(PIP) -e ".[dev,hub]"
	touch $(HUB_STAMP)

test-hub: $(HUB_STAMP)
	$(BIN)/python -m pytest -m hub

# report.html opened in a real headless Chromium: what is on the screen at laptop and phone width, every
# image decoded, no network request, sorting by a click (under a minute). Installs Debian's chromium when
# no Chromium is found (apt, as root or through sudo, as on CI); FEATPIPE_CHROMIUM names another binary.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: venv
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$FEATPIPE_CHROMIUM" ] || \
	  { echo "Installing Debian's chromium for the browser tests"; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(BIN)/python -m pytest -m browser

# train --mlflow and tune --mlflow logged to a sqlite store and read back with MLflow's client, and a failing store:
# installs the mlflow extra into the venv, then runs the tests marked mlflow (offline, a few minutes on 2 cores).
MLFLOW_STAMP := $(VENV)/.mlflow

$(MLFLOW_STAMP): $(STAMP)
	$(PIP) -e ".[dev,mlflow]"
	touch $(MLFLOW_STAMP)

test-mlflow: $(MLFLOW_STAMP)
	$(BIN)/python -m pytest -m mlflow

# ruff's lint rules and formatter from pyproject.toml [tool.ruff]: `make format` rewrites, `make lint` only checks.
lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: venv
	$(BIN)/ruff format src tests bench

# PyTorch (CPU build) and JAX beside TensorFlow, for the backend-agnostic end-to-end tests.
$(BACKENDS_STAMP): $(STAMP)
	$(PIP) torch==2.13.0 jax==0.10.2 jaxlib==0.10.2
	touch $(BACKENDS_STAMP)

# sample-data -> extract -> train -> evaluate -> predict under tensorflow, torch and jax, then crossed.
test-backends: $(BACKENDS_STAMP)
	FEATPIPE_TEST_BACKENDS=tensorflow,torch,jax $(BIN)/python -m pytest -m backends tests/test_backends.py

bench: venv
	$(BIN)/python bench/extract_bench.py
	$(BIN)/python bench/train_bench.py

# Stage one on a GPU (set KERAS_BACKEND to a backend with a GPU build installed); see docs/gpus.md.
gpu-bench: venv
	$(BIN)/python bench/gpu_bench.py --json gpu_bench.json

# Refresh the lock: resolve the newest versions pyproject.toml allows (every extra and the backends'
# pins included) in a scratch venv, run lint and the whole suite (make test, test-ray, test-hub, test-browser, test-mlflow, test-backends)
# on exactly those versions, and only then replace constraints.txt. A failure leaves the old lock in
# place and the new candidate in constraints.new.txt to look at; exclude a bad version in pyproject.toml.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) constraints.new.txt
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -e ".[dev,ray,hub,mlflow]" torch==2.13.0 jax==0.10.2 jaxlib==0.10.2
	{ echo "# Tested versions for make venv and CI (Linux x86_64, CPython 3.11). Refresh with: make lock"; \
	  echo "# Generated $$(date -u +%Y-%m-%d) by pip freeze; pyproject.toml keeps the compatible ranges."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -i '^featpipe\b' | LC_ALL=C sort -f; \
	} > constraints.new.txt
	$(MAKE) VENV=$(LOCK_VENV) LOCK=constraints.new.txt lint test test-slow test-ray test-hub test-browser test-mlflow test-backends
	mv constraints.new.txt $(LOCK)
	rm -rf $(LOCK_VENV) $(VENV)
	@echo "constraints.txt refreshed and tested; commit it. The next make builds .venv from it."

clean:
	rm -rf $(VENV) data models cache/*.h5 cache/*.journal cache/*.lock
