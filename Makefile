# The two set-up commands of the README. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# mlflow run --env-manager local runs entry points with the `python` on PATH: make it the venv's
export PATH := $(BIN):$(PATH)

.PHONY: run test test-fast venv clean

$(VENV)/.installed: pyproject.toml requirements-nnunet.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision first, from the pinned (local) wheels, so nothing pulls another torch build
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	# nnU-Net's pinned set without its resolver conflict on timm (see the file)
	$(BIN)/pip install --quiet --no-deps -r requirements-nnunet.txt
	touch $@

venv: $(VENV)/.installed

## The main job on the embedded default (synthetic phantom, local sqlite tracking in ./mlflow.db)
run: $(VENV)/.installed
	$(BIN)/mlflow run . -e main --env-manager local --experiment-name ichflow-pipeline

## The test suite (uses ../shared real data when present)
test: $(VENV)/.installed
	$(BIN)/pytest --durations=30

## The suite without the tests that train models (a few minutes)
test-fast: $(VENV)/.installed
	$(BIN)/pytest -m "not slow"

clean:
	rm -rf work mlruns mlflow.db
