# The two commands of the README: `make train` (set up + default training), `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here: on CPU machines this release installs a CPU build (see README).
TORCH ?= torch==2.13.0

.PHONY: setup train test check format bench gpu-wheels gpu-check clean

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
	$(BIN)/python -m bench.pipeline_bubble
	$(BIN)/python -m bench.fit_table

# The GPU check (README, "On a GPU machine"): `make gpu-wheels` here, with the package registry, fetches
# what a GPU machine with its own CUDA torch lacks, for its Python, into $(GPU_WHEELS) (ignored; a few MB);
# `make gpu-check` there (bench/gpu_check.py) installs them without a network and runs the check.
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON_VERSION ?= 3.12
GPU_OUT ?= bench/out/gpu
# Binary wheels for that Python; wandb stays behind (imported only when logging.wandb.mode is not
# disabled), and so does all that the GPU machine's image has (torch, numpy, transformers, ...).
GPU_BINARY := megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1 pydantic==2.14.4 \
	pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
	hjson==3.1.0
# Published as source only: built here into pure-Python wheels.
GPU_SOURCE := deepspeed==0.19.8 antlr4-python3-runtime==4.9.3

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d $(GPU_WHEELS) \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		$(GPU_BINARY)
	$(PYTHON) -m pip wheel -q --no-deps -w $(GPU_WHEELS) $(GPU_SOURCE)
	@ls $(GPU_WHEELS); du -sh $(GPU_WHEELS)

gpu-check:
	$(PYTHON) bench/gpu_check.py $(GPU_OUT) $(ARGS)

clean:
	rm -rf $(VENV) runs outputs
