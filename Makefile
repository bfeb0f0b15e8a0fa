# The two commands of the README: `make train` (set up + default training), `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here: on CPU machines this release installs a CPU build (see README).
TORCH ?= torch==2.13.0

.PHONY: setup train test check format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python -m bench.data
	$(BIN)/python -m bench.moe_layer
	$(BIN)/python -m bench.expert_parallel
	$(BIN)/python -m bench.engines --offload
	$(BIN)/python -m bench.sharding
	$(BIN)/python -m bench.train_e2e model=mixtral_tiny
	$(BIN)/python -m bench.fit_table

clean:
	rm -rf $(VENV) runs outputs
