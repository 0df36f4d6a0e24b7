# featpipe developer entry points. `make test` and `make demo` set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

# The main job on the built-in sample data: write clips, extract features (offline: a
# deterministic random InceptionV3), train a GRU, evaluate it on the test split, and predict one clip.
demo: venv
	$(BIN)/featpipe sample-data data
	$(BIN)/featpipe extract --backbone inceptionv3 --data data --weights none
	$(BIN)/featpipe train --rnn gru --cache cache/inceptionv3.h5 --quiet
	$(BIN)/featpipe evaluate models/latest --split test
	$(BIN)/featpipe predict data/test/grow/grow_test_000.mp4 --model models/latest

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python bench/extract_bench.py
	$(BIN)/python bench/train_bench.py

clean:
	rm -rf $(VENV) data models cache/*.h5 cache/*.journal cache/*.lock
